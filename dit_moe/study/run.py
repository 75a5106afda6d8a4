"""Running a study: every (arm, seed) trained, probed, sampled, evaluated and analysed; resumable; in parallel.

``run_study`` checks its inputs (arms, reference, extractor) before the output folder is created, then runs the
(arm, seed) tasks not finished yet -- in this process, in ``--jobs`` worker processes, or under a multi-process
launch with every run on all processes -- calibrates the Top-p arms once their source has finished, times every
arm, and hands the results to ``report`` (aggregate, table, plots).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from .. import inference, pipeline
from ..checks import check_at_least, check_output_dir
from ..errors import DitMoeError, TrainingInterrupted
from ..evaluate import check_extractor, check_reference
from ..features import digits_classifier
from ..training import run_dir_of, train
from .arm import finished_result, missing_outputs, reference_path, run_arm
from .config import CALIBRATION_FILE, TIMING_FILE, ArmSpec, StudyConfig, StudyError, arm_config
from .probe import calibrate_topp_threshold, probe_inputs
from .records import read_cache, write_cache
from .report import aggregate, write_report

__all__ = ["check_inputs", "run_study", "report_study", "time_arms"]


# ---------------------------------------------------------------------------------------------------------
#                                   Scheduling (with calibration dependencies)
# ---------------------------------------------------------------------------------------------------------

def _calibrate(study: StudyConfig, arm: ArmSpec, device: str) -> float:
    """The calibrated threshold of ``arm`` (cached in <output>/calibration.json)."""
    file = study.output / CALIBRATION_FILE
    cache = read_cache(file)
    src = study.arm(arm.calibrate_from)
    src_cfg = arm_config(study, src, study.seeds[0])
    key = f"{arm.name}"
    # The records' threshold first: the recorded runs of this arm were trained with it (a fresh clone has no
    # checkpoint of the source to calibrate on, and a re-calibration on another machine could differ in the last bit).
    recorded = read_cache(study.records / CALIBRATION_FILE) if study.records is not None else {}
    entry = recorded.get(key)
    if entry and entry.get("target") == arm.calibrate_target and entry.get("source_arm") == src.name \
            and entry.get("source_seed") == study.seeds[0]:
        return entry["threshold"]
    ckpt = pipeline.final_checkpoint(run_dir_of(src_cfg), src_cfg.train.steps)
    if ckpt is None:
        raise StudyError(f"arm {arm.name!r}: calibration source {src.name!r} seed {study.seeds[0]} has not finished")
    entry = cache.get(key)
    if entry and entry.get("source_checkpoint") == str(ckpt) and entry.get("target") == arm.calibrate_target:
        if study.records is not None:
            write_cache(study.records / CALIBRATION_FILE, {**recorded, key: entry})
        return entry["threshold"]
    model = inference.load(ckpt, weights="model", device=device).model
    ev = study.evaluation
    result = calibrate_topp_threshold(model, probe_inputs(src_cfg, ev.probe_batches, ev.probe_batch_size),
                                      arm.calibrate_target)
    result.update(source_arm=src.name, source_seed=study.seeds[0], source_checkpoint=str(ckpt),
                  source_threshold=src_cfg.routing.threshold)
    cache[key] = result
    write_cache(file, cache)
    if study.records is not None:
        write_cache(study.records / CALIBRATION_FILE, {**recorded, key: result})
    print(f"[study] calibrated Top-p threshold for {arm.name}: p = {result['threshold']:.4f} gives "
          f"{result['measured']:.3f} experts/token on {src.name}-s{study.seeds[0]}'s final model "
          f"(trained with p = {src_cfg.routing.threshold})", flush=True)
    return result["threshold"]


@contextlib.contextmanager
def _stop_workers_on_sigterm():
    """SIGTERM to the study process reaches its worker processes too (``kill PID`` signals one process, not its
    group): each finishes its step and checkpoints, the pool waits for them, and the study stops with exit code
    128 + 15 -- instead of workers training on, orphaned, while a restarted study finds their run folders locked."""
    def handler(signum, frame):
        for child in mp.active_children():
            child.terminate()
        raise TrainingInterrupted(f"stopped by {signal.Signals(signum).name}: the runs in flight saved a checkpoint; "
                                  "run the same command to continue", signum, 0, None)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_run(study: StudyConfig, arm_name: str, seed: int, threshold: Optional[float], device: str) -> dict:
    try:
        return run_arm(study, study.arm(arm_name), seed, threshold, device=device)
    except Exception as e:
        # Some errors (TrainingInterrupted) do not survive pickling back to the parent; send their message instead.
        raise StudyError(f"run {arm_name}-s{seed} failed: {type(e).__name__}: {e}") from None


def check_inputs(study: StudyConfig, jobs: int = 1, device: Optional[str] = None,
                 only_arms: Optional[Sequence[str]] = None) -> str:
    """What ``run_study`` checks before the output folder is created: --jobs, --device, --arms, the output path,
    the extractor and its weights, and a reference file or folder (it must open as the FID reference). Returns
    the device."""
    check_at_least("--jobs", jobs, 1, StudyError)
    if only_arms:
        missing = sorted(set(only_arms) - {a.name for a in study.arms})
        if missing:
            raise StudyError(f"--arms: unknown arm(s) {', '.join(missing)}; arms: "
                             + ", ".join(a.name for a in study.arms))
    check_output_dir("output", study.output, StudyError)
    device = str(inference.resolve_device(device))
    ev = study.evaluation
    try:
        if ev.reference == "builtin-digits":
            check_extractor(ev.extractor)
            if ev.inception_weights is not None and not Path(ev.inception_weights).is_file():
                raise StudyError(f"feature extractor weights {ev.inception_weights} do not exist")
        else:
            check_reference(ev.reference, metrics=("fid",), feature_extractor=ev.extractor,
                            inception_weights=ev.inception_weights, label="evaluation.reference")
    except DitMoeError as e:
        raise StudyError(f"{study.path}: {e}") from None
    return device


def run_study(study: StudyConfig, jobs: int = 1, device: Optional[str] = None, plots_dir: Optional[Path] = None,
              only_arms: Optional[Sequence[str]] = None) -> dict:
    """Run every (arm, seed) not finished yet, then aggregate and write results.json / results.md / plots."""
    device = check_inputs(study, jobs, device, only_arms)       # before any folder is created
    state = None
    if os.environ.get("WORLD_SIZE", "1") != "1":
        state = PartialState(cpu=device == "cpu")
        if jobs != 1:
            raise StudyError(f"--jobs {jobs}: under a multi-process launch every run uses all processes; use --jobs 1")
    is_main = state is None or state.is_main_process
    arms = [a for a in study.arms if only_arms is None or a.name in only_arms]
    if only_arms:
        needed = {a.calibrate_from for a in arms if a.calibrate_from} - {a.name for a in arms}
        arms = [a for a in study.arms if a.name in needed] + arms
    study.output.mkdir(parents=True, exist_ok=True)
    if is_main:
        reference_path(study)                 # written once, before workers read it
        (study.output / "study.yaml").write_text(study.path.read_text() if study.path else "")
        if study.evaluation.extractor == "digits-cnn":
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
        box = [_calibrate(study, arm, device) if is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _is_done(arm: ArmSpec, seed: int, threshold) -> bool:
        """Nothing left to do for this (arm, seed) (a worker process is not worth starting)."""
        cfg = arm_config(study, arm, seed, threshold)
        return not missing_outputs(study, arm, seed, finished_result(study, arm, seed, cfg),
                            pipeline.final_checkpoint(run_dir_of(cfg), cfg.train.steps))

    if jobs <= 1:
        for arm, seed in tasks:
            print(f"[study] {arm.name} seed {seed} ({time.time() - t_start:.0f} s into the study)", flush=True)
            results[(arm.name, seed)] = run_arm(study, arm, seed, threshold_for(arm), state=state, device=device)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        pending = list(tasks)
        running = {}
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                    initargs=(threads,)) as pool, _stop_workers_on_sigterm():
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


def report_study(study: StudyConfig, plots_dir: Optional[Path] = None,
                 only_arms: Optional[Sequence[str]] = None) -> dict:
    """The report of what has finished -- records, and finished run folders -- without running anything: the state
    of a study that takes several sittings (``dit-moe study CONFIG --report-only``). Timings come from the cache
    only; what is not finished is listed in the report."""
    check_inputs(study, 1, "cpu", only_arms)
    arms = [a for a in study.arms if only_arms is None or a.name in only_arms]
    runs, missing = [], []
    for arm in arms:
        threshold = _known_threshold(study, arm)
        for seed in study.seeds:
            done = None
            if arm.calibrate_from is None or threshold is not None:
                done = finished_result(study, arm, seed, arm_config(study, arm, seed, threshold))
            (runs if done is not None else missing).append(done if done is not None else f"{arm.name}-s{seed}")
    if not runs:
        raise StudyError(f"{study.path}: no finished run to report (records: {study.records}, runs: "
                         f"{study.output / 'runs'})")
    timing = time_arms(study, arms, "cpu", {}, measure=False)
    summary = aggregate(study, runs, timing)
    summary["missing"] = missing
    study.output.mkdir(parents=True, exist_ok=True)
    write_report(study, summary, plots_dir)
    return summary


def _known_threshold(study: StudyConfig, arm: ArmSpec) -> Optional[float]:
    """A calibrated arm's threshold as recorded (records first, then the output's cache); None if not calibrated."""
    if arm.calibrate_from is None:
        return None
    for folder in (study.records, study.output):
        entry = read_cache(folder / CALIBRATION_FILE).get(arm.name) if folder is not None else None
        if entry and entry.get("target") == arm.calibrate_target:
            return entry["threshold"]
    return None


def time_arms(study: StudyConfig, arms: Sequence[ArmSpec], device: str, thresholds: dict, state=None,
              measure: bool = True) -> dict:
    """Seconds per training step of every arm, measured one arm after another with all cores (cached).

    The study's own s/step depends on what ran beside each run (``--jobs``) and on other load on the machine; this
    pass trains each arm (first seed) for ``evaluation.timing_steps`` steps in this process, alone, and reports the
    median over logging intervals after the first (start-up) one. Cached in ``<output>/timing.json``.
    """
    is_main = state is None or state.is_main_process
    steps = study.evaluation.timing_steps
    file = study.output / TIMING_FILE
    # The records' timings are reused whatever thread count measured them (the key says it): a study re-read in a
    # fresh clone reports the same numbers instead of timing the arms again on another machine.
    records = study.records / TIMING_FILE if study.records is not None else None
    recorded = read_cache(records)
    cache = {**read_cache(file), **recorded}
    out = {}
    for arm in arms:
        key = f"{arm.name}@{steps}@{device}@{torch.get_num_threads()}threads"
        found = [k for k in recorded if k.startswith(f"{arm.name}@{steps}@{device}@")]
        if key not in cache and found:
            key = found[0]
        if key not in cache and not measure:
            continue
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
            cache[key] = pipeline.seconds_per_step(run_dir)
            if is_main:
                write_cache(file, cache)
                if records is not None:
                    recorded[key] = cache[key]
                    write_cache(records, recorded)
                print(f"[study] timing {arm.name}: {cache[key]:.3f} s/step", flush=True)
        out[arm.name] = cache[key]
    return out
