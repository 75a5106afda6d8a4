"""The routing study (`python -m dit_moe.study CONFIG`): Top-k vs Top-p vs DTop-p vs Default MoE at matched compute.

A study config (YAML, see ``configs/study-digits.yaml``) names a base experiment config (path + dotted overrides),
a list of arms (name + dotted overrides, optionally a calibrated Top-p threshold), the seeds, the evaluation
settings and an output folder. Every (arm, seed) is an ordinary training run in ``<output>/runs/<arm>-s<seed>/``
(so ``python -m dit_moe.analyze`` and ``sample.py`` work on it), followed by the same evaluation for every arm:

1. training with ``dit_moe.training.train`` (resumable: an interrupted study continues where it stopped);
2. a routing probe of the final (raw, non-EMA) weights on fixed noisy training inputs: the activated experts per
   (token, layer) at the end of training, mean and per-token standard deviation (the training log only keeps the
   per-step means);
3. ``num_samples`` class-balanced EMA samples through ``dit_moe.sampling.generate`` (same sampler, steps, CFG and seed for
   every arm), their FID against the reference and, on the digits, the share the digits classifier recognises;
   ``samples.json`` gives the activated experts per token during sampling (both CFG halves);
4. ``dit_moe.analyze``: routing plots of the final checkpoint on its sampling trajectory (whose per-token standard
   deviation the table reports) and the training curves;
5. ``study_result.json`` in the run folder. A run with its final checkpoint and this file is skipped on re-run.

Arms may take a calibrated fixed Top-p threshold (``calibrate: {from: ARM, target: 2.0}``): once the first seed of
ARM has finished, its final raw weights are loaded, and the global top-p threshold of every router is bisected so
that the probe inputs activate ``target`` experts per token on average; the arm then trains from scratch with that
threshold (``<output>/calibration.json`` keeps the result). The arm's training log shows where the count drifts to.

Aggregation (``<output>/results.json``, ``results.md``, and PNGs in ``<output>/plots`` or ``--plots-dir``): per arm,
mean and standard deviation across seeds of the final diffusion loss (mse + vb, mean over the last 10% of logged
steps), FID, classifier accuracy, activated experts during training (mean over the last quarter of the logged
steps, its spread across steps, and the probe's per-token std), during sampling (samples.json mean; analysis
per-token std), and seconds per training step.

Several runs can go in parallel on one machine (``--jobs N``: N worker processes, each with cores / N threads).
Under ``accelerate launch`` (one process per GPU) every run uses all processes (``--jobs`` must be 1); the probe,
calibration, analysis and bookkeeping happen on the main process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml

from .config import ConfigError, ExperimentConfig, load_config

__all__ = [
    "StudyError",
    "ArmSpec",
    "EvalSpec",
    "StudyConfig",
    "load_study",
    "arm_config",
    "probe_routing",
    "calibrate_topp_threshold",
    "run_arm",
    "summarize_run",
    "aggregate",
    "write_report",
    "run_study",
    "main",
]

RESULT_FILE = "study_result.json"
CALIBRATION_FILE = "calibration.json"
ROOT = Path(__file__).resolve().parents[1]


class StudyError(ValueError):
    """A bad study config or a study step that failed; the message names the file, key or run at fault."""


# ---------------------------------------------------------------------------------------------------------
#                                           Study configuration
# ---------------------------------------------------------------------------------------------------------

@dataclass
class EvalSpec:
    """Evaluation shared by every arm (changing any of these changes every number of the table)."""
    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float = 2.0
    num_samples: int = 500
    batch_size: int = 250
    seed: int = 0
    reference: str = "builtin-digits"     # builtin-digits (the embedded digits as npz) | path to an npz / image folder
    extractor: str = "digits-cnn"         # torch-fidelity feature extractor of the FID
    inception_weights: Optional[str] = None
    classifier_accuracy: bool = True      # digits only: share of samples the digits classifier labels as requested
    analysis_per_class: int = 2           # samples per class of the routing analysis trajectory
    probe_batches: int = 4                # routing probe: batches of noisy training inputs (fixed seed)
    probe_batch_size: int = 256
    timing_steps: int = 40                # timing pass: steps per arm, run one after another on the idle machine
    final_fraction: float = 0.1           # final loss = mean over this last fraction of logged steps
    active_fraction: float = 0.25         # train-time activated experts over this last fraction of logged steps


@dataclass
class ArmSpec:
    name: str
    overrides: list = field(default_factory=list)
    calibrate_from: Optional[str] = None  # arm whose first seed's final model calibrates routing.threshold
    calibrate_target: float = 2.0
    description: str = ""


@dataclass
class StudyConfig:
    name: str
    output: Path
    base_config: Optional[Path]
    base_overrides: list
    seeds: list
    arms: list                            # [ArmSpec]
    evaluation: EvalSpec
    path: Optional[Path] = None           # the YAML file

    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        raise StudyError(f"{self.path}: no arm named {name!r}; arms: {', '.join(a.name for a in self.arms)}")


def _check_keys(d: dict, valid: Sequence[str], where: str) -> None:
    if not isinstance(d, dict):
        raise StudyError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")


def _str_list(value, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{where}: expected a list of 'section.key=value' strings, got {value!r}")
    return list(value)


def load_study(path: str | Path, overrides: Sequence[str] = (), output: Optional[str] = None) -> StudyConfig:
    """Read and validate a study YAML; ``overrides`` (``section.key=value``) are appended to the base overrides.

    Every arm's experiment config is resolved here, so a typo in any arm fails before any compute is spent.
    Relative paths in the file (base config, output, reference) are relative to the current directory, except a
    base config that only exists relative to the study file's folder or the repository root.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study config not found: {path}")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {e}") from e
    where = str(path)
    _check_keys(d, ("name", "output", "base", "seeds", "evaluation", "arms"), where)
    for key in ("base", "seeds", "arms"):
        if key not in d:
            raise StudyError(f"{where}: missing key {key!r}")

    base = d["base"]
    _check_keys(base, ("config", "overrides"), f"{where}: base")
    base_config = None
    if base.get("config") is not None:
        base_config = Path(base["config"])
        if not base_config.is_file():
            for root in (path.parent, ROOT):
                if (root / base_config).is_file():
                    base_config = root / base_config
                    break
            else:
                raise StudyError(f"{where}: base.config {base['config']!r} not found")
    base_overrides = _str_list(base.get("overrides"), f"{where}: base.overrides") + list(overrides)

    seeds = d["seeds"]
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise StudyError(f"{where}: seeds must be a non-empty list of distinct integers, got {seeds!r}")

    ev = d.get("evaluation") or {}
    fields = {f.name: f for f in dataclasses.fields(EvalSpec)}
    _check_keys(ev, list(fields), f"{where}: evaluation")
    from .config import from_dict
    try:
        evaluation = from_dict(EvalSpec, ev, "evaluation")
    except ConfigError as e:
        raise StudyError(f"{where}: {e}") from None
    from .config import ALL_SAMPLERS
    if evaluation.sampler not in ALL_SAMPLERS:
        raise StudyError(f"{where}: evaluation.sampler {evaluation.sampler!r} is not one of {', '.join(ALL_SAMPLERS)}")
    for key in ("steps", "num_samples", "batch_size", "analysis_per_class", "probe_batches", "probe_batch_size",
                "timing_steps"):
        if getattr(evaluation, key) < 1:
            raise StudyError(f"{where}: evaluation.{key}={getattr(evaluation, key)} must be >= 1")
    for key in ("final_fraction", "active_fraction"):
        if not 0 < getattr(evaluation, key) <= 1:
            raise StudyError(f"{where}: evaluation.{key}={getattr(evaluation, key)} must be in (0, 1]")

    arms_raw = d["arms"]
    if not isinstance(arms_raw, list) or not arms_raw:
        raise StudyError(f"{where}: arms must be a non-empty list of {{name, overrides}} mappings")
    arms = []
    for i, a in enumerate(arms_raw):
        aw = f"{where}: arms[{i}]"
        _check_keys(a, ("name", "overrides", "calibrate", "description"), aw)
        name = a.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
            raise StudyError(f"{aw}: name must be a non-empty string without '/', '\\' or spaces, got {name!r}")
        arm = ArmSpec(name=name, overrides=_str_list(a.get("overrides"), f"{aw} ({name}).overrides"),
                      description=str(a.get("description") or ""))
        if a.get("calibrate") is not None:
            c = a["calibrate"]
            _check_keys(c, ("from", "target"), f"{aw} ({name}).calibrate")
            if "from" not in c:
                raise StudyError(f"{aw} ({name}).calibrate: missing key 'from' (the arm whose model calibrates p)")
            arm.calibrate_from = str(c["from"])
            target = c.get("target", 2.0)
            if not isinstance(target, (int, float)) or isinstance(target, bool) or target < 1:
                raise StudyError(f"{aw} ({name}).calibrate.target must be a number >= 1, got {target!r}")
            arm.calibrate_target = float(target)
        arms.append(arm)
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyError(f"{where}: duplicate arm name(s) {', '.join(dup)}")

    study = StudyConfig(
        name=str(d.get("name") or path.stem), output=Path(output or d.get("output") or f"runs/{path.stem}"),
        base_config=base_config, base_overrides=base_overrides, seeds=list(seeds), arms=arms,
        evaluation=evaluation, path=path)
    for arm in arms:
        if arm.calibrate_from is not None:
            src = study.arm(arm.calibrate_from)
            if src.calibrate_from is not None:
                raise StudyError(f"{where}: arm {arm.name!r} calibrates from {src.name!r}, which is calibrated itself")
        cfg = arm_config(study, arm, seeds[0], threshold=0.5 if arm.calibrate_from else None)
        if arm.calibrate_from is not None and cfg.routing.type != "topp":
            raise StudyError(f"{where}: arm {arm.name!r} has a calibrated threshold but routing.type "
                             f"{cfg.routing.type!r}; calibration sets the fixed Top-p threshold (routing.type=topp)")
    return study


