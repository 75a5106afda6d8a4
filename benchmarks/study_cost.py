"""What a study costs before it is run: CPU seconds of one real run and of every arm's training step, projected.

    OMP_NUM_THREADS=1 python benchmarks/study_cost.py configs/study-digits-v2.yaml [--steps 300] [--arm-steps 60]
        [--out /tmp/study-cost] [--jobs 2]

1. The baseline arm (``comparison.baseline``, else the first arm), first seed, runs the study's own pipeline
   (``dit_moe.study.run_arm``: training, probe, samples + FID + accuracy, analysis) with ``--steps`` training steps
   instead of the study's; its ``study_result.json`` gives the CPU seconds of every stage (``time.process_time``:
   this process's CPU, which on a shared machine is closer to the cost than the wall time).
2. Every arm trains ``--arm-steps`` steps, one after another in this process: CPU seconds per step, as a ratio to
   the baseline arm measured in the same pass (start-up included alike for every arm).
3. Projection: per run = (baseline CPU s/step from 1) x (arm ratio from 2) x (the study's steps) + the evaluation
   CPU of 1 (the same sampler calls for every arm); times the seeds, plus the timing pass (arms x timing_steps)
   and one probe per calibrated arm. Prints a table, the CPU hours, the hours with ``--jobs`` runs in parallel on
   as many otherwise idle cores, and a JSON last line. Training is extrapolated linearly from ``--steps``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dit_moe import study
from dit_moe.study.arm import reference_path
from dit_moe.training import train


def _train(spec: study.StudyConfig, arm: study.ArmSpec, steps: int, run_dir: Path, name: str) -> tuple[float, float]:
    """(CPU s, wall s) of ``steps`` training steps of ``arm`` (first seed), no grids, one final checkpoint."""
    cfg = study.arm_config(spec, arm, spec.seeds[0], threshold=0.35 if arm.calibrate_from else None)
    cfg.train.steps, cfg.train.log_every, cfg.train.ckpt_every = steps, max(1, steps // 4), steps
    cfg.train.run_dir, cfg.train.run_name = str(run_dir), name
    cfg.train.sample_every, cfg.sample.num_per_class, cfg.sample.steps = 0, 1, 2
    t0, c0 = time.time(), time.process_time()
    train(cfg)
    return time.process_time() - c0, time.time() - t0


def arm_step_cpu(spec: study.StudyConfig, steps: int, out: Path) -> dict:
    """CPU seconds per training step of every arm (``steps`` steps each, one after another), after an untimed
    2-step run: the first training in a process pays one-off initialisation that would bias the first arm."""
    _train(spec, spec.arms[0], 2, out / "arm-steps", "warm-up")
    result = {}
    for arm in spec.arms:
        cpu, wall = _train(spec, arm, steps, out / "arm-steps", arm.name)
        result[arm.name] = {"cpu_s_per_step": cpu / steps, "wall_s_per_step": wall / steps}
        print(f"[cost] {arm.name}: {result[arm.name]['cpu_s_per_step']:.3f} CPU s/step", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", type=Path)
    p.add_argument("--steps", type=int, default=300, help="training steps of the measured baseline run")
    p.add_argument("--arm-steps", type=int, default=60, help="training steps of each arm's step-cost pass")
    p.add_argument("--out", type=Path, default=Path("/tmp/study-cost"))
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel for the wall-time projection")
    args = p.parse_args()

    full = study.load_study(args.config)
    short = study.load_study(args.config, [f"train.steps={args.steps}", f"train.ckpt_every={args.steps}"],
                             output=str(args.out / "baseline"))
    name = full.comparison.baseline or full.arms[0].name
    full_steps = study.arm_config(full, full.arm(name), full.seeds[0]).train.steps

    study.check_inputs(short)
    reference_path(short)
    if short.evaluation.extractor == "digits-cnn":
        from dit_moe.features import digits_classifier
        digits_classifier()           # cached once, outside the measured stages
    t = study.run_arm(short, short.arm(name), short.seeds[0])["timings"]
    if "train_cpu_s" not in t:
        raise SystemExit(f"{args.out / 'baseline'} holds a finished run from before CPU timings; use another --out")
    base_step = t["train_cpu_s"] / args.steps
    eval_cpu = t["probe_cpu_s"] + t["sample_fid_cpu_s"] + t["analysis_cpu_s"]
    arms = arm_step_cpu(full, args.arm_steps, args.out)
    ref = arms[name]["cpu_s_per_step"]

    seeds, timing_steps = len(full.seeds), full.evaluation.timing_steps
    rows, total = [], 0.0
    for arm in full.arms:
        ratio = arms[arm.name]["cpu_s_per_step"] / ref
        per_run = base_step * ratio * full_steps + eval_cpu
        total += seeds * per_run + timing_steps * base_step * ratio + (t["probe_cpu_s"] if arm.calibrate_from else 0)
        rows.append({"arm": arm.name, "ratio": ratio, "per_run_cpu_s": per_run})
    print(f"\nbaseline {name}: {args.steps} steps {t['train_cpu_s']:.1f} CPU s ({base_step:.3f}/step), probe "
          f"{t['probe_cpu_s']:.1f}, samples + FID {t['sample_fid_cpu_s']:.1f}, analysis {t['analysis_cpu_s']:.1f}")
    print("| arm | CPU s/step vs baseline | projected CPU s per run |\n|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['ratio']:.2f} | {r['per_run_cpu_s']:.0f} |")
    print(f"\n{len(full.arms)} arms x {seeds} seeds x {full_steps} steps: {total:.0f} CPU s = {total / 3600:.1f} CPU h; "
          f"{total / 3600 / args.jobs:.1f} h with --jobs {args.jobs} on {args.jobs} otherwise idle cores")
    print(json.dumps({"config": str(args.config), "baseline": name, "measured_steps": args.steps,
                      "baseline_timings": t, "baseline_cpu_s_per_step": base_step, "eval_cpu_s": eval_cpu,
                      "arms": arms, "projection": rows, "study_steps": full_steps, "seeds": seeds,
                      "total_cpu_s": total, "total_cpu_h": total / 3600}))


if __name__ == "__main__":
    main()
