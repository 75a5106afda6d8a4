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

if TYPE_CHECKING:  # torch is imported where it is used: `--run` (training curves) never loads it
    import torch

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


class AnalysisError(ValueError):
    """Bad analysis inputs (dense model, missing logs, bad class ids); the message names the file or value."""


# ---------------------------------------------------------------------------------------------------------
#                                       Recording routing decisions
# ---------------------------------------------------------------------------------------------------------

def _moe_blocks(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(block index, MoEMLP) of every MoE block, in depth order."""
    from .models.moe import MoEMLP, moe_layers

    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        found = [(i, b.mlp) for i, b in enumerate(blocks) if isinstance(getattr(b, "mlp", None), MoEMLP)]
    else:
        found = list(enumerate(moe_layers(model)))
    return found


class RoutingRecorder:
    """Forward hooks on every MoE layer's router that keep each call's routing decision on the host.

    Per router call and MoE layer l it stores ``num_active`` (N,) int16 (experts of each token) and the mask's
    per-expert counts over the first ``split`` tokens and over the rest, (2, E) int64 (``split`` = the tokens of the
    conditional half under CFG; None = all tokens in the first row). ``step`` tags the calls with the trajectory
    step they belong to. Use as a context manager; the model is not modified.
    """

    def __init__(self, model: torch.nn.Module):
        found = _moe_blocks(model)
        if not found:
            name = getattr(getattr(model, "model_config", None), "name", type(model).__name__)
            raise AnalysisError(f"{name} is not an MoE model (no MoE layers, no routers): nothing to analyze")
        self.block_index = [i for i, _ in found]
        self.routers = [mlp.router for _, mlp in found]
        self.num_experts = self.routers[0].num_experts
        self.step = 0
        self.split: Optional[int] = None
        self.calls: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in self.routers]
        self._handles = []

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def clear(self) -> None:
        self.calls = [[] for _ in self.routers]

    def _hook(self, layer: int):
        import torch

        def hook(module, inputs, out):
            if getattr(out, "num_active", None) is None or getattr(out, "mask", None) is None:
                raise AnalysisError(f"router {type(module).__name__} of MoE layer {layer} returned no num_active/mask")
            mask = out.mask.detach()
            n = mask.shape[0] if self.split is None else self.split
            counts = torch.stack([mask[:n].sum(0), mask[n:].sum(0)]).to("cpu", torch.int64)
            self.calls[layer].append((self.step, out.num_active.detach().to("cpu", torch.int16), counts))
        return hook

    def __enter__(self) -> "RoutingRecorder":
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def per_layer_mean(self) -> torch.Tensor:
        """Mean activated experts per token of each layer over every recorded call, (L,) float64."""
        import torch

        out = []
        for calls in self.calls:
            if not calls:
                out.append(float("nan"))
                continue
            n = torch.cat([c[1] for c in calls]).to(torch.float64)
            out.append(float(n.mean()))
        return torch.tensor(out, dtype=torch.float64)

    def per_layer_load(self) -> torch.Tensor:
        """Share of (token, expert) assignments per expert of each layer over every recorded call, (L, E)."""
        import torch

        rows = []
        for calls in self.calls:
            c = sum(call[2].sum(0) for call in calls) if calls else torch.zeros(self.num_experts, dtype=torch.int64)
            rows.append(c.to(torch.float64) / max(int(c.sum()), 1))
        return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------
#                                   Checkpoint analysis: the trajectory
# ---------------------------------------------------------------------------------------------------------

def default_out_dir(checkpoint: str | Path) -> Path:
    """``<run>/analysis`` for a checkpoint at ``<run>/checkpoints/<name>``, else ``<checkpoint>/analysis``."""
    path = Path(checkpoint)
    if path.parent.name == "checkpoints":
        return path.parent.parent / "analysis"
    return path / "analysis"


def _data_info(ckpt):
    """The checkpoint's DataInfo, or None (then images are shown as pixels when they have 1 or 3 channels)."""
    from .data import DataInfo

    if not ckpt.data_info:
        return None
    try:
        return DataInfo.from_dict(ckpt.data_info)
    except (ValueError, TypeError) as e:
        raise AnalysisError(f"{ckpt.path}: invalid data_info ({e})") from e


def _decoder(info, cfg, device, vae: Optional[str]):
    """decode latents -> images in [-1, 1], or None when nothing says how to decode (no image under the maps)."""
    from .data import DataInfo, load_decoder

    if info is None:
        if vae is None and cfg.in_channels not in (1, 3):
            print(f"note: no data_info and {cfg.in_channels}-channel latents: spatial maps are drawn without the image"
                  " (pass --vae to decode)", file=sys.stderr)
            return None
        info = DataInfo(num_classes=cfg.num_classes, in_channels=cfg.in_channels, latent_size=cfg.input_size,
                        image_size=cfg.input_size, class_names=tuple(str(i) for i in range(cfg.num_classes)),
                        vae=None, scaling_factor=1.0, source="unknown")
    return load_decoder(info, device=device, vae=vae)


def _pick_classes(classes, num_classes: int, seed: int, where: str) -> list[int]:
    import torch

    if classes is not None:
        ids = [int(c) for c in classes]
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
    num_steps: int = 50,
    cfg_scale: Optional[float] = None,
    seed: int = 0,
    device: Optional[str | torch.device] = None,
    which: str = "ema",
    num_buckets: int = 10,
    spatial_steps: int = 4,
    batch_size: int = 32,
    vae: Optional[str] = None,
) -> dict:
    """Analyse the routing of the checkpoint at ``path`` (or a run's latest) on its own sampling trajectory.

    ``sampler`` and ``cfg_scale`` default to the checkpoint's sample config (ddpm / 1.5 without one); ``num_steps``
    sampling steps. Writes the PNGs listed in the module docstring and ``analysis.json`` into ``out_dir``
    (default ``default_out_dir``) and returns the JSON content.
    """
    import torch

    from .checkpoint import build_from_checkpoint, load_checkpoint
    from .config import SampleConfig
    from .data import to_uint8
    from .registry import parse_name
    from .sampling import SamplerSettings, SamplingError

    ckpt = load_checkpoint(path)          # CheckpointError naming the path when it is missing or broken
    cfg = ckpt.model_config
    arch = parse_name(cfg.name)
    if not arch.is_moe:
        raise AnalysisError(f"{ckpt.path}: {cfg.name} is not an MoE model (a dense model has no routers to analyze)")
    if num_per_class < 1 or batch_size < 1 or spatial_steps < 1 or num_buckets < 1:
        raise AnalysisError("num_per_class, batch_size, spatial_steps and num_buckets must be >= 1")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model, ckpt = build_from_checkpoint(ckpt.path, which=which, device=device)
    defaults = ckpt.experiment.sample if ckpt.experiment is not None else SampleConfig()
    try:
        settings = SamplerSettings(
            sampler=sampler or defaults.sampler, steps=num_steps,
            cfg_scale=defaults.cfg_scale if cfg_scale is None else cfg_scale,
            guidance_channels=defaults.guidance_channels).validate(cfg.in_channels)
    except SamplingError as e:
        raise AnalysisError(f"{ckpt.path}: {e}") from e
    info = _data_info(ckpt)
    class_ids = _pick_classes(classes, cfg.num_classes, seed, str(ckpt.path))
    names = [info.class_names[c] if info is not None and c < len(info.class_names) else str(c) for c in class_ids]
    labels = torch.tensor([c for c in class_ids for _ in range(num_per_class)], dtype=torch.long)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(ckpt.path)
    out_dir.mkdir(parents=True, exist_ok=True)

    recorder = RoutingRecorder(model)
    trace = _trace(model, recorder, labels, settings, shape, seed, batch_size, device)
    images = None
    decode = _decoder(info, cfg, device, vae)
    if decode is not None:
        images = to_uint8(decode(trace["latents"].to(device))).cpu()

    report = _summarize(trace, recorder, model, ckpt, arch, settings, class_ids, names, labels, seed,
                        num_per_class, num_buckets, spatial_steps)
    files = _plot_checkpoint(report, trace, images, labels, class_ids, names, out_dir)
    report["files"] = files + [JSON_FILE]
    report["out_dir"] = str(out_dir)
    (out_dir / JSON_FILE).write_text(json.dumps(report, indent=1))
    return report


