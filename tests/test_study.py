"""The routing study: a shortened study through the real entry point, re-run skipping, config validation, calibration."""
import json
import math
from pathlib import Path

import pytest
import torch

from dit_moe import study
from dit_moe.config import load_config

ROOT = Path(__file__).resolve().parents[1]

SHORT = """
name: short
output: {out}
base:
  config: {root}/configs/default.yaml
  overrides: [diffusion.objective=ddpm, model.learn_sigma=true, train.steps=4, train.log_every=2, train.ckpt_every=4, train.global_batch_size=16,
              train.warmup_steps=1, train.tracker=null, sample.num_per_class=1]
seeds: [0]
evaluation: {{sampler: ddim, steps: 3, num_samples: 20, batch_size: 20, analysis_per_class: 1,
             probe_batches: 1, probe_batch_size: 16, timing_steps: 2}}
arms:
  - {{name: topk, overrides: [routing.type=topk]}}
  - {{name: dtopp, overrides: [routing.type=dtopp, routing.target=2.0]}}
"""


def _write(tmp_path, text: str) -> Path:
    f = tmp_path / "study.yaml"
    f.write_text(text)
    return f


def test_short_study_writes_results_and_skips_finished_runs(tmp_path):
    cfg = _write(tmp_path, SHORT.format(out=tmp_path / "out", root=ROOT))
    plots = tmp_path / "plots"
    assert study.main([str(cfg), "--plots-dir", str(plots)]) == 0

    out = tmp_path / "out"
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["arms"]) == ["topk", "dtopp"]
    for name, arm in summary["arms"].items():
        for key in ("final_loss", "fid", "classifier_accuracy", "train_active_mean", "sample_active_mean",
                    "probe_active_mean", "sec_per_step"):
            assert arm[key]["mean"] is not None and math.isfinite(arm[key]["mean"]), (name, key)
    topk = summary["arms"]["topk"]
    # Top-k activates exactly k experts for every token, in training, in the probe and while sampling.
    assert topk["train_active_mean"]["mean"] == pytest.approx(2.0)
    assert topk["sample_active_mean"]["mean"] == pytest.approx(2.0)
    assert topk["probe_active_token_std"]["mean"] == pytest.approx(0.0)
    dtopp_run = json.loads((out / "runs" / "dtopp-s0" / study.RESULT_FILE).read_text())
    assert len(dtopp_run["curve"]["loss"]) == 2 and dtopp_run["steps"] == 4
    assert (out / "runs" / "dtopp-s0" / "analysis" / "analysis.json").is_file()   # `dit_moe.analyze` ran on it
    table = (out / "results.md").read_text()
    assert "| topk |" in table and "| dtopp |" in table
    assert {p.name for p in plots.glob("*.png")} >= {"loss_curves.png", "active_experts.png", "fid.png"}

    # A second invocation trains and samples nothing: finished runs are recognised and reused.
    log = out / "runs" / "topk-s0" / "metrics.jsonl"
    before = log.read_text()
    assert study.main([str(cfg), "--plots-dir", str(plots)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(r.get("skipped") for r in again["runs"])
    assert log.read_text() == before
    assert again["arms"]["topk"]["fid"] == summary["arms"]["topk"]["fid"]


def test_study_config_errors_name_the_key(tmp_path):
    good = SHORT.format(out=tmp_path / "out", root=ROOT)
    bad = good.replace("num_samples: 20", "num_sample: 20")
    with pytest.raises(study.StudyError, match="num_sample"):
        study.load_study(_write(tmp_path, bad))
    bad = good.replace("routing.target=2.0", "routing.targt=2.0")
    with pytest.raises(study.StudyError, match="dtopp.*targt"):
        study.load_study(_write(tmp_path, bad))
    bad = good.replace("{name: dtopp, overrides: [routing.type=dtopp, routing.target=2.0]}",
                       "{name: dtopp, overrides: [routing.type=dtopp], calibrate: {from: topk}}")
    with pytest.raises(study.StudyError, match="routing.type=topp"):
        study.load_study(_write(tmp_path, bad))
    bad = good.replace("name: dtopp", "name: topk")
    with pytest.raises(study.StudyError, match="duplicate arm"):
        study.load_study(_write(tmp_path, bad))
    assert study.main([str(_write(tmp_path, good.replace("seeds: [0]", "seeds: [0, 0]")))]) == 2   # a user error


def test_calibrated_threshold_hits_the_target_and_restores_the_model():
    from dit_moe.models.routers.topp import TopPRouter
    from dit_moe.registry import build_model

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "default.yaml", ["routing.type=topp", "routing.threshold=0.4"])
    model = build_model(cfg)
    inputs = study.probe_inputs(cfg, num_batches=1, batch_size=32)
    result = study.calibrate_topp_threshold(model, inputs, target=3.0)
    assert result["measured"] == pytest.approx(3.0, abs=0.02)
    assert all(r.threshold == 0.4 for r in model.modules() if isinstance(r, TopPRouter))
    # Setting the found threshold reproduces the measurement; a higher threshold activates more experts.
    for r in model.modules():
        if isinstance(r, TopPRouter):
            r.threshold = result["threshold"]
    assert study.probe_routing(model, inputs)["mean"] == pytest.approx(result["measured"])
    for r in model.modules():
        if isinstance(r, TopPRouter):
            r.threshold = min(1.0, result["threshold"] + 0.2)
    assert study.probe_routing(model, inputs)["mean"] > result["measured"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("study-*.yaml")), ids=lambda p: p.name)
