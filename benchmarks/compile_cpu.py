"""Compile time and training-step time, eager against torch.compile (compiled blocks), on this machine's CPU.

    python benchmarks/compile_cpu.py [--models default,dense] [--steps 12] [--batch 128] [--threads N]

Models: ``default`` is configs/default.yaml's model (DiT-T/2-E8K2, DTop-p target 2, 1x8x8 digits, 16 tokens);
``dense`` the same size without experts (DiT-T/2); ``s2moe`` / ``s2`` are DiT-S/2-E8K2 (Top-k) / DiT-S/2 at
4x32x32 latents (256 tokens), the issue's CPU step benchmark size (use --batch 8).
One step is what the trainer does: the config's diffusion loss (default.yaml's objective) + router aux loss,
backward, AdamW, routing_step.
Compiled = ``dit_moe.models.compile.compile_blocks`` (train.compile=true). Both models start from the same weights.

compile_s is the first compiled step's wall time minus the eager median step (dynamo tracing, AOTAutograd and
inductor's C++ build; inductor's on-disk cache makes a second run of the same shapes much shorter: run twice to
see cold and warm). Step times are medians of --steps steps taken alternately
(eager, compiled, eager, ...) after one warm-up each, so load from other processes hits both alike; ``paired`` is
the median over steps of compiled / the eager step just before it.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time

import torch

from dit_moe.config import load_config
from dit_moe.diffusion import build_objective
from dit_moe.models.compile import compile_blocks, graph_breaks
from dit_moe.models.moe import collect_aux_loss, routing_step
from dit_moe.registry import build_model, count_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "default": ([], (1, 8)),
    "dense": (["model.name=DiT-T/2"], (1, 8)),
    "s2moe": (["model.name=DiT-S/2-E8K2", "routing.type=topk", "model.in_channels=4", "model.input_size=32",
               "model.num_classes=1000"], (4, 32)),
    "s2": (["model.name=DiT-S/2", "model.in_channels=4", "model.input_size=32", "model.num_classes=1000"], (4, 32)),
}


def _parts(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    return model, build_objective(cfg, learn_sigma=cfg.model.learn_sigma)


def _stepper(model, objective, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        t0 = time.perf_counter()
        terms = objective.training_losses(lambda xt, tt: model(xt, tt, y), x)
        loss = terms["loss"].mean() + collect_aux_loss(model)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        routing_step(model)
        return time.perf_counter() - t0, float(loss.detach())
    return step


def measure(key: str, steps: int, batch: int) -> dict:
    overrides, (C, S) = MODELS[key]
    cfg = load_config(os.path.join(REPO, "configs", "default.yaml"), overrides)
    eager, objective = _parts(cfg)
    compiled = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, C, S, S, generator=g), torch.randint(0, cfg.model.num_classes, (batch,), generator=g)
    breaks = graph_breaks(eager, x[:2], torch.tensor([1, 500]), y[:2])
    compile_blocks(compiled)
    run_e, run_c = _stepper(eager, objective, x, y), _stepper(compiled, objective, x, y)
    first_e, _ = run_e()
    first_c, _ = run_c()
    te, tc = [], []
    for _ in range(steps):
        te.append(run_e()[0])
        tc.append(run_c()[0])
    me, mc = statistics.median(te), statistics.median(tc)
    paired = statistics.median(c / e for c, e in zip(tc, te))        # each compiled step over the eager one before
    c = count_params(cfg)
    return {"model": key, "name": cfg.model.name, "routing": cfg.routing.type if "E" in cfg.model.name else None,
            "objective": cfg.diffusion.objective, "batch": batch, "tokens": (S // 2) ** 2, "gmacs_per_image": c["gflops"],
            "eager_first_s": first_e, "compiled_first_s": first_c, "compile_s": first_c - me,
            "eager_step_ms": 1e3 * me, "compiled_step_ms": 1e3 * mc, "compiled_over_eager": mc / me,
            "compiled_over_eager_paired_median": paired,
            "graph_breaks": [{k: b[k] for k in ("kind", "graphs", "breaks")} for b in breaks]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="default,dense", help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant (median)")
    p.add_argument("--batch", type=int, default=128, help="images per step (default.yaml: 128)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    rows = [measure(k, args.steps, args.batch) for k in keys]
    print(f"{'model':>8} {'name':>14} {'batch':>5} {'compile s':>9} {'eager ms':>9} {'compiled ms':>11} "
          f"{'ratio':>6} {'paired':>6}  graphs/breaks per block kind")
    for r in rows:
        gb = ", ".join(f"{b['kind']} {b['graphs']}/{b['breaks']}" for b in r["graph_breaks"])
        print(f"{r['model']:>8} {r['name']:>14} {r['batch']:>5} {r['compile_s']:9.1f} {r['eager_step_ms']:9.1f} "
              f"{r['compiled_step_ms']:11.1f} {r['compiled_over_eager']:6.3f} "
              f"{r['compiled_over_eager_paired_median']:6.3f}  {gb}")
    print(json.dumps({"benchmark": "compile_cpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0], "results": rows}))


if __name__ == "__main__":
    main()
