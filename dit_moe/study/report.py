"""A study's results: per-arm mean and spread across seeds and the paired per-seed comparisons against the baseline
arm (results.json), the Markdown tables with one plain statement per comparison (results.md), the plots."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import load_config
from ..registry import parse_name
from .config import CALIBRATION_FILE, StudyConfig, arm_objective
from .paired import (PAIRED_METRICS, better_text, compare_arms, interaction, interaction_statement, interval_text,
                     statement)
from .readouts import layer_summary, layer_table, per_seed_table, plot_layers, plot_sweep, sweep_summary, sweep_table

__all__ = ["STAT_KEYS", "aggregate", "results_table", "paired_tables", "plot_study", "report_text", "write_report"]


STAT_KEYS = ("final_loss", "fid", "classifier_accuracy", "train_active_mean", "train_active_step_std",
             "probe_active_mean", "probe_active_token_std", "sample_active_mean", "sample_active_token_std",
             "sec_per_step")


def _mean_std(values) -> tuple[Optional[float], Optional[float]]:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def aggregate(study: StudyConfig, runs: list[dict], timing: Optional[dict] = None) -> dict:
    """Per arm: mean and std (across seeds, ddof 1) of every STAT_KEYS entry, plus the per-run records."""
    arms = {}
    for arm in study.arms:
        mine = [r for r in runs if r.get("arm") == arm.name]
        if not mine:
            continue
        stats = {}
        for k in STAT_KEYS:
            m, s = _mean_std([r.get(k) for r in mine])
            stats[k] = {"mean": m, "std": s}
        arms[arm.name] = {"seeds": [r["seed"] for r in mine], "model": mine[0]["model"], "routing": mine[0]["routing"],
                          "num_experts": parse_name(mine[0]["model"]).num_experts,
                          "timing_sec_per_step": (timing or {}).get(arm.name),
                          "objective": mine[0].get("objective", "ddpm"), "sampler": mine[0].get("sampler"),
                          "lb_coef": mine[0].get("lb_coef"), "default_mode": mine[0].get("default_mode"),
                          "default_moe": mine[0]["default_moe"], "threshold": mine[0].get("threshold"),
                          "balance_bias": mine[0].get("balance_bias", False), "ec_pool": mine[0].get("ec_pool"),
                          "description": arm.description, "overrides": arm.overrides, **stats}
    cmp = study.comparison
    pairs = {a.name: study.baseline_of(a) for a in study.arms if study.baseline_of(a) is not None}
    interactions = [interaction(runs, i.name, i.first, i.second, cmp.confidence) for i in cmp.interactions]
    calib = study.output / CALIBRATION_FILE
    # The base config with the study's sampler (as every arm gets it): the base file's own sample section may belong
    # to another objective than the one the base overrides pin.
    sampler, steps = study.evaluation.sampler_for(arm_objective(study, dataclasses.replace(study.arms[0], overrides=[])))
    base = load_config(study.base_config, [*study.base_overrides, f"sample.sampler={sampler}",
                                           f"sample.steps={steps}", "sample.guidance_interval=null"])
    return {
        "name": study.name, "config": str(study.path), "seeds": study.seeds,
        "train": {"steps": base.train.steps, "global_batch_size": base.train.global_batch_size, "lr": base.train.lr,
                  "model": base.model.name},
        "evaluation": dataclasses.asdict(study.evaluation),
        "calibration": json.loads(calib.read_text()) if calib.is_file() else None,
        "arms": arms,
        "comparison": {"confidence": cmp.confidence, "rule": "resolved = the paired t interval excludes 0"},
        "paired": compare_arms(runs, pairs, cmp.confidence),
        "interactions": [i for i in interactions if i is not None],
        "runs": [{k: v for k, v in r.items() if k not in ("curve", "evaluation", "config")} for r in runs],
        "curves": {f"{r['arm']}-s{r['seed']}": r["curve"] for r in runs},
        "layers": layer_summary(runs),
        "sweep": sweep_summary(runs),
    }


def _fmt(stat: dict, digits: int, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def results_table(summary: dict) -> str:
    """The Markdown table of ``summary`` (mean ± std across seeds)."""
    head = ("| arm | routing | final loss | FID | accuracy % | experts train (mean ± std over steps) | "
            "per-token std train | experts sampling | per-token std sampling | s/step (study) | s/step (timing pass) |")
    lines = [head, "|" + "---|" * 11]
    for name, a in summary["arms"].items():
        routing = a["routing"] + (f" ({a['ec_pool']} pool)" if a.get("ec_pool") else "") + \
            (" + balance bias" if a.get("balance_bias") else "") + (" + Default MoE" if a["default_moe"] else "")
        if a.get("default_mode") == "grad_only":
            routing += " (grad_only)"
        if a.get("lb_coef") is not None:
            routing += f", lb {a['lb_coef']:g}"
        if a.get("num_experts") == 1:
            routing = "dense (one always-on expert)"
        if a.get("objective", "ddpm") != "ddpm":
            routing += f"; {a['objective']}"
        if a["routing"] == "topp" and a.get("threshold") is not None:
            routing += f" (p={a['threshold']:.3g})"
        train_active = "-"
        if a["train_active_mean"]["mean"] is not None:
            train_active = f"{a['train_active_mean']['mean']:.2f} ± {a['train_active_step_std']['mean']:.2f}"
            if a["train_active_mean"]["std"]:
                train_active += f" (seeds ± {a['train_active_mean']['std']:.2f})"
        lines.append(" | ".join([
            f"| {name}", routing, _fmt(a["final_loss"], 4), _fmt(a["fid"], 2), _fmt(a["classifier_accuracy"], 1, 100),
            train_active, _fmt(a["probe_active_token_std"], 2), _fmt(a["sample_active_mean"], 2),
            _fmt(a["sample_active_token_std"], 2), _fmt(a["sec_per_step"], 3),
            "-" if a.get("timing_sec_per_step") is None else f"{a['timing_sec_per_step']:.3f}"]) + " |")
    return "\n".join(lines)


def paired_tables(summary: dict) -> str:
    """Per metric, every arm against its baseline seed by seed (differences, mean, interval, sign count, verdict),
    then one statement per comparison and the interactions (Markdown)."""
    conf = summary.get("comparison", {}).get("confidence", 0.95)
    paired = summary.get("paired") or {}
    if not paired:
        return ""
    out = [f"Paired by seed: d_s = arm_s - baseline_s; mean, {conf:.0%} paired t interval (n - 1 dof), seeds where "
           "the arm is better (sign test, two-sided exact p); resolved = the interval excludes 0."]
    for key, (label, better, scale, digits) in PAIRED_METRICS.items():
        rows = [(arm, p) for arm, p in paired.items() if key in p["metrics"]]
        if not rows:
            continue
        out += ["", f"**{label}** ({better} is better)", "",
                "| arm | baseline | per-seed differences | mean [interval] | better on | sign p | verdict |",
                "|---|---|---|---|---|---|---|"]
        for arm, p in rows:
            st = p["metrics"][key]
            diffs = " / ".join(f"s{s}: {d * scale:+.{digits}f}" for s, d in zip(st["seeds"], st["diffs"]))
            sign = st["sign"]
            verdict = f"resolved at {st['n']} seeds" if st["resolved"] else "not resolved"
            out.append(f"| {arm} | {p['baseline']} | {diffs} | {interval_text(st, scale, digits, conf)} | "
                       f"{better_text(sign, st['n'])} | {sign['p']:.2f} | {verdict} |")
    out += ["", "Statements:", ""]
    for arm, p in paired.items():
        for key in ("fid", "classifier_accuracy"):
            if key in p["metrics"]:
                out.append(f"- {statement(arm, p['baseline'], key, p['metrics'][key], conf)}")
    inters = summary.get("interactions") or []
    if inters:
        out += ["", "Interactions (does a gap depend on a setting? change = second gap - first gap, per seed):", ""]
        for inter in inters:
            for key in ("fid", "classifier_accuracy", "final_loss"):
                if key in inter["metrics"]:
                    out.append(f"- {interaction_statement(inter, key, conf)}")
    return "\n".join(out)


def _smooth_mean(curves: list[tuple[list, list]]):
    """Mean over seeds of curves on their common steps: (steps (n,), mean (n,), std (n,))."""
    common = sorted(set.intersection(*[set(s) for s, _ in curves]))
    vals = []
    for s, v in curves:
        m = dict(zip(s, v))
        vals.append([m[k] if m[k] is not None else np.nan for k in common])
    arr = np.array(vals, dtype=float)
    return np.array(common), np.nanmean(arr, 0), np.nanstd(arr, 0)


def plot_study(summary: dict, out_dir: Path) -> list[Path]:
    """loss_curves.png, active_experts.png, fid.png, sampling_experts.png (means over seeds, bands = ±1 std) and,
    with a baseline, paired.png (per-seed differences against it with the paired interval)."""
    import matplotlib     # pyplot here, after choosing Agg: importing it at the top would fix the caller's backend
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    arms = list(summary["arms"])
    cmap, n_colors = (plt.cm.tab10, 10) if len(arms) <= 10 else (plt.cm.tab20, 20)     # v2 has 13 arms
    colors = {a: cmap(i % n_colors) for i, a in enumerate(arms)}

    def curves_of(arm: str, key: str):
        return [(c["step"], c[key]) for name, c in summary["curves"].items() if name.rsplit("-s", 1)[0] == arm]

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in arms:
        steps, mean, std = _smooth_mean(curves_of(arm, "loss"))
        ax.plot(steps, mean, label=arm, color=colors[arm], lw=1.2)
        ax.fill_between(steps, mean - std, mean + std, color=colors[arm], alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("diffusion loss (mse + vb)")
    ax.set_title("Training loss (mean over seeds, band ±1 std)")
    tail = [v for arm in arms for _, v in curves_of(arm, "loss")]
    if tail:
        lows = [min(v[len(v) // 5:]) for v in tail]
        highs = [max(v[len(v) // 5:]) for v in tail]
        ax.set_ylim(min(lows) * 0.95, max(highs) * 1.05)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    files.append(out_dir / "loss_curves.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in arms:
        cs = curves_of(arm, "active")
        if not cs or all(v is None for _, c in cs for v in c):
            continue
        steps, mean, std = _smooth_mean(cs)
        ax.plot(steps, mean, label=arm, color=colors[arm], lw=1.2)
        ax.fill_between(steps, mean - std, mean + std, color=colors[arm], alpha=0.15, lw=0)
    ax.axhline(2.0, color="k", ls="--", lw=0.8, label="target 2")
    ax.set_xlabel("training step")
    ax.set_ylabel("activated experts per token (mean over layers)")
    ax.set_title("Activated experts during training (mean over seeds)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(out_dir / "active_experts.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "fid", "FID (digits-cnn features)"), (axes[1], "final_loss", "final diffusion loss")):
        means = [summary["arms"][a][key]["mean"] for a in arms]
        stds = [summary["arms"][a][key]["std"] for a in arms]
        ok = [i for i, m in enumerate(means) if m is not None]
        ax.bar([arms[i] for i in ok], [means[i] for i in ok], yerr=[stds[i] for i in ok], capsize=4,
               color=[colors[arms[i]] for i in ok])
        for i in ok:
            per_seed = [r[key] for r in summary["runs"] if r["arm"] == arms[i] and r.get(key) is not None]
            ax.scatter([arms[i]] * len(per_seed), per_seed, color="k", s=8, zorder=3)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=35, labelsize=8)
        if key == "final_loss" and ok:
            lo = min(means[i] - stds[i] for i in ok)
            hi = max(means[i] + stds[i] for i in ok)
            ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_title("FID of EMA samples (mean ± std over seeds; dots = seeds)")
    axes[1].set_title("final loss (last 10% of logged steps)")
    fig.tight_layout()
    files.append(out_dir / "fid.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for arm in arms:
        rows = [r["sample_active_per_bucket"] for r in summary["runs"]
                if r["arm"] == arm and r.get("sample_active_per_bucket")]
        if not rows:
            continue
        arr = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
        centers = (np.arange(arr.shape[1]) + 0.5) * 1000 / arr.shape[1]
        with warnings.catch_warnings():      # a bucket no sampling step fell into is NaN for every seed
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(arr, 0)
        ax.plot(centers, mean, marker="o", ms=3, label=arm, color=colors[arm])
        drawn = True
    if drawn:
        ax.axhline(2.0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("diffusion timestep t (bucket centre; 999 = pure noise)")
        ax.set_ylabel("activated experts per token")
        ax.set_title("Activated experts during sampling, per timestep (mean over seeds)")
        ax.legend(fontsize=8, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(out_dir / "sampling_experts.png")
        fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    paired = summary.get("paired") or {}
    if paired:
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(paired) + 1.6))
        for ax, key in zip(axes, ("fid", "classifier_accuracy")):
            label, better, scale, _ = PAIRED_METRICS[key]
            names = [a for a in paired if key in paired[a]["metrics"]]
            for y, arm in enumerate(names):
                st = paired[arm]["metrics"][key]
                if st["ci"] is not None:
                    lo, hi = st["ci"]
                    ax.plot([lo * scale, hi * scale], [y, y], color=colors.get(arm, "k"), lw=2.5, alpha=0.5)
                ax.scatter([d * scale for d in st["diffs"]], [y] * st["n"], color="k", s=10, zorder=3)
                ax.scatter([st["mean"] * scale], [y], color=colors.get(arm, "k"), marker="|", s=200, zorder=4)
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(range(len(names)), [f"{a} - {paired[a]['baseline']}" for a in names], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(f"{label} difference ({better} is better)")
            ax.grid(alpha=0.3, axis="x")
        conf = summary.get("comparison", {}).get("confidence", 0.95)
        fig.suptitle(f"Paired by seed against the baseline: dots = seeds, bar = mean, band = {conf:.0%} t interval",
                     fontsize=9)
        fig.tight_layout()
        files.append(out_dir / "paired.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    files += [p for p in (plot_layers(summary.get("layers"), out_dir), plot_sweep(summary.get("sweep"), out_dir)) if p]
    return files


def report_text(summary: dict) -> str:
    """results.md: the arm table, per-seed values, paired comparisons, per-layer routing, compute/quality sweep."""
    parts = [f"# {summary['name']}", ""]
    if summary.get("missing"):
        n = len(summary["runs"])
        parts += [f"**In progress: {n} of {n + len(summary['missing'])} runs finished**; not yet: "
                  + ", ".join(summary["missing"]) + ". Nothing below is a conclusion of the study yet.", ""]
    parts += ["Mean ± std over seeds (ddof 1).", "", results_table(summary), "",
              "## Per seed", "", per_seed_table(summary["runs"])]
    paired = paired_tables(summary)
    if paired:
        parts += ["", "## Paired against the baseline", "", paired]
    layers = layer_table(summary.get("layers") or {})
    if layers:
        parts += ["", "## Per layer (mean over seeds)", "", layers]
    sweep = sweep_table(summary.get("sweep") or {})
    if sweep:
        parts += ["", "## Compute against quality at sampling time", "", sweep]
    return "\n".join(parts) + "\n"


def write_report(study: StudyConfig, summary: dict, plots_dir: Optional[Path] = None) -> dict:
    """results.json, results.md in the output folder; the PNGs, and a copy of results.md, into ``plots_dir`` (default:
    the study's ``report`` folder; without one, <output>/plots and no copy)."""
    out = study.output
    report_dir = Path(plots_dir) if plots_dir else study.report
    plots = plot_study(summary, report_dir or out / "plots")
    summary["plots"] = [str(p) for p in plots]
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    text = report_text(summary)
    (out / "results.md").write_text(text)
    if report_dir is not None:
        (report_dir / "results.md").write_text(text)
    print(text)
    return summary
