"""The DiT backbone (Peebles & Xie, 2023): patchified latents, adaLN-Zero blocks, class + timestep conditioning.

The MLP of every block is a slot: ``mlp_factory(layer_index)`` returns any module mapping (N, T, D) -> (N, T, D).
A dense GELU-tanh MLP fills it by default; the registry plugs MoE-MLP blocks in without this file knowing about
them. A slot module may define ``init_weights()``; it is called after DiT's own initialisation so that the
generic xavier sweep does not overwrite a router's or an expert bank's initialisation.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Mlp, PatchEmbed
from torch.utils.checkpoint import checkpoint


def modulate(x, shift, scale):
    """adaLN modulation of (N, T, D) tokens by per-sample (N, D) shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D): sinusoidal frequencies followed by a two-layer MLP.

    ``freq_shift`` selects the frequency convention: the original DiT (0) uses exp(-ln(max_period) i / half),
    diffusers' DiT (``Timesteps(downscale_freq_shift=1)``, 1) exp(-ln(max_period) i / (half - 1)), i < half.
    Weights trained under one convention compute a different function under the other (model.timestep_freq_shift).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        if freq_shift not in (0, 1):
            raise ValueError(f"timestep freq_shift must be 0 (DiT) or 1 (diffusers), got {freq_shift}")
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000, freq_shift: int = 0):
        """(N,) possibly fractional timesteps -> (N, dim) [cos | sin] features, frequencies from 1 down to
        1/max_period (reached with freq_shift=1; 1/max_period^((half-1)/half) with 0), computed in fp32."""
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - freq_shift))
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D). Row ``num_classes`` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def null_class(self) -> int:
        return self.num_classes

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null class with probability ``dropout_prob`` (or where force_drop_ids == 1)."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.null_class), labels)

    def forward(self, labels, train: bool, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention on (N, T, D) through PyTorch's fused scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                   # each (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


def dense_mlp(hidden_size: int, mlp_ratio: float = 4.0) -> nn.Module:
    """DiT's MLP: Linear -> GELU(tanh) -> Linear with hidden width mlp_ratio * D."""
    approx_gelu = lambda: nn.GELU(approximate="tanh")  # noqa: E731
    return Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=approx_gelu, drop=0)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning: six modulation vectors from c, gates initialised to zero."""

    def __init__(self, hidden_size: int, num_heads: int, mlp: nn.Module, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = mlp
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patches of the output channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    forward(x, t, y): x (N, C, H, W) noisy latents, t (N,) timesteps, y (N,) labels in [0, num_classes]
    (num_classes = null class) -> (N, C_out, H, W) with C_out = 2C when learn_sigma (epsilon | variance).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        mlp_factory: Optional[Callable[[int], nn.Module]] = None,
        grad_checkpointing: bool = False,
        timestep_freq_shift: int = 0,
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding: a buffer, rebuilt from the geometry, so it is not trained nor stored.
        pos = get_2d_sincos_pos_embed(hidden_size, int(num_patches ** 0.5))
        self.register_buffer("pos_embed", torch.tensor(pos, dtype=torch.float32).unsqueeze(0), persistent=False)

        if mlp_factory is None:
            mlp_factory = lambda i: dense_mlp(hidden_size, mlp_ratio)  # noqa: E731
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_factory(i), mlp_norm_eps) for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Patch embedding as a linear layer (xavier on the flattened kernel).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity function.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            if hasattr(block.mlp, "init_weights"):
                block.mlp.init_weights()

        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, force_drop_ids=None):
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)          # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x, c)                                    # (N, T, p*p*C_out)
        return self.unpatchify(x)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guidance_channels: Optional[int] = None):
        """Classifier-free guidance: out = out_null + s * (out_cond - out_null), in ONE batched forward.

        The same combination for an epsilon (DDPM) and a velocity (flow) prediction. Guidance applies to all latent
        channels by default. ``guidance_channels=3`` reproduces DiT's legacy sampler (guidance on the first three of
        four channels, a GLIDE leftover) for parity with published numbers. Channels not guided, and the
        learned-variance channels, take the conditional prediction. ``cfg_scale == 1`` runs the conditional half
        only; the sampling loop (dit_moe/sampling/loop.py) passes 1 outside the guidance interval.
        """
        if cfg_scale == 1.0:
            return self.forward(x, t, y)
        g = self.in_channels if guidance_channels is None else guidance_channels
        if not 0 < g <= self.in_channels:
            raise ValueError(f"guidance_channels={guidance_channels} must be in [1, {self.in_channels}]")
        y_null = torch.full_like(y, self.y_embedder.null_class)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        cond, uncond = out.chunk(2)
        guided = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=1)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim): half the channels encode the row, half the column (MAE's construction)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)                                 # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    if embed_dim % 2:
        raise ValueError(f"positional embedding dimension {embed_dim} must be even")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega                                       # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)                 # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)          # (M, D)