def arm_config(study: StudyConfig, arm: ArmSpec, seed: int, threshold: Optional[float] = None) -> ExperimentConfig:
    """The experiment config of one run: base + base overrides + arm overrides + seed, run folder, sampler."""
    ev = study.evaluation
    overrides = [
        *study.base_overrides, *arm.overrides,
        f"train.seed={seed}", f"train.run_dir={study.output / 'runs'}", f"train.run_name={arm.name}-s{seed}",
        # The checkpoint's sample section = the study's sampler, so grids and `sample.py RUN` match the table.
        f"sample.sampler={ev.sampler}", f"sample.steps={ev.steps}", f"sample.cfg_scale={ev.cfg_scale}",
    ]
    if threshold is not None:
        overrides.append(f"routing.threshold={threshold!r}")
    try:
        return load_config(study.base_config, overrides)
    except ConfigError as e:
        raise StudyError(f"{study.path}: arm {arm.name!r}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
#                              Routing probe and Top-p threshold calibration
# ---------------------------------------------------------------------------------------------------------

def _probe_inputs(cfg: ExperimentConfig, num_batches: int, batch_size: int, seed: int = 1234):
    """Fixed noisy training inputs of the arm's objective (dit_moe.sampling.trace.probe_inputs)."""
    from .sampling.trace import probe_inputs

    return probe_inputs(cfg, num_batches, batch_size, seed)


def probe_routing(model, inputs) -> dict:
    """Activated experts per (token, layer) on fixed inputs (dit_moe.sampling.trace.probe_routing)."""
    from .sampling.trace import probe_routing as probe

    return probe(model, inputs)


def calibrate_topp_threshold(model, inputs, target: float, iters: int = 30, tol: float = 1e-3) -> dict:
    """The global Top-p threshold that activates ``target`` experts on ``inputs`` (dit_moe.sampling.trace)."""
    from .sampling.trace import calibrate_topp_threshold as calibrate

    try:
        return calibrate(model, inputs, target, iters=iters, tol=tol)
    except ValueError as e:
        raise StudyError(str(e)) from e


# ---------------------------------------------------------------------------------------------------------
#                                              One run
# ---------------------------------------------------------------------------------------------------------

def _final_checkpoint(run_dir: Path, steps: int) -> Optional[Path]:
    ckpt = run_dir / "checkpoints" / f"step-{steps:07d}"
    return ckpt if ckpt.is_dir() else None


def _reference_path(study: StudyConfig) -> Path:
    ref = study.evaluation.reference
    if ref == "builtin-digits":
        return study.output / "reference" / "digits.npz"
    return Path(ref)


def _prepare_reference(study: StudyConfig) -> Path:
    ref = _reference_path(study)
    if study.evaluation.reference == "builtin-digits":
        if not ref.is_file():
            from .demo import reference_digits
            reference_digits(ref)
    elif not ref.exists():
        raise StudyError(f"{study.path}: evaluation.reference {str(ref)!r} does not exist")
    return ref


def _load_result(run_dir: Path, steps: int) -> Optional[dict]:
    """The run's study_result.json when the run is finished (final checkpoint + result), else None."""
    f = run_dir / RESULT_FILE
    if not f.is_file() or _final_checkpoint(run_dir, steps) is None:
        return None
    try:
        result = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return result if result.get("steps") == steps else None


def run_arm(study: StudyConfig, arm: ArmSpec, seed: int, threshold: Optional[float] = None, state=None,
            device: Optional[str] = None) -> dict:
    """Train, probe, sample, evaluate and analyse one (arm, seed); returns (and writes) its study_result.json."""
    import torch

    from . import analyze, inference, sampling
    from .training import run_dir_of, train

    is_main = state is None or state.is_main_process
    barrier = (lambda: state.wait_for_everyone()) if state is not None else (lambda: None)
    cfg = arm_config(study, arm, seed, threshold)
    run_dir = run_dir_of(cfg)
    done = _load_result(run_dir, cfg.train.steps)
    if done is not None:
        done["skipped"] = True
        return done
    ev = study.evaluation
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    timings = {}

    t0 = time.time()
    train(cfg, resume="latest")
    timings["train_s"] = round(time.time() - t0, 1)
    ckpt = _final_checkpoint(run_dir, cfg.train.steps)
    if ckpt is None:
        raise StudyError(f"{run_dir}: training returned without a final checkpoint step-{cfg.train.steps:07d}")

    probe = None
    if is_main:
        t0 = time.time()
        model = inference.load(ckpt, weights="model", device=device).model
        if model.arch.is_moe:
            probe = probe_routing(model, _probe_inputs(cfg, ev.probe_batches, ev.probe_batch_size))
        del model
        timings["probe_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    samples_dir = run_dir / "study_samples"
    several = state is not None and state.num_processes > 1
    # Several processes: each samples on its own device (Accelerate's); one process: the study's device.
    evaluation = sampling.Evaluation(reference=str(_reference_path(study)), extractor=ev.extractor,
                                     inception_weights=ev.inception_weights,
                                     classifier_accuracy=ev.classifier_accuracy)
    try:
        bundle = inference.load(ckpt, weights="ema", device=state.device if several else device)
        settings = dataclasses.replace(bundle.defaults, sampler=ev.sampler, steps=ev.steps, cfg_scale=ev.cfg_scale,
                                       seed=ev.seed, batch_size=ev.batch_size)
        info = sampling.generate(bundle, samples_dir, settings, num_samples=ev.num_samples, state=state,
                                 progress=False, evaluation=evaluation)
    except (sampling.SamplingError, inference.InferenceError, OSError) as e:
        raise StudyError(f"{run_dir}: sampling / FID failed: {e}") from e
    del bundle
    timings["sample_fid_s"] = round(time.time() - t0, 1)
    barrier()
    if not is_main:
        return {}
    values = info["metrics"]
    accuracy = info["classifier_accuracy"]

    t0 = time.time()
    analysis = None
    try:
        report = analyze.analyze_checkpoint(ckpt, num_per_class=ev.analysis_per_class, sampler=ev.sampler,
                                            num_steps=ev.steps, cfg_scale=ev.cfg_scale, seed=ev.seed, device=device)
        analysis = report["active_experts"]
    except analyze.AnalysisError:
        analysis = None          # a dense model: nothing to analyse
    analyze.plot_training_curves(run_dir)
    timings["analysis_s"] = round(time.time() - t0, 1)

    result = summarize_run(run_dir, ev)
    result.update({
        "arm": arm.name, "seed": seed, "steps": cfg.train.steps, "run_dir": str(run_dir), "checkpoint": str(ckpt),
        "model": cfg.model.name, "routing": cfg.routing.type, "default_moe": cfg.routing.default_moe,
        "threshold": threshold if threshold is not None else (cfg.routing.threshold if cfg.routing.type == "topp" else None),
        "fid": values.get("fid"), "classifier_accuracy": accuracy,
        "sample_active_mean": (info.get("active_experts") or {}).get("mean"),
        "sample_active_per_bucket": (info.get("active_experts") or {}).get("per_bucket"),
        "sample_active_token_std": analysis["std"] if analysis else None,
        "sample_images_per_second": info.get("images_per_second"),
        "probe_active_mean": probe["mean"] if probe else None,
        "probe_active_token_std": probe["std"] if probe else None,
        "probe_active_per_layer": probe["per_layer"] if probe else None,
        "timings": timings,
    })
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))
    return result


