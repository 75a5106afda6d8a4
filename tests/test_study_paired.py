"""The study's paired statistics against hand-computed answers, and the report on synthetic results."""
import math
from pathlib import Path

import pytest

from dit_moe import study
from dit_moe.study import paired

ROOT = Path(__file__).resolve().parents[1]


def test_t_quantiles_match_the_printed_table():
    # Two-sided 95% critical values of Student's t (any statistics table).
    for dof, value in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)]:
        assert study.t_quantile(0.975, dof) == pytest.approx(value, abs=5e-4)


def test_paired_interval_by_hand():
    # d = 1, 2, 6: mean 3, squared deviations 4 + 1 + 9 = 14, sd = sqrt(14 / 2) = sqrt(7),
    # half width = t(0.975, 2) sqrt(7) / sqrt(3) = 4.302653 * 1.527525 = 6.572411 -> [-3.5724, 9.5724], contains 0.
    st = study.paired_stats([1.0, 2.0, 6.0], 0.95, better="lower")
    assert st["n"] == 3 and st["mean"] == pytest.approx(3.0) and st["sd"] == pytest.approx(math.sqrt(7))
    assert st["ci"] == pytest.approx([3 - 6.572411, 3 + 6.572411], abs=1e-5)
    assert not st["resolved"]
    # Every seed worse (FID up): better 0, worse 3, two-sided binomial p = 2 / 2^3 = 0.25 (the smallest at 3 seeds).
    assert st["sign"] == {"better": 0, "worse": 3, "ties": 0, "p": pytest.approx(0.25)}

    # d = 2, 3, 4: mean 3, sd 1, half width 4.302653 / sqrt(3) = 2.484138 -> [0.5159, 5.4841]: resolved.
    st = study.paired_stats([2.0, 3.0, 4.0], 0.95, better="lower")
    assert st["ci"] == pytest.approx([3 - 2.484138, 3 + 2.484138], abs=1e-5) and st["resolved"]
    text = paired.statement("dtopp", "topk", "fid", st, 0.95)
    assert text.endswith("resolved at 3 seeds, dtopp is worse than topk.") and "+3.00 [+0.52, +5.48]" in text

    # A 90% interval: t(0.95, 2) = 2.919986 -> half width 2.919986 sqrt(7/3) = 4.460352 for d = 1, 2, 6.
    assert study.paired_stats([1.0, 2.0, 6.0], 0.90)["ci"][1] == pytest.approx(3 + 4.460352, abs=1e-5)


def test_sign_test_by_hand():
    # Accuracy (higher is better): 4 seeds up, 1 down, 1 tie -> ties dropped, p = 2 P(X <= 1 | 5, 1/2) = 12/32.
    st = study.sign_test([0.1, 0.2, 0.05, 0.3, -0.1, 0.0], "higher")
    assert st == {"better": 4, "worse": 1, "ties": 1, "p": pytest.approx(0.375)}
    assert paired.better_text(st, 6) == "4/6 seeds, 1 tie"
    assert study.sign_test([0.0, 0.0], "lower")["p"] == 1.0


def test_one_seed_has_no_interval():
    st = study.paired_stats([0.5], 0.95, better="lower")
    assert st["mean"] == 0.5 and st["ci"] is None and not st["resolved"]
    assert paired.statement("a", "b", "fid", st, 0.95) == (
        "a vs b, FID: +0.50 at 1 seed, better on 0/1 seed (sign test p = 1.00): not resolved at 1 seed "
        "(a paired interval needs 2 seeds or more).")


def _runs():
    """Synthetic results of 3 seeds: seed effect shared by every arm (seed 2 is worse for all), arm effects on top."""
    seed_effect = {0: 0.0, 1: 5.0, 2: 12.0}
    fid = {"topk": 30.0, "dense": 60.0, "dtopp": 31.0, "topk-flow": 25.0, "dtopp-flow": 22.0}
    wiggle = {"dtopp": [1.0, -2.0, 4.0], "dense": [0.5, -0.5, 1.0], "dtopp-flow": [0.2, -0.1, 0.1]}
    runs = []
    for arm, f in fid.items():
        for s in (0, 1, 2):
            value = f + seed_effect[s] + wiggle.get(arm, [0, 0, 0])[s]
            runs.append({"arm": arm, "seed": s, "fid": value, "classifier_accuracy": 0.9 - value / 1000,
                         "final_loss": 0.1 + value / 1000 + (1.0 if "flow" in arm else 0.0),
                         "objective": "flow" if "flow" in arm else "ddpm",
                         "model": "DiT-T/2-E1K1" if arm == "dense" else "DiT-T/2-E8K2",
                         "routing": "dtopp" if "dtopp" in arm else "topk", "default_moe": False,
                         "curve": {"step": [1], "loss": [1.0], "active": [2.0], "threshold": [None]}})
    return runs


