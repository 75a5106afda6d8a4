"""Resume: which checkpoint to continue from, whether it fits this config, and what the user changed since.

* ``--resume latest`` takes the newest *intact* checkpoint: each candidate is validated before use (safetensors
  headers and sizes, every Accelerate state file present and CRC-clean). A corrupt one is renamed to
  ``checkpoints/corrupt-step-N`` (out of the way of the next ``--resume latest`` and of rotation, which would
  otherwise keep it and delete intact ones), with a warning naming the bad file, and the previous one is tried.
  When checkpoints exist but none is intact, the run refuses to start afresh.
* A missing or corrupt RNG state file costs exactness only: the run continues with a loud warning.
* Model, routing and data sections and the global batch must match the checkpoint (refused otherwise).
* Changes to the optimisation are honoured and reported: a new ``train.lr``, ``betas`` or ``weight_decay`` is
  written into the optimizer (its saved state would bring the old values back), and a changed schedule
  (``steps``, ``lr_schedule``, ``warmup_steps``, ``min_lr_ratio``) is applied from the resumed step on, with a
  warning giving the next step's learning rate under the old and the new schedule.
"""
from __future__ import annotations

import dataclasses
import logging
import pickle
from pathlib import Path
from typing import Optional

from ..weights.checkpoint import (CheckpointError, is_checkpoint, list_checkpoints, load_checkpoint, resolve_checkpoint,
                                  run_dir_of_checkpoint)
from ..config import ConfigError, ExperimentConfig
from .checkpointing import ACCELERATE_DIR, CORRUPT_PREFIX, quarantine, step_of, sweep, validate_checkpoint
from .rundir import run_dir_of
from .setup import lr_factor

logger = logging.getLogger("dit_moe.train")

SCHEDULE_KEYS = ("lr", "steps", "warmup_steps", "lr_schedule", "min_lr_ratio")
OPTIMIZER_KEYS = ("betas", "weight_decay")
_IGNORED_KEYS = ("run_dir", "run_name",    # a moved or renamed run folder changes nothing
                 "init_from")               # used by a fresh start only


@dataclasses.dataclass
class ResumeRequest:
    """Where the run lives and what to continue from: mode "new", "latest" or "path" (one checkpoint)."""
    run_dir: Path
    mode: str
    path: Optional[Path] = None


def resume_request(cfg: ExperimentConfig, resume: Optional[str]) -> ResumeRequest:
    """Interpret ``train(resume=...)`` without writing anything."""
    if resume is None:
        return ResumeRequest(run_dir_of(cfg), "new")
    if resume == "latest":
        return ResumeRequest(run_dir_of(cfg), "latest")
    path = Path(resume)
    if is_checkpoint(path):
        run_dir = run_dir_of_checkpoint(path) or run_dir_of(cfg)
        return ResumeRequest(run_dir, "path", path)
    resolve_checkpoint(path)                 # raises the error that says what is wrong with the path
    return ResumeRequest(path, "latest")     # a run folder with checkpoints: its newest intact one


def check_init_from(cfg: ExperimentConfig, request: ResumeRequest) -> None:
    """Before anything is written: the ``train.init_from`` checkpoint is readable, when a fresh start would use it.

    Whether its tensors fit the model is checked when the model is built (``load_init_weights`` names them).
    """
    path = cfg.train.init_from
    if path is None or (request.mode != "new" and list_checkpoints(request.run_dir)):
        return                                  # a resume continues its own state (and needs no source)
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from={path}: {e}") from e


def choose_checkpoint(request: ResumeRequest) -> Optional[Path]:
    """The checkpoint to resume from, None for a fresh start (main process, run lock held)."""
    run_dir = request.run_dir
    sweep(run_dir)
    found = list_checkpoints(run_dir)
    if request.mode == "new":
        if found:
            raise ConfigError(f"run folder {run_dir} already holds checkpoints; continue it with --resume latest, "
                              f"or choose another train.run_name")
        return None
    if request.mode == "path":
        path = request.path
        for warning in validate_checkpoint(path):
            logger.warning(f"WARNING: {warning}")
        newer = [p.name for p in found if p.parent.resolve() == path.parent.resolve() and step_of(p) > _step_or(path, -1)]
        if newer:
            raise ConfigError(f"cannot resume {path}: the run folder holds newer checkpoints ({', '.join(newer)}), "
                              "which the next --resume latest would pick; move them out of "
                              f"{path.parent} first, or continue the newest with --resume latest")
        return path
    bad = []
    for path in reversed(found):
        try:
            warnings = validate_checkpoint(path)
        except CheckpointError as e:
            moved = quarantine(path)
            bad.append(str(e))
            logger.warning(f"WARNING: checkpoint {path.name} is unusable: {e}; moved it to {moved.name} and "
                           "trying the previous one")
            continue
        for warning in warnings:
            logger.warning(f"WARNING: {warning}")
        if bad:
            logger.warning(f"resuming from {path}, the newest intact checkpoint")
        return path
    corrupt = sorted(p.name for p in (run_dir / "checkpoints").glob(CORRUPT_PREFIX + "*"))
    if corrupt:
        detail = "; ".join(bad) if bad else f"only quarantined ones: {', '.join(corrupt)}"
        raise CheckpointError(f"run folder {run_dir} holds no intact checkpoint ({detail}); to start afresh in "
                              f"this folder, move {', '.join(corrupt)} out of {run_dir / 'checkpoints'}")
    return None


