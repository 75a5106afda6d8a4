"""Running a study: every (arm, seed) trained, probed, sampled, evaluated and analysed; resumable; in parallel.

``run_study`` checks its inputs (arms, reference, extractor) before the output folder is created, then runs the
(arm, seed) tasks not finished yet -- in this process, in ``--jobs`` worker processes, or under a multi-process
launch with every run on all processes -- calibrates the Top-p arms once their source has finished, times every
arm, and hands the results to ``report`` (aggregate, table, plots).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from .. import inference, pipeline, sampling
from ..checks import check_at_least, check_output_dir
from ..config import ExperimentConfig
from ..errors import DitMoeError, TrainingInterrupted
from ..evaluate import check_extractor, check_reference
from ..features import digits_classifier
from ..analyze import read_metrics
from ..registry import parse_name
from ..training import run_dir_of, train
from ..weights.checkpoint import list_checkpoints
from .config import CALIBRATION_FILE, RESULT_FILE, TIMING_FILE, ArmSpec, EvalSpec, StudyConfig, StudyError, arm_config
from .probe import calibrate_topp_threshold, probe_inputs, probe_routing
from .records import read_cache, read_record, record_path, toolkit_info, write_cache, write_record
from .report import aggregate, write_report
from .sweep import compute_sweep, routing_state

__all__ = ["run_arm", "summarize_run", "check_inputs", "run_study", "report_study", "time_arms"]


# ---------------------------------------------------------------------------------------------------------
#                                              One run
# ---------------------------------------------------------------------------------------------------------

def _reference_path(study: StudyConfig) -> Path:
    """The study's FID reference file (the embedded digits: written into the output folder once)."""
    return pipeline.reference_file(study.evaluation.reference, study.output)


def _evaluation_record(ev: EvalSpec) -> dict:
    """The evaluation settings a run's numbers depend on (the timing pass is separate)."""
    return {k: v for k, v in dataclasses.asdict(ev).items() if k != "timing_steps"}


def _load_result(run_dir: Path, steps: int, ev: EvalSpec) -> Optional[dict]:
    """The run's study_result.json when the run is finished (final checkpoint + result), else None.

    A study over several sittings must not mix evaluations: a finished run evaluated with other settings than the
    study's now is an error naming the settings (results from before the record existed are taken as they are)."""
    f = run_dir / RESULT_FILE
    if not f.is_file() or pipeline.final_checkpoint(run_dir, steps) is None:
        return None
    try:
        result = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    if result.get("steps") != steps:
        return None
    saved, now = result.get("evaluation"), _evaluation_record(ev)
    if saved is not None and saved != now:
        diff = ", ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in now if saved.get(k) != now.get(k))
        raise StudyError(f"{f}: this finished run was evaluated with other settings ({diff}); use another --output, "
                         f"or delete {f.name} to evaluate it again")
    return result


def _record_file(study: StudyConfig, arm: ArmSpec, seed: int) -> Optional[Path]:
    return record_path(study.records, arm.name, seed) if study.records is not None else None


def _finished(study: StudyConfig, arm: ArmSpec, seed: int, cfg: ExperimentConfig) -> Optional[dict]:
    """The numbers of a finished (arm, seed): its record (checked against the study now) or, without one, the
    finished run folder's study_result.json; None when the run has to (continue to) train."""
    f = _record_file(study, arm, seed)
    if f is not None and f.is_file():
        return read_record(f, arm.name, seed, _evaluation_record(study.evaluation), cfg.to_dict(),
                           ExperimentConfig().to_dict())
    return _load_result(run_dir_of(cfg), cfg.train.steps, study.evaluation)


def _missing(study: StudyConfig, arm: ArmSpec, seed: int, result: Optional[dict], ckpt: Optional[Path]) -> list[str]:
    """What a finished run still lacks and can still get: read-outs that need the checkpoint (when it is there) and
    its record. A record whose checkpoint is gone (a fresh clone) is complete as it is."""
    if result is None:
        return ["run"]
    todo = []
    if ckpt is not None:
        if "routing_state" not in result:
            todo.append("routing_state")
        sw = study.sweep
        if sw is not None and arm.name in sw.arms and (result.get("sweep") or {}).get("settings") != sw.settings(study.evaluation):
            todo.append("sweep")
    f = _record_file(study, arm, seed)
    if f is not None and (todo or not f.is_file()):
        todo.append("record")
    return todo