def summarize_run(run_dir: Path, ev: EvalSpec) -> dict:
    """Training numbers of one run from its metrics.jsonl: loss curve, final loss, activated experts, s/step."""
    from .analyze import read_metrics

    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    diff = [r["mse"] + r.get("vb", 0.0) for r in rows]    # the diffusion loss, without router aux terms (flow: no vb)
    n_final = max(1, int(round(ev.final_fraction * len(rows))))
    n_active = max(1, int(round(ev.active_fraction * len(rows))))
    active = [r.get("active_experts") for r in rows]
    tail = [a for a in active[-n_active:] if a is not None]
    # The first interval includes start-up (first forward, allocation): leave it out of the speed.
    sps = [r["steps_per_sec"] for r in rows[1:] if r.get("steps_per_sec")] or [rows[0]["steps_per_sec"]]
    return {
        "curve": {"step": steps, "loss": diff, "active": active,
                  "threshold": [r.get("threshold") if not isinstance(r.get("threshold"), list) else None for r in rows]},
        "final_loss": float(np.mean(diff[-n_final:])),
        "train_active_mean": float(np.mean(tail)) if tail else None,
        "train_active_step_std": float(np.std(tail)) if tail else None,
        "sec_per_step": float(np.median([1.0 / s for s in sps])),
        "train_seconds": rows[-1].get("seconds"),
    }


