"""The PNGs of a checkpoint analysis (``analyze_checkpoint``'s report), drawn on headless Agg figures."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["MAX_LAYER_GROUPS", "MAX_SPATIAL_ROWS"]   # _plot_checkpoint: analyze_checkpoint's figures

MAX_LAYER_GROUPS = 4      # curves in the per-timestep plot
MAX_SPATIAL_ROWS = 6      # images in the spatial plot (one per class)


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw):
    """A Figure on the Agg canvas (no pyplot state, no display needed) and its axes."""
    if "matplotlib.pyplot" not in sys.modules:     # no one chose a backend yet: never a display one
        matplotlib.use("Agg")
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
