"""Training curves: a run's ``metrics.jsonl`` (written by ``dit_moe.training``) as PNGs. No torch import."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import AnalysisError
from .plots import _figure, _save

__all__ = ["METRICS_FILE", "read_metrics", "plot_training_curves"]

METRICS_FILE = "metrics.jsonl"


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