def _trace(model, recorder: RoutingRecorder, labels: torch.Tensor, settings, shape, seed: int, batch_size: int,
           device) -> dict:
    """Sample ``labels`` (in batches) and gather every step's routing into dense arrays.

    Returns ``active`` (S, L, 2, Ns, T) int16 -- experts of token t of image n at step s in layer l, half 0 the
    conditional copy, half 1 the unconditional one (-1 without guidance) --, ``counts`` (S, L, 2, E) int64 expert
    loads of each half, ``timesteps`` (S,), ``latents`` (Ns, C, h, w).
    """
    import torch

    from .sampling import make_generators, sample_latents

    Ns = labels.shape[0]
    guided = settings.cfg_scale != 1.0
    T = (shape[1] // model.patch_size) * (shape[2] // model.patch_size)
    S, L, E = settings.steps, recorder.num_layers, recorder.num_experts
    active = torch.full((S, L, 2, Ns, T), -1, dtype=torch.int16)
    counts = torch.zeros(S, L, 2, E, dtype=torch.int64)
    timesteps: list[int] = []
    latents = []
    with torch.no_grad(), recorder:
        for b0 in range(0, Ns, batch_size):
            idx = list(range(b0, min(b0 + batch_size, Ns)))
            B = len(idx)
            rows = 2 * B if guided else B
            recorder.clear()
            recorder.split = B * T
            seen: list[int] = []

            def callback(i, t, x_in, seen=seen):
                recorder.step = i
                seen.append(int(t))

            lat = sample_latents(model, labels[idx], make_generators(seed, idx), settings, shape, device=device,
                                 callback=callback)
            latents.append(lat.cpu())
            if len(seen) != S:
                raise AnalysisError(f"the {settings.sampler} scheduler ran {len(seen)} steps, expected {S}")
            timesteps = seen
            for l, calls in enumerate(recorder.calls):
                if len(calls) != S:
                    raise AnalysisError(f"MoE layer {l}: {len(calls)} router calls for {S} sampling steps "
                                        "(the analysis expects one routed forward per step)")
                for step, n, c in calls:
                    if n.numel() != rows * T:
                        raise AnalysisError(f"MoE layer {l}: {n.numel()} routed tokens, expected {rows} images x {T}")
                    n = n.view(rows, T)
                    active[step, l, 0, b0:b0 + B] = n[:B]
                    if guided:
                        active[step, l, 1, b0:b0 + B] = n[B:]
                    counts[step, l] += c
    return {"active": active, "counts": counts, "timesteps": timesteps, "latents": torch.cat(latents),
            "guided": guided, "grid": (shape[1] // model.patch_size, shape[2] // model.patch_size)}


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
                     "seed": seed, "classes": class_ids, "num_per_class": num_per_class, "guided": trace["guided"],
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
    p = argparse.ArgumentParser(
        prog="dit-moe-analyze",
        description="Routing statistics and plots of an MoE DiT checkpoint (activated experts per layer, timestep, "
                    "class and patch; expert load; DRN scale) and/or training curves of a run.")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--run", help="run directory: plot the training curves of its metrics.jsonl")
    p.add_argument("--out", help="output folder (default <run>/analysis, or <checkpoint>/analysis outside a run)")
    p.add_argument("--classes", type=int, nargs="+", help="class ids (default: all when <= 10 classes, else 6 seeded)")
    p.add_argument("--num-per-class", type=int, default=2)
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm"), help="default: the checkpoint's sample config")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--cfg-scale", type=float, help="default: the checkpoint's sample config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--spatial-steps", type=int, default=4, help="timesteps shown in the spatial maps")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--vae", help="decoder override (hub id or local folder) for the images under the maps")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.run is None:
        parser.error("give a CHECKPOINT, --run DIR, or both")
    errors: tuple[type[Exception], ...] = (AnalysisError, ConfigError, FileNotFoundError)
    if args.checkpoint is not None:
        from .checkpoint import CheckpointError
        errors += (CheckpointError,)
    try:
        if args.checkpoint is not None:
            report = analyze_checkpoint(
                args.checkpoint, out_dir=args.out, classes=args.classes, num_per_class=args.num_per_class,
                sampler=args.sampler, num_steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                device=args.device, which=args.weights, spatial_steps=args.spatial_steps,
                batch_size=args.batch_size, vae=args.vae)
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