def _step_or(path: Path, default: int) -> int:
    try:
        return step_of(path)
    except (IndexError, ValueError):
        return default


def check_compatible(saved: ExperimentConfig, cfg: ExperimentConfig, path: Path) -> None:
    """Refuse a checkpoint of another model, routing, data or global batch."""
    for section in ("model", "routing", "data", "diffusion"):
        a, b = getattr(saved, section), getattr(cfg, section)
        if a != b:
            diff = [f"{section}.{k}: checkpoint {v!r} vs now {getattr(b, k)!r}"
                    for k, v in dataclasses.asdict(a).items() if getattr(b, k) != v]
            raise ConfigError(f"cannot resume {path}: the configuration differs ({'; '.join(diff)})")
    if saved.train.global_batch_size != cfg.train.global_batch_size:
        raise ConfigError(f"cannot resume {path}: train.global_batch_size was {saved.train.global_batch_size}, "
                          f"now {cfg.train.global_batch_size} (the data position is counted in global batches)")


def restore(cfg: ExperimentConfig, parts, data, accelerator, path: Path) -> None:
    """Load the training state of ``path`` into ``parts`` (every rank), then apply what the user changed."""
    saved = load_checkpoint(path).experiment
    if saved is not None:
        check_compatible(saved, cfg, path)
    try:
        if parts.sharding is None:
            accelerator.load_state(str(path / ACCELERATE_DIR))
        else:                                  # fsdp: the same files, each rank keeps its shard
            parts.sharding.load_state(parts, data, path / ACCELERATE_DIR)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path / ACCELERATE_DIR}: cannot be loaded ({type(e).__name__}: {e})") from e
    state, world = parts.state, accelerator.num_processes
    if state.num_processes != world:
        logger.warning(f"checkpoint written by {state.num_processes} processes, resuming with {world}: "
                       "training continues but not bit-exactly (per-rank RNG streams differ)")
    if state.steps_per_epoch != data.steps_per_epoch:
        raise ConfigError(f"cannot resume {path}: {state.steps_per_epoch} steps per epoch then, "
                          f"{data.steps_per_epoch} now (dataset size changed?)")
    if saved is not None:
        apply_changes(saved.train, cfg.train, parts)
    state.num_processes = world
    logger.info(f"resumed from {path} at step {state.step} (epoch {state.epoch}, "
                f"step {state.batch_in_epoch} of {data.steps_per_epoch} in the epoch)")


def apply_changes(old, new, parts) -> None:
    """Make the optimizer and schedule follow the current TrainConfig ``new`` rather than the saved ``old``."""
    changed = {f.name: (getattr(old, f.name), getattr(new, f.name)) for f in dataclasses.fields(new)
               if f.name not in _IGNORED_KEYS and getattr(old, f.name) != getattr(new, f.name)}
    if not changed:
        return
    what = lambda keys: ", ".join(f"train.{k} {changed[k][0]} -> {changed[k][1]}" for k in keys if k in changed)
    opt = parts.optimizer.optimizer          # the torch optimizer inside Accelerate's wrapper
    sched = parts.scheduler.scheduler
    if any(k in changed for k in SCHEDULE_KEYS):
        k = sched.last_epoch                 # optimizer steps done; the next one has index k
        before = opt.param_groups[0]["lr"]
        after = new.lr * lr_factor(k, new.steps, new.warmup_steps, new.lr_schedule, new.min_lr_ratio)
        sched.base_lrs = [new.lr for _ in opt.param_groups]
        for g in opt.param_groups:
            g["initial_lr"], g["lr"] = new.lr, after
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        reshaped = (after != before or any(k in changed for k in ("warmup_steps", "lr_schedule"))
                    or (new.lr_schedule == "cosine" and any(k in changed for k in ("steps", "min_lr_ratio"))))
        (logger.warning if reshaped else logger.info)(
            f"resume: {what(SCHEDULE_KEYS)}: the learning-rate schedule follows the new values from step {k + 1} "
            f"on, which runs at lr {after:.6g} (the checkpoint's schedule: {before:.6g})")
    if any(k in changed for k in OPTIMIZER_KEYS):
        for g in opt.param_groups:
            g["betas"], g["weight_decay"] = tuple(new.betas), new.weight_decay
        logger.warning(f"resume: {what(OPTIMIZER_KEYS)}: applied to the optimizer")
    if "seed" in changed:
        logger.warning(f"resume: {what(['seed'])}: the data order and augmentation follow the new seed from "
                       "here on, so the run is not bit-identical to an uninterrupted one")
    rest = [k for k in changed if k not in SCHEDULE_KEYS + OPTIMIZER_KEYS + ("seed",)]
    if rest:
        logger.info(f"resume: {what(rest)}: in effect from here on")
