"""Two CPU processes (torchrun + Accelerator(cpu=True) -> gloo): replicas stay identical, loss is all-reduced."""
import json
import os
import socket
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The training entry of a torchrun launch (test_compile.py launches it around compiled blocks).
SCRIPT = textwrap.dedent("""
    import sys
    from dit_moe.config import load_config
    from dit_moe.training import train
    cfg = load_config(None, sys.argv[1:])
    train(cfg)
""")


@pytest.mark.multiprocess
def test_two_processes_keep_replicas_identical(ddp_run):
    """The shared two-rank run (tests/conftest.py: DTop-p + Default MoE, global batch 32 = 2 ranks x 2 accumulation
    steps x 8, 6 steps, checkpoints at 3 and 6; test_train_fsdp compares the FSDP runs with it)."""
    run = ddp_run
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
