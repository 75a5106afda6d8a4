"""The one interface every router implements, and the pieces routers share.

A router maps N tokens (N, D) to a flat list of M (token, expert, weight) pairs sorted by expert (token order within
an expert), so the MoE block dispatches them without a sort of its own and without knowing which router made them.
Two constructors build that list, and they differ in what they cost on a GPU:

    RouterOutput.from_topk(idx (N, k), ...)   M = N k is static: a stable argsort of the flattened expert indices
                                              gives the expert-sorted pairs; no device-to-host synchronisation.
    RouterOutput.from_mask(mask (N, E), ...)  M varies (threshold routers): M is read to the host once per call
                                              (the one synchronisation), then ``nonzero_static`` lists the pairs.

    RouterOutput.from_expert_choice(tok (E, C))  M = E C is static (expert choice: each expert lists its C tokens,
                                              already expert-major); no synchronisation either.

Per-expert counts stay on the device (``counts``; the grouped matmul's offsets are their cumsum); ``sizes`` copies
them to the host only when the CPU segment loop asks for them.

Aux-loss-free balancing (DeepSeek-V3; ``balance_bias=True``): a per-expert bias b (E,) is added to the SELECTION
scores only (``selection_scores``: Top-k ranks pi + b, the threshold routers sort by pi + b and accumulate the
unbiased mass pi in that order); ``probs`` (combine weights, aux losses, Default MoE) stay the unbiased softmax.
b is a persistent buffer moved once per optimizer step by ``update_balance_bias`` from all-reduced counts.

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
    num_active: torch.Tensor   # (N,) long experts per token, for statistics and the DTop-p controller
    counts: torch.Tensor       # (E,) long tokens per expert, on the device
    aux_loss: torch.Tensor | None = None   # () fp32, coefficients already applied (0 when unused); set by Router
    aux_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # separate weighted aux terms, for logging
    capped: torch.Tensor | None = None     # (N,) bool: tokens whose selection the k_max cap shortened
    logits: torch.Tensor | None = None     # (N, E) fp32 raw router logits (before any normalisation)
    samples: int = 1                       # the N tokens are ``samples`` consecutive runs of N / samples (images)
    _sizes: tuple[int, ...] | None = field(default=None, repr=False)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Per-expert segment sizes on the host: a device-to-host copy, made once. Only the CPU segment loop (and
        tests) need it; the grouped-matmul path reads ``counts`` on the device."""
        if self._sizes is None:
            self._sizes = tuple(self.counts.tolist())
        return self._sizes

    @classmethod
    def from_topk(cls, idx: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor, **kw) -> "RouterOutput":
        """Pairs from a fixed number of experts per token: idx (N, k) long, weights (N, k). No host sync.

        Pair j of the flattened (N k,) lists is (token j // k, expert idx.flat[j]); a stable sort by expert keeps
        token order within each expert, i.e. exactly the order ``from_mask`` gives for the same selection.
        """
        N, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)
        return cls(token_idx=order.div(k, rounding_mode="floor"), expert_idx=flat.index_select(0, order),
                   weight=weights.reshape(-1).index_select(0, order), probs=probs, mask=mask,
                   num_active=torch.full((N,), k, dtype=torch.long, device=idx.device), counts=mask.sum(0), **kw)

    @classmethod
    def from_expert_choice(cls, tok: torch.Tensor, probs: torch.Tensor, renormalize: bool = False,
                           **kw) -> "RouterOutput":
        """Pairs from expert choice: tok (E, C) long, row e the distinct tokens expert e takes, ascending. No host sync.

        Weights are the raw probabilities pi[t, e] of the pairs (``renormalize``: divided by the token's selected
        mass). A token no expert took has no pair: its routed output is zero.
        """
        E, C = tok.shape
        N = probs.shape[0]
        token_idx = tok.reshape(-1)
        expert_idx = torch.arange(E, device=tok.device).unsqueeze(1).expand(E, C).reshape(-1)
        flat_idx = token_idx * E + expert_idx
        mask = torch.zeros(N * E, dtype=torch.bool, device=tok.device).index_fill_(0, flat_idx, True).view(N, E)
        weight = probs.reshape(-1).index_select(0, flat_idx)
        if renormalize:
            weight = weight / (probs * mask).sum(1).index_select(0, token_idx)
        return cls(token_idx=token_idx, expert_idx=expert_idx, weight=weight, probs=probs, mask=mask,
                   num_active=mask.sum(1), counts=torch.full((E,), C, dtype=torch.long, device=tok.device), **kw)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor, **kw) -> "RouterOutput":
        """Pairs from a selection mask (N, E) and a weight matrix (N, E), for a variable number of experts per token.

        The number of pairs M is data-dependent and ``nonzero_static`` needs it as a Python int: this host read is
        the one synchronisation per call (per MoE layer), unavoidable without padding every token to E experts.
        ``nonzero_static`` on the transposed mask then yields the pairs already grouped by expert.
        """
        counts = mask.sum(0)                                                          # (E,)
        num_pairs = int(counts.sum())                                                 # the one host sync
        pairs = torch.nonzero_static(mask.t(), size=num_pairs)                        # (M, 2) rows (expert, token)
        expert_idx, token_idx = pairs.unbind(1)
        flat_idx = token_idx * mask.shape[1] + expert_idx
        return cls(token_idx=token_idx, expert_idx=expert_idx, weight=weights.reshape(-1).index_select(0, flat_idx),
                   probs=probs, mask=mask, num_active=mask.sum(1), counts=counts, **kw)


