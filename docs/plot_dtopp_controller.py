"""Plot a DTop-p run's controller from its metrics.jsonl: activated experts, threshold, DRN scale.

    python docs/plot_dtopp_controller.py RUN_DIR[=LABEL] [...] --out docs/dtopp-controller.png

Each run folder must hold the metrics.jsonl that training writes (keys active_experts, target_experts, threshold,
drn_scale); logged steps are drawn faintly, their running mean over --window steps bold. Prints, per run, the mean activated experts over the last half of the steps, the largest deviation of a
logged step from the target in that half, and how many logged steps had the threshold on a bound (p_min/p_max of
the run's config). The dashed line in the scale panel is the default DRN scale bound of the run's E, target and
p_max (dit_moe.models.routers.dtopp.drn_scale_bound).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(run: Path) -> tuple[list[dict], dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        sys.exit(f"{path}: not found")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "threshold" in r]
    if not rows:
        sys.exit(f"{path}: no DTop-p records (no 'threshold' key)")
    cfg_path = run / "config.yaml"
    routing = {}
    if cfg_path.exists():
        import yaml
        routing = (yaml.safe_load(cfg_path.read_text()) or {}).get("routing", {}) or {}
    return rows, routing


def summary(rows: list[dict], routing: dict) -> dict:
    last = rows[-1]["step"]
    half = [r for r in rows if r["step"] > last / 2]
    target = rows[-1]["target_experts"]
    p_min, p_max = routing.get("p_min", 0.01), routing.get("p_max", 0.99)
    mean = sum(r["active_experts"] for r in half) / len(half)
    return {"steps": last, "target": target, "mean_experts_last_half": round(mean, 4),
            "mean_rel_error": round(mean / target - 1, 4),
            "max_abs_dev_last_half": round(max(abs(r["active_experts"] - target) for r in half), 4),
            "logged_steps_on_bound": sum(1 for r in rows if not p_min + 1e-6 < r["threshold"] < p_max - 1e-6),
            "final_threshold": round(rows[-1]["threshold"], 4), "final_drn_scale": round(rows[-1]["drn_scale"], 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=LABEL")
    ap.add_argument("--out", default="docs/dtopp-controller.png")
    ap.add_argument("--num-experts", type=int, default=8, help="E, for the DRN scale bound line")
    ap.add_argument("--window", type=int, default=100, help="running mean of the experts over this many steps")
    args = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dit_moe.models.routers.dtopp import drn_scale_bound, margin_threshold

    fig, axes = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    for spec in args.runs:
        run, _, label = spec.partition("=")
        rows, routing = load(Path(run))
        label = label or Path(run).name
        print(json.dumps({"run": label, **summary(rows, routing)}))
        steps = [r["step"] for r in rows]
        experts = [r["active_experts"] for r in rows]
        line, = axes[0].plot(steps, experts, lw=0.6, alpha=0.35)
        smooth = [sum(v for s, v in zip(steps, experts) if step - args.window < s <= step) /
                  sum(1 for s in steps if step - args.window < s <= step) for step in steps]
        axes[0].plot(steps, smooth, lw=1.5, color=line.get_color(), label=f"{label} ({args.window}-step mean)")
        axes[1].plot(steps, [r["threshold"] for r in rows], lw=1, color=line.get_color())
        axes[2].plot(steps, [r["drn_scale"] for r in rows], lw=1, color=line.get_color())
    target = rows[-1]["target_experts"]
    p_max = routing.get("p_max", 0.99)
    axes[0].axhspan(0.97 * target, 1.03 * target, color="0.85", label="target +-3%")
    axes[0].set_ylabel("activated experts\n(mean over layers)")
    axes[0].legend(loc="lower left", fontsize=8)
    axes[1].axhline(p_max, color="k", ls=":", lw=1, label="p_max")
    axes[1].set_ylabel("threshold p")
    axes[1].legend(loc="lower right", fontsize=8)
    bound = drn_scale_bound(args.num_experts, target, margin_threshold(p_max))
    axes[2].axhline(bound, color="k", ls="--", lw=1, label=f"DRN scale bound {bound:.2f}")
    axes[2].set_ylabel("DRN scale\n(mean over layers)")
    axes[2].set_xlabel("optimizer step")
    axes[2].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
