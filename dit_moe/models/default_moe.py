"""Default MoE (Panda et al. 2025, arXiv 2504.12463): a dense router gradient at almost no cost.

Every routed expert i keeps a default vector d_i (D,), an EMA of its output over the tokens routed to it, taken
from the per-expert outputs BEFORE they are weighted and aggregated. A token's output gains, for each expert it
did NOT activate, its raw router probability times that vector, added AFTER the scatter of the routed outputs:

    y_t = sum_{i in A_t} w_ti E_i(h_t) + sum_{i not in A_t} pi_ti d_i

The vectors are buffers (no gradient), so the router receives dL/dpi_ti = <dL/dy_t, d_i> for every expert.

Which mode is which:
  ``forward``    the published method: the default term is part of the layer's output in training and in
                 sampling, as in the authors' code (the MoE layer returns the scatter of the routed outputs plus
                 the default-vector term, the EMA fed by the un-aggregated expert outputs).
  ``grad_only``  our variant, after the authors' earlier (workshop) code, whose default added the approximation
                 as term - term.detach(): the output equals plain routing exactly and only the router gradient
                 changes, so enabling it never changes what a model samples; results measured with it say
                 nothing about the published method. ``forward`` is the default.
With renormalised routing (DTop-p) the routed weights already sum to 1 and the default term adds the raw
probabilities of the other experts on top (total weight > 1), as the formula reads; the paper uses raw Top-k.

The EMA is updated once per optimizer step from sums accumulated over every micro-batch and rank:
    d_i <- beta * d_i + (1 - beta) * (sum of E_i outputs) / count_i     (skipped when count_i = 0)
"""
from __future__ import annotations

import torch
import torch.nn as nn

MODES = ("grad_only", "forward")


class DefaultVectors(nn.Module):
    """Per-expert default vectors (E, D) in fp32, persistent buffers initialised to zero."""

    def __init__(self, num_experts: int, dim: int, beta: float = 0.99, mode: str = "forward"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Default MoE mode={mode!r} must be one of {MODES}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Default MoE beta={beta} must be in [0, 1)")
        self.num_experts, self.dim = num_experts, dim
        self.beta = beta
        self.mode = mode
        self.register_buffer("vectors", torch.zeros(num_experts, dim, dtype=torch.float32))

    def term(self, probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, E) raw router probabilities and selection mask -> (N, D) fp32 default contribution."""
        with torch.autocast(device_type=probs.device.type, enabled=False):
            term = (probs * ~mask).to(self.vectors.dtype) @ self.vectors
        return term - term.detach() if self.mode == "grad_only" else term

    @staticmethod
    def output_sums(expert_out: torch.Tensor, expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
        """(M, D) un-weighted expert outputs of the (token, expert) pairs -> (E, D) fp32 per-expert sums."""
        sums = expert_out.new_zeros(num_experts, expert_out.shape[1], dtype=torch.float32)
        return sums.index_add_(0, expert_idx, expert_out.detach().float())

    @torch.no_grad()
    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA step from (E, D) output sums and (E,) token counts, both already reduced over ranks."""
        mean = sums / counts.clamp(min=1).unsqueeze(1)
        new = self.beta * self.vectors + (1.0 - self.beta) * mean
        self.vectors.copy_(torch.where((counts > 0).unsqueeze(1), new, self.vectors))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, beta={self.beta}, mode={self.mode}"
