"""Inference-time sparsity for DTop-p models: set the top-p threshold so that sampling activates K experts per token.

The threshold is bisected on the model's own sampling trajectory by the toolkit's one threshold calibrator
(``dit_moe.models.calibration``), which the routing study's fixed Top-p calibration also uses (on training inputs,
``dit_moe.study.probe.calibrate_topp_threshold``). This is the calibration behind ``sample.py --target-experts``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import SampleConfig
from ..models.calibration import calibrate_thresholds
from .loop import derive_seed, make_generators, make_labels, objective_for, sample_latents
from .settings import SamplingError, guidance_scale, resolve_settings
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
    model calls spread over the chain are kept, each with the guidance scale it was sampled with. The threshold is
    then bisected on those inputs (``calibrate_thresholds``; global scope: one p matched on the mean over layers,
    layer scope: each layer's p front to back). ``rounds`` > 1 redraws the trajectory with the new threshold and
    bisects again, since the trajectory itself moves with p.
    Returns {target, scope, threshold, measured, per_layer, std, calibration}; the controller's ``threshold``
    buffer is set in place.
    """
    controller = require_dtopp(model)
    num_experts = controller.num_experts
    if not 1 <= target <= num_experts:
        raise SamplingError(f"target_experts={target} must be in [1, {num_experts}] (the model has {num_experts} experts)")
    if num_samples < 1 or num_points < 1 or rounds < 1:
        raise SamplingError("calibration needs num_samples, num_points and rounds >= 1")
    labels = make_labels("balanced", num_samples, num_classes, seed)
    gens_seed = derive_seed(seed, 2)
    objective = objective if objective is not None else objective_for(model, settings)
    settings = resolve_settings(settings, objective, shape[0])
    calls = num_model_calls(settings)
    keep = set(np.linspace(0, calls - 1, min(num_points, calls)).round().astype(int).tolist())
    y = labels.to(next(model.parameters()).device)

    def record(inputs: list, i: int, t, x: torch.Tensor) -> None:
        if i in keep:
            inputs.append((x.clone(), t, guidance_scale(settings, float(objective.noise_level(t)))))

    def replay(inputs: list) -> None:
        for x_in, t, scale in inputs:
            tt = torch.full((x_in.shape[0],), t, dtype=torch.long if isinstance(t, int) else torch.float32,
                            device=x_in.device)
            model.forward_with_cfg(x_in, tt, y, scale, settings.guidance_channels)

    was_training = model.training
    model.eval()
    try:
        for _ in range(rounds):
            inputs: list = []
            sample_latents(model, labels, make_generators(gens_seed, range(num_samples)), settings, shape,
                           callback=lambda i, t, x: record(inputs, i, t, x), objective=objective)
            result = calibrate_thresholds(model, lambda: replay(inputs), float(target), iters=iters, tol=tol)
    except ValueError as e:
        raise SamplingError(f"--target-experts {target}: {e}") from e
    finally:
        model.train(was_training)
    result.pop("kind")
    result["calibration"] = {"num_samples": num_samples, "num_points": len(keep), "rounds": rounds, "iters": iters,
                             "tol": tol}
    return result
