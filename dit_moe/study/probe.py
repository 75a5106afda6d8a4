"""The study's routing read-outs on fixed noisy training inputs: the probe and the calibrated Top-p threshold.

``probe_inputs`` draws the same noisy training batches for every arm and seed; ``probe_routing`` measures a model
on them with a ``RoutingTap`` (dit_moe/models/routing_tap.py: the numbers training, sampling and the analysis
report); ``calibrate_topp_threshold`` bisects a fixed Top-p threshold on them with the one threshold calibrator
(``dit_moe.models.calibration``).
"""
from __future__ import annotations

import torch

from ..config import ExperimentConfig
from ..data import build_dataset
from ..diffusion import build_objective
from ..models.calibration import calibrate_thresholds
from ..models.routing_tap import RoutingTap
from .config import StudyError

__all__ = ["probe_inputs", "probe_routing", "calibrate_topp_threshold"]


def probe_inputs(cfg: ExperimentConfig, num_batches: int, batch_size: int, seed: int = 1234):
    """Fixed noisy training inputs [(x_t (B, C, H, W), t (B,), y (B,))] of the arm's objective: the same for every
    arm and seed."""
    dataset, _ = build_dataset(cfg.data.source, cfg.data.path, flip=False)
    objective = build_objective(cfg, learn_sigma=cfg.model.learn_sigma)   # the arm's objective: ddpm or flow inputs
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        idx = torch.randint(0, len(dataset), (batch_size,), generator=g).tolist()
        items = [dataset[i] for i in idx]
        x0 = torch.stack([x for x, _ in items]).float()
        y = torch.stack([torch.as_tensor(y) for _, y in items]).long()
        x_t, t, _ = objective.draw(x0, generator=g)
        out.append((x_t, t, y))
    return out


def probe_routing(model, inputs) -> dict:
    """Activated experts per (token, layer) of ``model`` on ``inputs`` (eval mode, no CFG), read by a RoutingTap:
    mean, std over all (token, layer) pairs (as ``dit_moe.analyze`` reports it for the sampling trajectory),
    per_layer, tokens ((token, layer) pairs), per_bucket (10 timestep buckets), load (L, E), unrouted_frac."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tap = RoutingTap(model)
    try:
        with torch.no_grad(), tap:
            for x, t, y in inputs:
                model(x.to(device), t.to(device), y.to(device))
    finally:
        model.train(was_training)
    report = tap.report()
    return {"mean": report["mean"], "std": report["std"], "per_layer": report["per_layer"],
            "tokens": int(report["tokens"]), "per_bucket": report["per_bucket"],
            "load": report["load"], "unrouted_frac": report["unrouted_frac"]}


def calibrate_topp_threshold(model, inputs, target: float, iters: int = 30, tol: float = 1e-3) -> dict:
    """Bisect one global top-p threshold (set on every Top-p router) so that ``inputs`` activate ``target`` experts.

    The one threshold calibrator (``dit_moe.models.calibration.calibrate_thresholds``) on a replay of ``inputs``
    (eval mode, no CFG); the routers' thresholds are restored afterwards. Returns {threshold, measured, per_layer,
    std, target}. Raises StudyError for a model without fixed Top-p routers or an unreachable target.
    """
    if getattr(getattr(model, "routing_config", None), "type", "topp") != "topp":
        raise StudyError("calibration needs a model with fixed Top-p routers (routing.type=topp)")
    device = next(model.parameters()).device

    def replay() -> None:
        with torch.no_grad():
            for x, t, y in inputs:
                model(x.to(device), t.to(device), y.to(device))
    try:
        result = calibrate_thresholds(model, replay, float(target), scope="global", iters=iters, tol=tol,
                                      lo=1e-4, restore=True)
    except ValueError as e:
        raise StudyError(f"calibration of the Top-p threshold: {e}") from e
    return {"threshold": result["threshold"][0], "measured": result["measured"], "std": result["std"],
            "per_layer": result["per_layer"], "target": result["target"]}
