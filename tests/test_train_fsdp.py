"""train.strategy=fsdp on two CPU processes (torchrun, gloo): FSDP2 shards, the ddp checkpoint files, exact resume.

One fsdp run of 6 steps (checkpoints at 3 and 6) is shared by the tests:
* a copy of its folder cut back to step 3 and resumed ends bit-identical to it (weights, EMA, AdamW states);
* a ddp run of the same experiment (the ``ddp_run`` fixture of tests/conftest.py, which test_train_distributed
  checks too) writes the same files with the same keys and shapes, and its step-3 weights agree
  with the fsdp run's to fp32 round-off (only the order of the gradient reductions differs);
* the ddp checkpoint resumes under fsdp (the formats are one);
* router buffers (DTop-p controller, Default MoE vectors, statistics) are identical on both ranks (replicas.json).
Gradient checkpointing is on throughout; a short bf16 (autocast) fsdp run checks mixed precision.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.multiprocess       # every launch is torchrun with two ranks (tests/conftest.py)

# `dit-moe train`'s own entry: a rank that sharded a model ends there without interpreter teardown (dit_moe/cli.py).
SCRIPT = textwrap.dedent("""
    import sys
    from dit_moe.cli import run_command
    resume = sys.argv[1]
    sys.exit(run_command("train", ([] if resume == "new" else ["--resume", resume]) + sys.argv[2:]))
""")

EXPERIMENT = ["model.name=DiT-T/2-E8K2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
              "model.grad_checkpointing=true",                   # blocks recompute inside their FSDP units
              "routing.type=dtopp", "routing.target=2", "routing.default_moe=true", "train.tracker=null",
              "train.global_batch_size=32", "train.grad_accum=2", "train.steps=6", "train.log_every=3",
              "train.ckpt_every=3", "train.keep_last=3", "train.lr=1e-3", "sample.steps=2", "sample.num_per_class=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(root, run_name, strategy, resume="new", extra=()):
    script = root / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), resume, *EXPERIMENT,
           f"train.run_dir={root}", f"train.run_name={run_name}", f"train.strategy={strategy}", *extra]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root / run_name


def cut_back(src, dst, step: int):
    """A copy of run folder src holding only its checkpoints up to ``step`` (as if it had stopped there)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run.lock", "replicas.json"))
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)


def ckpt(run, step):
    return run / "checkpoints" / f"step-{step:07d}"


def tensors(path):
    """Every tensor of a checkpoint: weights, EMA, Accelerate's model copy and the AdamW states."""
    out = {f"model/{k}": v for k, v in load_file(path / "model.safetensors").items()}
    out.update({f"ema/{k}": v for k, v in load_file(path / "ema.safetensors").items()})
    out.update({f"acc/{k}": v for k, v in load_file(path / "accelerate" / "model.safetensors").items()})
    opt = torch.load(path / "accelerate" / "optimizer.bin", weights_only=False)
    for i, s in opt["state"].items():
        out.update({f"opt/{i}/{k}": v for k, v in s.items()})
    ema = torch.load(path / "accelerate" / "custom_checkpoint_0.pkl", weights_only=False)
    out.update({f"ema_state/{k}": v for k, v in ema.items()})
    return out, opt["param_groups"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("fsdp"), "fsdp", "fsdp")


def test_fsdp_run_keeps_router_state_identical_and_shards(fsdp_run):
    replicas = json.loads((fsdp_run / "replicas.json").read_text())
    assert replicas["sharded"] is True and replicas["in_sync"] is True
    r0, r1 = sorted(replicas["ranks"], key=lambda r: r["rank"])
    assert r0["buffers"] == r1["buffers"] and r0["step"] == r1["step"] == 6
    assert r0["model_parts"] != r1["model_parts"]      # each rank holds its own shard, not a replica
    records = [json.loads(line) for line in (fsdp_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6] and all(r["num_processes"] == 2 for r in records)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert (fsdp_run / "samples" / "step-0000006.png").is_file()      # the gathered EMA sampled on rank 0
    # Stacked experts shard on dim 0: each of the 2 ranks holds 4 whole experts of the 8.
    assert "stacked experts (8, 128, 512) -> (4, 128, 512) on this rank" in (fsdp_run / "log.txt").read_text()


def test_fsdp_resume_is_exact(fsdp_run, tmp_path):
    cut_back(fsdp_run, tmp_path / "resumed", 3)
    resumed = launch(tmp_path, "resumed", "fsdp", resume="latest")
    a, groups_a = tensors(ckpt(fsdp_run, 6))
    b, groups_b = tensors(ckpt(resumed, 6))
    assert a.keys() == b.keys() and groups_a == groups_b
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:5]}"
    assert "resumed from" in (resumed / "log.txt").read_text()


def test_fsdp_writes_the_ddp_files_and_ddp_resumes_under_fsdp(fsdp_run, ddp_run, tmp_path):
    ddp = ddp_run                         # this experiment under ddp (tests/conftest.py; test_train_distributed.py)
    files = lambda p: sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())
    assert files(ckpt(ddp, 3)) == files(ckpt(fsdp_run, 3))
    d, groups_d = tensors(ckpt(ddp, 3))
    f, groups_f = tensors(ckpt(fsdp_run, 3))
    assert d.keys() == f.keys() and groups_d == groups_f
    assert all(d[k].shape == f[k].shape and d[k].dtype == f[k].dtype for k in d)
    # Same data, seeds and initial weights: the runs differ only in how gradients are reduced over the ranks.
    worst = max((d[k].double() - f[k].double()).abs().max().item() for k in d if d[k].is_floating_point())
    assert worst < 1e-6, f"fsdp and ddp weights differ by {worst} after 3 steps"   # measured: 1.5e-8
    assert json.loads((ddp / "replicas.json").read_text())["sharded"] is False

    cut_back(ddp, tmp_path / "ddp_to_fsdp", 3)
    cont = launch(tmp_path, "ddp_to_fsdp", "fsdp", resume="latest")
    a, _ = tensors(ckpt(cont, 6))
    b, _ = tensors(ckpt(fsdp_run, 6))
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < 1e-6, f"a ddp checkpoint continued under fsdp strays {worst} from the fsdp run"   # 7.9e-8


def test_fsdp_trains_in_bf16(tmp_path):
    run = launch(tmp_path, "bf16", "fsdp", extra=("train.mixed_precision=bf16", "train.steps=2", "train.log_every=2"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and torch.isfinite(torch.tensor(records[-1]["loss"]))
    assert json.loads((run / "replicas.json").read_text())["in_sync"] is True
    assert "precision bf16" in (run / "log.txt").read_text()


def test_strategy_is_validated():
    from dit_moe.config import ConfigError, load_config

    assert load_config(None, ["train.strategy=fsdp"]).train.strategy == "fsdp"
    with pytest.raises(ConfigError, match=r"train.strategy: 'zero3' is not one of \('ddp', 'fsdp'\)"):
        load_config(None, ["train.strategy=zero3"])
    with pytest.raises(ConfigError, match="train.strategy=fsdp with train.mixed_precision=fp16"):
        load_config(None, ["train.strategy=fsdp", "train.mixed_precision=fp16"])
