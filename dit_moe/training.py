"""The training loop: Accelerate, EMA, checkpoints, exact resume, routing statistics, fault handling.

``train(cfg)`` runs one experiment described by an ``ExperimentConfig`` and returns its run folder::

    runs/<name>/
        config.yaml          the resolved configuration (rewritten at every start, so a resume records its overrides)
        log.txt              the log printed on the console (model summary first)
        metrics.jsonl        one JSON object per logging step (keys below)
        tensorboard/         Accelerate tracker output (or wandb, ``train.tracker``)
        checkpoints/step-XXXXXXX/   dit_moe.checkpoint format + ``accelerate/`` (optimizer, scheduler, scaler,
                                    RNG states of every rank, EMA, train state) for exact resume
        samples/             EMA sample grids (when ``dit_moe.sampling`` is available)
        replicas.json        multi-process runs: digests of the model, EMA and router buffers of every rank

One optimizer step consumes ``train.global_batch_size`` examples: ``num_processes x grad_accum`` micro-batches of
``global_batch_size / (num_processes * grad_accum)``. An epoch is ``len(dataset) // global_batch_size`` steps; the
remainder of the shuffled order is dropped, so every epoch holds a whole number of steps.

Exact resume. The data order is a permutation drawn from (seed, epoch) only, and each example's augmentation
randomness (random flip, posterior sample) is drawn under a torch seed derived from (seed, epoch, index) rather
than from the global RNG, so it does not depend on the number of workers, Accelerate's one-batch look-ahead, or
where the run was interrupted. ``accelerator.save_state`` stores the model, optimizer, LR schedule, grad scaler
and every rank's RNG states; the EMA model and a small ``TrainState`` (step, epoch, position) are registered
with ``register_for_checkpointing``. A resume rebuilds everything, loads that state and skips the consumed
micro-batches of the current epoch with ``accelerator.skip_first_batches``. On CPU, 2N steps in one go and
N + resume + N give bit-identical parameters, EMA and router state (tests/test_training.py).

Faults.
* Non-finite loss: the per-step losses are summed on the device (no host sync per step); the sum is all-reduced
  and checked on every logging step and before every checkpoint. A NaN/inf anywhere since the last check
  raises ``TrainingDivergedError`` naming the step interval and the last good checkpoint; nothing is saved
  after the fault, so that checkpoint stays intact. Cost of the choice: up to ``log_every`` steps run on
  after the fault before it is noticed (they are never saved).
* Kill during a checkpoint write: every rank writes its Accelerate state into a hidden staging folder, which
  the main process then moves into ``dit_moe.checkpoint.save_checkpoint``'s temporary folder before its atomic
  rename; an interrupted save leaves the previous checkpoints untouched (a stale staging folder is removed by
  the next save).
* SIGTERM / Ctrl-C: the signal only sets a flag; the current step finishes, a checkpoint is written and
  ``TrainingInterrupted`` is raised (``train.py`` exits with 128 + signal number). A second Ctrl-C exits at once.
  With several processes the flag is all-reduced every step, so all ranks stop at the same step even when
  only one of them received the signal.

metrics.jsonl keys (one object per logging step; all numbers are averages over the steps since the previous
record and over all ranks unless noted):

    step              optimizer steps done
    epoch             current epoch (float: step / steps_per_epoch)
    lr                learning rate of the last step
    loss              total loss (diffusion loss + router aux losses), all-reduced mean
    mse, vb           the diffusion loss's epsilon-MSE and variational-bound terms
    aux_loss          sum of router aux losses (MoE models; 0 for dense)
    aux/<name>        each named aux term (e.g. aux/lb, aux/entropy), summed over layers
    grad_norm         gradient norm before clipping, last step (when train.grad_clip is set)
    steps_per_sec, images_per_sec, seconds   throughput over the interval and wall time since start
    active_experts    MoE: mean activated experts per token, averaged over MoE layers (last step)
    active_experts_per_layer   MoE: the same per layer (list)
    target_experts    DTop-p: the controller's target; Top-k: K
    threshold         DTop-p: the controller's threshold (float for scope global, list for scope layer)
    controller_integral, controller_error   DTop-p: PI controller state
    expert_load       MoE: fraction of routed (token, expert) pairs per expert, per layer (list of lists)
    load_max          MoE: max over layers and experts of load x num_experts (1 = perfectly balanced)
    router_entropy    MoE: mean router entropy per token (nats)
    cap_frac          Top-p / DTop-p: fraction of tokens that hit routing.k_max
    drn_scale         DTop-p: mean dynamic routing normalization scale
    num_processes     world size (constant; recorded for the reader)

TensorBoard receives the scalar entries (lists are logged element-wise as ``key/i``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import ConfigError, ExperimentConfig, save_config

logger = logging.getLogger("dit_moe.train")

ACCELERATE_DIR = "accelerate"


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to do."""


