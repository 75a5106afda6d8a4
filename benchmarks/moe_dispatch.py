"""Forward+backward time and peak memory of MoEMLP with each router against a dense MLP and the naive expert loop.

    python benchmarks/moe_dispatch.py [--tokens 8192] [--seq 256] [--dim 384] [--experts 8] [--top-k 2] [--rounds 7]

Variants, all fp32 on the same input (tokens as images of --seq tokens), timed in the same process (router and aux
loss included); every MoE variant has the same gate and experts:
  topk      Top-k routing (DiT-MoE), sort-and-segment dispatch (the toolkit's path)
  topk_bias Top-k with the aux-loss-free balance bias (a non-zero bias, so it changes the selection)
  topp      fixed Top-p, threshold bisected so that the mean active experts is K
  dtopp     DTop-p, threshold bisected so that the mean active experts is the target K
  ec        expert choice, per-image pool, capacity factor 1 (exactly K experts per token on average)
  dense     DiT's dense GELU MLP with hidden K * 4D: the same active FLOPs as K of 4D experts
  loop      the naive reference: tokens repeated k times, a boolean mask per expert (DiT-MoE's training path)
  grouped   Top-k forced onto torch's grouped_mm (informative: the segment loop is the CPU default)

The machine may be shared, so the variants run round-robin; times are each variant's best round, and the
medians of per-round paired ratios are printed too.
Peak memory is measured with the torch profiler (allocations net of frees, in op order) over one
forward+backward whose parameter gradients already exist, i.e. the activation and temporary memory.
The last line printed is one JSON object; ``routers`` holds, per router, ms, ratio_vs_dense (best rounds),
ratio_vs_dense_paired_median, peak_mb and mean_active.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import dit_moe.models.moe as moe_mod
from dit_moe.config import ModelConfig, RoutingConfig
from dit_moe.models.calibration import bisect
from dit_moe.models.dit import dense_mlp
from dit_moe.models.moe import MoEMLP, build_controller, build_moe_mlp, collect_aux_loss
from dit_moe.models.routers import load_balance_loss

ROUTERS = ("topk", "topk_bias", "topp", "dtopp", "ec")


class LoopMoE(nn.Module):
    """DiT-MoE's training dispatch on the weights of an MoEMLP: repeat every token k times, then for each expert
    select its rows with a boolean mask, run it, write back, and sum the k weighted copies."""

    def __init__(self, moe: MoEMLP, top_k: int):
        super().__init__()
        self.moe, self.top_k = moe, top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, bank = self.moe.router, self.moe.experts
        probs = r.probs(r.logits(x))
        w, idx = probs.topk(self.top_k, dim=1)
        counts = torch.bincount(idx.flatten(), minlength=r.num_experts)
        self.moe.last_aux_loss = r.lb_coef * load_balance_loss(probs, counts)
        xr = x.repeat_interleave(self.top_k, dim=0)
        flat = idx.flatten()
        y = torch.empty_like(xr)
        for e in range(r.num_experts):
            sel = flat == e
            h = bank.activation(torch.addmm(bank.b_in[e], xr[sel], bank.w_in[e]))
            y[sel] = torch.addmm(bank.b_out[e], h, bank.w_out[e])
        return (y.view(x.shape[0], self.top_k, -1) * w.unsqueeze(-1)).sum(1)


def _step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    y = module(x)
    aux = collect_aux_loss(module)[0] if not isinstance(module, LoopMoE) else module.moe.last_aux_loss
    ((y * g).sum() + aux).backward()


def _peak_mb(fn) -> float:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += ev.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2 ** 20


def _build(name: str, D: int, E: int, K: int, mc: ModelConfig) -> MoEMLP:
    cfg = {"topk": RoutingConfig(type="topk"), "topk_bias": RoutingConfig(type="topk", balance_bias=True),
           "topp": RoutingConfig(type="topp"), "dtopp": RoutingConfig(type="dtopp", target=float(K)),
           "ec": RoutingConfig(type="expert_choice")}[name]
    return build_moe_mlp(D, 0, E, K, mc, cfg, build_controller(cfg, E, K, 1))


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256, help="tokens per image (expert choice pools per image)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokens % args.seq:
        ap.error(f"--tokens {args.tokens} must be a multiple of --seq {args.seq}")
    torch.manual_seed(0)
    N, D, E, K = args.tokens, args.dim, args.experts, args.top_k
    mc = ModelConfig(expert_hidden_ratio=4.0)

    moes = {name: _build(name, D, E, K, mc) for name in ROUTERS}
    for name, m in moes.items():                                   # one gate and one set of experts for all
        if name != "topk":
            m.experts.load_state_dict(moes["topk"].experts.state_dict())
            with torch.no_grad():
                m.router.weight.copy_(moes["topk"].router.weight)
    with torch.no_grad():
        moes["topk_bias"].router.balance_bias.normal_(0, 0.02)     # about the gap between neighbouring probabilities
    dense = dense_mlp(D, mlp_ratio=4.0 * K)
    loop = LoopMoE(moes["topk"], K)
    for m in (*moes.values(), dense):
        m.train()

    x = torch.randn(N // args.seq, args.seq, D, requires_grad=True)
    g = torch.randn(N // args.seq, args.seq, D)

    def active(m: MoEMLP) -> float:
        with torch.no_grad():
            return m.router(x.detach().reshape(-1, D), x.shape[0]).num_active.float().mean().item()

    # The threshold routers at K experts per token: on this fixed input, the threshold a controller would settle to.
    thresholds = {}
    for name in ("topp", "dtopp"):
        router = moes[name].router
        set_p = (lambda p, r=router: r.controller.threshold.fill_(p)) if name == "dtopp" else \
            (lambda p, r=router: setattr(r, "threshold", p))
        p, _ = bisect(lambda p, set_p=set_p, m=moes[name]: (set_p(p), active(m))[1], float(K), iters=30, tol=1e-3)
        set_p(p)
        thresholds[name] = p
    mean_active = {name: active(m) for name, m in moes.items()}

    def grouped_step():
        previous, moe_mod.USE_GROUPED_MM = moe_mod.USE_GROUPED_MM, True
        try:
            _step(moes["topk"], x, g)
        finally:
            moe_mod.USE_GROUPED_MM = previous

    variants = {name: (lambda m=m: _step(m, x, g)) for name, m in moes.items()}
    variants.update(dense=lambda: _step(dense, x, g), loop=lambda: _step(loop, x.reshape(-1, D), g.reshape(-1, D)))
    if hasattr(F, "grouped_mm"):
        variants["grouped"] = grouped_step

    for fn in variants.values():                                   # warm-up (allocations, oneDNN kernels)
        fn()
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
    for m in moes.values():
        m.routing_acc.zero_()

    def paired(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    # Headline figures use the best round of each variant (the least disturbed by other processes, as timeit
    # recommends); the medians of paired per-round ratios are reported beside them.
    best = {k: min(v) for k, v in times.items()}
    peaks = {name: _peak_mb(fn) for name, fn in variants.items() if name != "grouped"}
    routers = {name: {"ms": round(best[name], 1), "ratio_vs_dense": round(best[name] / best["dense"], 3),
                      "ratio_vs_dense_paired_median": round(paired(name, "dense"), 3),
                      "peak_mb": round(peaks[name], 1), "mean_active": round(mean_active[name], 3)}
               for name in ROUTERS}
    result = {
        "tokens": N, "seq": args.seq, "dim": D, "experts": E, "top_k": K, "expert_hidden": 4 * D,
        "dense_hidden": 4 * D * K, "threads": torch.get_num_threads(), "rounds": args.rounds,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "dense_ms": round(best["dense"], 1), "dense_peak_mb": round(peaks["dense"], 1),
        "loop_ms": round(best["loop"], 1), "speedup_vs_loop": round(best["loop"] / best["topk"], 3),
        "topp_threshold": round(thresholds["topp"], 4), "dtopp_threshold": round(thresholds["dtopp"], 4),
        "routers": routers,
    }
    if "grouped" in times:
        result["grouped_ms"] = round(best["grouped"], 1)
        result["grouped_ratio_vs_segments"] = round(best["grouped"] / best["topk"], 3)
    print(f"{'router':>10} {'ms':>8} {'x dense':>8} {'paired':>8} {'peak MB':>8} {'experts':>8}")
    for name, r in routers.items():
        print(f"{name:>10} {r['ms']:8.1f} {r['ratio_vs_dense']:8.3f} {r['ratio_vs_dense_paired_median']:8.3f} "
              f"{r['peak_mb']:8.1f} {r['mean_active']:8.3f}")
    for k, v in result.items():
        if k != "routers":
            print(f"{k:>26}: {v}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
