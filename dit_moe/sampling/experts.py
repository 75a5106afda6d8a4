"""Activated experts while sampling: the report of a ``RoutingTap`` (dit_moe/models/routing_tap.py), and its text.

Sampling attaches a ``RoutingTap`` to the model (``bulk.sample_to_folder``, ``grid.sample_grid``): it counts routed
experts per token, per MoE layer and per timestep bucket. Under CFG every routed token counts (conditional and
null-class halves): that is the compute actually spent; calls outside the guidance interval route the conditional
half only. Buckets are on the network's timestep scale, 0 .. 1000 for both objectives (ddpm: the integer timestep,
flow: 1000 t; see dit_moe/diffusion/__init__.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.routers.base import Router
from ..models.routing_tap import RoutingTap, summarize
from .settings import SamplingError

__all__ = ["expert_tap", "summarize_active", "format_active", "has_routers"]

summarize_active = summarize     # merge per-process tap states into the report (samples.json "active_experts")


def has_routers(model: torch.nn.Module) -> bool:
    return any(isinstance(m, Router) for m in model.modules())


def expert_tap(model: torch.nn.Module, state: Optional[dict] = None, where: str = "") -> Optional[RoutingTap]:
    """A RoutingTap on ``model`` (None for a dense model), continuing from ``state`` (a saved ``tap.state()``)."""
    if not has_routers(model):
        return None
    tap = RoutingTap(model)
    if state is not None:
        try:
            tap.load_state(state)
        except ValueError as e:
            raise SamplingError(f"{where}: {e}; it was written by another version or model: delete it to resume "
                                "(the activated-expert report then covers the samples drawn from now on)") from e
    return tap


def format_active(report: Optional[dict]) -> str:
    if not report:
        return ""
    lines = [f"activated experts per token: mean {report['mean']:.3f}; per layer "
             + " ".join(f"{v:.2f}" for v in report["per_layer"])]
    if report.get("unrouted_frac"):
        lines[0] += f"; tokens no expert took {100 * report['unrouted_frac']:.1f}%"
    for (lo, hi), v in zip(report["timestep_buckets"], report["per_bucket"]):
        if v is not None:
            lines.append(f"  t in [{lo:4d}, {hi:4d}]: {v:.3f}")
    return "\n".join(lines)