class TrainingDivergedError(TrainingError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(TrainingError):
    """SIGTERM/SIGINT arrived; a checkpoint was written before stopping."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Optional[Path]):
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint


# ---------------------------------------------------------------------------------------------------------
#                                       Data order and augmentation
# ---------------------------------------------------------------------------------------------------------

class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for the first ``num_items`` entries of a permutation drawn from (seed, epoch).

    The order depends on nothing else (not on the rank, the global RNG or a resume), which is what lets a
    resumed run skip exactly the examples it has already seen. Accelerate shards the batches over ranks.
    """

    def __init__(self, dataset_size: int, num_items: int, seed: int, shuffle: bool = True):
        if not 0 < num_items <= dataset_size:
            raise ValueError(f"EpochSampler: num_items={num_items} must be in (0, {dataset_size}]")
        self.dataset_size, self.num_items, self.seed, self.shuffle = dataset_size, num_items, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.dataset_size, generator=g)[: self.num_items].tolist()
        else:
            order = range(self.num_items)
        return ((self.epoch, i) for i in order)

    def __len__(self) -> int:
        return self.num_items


class SeededItems(Dataset):
    """Runs ``dataset[index]`` under a torch seed derived from (seed, epoch, index), restoring the RNG after.

    Datasets draw their augmentation (flip, posterior sample) from torch's global RNG; here that randomness
    becomes a pure function of the example and the epoch, so it is the same whatever the rank, the number of
    workers, the loader's look-ahead or an interruption -- and it never perturbs the training RNG stream.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        item_seed = hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF  # int tuples hash deterministically
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            return self.dataset[index]


# ---------------------------------------------------------------------------------------------------------
#                                    EMA, learning rate, train state
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied.

    Buffers carry router state (DTop-p threshold and integral, Default-MoE vectors, statistics), which must
    follow the trained model exactly, not be averaged.
    """
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise RuntimeError(f"update_ema: EMA has {len(ema_params)} parameters, model {len(params)}")
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay used after optimizer step ``step`` (1-based); with warm-up min(decay, (1+s)/(10+s))."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of train.lr for the step with index ``step`` (0-based): linear warm-up, then constant/cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass
class TrainState:
    """What the loop needs besides model/optimizer/RNG to continue exactly; saved through Accelerate."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0          # optimizer steps done in the current epoch
    steps_per_epoch: int = 0
    global_batch_size: int = 0
    num_processes: int = 1

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


# ---------------------------------------------------------------------------------------------------------
#                                           Signals and logging
# ---------------------------------------------------------------------------------------------------------

class StopSignals:
    """Context manager: SIGTERM and the first SIGINT set ``signum``; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(f"received {signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping"
                       + (" (Ctrl-C again to exit without saving)" if signum == signal.SIGINT else ""))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


