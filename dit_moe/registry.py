"""The model registry: the one source of architectures for training, sampling and evaluation.

Names: ``DiT-{T,S,B,L,XL}/{2,4,8}`` (dense, the DiT paper's sizes plus a tiny ``T`` for CPU work) and
``DiT-{T,S,B,L,XL}/{2,4,8}-E{experts}K{active}`` (every block's MLP is an MoE-MLP with E routed experts, K of them
active per token for Top-k, or K as the target of threshold routers). The router family and its hyper-parameters
come from the ``routing`` config section, the data shape from the ``model`` section.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .checks import check_at_least
from .config import ConfigError, ExperimentConfig, ModelConfig, RoutingConfig
from .models import moe
from .models.dit import DiT, dense_mlp

# depth, hidden size, heads (DiT paper, Table 1); T is ours for CPU tests and the embedded demo.
SIZES = {
    "T": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCHES = (2, 4, 8)
_NAME = re.compile(r"^DiT-(?P<size>T|S|B|L|XL)/(?P<patch>\d+)(?:-E(?P<experts>\d+)K(?P<k>\d+))?$")

# What `python -m dit_moe models` lists: every dense name and the E8K2 MoE variant of each.
LISTED_MOE = ("E8K2",)


@dataclass(frozen=True)
class Arch:
    """A parsed registry name."""
    name: str
    size: str
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    num_experts: int = 0      # 0: dense
    top_k: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def parse_name(name: str) -> Arch:
    m = _NAME.match(name)
    if m is None or int(m["patch"]) not in PATCHES:
        raise ConfigError(
            f"unknown model name {name!r}; valid names are DiT-{{{','.join(SIZES)}}}/{{{','.join(map(str, PATCHES))}}} "
            f"optionally followed by -E<experts>K<active>, e.g. DiT-S/2 or DiT-B/2-E8K2 (see `python -m dit_moe models`)")
    depth, hidden, heads = SIZES[m["size"]]
    experts = int(m["experts"] or 0)
    k = int(m["k"] or 0)
    if m["experts"] is not None and not 1 <= k <= experts:
        raise ConfigError(f"model name {name!r}: need 1 <= K <= E, got E={experts} K={k}")
    return Arch(name, m["size"], depth, hidden, heads, int(m["patch"]), experts, k)


def dense_name(depth: int, hidden_size: int, patch_size: int) -> str:
    """The dense registry name with this depth, width and patch size (for weights read from elsewhere)."""
    for size, (d, h, _) in SIZES.items():
        if (d, h) == (depth, hidden_size) and patch_size in PATCHES:
            return f"DiT-{size}/{patch_size}"
    known = ", ".join(f"{s} {d}x{h}" for s, (d, h, _) in SIZES.items())
    raise ConfigError(f"no registry model has depth {depth}, hidden size {hidden_size} and patch size {patch_size} "
                      f"(sizes: {known}; patches: {', '.join(map(str, PATCHES))})")


def model_names() -> list[str]:
    names = [f"DiT-{s}/{p}" for s in SIZES for p in PATCHES]
    return names + [f"{n}-{suffix}" for n in list(names) for suffix in LISTED_MOE]


def _resolve(spec, routing: Optional[RoutingConfig]) -> tuple[ModelConfig, RoutingConfig]:
    if isinstance(spec, ExperimentConfig):
        return spec.model, routing or spec.routing
    if isinstance(spec, ModelConfig):
        return spec, routing or RoutingConfig()
    if isinstance(spec, str):
        return ModelConfig(name=spec), routing or RoutingConfig()
    raise TypeError(f"build_model expects a registry name, ModelConfig or ExperimentConfig, got {type(spec).__name__}")


def build_model(spec: Union[str, ModelConfig, ExperimentConfig], routing: Optional[RoutingConfig] = None, **overrides) -> DiT:
    """The one constructor: a registry name or config -> DiT (dense or MoE), with its configs attached.

    ``overrides`` replace ModelConfig fields (``build_model("DiT-S/2", input_size=8, in_channels=1)``).
    The returned model carries ``model_config`` and ``routing_config``, which the checkpoint stores.
    """
    model_cfg, routing_cfg = _resolve(spec, routing)
    if overrides:
        valid = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(f"build_model: unknown model option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
        model_cfg = dataclasses.replace(model_cfg, **overrides)
    arch = parse_name(model_cfg.name)
    mlp_factory = None
    controller = None
    if arch.is_moe:
        moe_layers = [i for i in range(arch.depth) if i % model_cfg.moe_every == model_cfg.moe_every - 1]
        controller = moe.build_controller(routing_cfg, arch.num_experts, arch.top_k, len(moe_layers))

        def mlp_factory(i: int):
            if i not in moe_layers:
                return dense_mlp(arch.hidden_size)
            return moe.build_moe_mlp(arch.hidden_size, moe_layers.index(i), arch.num_experts, arch.top_k,
                                     model_cfg, routing_cfg, controller)

    model = DiT(
        input_size=model_cfg.input_size,
        patch_size=arch.patch_size,
        in_channels=model_cfg.in_channels,
        hidden_size=arch.hidden_size,
        depth=arch.depth,
        num_heads=arch.num_heads,
        class_dropout_prob=model_cfg.class_dropout_prob,
        num_classes=model_cfg.num_classes,
        learn_sigma=model_cfg.learn_sigma,
        mlp_factory=mlp_factory,
        grad_checkpointing=model_cfg.grad_checkpointing,
        timestep_freq_shift=model_cfg.timestep_freq_shift,
        mlp_norm_eps=model_cfg.mlp_norm_eps,
    )
    if controller is not None:
        model.routing_controller = controller
    model.arch = arch
    model.model_config = model_cfg
    model.routing_config = routing_cfg
    return model


# ---------------------------------------------------------------------------------------------------------
#                                        Size and cost accounting
# ---------------------------------------------------------------------------------------------------------

def _expert_params(model_cfg: ModelConfig, hidden: int) -> int:
    h = int(model_cfg.expert_hidden_ratio * hidden)
    if model_cfg.expert_kind == "swiglu":
        return 3 * hidden * h                     # gate, up, down; no biases (DiT-MoE)
    return 2 * hidden * h + h + hidden            # fc1, fc2 with biases (DiT)


def count_params(spec: Union[str, ModelConfig, ExperimentConfig], routing: Optional[RoutingConfig] = None,
                 **overrides) -> dict:
    """Total and active parameters, built on the meta device (no memory), and forward GMACs per image.

    Parameters are counted as the DiT paper does, including the fixed 2-D sin-cos position table.
    Active parameters count K routed experts per MoE layer (K = the name's K, the target for threshold routers).
    Compute is counted as multiply-accumulates, the unit of the DiT paper's "Gflops" column (XL/2: 118.6).
    """
    with torch.device("meta"):
        model = build_model(spec, routing, **overrides)
    arch, cfg = model.arch, model.model_config
    # DiT's published counts include its fixed sin-cos table (a frozen parameter there, a buffer here).
    total = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    D, depth = arch.hidden_size, arch.depth
    tokens = (cfg.input_size // arch.patch_size) ** 2
    n_moe = depth // cfg.moe_every if arch.is_moe else 0
    inactive = n_moe * max(arch.num_experts - arch.top_k, 0) * _expert_params(cfg, D)
    active = total - inactive

    # Multiply-accumulates of one forward pass on one image.
    attn = tokens * 4 * D * D + 2 * tokens * tokens * D
    dense_mlp_macs = tokens * 2 * D * 4 * D
    if arch.is_moe:
        h = int(cfg.expert_hidden_ratio * D)
        per_expert = (3 if cfg.expert_kind == "swiglu" else 2) * D * h
        shared = cfg.num_shared_experts * 3 * D * int(cfg.shared_hidden_ratio * D)
        moe_mlp = tokens * (D * arch.num_experts + arch.top_k * per_expert + shared)
    else:
        moe_mlp = dense_mlp_macs
    blocks = depth * (attn + 6 * D * D) + n_moe * (moe_mlp - dense_mlp_macs)
    patch = arch.patch_size
    embed = tokens * cfg.in_channels * patch * patch * D + 256 * D + D * D
    final = 2 * D * D + tokens * D * patch * patch * model.out_channels
    dense_part = depth * dense_mlp_macs
    gmacs = (blocks + dense_part + embed + final) / 1e9
    return {"name": arch.name, "total_params": total, "active_params": active, "gflops": gmacs}


# ---------------------------------------------------------------------------------------------------------
#                                   dit-moe models: the registry listing
# ---------------------------------------------------------------------------------------------------------

def list_models(input_size: int = 32, in_channels: int = 4, num_classes: int = 1000) -> list[dict]:
    """``registry.count_params`` of every registry name for latents of this shape."""
    rows = []
    for name in model_names():
        cfg = ModelConfig(name=name, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
        rows.append(count_params(cfg, RoutingConfig()))
    return rows


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256px ImageNet through the SD VAE)")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)


def run_models(args: argparse.Namespace) -> int:
    for flag, value in (("--input-size", args.input_size), ("--in-channels", args.in_channels),
                        ("--num-classes", args.num_classes)):
        check_at_least(flag, value, 1, ConfigError)
    print(f"{'name':<18}{'params (M)':>12}{'active (M)':>12}{'GFLOPs':>10}")
    for r in list_models(args.input_size, args.in_channels, args.num_classes):
        print(f"{r['name']:<18}{r['total_params'] / 1e6:>12.1f}{r['active_params'] / 1e6:>12.1f}{r['gflops']:>10.2f}")
    print(f"\nlatent {args.input_size}x{args.input_size}x{args.in_channels}, {args.num_classes} classes; "
          "MoE names: -E<experts>K<active> (experts: GELU MLPs of width 4D unless "
          "model.expert_kind/expert_hidden_ratio "
          "say otherwise); active = K routed experts per MoE layer; GFLOPs are multiply-accumulates per image, "
          "the unit of the DiT paper.")
    return 0
