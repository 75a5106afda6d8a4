"""State-dict layouts of the DiT family: facebookresearch/DiT's, diffusers' DiTTransformer2DModel's and dit-moe's.

dit-moe's dense DiT keeps the original DiT's parameter names (timm PatchEmbed ``x_embedder.proj``, a fused
``attn.qkv``, timm Mlp ``mlp.fc1``/``mlp.fc2``, ``adaLN_modulation.1``, ``final_layer``), so a DiT state dict maps
onto it one to one. The one tensor DiT stores that dit-moe does not is ``pos_embed`` (a frozen parameter there, a
buffer rebuilt from the geometry here): it gives the input size and is checked to be the sin-cos table.

diffusers' DiTTransformer2DModel computes the same function with other names and two structural differences:
q, k and v are three linears (``attn1.to_q/to_k/to_v``), and every block holds its own copy of the timestep and
label embedders (``transformer_blocks.i.norm1.emb``; the final layer reads block 0's). Models converted from DiT
hold identical copies; a model whose per-block embedders differ (one trained natively in diffusers) has no DiT
counterpart and is refused. Its numerical conventions (timestep frequencies, MLP LayerNorm eps) are described in
dit_moe/weights/convert.py.

Everything here works on plain ``{name: tensor}`` dicts; errors are ``LayoutError`` naming the tensor.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig, RoutingConfig
from ..errors import DitMoeError
from ..models.dit import get_2d_sincos_pos_embed
from ..registry import build_model, dense_name, parse_name
from .build import fit

__all__ = ["LayoutError", "detect_layout", "infer_dit_config", "dit_to_dit_moe", "diffusers_model_config",
           "diffusers_to_dit_moe", "dit_moe_to_diffusers", "check_state", "module_from_state"]

# diffusers' LabelEmbedding always has a null row (CombinedTimestepLabelEmbeddings' class_dropout_prob=0.1).
CLASS_DROPOUT = 0.1


class LayoutError(DitMoeError, ValueError):
    """Weights that do not fit a layout; the message names the file and the tensor."""


def _shape(t) -> tuple:
    return tuple(t.shape)


def detect_layout(state: dict) -> str:
    """'dit' (facebookresearch/DiT and dit-moe dense), 'diffusers', 'moe' (an MoE state dict) or 'unknown'."""
    if any(".mlp.experts." in k or ".moe." in k or ".mlp.router." in k for k in state):
        return "moe"
    if "x_embedder.proj.weight" in state:
        return "dit"
    if "pos_embed.proj.weight" in state and any(k.startswith("transformer_blocks.") for k in state):
        return "diffusers"
    return "unknown"


def _need(state: dict, key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise LayoutError(f"{where}: missing tensor {key}")
    return state[key]


def _block_count(state: dict, prefix: str, where: str) -> int:
    found = {int(m[1]) for k in state if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    if not found:
        raise LayoutError(f"{where}: no transformer blocks ({prefix}0.* tensors)")
    missing = sorted(set(range(max(found) + 1)) - found)
    if missing:
        raise LayoutError(f"{where}: blocks {missing} missing (found {prefix}{{{min(found)}..{max(found)}}})")
    return max(found) + 1


def _registry_name(depth: int, hidden: int, patch: int, where: str, shapes: str) -> str:
    try:
        return dense_name(depth, hidden, patch)
    except ConfigError as e:
        raise LayoutError(f"{where}: {shapes} match no registry model ({e})") from None


# ---------------------------------------------------------------------------------------------------------
#                                     facebookresearch/DiT layout
# ---------------------------------------------------------------------------------------------------------

def infer_dit_config(state: dict, where: str, input_size: Optional[int] = None, **conventions) -> ModelConfig:
    """A DiT-layout state dict -> its ModelConfig, read from the tensor shapes and checked against the registry.

    x_embedder.proj.weight (D, C, p, p) gives width, channels and patch; the block count the depth; (depth, D)
    must be a registry size; final_layer.linear (p*p*C_out, D) gives learn_sigma (C_out = 2C); the label table
    (num_classes + 1, D) the classes (its last row is the null class); pos_embed (1, T, D) the input size.
    """
    w = _need(state, "x_embedder.proj.weight", where)
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise LayoutError(f"{where}: x_embedder.proj.weight has shape {_shape(w)}, expected (D, C, p, p)")
    hidden, channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = _block_count(state, "blocks.", where)
    name = _registry_name(depth, hidden, patch, where,
                          f"{depth} blocks, x_embedder.proj.weight {_shape(w)} (width {hidden}, patch {patch})")
    out = _need(state, "final_layer.linear.weight", where)
    out_channels, rest = divmod(int(out.shape[0]), patch * patch)
    if rest or out_channels not in (channels, 2 * channels):
        raise LayoutError(f"{where}: final_layer.linear.weight has shape {_shape(out)}; expected ({patch * patch * 2 * channels}"
                          f", {hidden}) (learned sigma) or ({patch * patch * channels}, {hidden})")
    table = _need(state, "y_embedder.embedding_table.weight", where)
    num_classes = int(table.shape[0]) - 1
    if num_classes < 1:
        raise LayoutError(f"{where}: y_embedder.embedding_table.weight has shape {_shape(table)}: no classes besides the null row")
    size = _input_size_from_pos_embed(state, hidden, patch, where)
    if size is None and input_size is None:
        raise LayoutError(f"{where}: no pos_embed tensor to read the input size from; pass --input-size (latent side, 32 for 256px)")
    if size is not None and input_size is not None and size != input_size:
        raise LayoutError(f"{where}: pos_embed is for input size {size}, not the requested {input_size}")
    return ModelConfig(name=name, input_size=size or input_size, in_channels=channels, num_classes=num_classes,
                       learn_sigma=out_channels == 2 * channels, class_dropout_prob=CLASS_DROPOUT, **conventions)


def _input_size_from_pos_embed(state: dict, hidden: int, patch: int, where: str) -> Optional[int]:
    pos = state.get("pos_embed")
    if pos is None:
        return None
    tokens = pos.shape[1] if pos.ndim == 3 else -1
    grid = math.isqrt(max(tokens, 0))
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != hidden or grid * grid != tokens:
        raise LayoutError(f"{where}: pos_embed has shape {_shape(pos)}, expected (1, T, {hidden}) with T a square")
    table = torch.from_numpy(get_2d_sincos_pos_embed(hidden, grid)).float()
    err = (pos[0].float() - table).abs().max().item()
    if not err <= 1e-5:
        raise LayoutError(f"{where}: pos_embed is not DiT's fixed sin-cos table for a {grid}x{grid} grid "
                          f"(max difference {err:.3g}); learned position embeddings are not supported")
    return grid * patch


def dit_to_dit_moe(state: dict) -> dict:
    """DiT layout -> dit-moe: the same names, without the fixed pos_embed; floats as fp32."""
    return {k: _fp32(v) for k, v in state.items() if k != "pos_embed"}


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return (t.float() if t.is_floating_point() else t).contiguous()


# ---------------------------------------------------------------------------------------------------------
#                                    diffusers DiTTransformer2DModel
# ---------------------------------------------------------------------------------------------------------

_EMB = "norm1.emb."
_EMB_KEYS = {   # dit-moe name -> name inside a diffusers block's norm1.emb
    "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}
_TOP_KEYS = {   # dit-moe name -> diffusers name, outside the blocks
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}
_BLOCK_KEYS = {  # per block: dit-moe suffix -> diffusers suffix (qkv handled apart)
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}


def diffusers_model_config(config: dict, where: str, input_size: Optional[int] = None, **conventions) -> ModelConfig:
    """A DiTTransformer2DModel config -> ModelConfig; anything DiT does not have is refused by name."""
    expect = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
              "norm_elementwise_affine": False}
    for key, value in expect.items():
        if config.get(key, value) != value:
            raise LayoutError(f"{where}: config {key}={config[key]!r}; DiT has {value!r}")
    if config.get("num_embeds_ada_norm") is None:
        raise LayoutError(f"{where}: config num_embeds_ada_norm is null: not a class-conditional DiT")
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    depth, patch, channels = int(config["num_layers"]), int(config["patch_size"]), int(config["in_channels"])
    hidden = heads * head_dim
    out_channels = int(config.get("out_channels") or channels)
    name = _registry_name(depth, hidden, patch, where,
                          f"num_layers={depth}, {heads} heads x {head_dim} (width {hidden}), patch_size={patch}")
    if parse_name(name).num_heads != heads:
        raise LayoutError(f"{where}: {heads} attention heads; {name} has {parse_name(name).num_heads}")
    if out_channels not in (channels, 2 * channels):
        raise LayoutError(f"{where}: out_channels={out_channels} for in_channels={channels}; DiT has {channels} or {2 * channels}")
    sample_size = int(config["sample_size"])
    if input_size is not None and input_size != sample_size:
        raise LayoutError(f"{where}: sample_size={sample_size}, not the requested input size {input_size}")
    return ModelConfig(name=name, input_size=sample_size, in_channels=channels,
                       num_classes=int(config["num_embeds_ada_norm"]), learn_sigma=out_channels == 2 * channels,
                       class_dropout_prob=CLASS_DROPOUT, **conventions)


def diffusers_to_dit_moe(state: dict, depth: int, where: str) -> dict:
    """diffusers names -> dit-moe names (q, k, v fused; one embedder, checked to be the same in every block)."""
    left = dict(state)
    take = lambda key: _fp32(left.pop(key)) if key in left else _fp32(_need(state, key, where))  # noqa: E731
    out = {ours: take(theirs) for ours, theirs in _TOP_KEYS.items()}
    for ours, inner in _EMB_KEYS.items():
        first = take(f"transformer_blocks.0.{_EMB}{inner}")
        for i in range(1, depth):
            other = take(f"transformer_blocks.{i}.{_EMB}{inner}")
            if other.shape != first.shape or not torch.equal(other, first):
                raise LayoutError(f"{where}: transformer_blocks.{i}.{_EMB}{inner} differs from block 0's; DiT has one "
                                  "timestep/label embedder for all blocks (diffusers models converted from DiT hold "
                                  "identical copies, a model trained in diffusers does not)")
        out[ours] = first
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([take(f"{b}attn1.to_{x}.{kind}") for x in "qkv"])
            for ours, theirs in _BLOCK_KEYS.items():
                out[f"blocks.{i}.{ours}.{kind}"] = take(f"{b}{theirs}.{kind}")
    if left:
        extra = sorted(left)
        raise LayoutError(f"{where}: unexpected tensor(s) with no DiT counterpart: {', '.join(extra[:5])}"
                          + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""))
    return out


def dit_moe_to_diffusers(state: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """A dense dit-moe state dict -> (diffusers state dict, DiTTransformer2DModel config): the inverse mapping."""
    arch = parse_name(cfg.name)
    out = {theirs: state[ours] for ours, theirs in _TOP_KEYS.items()}
    for i in range(arch.depth):
        b = f"transformer_blocks.{i}."
        for ours, inner in _EMB_KEYS.items():
            out[f"{b}{_EMB}{inner}"] = state[ours].clone()
        for kind in ("weight", "bias"):
            for x, part in zip("qkv", state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{b}attn1.to_{x}.{kind}"] = part.clone()
            for ours, theirs in _BLOCK_KEYS.items():
                out[f"{b}{theirs}.{kind}"] = state[f"blocks.{i}.{ours}.{kind}"]
    config = dict(
        num_attention_heads=arch.num_heads, attention_head_dim=arch.hidden_size // arch.num_heads,
        in_channels=cfg.in_channels, out_channels=2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels,
        num_layers=arch.depth, sample_size=cfg.input_size, patch_size=arch.patch_size,
        num_embeds_ada_norm=cfg.num_classes, norm_eps=cfg.mlp_norm_eps, activation_fn="gelu-approximate",
        attention_bias=True, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    )
    return out, config


# ---------------------------------------------------------------------------------------------------------
#                                 Checking and holding dit-moe weights
# ---------------------------------------------------------------------------------------------------------

def _meta_model(cfg: ModelConfig, routing: Optional[RoutingConfig]) -> torch.nn.Module:
    with torch.device("meta"):     # names and shapes only: no memory, no initialisation
        return build_model(cfg, routing)


def check_state(state: dict, cfg: ModelConfig, where: str, routing: Optional[RoutingConfig] = None) -> None:
    """Refuse a state dict that does not fit ``build_model(cfg, routing)`` (``build.fit``: the tensors at fault)."""
    fit(state, _meta_model(cfg, routing), where, error=LayoutError)


def module_from_state(cfg: ModelConfig, state: dict, routing: Optional[RoutingConfig] = None) -> torch.nn.Module:
    """A model whose parameters and persistent buffers ARE the given tensors (built on the meta device, then the
    tensors assigned: no second copy of a large model). Non-persistent buffers stay on meta, so use the result
    for saving (``save_checkpoint``), not for computing."""
    model = _meta_model(cfg, routing)
    model.load_state_dict(state, strict=True, assign=True)
    return model
