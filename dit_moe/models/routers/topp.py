"""Fixed-threshold top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts")."""
from __future__ import annotations

import torch

from .base import Router, top_p_mask


class TopPRouter(Router):
    """Each token takes the smallest set of most probable experts whose mass reaches ``threshold`` (>= 1 expert).

    Published defaults: p = 0.4, raw softmax weights; an entropy ("dynamic") loss keeps the router from buying
    experts by flattening its distribution. ``k_max`` optionally caps the experts per token.
    With a balance bias the experts are ranked by pi + b and the prefix grows until its (unbiased) mass reaches p:
    a raised bias moves an expert up the order, so it is taken more often, and the count per token may change.
    """

    def __init__(self, dim: int, num_experts: int, threshold: float = 0.4, k_max: int | None = None,
                 renormalize: bool = False, lb_coef: float = 0.01, entropy_coef: float = 0.0, lb_global: bool = False,
                 balance_bias: bool = False, bias_rate: float = 1e-3):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"top-p threshold={threshold} must be in (0, 1]")
        if k_max is not None and not 1 <= k_max <= num_experts:
            raise ValueError(f"k_max={k_max} must be in [1, num_experts={num_experts}]")
        super().__init__(dim, num_experts, renormalize, lb_coef, entropy_coef, lb_global, balance_bias, bias_rate)
        self.threshold = threshold
        self.k_max = k_max

    def select(self, probs: torch.Tensor, samples: int = 1):
        return top_p_mask(probs, self.threshold, self.k_max, self.selection_scores(probs))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, threshold={self.threshold}, k_max={self.k_max}"
