"""Routing decisions, recorded: along a sampling trajectory, or on fixed noisy training inputs.

Both read the router outputs through the toolkit's one reader, ``dit_moe.models.routing_tap.RoutingTap``.
``trace_routing`` samples a bundle's labels with a recording tap attached (every router call of every MoE layer:
the experts of each token and the expert loads) and returns dense arrays indexed by (model call, layer, CFG half,
image, token) -- what ``dit_moe.analyze`` turns into numbers and plots. ``probe_inputs`` / ``probe_routing``
measure a model on fixed noisy training inputs (the routing study's probe), and ``calibrate_topp_threshold``
bisects a fixed Top-p threshold on them with the one threshold calibrator (``dit_moe.models.calibration``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import SampleConfig
from .errors import AnalysisError
from .loop import make_generators, sample_latents
from .settings import guidance_scale, resolve_settings
from .solvers import num_model_calls

if TYPE_CHECKING:
    import torch

    from ..config import ExperimentConfig

__all__ = ["AnalysisError", "trace_routing", "probe_inputs", "probe_routing", "calibrate_topp_threshold"]


def trace_routing(bundle, labels: "torch.Tensor", settings: SampleConfig, seed: int = 0,
                  batch_size: int = 32) -> dict:
    """Sample ``labels`` (in batches) with a recording RoutingTap attached and gather every model call's routing.

    Returns ``active`` (S, L, 2, Ns, T) int16 -- experts of token t of image n at model call s in layer l, half 0 the
    conditional copy, half 1 the null-class copy (-1 where that call ran unguided: cfg 1 or outside the guidance
    interval) --, ``counts`` (S, L, 2, E) int64 expert loads of each half, ``timesteps`` (S,) network timesteps,
    ``guided`` (S,) bool, ``latents`` (Ns, C, h, w), ``grid`` (h, w) in patches, ``num_experts`` and
    ``moe_blocks`` (the DiT block of each MoE layer). AnalysisError for a model without routers.
    """
    import torch

    from ..models.routing_tap import RoutingTap

    model, shape = bundle.model, bundle.shape
    try:
        recorder = RoutingTap(model, records=True)
    except ValueError as e:
        raise AnalysisError(f"{e}: nothing to analyze") from None
    blocks = list(getattr(model, "blocks", []))
    moe_blocks = [next((i for i, b in enumerate(blocks) if any(m is r for m in b.modules())), l)
                  for l, r in enumerate(recorder.routers)]
    settings = resolve_settings(settings, bundle.objective, shape[0])
    Ns = labels.shape[0]
    T = (shape[1] // model.patch_size) * (shape[2] // model.patch_size)
    S, L, E = num_model_calls(settings), recorder.num_layers, recorder.num_experts
    active = torch.full((S, L, 2, Ns, T), -1, dtype=torch.int16)
    counts = torch.zeros(S, L, 2, E, dtype=torch.int64)
    timesteps: list = []
    guided: list[bool] = []
    latents = []
    with torch.no_grad(), recorder:
        for b0 in range(0, Ns, batch_size):
            idx = list(range(b0, min(b0 + batch_size, Ns)))
            B = len(idx)
            recorder.reset()
            seen: list = []
            lat = sample_latents(model, labels[idx], make_generators(seed, idx), settings, shape,
                                 device=bundle.device, callback=lambda i, t, x_in: seen.append(t),
                                 objective=bundle.objective)
            latents.append(lat.cpu())
            if len(seen) != S:
                raise AnalysisError(f"the {settings.sampler} sampler made {len(seen)} model calls, expected {S}")
            timesteps = seen
            guided = [guidance_scale(settings, float(bundle.objective.noise_level(t))) != 1.0 for t in seen]
            for l, calls in enumerate(recorder.records):
                if len(calls) != S:
                    raise AnalysisError(f"MoE layer {l}: {len(calls)} router calls for {S} model calls "
                                        "(the trace expects one routed forward per model call)")
                for call in calls:
                    step, n = call["call"], call["active"]
                    null = call["y"] == recorder.null_class
                    if n.shape != ((2 * B if guided[step] else B), T) or int(null.sum()) != (B if guided[step] else 0):
                        raise AnalysisError(f"MoE layer {l}: routed {tuple(n.shape)} (images, tokens) with "
                                            f"{int(null.sum())} null-class copies at model call {step}, expected "
                                            f"{B} images x {T} tokens (doubled under guidance)")
                    active[step, l, 0, b0:b0 + B] = n[~null]
                    if guided[step]:
                        active[step, l, 1, b0:b0 + B] = n[null]
                    counts[step, l] += call["counts"]
    return {"active": active, "counts": counts, "timesteps": timesteps, "guided": guided,
            "latents": torch.cat(latents), "grid": (shape[1] // model.patch_size, shape[2] // model.patch_size),
            "num_experts": E, "moe_blocks": moe_blocks}


def probe_inputs(cfg: "ExperimentConfig", num_batches: int, batch_size: int, seed: int = 1234):
    """Fixed noisy training inputs [(x_t (B, C, H, W), t (B,), y (B,))]: the same for every arm and seed."""
    import torch

    from ..data import build_dataset
    from ..diffusion import build_objective

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
    import torch

    from ..models.routing_tap import RoutingTap

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
    std, target}. Raises AnalysisError for a model without fixed Top-p routers or an unreachable target.
    """
    import torch

    from ..models.calibration import calibrate_thresholds

    if getattr(getattr(model, "routing_config", None), "type", "topp") != "topp":
        raise AnalysisError("calibration needs a model with fixed Top-p routers (routing.type=topp)")
    device = next(model.parameters()).device

    def replay() -> None:
        with torch.no_grad():
            for x, t, y in inputs:
                model(x.to(device), t.to(device), y.to(device))
    try:
        result = calibrate_thresholds(model, replay, float(target), scope="global", iters=iters, tol=tol,
                                      lo=1e-4, restore=True)
    except ValueError as e:
        raise AnalysisError(f"calibration of the Top-p threshold: {e}") from e
    return {"threshold": result["threshold"][0], "measured": result["measured"], "std": result["std"],
            "per_layer": result["per_layer"], "target": result["target"]}
