"""torch.compile for DiT and DiT-MoE: every block compiled on its own, the MoE dispatch eager inside it.

What is compiled (``compile_blocks``): each ``DiTBlock`` in place (``nn.Module.compile``), as torchtitan compiles
its transformer blocks. One block's graph holds adaLN (SiLU + linear + chunk), both LayerNorms, the modulations,
attention (qkv, scaled_dot_product_attention, projection), the gated residuals, the dense MLP and, in MoE blocks,
the router's scores (fp32 gate matmul and softmax / DTop-p's normalisation; ``Router.scores``). Blocks of one
model share their code, so dynamo compiles one graph set per distinct block structure, not one per block
(``inline_inbuilt_nn_modules``: parameters are graph inputs, not constants). The embedders, the final layer and
unpatchify stay eager: they run once per forward and are a few small ops.

What stays eager: ``MoEMLP._routed`` (selection, pair list, expert bank, combine, routing statistics), marked
``torch.compiler.disable`` by ``compile_blocks`` (``keep_dispatch_eager``). The threshold routers' number of
pairs is data-dependent (one host read per layer), the CPU segment loop needs host sizes, and the grouped_mm
probe, the RoutingTap hooks and the gradient-checkpoint recompute test are Python; traced, each would be a graph
break or a recompile per new pair count. Disabled, an MoE block is three graphs with two breaks, whatever the
router: the block up to the MLP, the router scores (the disabled call breaks the block's frame at ``self.mlp``,
and dynamo compiles the MoE-MLP's forward as a frame of its own, which breaks again at ``_routed``), and the
gated residual after it. A dense block is one graph. ``graph_breaks`` counts them with ``torch._dynamo.explain``.

Parameter names and state dicts do not change (no ``_orig_mod.`` prefix): checkpoints of compiled and eager runs
are interchangeable, and a compiled run resumes an eager one and vice versa.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .moe import MoEMLP

__all__ = ["compile_blocks", "keep_dispatch_eager", "is_compiled", "graph_breaks"]


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """Compile every block of the DiT ``model`` in place (idempotent); returns ``model``.

    ``options`` go to ``torch.compile`` (default backend inductor, default mode). Nothing compiles until the first
    forward; the first forward of each new input shape, dtype or train/eval mode pays the compile time.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"compile_blocks expects a DiT (a model with .blocks), got {type(model).__name__}")
    keep_dispatch_eager()
    for block in blocks:
        if not is_compiled(block):
            block.compile(**options)
    return model


def keep_dispatch_eager() -> None:
    """Mark ``MoEMLP._routed`` ``torch.compiler.disable`` (once per process; eager calls are unaffected).

    Done on first use rather than with a decorator in moe.py: ``torch.compiler.disable`` imports torch._dynamo,
    which would add seconds to the start of every command that never compiles.
    """
    if not getattr(MoEMLP._routed, "_dit_moe_eager", False):
        eager = torch.compiler.disable(MoEMLP._routed)
        eager._dit_moe_eager = True
        MoEMLP._routed = eager


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` itself was compiled in place (``nn.Module.compile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def graph_breaks(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Per distinct block of ``model`` (dense, MoE): graphs, graph breaks and their reasons, for inputs (x, t, y).

    Runs ``torch._dynamo.explain`` on each block with the activations the eager model gives it (no compiled code
    is produced or kept). Returns one dict per block kind: ``block`` (the index of its first block), ``kind``
    (its MLP class), ``graphs``, ``breaks``, ``reasons`` (one line each). The model's buffers (routing sums) are
    restored afterwards. ``explain`` resets dynamo's caches before and after: call it before a compiled run, not
    during one (the blocks would compile again).
    """
    keep_dispatch_eager()
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, tuple(v.detach() for v in a)))
             for i, b in enumerate(model.blocks)]
    buffers = {n: b.clone() for n, b in model.named_buffers()}     # training forwards accumulate routing sums
    try:
        with torch.no_grad():
            model(x, t, y)
            out = _explain_blocks(model, inputs)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    return out


def _explain_blocks(model: nn.Module, inputs: dict) -> list[dict]:
    seen, out = set(), []
    for i, block in enumerate(model.blocks):
        kind = type(block.mlp).__name__
        if kind in seen:
            continue
        seen.add(kind)
        report = torch._dynamo.explain(block.forward)(*inputs[i])      # the uncompiled forward, traced afresh
        reasons = [str(getattr(r, "reason", r)).strip().splitlines()[0] for r in report.break_reasons]
        out.append({"block": i, "kind": kind, "graphs": report.graph_count, "breaks": report.graph_break_count,
                    "reasons": reasons})
    return out
