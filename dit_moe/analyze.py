"""Routing analysis: where, when and for what an MoE DiT spends its experts (`python -m dit_moe.analyze`).

Two jobs, one command:

* ``analyze_checkpoint``: rebuild a checkpoint, sample a few images per class with CFG along the real sampling
  trajectory (``dit_moe.sampling.sample_latents``), and record through forward hooks on every MoE layer's router
  the number of experts each token activates and each expert's load. Writes PNG plots and ``analysis.json``:

      active_per_layer.png     mean activated experts per MoE layer (bars, +-1 std over tokens), target line
      active_per_timestep.png  mean activated experts against the timestep, one curve per group of layers
      active_per_class.png     mean activated experts per class (bars) and per class x layer (heat map)
      active_spatial.png       activated experts per token (mean over layers) laid over the generated image,
                               at a few timesteps of the chain
      expert_load.png          share of (token, expert) assignments per expert and layer (experts x layers)
      drn_scale.png            DTop-p only: the DRN scale s_l of every layer, and the threshold p

  Top-k models give flat plots (every token takes exactly K experts): that flatness is the baseline the threshold
  routers are compared against.

* ``plot_training_curves``: the run's ``metrics.jsonl`` (one JSON object per logging step, written by the trainer)
  as PNGs: loss, activated experts (mean and spread over layers) against the target, threshold p, load balance.

What counts as a token. Under classifier-free guidance every model call routes the conditional and the
unconditional (null-class) copy of each image; both are compute actually spent, so per-layer, per-timestep and
load numbers count both halves (as ``sampling.ActiveExpertMeter`` does). Per-class numbers and spatial maps use the
conditional half only (the null half is the same for every class); ``per_layer_cond`` / ``per_layer_uncond`` split
the per-layer means. Tokens of one image are its (input_size / patch)^2 patches in raster order, batch-major.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .sampling.errors import AnalysisError

if TYPE_CHECKING:  # torch is imported where it is used: `--run` (training curves) never loads it
    import torch


def __getattr__(name: str):
    if name == "RoutingRecorder":     # lives with the sampling trace; imported on demand (it needs torch)
        from .sampling.trace import RoutingRecorder
        return RoutingRecorder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AnalysisError",
    "RoutingRecorder",
    "default_out_dir",
    "analyze_checkpoint",
    "read_metrics",
    "plot_training_curves",
    "build_parser",
    "main",
]

JSON_FILE = "analysis.json"
METRICS_FILE = "metrics.jsonl"
MAX_LAYER_GROUPS = 4      # curves in the per-timestep plot
MAX_SPATIAL_ROWS = 6      # images in the spatial plot (one per class)


# ---------------------------------------------------------------------------------------------------------
#                                   Checkpoint analysis: the trajectory
# ---------------------------------------------------------------------------------------------------------

def default_out_dir(checkpoint: str | Path) -> Path:
    """``<run>/analysis`` for a checkpoint at ``<run>/checkpoints/<name>``, else ``<checkpoint>/analysis``."""
    path = Path(checkpoint)
    if path.parent.name == "checkpoints":
        return path.parent.parent / "analysis"
    return path / "analysis"


def _pick_classes(classes, num_classes: int, seed: int, where: str, names: Sequence[str] = ()) -> list[int]:
    import torch

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
    import dataclasses

    import torch

    from .checkpoint import load_checkpoint
    from .data import to_uint8
    from .inference import InferenceError, load
    from .registry import parse_name
    from .sampling import FLAGS, SamplingError, resolve_settings

    ckpt = load_checkpoint(path)          # CheckpointError naming the path when it is missing or broken
    cfg = ckpt.model_config
    arch = parse_name(cfg.name)
    if not arch.is_moe:
        raise AnalysisError(f"{ckpt.path}: {cfg.name} is not an MoE model (a dense model has no routers to analyze)")
    if num_per_class < 1 or batch_size < 1 or spatial_steps < 1 or num_buckets < 1:
        raise AnalysisError("num_per_class, batch_size, spatial_steps and num_buckets must be >= 1")
    try:
        bundle = load(ckpt.path, weights=which, device=device, vae=vae)
    except InferenceError as e:
        raise AnalysisError(str(e)) from e
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

    from .sampling import trace as trace_module

    recorder = trace_module.RoutingRecorder(model)
    trace = trace_module.trace_routing(bundle, recorder, labels, settings, seed=seed, batch_size=batch_size)
    images = None
    if bundle.decodable:
        images = to_uint8(bundle.decode(trace["latents"].to(bundle.device))).cpu()
    else:
        print(f"note: no data_info and {cfg.in_channels}-channel latents: spatial maps are drawn without the image"
              " (pass --vae to decode)", file=sys.stderr)

    report = _summarize(trace, recorder, model, bundle.checkpoint, arch, settings, class_ids, names, labels, seed,
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
    import torch

    v = torch.where(valid, values, torch.zeros_like(values)).sum(dims)
    n = valid.to(torch.float64).sum(dims)
    return torch.where(n > 0, v / n.clamp(min=1), torch.full_like(v, float("nan")))


def _summarize(trace, recorder, model, ckpt, arch, settings, class_ids, names, labels, seed, num_per_class,
               num_buckets, spatial_steps) -> dict:
    import torch

    from .models.routers import DTopPRouter
    from .sampling import SCHEDULE

    active = trace["active"].to(torch.float64)          # (S, L, 2, Ns, T)
    valid = trace["active"] >= 0
    counts = trace["counts"]                             # (S, L, 2, E)
    S, L, _, Ns, T = active.shape
    E = recorder.num_experts
    ts = torch.tensor(trace["timesteps"])

    per_layer = _masked_mean(active, valid, (0, 2, 3, 4))                        # (L,)
    sq = _masked_mean(active ** 2, valid, (0, 2, 3, 4))
    per_layer_std = (sq - per_layer ** 2).clamp(min=0).sqrt()
    overall = float(active[valid].mean())
    overall_std = float(active[valid].std(unbiased=False))
    per_step = _masked_mean(active, valid, (2, 3, 4))                             # (S, L)
    per_step_mean = _masked_mean(active, valid, (1, 2, 3, 4))                     # (S,)

    Tn = SCHEDULE["num_train_timesteps"]
    bucket = (ts * num_buckets // Tn).clamp(0, num_buckets - 1)                  # (S,)
    per_bucket = torch.full((num_buckets, L), float("nan"), dtype=torch.float64)
    for b in range(num_buckets):
        sel = bucket == b
        if sel.any():
            per_bucket[b] = _masked_mean(active[sel], valid[sel], (0, 2, 3, 4))

    # Histogram of experts per token (fraction of tokens with m = 0..E experts), per layer.
    hist = torch.zeros(L, E + 1, dtype=torch.float64)
    a = trace["active"].transpose(0, 1).reshape(L, -1).long()
    for l in range(L):
        v = a[l][a[l] >= 0]
        hist[l] = torch.bincount(v, minlength=E + 1)[: E + 1].to(torch.float64) / max(v.numel(), 1)

    cond, cvalid = active[:, :, 0], valid[:, :, 0]                               # (S, L, Ns, T)
    per_image_layer = _masked_mean(cond, cvalid, (0, 3))                          # (L, Ns)
    per_class_layer = torch.stack([per_image_layer[:, labels == c].mean(1) for c in class_ids])   # (C, L)
    per_class_std = torch.stack([per_image_layer[:, labels == c].mean(0).std(unbiased=False) for c in class_ids])

    load_counts = counts.sum((0, 2)).to(torch.float64)                            # (L, E)
    load = load_counts / load_counts.sum(1, keepdim=True).clamp(min=1)
    load_cv = load.std(1, unbiased=False) / load.mean(1).clamp(min=1e-12)

    picks = sorted(set(np.linspace(0, S - 1, min(spatial_steps, S)).round().astype(int).tolist()))
    h, w = trace["grid"]
    spatial = _masked_mean(cond, cvalid, (1,))                                    # (S, Ns, T) mean over layers
    rows = [int((labels == c).nonzero()[0]) for c in class_ids][:MAX_SPATIAL_ROWS]

    routing = ckpt.routing_config
    controller = getattr(model, "routing_controller", None)
    drn = [float(r.scale().detach()) if isinstance(r, DTopPRouter) else None for r in recorder.routers]
    if routing.type == "topk":
        target = float(arch.top_k)
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
        "moe_blocks": recorder.block_index,
        "tokens_per_image": T,
        "settings": {"sampler": settings.sampler, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
                     "guidance_interval": list(settings.guidance_interval) if settings.guidance_interval else None,
                     "time_shift": settings.time_shift, "model_calls": len(trace["timesteps"]),
                     "seed": seed, "classes": class_ids, "num_per_class": num_per_class,
                     "guided": any(trace["guided"]), "guided_calls": int(sum(trace["guided"])),
                     "counted": "both CFG halves (per layer / timestep / load); conditional half (per class, maps)"},
        "active_experts": {
            "mean": overall,
            "std": overall_std,
            "per_layer": _f(per_layer),
            "per_layer_std": _f(per_layer_std),
            "per_layer_cond": _f(_masked_mean(active[:, :, 0], valid[:, :, 0], (0, 2, 3))),
            "per_layer_uncond": _f(_masked_mean(active[:, :, 1], valid[:, :, 1], (0, 2, 3))),
            "histogram": _f(hist),
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


# ---------------------------------------------------------------------------------------------------------
#                                             Plots
# ---------------------------------------------------------------------------------------------------------

def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw):
    """A Figure on the Agg canvas (no pyplot state, no display needed) and its axes."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig, out_dir: Path, name: str, files: list[str]) -> None:
    fig.savefig(out_dir / name, dpi=110)
    files.append(name)