def test_report_on_synthetic_results(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""
base: {{config: {ROOT}/configs/default.yaml}}
seeds: [0, 1, 2]
output: {tmp_path / 'out'}
comparison:
  baseline: topk
  interactions: [{{name: objective, first: [dtopp, topk], second: [dtopp-flow, topk-flow]}}]
arms:
  - {{name: topk, overrides: [routing.type=topk]}}
  - {{name: dense, overrides: [model.name=DiT-T/2-E1K1, routing.type=topk, routing.target=null]}}
  - {{name: dtopp, overrides: [routing.type=dtopp]}}
  - {{name: topk-flow, overrides: [routing.type=topk, diffusion.objective=flow, model.learn_sigma=false]}}
  - {{name: dtopp-flow, overrides: [routing.type=dtopp, diffusion.objective=flow, model.learn_sigma=false],
      baseline: topk-flow}}
""")
    spec = study.load_study(cfg)
    summary = study.aggregate(spec, _runs())
    p = summary["paired"]
    assert set(p) == {"dense", "dtopp", "topk-flow", "dtopp-flow"} and p["dtopp-flow"]["baseline"] == "topk-flow"
    # The shared seed effect cancels: dense - topk = 30 + (0.5, -0.5, 1.0) on every seed.
    assert p["dense"]["metrics"]["fid"]["diffs"] == pytest.approx([30.5, 29.5, 31.0])
    assert p["dense"]["metrics"]["fid"]["resolved"] and not p["dtopp"]["metrics"]["fid"]["resolved"]
    # Losses of different objectives are different quantities: no loss comparison of topk-flow against topk.
    assert "final_loss" not in p["topk-flow"]["metrics"] and "final_loss" in p["dtopp-flow"]["metrics"]
    # Interaction: DTop-p - Top-k is 1 + (1, -2, 4) = (2, -1, 5) under DDPM and -3 + (0.2, -0.1, 0.1) under flow,
    # per seed; the change of the gap (flow gap - DDPM gap) is (-4.8, -2.1, -7.9).
    (inter,) = summary["interactions"]
    change = inter["metrics"]["fid"]["change"]
    assert inter["metrics"]["fid"]["first_gap"]["diffs"] == pytest.approx([2.0, -1.0, 5.0])
    assert change["diffs"] == pytest.approx([-4.8, -2.1, -7.9])
    assert inter["metrics"]["fid"]["second_gap"]["resolved"]
    assert "final_loss" not in inter["metrics"]          # a DDPM loss gap and a flow loss gap: different units

    text = study.paired_tables(summary)
    assert "dense vs topk, FID: +30.33" in text and "resolved at 3 seeds, dense is worse than topk." in text
    assert "dtopp vs topk, FID: +2.00" in text and "not resolved at 3 seeds (the interval contains 0)." in text
    assert "dtopp-flow vs topk-flow, FID: -2.93" in text and "dtopp-flow is better than topk-flow." in text
    assert "dtopp behind (not resolved)" in text and "dtopp-flow ahead (resolved)" in text
    assert "ranking by mean flips" in text
    assert "| dense | topk | s0: +30.50 / s1: +29.50 / s2: +31.00 |" in text
    table = study.results_table(summary)
    assert "| topk-flow | topk; flow |" in table
    files = study.plot_study(summary, tmp_path / "plots")
    assert (tmp_path / "plots" / "paired.png") in files and (tmp_path / "plots" / "paired.png").stat().st_size > 0


def test_comparison_config_errors_name_the_key(tmp_path):
    def load(extra_arm: str = "", comparison: str = "") -> None:
        f = tmp_path / "s.yaml"
        f.write_text(f"base: {{config: {ROOT}/configs/default.yaml}}\nseeds: [0]\n{comparison}\narms:\n"
                     f"  - {{name: topk, overrides: [routing.type=topk]}}\n{extra_arm}")
        study.load_study(f)

    with pytest.raises(study.StudyError, match="comparison.baseline: no arm named 'topq'"):
        load(comparison="comparison: {baseline: topq}")
    with pytest.raises(study.StudyError, match=r"comparison.confidence=1.5 must be in \(0, 1\)"):
        load(comparison="comparison: {confidence: 1.5}")
    with pytest.raises(study.StudyError, match=r"interactions\[0\].second must be two different arm names"):
        load(comparison="comparison: {interactions: [{name: x, first: [topk, b], second: [topk]}]}",
             extra_arm="  - {name: b}\n")
    with pytest.raises(study.StudyError, match=r"arms\[1\] \(b\).baseline: no arm named 'nope'"):
        load(extra_arm="  - {name: b, baseline: nope}\n")
    with pytest.raises(study.StudyError, match="evaluation.sampler: 'euler' is not one of"):
        load(comparison="evaluation: {sampler: euler}")
    with pytest.raises(study.StudyError, match="evaluation.flow_sampler: 'ddim' is not one of"):
        load(comparison="evaluation: {flow_sampler: ddim}")
