"""The report's per-seed, per-layer and compute/quality parts (the arm table and the paired comparisons are in
``report``): Markdown tables and plots from the runs' records.

* per-seed values of FID, accuracy and loss (the paired tables give differences; this gives the values);
* per-layer activated experts at the end of training (training log), on the probe and while sampling, and for
  DTop-p the DRN scale per layer and how many layers sit at the ``drn_scale_max`` bound;
* compute against quality at sampling time (``sweep``): per arm and budget, FID, accuracy and the measured activated
  experts per token (= the MoE layers' compute relative to one expert per token), mean over seeds.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["per_seed_table", "layer_summary", "layer_table", "sweep_summary", "sweep_table", "plot_sweep",
           "plot_layers"]


def _by_arm(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r["arm"], []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["seed"])
    return out


def _num(v, digits: int, scale: float = 1.0) -> str:
    return "-" if v is None or not math.isfinite(float(v)) else f"{float(v) * scale:.{digits}f}"


def per_seed_table(runs: list[dict]) -> str:
    """Arm x (FID, accuracy, loss) with every seed's value (Markdown)."""
    lines = ["| arm | FID per seed | accuracy % per seed | final loss per seed | experts train | experts sampling |",
             "|---|---|---|---|---|---|"]
    for arm, rs in _by_arm(runs).items():
        cell = lambda key, d, scale=1.0: " / ".join(f"s{r['seed']}: {_num(r.get(key), d, scale)}" for r in rs)
        lines.append(f"| {arm} | {cell('fid', 2)} | {cell('classifier_accuracy', 1, 100)} | {cell('final_loss', 4)} | "
                     f"{cell('train_active_mean', 2)} | {cell('sample_active_mean', 2)} |")
    return "\n".join(lines)


def _mean_rows(rows: list) -> Optional[list]:
    rows = [r for r in rows if r]
    return np.mean(np.array(rows, dtype=float), 0).tolist() if rows else None


def layer_summary(runs: list[dict]) -> dict:
    """Per MoE arm: per-layer means over seeds of the activated experts (train / probe / sampling) and DTop-p's DRN
    scale, the bound, and the layers at the bound per seed."""
    out = {}
    for arm, rs in _by_arm(runs).items():
        states = [r.get("routing_state") for r in rs]
        if not any(states):
            continue
        states = [s or {} for s in states]
        entry = {
            "seeds": [r["seed"] for r in rs],
            "train": _mean_rows([s.get("train_active_per_layer") for s in states]),
            "probe": _mean_rows([r.get("probe_active_per_layer") for r in rs]),
            "sampling": _mean_rows([s.get("sample_active_per_layer") for s in states]),
        }
        if any("drn_scale_per_layer" in s for s in states):
            entry["drn_scale"] = _mean_rows([s.get("drn_scale_per_layer") for s in states])
            entry["drn_scale_max"] = _mean_rows([s.get("drn_scale_max_per_layer") for s in states])
            entry["drn_at_bound_per_seed"] = [s.get("drn_layers_at_bound") for s in states]
            entry["threshold"] = _mean_rows([s.get("threshold_per_layer") for s in states])
        out[arm] = entry
    return out


def layer_table(layers: dict) -> str:
    """Per arm and read-out, one column per MoE layer (front to back), Markdown."""
    if not layers:
        return ""
    n = max(len(v) for e in layers.values() for k in ("train", "probe", "sampling") if (v := e.get(k)))
    lines = ["| arm | read-out | " + " | ".join(f"layer {i}" for i in range(n)) + " | mean |",
             "|---|---|" + "---|" * (n + 1)]
    for arm, e in layers.items():
        for key, label in (("train", "experts, training (last quarter)"), ("probe", "experts, probe (end)"),
                           ("sampling", "experts, sampling"), ("drn_scale", "DRN scale"),
                           ("drn_scale_max", "DRN scale bound"), ("threshold", "threshold p")):
            v = e.get(key)
            if not v:
                continue
            digits = 3 if key == "threshold" else 2
            lines.append(f"| {arm} | {label} | " + " | ".join(_num(x, digits) for x in v)
                         + f" | {_num(float(np.mean(v)), digits)} |")
        if e.get("drn_at_bound_per_seed") is not None:
            lines.append(f"| {arm} | layers at the DRN bound | "
                         + " / ".join(f"s{s}: {b}" for s, b in zip(e["seeds"], e["drn_at_bound_per_seed"]))
                         + " |" * n + " |")
    return "\n".join(lines)


