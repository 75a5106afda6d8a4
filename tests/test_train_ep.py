"""train.expert_parallel on CPU processes (torchrun, gloo): ep training tracks ddp, resumes exactly, checkpoints are ddp's.

The default experiment (DiT-T/2-E8K2, DTop-p, here with Default MoE, gradient accumulation and checkpointing on the
digits) for 20 steps, checkpoints at 10 and 20, the same seeds, data and global batch under every layout:
* 2 processes: ddp (expert_parallel=1) and ep 2; 4 processes (no accumulation, compared at step 20): ddp,
  dp 2 x ep 2 and ep 4. Expert parallelism changes where experts compute, not what: weights, EMA, AdamW moments and
  the router buffers (DTop-p threshold and integral, Default MoE vectors) agree with the ddp run of the same world
  size within TOL (fp32 round-off of other reduction orders: measured up to 5e-8 abs after 20 steps on 2 and 4
  processes), losses to 1e-5 relative; the router buffers and the replicated parameters are bit-identical on all
  ranks (replicas.json);
* a copy of the ep run cut back to step 10 and resumed under ep 2 ends bit-identical to the uninterrupted run, and so
  does an ep run whose rank 1 alone gets SIGTERM after step 7 (both ranks stop there with a checkpoint) and is
  resumed; resumed under ddp (another N) it tracks it within TOL; one process loads the ep checkpoint.
Each torchrun launch runs several trainings one after another in the same processes (4 s of imports per process
on two cores are paid once).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from dit_moe.config import ConfigError, ExperimentConfig
from dit_moe.inference import load
from dit_moe.validation import validate
from test_train_fsdp import ckpt, cut_back, free_port, tensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each argument is one training (a JSON list of `dit-moe train` arguments), run in order in the same processes.
SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from accelerate.state import PartialState
    import dit_moe.training.loop as loop
    from dit_moe.cli import run_command
    # train() ends with accelerator.end_training(), which destroys the process group; the next job must find it
    # alive (re-creating the default group under torchrun's store can hang), so it is torn down at exit instead.
    PartialState.destroy_process_group = lambda self, group=None: None
    update_ema = loop.update_ema
    for job in sys.argv[1:]:
        job = json.loads(job)
        steps = [0]

        def update_and_maybe_stop(*args, **kwargs):     # job["sigterm"]: rank 1 alone gets SIGTERM after that step
            update_ema(*args, **kwargs)
            steps[0] += 1
            if steps[0] == job["sigterm"] and os.environ["RANK"] == "1":
                os.kill(os.getpid(), signal.SIGTERM)

        loop.update_ema = update_and_maybe_stop if job["sigterm"] else update_ema
        code = run_command("train", job["args"])
        if code != (128 + signal.SIGTERM if job["sigterm"] else 0):
            sys.exit(code or 1)
""")

EXPERIMENT = ["model.name=DiT-T/2-E8K2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
              "model.grad_checkpointing=true", "routing.type=dtopp", "routing.target=2", "routing.default_moe=true",
              "train.tracker=null", "train.global_batch_size=32", "train.grad_accum=2", "train.steps=20",
              "train.log_every=5", "train.ckpt_every=10", "train.keep_last=2", "train.lr=1e-3", "sample.steps=2",
              "sample.num_per_class=1"]
TOL = dict(rtol=0, atol=1e-6)
multiprocess = pytest.mark.multiprocess       # torchrun launches: one xdist group (tests/conftest.py)


def launch(root, nproc: int, jobs: list[tuple], extra=()):
    """jobs: (run name, expert_parallel, resume: "new" or "latest"[, SIGTERM to rank 1 after this many steps]),
    trained in order by ``nproc`` processes."""
    script = root / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    args = [json.dumps({"sigterm": sigterm[0] if sigterm else 0,
                        "args": ([] if resume == "new" else ["--resume", resume]) + EXPERIMENT
                        + [f"train.run_dir={root}", f"train.run_name={name}", f"train.expert_parallel={ep}", *extra]})
            for name, ep, resume, *sigterm in jobs]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {name: root / name for name, *_ in jobs}


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_tracks(run, reference, steps=(10, 20)):
    """Same files and keys; every tensor within TOL; the logged losses within 1e-5 relative."""
    for step in steps:
        (a, groups), (b, ref_groups) = tensors(ckpt(run, step)), tensors(ckpt(reference, step))
        assert a.keys() == b.keys() and groups == ref_groups
        for k in a:
            torch.testing.assert_close(a[k], b[k], **TOL, msg=f"{run.name} vs {reference.name}, step {step}: {k}")
        assert any(k.endswith("routing_controller.threshold") for k in a)     # the controller is compared too
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(reference)), rtol=1e-5, atol=0)


