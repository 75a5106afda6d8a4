"""The full training step on the CPU: DiT-S/2-E8K2 (Top-k) against DiT-S/2 with an 8D MLP, equal active FLOPs.

    python benchmarks/cpu_step.py [--rounds 7] [--batch 8] [--threads 1] [--e1k1] [--profile N]

One step is what ``dit_moe.training.loop`` does per optimizer step: the DDPM hybrid loss of a batch of 8 latents
4x32x32 (256 tokens of patch 2, 1000 classes), the router aux loss, backward, gradient clipping at 1, the run's AdamW
(``setup.build_optimizer``), the routing step (MoE) and the EMA update. Arms, fp32, built with the same seed:
  moe      DiT-S/2-E8K2, Top-k: 8 experts of width 4D, 2 per token (2 x 4D = 8D of MLP per token)
  dense    DiT-S/2 whose MLPs have width 8D: the same matmul FLOPs per token (the router adds D x E)
  e1k1     with --e1k1: DiT-S/2-E1K1 with one expert of width 8D, through the MoE dispatch (the GPU check's arm)
The machine may be shared, so arms run interleaved, one step each per round, after one warm-up step each, and each
step is timed twice: CPU time of this process (what the step computes: with one thread, time spent waiting for a
core shared with other jobs is left out) and wall time. The reported ratio (``ratio_moe_vs_dense``) is the median
over rounds of moe / dense CPU time within the round; the wall-time one is printed beside it.
``--profile N`` profiles one step of each arm instead (torch.profiler, self CPU time per op) and prints the N ops
where the MoE step spends the most time beyond the dense one.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from dit_moe.config import ExperimentConfig, ModelConfig, TrainConfig
from dit_moe.diffusion import build_objective
from dit_moe.models import moe as moe_mod
from dit_moe.models.dit import DiT
from dit_moe.registry import build_model
from dit_moe.training.loop import diffusion_loss
from dit_moe.training.setup import build_optimizer, ema_decay_at, update_ema


def build_arm(arm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arm == "moe":
        return build_model("DiT-S/2-E8K2")
    if arm == "e1k1":
        return build_model(ModelConfig(name="DiT-S/2-E1K1", expert_hidden_ratio=8.0))
    dense = DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6, mlp_ratio=8.0)
    dense.arch = None
    return dense


class Arm:
    """One model with its EMA, optimizer and a fixed batch; ``step()`` is one full training step."""

    def __init__(self, name: str, batch: int):
        self.name = name
        self.model = build_arm(name).train()
        self.ema = build_arm(name).requires_grad_(False).eval()
        self.ema.load_state_dict(self.model.state_dict())
        self.is_moe = name != "dense"
        self.optimizer = build_optimizer(self.model.parameters(), TrainConfig(lr=1e-4))
        self.objective = build_objective(ExperimentConfig(), learn_sigma=True)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 4, 32, 32, generator=g)
        self.y = torch.randint(0, 1000, (batch,), generator=g)
        self.steps = 0

    def step(self) -> None:
        loss = diffusion_loss(self.objective, self.model, self.x, self.y)["loss"].mean()
        if self.is_moe:
            loss = loss + moe_mod.collect_aux_loss(self.model)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.is_moe:
            moe_mod.routing_step(self.model)
        self.steps += 1
        update_ema(self.ema, self.model, ema_decay_at(self.steps, 0.9999, False))


def timed(arm: Arm) -> tuple[float, float]:
    """(CPU ms of this process, wall ms) of one step."""
    c0, t0 = time.process_time(), time.perf_counter()
    arm.step()
    return (time.process_time() - c0) * 1e3, (time.perf_counter() - t0) * 1e3


def profile(arms: dict, top: int) -> None:
    """Self CPU time per op of one step of each arm, the ops where moe spends most beyond dense first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    per_op = {}
    for name in ("moe", "dense"):
        with prof(activities=[ProfilerActivity.CPU]) as p:
            arms[name].step()
        per_op[name] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in p.key_averages()}
    ops = sorted(set(per_op["moe"]) | set(per_op["dense"]),
                 key=lambda k: per_op["dense"].get(k, (0, 0))[0] - per_op["moe"].get(k, (0, 0))[0])
    total = {n: sum(v[0] for v in per_op[n].values()) for n in per_op}
    print(f"self CPU ms per step: moe {total['moe']:.0f}, dense {total['dense']:.0f}")
    print(f"| op | moe ms (calls) | dense ms (calls) | moe - dense ms |\n|---|---|---|---|")
    for k in ops[:top]:
        (a, na), (b, nb) = per_op["moe"].get(k, (0, 0)), per_op["dense"].get(k, (0, 0))
        print(f"| {k[:60]} | {a:.0f} ({na}) | {b:.0f} ({nb}) | {a - b:+.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1 on a shared machine)")
    ap.add_argument("--e1k1", action="store_true", help="also time DiT-S/2-E1K1 with one 8D expert")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile one MoE step, print the top N ops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = ["moe", "dense"] + (["e1k1"] if args.e1k1 else [])
    arms = {n: Arm(n, args.batch) for n in names}
    for arm in arms.values():
        arm.step()                                   # warm-up: allocator, optimizer state, lazy inits
    if args.profile:
        profile(arms, args.profile)
        return
    cpu, wall = {n: [] for n in names}, {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]     # alternate who goes first
        for n in order:
            c, w = timed(arms[n])
            cpu[n].append(c)
            wall[n].append(w)
    ratios = lambda times, n: [a / b for a, b in zip(times[n], times["dense"])]
    med = lambda xs: statistics.median(xs)
    params = {n: sum(p.numel() for p in a.model.parameters()) for n, a in arms.items()}
    print(f"full training step, batch {args.batch} x 256 tokens, fp32, {args.threads} thread(s), {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| arm | parameters | CPU ms (median) | wall ms (median) | x dense, CPU time | x dense, wall time |")
    print("|---|---|---|---|---|---|")
    for n in names:
        rc = "1.00" if n == "dense" else f"{med(ratios(cpu, n)):.3f}"
        rw = "1.00" if n == "dense" else f"{med(ratios(wall, n)):.3f}"
        print(f"| {n} | {params[n] / 1e6:.1f}M | {med(cpu[n]):.0f} | {med(wall[n]):.0f} | {rc} | {rw} |")
    out = {"batch": args.batch, "threads": args.threads, "rounds": args.rounds,
           "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__,
           "cpu_ms": {n: round(med(cpu[n]), 1) for n in names}, "wall_ms": {n: round(med(wall[n]), 1) for n in names},
           "ratio_moe_vs_dense": round(med(ratios(cpu, "moe")), 4),
           "ratio_moe_vs_dense_wall": round(med(ratios(wall, "moe")), 4),
           "cpu_ratios_per_round": [round(x, 4) for x in ratios(cpu, "moe")]}
    if args.e1k1:
        out["ratio_e1k1_vs_dense"] = round(med(ratios(cpu, "e1k1")), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
