"""benchmarks/gpu_check.py runs end to end on the CPU (--device cpu --tiny), also with diffusers and torch-fidelity
missing as on the GPU machine, and writes its JSON and table. The figures of a tiny CPU run mean nothing; the
compile backend is aot_eager here (dynamo + AOTAutograd, no C++ build) to keep the test in seconds.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gpu_check  # noqa: E402

ARGS = ["--device", "cpu", "--tiny", "--compile-backend", "aot_eager"]
CPU_SKIP = "cpu device (expert parallelism is checked on 2 or more GPUs)"


def _check_train(result, loss):
    rows = result["train"]
    assert len(rows) == 8 and [r["compiled"] for r in rows] == [False] * 4 + [True] * 4
    for r in rows:
        assert "error" not in r and r["step_ms"] > 0 and r["images_per_s"] > 0 and r["loss"] == loss, r
        assert r["mfu"] is None and r["peak_mem_gb"] is None                 # CPU: no peak FLOP/s, no CUDA memory
    assert all(r["compile_s"] is not None for r in rows if r["compiled"])
    moe = [r for r in rows if "E8K2" in r["arm"]]
    assert all(1.0 <= r["mean_active_experts"] <= 8.0 for r in moe)
    assert result["ratios"]["moe_over_equal_active_eager"] > 0 and result["ratios"]["moe_over_dense_compiled"] > 0


def test_gpu_check_end_to_end_on_cpu_without_diffusers(tmp_path):
    """The GPU machine lacks diffusers and torch-fidelity: block both and run the real command line."""
    out = tmp_path / "check.json"
    code = ("import runpy, sys; sys.modules['diffusers'] = None; sys.modules['torch_fidelity'] = None; "
            f"sys.argv = {[SCRIPT, *ARGS, '--out', str(out)]!r}; runpy.run_path({SCRIPT!r}, run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["packages_missing"] == ["diffusers", "torch_fidelity"] and result["errors"] == []
    t = result["tests"]
    assert t["tests"] >= 10 and t["skipped"] == t["tests"] and t["failures"] == t["errors"] == 0, t
    _check_train(result, "epsilon mse (diffusers not installed)")
    assert [r["sampler"] for r in result["sampling"]] == ["ddpm", "dpm"]
    assert all("diffusers is not installed" in r["skipped"] for r in result["sampling"])
    table = (tmp_path / "check.txt").read_text()
    assert "training step (bf16)" in table and "DiT-T/2-E1K1 8D" in table and table in proc.stdout
    assert result["ep"] == {"skipped": CPU_SKIP} and f"ep: skipped: {CPU_SKIP}" in table
    assert json.loads(proc.stdout.strip().splitlines()[-1])["device"] == result["device"]


def test_gpu_check_in_process_with_the_ddpm_loss_and_samplers(tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main([*ARGS, "--skip", "tests", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    _check_train(result, "ddpm hybrid")
    assert result["ep"] == {"skipped": CPU_SKIP}
    assert f"ep: skipped: {CPU_SKIP}" in (tmp_path / "check.txt").read_text()
    rows = result["sampling"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddpm", 10), ("dpm", 5)]
    assert all(r["images_per_s"] > 0 for r in rows)


def test_peak_table_and_goals():
    assert gpu_check.peak_bf16("NVIDIA H100 80GB HBM3") == gpu_check.peak_bf16("NVIDIA H200") == 989e12
    assert gpu_check.peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_bf16("NVIDIA H100 PCIe") is None and gpu_check.peak_bf16("Tesla T4") is None
    rows = [{"arm": "DiT-XL/2-E8K2 topk", "compiled": True, "step_ms": 110.0},
            {"arm": "DiT-XL/2-E1K1 8D", "compiled": True, "step_ms": 100.0},
            {"arm": "DiT-XL/2", "compiled": True, "step_ms": 80.0, "mfu": 0.45}]
    r = gpu_check.ratios(rows, tiny=False)
    assert r["moe_over_equal_active_compiled"] == 1.1 and r["moe_over_dense_compiled"] == 1.375
    assert r["moe_over_equal_active_eager"] is None
    assert r["goals"] == {"moe_over_equal_active_compiled<=1.15": True, "dense_mfu_compiled>=0.40": True}


def test_ep_section_skips_below_two_gpus(monkeypatch):
    """The ep arm needs 2 or more GPUs; with one it is recorded as skipped, and why (no CUDA needed to check)."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    reason = gpu_check.ep_skip_reason(torch.device("cuda"))
    assert reason == "1 GPU (expert parallelism needs 2 or more)"
    assert gpu_check.ep_lines({"skipped": reason}) == ["ep: skipped: 1 GPU (expert parallelism needs 2 or more)"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpu_check.ep_skip_reason(torch.device("cuda")) is None
