"""Expert parallelism against ddp: the real training step of a MoE model under ``train.expert_parallel`` N vs 1.

    # CPU, gloo, 2 or 4 processes (one thread each), a tiny model:
    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29511 \\
        benchmarks/ep_step.py --out ep_step.json
    python -m torch.distributed.run --nproc_per_node 4 --master_addr 127.0.0.1 --master_port 29511 \\
        benchmarks/ep_step.py --model DiT-T/2-E8K2 --input-size 8 --channels 1 --steps 5 --out ep_step.json
    # GPUs, NCCL, every GPU of the node (defaults there: DiT-S/2-E8K2, 32x32x4 latents, global batch 32 per GPU):
    torchrun --nproc_per_node $(nvidia-smi -L | wc -l) benchmarks/ep_step.py --bf16 --out ep_step.json

Each arm is built the way ``dit_moe.training.loop.train`` builds a run -- an ``ExperimentConfig`` (here in code),
``validate``, ``make_accelerator``, ``open_data``, ``build_parts``, ``build_objective`` -- and one timed step is what
the loop does per optimizer step: ``train_step`` (loss + router aux loss, backward, the expert shards' gradient
reduction over dp, clipping at 1, AdamW), the LR scheduler step, ``moe.routing_step``, the train-state advance and the
EMA update. Arms (all built first, then stepped interleaved, one step each per round, the order reversed every other
round: timings on a shared machine are noisy):

  ddp         --model (default DiT-S/2-E8K2 on GPU, DiT-T/2-E8K2 on the CPU) with train.expert_parallel=1
  ep<N>       the same model with train.expert_parallel=N, for each N of --ep (default 2 and the world size W,
              those that divide both W and the model's E)
  dense       the model of equal active FLOPs under ddp: E1K1 with one expert of width K x 4D (gpu_check's arm;
              it still runs through the MoE layer, with one expert and no choice)

Data: ``--input-size 8 --channels 1`` trains on the builtin digits (8x8x1, 10 classes, no download); any other shape
trains on a synthetic latent folder (random posterior moments, 1000 classes) written by each process into a temporary
folder and read by ``open_data`` like an extracted one. The loss is the DDPM hybrid loss when diffusers is installed,
else rectified flow (``--objective``; the model work is the same).

Timing: before every step all processes meet at a barrier (and CUDA is synchronised); the step's time is the slowest
process's. Reported per arm: median and min step ms over --steps rounds, global images/s and tokens/s at the median,
all-to-all ms per step and its share of the step, activated experts per token (``routing_stats``' mean_active after
the last step, averaged over layers and processes) and the step time as a multiple of the ddp arm's and of the dense
arm's (> 1: slower). The all-to-all time is the time spent in ``AllToAllDispatcher._exchange`` (the two row
exchanges of every MoE layer's forward; class attribute wrapped here only) plus their reverse exchanges in backward
(marked by identity autograd nodes around it), synchronising CUDA at each mark: the count exchange and the host read
of the splits are not in it, and the extra synchronisations cost the ep arms a little. Per step it is averaged over
processes (a process that waits for a slower peer inside the exchange counts that wait as all-to-all time).

Rank 0 prints a table and writes ``--out`` (JSON). The world size and the per-process micro-batch are
``--batch`` / W; a CPU run uses one intra-op thread per process (--threads).

Measured figures (CPU, 2 and 4 processes) and how to read them: docs/performance.md, "Expert parallelism on the CPU".
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dit_moe.config import (DataConfig, DiffusionConfig, ExperimentConfig, ModelConfig, RoutingConfig,  # noqa: E402
                            TrainConfig)
from dit_moe.diffusion import build_objective  # noqa: E402
from dit_moe.registry import parse_name  # noqa: E402
from dit_moe.training.loop import train_step  # noqa: E402
from dit_moe.training.metrics import RunningMeans  # noqa: E402
from dit_moe.training.parallel.ep import AllToAllDispatcher  # noqa: E402
from dit_moe.training.setup import (build_parts, ema_decay_at, make_accelerator, micro_batches, open_data,  # noqa: E402
                                    process_count, update_ema)
from dit_moe.validation import validate  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
#                                    All-to-all timer (benchmark only)
# ---------------------------------------------------------------------------------------------------------

class _Mark(torch.autograd.Function):
    """Identity; its backward tells the timer that the gradient reached this point (role "start" / "end")."""

    @staticmethod
    def forward(ctx, x, timer, token, role):
        ctx.timer, ctx.token, ctx.role = timer, token, role
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.timer.backward_mark(ctx.token, ctx.role)
        return grad, None, None, None


class ExchangeTimer:
    """Wraps ``AllToAllDispatcher._exchange``: forward seconds inside it, backward seconds between its marks."""

    def __init__(self, cuda: bool):
        self.cuda, self.forward_s, self.backward_s, self.calls = cuda, 0.0, 0.0, 0
        self._original = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        self.forward_s, self.backward_s, self.calls = 0.0, 0.0, 0

    def install(self) -> None:
        original, timer = AllToAllDispatcher._exchange, self
        self._original = original

        def timed_exchange(dispatcher, x, out_splits, in_splits):
            token = {}
            if torch.is_grad_enabled() and x.requires_grad:
                x = _Mark.apply(x, timer, token, "end")      # its backward runs after the reverse exchange
            timer._sync()
            t0 = time.perf_counter()
            y = original(dispatcher, x, out_splits, in_splits)
            timer._sync()
            timer.forward_s += time.perf_counter() - t0
            timer.calls += 1
            if torch.is_grad_enabled() and y.requires_grad:
                y = _Mark.apply(y, timer, token, "start")    # its backward runs first
            return y

        AllToAllDispatcher._exchange = timed_exchange

    def uninstall(self) -> None:
        if self._original is not None:
            AllToAllDispatcher._exchange = self._original
            self._original = None

    def backward_mark(self, token: dict, role: str) -> None:
        self._sync()
        now = time.perf_counter()
        if role == "start":
            token["t0"] = now
        elif "t0" in token:
            self.backward_s += now - token.pop("t0")


# ---------------------------------------------------------------------------------------------------------
#                                               Data
# ---------------------------------------------------------------------------------------------------------

def write_synthetic_latents(root: str, n: int, channels: int, size: int, num_classes: int, seed: int = 0) -> str:
    """A latent folder in the ``dit_moe.data.latents`` format: random posterior moments, random labels."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    os.makedirs(root, exist_ok=True)
    mean = torch.randn(n, 2, channels, size, size, generator=g).half()
    std = torch.full((n, 2, channels, size, size), 0.1).half()
    label = torch.randint(0, num_classes, (n,), generator=g)
    name = "shard-r00-00000.safetensors"
    save_file({"mean": mean, "std": std, "label": label}, os.path.join(root, name),
              metadata={"files": json.dumps([f"synthetic/{i}.png" for i in range(n)])})
    manifest = {"format": "dit-moe-latents", "version": 1, "complete": True, "vae": "synthetic",
                "scaling_factor": 1.0, "shift_factor": 0.0, "image_size": 8 * size,
                "latent_shape": [channels, size, size],
                "class_names": [f"c{i}" for i in range(num_classes)], "num_classes": num_classes, "dtype": "float16",
                "source": "synthetic (benchmarks/ep_step.py)", "shards": [{"file": name, "count": n}],
                "num_images": n, "skipped": []}
    with open(os.path.join(root, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    return root


# ---------------------------------------------------------------------------------------------------------
#                                               Arms
# ---------------------------------------------------------------------------------------------------------

def dense_equivalent(name: str, expert_hidden_ratio: float = 4.0) -> tuple[str, float]:
    """``DiT-S/2-E8K2`` -> (``DiT-S/2-E1K1``, 8.0): one expert as wide as the K active ones together."""
    arch = parse_name(name)
    base = name.rsplit("-", 1)[0]
    return f"{base}-E1K1", arch.top_k * expert_hidden_ratio


def arm_plan(args, world: int) -> list[dict]:
    arch = parse_name(args.model)
    if not arch.is_moe:
        raise SystemExit(f"--model {args.model}: expert parallelism needs a MoE model (a name like DiT-S/2-E8K2)")
    routing = RoutingConfig(type=args.routing)
    plan = [{"arm": "ddp", "name": args.model, "ep": 1, "routing": routing, "model": {}}]
    for n in args.ep:
        plan.append({"arm": f"ep{n}", "name": args.model, "ep": n, "routing": routing, "model": {}})
    if not args.no_dense:
        dense, ratio = dense_equivalent(args.model)
        plan.append({"arm": "dense", "name": dense, "ep": 1, "routing": RoutingConfig(type="topk"),
                     "model": {"expert_hidden_ratio": ratio}})
    return plan


def choose_ep(requested, world: int, num_experts: int) -> tuple[list[int], list[str]]:
    """The ep sizes to run (dividing W and E, > 1, unique) and a note for each one dropped."""
    wanted = requested if requested is not None else [2, world]
    keep, notes = [], []
    for n in wanted:
        if n in keep:
            continue
        if n < 2 or n > world or world % n or num_experts % n:
            if requested is None and world == 1:
                continue                  # the default asks for nothing on one process (one note says so)
            notes.append(f"ep{n} skipped: needs 2 <= N <= W={world}, N dividing W and E={num_experts}")
            continue
        keep.append(n)
    return keep, notes


class Arm:
    """One run's parts and its step (what ``loop.train`` does per optimizer step)."""

    def __init__(self, spec: dict, args, data_cfg: DataConfig, objective: str, world: int, run_dir: str):
        self.spec, self.name = spec, spec["arm"]
        mc = ModelConfig(name=spec["name"], input_size=args.input_size, in_channels=args.channels,
                         num_classes=args.num_classes, learn_sigma=objective == "ddpm", **spec["model"])
        t = TrainConfig(run_dir=run_dir, seed=0, steps=args.warmup + args.steps + 1, global_batch_size=args.batch,
                        expert_parallel=spec["ep"], mixed_precision="bf16" if args.bf16 else "no", tracker=None,
                        grad_clip=1.0, lr=1e-4)
        cfg = ExperimentConfig(model=mc, routing=spec["routing"], data=data_cfg, train=t,
                               diffusion=DiffusionConfig(objective=objective))
        validate(cfg, num_processes=world)
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg, run_dir)
        self.data = open_data(cfg, self.accelerator)
        self.parts = build_parts(cfg, self.data, self.accelerator)
        self.objective = build_objective(cfg, learn_sigma=cfg.model.learn_sigma)
        self.batches = micro_batches(self.data, self.parts.state, self.accelerator, t.grad_accum)
        self.meter = RunningMeans(self.accelerator, run_dir, self.data, None, start_step=0)
        self.grad_norm = None
        self.step_s: list[float] = []
        self.a2a_s: list[tuple[float, float]] = []
        self.tokens_per_image = (args.input_size // parse_name(spec["name"]).patch_size) ** 2

    def step(self) -> None:
        t, parts = self.cfg.train, self.parts
        self.grad_norm = train_step(parts, self.objective, self.batches, self.meter, self.accelerator, t.grad_accum,
                                    t.grad_clip, self.grad_norm)
        parts.scheduler.step()
        if parts.moe is not None:
            parts.moe.routing_step(parts.raw_model, parts.all_reduce)
        parts.state.advance()
        update_ema(parts.ema, parts.raw_model, ema_decay_at(parts.state.step, t.ema_decay, t.ema_warmup))
        self.meter.steps += 1

    def active_experts(self) -> float | None:
        if self.parts.moe is None:
            return None
        stats = self.parts.moe.routing_stats(self.parts.raw_model, warn=False)
        return float(stats["mean_active"].float().mean()) if "mean_active" in stats else None


def timed_step(arm: Arm, timer: ExchangeTimer, cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    timer.reset()
    t0 = time.perf_counter()
    arm.step()
    if cuda:
        torch.cuda.synchronize()
    arm.step_s.append(time.perf_counter() - t0)
    arm.a2a_s.append((timer.forward_s, timer.backward_s))


# ---------------------------------------------------------------------------------------------------------
#                                              Summary
# ---------------------------------------------------------------------------------------------------------

def summarise(name: str, per_rank: list[dict], args, tokens_per_image: int) -> dict:
    """per_rank: each process's {"step_s", "a2a_s", "active", "loss"} -> one arm's row."""
    steps = len(per_rank[0]["step_s"])
    step_ms = [1e3 * max(r["step_s"][i] for r in per_rank) for i in range(steps)]       # slowest process
    fwd_ms = [1e3 * statistics.mean(r["a2a_s"][i][0] for r in per_rank) for i in range(steps)]
    bwd_ms = [1e3 * statistics.mean(r["a2a_s"][i][1] for r in per_rank) for i in range(steps)]
    a2a_ms = [f + b for f, b in zip(fwd_ms, bwd_ms)]
    med = statistics.median(step_ms)
    active = [r["active"] for r in per_rank if r["active"] is not None]
    images_s = args.batch / (med / 1e3)
    return {"arm": name, "step_ms_median": round(med, 3), "step_ms_min": round(min(step_ms), 3),
            "step_ms": [round(x, 3) for x in step_ms],
            "images_per_s": round(images_s, 3), "tokens_per_s": round(images_s * tokens_per_image, 1),
            "a2a_ms_per_step": round(statistics.median(a2a_ms), 3),
            "a2a_fwd_ms_per_step": round(statistics.median(fwd_ms), 3),
            "a2a_bwd_ms_per_step": round(statistics.median(bwd_ms), 3),
            "a2a_share": round(statistics.median([a / s for a, s in zip(a2a_ms, step_ms)]), 4),
            "active_experts_per_token": round(statistics.mean(active), 4) if active else None,
            "loss": per_rank[0]["loss"]}


def add_ratios(rows: list[dict]) -> None:
    by = {r["arm"]: r["step_ms_median"] for r in rows}
    for r in rows:
        r["x_ddp"] = round(r["step_ms_median"] / by["ddp"], 4) if "ddp" in by and r["arm"] != "dense" else None
        r["x_dense"] = round(r["step_ms_median"] / by["dense"], 4) if "dense" in by else None


def table(result: dict) -> str:
    a = result["setup"]
    lines = [f"ep_step: {a['model']} ({a['routing']}) at {a['channels']}x{a['input_size']}x{a['input_size']}, global "
             f"batch {a['batch']} over {a['world']} {a['device']} process(es), {a['precision']}, "
             f"{a['objective']} loss, "
             f"{a['steps']} timed steps per arm after {a['warmup']} (interleaved), load average {a['load_avg_1min']}",
             f"{'arm':<7} {'step ms med':>11} {'min':>8} {'img/s':>9} {'tokens/s':>10} {'a2a ms':>8} {'a2a %':>6} "
             f"{'experts':>7} {'x ddp':>6} {'x dense':>7}"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in result["arms"]:
        lines.append(f"{r['arm']:<7} {r['step_ms_median']:11.1f} {r['step_ms_min']:8.1f} {r['images_per_s']:9.1f} "
                     f"{r['tokens_per_s']:10.0f} {r['a2a_ms_per_step']:8.2f} {100 * r['a2a_share']:6.1f} "
                     f"{f(r['active_experts_per_token'], '7.2f'):>7} {f(r['x_ddp'], '6.3f'):>6} "
                     f"{f(r['x_dense'], '7.3f'):>7}")
    lines += result["notes"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
#                                                Main
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="A single process (no torchrun) runs the ddp and dense arms only.")
    p.add_argument("--model", default=None, help="MoE registry name (default DiT-S/2-E8K2 on GPU, DiT-T/2-E8K2 on CPU)")
    p.add_argument("--routing", default="topk", choices=("topk", "topp", "dtopp", "expert_choice"),
                   help="router of the MoE arms (dtopp targets the name's K); the dense arm is E1K1")
    p.add_argument("--ep", default=None, help="comma-separated expert-parallel sizes N (default: 2 and the world size; "
                   "those that divide the world size and E)")
    p.add_argument("--input-size", type=int, default=None, help="latent side (default 32 on GPU, 16 on CPU; "
                   "8 with --channels 1: the builtin digits)")
    p.add_argument("--channels", type=int, default=4, help="latent channels (default 4)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the synthetic latents (digits: 10)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default 32 per GPU; 4 per CPU process)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (rounds) per arm (default 20 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per arm first (default 3 GPU, 1 CPU)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (train.mixed_precision=bf16; GPU)")
    p.add_argument("--objective", default="auto", choices=("auto", "ddpm", "flow"),
                   help="auto: ddpm when diffusers is installed, else flow")
    p.add_argument("--no-dense", action="store_true", help="skip the dense (E1K1) arm")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process on the CPU (default 1)")
    p.add_argument("--out", default="ep_step.json", help="JSON result (rank 0)")
    args = p.parse_args(argv)
    args.model = args.model or ("DiT-S/2-E8K2" if cuda else "DiT-T/2-E8K2")
    args.input_size = args.input_size or (8 if args.channels == 1 else (32 if cuda else 16))
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.ep = None if args.ep is None else [int(n) for n in args.ep.split(",") if n.strip()]
    if args.objective == "auto":
        args.objective = "ddpm" if importlib.util.find_spec("diffusers") is not None else "flow"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # Accelerate's DDP wrap repeats this once per arm and process; the run keeps broadcast_buffers=False on purpose.
    warnings.filterwarnings("ignore", message=".broadcast_buffers. is deprecated", category=FutureWarning)
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    world = process_count()
    args.batch = args.batch or world * (32 if cuda else 4)
    digits = args.channels == 1 and args.input_size == 8
    if digits:
        args.num_classes = 10
    ep, notes = choose_ep(args.ep, world, parse_name(args.model).num_experts)
    args.ep = ep
    if world == 1:
        notes.append("one process: no ep arm (launch under torchrun with 2 or more processes)")
    plan = arm_plan(args, world)

    tmp = tempfile.TemporaryDirectory(prefix="ep_step-")
    if digits:
        data_cfg = DataConfig(source="builtin", path="digits")
    else:   # every process writes the same folder (same seed) into its own temporary directory: nothing shared
        n = max(4 * args.batch, 64)
        path = write_synthetic_latents(os.path.join(tmp.name, "latents"), n, args.channels, args.input_size,
                                       args.num_classes)
        data_cfg = DataConfig(source="latents", path=path, flip=True)

    arms = [Arm(spec, args, data_cfg, args.objective, world, os.path.join(tmp.name, "run")) for spec in plan]
    accelerator = arms[0].accelerator
    rank = accelerator.process_index
    timer = ExchangeTimer(cuda)
    timer.install()
    try:
        for arm in arms:
            for _ in range(args.warmup):
                arm.step()
            arm.step_s.clear()
            arm.a2a_s.clear()
        for r in range(args.steps):
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                timed_step(arm, timer, cuda)
    finally:
        timer.uninstall()

    rows = []
    for arm in arms:
        loss = arm.meter.take(arm.parts.state.step).get("loss")       # a collective: all processes, same order
        local = {"step_s": arm.step_s, "a2a_s": arm.a2a_s, "active": arm.active_experts(), "loss": loss}
        gathered = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        row = summarise(arm.name, gathered, args, arm.tokens_per_image)
        row.update(expert_parallel=arm.spec["ep"], model=arm.spec["name"],
                   expert_hidden_ratio=arm.cfg.model.expert_hidden_ratio, micro_batch=arm.data.micro_batch)
        rows.append(row)
    add_ratios(rows)
    result = {"setup": {"model": args.model, "routing": args.routing, "input_size": args.input_size,
                        "channels": args.channels, "batch": args.batch, "world": world,
                        "device": "cuda" if cuda else "cpu",
                        "device_name": torch.cuda.get_device_name() if cuda else None,
                        "precision": "bf16" if args.bf16 else "fp32", "objective": args.objective,
                        "data": "builtin digits" if digits else "synthetic latents", "steps": args.steps,
                        "warmup": args.warmup, "threads": None if cuda else args.threads,
                        "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__},
              "arms": rows, "notes": notes}
    ok = all(math.isfinite(r["step_ms_median"]) and (r["loss"] is None or math.isfinite(r["loss"])) for r in rows)
    if rank == 0:
        text = table(result)
        print(text)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.out}")
    accelerator.wait_for_everyone()
    del arms
    gc.collect()
    tmp.cleanup()
    for a in [accelerator]:
        a.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
