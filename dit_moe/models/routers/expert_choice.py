"""Expert-choice routing (Zhou et al. 2022; EC-DiT, Sun et al. 2024): each expert takes its top-C tokens.

Each expert e ranks the tokens of a pool by its router probability pi[t, e] (softmax over experts, fp32) and takes
the C best; a token may so be taken by 0 .. E experts. With ``capacity_factor`` f and the model name's K:

    C = floor(f * n * K / E)   (at least 1, at most n),   n = the tokens of one pool

so that f = 1 spends exactly the compute of Top-K on average. Combine weights are the raw pi[t, e] of the pairs (as
DiffMoE's and ProMoE's code), renormalised over the token's experts with ``renormalize``. A token no expert took
gets a zero routed output (the block's residual, plus any shared experts and the Default MoE term): the fraction
of such tokens is logged (``unrouted_frac``), and the mean experts per token is ``mean_active``.

The pool -- the confusion of DiffMoE issue #6:
  ``sample``  the T tokens of one image (C = f T K / E per image). What the "EC-DiT" baselines shipped with the
              DiffMoE and ProMoE code do (``models_ECDiT.py``: top-k over each sample's tokens). Every image gets the
              same compute and its routing depends on that image alone.
  ``batch``   all B T tokens of the (local, per-rank, per-micro-batch) batch, C = f B T K / E. EC-DiT's paper and
              Zhou et al. as users read them (issue #6), and DiffMoE's own batch-level pool. Images compete for
              capacity, so an image's routing depends on the others in its batch.

Sampling. With ``batch`` pooling the samples of a batch are not independent: the batch size, which samples share
a batch, and classifier-free guidance (whose null-class copies join the pool and compete with the conditional
copies for capacity, doubling it) all change the routing and hence the images; an image drawn alone differs from
the same seed drawn in a batch of 32. ``sample`` pooling is deterministic per sample: the conditional and null
copies are separate pools, and an image is the same at any batch size, in any batch, on any number of processes.
``eval_pool`` (``routing.ec_eval_pool``) sets the pool for eval-mode forwards (sampling, the EMA model); by default
the training pool. A batch-trained model sampled with ``sample`` is deterministic per sample at the price of a
train/test mismatch (per-image capacity instead of the batch's).

Selection is static (M = E C pairs, a top-k per expert): no host synchronisation, like Top-k. The load is balanced
by construction (every expert takes C tokens), so neither a load-balance loss (its gradient vanishes: all counts are
equal) nor a balance bias is used.
"""
from __future__ import annotations

import math

import torch

from .base import Router, RouterOutput

POOLS = ("sample", "batch")


def expert_capacity(pool_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = floor(capacity_factor * pool_tokens * top_k / num_experts), clipped to [1, pool_tokens]."""
    c = math.floor(capacity_factor * pool_tokens * top_k / num_experts + 1e-9)
    return max(1, min(pool_tokens, c))


class ExpertChoiceRouter(Router):
    """Every expert takes its ``capacity`` best tokens of each pool (one image, or the whole batch)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, capacity_factor: float = 1.0, pool: str = "sample",
                 eval_pool: str | None = None, renormalize: bool = False, lb_coef: float = 0.0,
                 entropy_coef: float = 0.0, lb_global: bool = False):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if not 0 < capacity_factor <= num_experts / top_k:
            raise ValueError(f"capacity_factor={capacity_factor} must be in (0, E/K = {num_experts / top_k:g}]")
        for name, value in (("ec_pool", pool), ("ec_eval_pool", eval_pool)):
            if value is not None and value not in POOLS:
                raise ValueError(f"routing.{name}={value!r} must be one of {POOLS}")
        super().__init__(dim, num_experts, renormalize, lb_coef, entropy_coef, lb_global)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.pool = pool
        self.eval_pool = pool if eval_pool is None else eval_pool

    def current_pool(self) -> str:
        return self.pool if self.training else self.eval_pool

    def capacity(self, pool_tokens: int) -> int:
        return expert_capacity(pool_tokens, self.num_experts, self.top_k, self.capacity_factor)

    def choose(self, probs: torch.Tensor, samples: int = 1) -> torch.Tensor:
        """(N, E) probabilities of ``samples`` images -> (E, P C) token indices, row e ascending: expert e's tokens
        (P pools of C tokens each; P = samples for the per-sample pool, 1 for the batch)."""
        N, E = probs.shape
        P = samples if self.current_pool() == "sample" else 1
        n = N // P
        C = self.capacity(n)
        per_pool = probs.view(P, n, E).transpose(1, 2)                                     # (P, E, n)
        idx = per_pool.topk(C, dim=2).indices.sort(dim=2).values                           # (P, E, C) in-pool
        idx = idx + (torch.arange(P, device=probs.device) * n).view(P, 1, 1)               # global token index
        return idx.transpose(0, 1).reshape(E, P * C)

    def select(self, probs: torch.Tensor, samples: int = 1):
        tok = self.choose(probs, samples)
        E = probs.shape[1]
        experts = torch.arange(E, device=probs.device).unsqueeze(1).expand_as(tok)
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[tok.reshape(-1), experts.reshape(-1)] = True
        return mask, None

    def route(self, probs: torch.Tensor, samples: int = 1) -> RouterOutput:
        return RouterOutput.from_expert_choice(self.choose(probs, samples), probs, self.renormalize)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, pool={self.pool}, eval_pool={self.eval_pool}")
