"""The demo's four stages end to end on a 2-step run (the real demo trains 1000 steps): files and numbers come back."""
import json
from pathlib import Path

from dit_moe import demo


def test_demo_pipeline_smoke(tmp_path, capsys):
    overrides = [f"train.run_dir={tmp_path}", "train.steps=2", "train.log_every=1", "train.ckpt_every=2",
                 "train.global_batch_size=16", "train.warmup_steps=1", "train.tracker=null", "sample.num_per_class=1",
                 "sample.steps=3"]
    # No sampler flags: the embedded default's own sampling section (flow, Euler, cfg 2 inside [0, 0.7]) is used.
    argv = ["--num-samples", "20", "--device", "cpu", *overrides]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "euler 3 steps, cfg 2.0" in out and "digits FID:" in out
    result = json.loads((tmp_path / "default" / "demo.json").read_text())
    assert (result["sampler"], result["steps"], result["objective"], result["num_samples"]) == ("euler", 3, "flow", 20)
    assert result["guidance_interval"] == [0.0, 0.7] and result["cfg_scale"] == 2.0
    assert result["fid_digits"] >= 0 and 0 <= result["classifier_accuracy"] <= 1
    for key in ("grid", "samples", "metrics"):
        assert Path(result["files"][key]).is_file() and str(tmp_path) in result["files"][key], key
    assert result["files"]["analysis"] and result["files"]["curves"]