class _TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar."""

    def emit(self, record):
        from tqdm.auto import tqdm
        try:
            tqdm.write(self.format(record))
        except Exception:
            self.handleError(record)


def _setup_logging(run_dir: Path, is_main: bool) -> list[logging.Handler]:
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [_TqdmHandler()]
    if is_main:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return handlers


def _flat_config(cfg: ExperimentConfig) -> dict:
    """section.key -> int/float/str/bool, as trackers' hparams tables want."""
    out = {}
    for section, values in cfg.to_dict().items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _to_python(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
        return x.item() if x.ndim == 0 else x.tolist()
    return x


# ---------------------------------------------------------------------------------------------------------
#                                       Routing statistics for logs
# ---------------------------------------------------------------------------------------------------------

def routing_metrics(model: nn.Module) -> dict:
    """metrics.jsonl entries describing routing (empty for a dense model); one host sync, call on log steps."""
    if not model.arch.is_moe:
        return {}
    from .models import moe

    stats = moe.routing_stats(model)
    if not stats:
        return {}
    stats = {k: _to_python(v) for k, v in stats.items()}
    per_layer = stats["mean_active"]
    E = model.arch.num_experts
    out = {
        "active_experts": float(np.mean(per_layer)),
        "active_experts_per_layer": per_layer,
        "expert_load": stats["load"],
        "load_max": float(np.max(stats["load"]) * E),
        "router_entropy": float(np.mean(stats["entropy"])),
    }
    rtype = model.routing_config.type
    if rtype in ("topp", "dtopp"):
        out["cap_frac"] = float(np.mean(stats["cap_frac"]))
    if rtype == "topk":
        out["target_experts"] = float(model.arch.top_k)
    controller = getattr(model, "routing_controller", None)
    if controller is not None:
        out["target_experts"] = float(controller.target)
        for src, dst in (("threshold", "threshold"), ("integral", "controller_integral"), ("error", "controller_error")):
            v = stats[src]
            out[dst] = v[0] if isinstance(v, list) and len(v) == 1 else v
    if "drn_scale" in stats:
        out["drn_scale"] = float(np.mean(stats["drn_scale"]))
    return out


def _scalars_for_tracker(record: dict) -> dict:
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
#                                                 Helpers
# ---------------------------------------------------------------------------------------------------------

def default_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.model.name.replace('/', '-')}-{cfg.routing.type}"


def run_dir_of(cfg: ExperimentConfig) -> Path:
    return Path(cfg.train.run_dir) / (cfg.train.run_name or default_run_name(cfg))


