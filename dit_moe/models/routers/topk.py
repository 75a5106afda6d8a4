"""Top-k routing as in DiT-MoE: softmax over all experts, then the k largest; weights not renormalised by default."""
from __future__ import annotations

import torch

from .base import Router, RouterOutput


class TopKRouter(Router):
    """Every token activates exactly ``top_k`` experts; Switch-style load balance (DiT-MoE: coefficient 0.01).

    The number of pairs is static (N k), so ``route`` lists them without any device-to-host synchronisation.
    With a balance bias the k experts are the largest pi + b (DeepSeek-V3, torchtitan); their weights are pi.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool = False, lb_coef: float = 0.01,
                 entropy_coef: float = 0.0, lb_global: bool = False, balance_bias: bool = False,
                 bias_rate: float = 1e-3):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        super().__init__(dim, num_experts, renormalize, lb_coef, entropy_coef, lb_global, balance_bias, bias_rate)
        self.top_k = top_k

    def _topk(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights pi (N, k), expert indices (N, k)) of the k best selection scores."""
        scores = self.selection_scores(probs)
        if scores is None:
            return probs.topk(self.top_k, dim=1)
        idx = scores.topk(self.top_k, dim=1).indices
        return probs.gather(1, idx), idx

    def select(self, probs: torch.Tensor, samples: int = 1):
        """(N, E) -> mask with exactly top_k True per row."""
        idx = self._topk(probs)[1]
        return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True), None

    def route(self, probs: torch.Tensor, samples: int = 1) -> RouterOutput:
        weights, idx = self._topk(probs)                                           # (N, k) each
        if self.renormalize:
            weights = weights / weights.sum(1, keepdim=True)
        return RouterOutput.from_topk(idx, weights, probs)

    def extra_repr(self) -> str:
        bias = f", balance_bias(rate={self.bias_rate})" if self.balance_bias is not None else ""
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"renormalize={self.renormalize}{bias}")