def sweep_summary(runs: list[dict]) -> dict:
    """Per swept arm: kind, trained budget, and per budget the mean and std over seeds of FID, accuracy and the
    measured activated experts, with the per-seed values."""
    out = {}
    for arm, rs in _by_arm(runs).items():
        sweeps = [(r["seed"], r["sweep"]) for r in rs if r.get("sweep")]
        if not sweeps:
            continue
        kind = sweeps[0][1]["kind"]
        values = [p[kind] for p in sweeps[0][1]["points"]]
        points = []
        for v in values:
            per_seed = {s: next(p for p in sw["points"] if p[kind] == v) for s, sw in sweeps}
            point = {kind: v, "seeds": list(per_seed)}
            for key in ("fid", "classifier_accuracy", "active_mean"):
                vals = [p.get(key) for p in per_seed.values() if p.get(key) is not None]
                point[key] = float(np.mean(vals)) if vals else None
                point[f"{key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                point[f"{key}_per_seed"] = [p.get(key) for p in per_seed.values()]
            points.append(point)
        out[arm] = {"kind": kind, "trained": sweeps[0][1]["trained"], "seeds": [s for s, _ in sweeps],
                    "num_samples": sweeps[0][1]["settings"]["num_samples"], "points": points}
    return out


def sweep_table(sweep: dict) -> str:
    if not sweep:
        return ""
    lines = ["| arm | sampling budget | measured experts/token (= relative MoE FLOPs) | FID | accuracy % | seeds |",
             "|---|---|---|---|---|---|"]
    for arm, s in sweep.items():
        for p in s["points"]:
            value = p[s["kind"]]
            trained = value == s["trained"]
            budget = (f"target {value:g}" + (" (trained target; threshold re-calibrated)" if trained else "")
                      if s["kind"] == "target_experts" else f"k = {value}" + (" (trained)" if trained else ""))
            ms = lambda k, d, sc=1.0: f"{_num(p[k], d, sc)} ± {_num(p[k + '_std'], d, sc)}"
            lines.append(f"| {arm} | {budget} | {ms('active_mean', 2)} | {ms('fid', 2)} | "
                         f"{ms('classifier_accuracy', 1, 100)} | {len(p['seeds'])} |")
    return "\n".join(lines)


def plot_sweep(sweep: dict, out_dir: Path) -> Optional[Path]:
    """compute_quality.png: FID and accuracy against the measured activated experts, one line per arm."""
    if not sweep:
        return None
    import matplotlib     # pyplot here, after choosing Agg: importing it at the top would fix the caller's backend
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (arm, s) in enumerate(sweep.items()):
        color = plt.cm.tab10(i % 10)
        pts = sorted(s["points"], key=lambda p: p["active_mean"] if p["active_mean"] is not None else math.inf)
        x = [p["active_mean"] for p in pts]
        for ax, key, scale in ((axes[0], "fid", 1.0), (axes[1], "classifier_accuracy", 100.0)):
            y = [p[key] * scale if p[key] is not None else np.nan for p in pts]
            err = [p[f"{key}_std"] * scale for p in pts]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, color=color, label=arm)
            for p, xv, yv in zip(pts, x, y):
                if p[s["kind"]] == s["trained"]:
                    ax.scatter([xv], [yv], s=90, facecolors="none", edgecolors=color, zorder=4)
    axes[0].set_ylabel("FID (digits-cnn; lower is better)")
    axes[1].set_ylabel("classifier accuracy % (higher is better)")
    for ax in axes:
        ax.set_xlabel("activated experts per token while sampling (relative MoE FLOPs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Compute against quality at sampling time (mean ± std over seeds; circle = trained budget)",
                 fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / "compute_quality.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layers(layers: dict, out_dir: Path) -> Optional[Path]:
    """active_per_layer.png: activated experts per MoE layer at the end of training and while sampling."""
    if not layers:
        return None
    import matplotlib     # pyplot here, after choosing Agg: importing it at the top would fix the caller's backend
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for i, (arm, e) in enumerate(layers.items()):
        color = plt.cm.tab20(i % 20)
        for ax, key in ((axes[0], "train"), (axes[1], "sampling")):
            if e.get(key):
                ax.plot(range(len(e[key])), e[key], marker="o", ms=3, color=color, label=arm)
    axes[0].set_title("end of training (training log, last quarter)", fontsize=9)
    axes[1].set_title("while sampling (both CFG halves)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("MoE layer (front to back)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("activated experts per token (mean over seeds)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(out_dir) / "active_per_layer.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
