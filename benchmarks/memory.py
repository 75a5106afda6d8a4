"""Per-GPU training memory of ddp and fsdp, from the parameter shapes (the README's "Memory per strategy" table).

    python benchmarks/memory.py [--world 8] [--models DiT-XL/2 DiT-XL/2-E8K2 DiT-XL/2-E16K2]

Arithmetic, not a measurement: dit_moe/memory.py says what is counted (fp32 parameters, gradients, AdamW moments,
EMA; fsdp's shards and its transiently gathered units) and tests/test_memory.py checks the parameter counts against
the model built on the meta device and a closed form. The last line printed is one JSON object (bytes).
"""
from __future__ import annotations

import argparse
import json

from dit_moe.memory import memory_table, training_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=8, help="GPUs fsdp shards over")
    ap.add_argument("--models", nargs="+", default=["DiT-XL/2", "DiT-XL/2-E8K2", "DiT-XL/2-E16K2"])
    args = ap.parse_args()
    print(f"GiB per GPU (2^30 bytes); fsdp over {args.world} GPUs; activations not included")
    print(memory_table(args.models, args.world))
    print(json.dumps([training_memory(n, args.world) for n in args.models]))


if __name__ == "__main__":
    main()
