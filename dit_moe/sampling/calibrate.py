"""Inference-time sparsity for DTop-p models: set the top-p threshold so that sampling activates K experts per token.

The threshold is bisected on the model's own sampling trajectory (activated experts grow with p). This is the
calibration behind ``sample.py --target-experts``; the routing study calibrates fixed Top-p routers on training
inputs instead (``dit_moe.study.calibrate_topp_threshold``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..config import SampleConfig
from .experts import ActiveExpertMeter
from .loop import derive_seed, make_generators, make_labels, sample_latents
from .settings import SamplingError, guidance_scale, objective_for, resolve_settings
from .solvers import num_model_calls

__all__ = ["require_dtopp", "calibrate_threshold"]


def require_dtopp(model: torch.nn.Module, where: str = "model"):
    """The model's DTop-p controller, or a clear error naming what the model is instead."""
    routing = getattr(model, "routing_config", None)
    rtype = getattr(routing, "type", None)
    controller = getattr(model, "routing_controller", None)
    name = getattr(getattr(model, "model_config", None), "name", type(model).__name__)
    if rtype != "dtopp" or controller is None or not hasattr(controller, "threshold"):
        kind = "a dense model" if not getattr(getattr(model, "arch", None), "is_moe", False) else f"routing type {rtype!r}"
        raise SamplingError(f"{where}: --target-experts needs a DTop-p model (routing.type 'dtopp'); "
                            f"{name} is {kind}")
    return controller


@torch.no_grad()
def _measure(model, meter: ActiveExpertMeter, inputs, labels, settings: SampleConfig) -> torch.Tensor:
    """Mean activated experts per layer (L,) over recorded sampling inputs [(x_in, t, scale)], each model call with
    the guidance scale the sampler used for it."""
    meter.reset()
    with meter:
        for x_in, t, scale in inputs:
            tt = torch.full((x_in.shape[0],), t, dtype=torch.long if isinstance(t, int) else torch.float32,
                            device=x_in.device)
            model.forward_with_cfg(x_in, tt, labels, scale, settings.guidance_channels)
    return meter.per_layer()


def _bisect(f: Callable[[float], float], target: float, iters: int, tol: float = 1e-3,
            lo: float = 1e-6, hi: float = 1.0) -> tuple[float, float]:
    """p in [lo, hi] whose f(p) (non-decreasing in p) is closest to target; returns (p, f(p)).

    lo > 0: top-p keeps an expert while the mass before it is below p, so p = 0 would keep none.
    Stops early once |f(p) - target| <= tol.
    """
    f_lo, f_hi = f(lo), f(hi)
    if not f_lo - tol <= target <= f_hi + tol:
        raise SamplingError(f"target {target} experts per token is not reachable: thresholds in [{lo}, {hi}] "
                            f"give {f_lo:.3f} .. {f_hi:.3f} experts")
    best = min(((lo, f_lo), (hi, f_hi)), key=lambda pf: abs(pf[1] - target))
    for _ in range(iters):
        if abs(best[1] - target) <= tol:
            break
        mid = 0.5 * (lo + hi)
        f_mid = f(mid)
        if abs(f_mid - target) < abs(best[1] - target):
            best = (mid, f_mid)
        if f_mid < target:
            lo = mid
        else:
            hi = mid
    return best


def calibrate_threshold(
    model: torch.nn.Module,
    target: float,
    *,
    settings: SampleConfig,
    shape: tuple[int, int, int],
    num_classes: int,
    seed: int = 0,
    num_samples: int = 16,
    num_points: int = 8,
    rounds: int = 2,
    iters: int = 20,
    tol: float = 1e-3,
    objective=None,
) -> dict:
    """Set a DTop-p model's threshold so that sampling activates ``target`` experts per token on average.

    The calibration inputs are the model's own sampling trajectory: ``num_samples`` class-balanced samples are
    drawn with ``settings`` (and ``objective``, see ``sample_latents``), and their model inputs at ``num_points``
    model calls spread over the chain are kept, each with the guidance scale it was sampled with.
    The threshold is then bisected on those inputs (activated experts grow with p). Global scope: one p for
    all layers, matched on the mean over layers. Layer scope: each layer's p in turn, front to back (layer l only
    sees the thresholds of layers < l, so the sweep is exact). ``rounds`` > 1 redraws the trajectory with the
    new threshold and bisects again, since the trajectory itself moves with p.
    Returns {target, scope, threshold, measured, per_layer}; the controller's ``threshold`` buffer is set in place.
    """
    controller = require_dtopp(model)
    num_experts = controller.num_experts
    if not 1 <= target <= num_experts:
        raise SamplingError(f"target_experts={target} must be in [1, {num_experts}] (the model has {num_experts} experts)")
    if num_samples < 1 or num_points < 1 or rounds < 1:
        raise SamplingError("calibration needs num_samples, num_points and rounds >= 1")
    was_training = model.training
    model.eval()
    threshold = controller.threshold
    device = threshold.device
    meter = ActiveExpertMeter(model, num_buckets=1)
    labels = make_labels("balanced", num_samples, num_classes, seed)
    gens_seed = derive_seed(seed, 2)
    objective = objective if objective is not None else objective_for(model, settings)
    settings = resolve_settings(settings, objective, shape[0])
    calls = num_model_calls(settings)
    keep = set(np.linspace(0, calls - 1, min(num_points, calls)).round().astype(int).tolist())

    def record(inputs: list, i: int, t, x: torch.Tensor) -> None:
        if i in keep:
            inputs.append((x.clone(), t, guidance_scale(settings, float(objective.noise_level(t)))))
    y = labels.to(next(model.parameters()).device)

    def set_threshold(values: torch.Tensor) -> None:
        threshold.copy_(values.to(device=device, dtype=threshold.dtype).expand_as(threshold))

    try:
        for _ in range(rounds):
            inputs: list = []
            sample_latents(model, labels, make_generators(gens_seed, range(num_samples)), settings, shape,
                           callback=lambda i, t, x: record(inputs, i, t, x), objective=objective)
            if threshold.numel() == 1:
                def f(p: float) -> float:
                    set_threshold(torch.tensor([p]))
                    return float(_measure(model, meter, inputs, y, settings).mean())
                p, _ = _bisect(f, float(target), iters, tol)
                set_threshold(torch.tensor([p]))
            else:
                values = threshold.detach().clone().float().cpu()
                for layer in range(values.numel()):
                    def f(p: float, layer=layer) -> float:
                        values[layer] = p
                        set_threshold(values)
                        return float(_measure(model, meter, inputs, y, settings)[layer])
                    values[layer], _ = _bisect(f, float(target), iters, tol)
                set_threshold(values)
        per_layer = _measure(model, meter, inputs, y, settings)
    finally:
        model.train(was_training)
    return {
        "target": float(target),
        "scope": "global" if threshold.numel() == 1 else "layer",
        "threshold": threshold.detach().float().cpu().tolist(),
        "measured": float(per_layer.mean()),
        "per_layer": per_layer.tolist(),
        "calibration": {"num_samples": num_samples, "num_points": len(keep), "rounds": rounds, "iters": iters,
                        "tol": tol},
    }