def load_balance_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch / DiT-MoE load balance: E * sum_i f_i * P_i with f_i = count_i / sum(count) and P_i = mean_t pi_ti.

    ``counts`` (E,) counts (token, expert) assignments, so f_i = E count_i / sum_t m_t also holds when the number of
    experts per token varies (the natural extension to top-p routing). It is a constant: the gradient flows through
    P only. Equals 1 under perfect balance; the caller applies the coefficient.
    """
    num_experts = probs.shape[1]
    f = counts.float() / counts.sum().clamp(min=1)
    return num_experts * (f * probs.mean(0)).sum()


def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the router entropy -sum_e pi log pi (nats), (N, E) -> ()."""
    return -(probs * probs.clamp(min=1e-20).log()).sum(1).mean()


def top_p_mask(probs: torch.Tensor, threshold: torch.Tensor | float, k_max: int | None = None,
               scores: torch.Tensor | None = None):
    """Smallest prefix of the descending probabilities whose mass reaches ``threshold``.

    Expert of rank j is kept when the mass of the ranks before it is still below the threshold, so the first expert
    is always kept (its exclusive cumsum is 0) and the crossing expert is included. ``threshold`` may be a tensor
    broadcastable to (N, 1). ``k_max`` caps the count. ``scores`` (N, E), when given, sets the order instead of the
    probabilities (a balance bias), the mass accumulated along it is still that of ``probs``.
    Returns (mask (N, E) bool, capped (N,) bool).
    """
    if scores is None:
        sorted_probs, order = probs.sort(dim=1, descending=True)
    else:
        order = scores.argsort(dim=1, descending=True)
        sorted_probs = probs.gather(1, order)
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

    Subclasses implement ``select(probs, samples) -> (mask (N, E) bool, capped (N,) bool | None)``, and may override
    ``route(probs, samples) -> RouterOutput`` when they can list their pairs more cheaply than from a mask (Top-k
    and expert choice do). ``samples``: the N tokens are that many images of N / samples tokens (expert choice pools
    per image). ``probs(logits)`` is the softmax unless overridden (DTop-p normalises first).
    Combine weights are the selected probabilities, renormalised over the selection when ``renormalize``.
    ``balance_bias``: keep the aux-loss-free bias (buffer ``balance_bias`` (E,), moved by ``bias_rate`` per step).
    """

    def __init__(self, dim: int, num_experts: int, renormalize: bool = False, lb_coef: float = 0.0,
                 entropy_coef: float = 0.0, lb_global: bool = False, balance_bias: bool = False,
                 bias_rate: float = 1e-3):
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
        if balance_bias and not bias_rate > 0:
            raise ValueError(f"routing.bias_rate={bias_rate} must be > 0")
        self.bias_rate = bias_rate
        # Persistent (checkpoints, EMA copies); absent (None) without balancing, so older checkpoints keep their keys.
        self.register_buffer("balance_bias", torch.zeros(num_experts) if balance_bias else None)
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

    def selection_scores(self, probs: torch.Tensor) -> torch.Tensor | None:
        """(N, E) scores that order the experts for selection: pi + b with a balance bias, else None (pi itself)."""
        return None if self.balance_bias is None else probs + self.balance_bias.to(probs.dtype)

    @torch.no_grad()
    def update_balance_bias(self, counts: torch.Tensor) -> None:
        """b_i <- b_i + rate * sign(mean_j c_j - c_i) from this step's (token, expert) counts (E,), already summed
        over micro-batches and ranks (so every rank applies the same step). Called by ``routing_step``; no-op
        without a bias. All-zero counts (nothing routed) leave b unchanged (sign 0)."""
        if self.balance_bias is None:
            return
        load = counts.to(self.balance_bias.dtype)
        self.balance_bias.add_(self.bias_rate * torch.sign(load.mean() - load))

    def select(self, probs: torch.Tensor, samples: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def route(self, probs: torch.Tensor, samples: int = 1) -> RouterOutput:
        """(N, E) probabilities -> RouterOutput (pairs, mask, counts): select, weight, list the pairs."""
        mask, capped = self.select(probs, samples)
        weights = probs * mask
        if self.renormalize:
            weights = weights / weights.sum(1, keepdim=True)
        return RouterOutput.from_mask(mask, weights, probs, capped=capped)

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

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) tokens -> (logits (N, E), probs (N, E)) in fp32, autocast off: the dense, static-shape part of
        routing, which ``MoEMLP`` computes inside the compiled block (torch.compile traces it) and hands to forward."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.logits(x)
            return logits, self.probs(logits)

    def forward(self, x: torch.Tensor, samples: int = 1,
                scores: tuple[torch.Tensor, torch.Tensor] | None = None) -> RouterOutput:
        """(N, D) tokens of ``samples`` images -> RouterOutput with expert-sorted pairs; aux losses in training only.

        ``scores``: ``self.scores(x)`` when the caller has computed it already (MoEMLP, so that it is compiled)."""
        if samples < 1 or x.shape[0] % samples:
            raise ValueError(f"{x.shape[0]} tokens cannot be {samples} samples of equal length")
        logits, probs = self.scores(x) if scores is None else scores
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.route(probs, samples)
            out.logits, out.samples = logits, samples
            out.aux_loss = probs.new_zeros(())
            if self.training:
                out.aux_terms = self.aux_losses(probs, out.counts)
                if out.aux_terms:
                    out.aux_loss = sum(out.aux_terms.values())
        return out