# ---------------------------------------------------------------------------------------------------------
#                                   Scheduling (with calibration dependencies)
# ---------------------------------------------------------------------------------------------------------

def _calibrate(study: StudyConfig, arm: ArmSpec, device: str) -> float:
    """The calibrated threshold of ``arm`` (cached in <output>/calibration.json)."""
    from .inference import load
    from .training import run_dir_of

    file = study.output / CALIBRATION_FILE
    cache = json.loads(file.read_text()) if file.is_file() else {}
    src = study.arm(arm.calibrate_from)
    src_cfg = arm_config(study, src, study.seeds[0])
    ckpt = _final_checkpoint(run_dir_of(src_cfg), src_cfg.train.steps)
    if ckpt is None:
        raise StudyError(f"arm {arm.name!r}: calibration source {src.name!r} seed {study.seeds[0]} has not finished")
    key = f"{arm.name}"
    entry = cache.get(key)
    if entry and entry.get("source_checkpoint") == str(ckpt) and entry.get("target") == arm.calibrate_target:
        return entry["threshold"]
    model = load(ckpt, weights="model", device=device).model
    ev = study.evaluation
    result = calibrate_topp_threshold(model, _probe_inputs(src_cfg, ev.probe_batches, ev.probe_batch_size),
                                      arm.calibrate_target)
    result.update(source_arm=src.name, source_seed=study.seeds[0], source_checkpoint=str(ckpt),
                  source_threshold=src_cfg.routing.threshold)
    cache[key] = result
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(cache, indent=1))
    print(f"[study] calibrated Top-p threshold for {arm.name}: p = {result['threshold']:.4f} gives "
          f"{result['measured']:.3f} experts/token on {src.name}-s{study.seeds[0]}'s final model "
          f"(trained with p = {src_cfg.routing.threshold})", flush=True)
    return result["threshold"]


