"""Paired comparisons of a study's arms, seed by seed: which differences are resolved at the seeds we have?

Seed s of every arm shares the init seed, the data order, the training noise and the sampling noise, and the seed
effect is large next to the router effect (v1: seed 0 < 1 < 2 in loss for every arm). So an arm is compared with
its baseline arm (Top-k) through the per-seed differences d_s = arm_s - baseline_s, not through two means:

    mean  d = sum_s d_s / n
    sd    s_d = sqrt(sum_s (d_s - d)^2 / (n - 1))
    CI    d -+ t_{(1 + c) / 2, n - 1} s_d / sqrt(n)         paired t interval at confidence c (Student, n - 1 dof)
    sign  seeds where the arm is better / worse / tied; two-sided exact binomial p on the untied ones

A difference is "resolved at n seeds" when its interval excludes 0. That is the study's decision rule; the sign
test is reported beside it as a check that needs no normality, but it cannot resolve anything at 3 seeds (the
smallest two-sided p with 3 seeds is 2 / 2^3 = 0.25). An interaction (does the gap between two arms change with a
setting, e.g. DDPM vs flow?) is the same statistic on the per-seed difference of two gaps.

Metrics: FID (lower is better), classifier accuracy (higher is better) and the final diffusion loss (lower is
better; only between arms of the same objective, whose losses are the same quantity).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from scipy.stats import binomtest, t

__all__ = ["PAIRED_METRICS", "t_quantile", "sign_test", "paired_stats", "compare_arms", "interaction", "interval_text",
           "better_text", "statement", "interaction_statement"]

# metric -> (label, better, display scale, digits)
PAIRED_METRICS = {
    "fid": ("FID", "lower", 1.0, 2),
    "classifier_accuracy": ("accuracy %", "higher", 100.0, 1),
    "final_loss": ("final loss", "lower", 1.0, 4),
}


def t_quantile(q: float, dof: int) -> float:
    """The q-quantile of Student's t with ``dof`` degrees of freedom (scipy: a declared dependency)."""
    return float(t.ppf(q, dof))


