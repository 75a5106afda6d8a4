"""Routing of a checkpoint along its own sampling trajectory: ``analyze_checkpoint`` and the numbers of its report.

The router decisions come from ``trace.trace_routing``, which samples with a ``RoutingTap``
(dit_moe/models/routing_tap.py, the toolkit's one reader of router outputs) attached; this file turns the tap's sums
into the report's numbers with ``stats_from_sums`` (the definitions training and sampling use), and the per-token
records into the spatial maps and the per-image spread of the per-class bars.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import dataclasses

import numpy as np
import torch

from ..data import to_uint8
from ..inference import InferenceError, load
from ..models.moe import moe_layers
from ..models.routers import DTopPRouter
from ..models.routing_tap import stats_from_sums
from ..registry import parse_name
from ..weights.checkpoint import run_dir_of_checkpoint
from ..sampling import FLAGS, SCHEDULE, SamplingError, resolve_settings
from .errors import AnalysisError
from .plots import MAX_SPATIAL_ROWS, _plot_checkpoint
from .trace import trace_routing

__all__ = ["JSON_FILE", "default_out_dir", "analyze_checkpoint"]

JSON_FILE = "analysis.json"


def default_out_dir(checkpoint: str | Path) -> Path:
    """``<run>/analysis`` for a checkpoint at ``<run>/checkpoints/<name>``, else ``<checkpoint>/analysis``."""
    return (run_dir_of_checkpoint(checkpoint) or Path(checkpoint)) / "analysis"


def _pick_classes(classes, num_classes: int, seed: int, where: str, names: Sequence[str] = ()) -> list[int]:
    if classes is not None:
        lookup = {str(n).split(",")[0].strip(): i for i, n in enumerate(names)}
        lookup.update({str(n): i for i, n in enumerate(names)})
        try:
            ids = [int(c) if str(c).lstrip("-").isdigit() else lookup[str(c)] for c in classes]
        except KeyError as e:
            raise AnalysisError(f"classes: unknown class {e.args[0]!r} for {where}") from None
        bad = [c for c in ids if not 0 <= c < num_classes]
        if bad or not ids:
            raise AnalysisError(f"classes {bad or ids}: class ids must be in [0, {num_classes}) for {where}")
        return ids
    if num_classes <= 10:
        return list(range(num_classes))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_classes, generator=g)[:6].tolist())


def analyze_checkpoint(
    path: str | Path,
    out_dir: Optional[str | Path] = None,
    classes: Optional[Sequence[int]] = None,
    num_per_class: int = 2,
    sampler: Optional[str] = None,
    num_steps: Optional[int] = 50,
    cfg_scale: Optional[float] = None,
    seed: int = 0,
    device: Optional[str | torch.device] = None,
    which: str = "ema",
    num_buckets: int = 10,
    spatial_steps: int = 4,
    batch_size: int = 32,
    vae: Optional[str] = None,
    **sample_overrides,
) -> dict:
    """Analyse the routing of the checkpoint at ``path`` (or a run's latest) on its own sampling trajectory.

    ``sampler`` and ``cfg_scale`` default to the checkpoint's sample config (the objective's default sampler /
    1.5 without one); ``num_steps`` sampling steps (None: the checkpoint's); any other SampleConfig field
    (guidance_interval, time_shift, guidance_channels, ...) may be given as a keyword. Writes the PNGs listed in
    the module docstring and ``analysis.json`` into ``out_dir`` (default ``default_out_dir``) and returns the JSON.
    """
    if num_per_class < 1 or batch_size < 1 or spatial_steps < 1 or num_buckets < 1:
        raise AnalysisError("num_per_class, batch_size, spatial_steps and num_buckets must be >= 1")

    def moe_only(ckpt) -> None:     # before any weight is read
        if not parse_name(ckpt.model_config.name).is_moe:
            raise AnalysisError(f"{ckpt.path}: {ckpt.model_config.name} is not an MoE model (a dense model has no "
                                "routers to analyze)")

    try:    # CheckpointError naming the path when it is missing or broken
        bundle = load(path, weights=which, device=device, vae=vae, check=moe_only)
    except InferenceError as e:
        raise AnalysisError(str(e)) from e
    ckpt = bundle.checkpoint
    cfg = ckpt.model_config
    arch = parse_name(cfg.name)
    model = bundle.model
    given = {"sampler": sampler, "steps": num_steps, "cfg_scale": cfg_scale, **sample_overrides}
    try:
        settings = resolve_settings(dataclasses.replace(bundle.defaults, **{k: v for k, v in given.items()
                                                                           if v is not None}),
                                    bundle.objective, cfg.in_channels, name=lambda f: FLAGS.get(f, f))
    except (SamplingError, TypeError) as e:
        raise AnalysisError(f"{ckpt.path}: {e}") from e
    info = bundle.data_info
    class_ids = _pick_classes(classes, cfg.num_classes, seed, str(ckpt.path), info.class_names)
    names = [info.class_names[c] if c < len(info.class_names) else str(c) for c in class_ids]
    labels = torch.tensor([c for c in class_ids for _ in range(num_per_class)], dtype=torch.long)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(ckpt.path)
    out_dir.mkdir(parents=True, exist_ok=True)

    trace = trace_routing(bundle, labels, settings, seed=seed, batch_size=batch_size, num_buckets=num_buckets)
    images = None
    if bundle.decodable:
        images = to_uint8(bundle.decode(trace["latents"].to(bundle.device))).cpu()
    else:
        print(f"note: no data_info and {cfg.in_channels}-channel latents: spatial maps are drawn without the image"
              " (pass --vae to decode)", file=sys.stderr)

    report = _summarize(trace, model, bundle.checkpoint, arch, settings, class_ids, names, labels, seed,
                        num_per_class, num_buckets, spatial_steps)
    files = _plot_checkpoint(report, trace, images, labels, class_ids, names, out_dir)
    report["files"] = files + [JSON_FILE]
    report["out_dir"] = str(out_dir)
    (out_dir / JSON_FILE).write_text(json.dumps(report, indent=1))
    return report


# ---------------------------------------------------------------------------------------------------------
#                                     Checkpoint analysis: the numbers
# ---------------------------------------------------------------------------------------------------------

def _f(x) -> list:
    """Tensor -> nested lists of Python floats, rounded (JSON stays readable), NaN -> None."""
    arr = np.asarray(x, dtype=np.float64)
    out = np.round(arr, 6).tolist()

    def clean(v):
        if isinstance(v, list):
            return [clean(u) for u in v]
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v
    return clean(out)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor, dims) -> torch.Tensor:
    """Mean of ``values`` over ``dims`` where ``valid``; NaN where nothing is valid."""
    v = torch.where(valid, values, torch.zeros_like(values)).sum(dims)
    n = valid.to(torch.float64).sum(dims)
    return torch.where(n > 0, v / n.clamp(min=1), torch.full_like(v, float("nan")))


def _mean_active(sums: torch.Tensor, E: int) -> torch.Tensor:
    """Tap sums (..., S) -> mean routed experts per token (...), NaN where no token was counted."""
    stats = stats_from_sums(sums, E)
    return torch.where(stats["tokens"] > 0, stats["mean_active"], torch.full_like(stats["mean_active"], float("nan")))


def _summarize(trace, model, ckpt, arch, settings, class_ids, names, labels, seed, num_per_class,
               num_buckets, spatial_steps) -> dict:
    E = trace["num_experts"]
    calls, classes, buckets = trace["call_sums"], trace["class_sums"], trace["bucket_sums"]   # (S | C+1 | K, L, .)
    ts = torch.tensor(trace["timesteps"])
    null = classes.shape[0] - 1

    layers = stats_from_sums(calls.sum(0), E)                                      # both CFG halves, per layer
    total = stats_from_sums(calls.sum((0, 1)), E)
    per_layer, per_layer_std = layers["mean_active"], layers["active_std"]       # (L,)
    per_step = _mean_active(calls, E)                                             # (S, L)
    per_step_mean = _mean_active(calls.sum(1), E)                                 # (S,)
    per_bucket = _mean_active(buckets, E)                                         # (buckets, L)
    Tn = SCHEDULE["num_train_timesteps"]
    hist = layers["active_hist"]                                                  # (L, E + 1)

    per_class_layer = _mean_active(classes[class_ids], E)                         # (C, L) conditional half
    # The spread across images of a class needs each image's mean: the per-token records (conditional half).
    cond = trace["active"].to(torch.float64)                                      # (S, L, Ns, T)
    per_image = cond.mean((0, 3)).mean(0)                     # (Ns,): each layer's mean over calls and tokens, then
                                                              # over layers (the order the report always had)
    per_class_std = torch.stack([per_image[labels == c].std(unbiased=False) for c in class_ids])

    load = layers["load"]                                                         # (L, E)
    load_cv = load.std(1, unbiased=False) / load.mean(1).clamp(min=1e-12)

    S = len(trace["timesteps"])
    picks = sorted(set(np.linspace(0, S - 1, min(spatial_steps, S)).round().astype(int).tolist()))
    h, w = trace["grid"]
    spatial = cond.mean(1)                                                        # (S, Ns, T) mean over layers
    rows = [int((labels == c).nonzero()[0]) for c in class_ids][:MAX_SPATIAL_ROWS]

    routing = ckpt.routing_config
    controller = getattr(model, "routing_controller", None)
    drn = [float(l.router.scale().detach()) if isinstance(l.router, DTopPRouter) else None for l in moe_layers(model)]
    if routing.type == "topk":
        target = float(arch.top_k)
    elif routing.type == "expert_choice":
        target = float(arch.top_k * routing.capacity_factor)
    elif routing.type == "dtopp" and controller is not None:
        target = float(controller.target)
    else:
        target = None
    return {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "model": ckpt.model_config.name,
        "routing": routing.type,
        "num_experts": E,
        "top_k": arch.top_k,
        "target_experts": target,
        "moe_blocks": trace["moe_blocks"],
        "tokens_per_image": h * w,
        "settings": {"sampler": settings.sampler, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
                     "guidance_interval": list(settings.guidance_interval) if settings.guidance_interval else None,
                     "time_shift": settings.time_shift, "model_calls": len(trace["timesteps"]),
                     "seed": seed, "classes": class_ids, "num_per_class": num_per_class,
                     "guided": any(trace["guided"]), "guided_calls": int(sum(trace["guided"])),
                     "counted": "both CFG halves (per layer / timestep / load); conditional half (per class, maps)"},
        "active_experts": {
            "mean": float(total["mean_active"]),
            "std": float(total["active_std"]),
            "per_layer": _f(per_layer),
            "per_layer_std": _f(per_layer_std),
            "per_layer_cond": _f(_mean_active(classes[:null].sum(0), E)),
            "per_layer_uncond": _f(_mean_active(classes[null], E)),
            "histogram": _f(hist),
            "unrouted_frac": _f(hist[:, 0]),          # per layer: tokens no expert took (expert choice)
            "per_step": {"timesteps": ts.tolist(), "mean": _f(per_step_mean), "per_layer": _f(per_step)},
            "per_bucket": {"buckets": [[b * Tn // num_buckets, (b + 1) * Tn // num_buckets - 1]
                                       for b in range(num_buckets)],
                           "mean": _f(_masked_mean(per_bucket, ~per_bucket.isnan(), (1,))),
                           "per_layer": _f(per_bucket)},
            "per_class": {"classes": class_ids, "names": names, "mean": _f(per_class_layer.mean(1)),
                          "std_over_images": _f(per_class_std), "per_layer": _f(per_class_layer)},
        },
        "expert_load": {"per_layer": _f(load), "cv": _f(load_cv), "max_share": _f(load.max(1).values)},
        "drn_scale": _f(drn) if routing.type == "dtopp" else None,
        "threshold": (_f(controller.threshold.detach().cpu()) if controller is not None
                      else ([routing.threshold] if routing.type == "topp" else None)),
        "spatial": {"grid": [h, w], "step_indices": picks, "timesteps": [int(ts[i]) for i in picks],
                    "images": rows, "classes": [int(labels[r]) for r in rows],
                    "maps": _f(spatial[picks][:, rows].reshape(len(picks), len(rows), h, w))},
    }
