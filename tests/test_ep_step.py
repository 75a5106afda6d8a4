"""benchmarks/ep_step.py under torchrun with 2 CPU processes (gloo), the tiniest setting: DiT-T/2-E8K2 on the builtin
8x8 digits, 2 timed steps. One launch; the figures mean nothing, the JSON's shape and consistency do. The same JSON
feeds gpu_check's ep summary and table lines (the path it takes with 2 or more GPUs)."""
import json
import math
import os
import subprocess
import sys

import pytest

from test_train_distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "ep_step.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


@pytest.mark.multiprocess
def test_ep_step_two_cpu_processes(tmp_path):
    out = tmp_path / "ep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), SCRIPT, "--model", "DiT-T/2-E8K2", "--input-size", "8", "--channels",
           "1", "--batch", "4", "--steps", "2", "--warmup", "1", "--ep", "2,4", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    s = result["setup"]
    assert (s["world"], s["batch"], s["device"], s["data"], s["steps"]) == (2, 4, "cpu", "builtin digits", 2)
    assert result["notes"] == ["ep4 skipped: needs 2 <= N <= W=2, N dividing W and E=8"]
    arms = {r["arm"]: r for r in result["arms"]}
    assert list(arms) == ["ddp", "ep2", "dense"]
    assert [arms[a]["expert_parallel"] for a in arms] == [1, 2, 1]
    assert arms["dense"]["model"] == "DiT-T/2-E1K1" and arms["dense"]["expert_hidden_ratio"] == 8.0
    for r in arms.values():
        assert len(r["step_ms"]) == 2 and r["micro_batch"] == 2, r
        for key in ("step_ms_median", "step_ms_min", "images_per_s", "tokens_per_s", "a2a_ms_per_step", "a2a_share",
                    "x_dense", "loss"):
            assert math.isfinite(r[key]), (r["arm"], key, r[key])
        assert 0 < r["step_ms_min"] <= r["step_ms_median"] and r["images_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["images_per_s"] * 16, rel=1e-3)      # (8 / 2)^2 tokens per image
        assert 0.0 <= r["a2a_share"] <= 1.0
        assert r["a2a_ms_per_step"] == pytest.approx(r["a2a_fwd_ms_per_step"] + r["a2a_bwd_ms_per_step"], abs=2e-3)
    assert arms["ddp"]["a2a_ms_per_step"] == arms["dense"]["a2a_ms_per_step"] == 0.0     # no exchange without ep
    assert arms["ep2"]["a2a_fwd_ms_per_step"] > 0 and arms["ep2"]["a2a_bwd_ms_per_step"] > 0
    assert arms["ep2"]["a2a_share"] > 0
    assert arms["ddp"]["x_ddp"] == 1.0 and arms["dense"]["x_dense"] == 1.0 and arms["dense"]["x_ddp"] is None
    assert arms["ep2"]["x_ddp"] == pytest.approx(arms["ep2"]["step_ms_median"] / arms["ddp"]["step_ms_median"],
                                                 rel=1e-3)
    assert arms["ddp"]["active_experts_per_token"] == arms["ep2"]["active_experts_per_token"] == 2.0   # Top-k: K
    assert arms["dense"]["active_experts_per_token"] == 1.0
    assert "ep2" in proc.stdout and "x dense" in proc.stdout

    import gpu_check
    summary = gpu_check.ep_summary(result)
    assert summary["moe_over_dense_ddp"] == arms["ddp"]["x_dense"]
    assert summary["ep2"]["a2a_share"] == arms["ep2"]["a2a_share"]
    lines = gpu_check.ep_lines({"gpus": 2, "seconds": 1.0, "result": result, "summary": summary})
    assert lines[0].startswith("ep (2 GPUs, DiT-T/2-E8K2 topk") and any(line.split()[0] == "ep2" for line in lines[2:])