def _worker_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _worker_run(study: StudyConfig, arm_name: str, seed: int, threshold: Optional[float], device: str) -> dict:
    try:
        return run_arm(study, study.arm(arm_name), seed, threshold, device=device)
    except Exception as e:
        # Some errors (TrainingInterrupted) do not survive pickling back to the parent; send their message instead.
        raise StudyError(f"run {arm_name}-s{seed} failed: {type(e).__name__}: {e}") from None


def run_study(study: StudyConfig, jobs: int = 1, device: Optional[str] = None, plots_dir: Optional[Path] = None,
              only_arms: Optional[Sequence[str]] = None) -> dict:
    """Run every (arm, seed) not finished yet, then aggregate and write results.json / results.md / plots."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    state = None
    if os.environ.get("WORLD_SIZE", "1") != "1":
        from accelerate import PartialState
        state = PartialState(cpu=device == "cpu")
        if jobs != 1:
            raise StudyError(f"--jobs {jobs}: under a multi-process launch every run uses all processes; use --jobs 1")
    is_main = state is None or state.is_main_process
    arms = [a for a in study.arms if only_arms is None or a.name in only_arms]
    if only_arms:
        missing = sorted(set(only_arms) - {a.name for a in study.arms})
        if missing:
            raise StudyError(f"--arms: unknown arm(s) {', '.join(missing)}")
        needed = {a.calibrate_from for a in arms if a.calibrate_from} - {a.name for a in arms}
        arms = [a for a in study.arms if a.name in needed] + arms
    study.output.mkdir(parents=True, exist_ok=True)
    if is_main:
        _prepare_reference(study)
        (study.output / "study.yaml").write_text(study.path.read_text() if study.path else "")
        if study.evaluation.extractor == "digits-cnn":
            from .features import digits_classifier
            digits_classifier()           # train/cache the classifier once, before parallel workers race for it
    if state is not None:
        state.wait_for_everyone()

    # Seed-major, so that an interrupted study has whole seeds; within the first seed, calibration sources first
    # so the calibrated arms can start early (a task waits until its calibration source has finished).
    sources = {a.calibrate_from for a in arms if a.calibrate_from}
    tasks = [(a, s) for s in study.seeds for a in arms]
    tasks.sort(key=lambda t: not (t[0].name in sources and t[1] == study.seeds[0]))
    results: dict[tuple[str, int], dict] = {}
    t_start = time.time()

    def finished(arm_name: str, seed: int) -> bool:
        return (arm_name, seed) in results

    def threshold_for(arm: ArmSpec) -> Optional[float]:
        if arm.calibrate_from is None:
            return None
        if state is None:
            return _calibrate(study, arm, device)
        from accelerate.utils import broadcast_object_list
        box = [_calibrate(study, arm, device) if is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _is_done(arm: ArmSpec, seed: int, threshold) -> bool:
        from .training import run_dir_of
        cfg = arm_config(study, arm, seed, threshold)
        return _load_result(run_dir_of(cfg), cfg.train.steps) is not None

    if jobs <= 1:
        for arm, seed in tasks:
            print(f"[study] {arm.name} seed {seed} ({time.time() - t_start:.0f} s into the study)", flush=True)
            results[(arm.name, seed)] = run_arm(study, arm, seed, threshold_for(arm), state=state, device=device)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // jobs)
        pending = list(tasks)
        running = {}
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                    initargs=(threads,)) as pool:
            while pending or running:
                for arm, seed in list(pending):
                    if len(running) >= jobs:
                        break
                    if arm.calibrate_from and not finished(arm.calibrate_from, study.seeds[0]):
                        continue
                    pending.remove((arm, seed))
                    threshold = threshold_for(arm)
                    if _is_done(arm, seed, threshold):
                        results[(arm.name, seed)] = run_arm(study, arm, seed, threshold, device=device)
                        continue
                    print(f"[study] start {arm.name} seed {seed} ({time.time() - t_start:.0f} s)", flush=True)
                    fut = pool.submit(_worker_run, study, arm.name, seed, threshold, device)
                    running[fut] = (arm.name, seed)
                if not running and not pending:
                    break
                if not running:
                    raise StudyError("no runnable task: a calibration source is missing from the study")
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    key = running.pop(fut)
                    results[key] = fut.result()      # re-raises a worker's error with its message
                    print(f"[study] done {key[0]} seed {key[1]} ({time.time() - t_start:.0f} s)", flush=True)
    timing = time_arms(study, arms, device, {a.name: threshold_for(a) for a in arms}, state)
    if not is_main:
        return {}
    runs = [results[(a.name, s)] for a in study.arms if a in arms for s in study.seeds]
    summary = aggregate(study, runs, timing)
    summary["study_seconds_this_invocation"] = round(time.time() - t_start, 1)
    summary["jobs"] = jobs
    write_report(study, summary, plots_dir)
    return summary


def time_arms(study: StudyConfig, arms: Sequence[ArmSpec], device: str, thresholds: dict, state=None) -> dict:
    """Seconds per training step of every arm, measured one arm after another with all cores (cached).

    The study's own s/step depends on what ran beside each run (``--jobs``) and on other load on the machine; this
    pass trains each arm (first seed) for ``evaluation.timing_steps`` steps in this process, alone, and reports the
    median over logging intervals after the first (start-up) one. Cached in ``<output>/timing.json``.
    """
    import torch

    from .training import train

    is_main = state is None or state.is_main_process
    steps = study.evaluation.timing_steps
    file = study.output / "timing.json"
    cache = json.loads(file.read_text()) if file.is_file() else {}
    out = {}
    for arm in arms:
        key = f"{arm.name}@{steps}@{device}@{torch.get_num_threads()}threads"
        if key not in cache:
            cfg = arm_config(study, arm, study.seeds[0], thresholds.get(arm.name))
            cfg.train.steps, cfg.train.log_every, cfg.train.ckpt_every = steps, max(1, steps // 4), steps
            cfg.train.run_dir, cfg.train.run_name = str(study.output / "timing"), arm.name
            cfg.train.sample_every, cfg.sample.num_per_class, cfg.sample.steps = 0, 1, 2
            run_dir = Path(cfg.train.run_dir) / arm.name
            if is_main:
                shutil.rmtree(run_dir, ignore_errors=True)
            if state is not None:
                state.wait_for_everyone()
            train(cfg)                    # under a multi-process launch every process takes part
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            cache[key] = float(np.median([1.0 / r["steps_per_sec"] for r in rows[1:]] or [1.0 / rows[0]["steps_per_sec"]]))
            if is_main:
                file.write_text(json.dumps(cache, indent=1))
                print(f"[study] timing {arm.name}: {cache[key]:.3f} s/step", flush=True)
        out[arm.name] = cache[key]
    return out


# ---------------------------------------------------------------------------------------------------------
#                                      Aggregation, table, plots
# ---------------------------------------------------------------------------------------------------------

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
    from .registry import parse_name

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
                          "default_moe": mine[0]["default_moe"], "threshold": mine[0].get("threshold"),
                          "description": arm.description, "overrides": arm.overrides, **stats}
    calib = study.output / CALIBRATION_FILE
    base = load_config(study.base_config, study.base_overrides)
    return {
        "name": study.name, "config": str(study.path), "seeds": study.seeds,
        "train": {"steps": base.train.steps, "global_batch_size": base.train.global_batch_size, "lr": base.train.lr,
                  "model": base.model.name},
        "evaluation": dataclasses.asdict(study.evaluation),
        "calibration": json.loads(calib.read_text()) if calib.is_file() else None,
        "arms": arms,
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
        "curves": {f"{r['arm']}-s{r['seed']}": r["curve"] for r in runs},
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
        routing = a["routing"] + (" + Default MoE" if a["default_moe"] else "")
        if a.get("num_experts") == 1:
            routing = "dense (one always-on expert)"
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
    """loss_curves.png, active_experts.png, fid.png, sampling_experts.png (means over seeds, bands = ±1 std)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    arms = list(summary["arms"])
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}

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
    return files


