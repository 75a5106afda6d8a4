"""Activated experts while sampling: a meter on the routers of an MoE model, and its report.

Counts routed experts per token, per MoE layer and per timestep bucket, via router forward hooks. Under CFG every
routed token counts (conditional and null-class halves): that is the compute actually spent; calls outside the
guidance interval route the conditional half only. Buckets are on the network's timestep scale, 0 .. 1000 for both
objectives (ddpm: the integer timestep, flow: 1000 t; see dit_moe/diffusion/__init__.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .settings import SamplingError
from .solvers import SCHEDULE

__all__ = ["ActiveExpertMeter", "summarize_active", "format_active", "has_routers"]


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from ..models.routers.base import Router

    return [m for m in model.modules() if isinstance(m, Router)]


class ActiveExpertMeter:
    """Counts routed experts activated per token, per MoE layer and per timestep bucket, via router forward hooks.

    Use as a context manager around sampling; ``set_timestep(t)`` before each model call picks the bucket
    (bucket b covers training timesteps [b T / B, (b + 1) T / B)). Under CFG both halves of the batch count:
    that is the compute actually spent. Sums stay on the model's device (no host sync per layer).
    """

    def __init__(self, model: torch.nn.Module, num_buckets: int = 10):
        self.routers = _routers(model)
        if not self.routers:
            raise SamplingError("ActiveExpertMeter: the model has no routers (a dense model activates no experts)")
        device = next(model.parameters()).device
        L = len(self.routers)
        self.num_buckets = num_buckets
        self.sums = torch.zeros(num_buckets, L, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(num_buckets, L, dtype=torch.float64, device=device)
        self.bucket = 0
        self._handles = []

    def set_timestep(self, t: int) -> None:
        T = SCHEDULE["num_train_timesteps"]
        self.bucket = min(self.num_buckets - 1, max(0, int(t) * self.num_buckets // T))

    def reset(self) -> None:
        self.sums.zero_()
        self.tokens.zero_()

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            n = getattr(output, "num_active", None)
            if n is None:
                raise SamplingError(f"router {type(module).__name__} returned no num_active; cannot count experts")
            self.sums[self.bucket, layer] += n.detach().to(torch.float64).sum()
            self.tokens[self.bucket, layer] += n.numel()
        return hook

    def __enter__(self):
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def per_layer(self) -> torch.Tensor:
        """Mean activated experts per token of each layer over all buckets seen, (L,)."""
        return (self.sums.sum(0) / self.tokens.sum(0).clamp(min=1)).cpu()

    def state(self) -> dict:
        return {"num_buckets": self.num_buckets, "sums": self.sums.cpu().tolist(), "tokens": self.tokens.cpu().tolist()}

    def load_state(self, state: dict) -> None:
        sums = torch.tensor(state["sums"], dtype=torch.float64)
        if state.get("num_buckets") != self.num_buckets or sums.shape != self.sums.shape:
            raise SamplingError(f"activated-expert statistics of shape {tuple(sums.shape)} do not fit "
                                f"{self.num_buckets} buckets x {self.sums.shape[1]} layers")
        self.sums.copy_(sums)
        self.tokens.copy_(torch.tensor(state["tokens"], dtype=torch.float64))


def summarize_active(states: Sequence[dict]) -> Optional[dict]:
    """Merge meter states (one per process) into a report: mean activated experts per bucket, per layer, overall."""
    states = [s for s in states if s]
    if not states:
        return None
    sums = sum(torch.tensor(s["sums"], dtype=torch.float64) for s in states)
    tokens = sum(torch.tensor(s["tokens"], dtype=torch.float64) for s in states)
    B = sums.shape[0]
    T = SCHEDULE["num_train_timesteps"]
    per_bucket = (sums.sum(1) / tokens.sum(1).clamp(min=1)).tolist()
    return {
        "mean": float(sums.sum() / tokens.sum().clamp(min=1)),
        "per_layer": (sums.sum(0) / tokens.sum(0).clamp(min=1)).tolist(),
        "timestep_buckets": [[b * T // B, (b + 1) * T // B - 1] for b in range(B)],
        "per_bucket": [v if tokens[b].sum() > 0 else None for b, v in enumerate(per_bucket)],
        "tokens": float(tokens.sum()),
    }


def format_active(report: Optional[dict]) -> str:
    if not report:
        return ""
    lines = [f"activated experts per token: mean {report['mean']:.3f}; per layer "
             + " ".join(f"{v:.2f}" for v in report["per_layer"])]
    for (lo, hi), v in zip(report["timestep_buckets"], report["per_bucket"]):
        if v is not None:
            lines.append(f"  t in [{lo:4d}, {hi:4d}]: {v:.3f}")
    return "\n".join(lines)


def has_routers(model: torch.nn.Module) -> bool:
    return bool(_routers(model))