def run_arm(study: StudyConfig, arm: ArmSpec, seed: int, threshold: Optional[float] = None, state=None,
            device: Optional[str] = None) -> dict:
    """Train, probe, sample, evaluate and analyse one (arm, seed), then take the read-outs that need its checkpoint
    (routing state, compute sweep); returns its numbers, written to the run's study_result.json and its record."""
    is_main = state is None or state.is_main_process
    cfg = arm_config(study, arm, seed, threshold)
    run_dir = run_dir_of(cfg)
    result = _finished(study, arm, seed, cfg)
    ckpt = pipeline.final_checkpoint(run_dir, cfg.train.steps)
    todo = _missing(study, arm, seed, result, ckpt)
    if not todo:
        result["skipped"] = True
        return result
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if result is None:
        result = _train_and_evaluate(study, arm, seed, cfg, threshold, state, device)
        ckpt = pipeline.final_checkpoint(run_dir, cfg.train.steps)
        todo = _missing(study, arm, seed, result, ckpt)
    if not is_main:
        return {}
    timings = result.setdefault("timings", {})
    if "routing_state" in todo:
        samples = run_dir / "study_samples" / "samples.json"
        state_ = routing_state(cfg, ckpt, run_dir, study.evaluation.active_fraction,
                               json.loads(samples.read_text()) if samples.is_file() else None)
        result["routing_state"] = state_
    if "sweep" in todo:
        result["sweep"] = compute_sweep(study, arm, cfg, ckpt, run_dir, result, _reference_path(study), device)
        timings["sweep_s"], timings["sweep_cpu_s"] = result["sweep"]["seconds"], result["sweep"]["cpu_seconds"]
    result.setdefault("config", cfg.to_dict())
    result.setdefault("regenerate", f"dit-moe study {study.path} --arms {arm.name} --seeds {seed}")
    if "toolkit" not in result:
        # A result evaluated before results carried the toolkit: say which toolkit wrote the record, not the run.
        result["toolkit"] = {"version": None, "commit": None, "record_written_by": toolkit_info()}
    if ckpt is not None:
        (run_dir / RESULT_FILE).write_text(json.dumps({k: v for k, v in result.items() if k != "skipped"}, indent=1))
    f = _record_file(study, arm, seed)
    if f is not None:
        write_record(f, result)
    return result