def write_report(study: StudyConfig, summary: dict, plots_dir: Optional[Path] = None) -> dict:
    """results.json, results.md (table) in the output folder; the PNGs into ``plots_dir`` (default <output>/plots)."""
    out = study.output
    plots = plot_study(summary, Path(plots_dir) if plots_dir else out / "plots")
    summary["plots"] = [str(p) for p in plots]
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    table = results_table(summary)
    (out / "results.md").write_text(f"# {summary['name']}\n\n{table}\n")
    print(table)
    return summary


# ---------------------------------------------------------------------------------------------------------
#                                              Command line
# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dit_moe.study", description=__doc__.split("\n")[0])
    p.add_argument("config", type=Path, help="study YAML (e.g. configs/study-digits.yaml)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (worker processes; cores split evenly)")
    p.add_argument("--output", help="override the study's output folder")
    p.add_argument("--plots-dir", type=Path, help="write the PNGs here (default <output>/plots)")
    p.add_argument("--arms", nargs="+", help="run only these arms (and their calibration sources)")
    p.add_argument("--seeds", type=int, nargs="+", help="run and report only these seeds (default: the config's)")
    p.add_argument("--device", help="torch device (default: cuda when available)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="extra overrides of every arm's experiment config (appended to base.overrides)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .checkpoint import CheckpointError
    from .training import TrainingError

    args = build_parser().parse_args(argv)
    try:
        if args.jobs < 1:
            raise StudyError(f"--jobs {args.jobs} must be >= 1")
        study = load_study(args.config, args.overrides, args.output)
        if args.seeds:
            if len(set(args.seeds)) != len(args.seeds):
                raise StudyError(f"--seeds {args.seeds}: seeds must be distinct")
            study.seeds = list(args.seeds)
        summary = run_study(study, jobs=args.jobs, device=args.device, plots_dir=args.plots_dir, only_arms=args.arms)
    except (StudyError, ConfigError, CheckpointError, TrainingError) as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 1
    if summary:
        print(f"\nresults: {study.output / 'results.md'}, {study.output / 'results.json'}; plots: "
              + ", ".join(summary.get("plots", [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
