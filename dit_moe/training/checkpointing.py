"""Checkpoints of a run: validation, the save sequence, rotation, and the sweep of what a crash leaves behind.

A training checkpoint is a ``dit_moe.weights.checkpoint`` directory plus ``accelerate/`` (model, optimizer, schedule,
grad scaler, every rank's RNG state, EMA, train state). The save sequence keeps, at every instant, at least one
complete checkpoint visible to ``--resume latest`` (tests/test_training_faults.py kills it at each point):

1. every rank writes its Accelerate state into ``checkpoints/.staging-<token>-step-N`` (token: this run's lock);
2. the main process writes weights and config into ``.step-N.tmp-*``, moves the staging folder inside, flushes,
   and renames it to ``step-N`` (``save_checkpoint``: atomic);
3. only then are checkpoints beyond ``train.keep_last`` retired: renamed to ``.step-M.trash-<token>`` (atomic,
   so a half-deleted folder never looks like a checkpoint), then deleted.

A step is written once: the stop-save and the final save reuse a checkpoint of the same step. A write that fails
(disk full) removes its temporaries and raises ``CheckpointError``; the previous checkpoint is untouched.
At start, the lock holder sweeps the temporaries of dead runs (``sweep``): staging, ``.tmp-``, ``.trash-`` and
``.old-`` folders -- only lock holders create them, and the lock is ours -- and first renames back a complete
checkpoint that a crash left aside as ``.step-N.old-*`` while ``step-N`` is missing.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Optional

from safetensors import SafetensorError

from ..weights.checkpoint import (EMA_FILE, MODEL_FILE, CheckpointError, list_checkpoints, load_checkpoint,
                                  load_tensors, save_checkpoint)
from .stop import any_rank, on_main

logger = logging.getLogger("dit_moe.train")

ACCELERATE_DIR = "accelerate"
CORRUPT_PREFIX = "corrupt-"                       # quarantined checkpoints: not matched by list_checkpoints
_OLD = re.compile(r"^\.(step-\d+)\.old-")


def step_of(path: Path) -> int:
    return int(Path(path).name.split("-", 1)[1])


# ---------------------------------------------------------------------------------------------------------
#                                               Validation
# ---------------------------------------------------------------------------------------------------------

def _check_safetensors(file: Path) -> None:
    """Header and size of a safetensors file (no tensor is read): catches truncation and garbage."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors file ({e})") from e
    if 8 + n + end != size:
        raise CheckpointError(f"{file}: truncated or padded ({size} bytes, the header describes {8 + n + end})")


