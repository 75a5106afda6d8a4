"""The one interface every router implements, and the pieces routers share.

A router maps N tokens (N, D) to a flat list of M (token, expert, weight) pairs; M varies for threshold routers.
The MoE block dispatches those pairs without knowing which router made them. Every router builds its pairs from
a selection mask (N, E) and a combine-weight matrix (N, E) through ``RouterOutput.from_mask``, which lists them
sorted by expert (token order within an expert), so the dispatcher needs no sort of its own.

Router math runs in fp32 with autocast disabled: the gate W (E, D) is an fp32 parameter and the tokens are cast up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RouterOutput:
    token_idx: torch.Tensor    # (M,) long: which token each pair belongs to, pairs sorted by expert
    expert_idx: torch.Tensor   # (M,) long: which routed expert (non-decreasing)
    weight: torch.Tensor       # (M,) fp32 combine weight
    probs: torch.Tensor        # (N, E) fp32 full router probabilities (aux losses, Default MoE)
    mask: torch.Tensor         # (N, E) bool selection mask
    aux_loss: torch.Tensor     # () fp32, coefficients already applied (0 when unused)
    num_active: torch.Tensor   # (N,) long experts per token, for statistics and the DTop-p controller
    counts: torch.Tensor       # (E,) long tokens per expert (device)
    sizes: tuple[int, ...]     # the same counts on the host: the dispatcher's segment sizes (one sync per layer)
    aux_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # separate weighted aux terms, for logging
    capped: torch.Tensor | None = None  # (N,) bool: tokens whose selection the k_max cap shortened

    @classmethod
    def from_mask(cls, mask: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor, **kw) -> "RouterOutput":
        """Flatten a selection mask (N, E) and a weight matrix (N, E) into expert-sorted pairs.

        The per-expert counts are read to the host once; ``nonzero_static`` on the transposed mask then yields the
        pairs already grouped by expert without a second synchronisation.
        """
        counts = mask.sum(0)                                          # (E,)
        sizes = tuple(counts.tolist())
        pairs = torch.nonzero_static(mask.t(), size=sum(sizes))       # (M, 2) rows (expert, token), expert-major
        expert_idx, token_idx = pairs.unbind(1)
        return cls(token_idx=token_idx, expert_idx=expert_idx, weight=weights[token_idx, expert_idx], probs=probs,
                   mask=mask, num_active=mask.sum(1), counts=counts, sizes=sizes, **kw)


def load_balance_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch / DiT-MoE load balance: E * sum_i f_i * P_i with f_i = count_i / sum(count) and P_i = mean_t pi_ti.

    ``counts`` (E,) counts (token, expert) assignments, so f_i = E count_i / sum_t m_t also holds when the number of
    experts per token varies (routing-spec 3.6). It is a constant: the gradient flows through P only. Equals 1 under
    perfect balance; the caller applies the coefficient.
    """
    num_experts = probs.shape[1]
    f = counts.float() / counts.sum().clamp(min=1)
    return num_experts * (f * probs.mean(0)).sum()


def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the router entropy -sum_e pi log pi (nats), (N, E) -> ()."""
    return -(probs * probs.clamp(min=1e-20).log()).sum(1).mean()


def top_p_mask(probs: torch.Tensor, threshold: torch.Tensor | float, k_max: int | None = None):
    """Smallest prefix of the descending probabilities whose mass reaches ``threshold``.

    Expert of rank j is kept when the mass of the ranks before it is still below the threshold, so the first expert
    is always kept (its exclusive cumsum is 0) and the crossing expert is included. ``threshold`` may be a tensor
    broadcastable to (N, 1). ``k_max`` caps the count. Returns (mask (N, E) bool, capped (N,) bool).
    """
    sorted_probs, order = probs.sort(dim=1, descending=True)
    before = sorted_probs.cumsum(1) - sorted_probs                    # exclusive cumsum (N, E)
    keep = before < threshold
    keep[:, 0] = True          # also at p = 0 and for non-finite probabilities: never a token without an expert
    capped = torch.zeros_like(keep[:, 0])
    if k_max is not None:
        capped = keep[:, k_max:].any(1) if k_max < keep.shape[1] else capped
        keep[:, k_max:] = False
    mask = torch.zeros_like(keep).scatter_(1, order, keep)
    return mask, capped


class Router(nn.Module):
    """Base class: the gate W (E, D) in fp32, combine weights and the shared aux losses.

    Subclasses implement ``probs(logits) -> (N, E)`` and ``select(probs) -> (mask (N, E) bool, capped (N,) bool|None)``.
    Combine weights are the selected probabilities, renormalised over the selection when ``renormalize``.
    """

    def __init__(self, dim: int, num_experts: int, renormalize: bool = False, lb_coef: float = 0.0,
                 entropy_coef: float = 0.0, lb_global: bool = False):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.dim = dim
        self.num_experts = num_experts
        self.renormalize = renormalize
        self.lb_coef = lb_coef
        self.entropy_coef = entropy_coef
        self.lb_global = lb_global
        self.weight = nn.Parameter(torch.empty(num_experts, dim, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DiT-MoE's gate init (the default nn.Linear init); a bare parameter, so DiT's xavier sweep does not reach it.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, E) logits in fp32 (fp64 if the model was cast to it); the caller has disabled autocast."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return F.linear(x.to(dtype), self.weight.to(dtype))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=1)

    def select(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def aux_losses(self, probs: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted auxiliary terms (only those with a non-zero coefficient)."""
        terms = {}
        if self.lb_coef:
            if self.lb_global and dist.is_available() and dist.is_initialized():
                # Global-batch load fractions; the counts are constants, so the all-reduce needs no autograd.
                counts = counts.float()
                dist.all_reduce(counts)
            terms["lb"] = self.lb_coef * load_balance_loss(probs, counts)
        if self.entropy_coef:
            terms["entropy"] = self.entropy_coef * mean_entropy(probs)
        return terms

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """(N, D) tokens -> RouterOutput with expert-sorted pairs; aux losses are computed in training only."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs = self.probs(self.logits(x))
            mask, capped = self.select(probs)
            weights = probs * mask
            if self.renormalize:
                weights = weights / weights.sum(1, keepdim=True)
            out = RouterOutput.from_mask(mask, weights, probs, aux_loss=probs.new_zeros(()), capped=capped)
            if self.training:
                out.aux_terms = self.aux_losses(probs, out.counts)
                if out.aux_terms:
                    out.aux_loss = sum(out.aux_terms.values())
        return out
