"""Running metrics and their reduction over ranks, the finite-loss check, metrics.jsonl, routing statistics and the
end-of-run replica check.

Per-step values are summed on the device and reduced (one collective) only on logging and checkpoint steps, so a
normal step has no host sync. metrics.jsonl never repeats a step: a resume from step N moves the records past N
(written by the continuation that the resume replaces, and a line cut short by a kill) to
``metrics-superseded.jsonl`` -- kept, never mixed into the curves.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from accelerate.utils import gather_object

from ..errors import DataError, TrainingDivergedError, TrainingError
from ..models import moe
from .stop import any_rank

logger = logging.getLogger("dit_moe.train")

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics-superseded.jsonl"
NONFINITE_INPUTS = "_nonfinite_inputs"        # "_" keys are checked, never logged


def to_python(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
        return x.item() if x.ndim == 0 else x.tolist()
    return x


class RunningMeans:
    """Sums of per-step values since the last record, on the device; ``take`` reduces, checks and resets them."""

    def __init__(self, accelerator, run_dir: Path, data, checkpointer, start_step: int):
        self.accelerator, self.run_dir, self.data, self.checkpointer = accelerator, run_dir, data, checkpointer
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.checked_step = start_step

    def add(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().float()
        self.sums[name] = self.sums[name] + v if name in self.sums else v

    def add_inputs(self, x: torch.Tensor) -> None:
        """Count micro-batches with NaN/inf inputs, so a bad dataset is not blamed on the learning rate."""
        self.add(NONFINITE_INPUTS, (~torch.isfinite(x)).any())

    def reduce(self) -> dict[str, float]:
        """All-reduce the sums (one collective) and average them over steps and ranks."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        vec = torch.stack([self.sums[k] for k in keys]).to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            vec = self.accelerator.reduce(vec, "mean")
        vec = (vec / max(self.steps, 1)).cpu().tolist()
        return dict(zip(keys, vec))

    def check(self, step: int, values: Optional[dict] = None) -> None:
        """Raise if anything since the last check was not finite; a checkpoint is written only after this."""
        if values is None and not self.steps:
            return
        values = self.reduce() if values is None else values
        if values.get(NONFINITE_INPUTS, 0.0) > 0:
            raise self._data_error(step)
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            last = self.checkpointer.last
            good = f"the last good checkpoint is {last}" if last else "no checkpoint was written before"
            raise TrainingDivergedError(
                f"non-finite loss ({', '.join(f'{k}={v}' for k, v in bad.items())}) between steps "
                f"{self.checked_step + 1} and {step} of run {self.run_dir}; training stopped without saving, {good}. "
                "Continue from it with a lower learning rate (--resume latest train.lr=...), a smaller "
                "train.grad_clip or train.mixed_precision=no.")
        self.checked_step = step

    def check_local(self, step: int) -> None:
        """The check without a collective, for the exception path (NaN weights often crash a router first)."""
        local = {k: float(v) for k, v in self.sums.items()}
        if local.get(NONFINITE_INPUTS, 0.0) > 0 or any(not math.isfinite(v) for v in local.values()):
            self.check(step, local)

    def take(self, step: int) -> dict[str, float]:
        """Reduced, checked averages since the last call (without the "_" keys); starts new sums."""
        values = self.reduce()
        self.check(step, values)
        self.sums, self.steps = {}, 0
        return {k: v for k, v in values.items() if not k.startswith("_")}

    def _data_error(self, step: int) -> DataError:
        where = getattr(self.data.dataset, "nonfinite_shards", None)
        shards = where() if callable(where) else []
        named = f"; shards with NaN/inf: {', '.join(map(str, shards[:5]))}" if shards else ""
        return DataError(f"the training data ({self.data.info.source}) holds NaN or inf values, seen in the batches "
                         f"of steps {self.checked_step + 1}-{step}{named}. The data is at fault, not the learning "
                         "rate: re-extract or remove those files; nothing was saved after step "
                         f"{self.checked_step}")


# ---------------------------------------------------------------------------------------------------------
#                                               metrics.jsonl
# ---------------------------------------------------------------------------------------------------------

