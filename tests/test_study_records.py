"""Study records (dit_moe/study/records.py): a study whose run folders are gone (a fresh clone) skips and reports
every recorded (arm, seed) and runs only the rest; a record from other settings, or a broken one, is a one-line
error naming the file and the field; the records carry the routing state and the compute/quality sweep."""
import dataclasses
import json
import shutil

import pytest

from dit_moe import study
from dit_moe.study.config import SweepSpec

from test_study_v2 import TINY, V2

# The tests share the module fixture `recorded` (a study of three arms): one xdist worker runs them all, so it is
# built once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("study_records")


def _tiny(tmp_path, records=None, seeds=(0,)):
    spec = study.load_study(V2, TINY, output=str(tmp_path / "out"), records=str(records or tmp_path / "records"))
    spec.seeds = list(seeds)
    spec.evaluation = dataclasses.replace(spec.evaluation, steps=2, flow_steps=2, num_samples=20, batch_size=20,
                                          analysis_per_class=1, probe_batches=1, probe_batch_size=16, timing_steps=2)
    spec.sweep = SweepSpec(arms=["dtopp", "topk"], targets=[1.0, 3.0], top_k=[1, 2], calibration_samples=2)
    spec.report = tmp_path / "report"
    return spec


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny study of topk, dtopp and expert-choice (seed 0), run once: (tmp folder, spec, summary)."""
    tmp = tmp_path_factory.mktemp("records")
    spec = _tiny(tmp)
    summary = study.run_study(spec, only_arms=["topk", "dtopp", "expert-choice"])
    return tmp, spec, summary


def test_records_hold_what_the_report_needs(recorded):
    tmp, spec, summary = recorded
    rec = json.loads((tmp / "records" / "dtopp" / "seed-0.json").read_text())
    for key in study.records.REQUIRED_FIELDS + ("routing_state", "sweep", "toolkit", "regenerate",
                                                "probe_active_per_layer"):
        assert key in rec, key
    assert rec["config"]["routing"]["type"] == "dtopp" and rec["config"]["train"]["steps"] == 2
    assert rec["regenerate"].endswith("--arms dtopp --seeds 0")
    assert rec["toolkit"]["version"] and "train_cpu_s" in rec["timings"] and "sweep_s" in rec["timings"]
    assert rec["timings"]["resumed"] is False            # a run of one process: its seconds are the whole cost
    state = rec["routing_state"]
    assert len(state["drn_scale_per_layer"]) == len(state["threshold_per_layer"]) == len(state["train_active_per_layer"])
    assert 0 <= state["drn_layers_at_bound"] <= len(state["drn_scale_per_layer"])
    # The sweep: one point per target, each measured on its own samples; re-targeting moves the activated experts.
    pts = rec["sweep"]["points"]
    assert [p["target_experts"] for p in pts] == [1.0, 3.0] and rec["sweep"]["kind"] == "target_experts"
    assert pts[0]["active_mean"] < pts[1]["active_mean"]
    assert all(p["fid"] is not None for p in pts)
    # Top-k: k = 2 is the main evaluation itself (not sampled again), k = 1 activates exactly one expert.
    topk = json.loads((tmp / "records" / "topk" / "seed-0.json").read_text())
    k1, k2 = topk["sweep"]["points"]
    assert k2 == {"top_k": 2, "fid": topk["fid"], "classifier_accuracy": topk["classifier_accuracy"],
                  "active_mean": topk["sample_active_mean"], "main_evaluation": True}
    assert k1["active_mean"] == pytest.approx(1.0)
    # Expert choice is not swept; every record has its per-layer routing.
    ec = json.loads((tmp / "records" / "expert-choice" / "seed-0.json").read_text())
    assert "sweep" not in ec and ec["routing_state"]["sample_active_per_layer"]
    assert (tmp / "records" / "timing.json").is_file()


def test_report_has_per_seed_per_layer_and_sweep_parts(recorded):
    tmp, _, summary = recorded
    md = (tmp / "report" / "results.md").read_text()
    assert md == (tmp / "out" / "results.md").read_text()
    for part in ("## Per seed", "## Per layer", "layers at the DRN bound", "DRN scale bound",
                 "## Compute against quality at sampling time", "| dtopp | target 3 |", "| topk | k = 2 (trained) |"):
        assert part in md, part
    assert {p.name for p in (tmp / "report").glob("*.png")} >= {"compute_quality.png", "active_per_layer.png",
                                                                "fid.png", "paired.png"}
    sw = summary["sweep"]["dtopp"]
    assert sw["kind"] == "target_experts" and [p["target_experts"] for p in sw["points"]] == [1.0, 3.0]
    assert summary["layers"]["dtopp"]["drn_scale"] and "drn_scale" not in summary["layers"]["topk"]


def test_fresh_clone_skips_recorded_runs_and_runs_the_rest(recorded, tmp_path):
    """Only the records travel (no run folders): those runs are reported as they were, the others run."""
    src, _, first = recorded
    shutil.copytree(src / "records", tmp_path / "records")
    spec = _tiny(tmp_path)
    summary = study.run_study(spec, only_arms=["topk", "dtopp", "expert-choice", "dense"], plots_dir=tmp_path / "p")
    runs = {r["arm"]: r for r in summary["runs"]}
    assert all(runs[a].get("skipped") for a in ("topk", "dtopp", "expert-choice")) and not runs["dense"].get("skipped")
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == ["dense-s0"]
    for arm in ("topk", "dtopp", "expert-choice"):
        assert summary["arms"][arm]["fid"] == first["arms"][arm]["fid"]
    assert summary["paired"]["dtopp"]["metrics"]["fid"] == first["paired"]["dtopp"]["metrics"]["fid"]
    assert (tmp_path / "records" / "dense" / "seed-0.json").is_file()
    assert summary["arms"]["topk"]["timing_sec_per_step"] == first["arms"]["topk"]["timing_sec_per_step"]


def _copy(recorded, tmp_path):
    src, _, _ = recorded
    shutil.copytree(src / "records", tmp_path / "records")
    return tmp_path / "records" / "topk" / "seed-0.json"


def test_record_from_other_evaluation_settings_is_refused(recorded, tmp_path):
    _copy(recorded, tmp_path)
    spec = _tiny(tmp_path)
    spec.evaluation = dataclasses.replace(spec.evaluation, num_samples=10)
    with pytest.raises(study.StudyError, match=r"topk/seed-0.json: recorded under other evaluation settings "
                                               r"\(evaluation.num_samples: 20 in the record, 10 now\)"):
        study.run_study(spec, only_arms=["topk"])


def test_record_from_another_study_config_is_refused(recorded, tmp_path):
    _copy(recorded, tmp_path)
    spec = study.load_study(V2, [*TINY, "train.lr=0.002"], output=str(tmp_path / "out"),
                            records=str(tmp_path / "records"))
    spec.seeds, spec.evaluation, spec.sweep = [0], _tiny(tmp_path).evaluation, None
    with pytest.raises(study.StudyError, match=r"topk/seed-0.json: recorded with another experiment config "
                                               r"\(config.train.lr: 0.001 in the record, 0.002 now\)"):
        study.run_study(spec, only_arms=["topk"])


@pytest.mark.parametrize("damage, message", [
    (lambda t: t[: len(t) // 2], r"not a valid record \(invalid JSON at line \d+\); delete it to run topk seed 0"),
    (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "fid"}),
     r"not a valid record \(missing field 'fid'\)"),
    (lambda t: json.dumps({**json.loads(t), "seed": 1}), r"field 'seed' is 1, expected 0"),
])
def test_broken_record_is_one_line_naming_the_file(recorded, tmp_path, damage, message):
    f = _copy(recorded, tmp_path)
    f.write_text(damage(f.read_text()))
    with pytest.raises(study.StudyError, match=f"{f}: {message}") as e:
        study.run_study(_tiny(tmp_path), only_arms=["topk"])
    assert "\n" not in str(e.value)


def test_config_difference_tolerates_new_keys_at_their_default():
    from dit_moe.study.records import config_difference

    now = {"train": {"lr": 1e-3, "new_knob": 0, "run_dir": "b"}}
    assert config_difference({"train": {"lr": 1e-3, "run_dir": "a"}}, now, {"train": {"new_knob": 0}}) is None
    assert config_difference({"train": {"lr": 1e-3}}, now, {"train": {"new_knob": 1}}) == \
        "train.new_knob: absent in the record, 0 now"
    assert config_difference({"train": {"lr": 1e-3, "gone": 1, "new_knob": 0}}, now) == \
        "train.gone: 1 in the record, unknown to this toolkit"


def test_report_only_reports_what_is_recorded_and_runs_nothing(recorded, tmp_path, capsys):
    src, _, first = recorded
    shutil.copytree(src / "records", tmp_path / "records")
    spec = _tiny(tmp_path)
    summary = study.report_study(spec, only_arms=["topk", "dtopp", "dense"])
    assert summary["missing"] == ["dense-s0"] and not (tmp_path / "out" / "runs").exists()
    assert summary["arms"]["dtopp"]["fid"] == first["arms"]["dtopp"]["fid"]
    md = (tmp_path / "report" / "results.md").read_text()
    assert "In progress: 2 of 3 runs finished**; not yet: dense-s0" in md
    with pytest.raises(study.StudyError, match="no finished run to report"):
        study.report_study(_tiny(tmp_path / "empty"))
