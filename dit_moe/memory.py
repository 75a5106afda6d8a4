"""Training memory per GPU of each strategy (ddp, fsdp), from the parameter shapes of the model built on meta.

What a training step keeps for every parameter, as this toolkit trains (fp32 parameters; bf16 is autocast, so the
parameters are their own fp32 master copy and there is no second one):

    parameters 4 B, gradients 4 B, AdamW first and second moments 2 x 4 B, EMA copy 4 B       = 20 B per parameter

ddp holds all of it on every GPU. fsdp (FSDP2, ``dit_moe/training/fsdp.py``) shards each parameter on dim 0 over the
W ranks -- every rank stores ceil(dim0 / W) rows, the last ranks padding -- so a rank holds 20 B per element of its
shards, plus what a step gathers for a moment: the root unit (embedders, final layer: gathered from forward to
backward), two DiT blocks in fp32 (the one computing and the next one prefetched) and one block's unsharded
gradients before their reduce-scatter. Activations are not counted: they scale with the batch and are the same
per GPU for both strategies at the same per-GPU batch (``model.grad_checkpointing`` trades them for recompute).
"""
from __future__ import annotations

import math
from typing import Union

import torch

from .registry import build_model

BYTES = {"params": 4, "grads": 4, "adamw": 8, "ema": 4}      # per parameter element, fp32 (see above)
GIB = 2 ** 30


def _shapes(spec, routing=None, **overrides):
    """(all parameter shapes, shapes of the largest DiT block, shapes of the root unit) of the model on meta."""
    with torch.device("meta"):
        model = build_model(spec, routing, **overrides)
    in_blocks = {id(p) for p in model.blocks.parameters()}
    root = [tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks]
    blocks = [[tuple(p.shape) for p in b.parameters()] for b in model.blocks]
    biggest = max(blocks, key=lambda shapes: sum(math.prod(s) for s in shapes))
    return [tuple(p.shape) for p in model.parameters()], biggest, root, model.arch.name


def _shard_numel(shape: tuple, world: int) -> int:
    """Elements one rank stores of a parameter sharded on dim 0 over ``world`` ranks (FSDP2: ceil, padded);
    0-d parameters are stored as (1,)."""
    shape = shape or (1,)
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def training_memory(spec: Union[str, object], world: int = 8, routing=None, **overrides) -> dict:
    """Bytes per GPU of parameters, gradients, AdamW moments and EMA for ddp and for fsdp over ``world`` GPUs.

    Returns ``{"name", "params", "ddp": {...}, "fsdp": {...}}``; each strategy maps ``params``, ``grads``, ``adamw``,
    ``ema`` and ``persistent`` (their sum) to bytes, fsdp also ``transient`` (the gathered units, see the module
    docstring) and ``peak`` (persistent + transient).
    """
    shapes, block, root, name = _shapes(spec, routing, **overrides)
    n = sum(math.prod(s) for s in shapes)
    ddp = {k: b * n for k, b in BYTES.items()}
    ddp["persistent"] = sum(ddp.values())
    shard = sum(_shard_numel(s, world) for s in shapes)
    fsdp = {k: b * shard for k, b in BYTES.items()}
    fsdp["persistent"] = sum(fsdp.values())
    block_n, root_n = sum(math.prod(s) for s in block), sum(math.prod(s) for s in root)
    fsdp["transient"] = 4 * (root_n + 2 * block_n) + 4 * block_n
    fsdp["peak"] = fsdp["persistent"] + fsdp["transient"]
    return {"name": name, "params": n, "world": world, "ddp": ddp, "fsdp": fsdp}


def memory_table(names=("DiT-XL/2", "DiT-XL/2-E8K2", "DiT-XL/2-E16K2"), world: int = 8) -> str:
    """The README's "Memory per strategy" table (GiB per GPU), one row per model and strategy."""
    rows = ["| model | parameters | strategy | params | grads | AdamW m, v | EMA | total | + gathered units | peak |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    g = lambda b: f"{b / GIB:.2f}"
    for name in names:
        m = training_memory(name, world)
        d, f = m["ddp"], m["fsdp"]
        rows.append(f"| {m['name']} | {m['params'] / 1e6:.1f}M | ddp | {g(d['params'])} | {g(d['grads'])} | "
                    f"{g(d['adamw'])} | {g(d['ema'])} | {g(d['persistent'])} | - | {g(d['persistent'])} |")
        rows.append(f"| | | fsdp x{world} | {g(f['params'])} | {g(f['grads'])} | {g(f['adamw'])} | {g(f['ema'])} | "
                    f"{g(f['persistent'])} | {g(f['transient'])} | {g(f['peak'])} |")
    return "\n".join(rows)