def trim_metrics(run_dir: Path, step: int) -> None:
    """Move the records past ``step`` (and lines cut short) from metrics.jsonl to metrics-superseded.jsonl."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines():
        try:
            past = json.loads(line).get("step", 0) > step
        except (json.JSONDecodeError, AttributeError):
            past = True
        (drop if past else keep).append(line)
    if not drop:
        return
    with open(path.with_name(SUPERSEDED_FILE), "a") as f:
        f.write("".join(line + "\n" for line in drop))
    tmp = path.with_name(f".{METRICS_FILE}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    logger.info(f"{METRICS_FILE}: moved {len(drop)} record(s) past step {step}, written by the continuation this "
                f"run replaces, to {SUPERSEDED_FILE}")


class Logbook:
    """One record per logging step: metrics.jsonl (main process), the tracker, the progress bar."""

    def __init__(self, run_dir: Path, cfg, accelerator, steps_per_epoch: int, start_step: int, progress):
        self.path = Path(run_dir) / METRICS_FILE
        self.cfg, self.accelerator, self.steps_per_epoch, self.progress = cfg, accelerator, steps_per_epoch, progress
        self.t_start = self.t_log = time.perf_counter()
        self.steps_at_log = start_step

    def write(self, step: int, values: dict, lr: float, grad_norm, raw_model: nn.Module) -> dict:
        now = time.perf_counter()
        done, batch = step - self.steps_at_log, self.cfg.train.global_batch_size
        record = {"step": step, "epoch": step / self.steps_per_epoch, "lr": lr, **values}
        if grad_norm is not None:
            record["grad_norm"] = to_python(grad_norm)
        record.update(steps_per_sec=done / (now - self.t_log), images_per_sec=done * batch / (now - self.t_log),
                      seconds=now - self.t_start, num_processes=self.accelerator.num_processes)
        record.update(routing_metrics(raw_model))
        self.t_log, self.steps_at_log = now, step
        failure = None
        if self.accelerator.is_main_process:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:              # disk full: stop with a clear message, every rank at this step
                failure = e
        if any_rank(self.accelerator, failure is not None):
            raise TrainingError(f"cannot append to {self.path}: {failure or 'failed on the main process'}; the "
                                "checkpoints written so far are intact. Free disk space, then --resume latest")
        if self.accelerator.is_main_process:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}",
                                      **({"experts": f"{record['active_experts']:.2f}"}
                                         if "active_experts" in record else {}))
        if self.cfg.train.tracker is not None:
            self.accelerator.log(scalars_for_tracker(record), step=step)
        return record


def scalars_for_tracker(record: dict) -> dict:
    out = {}
    for k, v in record.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, list):
            flat = np.asarray(v, dtype=np.float64)
            if flat.ndim == 1:
                out.update({f"{k}/{i}": float(x) for i, x in enumerate(flat)})
            elif flat.ndim == 2:
                out.update({f"{k}/{i}/{j}": float(x) for i, row in enumerate(flat) for j, x in enumerate(row)})
    return out


# ---------------------------------------------------------------------------------------------------------
#                                       Routing statistics for logs
# ---------------------------------------------------------------------------------------------------------

def routing_metrics(model: nn.Module) -> dict:
    """metrics.jsonl entries describing routing (empty for a dense model); one host sync, call on log steps.

    Every entry is a ``routing_tap.METRICS`` metric under its ``log`` key and reduction over the MoE layers, plus
    ``target_experts`` (what the routing aims at: the controller's target, K, or K x capacity_factor).
    """
    if not model.arch.is_moe:
        return {}

    stats = moe.routing_stats(model)
    if not stats:
        return {}
    rtype = model.routing_config.type
    out = {}
    for name, metric in moe.METRICS.items():
        if name not in stats or (metric.routers is not None and rtype not in metric.routers):
            continue
        value = to_python(stats[name])
        for key, how in metric.log:
            out[key] = _reduce(value, how, model.arch.num_experts)
    controller = getattr(model, "routing_controller", None)
    if controller is not None:
        out["target_experts"] = float(controller.target)
    elif rtype == "topk":
        out["target_experts"] = float(model.arch.top_k)
    elif rtype == "expert_choice":
        out["target_experts"] = float(model.arch.top_k * model.routing_config.capacity_factor)
    return out


def _reduce(value, how: str, num_experts: int):
    """A per-layer statistic (list over MoE layers) -> what metrics.jsonl keeps (METRICS ``log`` reductions)."""
    if how == "mean":
        return float(np.mean(value))
    if how == "max_share":                     # max over layers and experts of load x E (1 = balanced)
        return float(np.max(value) * num_experts)
    if how == "squeeze":                       # controller entries: a float for one threshold, else the list
        return value[0] if isinstance(value, list) and len(value) == 1 else value
    if how in ("layers", "as_is"):
        return value
    raise ValueError(f"unknown routing metric reduction {how!r}")


# ---------------------------------------------------------------------------------------------------------
#                                    Replicas (multi-process runs, at the end)
# ---------------------------------------------------------------------------------------------------------

def digest(named_tensors) -> str:
    """sha256 over names and raw bytes: equal digests mean bit-identical tensors."""
    h = hashlib.sha256()
    for k, v in named_tensors:
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas(accelerator, parts, run_dir: Path) -> None:
    """Write replicas.json: digests of the model, EMA and router buffers of every rank, and whether they agree."""
    world = accelerator.num_processes
    if world == 1:
        return
    raw, ema = parts.raw_model, parts.ema
    # Parameters a rank holds only part of (fsdp: all of them; ep: the expert shards) differ between ranks by design:
    # their digests are recorded, not compared. Everything else -- router state in buffers above all -- must agree.
    split = parts.sharding.is_split if parts.sharding is not None else (lambda name: False)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    pick = lambda sd, parted: sorted((k, local(v)) for k, v in sd.items() if split(k) == parted)
    msd, esd = raw.state_dict(), ema.state_dict()
    mine = {"rank": accelerator.process_index, "model": digest(pick(msd, False)), "ema": digest(pick(esd, False)),
            "buffers": digest(raw.named_buffers()), "step": parts.state.step,
            "model_parts": digest(pick(msd, True)), "ema_parts": digest(pick(esd, True))}
    everyone = gather_object([mine])
    if accelerator.is_main_process:
        compared = lambda d: {k: v for k, v in d.items() if k not in ("rank", "model_parts", "ema_parts")}
        in_sync = all(compared(d) == compared(mine) for d in everyone)
        sharded = parts.sharding is not None
        (Path(run_dir) / "replicas.json").write_text(json.dumps(
            {"num_processes": world, "sharded": sharded, "in_sync": in_sync, "ranks": everyone}, indent=2))
        if in_sync:
            what = ("router buffers and unsplit parameters" if sharded else "model, EMA and router buffers")
            logger.info(f"all {world} ranks hold identical {what}")
        else:
            logger.error(f"ranks DIVERGED (model/EMA/router buffers differ): see {Path(run_dir) / 'replicas.json'}")
