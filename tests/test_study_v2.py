"""Study v2 (configs/study-digits-v2.yaml): every arm resolves under either objective, and a smoke run of the shipped
config with tiny overrides through the library (dense, Top-k, expert choice, Default MoE and flow arms) writes the
paired report and skips its finished runs on a second invocation. The real study is hours of CPU: CI never runs it."""
import dataclasses
import json
import math
from pathlib import Path

import pytest

from dit_moe import study

ROOT = Path(__file__).resolve().parents[1]
V2 = ROOT / "configs" / "study-digits-v2.yaml"
TINY = ["train.steps=2", "train.log_every=1", "train.ckpt_every=2", "train.global_batch_size=16",
        "train.warmup_steps=1", "sample.num_per_class=1"]
SMOKE_ARMS = ["dense", "topk", "expert-choice", "topk-dmoe", "topk-flow", "dtopp-flow"]


def test_v2_design():
    """The arms the design promises, at the promised length, seeds, sampler and comparison."""
    spec = study.load_study(V2)
    assert spec.seeds == [0, 1, 2] and spec.comparison.baseline == "topk"
    assert spec.evaluation.sampler_for("ddpm") == ("ddim", 50) and spec.evaluation.sampler_for("flow") == ("euler", 50)
    cfgs = {a.name: study.arm_config(spec, a, 0, threshold=0.3 if a.calibrate_from else None) for a in spec.arms}
    assert all(c.train.steps == 2000 for c in cfgs.values())
    r = {n: c.routing for n, c in cfgs.items()}
    assert cfgs["dense"].model.name == "DiT-T/2-E1K1" and cfgs["dense"].model.expert_hidden_ratio == 8
    assert r["topk-bias"].balance_bias and r["expert-choice"].type == "expert_choice"
    assert r["topp-cal"].type == "topp" and spec.arm("topp-cal").calibrate_from == "topp-0.4"
    assert (r["dtopp"].lb_coef, r["dtopp-lb"].lb_coef) == (1e-4, 0.01)
    assert [(r[n].type, r[n].default_mode) for n in ("topk-dmoe", "dtopp-dmoe", "topk-dmoe-grad")
            if r[n].default_moe] == [("topk", "forward"), ("dtopp", "forward"), ("topk", "grad_only")]
    flow = {n for n, c in cfgs.items() if c.diffusion.objective == "flow"}
    assert flow == {"topk-flow", "dtopp-flow"}
    assert all(c.diffusion.objective == "ddpm" and c.sample.sampler == "ddim" for n, c in cfgs.items() if n not in flow)
    assert all(cfgs[n].sample.sampler == "euler" for n in flow)
    assert spec.baseline_of(spec.arm("dtopp-flow")) == "topk-flow" and spec.baseline_of(spec.arm("topk")) is None
    # The flow arm is the DDPM arm plus the objective: nothing else differs.
    a, b = cfgs["dtopp"].to_dict(), cfgs["dtopp-flow"].to_dict()
    assert a["routing"] == b["routing"]


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_every_v2_arm_runs_under_either_objective(objective):
    """`dit-moe study configs/study-digits-v2.yaml diffusion.objective=flow model.learn_sigma=false` is a valid
    study: every arm resolves with its objective's sampler (DDPM arms would otherwise keep a DDPM sampler)."""
    extra = [f"diffusion.objective={objective}", f"model.learn_sigma={str(objective == 'ddpm').lower()}"]
    spec = study.load_study(V2, extra)
    for arm in spec.arms:
        cfg = study.arm_config(spec, arm, 0, threshold=0.3 if arm.calibrate_from else None)
        expected = "flow" if arm.name.endswith("-flow") else objective
        assert cfg.diffusion.objective == expected, arm.name
        assert cfg.sample.sampler == ("euler" if expected == "flow" else "ddim"), arm.name


def test_v2_smoke_run_and_resume(tmp_path):
    spec = study.load_study(V2, TINY, output=str(tmp_path / "out"), records=str(tmp_path / "records"))
    spec.seeds, spec.sweep, spec.report = [0], None, None
    spec.evaluation = dataclasses.replace(spec.evaluation, steps=2, flow_steps=2, num_samples=20, batch_size=20,
                                          analysis_per_class=1, probe_batches=1, probe_batch_size=16, timing_steps=2)
    summary = study.run_study(spec, only_arms=SMOKE_ARMS, plots_dir=tmp_path / "plots")
    assert list(summary["arms"]) == SMOKE_ARMS
    for name, arm in summary["arms"].items():
        for key in ("final_loss", "fid", "classifier_accuracy", "sample_active_mean", "sec_per_step"):
            assert arm[key]["mean"] is not None and math.isfinite(arm[key]["mean"]), (name, key)
    arms = summary["arms"]
    assert arms["dense"]["num_experts"] == 1 and arms["expert-choice"]["routing"] == "expert_choice"
    assert arms["topk-dmoe"]["default_moe"] and arms["topk-dmoe"]["default_mode"] == "forward"
    assert {n: arms[n]["objective"] for n in ("topk", "topk-flow", "dtopp-flow")} == \
        {"topk": "ddpm", "topk-flow": "flow", "dtopp-flow": "flow"}
    runs = {r["arm"]: r for r in summary["runs"]}
    assert (runs["topk-flow"]["sampler"], runs["topk"]["sampler"]) == ("euler", "ddim")
    assert "vb" not in json.loads((tmp_path / "out" / "runs" / "topk-flow-s0" / "metrics.jsonl")
                                  .read_text().splitlines()[0])
    # Paired with Top-k (flow block: with topk-flow) at one seed: differences, no interval, not resolved.
    p = summary["paired"]
    assert set(p) == {"dense", "expert-choice", "topk-dmoe", "topk-flow", "dtopp-flow"}
    assert p["dtopp-flow"]["baseline"] == "topk-flow"
    fid = p["dense"]["metrics"]["fid"]
    assert fid["diffs"] == pytest.approx([runs["dense"]["fid"] - runs["topk"]["fid"]]) and not fid["resolved"]
    assert summary["interactions"] == []          # dtopp was not run: the objective interaction is left out
    md = (tmp_path / "out" / "results.md").read_text()
    assert "dense vs topk, FID:" in md and "not resolved at 1 seed" in md and "| topk-flow | topk; flow |" in md

    # A second invocation trains and samples nothing: every run is recognised as finished.
    log = tmp_path / "out" / "runs" / "expert-choice-s0" / "metrics.jsonl"
    before = log.read_text()
    again = study.run_study(spec, only_arms=SMOKE_ARMS, plots_dir=tmp_path / "plots")
    assert all(r.get("skipped") for r in again["runs"]) and log.read_text() == before
    assert again["paired"]["dense"]["metrics"]["fid"]["diffs"] == fid["diffs"]
    # A later sitting with other evaluation settings does not mix them into the table: it names the difference.
    spec.evaluation = dataclasses.replace(spec.evaluation, num_samples=10)
    with pytest.raises(study.StudyError, match=r"other evaluation settings \(evaluation.num_samples: 20 in the "
                                               r"record, 10 now\)"):
        study.run_study(spec, only_arms=SMOKE_ARMS)
    # Without records, the run folder's own result is checked the same way.
    spec.records = None
    with pytest.raises(study.StudyError, match="evaluated with other settings .*num_samples: 20 then, 10 now"):
        study.run_study(spec, only_arms=SMOKE_ARMS)
