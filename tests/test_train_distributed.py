"""Two CPU processes (torchrun + Accelerator(cpu=True) -> gloo): replicas stay identical, loss is all-reduced."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRIPT = textwrap.dedent("""
    import sys
    from dit_moe.config import load_config
    from dit_moe.training import train
    cfg = load_config(None, sys.argv[1:])
    train(cfg)
""")


@pytest.mark.multiprocess
@pytest.mark.parametrize("routing", ["dtopp"])
def test_two_processes_keep_replicas_identical(tmp_path, routing):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script),
           "model.name=DiT-T/2-E8K2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
           f"routing.type={routing}", "routing.target=2", "routing.default_moe=true",
           f"train.run_dir={tmp_path}", "train.run_name=ddp", "train.tracker=null",
           "train.global_batch_size=32", "train.grad_accum=2", "train.steps=6", "train.log_every=3",
           "train.ckpt_every=3", "train.lr=1e-3",
           # The end-of-run EMA grid is not under test: 2 steps for 10 images, not the default 250 for 80.
           "sample.steps=2", "sample.num_per_class=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    run = tmp_path / "ddp"
    replicas = json.loads((run / "replicas.json").read_text())
    assert replicas["num_processes"] == 2 and len(replicas["ranks"]) == 2
    r0, r1 = sorted(replicas["ranks"], key=lambda r: r["rank"])
    for key in ("model", "ema", "buffers"):   # buffers: DTop-p controller, Default-MoE vectors, statistics
        assert r0[key] == r1[key], f"{key} differs between ranks"
    assert replicas["in_sync"] is True and r0["step"] == r1["step"] == 6
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert all(r["num_processes"] == 2 for r in records)
    assert (run / "checkpoints" / "step-0000006" / "accelerate" / "random_states_1.pkl").is_file()
    assert "global batch 32 = 2 process(es) x 2 accumulation step(s) x 8" in (run / "log.txt").read_text()
