"""Training memory per GPU of each strategy (ddp, fsdp, ep), and the bytes each GPU sends per step, from the
parameter shapes of the model built on meta.

Memory. What a training step keeps for every parameter, as this toolkit trains (fp32 parameters; bf16 is autocast,
so the parameters are their own fp32 master copy and there is no second one):

    parameters 4 B, gradients 4 B, AdamW first and second moments 2 x 4 B, EMA copy 4 B       = 20 B per parameter

ddp holds all of it on every GPU. fsdp (FSDP2, ``dit_moe/training/fsdp.py``) shards each parameter on dim 0 over the
W ranks -- every rank stores ceil(dim0 / W) rows, the last ranks padding -- so a rank holds 20 B per element of its
shards, plus what a step gathers for a moment: the root unit (embedders, final layer: gathered from forward to
backward), two DiT blocks in fp32 (the one computing and the next one prefetched) and one block's unsharded
gradients before their reduce-scatter. Activations are not counted: they scale with the batch and are the same
per GPU for both strategies at the same per-GPU batch (``model.grad_checkpointing`` trades them for recompute).

Expert parallelism (ep, ``train.expert_parallel: N``; ``dit_moe/training/parallel/ep.py``): the W GPUs form a dp x ep
mesh, dp = W / N. Every MoE layer's routed ``ExpertBank`` (``MoEMLP.experts``: stacked parameters, expert dimension
first) is split over the N GPUs of an ep group, E / N whole experts each; everything else -- attention, adaLN,
router, shared experts, Default MoE vectors, embedders, final layer -- is replicated and trained as under ddp. A GPU
holds 20 B per element of

    replicated parameters (whole)  +  sum over MoE layers of (E / N) / E of that layer's routed-expert parameters,

nothing gathered. Which parameters are routed experts is read from the model (``moe_layers(model)`` and each
layer's ``.experts``), not from names. Not counted either: the all-to-all send and receive buffers (activations:
they scale with the batch; under uniform routing a GPU receives as many rows as it sends).

Traffic (``step_traffic``): the bytes each GPU sends per optimizer step -- and receives, the same amount for ring
collectives and, under uniform routing, for the all-to-all. Ring accounting over a group of G GPUs: an all-reduce
of B bytes moves 2 (G-1)/G x B per GPU, an all-gather or a reduce-scatter of B bytes (G-1)/G x B. Per strategy:

    ddp    all-reduce of the fp32 gradients over W:                                      2 (W-1)/W x 4 P
    fsdp   all-gather of the fp32 parameters for the forward, again for the backward (the root unit only once:
           FSDP keeps it gathered from forward to backward; a recompute under gradient checkpointing runs inside
           the backward's gather, so it gathers nothing more), reduce-scatter of the fp32 gradients:
                                   (W-1) x 4 x (2 x block shards + root shard) + (W-1) x 4 x all shards
           (shards padded as above: W x shard = the padded size, so (W-1) x shard = (W-1)/W x padded bytes)
    ep     all-reduce of the replicated parameters' fp32 gradients over W             2 (W-1)/W x 4 P_rep
           + all-reduce of the local experts' fp32 gradients over dp = W / N          2 (dp-1)/dp x 4 P_exp / N
           + all-to-all, per MoE layer: every routed (token, expert) pair's hidden state (width D) goes to the GPU
             owning the expert (dispatch) and its output comes back (combine), both again in reverse in the backward:
                                   tokens x k x D x a x (N-1)/N x 4      (x 6 with gradient checkpointing)

with P the parameter elements, tokens the GPU's tokens per step (images x patches per image), k the routed experts
per token and a the all-to-all payload's bytes per element (2 under bf16 autocast, 4 in fp32). Assumptions: one
micro-batch per optimizer step (with A accumulated micro-batches the all-to-alls and all of fsdp's collectives run A
times -- accelerate's no_sync does nothing to an FSDP2 model, so its gradients are reduce-scattered every micro-batch
-- while ddp's all-reduce runs once); uniform routing, so (N-1)/N of a GPU's pairs leave it and it receives as many
as it sends (a skewed load sends more from, and to, some GPUs); flat rings (no hierarchy inside a node); ep's
gradients reduced by ddp (not fsdp); the small collectives every strategy shares or that scale with E, not D -- the
routing statistics' all-reduce, the loss check, ep's exchange of the per-expert counts (E integers per layer and
forward) -- are left out. Bytes are not time: ddp's all-reduce overlaps the backward and fsdp prefetches the next
unit's gather, while ep's all-to-alls sit between the router and the experts of every layer, on the critical path.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

from .models.moe import moe_layers
from .registry import build_model

BYTES = {"params": 4, "grads": 4, "adamw": 8, "ema": 4}      # per parameter element, fp32 (see above)
GIB = 2 ** 30
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


@dataclasses.dataclass
class _Census:
    """What the arithmetic needs from the model built on meta (shapes only, no memory)."""
    name: str
    shapes: list          # every parameter's shape
    block: list           # the largest DiT block's parameter shapes (fsdp's transient units)
    blocks: list          # every DiT block's parameter shapes (fsdp units gathered twice per step)
    root: list            # the shapes outside the blocks (fsdp's root unit, gathered once per step)
    experts: list         # per MoE layer: (E, D, [routed-expert parameter shapes, expert dimension first])
    top_k: int            # the name's K (0 for a dense model)
    patches: int          # tokens per image
    grad_checkpointing: bool


def _census(spec, routing=None, **overrides) -> _Census:
    with torch.device("meta"):
        model = build_model(spec, routing, **overrides)
    in_blocks = {id(p) for p in model.blocks.parameters()}
    root = [tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks]
    blocks = [[tuple(p.shape) for p in b.parameters()] for b in model.blocks]
    biggest = max(blocks, key=lambda shapes: sum(math.prod(s) for s in shapes))
    experts = []
    for layer in moe_layers(model):
        bank = layer.experts
        shapes = [tuple(p.shape) for p in bank.parameters()]
        # The split is on the expert dimension: every routed parameter must lead with it.
        assert all(s and s[0] == bank.num_experts for s in shapes), (layer, shapes)
        experts.append((bank.num_experts, layer.dim, shapes))
    return _Census(model.arch.name, [tuple(p.shape) for p in model.parameters()], biggest, blocks, root, experts,
                   model.arch.top_k, model.x_embedder.num_patches, bool(model.model_config.grad_checkpointing))


def _numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def _shard_numel(shape: tuple, world: int) -> int:
    """Elements one rank stores of a parameter sharded on dim 0 over ``world`` ranks (FSDP2: ceil, padded);
    0-d parameters are stored as (1,)."""
    shape = shape or (1,)
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def _ep_split(c: _Census, world: int, ep: int) -> tuple[int, int, int]:
    """(replicated elements, routed-expert elements of the whole model, routed-expert elements one GPU holds)
    for an ep group of ``ep`` GPUs inside ``world``; ValueError (one line) where the split does not exist."""
    if not c.experts:
        raise ValueError(f"expert parallelism needs a MoE model; {c.name} is dense")
    if ep < 1 or world % ep:
        raise ValueError(f"expert parallelism over {ep} GPUs needs {world} GPUs to be a multiple of {ep}")
    bad = sorted({E for E, _, _ in c.experts if E % ep})
    if bad:
        raise ValueError(f"expert parallelism over {ep} GPUs needs the experts per MoE layer divisible by {ep}; "
                         f"{c.name} has {bad[0]}")
    expert = sum(_numel(shapes) for _, _, shapes in c.experts)
    local = sum((E // ep) * sum(math.prod(s[1:]) for s in shapes) for E, _, shapes in c.experts)
    return _numel(c.shapes) - expert, expert, local


def training_memory(spec: Union[str, object], world: int = 8, routing=None, ep: Optional[int] = None,
                    **overrides) -> dict:
    """Bytes per GPU of parameters, gradients, AdamW moments and EMA for ddp and fsdp over ``world`` GPUs, and with
    ``ep=N`` for expert parallelism over ep groups of N GPUs (dp = world / N).

    Returns ``{"name", "params", "expert_params", "world", "ddp": {...}, "fsdp": {...}}`` (+ ``"ep"``); each strategy
    maps ``params``, ``grads``, ``adamw``, ``ema`` and ``persistent`` (their sum) to bytes, fsdp also ``transient``
    (the gathered units, see the module docstring) and ``peak`` (persistent + transient), ep also ``experts`` (the
    part of ``persistent`` that is this GPU's routed experts), ``size`` (N) and ``dp``. ``expert_params``: the routed
    experts' elements of the whole model. ValueError if ``ep`` does not split the experts or the GPUs evenly.
    """
    c = _census(spec, routing, **overrides)
    n = _numel(c.shapes)
    ddp = {k: b * n for k, b in BYTES.items()}
    ddp["persistent"] = sum(ddp.values())
    shard = sum(_shard_numel(s, world) for s in c.shapes)
    fsdp = {k: b * shard for k, b in BYTES.items()}
    fsdp["persistent"] = sum(fsdp.values())
    block_n, root_n = _numel(c.block), _numel(c.root)
    fsdp["transient"] = 4 * (root_n + 2 * block_n) + 4 * block_n
    fsdp["peak"] = fsdp["persistent"] + fsdp["transient"]
    out = {"name": c.name, "params": n, "expert_params": sum(_numel(s) for _, _, s in c.experts), "world": world,
           "ddp": ddp, "fsdp": fsdp}
    if ep is not None:
        replicated, _, local = _ep_split(c, world, ep)
        held = {k: b * (replicated + local) for k, b in BYTES.items()}
        held["persistent"] = sum(held.values())
        out["ep"] = {**held, "experts": sum(BYTES.values()) * local, "size": ep, "dp": world // ep}
    return out


def step_traffic(spec: Union[str, object], world: int = 8, ep: Optional[int] = None, batch: int = 32,
                 k: Optional[float] = None, act_bytes: int = 2, grad_checkpointing: Optional[bool] = None,
                 routing=None, **overrides) -> dict:
    """Bytes each GPU sends (and receives) in one training step under ddp, fsdp and, with ``ep=N``, ep (module
    docstring: formulas and assumptions).

    ``batch``: images per GPU per step (tokens = batch x the model's patches per image); ``k``: routed experts per
    token (None: the name's K; pass a threshold router's measured mean); ``act_bytes``: the all-to-all payload's
    bytes per element (2: bf16 autocast, 4: fp32); ``grad_checkpointing`` (None: the model config's) runs the
    forward all-to-alls twice. Returns ``{"name", "world", "tokens", "k", "ddp", "fsdp"}`` (+ ``"ep"``); each strategy
    maps ``all_reduce``, ``all_gather``, ``reduce_scatter``, ``all_to_all`` and ``total`` to bytes, ep also
    ``expert_all_reduce`` (the part of ``all_reduce`` over the dp group), ``size`` and ``dp``.
    """
    c = _census(spec, routing, **overrides)
    W = world
    ring = (W - 1) / W
    n = _numel(c.shapes)
    ddp = dict.fromkeys(COLLECTIVES, 0.0)
    ddp["all_reduce"] = 2 * ring * 4 * n
    fsdp = dict.fromkeys(COLLECTIVES, 0.0)
    gathered = 2 * sum(_shard_numel(s, W) for b in c.blocks for s in b) + sum(_shard_numel(s, W) for s in c.root)
    fsdp["all_gather"] = (W - 1) * 4 * gathered
    fsdp["reduce_scatter"] = (W - 1) * 4 * sum(_shard_numel(s, W) for s in c.shapes)
    tokens = batch * c.patches
    k = c.top_k if k is None else k
    out = {"name": c.name, "world": W, "tokens": tokens, "k": k, "ddp": ddp, "fsdp": fsdp}
    if ep is not None:
        replicated, _, local = _ep_split(c, W, ep)
        dp = W // ep
        gc = c.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
        e = dict.fromkeys(COLLECTIVES, 0.0)
        e["expert_all_reduce"] = 2 * (dp - 1) / dp * 4 * local
        e["all_reduce"] = 2 * ring * 4 * replicated + e["expert_all_reduce"]
        passes = 6 if gc else 4         # dispatch + combine, forward and backward; the recompute adds a forward
        e["all_to_all"] = sum(tokens * k * D * act_bytes * (ep - 1) / ep * passes for _, D, _ in c.experts)
        out["ep"] = {**e, "size": ep, "dp": dp}
    for s in ("ddp", "fsdp", "ep"):
        if s in out:
            out[s]["total"] = sum(out[s][x] for x in COLLECTIVES)
    return out


# ------------------------------------------------------------------------------------------------ README tables

def _spec(model) -> tuple[str, dict, str]:
    """A table's model entry: a registry name, or (name, ModelConfig overrides) -> (name, overrides, label)."""
    name, overrides = (model, {}) if isinstance(model, str) else model
    extra = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in overrides.items())
    return name, overrides, f"{name} ({extra})" if extra else name


FINE_GRAINED = ("DiT-XL/2-E64K8", {"expert_hidden_ratio": 1.0})   # 64 experts of width D, 8 active: 8D like E8K2


def memory_table(names=("DiT-XL/2", "DiT-XL/2-E8K2", "DiT-XL/2-E16K2", FINE_GRAINED), world: int = 8,
                 ep=(2, 8)) -> str:
    """The README's "Memory per strategy" table (GiB per GPU), one row per model and strategy; MoE models also get
    one ep row per group size in ``ep`` that divides their experts and ``world``. A model is a registry name or
    (name, ModelConfig overrides)."""
    rows = ["| model | parameters | strategy | params | grads | AdamW m, v | EMA | total | + gathered units | peak |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    g = lambda b: f"{b / GIB:.2f}"
    for model in names:
        name, overrides, label = _spec(model)
        m = training_memory(name, world, **overrides)
        d, f = m["ddp"], m["fsdp"]
        rows.append(f"| {label} | {m['params'] / 1e6:.1f}M | ddp | {g(d['params'])} | {g(d['grads'])} | "
                    f"{g(d['adamw'])} | {g(d['ema'])} | {g(d['persistent'])} | - | {g(d['persistent'])} |")
        rows.append(f"| | | fsdp x{world} | {g(f['params'])} | {g(f['grads'])} | {g(f['adamw'])} | {g(f['ema'])} | "
                    f"{g(f['persistent'])} | {g(f['transient'])} | {g(f['peak'])} |")
        for N in ep if m["expert_params"] else ():
            try:
                e = training_memory(name, world, ep=N, **overrides)["ep"]
            except ValueError:
                continue        # this group size does not split this model's experts (or the GPUs)
            rows.append(f"| | | ep x{N}, dp x{e['dp']} | {g(e['params'])} | {g(e['grads'])} | {g(e['adamw'])} | "
                        f"{g(e['ema'])} | {g(e['persistent'])} | - | {g(e['persistent'])} |")
    return "\n".join(rows)


def traffic_table(names=("DiT-XL/2-E8K2", "DiT-XL/2-E16K2", FINE_GRAINED), world: int = 8, ep=(2, 8),
                  batch: int = 32, act_bytes: int = 2) -> str:
    """The README's per-step traffic table: GiB each GPU sends per training step, one row per model and strategy
    (ep: one row per group size in ``ep`` that divides the model's experts and ``world``), the total without and
    with gradient checkpointing (only ep's all-to-all changes). A model is a registry name or (name, overrides)."""
    rows = ["| model | strategy | gradient all-reduce | parameter all-gather | gradient reduce-scatter | all-to-all "
            "| total | all-to-all, grad. ckpt. | total, grad. ckpt. |",
            "|---|---|---|---|---|---|---|---|---|"]
    g = lambda b: f"{b / GIB:.2f}" if b else "-"
    for model in names:
        name, overrides, label = _spec(model)
        t = step_traffic(name, world, batch=batch, act_bytes=act_bytes, **overrides)
        for s, strategy in (("ddp", "ddp"), ("fsdp", f"fsdp x{world}")):
            x, first = t[s], f"| {label} |" if label else "| |"
            rows.append(f"{first} {strategy} | {g(x['all_reduce'])} | {g(x['all_gather'])} | "
                        f"{g(x['reduce_scatter'])} | - | {g(x['total'])} | - | {g(x['total'])} |")
            label = ""
        for N in ep:
            try:
                x = step_traffic(name, world, ep=N, batch=batch, act_bytes=act_bytes, grad_checkpointing=False,
                                 **overrides)["ep"]
            except ValueError:
                continue
            y = step_traffic(name, world, ep=N, batch=batch, act_bytes=act_bytes, grad_checkpointing=True,
                             **overrides)["ep"]
            rows.append(f"| | ep x{N}, dp x{x['dp']} | {g(x['all_reduce'])} | - | - | {g(x['all_to_all'])} | "
                        f"{g(x['total'])} | {g(y['all_to_all'])} | {g(y['total'])} |")
    return "\n".join(rows)