def _check_torch_file(file: Path) -> None:
    """A ``torch.save`` file is a zip archive: its directory and every member's CRC must check out."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        with zipfile.ZipFile(file) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated ({e})") from e
    if bad is not None:
        raise CheckpointError(f"{file}: corrupt member {bad} (CRC mismatch)")


def validate_checkpoint(path: Path) -> list[str]:
    """Check that ``path`` can be resumed from; raises ``CheckpointError`` naming the bad file.

    Returns warnings about state that only costs exactness (a missing or corrupt RNG state file: the run
    continues, but not bit-identically).
    """
    path = Path(path)
    ckpt = load_checkpoint(path)                   # config.json
    for name in (MODEL_FILE, EMA_FILE):
        _check_safetensors(path / name)
    acc = path / ACCELERATE_DIR
    if not acc.is_dir():
        raise CheckpointError(f"{path}: has no {ACCELERATE_DIR}/ training state, so it cannot be resumed "
                              "(it holds weights only)")
    _check_safetensors(acc / "model.safetensors")
    for file in (path / MODEL_FILE, path / EMA_FILE, acc / "model.safetensors"):
        load_tensors(file)                         # readable and finite: a resume must not continue from NaN weights
    required = ["optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"]
    if ckpt.experiment is not None and ckpt.experiment.train.mixed_precision == "fp16":
        required.append("scaler.pt")
    for name in required:
        _check_torch_file(acc / name)
    warnings = []
    for rank in range(int(ckpt.meta.get("num_processes", 1))):
        try:
            _check_torch_file(acc / f"random_states_{rank}.pkl")
        except CheckpointError as e:
            warnings.append(f"{e}: the RNG streams of rank {rank} cannot be restored, so the resumed run is NOT "
                            "bit-identical to an uninterrupted one (noise, timesteps and label dropout differ)")
    return warnings


def is_intact(path: Path) -> bool:
    try:
        validate_checkpoint(path)
        return True
    except CheckpointError:
        return False


def quarantine(path: Path) -> Path:
    """Rename a corrupt checkpoint out of the way of ``--resume latest`` and rotation; returns the new path."""
    target = path.with_name(CORRUPT_PREFIX + path.name)
    n = 1
    while target.exists():
        target, n = path.with_name(f"{CORRUPT_PREFIX}{path.name}.{n}"), n + 1
    os.replace(path, target)
    return target


# ---------------------------------------------------------------------------------------------------------
#                                          Sweep at the start of a run
# ---------------------------------------------------------------------------------------------------------

def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def sweep(run_dir: Path) -> None:
    """Remove the temporaries of dead runs and recover a complete checkpoint left aside (main process, lock held)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    removed, freed = [], 0
    for p in sorted(root.iterdir()):
        if not p.name.startswith("."):
            continue
        m = _OLD.match(p.name)
        if m and not (root / m[1]).exists() and is_intact(p):
            os.replace(p, root / m[1])
            logger.warning(f"recovered checkpoint {root / m[1]}: a crash had left it aside as {p.name}")
            continue
        if m or p.name.startswith((".staging-", ".step-")):
            freed += _size(p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    if removed:
        logger.info(f"removed {len(removed)} temporary folder(s) left by an interrupted run "
                    f"({freed / 2**20:.1f} MiB): {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}")


# ---------------------------------------------------------------------------------------------------------
#                                           The save sequence
# ---------------------------------------------------------------------------------------------------------

class Checkpointer:
    """Writes the run's checkpoints (every rank calls ``save``); ``last`` is the newest one on disk."""

    def __init__(self, run, cfg, parts, data, accelerator, last: Optional[Path]):
        self.run, self.cfg, self.parts, self.data, self.accelerator = run, cfg, parts, data, accelerator
        self.info = data.info
        self.root = run.dir / "checkpoints"
        self.last = last

    def save_once(self, reason: str) -> Path:
        """A checkpoint of the current step: the one already written at this step, or a new one."""
        step = self.parts.state.step
        if self.last is not None and step_of(self.last) == step:
            return self.last
        return self.save(reason)

    def save(self, reason: str) -> Path:
        state, acc = self.parts.state, self.accelerator
        final = self.root / f"step-{state.step:07d}"
        staging = self.root / f".staging-{self.run.token}-step-{state.step:07d}"
        on_main(acc, self.run.verify)              # never write into a folder another process has taken
        acc.wait_for_everyone()
        failure = None
        sharding = self.parts.sharding
        gathered = sharding.gather(self.parts) if sharding is not None else None   # fsdp: full states on rank 0
        try:
            if sharding is None:
                acc.save_state(str(staging))       # every rank writes its RNG state here
            else:
                sharding.save_state(gathered, self.parts, self.data, staging)   # the same files
        except (OSError, RuntimeError, SafetensorError) as e:   # disk full: torch.save raises RuntimeError,
            failure = e                                           # safetensors OSError or its own SafetensorError
        if any_rank(acc, failure is not None):
            on_main(acc, shutil.rmtree, staging, True)
            raise self._failed(final, failure or "another rank failed to write its state")
        on_main(acc, self._publish, final, staging, reason, gathered)
        on_main(acc, self._rotate, state.step)
        acc.wait_for_everyone()
        self.last = final
        logger.info(f"saved checkpoint {final} ({reason})")
        return final

    def _failed(self, final: Path, error) -> CheckpointError:
        before = f"the previous checkpoint {self.last} is intact" if self.last else "no checkpoint was written before"
        return CheckpointError(f"could not write checkpoint {final}: {error}; {before}. Free disk space, then "
                               "continue with --resume latest")

    def _publish(self, final: Path, staging: Path, reason: str, gathered=None) -> None:
        state = self.parts.state
        model, ema = ((self.parts.raw_model, self.parts.ema) if gathered is None
                      else (gathered.weights("model"), gathered.weights("ema")))
        try:
            save_checkpoint(final, model, ema, step=state.step, experiment=self.cfg,
                            data_info=self.info.to_dict(),
                            meta={"reason": reason, "epoch": state.epoch, "num_processes": state.num_processes},
                            write_extra=lambda tmp: os.replace(staging, tmp / ACCELERATE_DIR))
        except (OSError, RuntimeError, SafetensorError) as e:
            raise self._failed(final, e) from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _rotate(self, step: int) -> None:
        """Retire checkpoints older than ``step`` beyond keep_last (the new one counts); never a newer one."""
        older = [p for p in list_checkpoints(self.run.dir) if step_of(p) < step]
        for old in older[: max(0, len(older) - (self.cfg.train.keep_last - 1))]:
            trash = old.with_name(f".{old.name}.trash-{self.run.token}")
            try:
                os.replace(old, trash)             # atomic: from here on it is no checkpoint
                shutil.rmtree(trash)
            except OSError as e:                   # the new checkpoint is complete: a failed cleanup must not stop
                logger.warning(f"could not delete the old checkpoint {old}: {e} (the next run's sweep retries)")