def _train_and_evaluate(study: StudyConfig, arm: ArmSpec, seed: int, cfg: ExperimentConfig,
                        threshold: Optional[float], state, device: str) -> dict:
    """The pipeline's stages (``dit_moe.pipeline``): train, probe, sample + FID, analyse: the table's numbers of one
    run (every process takes part; the main process gets them, the others {})."""
    is_main = state is None or state.is_main_process
    barrier = (lambda: state.wait_for_everyone()) if state is not None else (lambda: None)
    run_dir = run_dir_of(cfg)
    ev = study.evaluation
    # Wall seconds per stage, and this process's CPU seconds (the cost on a shared machine). A run continued from an
    # earlier process's checkpoint or samples: its seconds count this process's part only.
    watch = pipeline.Stopwatch(cpu=True, timings={
        "resumed": bool(list_checkpoints(run_dir)) or (run_dir / "study_samples" / "images").is_dir()})
    toolkit = toolkit_info()

    with watch.stage("train"):
        pipeline.train_run(cfg)
    ckpt = pipeline.final_checkpoint(run_dir, cfg.train.steps)
    if ckpt is None:
        raise StudyError(f"{run_dir}: training returned without a final checkpoint step-{cfg.train.steps:07d}")

    probe = None
    if is_main:
        with watch.stage("probe"):
            model = inference.load(ckpt, weights="model", device=device).model
            if model.arch.is_moe:
                probe = probe_routing(model, probe_inputs(cfg, ev.probe_batches, ev.probe_batch_size))
            del model

    sampler, steps = ev.sampler_for(cfg.diffusion.objective)      # the checkpoint's sample section says the same
    samples_dir = run_dir / "study_samples"
    several = state is not None and state.num_processes > 1
    # Several processes: each samples on its own device (Accelerate's); one process: the study's device.
    evaluation = sampling.Evaluation(reference=str(_reference_path(study)), extractor=ev.extractor,
                                     inception_weights=ev.inception_weights,
                                     classifier_accuracy=ev.classifier_accuracy)
    with watch.stage("sample_fid"):
        try:
            bundle = inference.load(ckpt, weights="ema", device=state.device if several else device)
            settings = dataclasses.replace(bundle.defaults, sampler=sampler, steps=steps, cfg_scale=ev.cfg_scale,
                                           seed=ev.seed, batch_size=ev.batch_size)
            info = pipeline.generate_and_evaluate(bundle, samples_dir, settings, ev.num_samples, evaluation, state)
        except (sampling.SamplingError, inference.InferenceError, OSError) as e:
            raise StudyError(f"{run_dir}: sampling / FID failed: {e}") from e
        del bundle
    barrier()
    if not is_main:
        return {}
    values = info["metrics"]
    accuracy = info["classifier_accuracy"]

    with watch.stage("analysis"):
        report, _ = pipeline.analyze_run(ckpt, run_dir, routing=parse_name(cfg.model.name).is_moe,
                                         num_per_class=ev.analysis_per_class, sampler=sampler, num_steps=steps,
                                         cfg_scale=ev.cfg_scale, seed=ev.seed, device=device)
        analysis = report["active_experts"] if report is not None else None   # None: a dense model
    timings = watch.timings

    result = summarize_run(run_dir, ev)
    result.update({
        "arm": arm.name, "seed": seed, "steps": cfg.train.steps, "run_dir": str(run_dir), "checkpoint": str(ckpt),
        "model": cfg.model.name, "objective": cfg.diffusion.objective, "sampler": sampler, "sampler_steps": steps,
        "routing": cfg.routing.type, "default_moe": cfg.routing.default_moe,
        "default_mode": cfg.routing.default_mode if cfg.routing.default_moe else None,
        "lb_coef": cfg.routing.lb_coef,
        "balance_bias": cfg.routing.balance_bias,
        "ec_pool": cfg.routing.ec_pool if cfg.routing.type == "expert_choice" else None,
        "threshold": threshold if threshold is not None else (cfg.routing.threshold if cfg.routing.type == "topp" else None),
        "fid": values.get("fid"), "classifier_accuracy": accuracy,
        "sample_active_mean": (info.get("active_experts") or {}).get("mean"),
        "sample_active_per_bucket": (info.get("active_experts") or {}).get("per_bucket"),
        "sample_active_token_std": analysis["std"] if analysis else None,
        "sample_images_per_second": info.get("images_per_second"),
        "probe_active_mean": probe["mean"] if probe else None,
        "probe_active_token_std": probe["std"] if probe else None,
        "probe_active_per_layer": probe["per_layer"] if probe else None,
        "probe_active_per_bucket": probe["per_bucket"] if probe else None,
        "probe_unrouted_frac": probe["unrouted_frac"] if probe else None,
        "timings": timings,
        "evaluation": _evaluation_record(ev),
        "config": cfg.to_dict(),
        "toolkit": toolkit,
        "regenerate": f"dit-moe study {study.path} --arms {arm.name} --seeds {seed}",
    })
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))
    return result


def summarize_run(run_dir: Path, ev: EvalSpec) -> dict:
    """Training numbers of one run from its metrics.jsonl: loss curve, final loss, activated experts, s/step."""
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    diff = [r["mse"] + r.get("vb", 0.0) for r in rows]    # the diffusion loss, without router aux terms (flow: no vb)
    n_final = max(1, int(round(ev.final_fraction * len(rows))))
    n_active = max(1, int(round(ev.active_fraction * len(rows))))
    active = [r.get("active_experts") for r in rows]
    tail = [a for a in active[-n_active:] if a is not None]
    return {
        "curve": {"step": steps, "loss": diff, "active": active,
                  "threshold": [r.get("threshold") if not isinstance(r.get("threshold"), list) else None for r in rows]},
        "final_loss": float(np.mean(diff[-n_final:])),
        "train_active_mean": float(np.mean(tail)) if tail else None,
        "train_active_step_std": float(np.std(tail)) if tail else None,
        "sec_per_step": pipeline.seconds_per_step(run_dir),
        "train_seconds": rows[-1].get("seconds"),
    }


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
        _reference_path(study)                 # written once, before workers read it
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
        return not _missing(study, arm, seed, _finished(study, arm, seed, cfg),
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
                done = _finished(study, arm, seed, arm_config(study, arm, seed, threshold))
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