def _title(report: dict) -> str:
    s = report["settings"]
    return (f"{report['model']} {report['routing']} (step {report['step']}), {s['sampler']} {s['steps']} steps, "
            f"cfg {s['cfg_scale']}")


def _layer_groups(L: int) -> list[list[int]]:
    return [g.tolist() for g in np.array_split(np.arange(L), min(L, MAX_LAYER_GROUPS))]


def _target_line(ax, report: dict) -> None:
    if report["target_experts"] is not None:
        ax.axhline(report["target_experts"], color="k", ls=":", lw=1, label=f"target {report['target_experts']:g}")


def _plot_checkpoint(report, trace, images, labels, class_ids, names, out_dir: Path) -> list[str]:
    files: list[str] = []
    ae = report["active_experts"]
    E = report["num_experts"]
    blocks = report["moe_blocks"]
    L = len(blocks)
    layer_names = [str(b) for b in blocks]

    # Activated experts per layer.
    fig, ax = _figure(max(4.0, 0.35 * L + 2), 3.2)
    ax = ax[0, 0]
    x = np.arange(L)
    ax.bar(x, np.array(ae["per_layer"], dtype=float), yerr=np.array(ae["per_layer_std"], dtype=float), capsize=2,
           color="tab:blue", alpha=0.85, label="mean +- std over tokens")
    _target_line(ax, report)
    ax.set_xticks(x, layer_names)
    ax.set_xlabel("block (MoE layers)")
    ax.set_ylabel("activated experts per token")
    ax.set_ylim(0, E + 0.5)
    ax.set_title(_title(report), fontsize=8)
    ax.legend(fontsize=7)
    _save(fig, out_dir, "active_per_layer.png", files)

    # Per timestep, one curve per layer group.
    ts = np.array(ae["per_step"]["timesteps"], dtype=float)
    per_step = np.array(ae["per_step"]["per_layer"], dtype=float)          # (S, L)
    fig, ax = _figure(5.5, 3.4)
    ax = ax[0, 0]
    for g in _layer_groups(L):
        label = f"block {blocks[g[0]]}" if len(g) == 1 else f"blocks {blocks[g[0]]}-{blocks[g[-1]]}"
        ax.plot(ts, per_step[:, g].mean(1), marker=".", label=label)
    ax.plot(ts, np.array(ae["per_step"]["mean"], dtype=float), color="k", lw=2, label="all layers")
    _target_line(ax, report)
    ax.set_xlim(max(ts.max(), 1) + 10, min(ts.min(), 0) - 10)              # sampling runs from noise (left) to data
    ax.set_xlabel("timestep t (sampling goes left to right)")
    ax.set_ylabel("activated experts per token")
    ax.set_title(_title(report), fontsize=8)
    ax.legend(fontsize=7)
    _save(fig, out_dir, "active_per_timestep.png", files)

    # Per class: bars (mean over layers) and class x layer heat map.
    pc = ae["per_class"]
    C = len(class_ids)
    fig, axes = _figure(max(7.0, 0.5 * C + 5), 3.4, ncols=2)
    ax = axes[0, 0]
    ax.bar(np.arange(C), np.array(pc["mean"], dtype=float), yerr=np.array(pc["std_over_images"], dtype=float),
           capsize=2, color="tab:green", alpha=0.85)
    _target_line(ax, report)
    short = [str(n).split(",")[0][:12] for n in names]
    ax.set_xticks(np.arange(C), short, rotation=45 if C > 6 else 0, ha="right" if C > 6 else "center", fontsize=7)
    ax.set_ylabel("activated experts per token (cond.)")
    ax.set_title("per class, mean over layers", fontsize=8)
    ax = axes[0, 1]
    m = np.array(pc["per_layer"], dtype=float)                               # (C, L)
    im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(np.arange(C), short, fontsize=7)
    ax.set_xticks(np.arange(L), layer_names, fontsize=7)
    ax.set_xlabel("block")
    ax.set_title("per class and layer", fontsize=8)
    fig.colorbar(im, ax=ax, label="experts per token")
    _save(fig, out_dir, "active_per_class.png", files)

    # Spatial maps over the generated image: the sample itself, then one overlay per chosen timestep.
    sp = report["spatial"]
    maps = np.array(sp["maps"], dtype=float)                                 # (P, R, h, w)
    P, R = maps.shape[0], maps.shape[1]
    first = 1 if images is not None else 0
    fig, axes = _figure(1.8 * (P + first) + 1.2, 1.8 * R + 0.4, ncols=P + first, nrows=R)
    finite = maps[np.isfinite(maps)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, float(E))
    if vmax - vmin < 1e-6:  # top-k: one colour; keep the scale readable
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = None
    for r in range(R):
        img = images[sp["images"][r]].permute(1, 2, 0).numpy() if images is not None else None
        if img is not None:
            H, W = img.shape[:2]
            axes[r, 0].imshow(img, interpolation="nearest")
            grey = img.mean(2)                                               # colour comes from the map only
        for p in range(P):
            ax = axes[r, p + first]
            if img is not None:
                ax.imshow(grey, cmap="gray", extent=(0, W, H, 0), interpolation="nearest")
                im = ax.imshow(maps[p, r], extent=(0, W, H, 0), cmap="magma", alpha=0.6, vmin=vmin, vmax=vmax,
                               interpolation="nearest")
            else:
                im = ax.imshow(maps[p, r], cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
            if r == 0:
                ax.set_title(f"t = {sp['timesteps'][p]}", fontsize=8)
        c = sp["classes"][r]
        axes[r, 0].set_ylabel(short[class_ids.index(c)] if c in class_ids else str(c), fontsize=8)
    if first:
        axes[0, 0].set_title("sample", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    cbar = fig.colorbar(im, ax=axes, label="experts per token (mean over layers)", shrink=0.8)
    cbar.solids.set_alpha(1.0)
    fig.suptitle("activated experts per patch, conditional pass; " + _title(report), fontsize=8)
    _save(fig, out_dir, "active_spatial.png", files)

    # Expert load: experts x layers.
    load = np.array(report["expert_load"]["per_layer"], dtype=float).T      # (E, L)
    fig, ax = _figure(max(4.0, 0.35 * L + 2.5), max(3.0, 0.22 * E + 1.5))
    ax = ax[0, 0]
    im = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(np.arange(L), layer_names, fontsize=7)
    ax.set_yticks(np.arange(E), [str(e) for e in range(E)], fontsize=6 if E > 16 else 7)
    ax.set_xlabel("block")
    ax.set_ylabel("expert")
    ax.set_title(f"expert load (uniform = {1 / E:.3f}); " + _title(report), fontsize=7)
    fig.colorbar(im, ax=ax, label="share of assignments")
    _save(fig, out_dir, "expert_load.png", files)

    # DRN scale (DTop-p).
    if report["drn_scale"] is not None:
        fig, ax = _figure(max(4.0, 0.35 * L + 2), 3.0)
        ax = ax[0, 0]
        ax.bar(x, np.array(report["drn_scale"], dtype=float), color="tab:purple", alpha=0.85)
        ax.axhline(1.0, color="k", ls=":", lw=1, label="init s = 1")
        ax.set_xticks(x, layer_names)
        ax.set_xlabel("block")
        ax.set_ylabel("DRN scale s")
        p = report["threshold"]
        ax.set_title(f"DRN scale per layer; threshold p = {', '.join(f'{v:.3f}' for v in p)}", fontsize=8)
        ax.legend(fontsize=7)
        _save(fig, out_dir, "drn_scale.png", files)
    return files


# ---------------------------------------------------------------------------------------------------------
#                                          Training curves
# ---------------------------------------------------------------------------------------------------------

def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's ``metrics.jsonl`` (a run folder or the file itself) as a list of dicts in step order.

    Nested objects are flattened with '/' (``{"aux": {"lb": x}}`` -> ``aux/lb``). A truncated last line (a run
    killed mid-write) is skipped with a note; any other bad line is an error naming the file and line.
    """
    run_dir = Path(run_dir)
    file = run_dir / METRICS_FILE if run_dir.is_dir() else run_dir
    if not file.is_file():
        raise AnalysisError(f"{file}: no training log (the trainer writes {METRICS_FILE} into the run folder)")
    lines = file.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                print(f"note: {file}:{i}: ignoring a truncated last line", file=sys.stderr)
                continue
            raise AnalysisError(f"{file}:{i}: not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise AnalysisError(f"{file}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(_flatten(row))
    rows = [r for r in rows if isinstance(r.get("step"), (int, float)) and not isinstance(r.get("step"), bool)]
    if not rows:
        raise AnalysisError(f"{file}: no logged step (no line with a numeric 'step')")
    return sorted(rows, key=lambda r: r["step"])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _series(rows: list[dict], key: str):
    """(steps (n,), values (n,) or (n, ...)) of ``key`` over the rows that have it; None when absent or ragged."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if not pts:
        return None
    vals = [v[0] if isinstance(v, list) and len(v) == 1 and not isinstance(v[0], list) else v for _, v in pts]
    if any(isinstance(v, (bool, str)) for v in vals):
        return None
    try:
        arr = np.array(vals, dtype=float)
    except (ValueError, TypeError):
        return None  # ragged lists (the layer count changed mid-run) cannot be drawn as one array
    return np.array([p[0] for p in pts], dtype=float), arr


def _first(rows: list[dict], *keys: str, ndim: Optional[int] = None):
    """The first of ``keys`` present in the log (with values of ``ndim`` dimensions per row): (key, series)."""
    for k in keys:
        s = _series(rows, k)
        if s is not None and (ndim is None or s[1].ndim - 1 == ndim):
            return k, s
    return None, None


def _keys(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def plot_training_curves(run_dir: str | Path, out_dir: Optional[str | Path] = None) -> list[Path]:
    """PNG curves of a run's ``metrics.jsonl`` (keys of ``dit_moe.training``); returns the files written.

    ``train_loss.png``           loss, mse, vb, aux_loss (log scale when positive)
    ``train_active_experts.png`` activated experts: mean over layers, min-max band over layers, each layer thin,
                                 the target (dashed)
    ``train_threshold.png``      DTop-p: threshold p (one curve per layer for scope layer), controller integral,
                                 mean DRN scale
    ``train_load_balance.png``   load-balance aux term (aux/lb), expert-load CV per layer (mean and min-max band,
                                 from expert_load), load_max (max load x E; 1 = balanced)
    A figure whose keys the log lacks is skipped (a dense run has only the loss); a log with none of them is an
    error. Default ``out_dir``: ``<run>/analysis``.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    run = run_dir if run_dir.is_dir() else run_dir.parent
    out_dir = Path(out_dir) if out_dir is not None else run / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    # Loss and its parts.
    loss_keys = [k for k in ("loss", "mse", "vb", "aux_loss") if _first(rows, k, ndim=0)[0]]
    loss_keys += [k for k in _keys(rows) if k.endswith("loss") and k not in loss_keys and _first(rows, k, ndim=0)[0]]
    if loss_keys:
        fig, ax = _figure(5.5, 3.4)
        ax = ax[0, 0]
        positive = True
        for k in loss_keys:
            steps, v = _series(rows, k)
            ax.plot(steps, v, lw=2 if k == "loss" else 1, label=k)
            positive &= bool((v > 0).all())
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{run.name}: losses", fontsize=9)
        ax.legend(fontsize=7)
        _save(fig, out_dir, "train_loss.png", written)

    # Activated experts against the target.
    _, mean = _first(rows, "active_experts", ndim=0)
    _, layers = _first(rows, "active_experts_per_layer", ndim=1)
    _, target = _first(rows, "target_experts", ndim=0)
    if mean is None and layers is not None:
        mean = (layers[0], layers[1].mean(1))
    if mean is not None:
        fig, ax = _figure(5.5, 3.4)
        ax = ax[0, 0]
        if layers is not None:
            ls, lv = layers
            ax.fill_between(ls, lv.min(1), lv.max(1), color="tab:blue", alpha=0.2, label="min-max over layers")
            for j in range(lv.shape[1]):
                ax.plot(ls, lv[:, j], color="tab:blue", lw=0.5, alpha=0.5)
        ax.plot(*mean, color="tab:blue", lw=2, label="mean over layers")
        if target is not None:
            ax.plot(*target, color="k", ls="--", lw=1.2, label="target")
        ax.set_xlabel("step")
        ax.set_ylabel("activated experts per token")
        ax.set_title(f"{run.name}: activated experts", fontsize=9)
        ax.legend(fontsize=7)
        _save(fig, out_dir, "train_active_experts.png", written)

    # DTop-p controller.
    _, thr = _first(rows, "threshold")
    if thr is not None:
        panels = [("threshold", thr)]
        for key, label in (("controller_integral", "integral I"), ("drn_scale", "mean DRN scale")):
            _, s = _first(rows, key)
            if s is not None:
                panels.append((label, s))
        fig, axes = _figure(5.5, 2.2 * len(panels) + 0.6, nrows=len(panels), sharex=True)
        for i, (label, (steps, v)) in enumerate(panels):
            ax = axes[i, 0]
            if v.ndim == 1:
                ax.plot(steps, v, lw=1.5, color="tab:red" if i == 0 else "tab:gray")
            else:  # scope layer: one entry per MoE layer
                for j in range(v.shape[1]):
                    ax.plot(steps, v[:, j], lw=1, label=f"layer {j}")
                if v.shape[1] <= 8:
                    ax.legend(fontsize=6, ncol=2)
            ax.set_ylabel("top-p threshold p" if i == 0 else label, fontsize=8)
        axes[0, 0].set_title(f"{run.name}: DTop-p controller", fontsize=9)
        axes[-1, 0].set_xlabel("step")
        _save(fig, out_dir, "train_threshold.png", written)

    # Load balance.
    panels = []
    lb_keys = [k for k in _keys(rows) if k.split("/")[-1] in ("lb", "lb_loss") and _first(rows, k, ndim=0)[0]]
    if lb_keys:
        panels.append("lb")
    _, load = _first(rows, "expert_load", ndim=2)                               # (n, L, E)
    if load is not None:
        panels.append("cv")
    _, load_max = _first(rows, "load_max", ndim=0)
    if load_max is not None:
        panels.append("max")
    if panels:
        fig, axes = _figure(5.5, 2.2 * len(panels) + 0.6, nrows=len(panels), sharex=True)
        for i, panel in enumerate(panels):
            ax = axes[i, 0]
            if panel == "lb":
                for k in lb_keys:
                    ax.plot(*_series(rows, k), label=k)
                ax.set_ylabel("load-balance term", fontsize=8)
                ax.legend(fontsize=7)
            elif panel == "cv":
                steps, v = load
                cv = v.std(2) / np.clip(v.mean(2), 1e-12, None)                 # (n, L): 0 = balanced
                ax.fill_between(steps, cv.min(1), cv.max(1), color="tab:green", alpha=0.25, label="min-max over layers")
                ax.plot(steps, cv.mean(1), color="tab:green", lw=2, label="mean over layers")
                ax.set_ylabel("expert load CV", fontsize=8)
                ax.legend(fontsize=7)
            else:
                ax.plot(*load_max, color="tab:orange")
                ax.axhline(1.0, color="k", ls=":", lw=1)
                ax.set_ylabel("max load x E", fontsize=8)
        axes[0, 0].set_title(f"{run.name}: load balance", fontsize=9)
        axes[-1, 0].set_xlabel("step")
        _save(fig, out_dir, "train_load_balance.png", written)

    if not written:
        raise AnalysisError(f"{run_dir}: {METRICS_FILE} has none of the keys the curves draw (loss, active_experts, "
                            f"threshold, aux/lb, expert_load, load_max); keys seen: {sorted(_keys(rows))[:20]}")
    return [out_dir / f for f in written]


# ---------------------------------------------------------------------------------------------------------
#                                          Command line
# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .sampling.flags import add_checkpoint_arguments, add_class_arguments, add_sampler_arguments

    p = argparse.ArgumentParser(
        prog="dit-moe-analyze",
        description="Routing statistics and plots of an MoE DiT checkpoint (activated experts per layer, timestep, "
                    "class and patch; expert load; DRN scale) and/or training curves of a run.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--run", help="run directory: plot the training curves of its metrics.jsonl")
    p.add_argument("--out", help="output folder (default <run>/analysis, or <checkpoint>/analysis outside a run)")
    add_class_arguments(p, "default 2")
    p.add_argument("--spatial-steps", type=int, default=4, help="timesteps shown in the spatial maps")
    add_checkpoint_arguments(p)
    add_sampler_arguments(p, steps_help="; analyze: 50 unless given")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.run is None:
        parser.error("give a CHECKPOINT, --run DIR, or both")
    from .sampling.errors import SamplingError

    errors: tuple[type[Exception], ...] = (AnalysisError, SamplingError, ConfigError, FileNotFoundError)
    if args.checkpoint is not None:
        from .checkpoint import CheckpointError
        errors += (CheckpointError,)
    try:
        if args.checkpoint is not None:
            from .sampling.flags import flag_overrides

            given = flag_overrides(args)
            for key in ("steps", "seed", "batch_size", "num_per_class"):     # analysis defaults, not the checkpoint's
                given.pop(key, None)
            report = analyze_checkpoint(
                args.checkpoint, out_dir=args.out, classes=args.classes,
                num_per_class=2 if args.num_per_class is None else args.num_per_class,
                num_steps=50 if args.steps is None else args.steps, seed=0 if args.seed is None else args.seed,
                device=args.device, which=args.weights, spatial_steps=args.spatial_steps,
                batch_size=32 if args.batch_size is None else args.batch_size, vae=args.vae, **given)
            ae = report["active_experts"]
            print(f"{report['model']} ({report['routing']}): {ae['mean']:.3f} activated experts per token; per layer "
                  + " ".join(f"{v:.2f}" for v in ae["per_layer"]))
            print(f"wrote {len(report['files'])} files to {report['out_dir']}: {', '.join(report['files'])}")
        if args.run is not None:
            files = plot_training_curves(args.run, out_dir=args.out)
            print(f"wrote {', '.join(str(f) for f in files)}")
    except errors as e:
        print(f"dit-moe-analyze: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