def test_shipped_study_configs_load(path):
    """Every study config we ship validates, and each of its arms resolves to an experiment config."""
    spec = study.load_study(path)
    assert spec.arms and spec.seeds
    for arm in spec.arms:
        cfg = study.arm_config(spec, arm, spec.seeds[0], threshold=0.3 if arm.calibrate_from else None)
        assert cfg.train.seed == spec.seeds[0]


def test_study_config_goes_through_the_experiment_config_schema(tmp_path):
    """One mechanism validates both kinds of config: load_study's error is dit_moe.config.from_dict's, with the file."""
    import yaml

    from dit_moe.config import ConfigError, from_dict

    for bad, message in [
        ({"base": {}, "seeds": [0], "arms": [{"name": "a", "calibrate": {"from": "a", "targt": 1}}]},
         "arms[0].calibrate: unknown key(s) targt; valid keys: from, target"),
        ({"base": {}, "seeds": [0, "1"], "arms": [{"name": "a"}]}, "seeds[1]: expected an integer, got '1'"),
        ({"base": {"overrides": "train.lr=1"}, "seeds": [0], "arms": [{"name": "a"}]},
         "base.overrides: expected a list, got 'train.lr=1'"),
        ({"seeds": [0], "arms": [{"name": "a"}]}, "missing key(s) base"),
        ({"base": {}, "seeds": [0], "arms": [{"overrides": []}]}, "arms[0]: missing key(s) name"),
        ({"base": {}, "seeds": [0], "arms": [{"name": "a"}], "evaluation": {"cfg_scale": "high"}},
         "evaluation.cfg_scale: expected a number, got 'high'"),
    ]:
        with pytest.raises(ConfigError) as direct:
            from_dict(study.StudyFile, bad, where="")
        assert str(direct.value) == message
        f = tmp_path / "s.yaml"
        f.write_text(yaml.safe_dump(bad))
        with pytest.raises(study.StudyError) as loaded:
            study.load_study(f)
        assert str(loaded.value) == f"{f}: {message}"
    spec = from_dict(study.StudyFile, {"base": {}, "seeds": [1], "arms": [
        {"name": "p", "overrides": ["routing.type=topp"]},
        {"name": "c", "overrides": ["routing.type=topp"], "calibrate": {"from": "p", "target": 3}}]}, where="")
    assert (spec.arms[1].calibrate_from, spec.arms[1].calibrate_target, spec.arms[0].calibrate_from) == ("p", 3.0, None)
    assert spec.evaluation == study.EvalSpec() and spec.base.overrides == [] and spec.arms[0].description == ""


@pytest.mark.multiprocess
def test_sigterm_to_the_study_stops_its_workers_with_a_checkpoint(tmp_path):
    """`kill PID` of `dit-moe study --jobs 2` reaches the worker processes: both runs in flight checkpoint, the study
    exits with 128 + 15, and no worker is left training (a later invocation would find its run folder locked)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    text = SHORT.format(out=tmp_path / "out", root=ROOT).replace("train.steps=4", "train.steps=100000")
    cfg = _write(tmp_path, text.replace("train.ckpt_every=4", "train.ckpt_every=100000"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dit_moe", "study", str(cfg), "--jobs", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = [tmp_path / "out" / "runs" / f"{a}-s0" / "metrics.jsonl" for a in ("topk", "dtopp")]
    while not all(f.is_file() for f in logs) and proc.poll() is None:
        time.sleep(0.5)
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
    proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *children]:       # leave no worker training 100000 steps behind a failed test
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        raise
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out.splitlines()[-1]
    for a in ("topk", "dtopp"):
        assert list((tmp_path / "out" / "runs" / f"{a}-s0" / "checkpoints").glob("step-*")), a

    def alive():
        out = []
        for c in children:
            try:
                if "zombie" not in Path(f"/proc/{c}/status").read_text().lower():
                    out.append(c)
            except OSError:
                pass
        return out

    deadline = time.time() + 60        # multiprocessing's resource tracker leaves once it sees its pipe close
    while alive() and time.time() < deadline:
        time.sleep(0.5)
    assert len(children) >= 2 and not alive()
