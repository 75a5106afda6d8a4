"""One run of a study: an (arm, seed) trained, probed, sampled, evaluated and analysed through the run pipeline
(dit_moe/pipeline.py), its result read back when it finished before, and what a finished run must have on disk.

    run_arm          train -> probe -> generate + evaluate -> analyze, resumable; returns the run's record
    summarize_run    the training numbers of a run folder (final loss, activated experts, speed)
    finished_result  the record of an (arm, seed) that finished before (records folder or run folder), else None
    missing_outputs  what a run still lacks (result, checkpoint), for the scheduler and --report-only
    reference_path   the study's FID reference file
"""

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import inference, pipeline, sampling
from ..analyze import read_metrics
from ..config import ExperimentConfig
from ..registry import parse_name
from ..training import run_dir_of
from ..weights.checkpoint import list_checkpoints
from .config import RESULT_FILE, ArmSpec, EvalSpec, StudyConfig, StudyError, arm_config
from .probe import probe_inputs, probe_routing
from .records import read_record, record_path, toolkit_info, write_record
from .sweep import compute_sweep, routing_state

__all__ = ["run_arm", "summarize_run", "finished_result", "missing_outputs", "reference_path"]


def reference_path(study: StudyConfig) -> Path:
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


def finished_result(study: StudyConfig, arm: ArmSpec, seed: int, cfg: ExperimentConfig) -> Optional[dict]:
    """The numbers of a finished (arm, seed): its record (checked against the study now) or, without one, the
    finished run folder's study_result.json; None when the run has to (continue to) train."""
    f = _record_file(study, arm, seed)
    if f is not None and f.is_file():
        return read_record(f, arm.name, seed, _evaluation_record(study.evaluation), cfg.to_dict(),
                           ExperimentConfig().to_dict())
    return _load_result(run_dir_of(cfg), cfg.train.steps, study.evaluation)


def missing_outputs(study: StudyConfig, arm: ArmSpec, seed: int, result: Optional[dict], ckpt: Optional[Path]) -> list[str]:
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
    result = finished_result(study, arm, seed, cfg)
    ckpt = pipeline.final_checkpoint(run_dir, cfg.train.steps)
    todo = missing_outputs(study, arm, seed, result, ckpt)
    if not todo:
        result["skipped"] = True
        return result
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if result is None:
        result = _train_and_evaluate(study, arm, seed, cfg, threshold, state, device)
        ckpt = pipeline.final_checkpoint(run_dir, cfg.train.steps)
        todo = missing_outputs(study, arm, seed, result, ckpt)
    if not is_main:
        return {}
    timings = result.setdefault("timings", {})
    if "routing_state" in todo:
        samples = run_dir / "study_samples" / "samples.json"
        state_ = routing_state(cfg, ckpt, run_dir, study.evaluation.active_fraction,
                               json.loads(samples.read_text()) if samples.is_file() else None)
        result["routing_state"] = state_
    if "sweep" in todo:
        result["sweep"] = compute_sweep(study, arm, cfg, ckpt, run_dir, result, reference_path(study), device)
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
    evaluation = sampling.Evaluation(reference=str(reference_path(study)), extractor=ev.extractor,
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
