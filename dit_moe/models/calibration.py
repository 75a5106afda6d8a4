"""The one threshold calibrator: bisect a model's top-p threshold(s) so that given inputs activate K experts per token.

Serves both uses of a calibrated threshold:
  * DTop-p inference-time sparsity (``sample.py --target-experts``; ``dit_moe.sampling.calibrate_threshold``): the
    controller's threshold, on the model's own sampling trajectory;
  * the routing study's calibrated fixed Top-p arm (``dit_moe.study.probe.calibrate_topp_threshold``): the
    fixed threshold of every Top-p router, on fixed noisy training inputs.

The caller supplies ``replay()``, which runs the model on its calibration inputs; the activated experts are read by a
``RoutingTap`` (the same numbers every report uses). Activated experts grow with p (a token keeps experts while the
mass before them is below p), so bisection on [lo, hi] converges. lo > 0: p = 0 would keep only the first expert.
Global scope: one p for every layer, matched on the mean over layers. Layer scope: each layer's p in turn, front to
back (layer l only sees the thresholds of layers < l, so one sweep is exact).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from .routers import DTopPRouter, TopPRouter
from .routing_tap import RoutingTap

__all__ = ["Thresholds", "bisect", "calibrate_thresholds"]


class Thresholds:
    """The top-p thresholds a model's routers read, as one vector: DTop-p's controller buffer ((1,) global or
    (L,) layer scope), or the ``threshold`` of each fixed Top-p router (scope global: one value for all)."""

    def __init__(self, model: nn.Module, scope: Optional[str] = None):
        routers = [m for m in model.modules() if isinstance(m, (TopPRouter, DTopPRouter))]
        if not routers:
            name = getattr(getattr(model, "model_config", None), "name", type(model).__name__)
            raise ValueError(f"{name} has no threshold routers (routing.type topp or dtopp): nothing to calibrate")
        self.routers = routers
        self.kind = "dtopp" if isinstance(routers[0], DTopPRouter) else "topp"
        if self.kind == "dtopp":
            self.buffer = routers[0].controller.threshold
            own = "global" if self.buffer.numel() == 1 else "layer"
            if scope not in (None, own):
                raise ValueError(f"the DTop-p controller has scope {own}; cannot calibrate with scope {scope}")
            self.scope = own
        else:
            self.scope = scope or "global"
            if self.scope not in ("global", "layer"):
                raise ValueError(f"calibration scope={self.scope!r} must be 'global' or 'layer'")

    @property
    def size(self) -> int:
        return 1 if self.scope == "global" else len(self.routers)

    def get(self) -> torch.Tensor:
        if self.kind == "dtopp":
            return self.buffer.detach().to("cpu", torch.float64).clone()
        values = torch.tensor([r.threshold for r in self.routers], dtype=torch.float64)
        return values[:1] if self.scope == "global" else values

    def set(self, values: torch.Tensor) -> None:
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if self.kind == "dtopp":
            self.buffer.copy_(values.to(self.buffer.device, self.buffer.dtype).expand_as(self.buffer))
            return
        for i, r in enumerate(self.routers):
            r.threshold = float(values[0 if values.numel() == 1 else i])


def bisect(f: Callable[[float], float], target: float, iters: int = 30, tol: float = 1e-3, lo: float = 1e-6,
           hi: float = 1.0) -> tuple[float, float]:
    """p in [lo, hi] whose f(p) (non-decreasing in p) is closest to ``target``; returns (p, f(p)).

    Raises ValueError when the target lies outside [f(lo), f(hi)] (beyond ``tol``). Stops once |f(p) - target| <= tol.
    """
    f_lo, f_hi = f(lo), f(hi)
    if not f_lo - tol <= target <= f_hi + tol:
        raise ValueError(f"target {target} experts per token is not reachable: thresholds in [{lo}, {hi}] "
                         f"give {f_lo:.3f} .. {f_hi:.3f} experts")
    best = min(((lo, f_lo), (hi, f_hi)), key=lambda pf: abs(pf[1] - target))
    for _ in range(iters):
        if abs(best[1] - target) <= tol:
            break
        mid = 0.5 * (lo + hi)
        f_mid = f(mid)
        if abs(f_mid - target) < abs(best[1] - target):
            best = (mid, f_mid)
        lo, hi = (mid, hi) if f_mid < target else (lo, mid)
    return best


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, replay: Callable[[], None], target: float, *, scope: Optional[str] = None,
                         iters: int = 30, tol: float = 1e-3, lo: float = 1e-6, hi: float = 1.0,
                         restore: bool = False) -> dict:
    """Set the model's threshold(s) so that ``replay()`` activates ``target`` experts per token on average.

    The model runs in eval mode (its training flag is restored). ``restore``: put the original thresholds back
    afterwards (the result says what was found); otherwise the calibrated ones stay set. Returns {target, scope,
    kind, threshold (list), measured (mean over tokens and layers), per_layer, std (over (token, layer) pairs),
    tokens}.
    """
    handle = Thresholds(model, scope)
    num_experts = handle.routers[0].num_experts
    if not 1 <= target <= num_experts:
        raise ValueError(f"target_experts={target} must be in [1, {num_experts}] (the model has {num_experts} experts)")
    original = handle.get()
    tap = RoutingTap(model, buckets=1)
    was_training = model.training
    model.eval()

    def measure() -> dict:
        tap.reset()
        with tap:
            replay()
        return tap.report()

    try:
        values = original.clone() if original.numel() == handle.size else original[:1].repeat(handle.size)
        for slot in range(handle.size):
            def f(p: float, slot=slot) -> float:
                values[slot] = p
                handle.set(values)
                report = measure()
                return report["mean"] if handle.scope == "global" else report["per_layer"][slot]
            values[slot], _ = bisect(f, float(target), iters, tol, lo, hi)
        handle.set(values)
        found = handle.get().tolist()             # as the routers hold it (DTop-p: the fp32 buffer)
        report = measure()
    finally:
        if restore:
            handle.set(original)
        model.train(was_training)
    return {"target": float(target), "scope": handle.scope, "kind": handle.kind,
            "threshold": found,
            "measured": report["mean"], "per_layer": report["per_layer"], "std": report["std"],
            "tokens": report["tokens"]}
