"""The full training step on the CPU: DiT-S/2-E8K2 (Top-k) against DiT-S/2 with an 8D MLP, equal active FLOPs.

    python benchmarks/cpu_step.py [--rounds 7] [--batch 8] [--threads 1] [--routers topk,dtopp] [--e1k1] [--profile N]

One step is what ``dit_moe.training.loop`` does per optimizer step: the DDPM hybrid loss of a batch of 8 latents
4x32x32 (256 tokens of patch 2, 1000 classes), the router aux loss, backward, gradient clipping at 1, the run's AdamW
(``setup.build_optimizer``), the routing step (MoE) and the EMA update. Arms, fp32, built with the same seed:
  moe      DiT-S/2-E8K2, Top-k: 8 experts of width 4D, 2 per token (2 x 4D = 8D of MLP per token)
  topp, dtopp, expert_choice   with --routers: the same model with that router (its defaults; DTop-p targets 2)
  dense    DiT-S/2 whose MLPs have width 8D: the same matmul FLOPs per token (the router adds D x E)
  e1k1     with --e1k1: DiT-S/2-E1K1 with one expert of width 8D, through the MoE dispatch (the GPU check's arm)
The machine may be shared, so arms run interleaved, one step each per round, after one warm-up step each, and each
step is timed twice: CPU time of this process (what the step computes: with one thread, time spent waiting for a
core shared with other jobs is left out) and wall time. The reported ratio (``ratio_moe_vs_dense``) is the median
over rounds of moe / dense CPU time within the round; the wall-time one is printed beside it.
``--profile N`` profiles one step of each arm instead (torch.profiler, self CPU time per op) and prints the N ops
where an MoE step spends the most time beyond the dense one.
The last line printed is one JSON object; ``mean_active`` is each MoE arm's experts per token at the last step.

Read a router's ratio against its experts per token. Issue 23 item 0 (2026-12-07) saw Top-k at 1.12x dense and
DTop-p at 1.04x and asked why the fixed-k router is slower. It is not: at equal work the routers cost the same. The
MoE layer alone (forward + backward, 2048 tokens of DiT-S/2-E8K2 at init, 25 interleaved rounds) took 1.030x the
dense 8D MLP with Top-k, 1.028x with Top-k's selection listed through ``from_mask``, 1.031x with DTop-p (1.997
experts per token) and 1.026x with expert choice; the profiles list the same ops. In this benchmark, though, DTop-p
activates fewer experts each step: 1.99 at the first step, 1.75 by the twelfth (its DRN and entropy terms sharpen
the router on the repeated batch faster than the controller follows), so its step does about 10% less expert work,
which is the 7-8% of the step that separated the two figures. What the MoE step costs beyond dense is not the
router's: the inactive experts' share of AdamW, EMA and clipping (132M parameters against 47M, about 2.5% of the
step) and the dispatch (about 3% of the MLP). Three runs of ``--routers topk,dtopp,topp,expert_choice`` on the shared
2-core machine that day (another job beside them) gave Top-k 1.031, 1.049, 1.091 and expert choice 1.074, 1.059,
1.094: the run-to-run spread is as large as the gap to 1.05. On the same machine with nothing else running (later
that day), two runs of ``--routers topk,dtopp,expert_choice --rounds 8``: Top-k 1.042, 1.044; DTop-p 1.047, 1.005
(1.78 experts per token at the end); expert choice 1.046, 1.037 -- every router within 1.05x, the per-round ratios
still spreading from 0.93 to 1.18.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from dit_moe.config import ExperimentConfig, ModelConfig, RoutingConfig, TrainConfig
from dit_moe.diffusion import build_objective
from dit_moe.models import moe as moe_mod
from dit_moe.models.dit import DiT
from dit_moe.registry import build_model
from dit_moe.training.loop import diffusion_loss
from dit_moe.training.setup import build_optimizer, ema_decay_at, update_ema


ROUTERS = ("topk", "topp", "dtopp", "expert_choice")
TOPP_THRESHOLD = 0.2


def build_arm(arm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arm == "moe":
        return build_model("DiT-S/2-E8K2")
    if arm in ROUTERS:
        # Fixed Top-p at its published 0.4 activates about 3.4 of 8 near-uniform experts: 0.2 gives about 2, the
        # compute of K = 2 (each arm's measured mean is printed, ``mean_active``).
        return build_model("DiT-S/2-E8K2", RoutingConfig(type=arm, threshold=TOPP_THRESHOLD))
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
    """Self CPU time per op of one step of each arm; the ops where the MoE arms spend most beyond dense first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    per_op = {}
    for name, arm in arms.items():
        with prof(activities=[ProfilerActivity.CPU]) as p:
            arm.step()
        per_op[name] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in p.key_averages()}
    moe = [n for n in arms if n != "dense"]
    excess = lambda k: max(per_op[n].get(k, (0, 0))[0] for n in moe) - per_op["dense"].get(k, (0, 0))[0]
    ops = sorted(set().union(*per_op.values()), key=excess, reverse=True)
    print("self CPU ms per step: " + ", ".join(f"{n} {sum(v[0] for v in per_op[n].values()):.0f}" for n in arms))
    print("| op | " + " | ".join(f"{n} ms (calls)" for n in arms) + " |\n|---|" + "---|" * len(arms))
    for k in ops[:top]:
        cells = [f"{per_op[n].get(k, (0, 0))[0]:.0f} ({per_op[n].get(k, (0, 0))[1]})" for n in arms]
        print(f"| {k[:60]} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1 on a shared machine)")
    ap.add_argument("--routers", default="topk", help=f"comma-separated MoE arms among {', '.join(ROUTERS)} "
                    "(topk is the arm named moe in the JSON)")
    ap.add_argument("--e1k1", action="store_true", help="also time DiT-S/2-E1K1 with one 8D expert")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile one step per arm, print the top N ops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    routers = args.routers.split(",")
    if any(r not in ROUTERS for r in routers):
        ap.error(f"--routers {args.routers}: each must be one of {', '.join(ROUTERS)}")
    names = ["moe" if r == "topk" else r for r in routers] + ["dense"] + (["e1k1"] if args.e1k1 else [])
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
    active = {n: round(moe_mod.routing_stats(a.model, warn=False)["mean_active"].mean().item(), 3)
              for n, a in arms.items() if a.is_moe}
    print(f"full training step, batch {args.batch} x 256 tokens, fp32, {args.threads} thread(s), {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| arm | parameters | experts per token | CPU ms (median) | wall ms (median) | x dense, CPU time "
          "| x dense, wall time |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        rc = "1.00" if n == "dense" else f"{med(ratios(cpu, n)):.3f}"
        rw = "1.00" if n == "dense" else f"{med(ratios(wall, n)):.3f}"
        print(f"| {n} | {params[n] / 1e6:.1f}M | {active.get(n, '-')} | {med(cpu[n]):.0f} | {med(wall[n]):.0f} "
              f"| {rc} | {rw} |")
    out = {"batch": args.batch, "threads": args.threads, "rounds": args.rounds,
           "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__,
           "mean_active": active,
           "cpu_ms": {n: round(med(cpu[n]), 1) for n in names}, "wall_ms": {n: round(med(wall[n]), 1) for n in names}}
    for n in names:
        if n != "dense":
            out[f"ratio_{n}_vs_dense"] = round(med(ratios(cpu, n)), 4)
            out[f"ratio_{n}_vs_dense_wall"] = round(med(ratios(wall, n)), 4)
            out[f"cpu_ratios_per_round_{n}"] = [round(x, 4) for x in ratios(cpu, n)]
    if "moe" in arms:
        out["cpu_ratios_per_round"] = out.pop("cpu_ratios_per_round_moe")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