def sign_test(diffs: Sequence[float], better: str) -> dict:
    """Seeds where the arm is better / worse / tied, and the two-sided exact binomial p of better vs worse (ties
    dropped, the usual convention; p = 1 when every seed ties)."""
    wins = sum(1 for d in diffs if (d < 0 if better == "lower" else d > 0))
    losses = sum(1 for d in diffs if (d > 0 if better == "lower" else d < 0))
    ties = len(diffs) - wins - losses
    p = float(binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return {"better": wins, "worse": losses, "ties": ties, "p": p}


def paired_stats(diffs: Sequence[float], confidence: float = 0.95, better: Optional[str] = None) -> dict:
    """Mean, sd, paired t interval and (with ``better``) the sign test of per-seed differences ``diffs``."""
    d = [float(x) for x in diffs]
    n = len(d)
    out = {"n": n, "diffs": d, "mean": None, "sd": None, "ci": None, "t": None, "resolved": False}
    if n == 0:
        return out
    mean = sum(d) / n
    out["mean"] = mean
    if n >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        tq = t_quantile((1 + confidence) / 2, n - 1)
        half = tq * sd / math.sqrt(n)
        out.update(sd=sd, t=tq, ci=[mean - half, mean + half], resolved=bool(mean - half > 0 or mean + half < 0))
    if better is not None:
        out["sign"] = sign_test(d, better)
    return out


def _value(run: dict, key: str) -> Optional[float]:
    v = run.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _per_seed(runs: list[dict], arm: str, key: str) -> dict:
    return {r["seed"]: _value(r, key) for r in runs if r.get("arm") == arm and _value(r, key) is not None}


def compare_arms(runs: list[dict], pairs: dict, confidence: float = 0.95) -> dict:
    """``pairs``: {arm: baseline arm}. Per arm and metric: the seeds both have, their differences and statistics.

    The final loss is compared only between arms of one objective (a flow loss and a DDPM loss are different
    quantities); FID and accuracy compare samples and hold across objectives."""
    objective = {r["arm"]: r.get("objective", "ddpm") for r in runs}
    out = {}
    for arm, base in pairs.items():
        if arm not in objective or base not in objective:
            continue
        metrics = {}
        for key, (_, better, _, _) in PAIRED_METRICS.items():
            if key == "final_loss" and objective[arm] != objective[base]:
                continue
            a, b = _per_seed(runs, arm, key), _per_seed(runs, base, key)
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            metrics[key] = {"seeds": seeds, **paired_stats([a[s] - b[s] for s in seeds], confidence, better)}
        out[arm] = {"baseline": base, "objective": objective[arm], "baseline_objective": objective[base],
                    "metrics": metrics}
    return out


def interaction(runs: list[dict], name: str, first: Sequence[str], second: Sequence[str],
                confidence: float = 0.95) -> Optional[dict]:
    """Per metric: the gap first[0] - first[1], the gap second[0] - second[1], and the per-seed change of the gap
    (second gap - first gap) with its paired interval. None when an arm has no runs. The final loss only when all
    four arms share one objective (a DDPM loss gap and a flow loss gap are in different units)."""
    objective = {r.get("arm"): r.get("objective", "ddpm") for r in runs}
    if not set(first) | set(second) <= set(objective):
        return None
    one_objective = len({objective[a] for a in (*first, *second)}) == 1
    out = {"name": name, "first": list(first), "second": list(second), "metrics": {}}
    for key, (_, better, _, _) in PAIRED_METRICS.items():
        if key == "final_loss" and not one_objective:
            continue
        vals = [_per_seed(runs, arm, key) for arm in (*first, *second)]
        seeds = sorted(set.intersection(*[set(v) for v in vals]))
        if not seeds:
            continue
        g1 = [vals[0][s] - vals[1][s] for s in seeds]
        g2 = [vals[2][s] - vals[3][s] for s in seeds]
        out["metrics"][key] = {
            "seeds": seeds,
            "first_gap": paired_stats(g1, confidence, better),
            "second_gap": paired_stats(g2, confidence, better),
            "change": paired_stats([b - a for a, b in zip(g1, g2)], confidence),
        }
    return out


def _fmt(x: Optional[float], scale: float, digits: int, sign: bool = True) -> str:
    return "-" if x is None else f"{x * scale:{'+' if sign else ''}.{digits}f}"


def interval_text(st: dict, scale: float, digits: int, confidence: float) -> str:
    """``+1.23 [-0.40, +2.86]`` (or ``+1.23 (no interval at 1 seed)``)."""
    if st["ci"] is None:
        return f"{_fmt(st['mean'], scale, digits)} (no interval at {st['n']} seed)"
    lo, hi = st["ci"]
    return f"{_fmt(st['mean'], scale, digits)} [{_fmt(lo, scale, digits)}, {_fmt(hi, scale, digits)}]"


def better_text(sign: dict, n: int) -> str:
    """``2/3 seeds`` (``, 1 tie`` when some seed ties)."""
    ties = f", {sign['ties']} tie{'s' * (sign['ties'] != 1)}" if sign["ties"] else ""
    return f"{sign['better']}/{n} seed{'s' * (n != 1)}{ties}"


def statement(arm: str, base: str, key: str, st: dict, confidence: float) -> str:
    """One plain sentence: the difference, its interval, the sign count and whether it is resolved."""
    label, better, scale, digits = PAIRED_METRICS[key]
    n = st["n"]
    if st["ci"] is None:
        text = f"{arm} vs {base}, {label}: {_fmt(st['mean'], scale, digits)} at {n} seed{'s' * (n != 1)}"
    else:
        text = (f"{arm} vs {base}, {label}: {interval_text(st, scale, digits, confidence)} "
                f"({confidence:.0%} paired t, {n} seeds)")
    sign = st.get("sign")
    if sign:
        text += f", better on {better_text(sign, n)} (sign test p = {sign['p']:.2f})"
    if st["resolved"]:
        worse = (st["mean"] > 0) == (better == "lower")
        return text + f": resolved at {n} seeds, {arm} is {'worse' if worse else 'better'} than {base}."
    why = "the interval contains 0" if st["ci"] is not None else "a paired interval needs 2 seeds or more"
    return text + f": not resolved at {n} seed{'s' * (n != 1)} ({why})."


def interaction_statement(inter: dict, key: str, confidence: float) -> str:
    """The gap in each setting, the change of the gap, and whether the ranking (by mean) is the same."""
    label, better, scale, digits = PAIRED_METRICS[key]
    m = inter["metrics"][key]
    (a1, b1), (a2, b2) = inter["first"], inter["second"]
    g1, g2, ch = m["first_gap"], m["second_gap"], m["change"]

    def rank(g):
        if g["mean"] is None or g["mean"] == 0:
            return "tie"
        ahead = (g["mean"] < 0) == (better == "lower")
        return ("ahead" if ahead else "behind") + (" (resolved)" if g["resolved"] else " (not resolved)")

    same = rank(g1).split()[0] == rank(g2).split()[0]
    n = ch["n"]
    return (f"{inter['name']}, {label}: {a1} - {b1} = {interval_text(g1, scale, digits, confidence)}, "
            f"{a1} {rank(g1)}; {a2} - {b2} = {interval_text(g2, scale, digits, confidence)}, {a2} {rank(g2)}; "
            f"ranking by mean {'the same' if same else 'flips'}; change of the gap "
            f"{interval_text(ch, scale, digits, confidence)}: "
            + (f"resolved at {n} seeds." if ch["resolved"] else f"not resolved at {n} seed{'s' * (n != 1)}."))