def _check_config(cfg: ExperimentConfig, info, num_processes: int) -> int:
    """Validate training knobs against each other and the data; returns the per-process micro-batch size."""
    t = cfg.train
    problems = []
    if t.steps < 1:
        problems.append(f"train.steps={t.steps} must be >= 1")
    if t.grad_accum < 1:
        problems.append(f"train.grad_accum={t.grad_accum} must be >= 1")
    if t.log_every < 1 or t.ckpt_every < 1:
        problems.append(f"train.log_every={t.log_every} and train.ckpt_every={t.ckpt_every} must be >= 1")
    if t.keep_last < 1:
        problems.append(f"train.keep_last={t.keep_last} must be >= 1")
    if t.sample_every < 0:
        problems.append(f"train.sample_every={t.sample_every} must be >= 0 (0: only at the end)")
    if not 0.0 <= t.ema_decay < 1.0:
        problems.append(f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    if t.lr <= 0 or t.warmup_steps < 0 or not 0.0 <= t.min_lr_ratio <= 1.0:
        problems.append(f"train.lr={t.lr} must be > 0, train.warmup_steps={t.warmup_steps} >= 0, "
                        f"train.min_lr_ratio={t.min_lr_ratio} in [0, 1]")
    if t.grad_clip is not None and t.grad_clip <= 0:
        problems.append(f"train.grad_clip={t.grad_clip} must be > 0 or null (no clipping)")
    denom = num_processes * max(t.grad_accum, 1)
    if t.global_batch_size < 1 or t.global_batch_size % denom:
        problems.append(f"train.global_batch_size={t.global_batch_size} is not divisible by num_processes "
                        f"({num_processes}) x train.grad_accum ({t.grad_accum}) = {denom}")
    for key, mine, theirs in (("model.input_size", cfg.model.input_size, info.latent_size),
                              ("model.in_channels", cfg.model.in_channels, info.in_channels),
                              ("model.num_classes", cfg.model.num_classes, info.num_classes)):
        if mine != theirs:
            problems.append(f"{key}={mine} but the data ({info.source}) has {theirs}")
    if problems:
        raise ConfigError("invalid training configuration: " + "; ".join(problems))
    return t.global_batch_size // denom


def _digest(named_tensors) -> str:
    """sha256 over names and raw bytes: equal digests mean bit-identical tensors."""
    h = hashlib.sha256()
    for k, v in named_tensors:
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _model_summary(cfg: ExperimentConfig, model: nn.Module) -> list[str]:
    from .registry import count_params

    c = count_params(cfg)
    arch = model.arch
    lines = [f"model {arch.name}: depth {arch.depth}, width {arch.hidden_size}, heads {arch.num_heads}, "
             f"patch {arch.patch_size}, input {cfg.model.in_channels}x{cfg.model.input_size}x{cfg.model.input_size}, "
             f"{cfg.model.num_classes} classes",
             f"parameters: {c['total_params'] / 1e6:.2f}M total, {c['active_params'] / 1e6:.2f}M active; "
             f"{c['gflops']:.3f} GMACs per image"]
    if arch.is_moe:
        r = dataclasses.asdict(model.routing_config)
        lines.append(f"routing: {r.pop('type')} with {arch.num_experts} experts (K={arch.top_k}); "
                     + ", ".join(f"{k}={v}" for k, v in r.items()))
        controller = getattr(model, "routing_controller", None)
        if controller is not None:
            lines.append(f"DTop-p controller: target {controller.target} experts/token, scope {controller.scope}, "
                         f"initial threshold {_to_python(controller.threshold)}")
    else:
        lines.append("routing: dense model (no experts)")
    return lines


# ---------------------------------------------------------------------------------------------------------
#                                               The loop
# ---------------------------------------------------------------------------------------------------------

def train(cfg: ExperimentConfig, resume: Optional[str] = None) -> Path:
    """Train the experiment ``cfg``; returns the run folder.

    resume: None (fresh run; refuses a run folder that already holds checkpoints), ``"latest"`` (continue from
    the newest checkpoint of the run folder, or start fresh if there is none -- handy for requeued jobs), or
    the path of a checkpoint or run folder (training continues in that checkpoint's run folder).
    Raises ConfigError for bad settings, TrainingDivergedError on a non-finite loss, TrainingInterrupted after
    SIGTERM/SIGINT (a checkpoint has been written).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object

    from .data import build_dataset
    from .diffusion import GaussianDiffusion
    from .registry import build_model

    t = cfg.train
    # ----- where: run folder and the checkpoint to resume from
    run_dir = run_dir_of(cfg)
    resume_from: Optional[Path] = None
    if resume is not None:
        if resume == "latest":
            found = list_checkpoints(run_dir)
            resume_from = found[-1] if found else None
        else:
            resume_from = resolve_checkpoint(resume)
            if resume_from.parent.name == "checkpoints":
                run_dir = resume_from.parent.parent
        if resume_from is not None and not (resume_from / ACCELERATE_DIR).is_dir():
            raise CheckpointError(f"{resume_from}: has no {ACCELERATE_DIR}/ training state, so it cannot be resumed "
                                  "exactly (it holds weights only)")
    elif list_checkpoints(run_dir):
        raise ConfigError(f"run folder {run_dir} already holds checkpoints; continue it with --resume latest, "
                          f"or choose another train.run_name")
    if t.tracker == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.tracker=wandb but the wandb package is not installed (pip install wandb), "
                          "or use train.tracker=tensorboard")

    # ----- who: processes, precision
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        step_scheduler_with_optimizer=False,   # we step the schedule once per optimizer step ourselves
        log_with=t.tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        # Router statistics live in buffers that differ per rank until routing_step all-reduces them;
        # DDP's buffer broadcast would overwrite them with rank 0's. Router state is kept identical by
        # routing_step instead (checked by replicas.json / the 2-process test).
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    if is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    handlers = _setup_logging(run_dir, is_main)
    try:
        return _train(cfg, resume_from, resume is not None, run_dir, accelerator, world, rank, is_main, device,
                      build_dataset, GaussianDiffusion, build_model, gather_object)
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()


def _train(cfg, resume_from, resume_requested, run_dir, accelerator, world, rank, is_main, device,
           build_dataset, GaussianDiffusion, build_model, gather_object) -> Path:
    t = cfg.train

    # ----- data
    flip = cfg.data.flip if cfg.data.source == "latents" else None   # digits: a mirrored digit is another glyph
    dataset, info = build_dataset(cfg.data.source, cfg.data.path, flip=flip)
    micro_batch = _check_config(cfg, info, world)
    steps_per_epoch = len(dataset) // t.global_batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is larger than the dataset "
                          f"({info.source}: {len(dataset)} examples)")
    sampler = EpochSampler(len(dataset), steps_per_epoch * t.global_batch_size, seed=t.seed)
    loader = DataLoader(
        SeededItems(dataset, t.seed),
        batch_sampler=BatchSampler(sampler, micro_batch, drop_last=True),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        # The loader draws its workers' base seed at every new iterator; a private generator keeps those draws
        # out of the global RNG stream, which a resume must reproduce exactly.
        generator=torch.Generator().manual_seed(t.seed * world + rank),
        persistent_workers=cfg.data.num_workers > 0,
    )

    # ----- model (same initial weights on every rank), EMA, optimizer, schedule
    _seed_everything(t.seed)
    model = build_model(cfg)
    if not model.arch.is_moe and cfg.routing != type(cfg.routing)():
        logger.info(f"note: {cfg.model.name} is dense; the routing section is ignored")
    ema = build_model(cfg).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    model.train()
    raw_model = model  # the unwrapped module: routing and EMA read it directly
    _seed_everything(t.seed * world + rank)   # per-rank stream for noise, timesteps, label dropout (DiT's rule)

    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.steps, t.warmup_steps, t.lr_schedule, t.min_lr_ratio))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    state = TrainState(steps_per_epoch=steps_per_epoch, global_batch_size=t.global_batch_size, num_processes=world)
    accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(state)
    diffusion = GaussianDiffusion(learn_sigma=cfg.model.learn_sigma)
    moe = None
    if raw_model.arch.is_moe:
        from .models import moe
    all_reduce = (lambda x: accelerator.reduce(x, "sum")) if world > 1 else None

    # ----- resume
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        saved = ckpt.experiment
        if saved is not None:
            for section in ("model", "routing", "data"):
                a, b = getattr(saved, section), getattr(cfg, section)
                if a != b:
                    diff = [f"{section}.{k}: checkpoint {v!r} vs now {getattr(b, k)!r}"
                            for k, v in dataclasses.asdict(a).items() if getattr(b, k) != v]
                    raise ConfigError(f"cannot resume {resume_from}: the configuration differs ({'; '.join(diff)})")
            if saved.train.global_batch_size != t.global_batch_size:
                raise ConfigError(f"cannot resume {resume_from}: train.global_batch_size was "
                                  f"{saved.train.global_batch_size}, now {t.global_batch_size} (the data position "
                                  "is counted in global batches)")
        accelerator.load_state(str(resume_from / ACCELERATE_DIR))
        if state.num_processes != world:
            logger.warning(f"checkpoint written by {state.num_processes} processes, resuming with {world}: "
                           "training continues but not bit-exactly (per-rank RNG streams differ)")
        if state.steps_per_epoch != steps_per_epoch:
            raise ConfigError(f"cannot resume {resume_from}: {state.steps_per_epoch} steps per epoch then, "
                              f"{steps_per_epoch} now (dataset size changed?)")
        logger.info(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch}, "
                    f"step {state.batch_in_epoch} of {steps_per_epoch} in the epoch)")
    else:
        logger.info("starting a new run" + (" (--resume latest: no checkpoint yet)" if resume_requested else ""))
    state.num_processes = world

    # ----- tell the user what runs
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    for line in _model_summary(cfg, raw_model):
        logger.info(line)
    logger.info(f"data: {info.source}, {len(dataset)} examples, {info.num_classes} classes, "
                f"{info.in_channels}x{info.latent_size}x{info.latent_size}; global batch {t.global_batch_size} = "
                f"{world} process(es) x {t.grad_accum} accumulation step(s) x {micro_batch}; "
                f"{steps_per_epoch} steps per epoch")
    logger.info(f"training: {t.steps} steps, AdamW lr {t.lr} ({t.lr_schedule}, warm-up {t.warmup_steps}), "
                f"EMA {t.ema_decay}{' with warm-up' if t.ema_warmup else ''}, grad clip {t.grad_clip}, "
                f"precision {accelerator.mixed_precision}, device {device}; run folder {run_dir}")
    if t.tracker is not None:
        accelerator.init_trackers(t.tracker, config=_flat_config(cfg))
    sampling_available = importlib.util.find_spec("dit_moe.sampling") is not None
    if not sampling_available:
        logger.info("note: dit_moe.sampling is not available, so no EMA sample grids are drawn during training")

    # ----- the batch stream: whole epochs of (seed, epoch)-ordered micro-batches, resumable mid-epoch
    def micro_batches() -> Iterator:
        epoch, pos = state.epoch, state.batch_in_epoch
        while True:
            sampler.set_epoch(epoch)
            loader.set_epoch(epoch)
            source = accelerator.skip_first_batches(loader, pos * t.grad_accum) if pos else loader
            source.set_epoch(epoch)
            for batch in source:
                yield batch
            epoch, pos = epoch + 1, 0

    batches = micro_batches()
    metrics_path = run_dir / "metrics.jsonl"
    running: dict[str, torch.Tensor] = {}
    running_steps = 0
    last_checked_step = state.step
    last_ckpt: Optional[Path] = (list_checkpoints(run_dir) or [None])[-1]
    grad_norm = None
    t_start = t_log = time.perf_counter()
    steps_at_log = state.step

    def add(name: str, value: torch.Tensor) -> None:
        v = value.detach().float()
        running[name] = running[name] + v if name in running else v

    def reduced_running() -> dict[str, float]:
        """All-reduce the running sums (one collective) and average them over steps and ranks."""
        if not running:
            return {}
        keys = sorted(running)
        vec = torch.stack([running[k] for k in keys]).to(device)
        if world > 1:
            vec = accelerator.reduce(vec, "mean")
        vec = (vec / max(running_steps, 1)).cpu().tolist()
        return dict(zip(keys, vec))

    def check_finite(values: dict) -> None:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            where = f"between steps {last_checked_step + 1} and {state.step}"
            good = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written before"
            raise TrainingDivergedError(
                f"non-finite loss ({', '.join(f'{k}={v}' for k, v in bad.items())}) {where} of run {run_dir}; "
                f"training stopped without saving, {good}. Try a lower train.lr, a smaller train.grad_clip or "
                f"train.mixed_precision=no, then resume from that checkpoint.")

    def save(reason: str) -> Path:
        nonlocal last_checked_step, last_ckpt, running, running_steps
        # Validate the weights first: a checkpoint is only written after a finite-loss check up to this step.
        if running_steps:
            check_finite(reduced_running())
        last_checked_step = state.step
        root = run_dir / "checkpoints"
        final = root / f"step-{state.step:07d}"
        staging = root / f".staging-step-{state.step:07d}"
        if is_main:
            for stale in root.glob(".staging-*"):
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))           # every rank writes its RNG state here
        accelerator.wait_for_everyone()
        if is_main:
            save_checkpoint(final, raw_model, ema, step=state.step, experiment=cfg, data_info=info.to_dict(),
                            meta={"reason": reason, "epoch": state.epoch, "num_processes": world},
                            write_extra=lambda tmp: os.replace(staging, tmp / ACCELERATE_DIR))
            for old in list_checkpoints(run_dir)[:-t.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        last_ckpt = final
        logger.info(f"saved checkpoint {final} ({reason})")
        return final

    decoder = []   # loaded on first use (a VAE for latent data)

    def sample_grid() -> None:
        """EMA samples of up to 10 classes x num_per_class (capped at 8) -> samples/step-XXXXXXX.png (main process)."""
        if not sampling_available:
            return
        if is_main:
            from . import sampling
            from .data import load_decoder, to_uint8

            s = cfg.sample
            settings = sampling.SamplerSettings(sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale,
                                                guidance_channels=s.guidance_channels)
            classes = torch.linspace(0, info.num_classes - 1, min(info.num_classes, 10)).round().long()
            per = max(1, min(s.num_per_class, 8))
            labels = classes.repeat_interleave(per)
            if not decoder:
                decoder.append(load_decoder(info, device))
            t0 = time.perf_counter()
            # Own generators per sample; fork_rng guarantees the training RNG streams are untouched (a resume
            # could not replay draws made here).
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                x = sampling.sample_latents(ema, labels, sampling.make_generators(s.seed, range(len(labels))),
                                            settings, (info.in_channels, info.latent_size, info.latent_size), device)
                images = to_uint8(decoder[0](x))
            captions = [sampling.short_name(info.class_names[int(c)]) for c in labels]
            out = run_dir / "samples" / f"step-{state.step:07d}.png"
            out.parent.mkdir(exist_ok=True)
            sampling.make_grid(images.cpu(), captions, ncol=per).save(out)
            logger.info(f"EMA samples ({s.sampler}, {s.steps} steps, cfg {s.cfg_scale}): {out} "
                        f"({time.perf_counter() - t0:.1f} s)")
        accelerator.wait_for_everyone()

    def train_step(grad_norm):
        """grad_accum micro-batches and one optimizer step; returns the gradient norm (a device tensor) or None."""
        for _ in range(t.grad_accum):
            x, y = next(batches)
            with accelerator.accumulate(model):
                ts = diffusion.sample_timesteps(x.shape[0], device)
                terms = diffusion.training_losses(lambda xt, tt: model(xt, tt, y), x, ts)
                loss = terms["loss"].mean()
                if moe is not None:
                    aux, aux_terms = moe.collect_aux_loss(raw_model)
                    loss = loss + aux
                    add("aux_loss", aux / t.grad_accum)
                    for k, v in aux_terms.items():
                        add(f"aux/{k}", v / t.grad_accum)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.grad_clip is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            add("loss", loss / t.grad_accum)
            add("mse", terms["mse"].mean() / t.grad_accum)
            add("vb", terms["vb"].mean() / t.grad_accum)
        return grad_norm

    from tqdm.auto import tqdm
    progress = tqdm(total=t.steps, initial=state.step, desc=run_dir.name, disable=not is_main,
                    dynamic_ncols=True, mininterval=2.0)
    try:
        with StopSignals() as stop:
            while state.step < t.steps:
                # ----- one optimizer step over grad_accum micro-batches
                try:
                    grad_norm = train_step(grad_norm)
                except Exception:
                    # NaN weights usually crash a router (no expert passes the threshold) before the next
                    # logging step; report the divergence, not the symptom.
                    local = {k: float(v) for k, v in running.items()}
                    if any(not math.isfinite(v) for v in local.values()):
                        check_finite(local)
                    raise
                scheduler.step()
                if moe is not None:
                    moe.routing_step(raw_model, all_reduce)
                state.step += 1
                state.batch_in_epoch += 1
                if state.batch_in_epoch == steps_per_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                update_ema(ema, raw_model, ema_decay_at(state.step, t.ema_decay, t.ema_warmup))
                running_steps += 1
                progress.update(1)

                # ----- log (the only host sync of a normal step)
                if state.step % t.log_every == 0 or state.step == t.steps:
                    values = reduced_running()
                    check_finite(values)
                    last_checked_step = state.step
                    now = time.perf_counter()
                    done = state.step - steps_at_log
                    record = {"step": state.step, "epoch": state.step / steps_per_epoch,
                              "lr": scheduler.get_last_lr()[0], **values}
                    if grad_norm is not None:
                        record["grad_norm"] = _to_python(grad_norm)
                    record.update(steps_per_sec=done / (now - t_log), images_per_sec=done * t.global_batch_size / (now - t_log),
                                  seconds=now - t_start, num_processes=world)
                    record.update(routing_metrics(raw_model))
                    t_log, steps_at_log = now, state.step
                    running, running_steps = {}, 0
                    if is_main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        progress.set_postfix(loss=f"{record['loss']:.4f}",
                                             **({"experts": f"{record['active_experts']:.2f}"}
                                                if "active_experts" in record else {}))
                    if t.tracker is not None:
                        accelerator.log(_scalars_for_tracker(record), step=state.step)

                if state.step % t.ckpt_every == 0 and state.step < t.steps:
                    save("periodic")
                if t.sample_every and state.step % t.sample_every == 0 and state.step < t.steps:
                    sample_grid()

                # ----- stop requests: all ranks must agree on the step they stop at
                stop_now = stop.signum is not None
                if world > 1:
                    flag = torch.tensor([float(stop.signum or 0)], device=device)
                    flag = accelerator.reduce(flag, "max")
                    stop_now = bool(flag.item() > 0)
                    signum = int(flag.item())
                else:
                    signum = stop.signum or 0
                if stop_now and state.step < t.steps:
                    path = save(f"stopped by {signal.Signals(signum).name}")
                    raise TrainingInterrupted(
                        f"stopped by {signal.Signals(signum).name} at step {state.step}/{t.steps}; checkpoint {path}; "
                        f"continue with --resume latest", signum, state.step, path)

            # ----- the end
            if last_ckpt is None or last_ckpt.name != f"step-{state.step:07d}":
                save("final")
            sample_grid()
            if world > 1:
                mine = {"rank": rank, "model": _digest(sorted(raw_model.state_dict().items())),
                        "ema": _digest(sorted(ema.state_dict().items())),
                        "buffers": _digest(raw_model.named_buffers()), "step": state.step}
                everyone = gather_object([mine])
                if is_main:
                    in_sync = all({k: v for k, v in d.items() if k != "rank"} ==
                                  {k: v for k, v in mine.items() if k != "rank"} for d in everyone)
                    (run_dir / "replicas.json").write_text(json.dumps(
                        {"num_processes": world, "in_sync": in_sync, "ranks": everyone}, indent=2))
                    if in_sync:
                        logger.info(f"all {world} ranks hold identical model, EMA and router buffers")
                    else:
                        logger.error(f"ranks DIVERGED (model/EMA/router buffers differ): see {run_dir / 'replicas.json'}")
            logger.info(f"done: {state.step} steps in {time.perf_counter() - t_start:.1f} s; run folder {run_dir}")
    finally:
        progress.close()
        accelerator.end_training()
    return run_dir
