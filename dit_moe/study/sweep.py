"""Two read-outs of a finished run's final model that need its checkpoint, so they are taken while it exists and
kept in the run's record: the routing state per layer, and compute against quality at sampling time.

``routing_state``: per MoE layer, the activated experts at the end of training (training log, last quarter), on
the probe and while sampling, and for DTop-p the DRN scale, its bound and the controller's threshold -- DTop-p's
claim is that layers settle on different budgets under one target.

``compute_sweep``: the final EMA model sampled ``num_samples`` times per point with the study's sampler, CFG, seed
and reference, at other activated-expert budgets than it was trained for: a DTop-p model re-targeted to each of
``sweep.targets`` (``dit_moe.sampling.calibrate_threshold``: the threshold bisected on its own sampling trajectory,
as ``dit-moe sample --target-experts``), a Top-k model with each k of ``sweep.top_k``. The measured activated experts
per token are the MoE layers' relative compute (each expert has the same FLOPs).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .. import inference, sampling
from ..analyze import read_metrics
from ..config import ExperimentConfig
from ..models.routers.dtopp import DTopPRouter
from ..models.routers.topk import TopKRouter
from ..registry import parse_name
from .config import ArmSpec, StudyConfig, StudyError

__all__ = ["SWEEP_DIR", "routing_state", "compute_sweep", "sweep_kind"]

SWEEP_DIR = "study_sweep"          # <run>/study_sweep/<kind>-<value>/: one sample folder per point


def _routers(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def routing_state(cfg: ExperimentConfig, ckpt: Path, run_dir: Path, active_fraction: float,
                  samples_json: Optional[dict]) -> Optional[dict]:
    """Per-layer routing of a finished MoE run (None for a dense model)."""
    if parse_name(cfg.model.name).num_experts == 1:
        return None
    rows = read_metrics(run_dir)
    layers = [r["active_experts_per_layer"] for r in rows if r.get("active_experts_per_layer") is not None]
    tail = layers[-max(1, int(round(active_fraction * len(layers)))):] if layers else []
    out = {"train_active_per_layer": np.mean(np.array(tail, dtype=float), 0).tolist() if tail else None,
           "sample_active_per_layer": ((samples_json or {}).get("active_experts") or {}).get("per_layer")}
    if cfg.routing.type == "dtopp":
        model = inference.load(ckpt, weights="model", device="cpu").model
        routers = _routers(model, DTopPRouter)
        scale = [float(r.scale().detach()) for r in routers]
        bound = [math.exp(r.log_scale_max) for r in routers]
        out.update(drn_scale_per_layer=scale, drn_scale_max_per_layer=bound,
                   drn_layers_at_bound=sum(s >= b * (1 - 1e-4) for s, b in zip(scale, bound)),
                   threshold_per_layer=[float(r.controller.threshold[r.slot]) for r in routers])
    return out


def sweep_kind(cfg: ExperimentConfig) -> str:
    return "target_experts" if cfg.routing.type == "dtopp" else "top_k"


def compute_sweep(study: StudyConfig, arm: ArmSpec, cfg: ExperimentConfig, ckpt: Path, run_dir: Path,
                  result: dict, reference: Path, device: str) -> dict:
    """Every sweep point of one final model: FID, accuracy and measured activated experts (see the module doc)."""
    sw, ev = study.sweep, study.evaluation
    settings_rec = sw.settings(ev)
    kind = sweep_kind(cfg)
    trained = cfg.routing.target if kind == "target_experts" else parse_name(cfg.model.name).top_k
    values = settings_rec["targets"] if kind == "target_experts" else settings_rec["top_k"]
    num = settings_rec["num_samples"]
    sampler, steps = ev.sampler_for(cfg.diffusion.objective)
    evaluation = sampling.Evaluation(reference=str(reference), extractor=ev.extractor,
                                     inception_weights=ev.inception_weights,
                                     classifier_accuracy=ev.classifier_accuracy)
    t0, c0 = time.time(), time.process_time()
    points = []
    for value in values:
        if kind == "top_k" and value == trained and num == ev.num_samples:
            # Exactly the main evaluation (same weights, k, sampler, seed and count): its numbers, not a re-run.
            points.append({kind: value, "fid": result.get("fid"), "classifier_accuracy": result.get("classifier_accuracy"),
                           "active_mean": result.get("sample_active_mean"), "main_evaluation": True})
            continue
        bundle = inference.load(ckpt, weights="ema", device=device)
        settings = dataclasses.replace(bundle.defaults, sampler=sampler, steps=steps, cfg_scale=ev.cfg_scale,
                                       seed=ev.seed, batch_size=ev.batch_size)
        point: dict = {kind: value}
        try:
            if kind == "target_experts":
                cal = sampling.calibrate_threshold(bundle.model, value, settings=settings, shape=bundle.shape,
                                                   num_classes=bundle.num_classes, seed=ev.seed,
                                                   num_samples=sw.calibration_samples, objective=bundle.objective)
                point["threshold"] = cal["threshold"]
                point["calibration_measured"] = cal["measured"]
            else:
                for router in _routers(bundle.model, TopKRouter):
                    router.top_k = int(value)
            info = sampling.generate(bundle, run_dir / SWEEP_DIR / f"{kind}-{value:g}", settings, num_samples=num,
                                     progress=False, evaluation=evaluation, run_info={kind: value})
        except (sampling.SamplingError, inference.InferenceError, OSError) as e:
            raise StudyError(f"{run_dir}: sweep point {kind}={value:g} failed: {e}") from e
        active = info.get("active_experts") or {}
        point.update(fid=info["metrics"].get("fid"), classifier_accuracy=info["classifier_accuracy"],
                     active_mean=active.get("mean"), active_per_layer=active.get("per_layer"),
                     images_per_second=info.get("images_per_second"))
        points.append(point)
        print(f"[study] {arm.name} sweep {kind}={value:g}: FID {point['fid']:.2f}, "
              f"{point['active_mean']:.2f} experts/token", flush=True)
    return {"settings": settings_rec, "kind": kind, "trained": trained, "points": points,
            "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}