def assert_in_sync(run, world):
    replicas = json.loads((run / "replicas.json").read_text())
    assert replicas["num_processes"] == world and replicas["sharded"] is True and replicas["in_sync"] is True
    parts = {r["model_parts"] for r in replicas["ranks"]}
    assert len(parts) > 1                      # the ranks of an ep group hold different experts


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ep2"), 2, [("ddp", 1, "new"), ("ep2", 2, "new")])


@multiprocess
def test_two_processes_ep_tracks_ddp(two):
    assert_tracks(two["ep2"], two["ddp"])
    assert_in_sync(two["ep2"], 2)
    log = (two["ep2"] / "log.txt").read_text()
    assert "1 (dp) x 2 (ep) mesh; rank 0 holds experts [0, 4) of each of 4 MoE layers" in log


@multiprocess
def test_ep_resume_and_kill_are_exact_and_continue_under_ddp(two, tmp_path):
    cut_back(two["ep2"], tmp_path / "again", 10)
    cut_back(two["ep2"], tmp_path / "as_ddp", 10)
    runs = launch(tmp_path, 2, [("again", 2, "latest"), ("as_ddp", 1, "latest"),
                                ("killed", 2, "new", 7), ("killed", 2, "latest")])
    for run in ("again", "killed"):
        (a, _), (b, _) = tensors(ckpt(runs[run], 20)), tensors(ckpt(two["ep2"], 20))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{run}: resume not bit-identical"
    log = (runs["killed"] / "log.txt").read_text()
    assert "saved checkpoint" in log and "step-0000007 (stopped by SIGTERM)" in log and "resumed from" in log
    assert_tracks(runs["as_ddp"], two["ep2"], steps=(20,))
    assert "train.expert_parallel 2 -> 1" in (runs["as_ddp"] / "log.txt").read_text()
    # One process reads the ep checkpoint: whole expert tensors, the ddp run's names and shapes.
    bundle = load(ckpt(two["ep2"], 20))
    ema = load_file(ckpt(two["ep2"], 20) / "ema.safetensors")
    assert bundle.model.blocks[0].mlp.experts.w_in.shape[0] == 8
    assert all(torch.equal(v, ema[k]) for k, v in bundle.model.state_dict().items() if k in ema)


@multiprocess
def test_four_processes_dp_by_ep_and_ep4_track_ddp(tmp_path):
    # One checkpoint per run and no accumulation (the 2-process runs cover it): four processes share two cores.
    runs = launch(tmp_path, 4, [("ddp", 1, "new"), ("dp2xep2", 2, "new"), ("ep4", 4, "new")],
                  extra=["train.ckpt_every=20", "train.grad_accum=1"])
    for name in ("dp2xep2", "ep4"):
        assert_tracks(runs[name], runs["ddp"], steps=(20,))
        assert_in_sync(runs[name], 4)
    assert "2 (dp) x 2 (ep) mesh" in (runs["dp2xep2"] / "log.txt").read_text()
    assert "1 (dp) x 4 (ep) mesh; rank 0 holds experts [0, 2)" in (runs["ep4"] / "log.txt").read_text()


# ----------------------------------------------------------------------------------------------- bad settings

def _cfg(**train):
    return ExperimentConfig.from_dict({"model": {"name": train.pop("model", "DiT-T/2-E8K2")}, "train": train})


@pytest.mark.parametrize("settings,world,message", [
    ({"expert_parallel": 3}, 3, "train.expert_parallel=3 must divide the 8 experts per MoE layer of DiT-T/2-E8K2"),
    ({"expert_parallel": 4}, 2, "train.expert_parallel=4 must divide the number of processes (2)"),
    ({"expert_parallel": 2}, 3, "train.expert_parallel=2 must divide the number of processes (3)"),
    ({"expert_parallel": 2, "model": "DiT-T/2"}, 2, "needs a MoE model (a name like DiT-S/2-E8K2); DiT-T/2 is dense"),
    ({"expert_parallel": 2, "strategy": "fsdp"}, 2, "with train.strategy=fsdp is not supported yet"),
    ({"expert_parallel": 2, "mixed_precision": "fp16"}, 2, "with train.mixed_precision=fp16"),
    ({"expert_parallel": 0}, 2, "train.expert_parallel=0 must be >= 1"),
])
def test_bad_expert_parallel_settings_are_config_errors(settings, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(_cfg(global_batch_size=12, **settings), num_processes=world)
