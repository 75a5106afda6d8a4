"""Per-GPU training memory of ddp, fsdp and ep, and the bytes each GPU sends per step (the README's "Memory per
strategy" and "Traffic per step" tables).

    python benchmarks/memory.py [--world 8] [--models DiT-XL/2 DiT-XL/2-E8K2 DiT-XL/2-E16K2] [--ep 2 8]
                                [--traffic-models DiT-XL/2-E8K2 DiT-XL/2-E16K2] [--batch 32] [--act-bytes 2]

Arithmetic, not a measurement: dit_moe/memory.py says what is counted (fp32 parameters, gradients, AdamW moments,
EMA; fsdp's shards and its transiently gathered units; ep's replicated parameters and its share of the experts; the
ring and all-to-all accounting of the traffic and its assumptions) and tests/test_memory.py checks the counts
against the model built on the meta device, a closed form and hand formulas. Without --models / --traffic-models
both tables also show the fine-grained DiT-XL/2-E64K8 with model.expert_hidden_ratio=1. The last line printed is
one JSON object (bytes): {"memory": [...], "traffic": [...]}.
"""
from __future__ import annotations

import argparse
import json

from dit_moe.memory import FINE_GRAINED, memory_table, step_traffic, traffic_table, training_memory


def _ep_sizes(spec, world: int, sizes) -> list[int]:
    """The group sizes of ``sizes`` that split this model's experts and the GPUs (the tables skip the others)."""
    name, overrides = (spec, {}) if isinstance(spec, str) else spec
    ok = []
    for n in sizes:
        try:
            training_memory(name, world, ep=n, **overrides)
            ok.append(n)
        except ValueError:
            pass
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=8, help="GPUs (fsdp shards over all of them; ep: dp x ep)")
    ap.add_argument("--models", nargs="+", default=None,
                    help="memory table (default: DiT-XL/2, -E8K2, -E16K2 and the fine-grained E64K8)")
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 8], help="expert-parallel group sizes to show")
    ap.add_argument("--traffic-models", nargs="+", default=None,
                    help="traffic table (default: DiT-XL/2-E8K2, -E16K2 and the fine-grained E64K8)")
    ap.add_argument("--batch", type=int, default=32, help="images per GPU per step (traffic table)")
    ap.add_argument("--act-bytes", type=int, default=2, help="all-to-all bytes per element: 2 bf16, 4 fp32")
    args = ap.parse_args()
    models = args.models or ["DiT-XL/2", "DiT-XL/2-E8K2", "DiT-XL/2-E16K2", FINE_GRAINED]
    traffic = args.traffic_models or ["DiT-XL/2-E8K2", "DiT-XL/2-E16K2", FINE_GRAINED]
    print(f"GiB per GPU (2^30 bytes); fsdp over {args.world} GPUs; ep x N: dp x {args.world} / N; "
          "activations not included")
    print(memory_table(models, args.world, args.ep))
    print()
    print(f"GiB each GPU sends (= receives) per training step over {args.world} GPUs; {args.batch} images per GPU, "
          f"all-to-all payload {args.act_bytes} B per element; uniform routing, k = the name's K")
    print(traffic_table(traffic, args.world, args.ep, args.batch, args.act_bytes))
    out = {"memory": [], "traffic": []}
    for spec in models:
        name, overrides = (spec, {}) if isinstance(spec, str) else spec
        out["memory"].append(training_memory(name, args.world, **overrides))
        for n in _ep_sizes(spec, args.world, args.ep):
            out["memory"].append(training_memory(name, args.world, ep=n, **overrides))
    for spec in traffic:
        name, overrides = (spec, {}) if isinstance(spec, str) else spec
        for n in _ep_sizes(spec, args.world, args.ep) or [None]:
            for gc in (False, True):
                t = step_traffic(name, args.world, ep=n, batch=args.batch, act_bytes=args.act_bytes,
                                 grad_checkpointing=gc, **overrides)
                out["traffic"].append({**t, "grad_checkpointing": gc, "overrides": overrides})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
