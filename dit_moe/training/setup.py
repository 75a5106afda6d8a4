"""Setup of a run: the Accelerator, the resumable data stream, the model with its EMA, the optimizer and LR schedule.

Nothing here writes to the run folder: ``open_data`` checks the data against the model before the folder exists,
so a mistake there leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import random
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from ..config import ConfigError, ExperimentConfig
from ..data import build_dataset
from ..weights.init_from import load_init_weights
from ..models import moe as moe_module
from ..models.compile import compile_blocks
from ..registry import build_model, count_params

logger = logging.getLogger("dit_moe.train")


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
    # Under fsdp both are sharded alike: the update is shard by shard, on each rank's local part.
    ema_params = [_local(p) for p in ema.parameters()]
    params = [_local(p.detach()) for p in model.parameters()]
    if len(ema_params) != len(params):
        raise RuntimeError(f"update_ema: EMA has {len(ema_params)} parameters, model {len(params)}")
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t      # a DTensor's shard on this rank


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


def schedule_of(t) -> "callable":
    """step index -> multiplier of train.lr, for the TrainConfig ``t``."""
    return lambda s: lr_factor(s, t.steps, t.warmup_steps, t.lr_schedule, t.min_lr_ratio)


@dataclasses.dataclass
class TrainState:
    """What the loop needs besides model/optimizer/RNG to continue exactly; saved through Accelerate."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0          # optimizer steps done in the current epoch
    steps_per_epoch: int = 0
    global_batch_size: int = 0
    num_processes: int = 1

    def advance(self) -> None:
        """One optimizer step done."""
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


# ---------------------------------------------------------------------------------------------------------
#                                            Accelerator and data
# ---------------------------------------------------------------------------------------------------------

def process_count() -> int:
    """The number of processes of this launch, before the Accelerator exists (so that the config, whose global batch
    must divide by it, is validated before any object is built from it): Accelerate's shared state, the one the
    Accelerator of ``make_accelerator`` joins (same ``cpu`` choice)."""
    return PartialState(cpu=not torch.cuda.is_available()).num_processes


def make_accelerator(cfg: ExperimentConfig, run_dir: Path):
    """The run's Accelerator (creates no folder)."""
    t = cfg.train
    if t.tracker == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.tracker=wandb but the wandb package is not installed (pip install wandb), "
                          "or use train.tracker=tensorboard")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        step_scheduler_with_optimizer=False,   # we step the schedule once per optimizer step ourselves
        log_with=t.tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        # Router statistics live in buffers that differ per rank until routing_step all-reduces them;
        # DDP's buffer broadcast would overwrite them with rank 0's. Router state is kept identical by
        # routing_step instead (checked by replicas.json / the 2-process test). Gradients as views into DDP's
        # all-reduce buckets: without, DDP keeps a second fp32 copy of every gradient (dit_moe/memory.py).
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)],
    )
    if accelerator.distributed_type == DistributedType.FSDP:   # its plugin would wrap the model its own way
        raise ConfigError("the Accelerate launch config selects Accelerate's FSDP plugin; launch with a plain "
                          "multi-GPU config and set train.strategy=fsdp (the toolkit shards the model itself)")
    return accelerator


@dataclasses.dataclass
class Data:
    dataset: Dataset
    info: Any                     # dit_moe.data.DataInfo
    sampler: EpochSampler
    loader: DataLoader
    steps_per_epoch: int
    micro_batch: int


def open_data(cfg: ExperimentConfig, accelerator) -> Data:
    """The dataset, checked against the model, and its (seed, epoch)-ordered loader. Writes nothing."""
    t, world = cfg.train, accelerator.num_processes
    flip = cfg.data.flip if cfg.data.source == "latents" else None   # digits: a mirrored digit is another glyph
    dataset, info = build_dataset(cfg.data.source, cfg.data.path, flip=flip)
    problems = [f"{key}={mine} but the data ({info.source}) has {theirs}"
                for key, mine, theirs in (("model.input_size", cfg.model.input_size, info.latent_size),
                                          ("model.in_channels", cfg.model.in_channels, info.in_channels),
                                          ("model.num_classes", cfg.model.num_classes, info.num_classes))
                if mine != theirs]
    steps_per_epoch = len(dataset) // t.global_batch_size
    if steps_per_epoch < 1:
        problems.append(f"train.global_batch_size={t.global_batch_size} is larger than the dataset "
                        f"({info.source}: {len(dataset)} examples)")
    if problems:
        raise ConfigError("invalid training configuration: " + "; ".join(problems))
    micro_batch = t.global_batch_size // (world * t.grad_accum)
    sampler = EpochSampler(len(dataset), steps_per_epoch * t.global_batch_size, seed=t.seed)
    loader = DataLoader(
        SeededItems(dataset, t.seed),
        batch_sampler=BatchSampler(sampler, micro_batch, drop_last=True),
        num_workers=cfg.data.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        # The loader draws its workers' base seed at every new iterator; a private generator keeps those draws
        # out of the global RNG stream, which a resume must reproduce exactly.
        generator=torch.Generator().manual_seed(t.seed * world + accelerator.process_index),
        persistent_workers=cfg.data.num_workers > 0,
    )
    return Data(dataset, info, sampler, loader, steps_per_epoch, micro_batch)


def micro_batches(data: Data, state: TrainState, accelerator, grad_accum: int) -> Iterator:
    """Whole epochs of micro-batches from the position in ``state`` on (a resume skips what was consumed)."""
    epoch, pos = state.epoch, state.batch_in_epoch
    while True:
        data.sampler.set_epoch(epoch)
        data.loader.set_epoch(epoch)
        source = accelerator.skip_first_batches(data.loader, pos * grad_accum) if pos else data.loader
        source.set_epoch(epoch)
        for batch in source:
            yield batch
        epoch, pos = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------
#                                 Model, EMA, optimizer, schedule
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Parts:
    """What one optimizer step touches. ``model`` is the prepared (maybe DDP-wrapped) module, ``raw_model`` the
    module itself (routing and the EMA read it directly); under fsdp both are the same sharded module."""
    model: nn.Module
    raw_model: nn.Module
    ema: nn.Module
    optimizer: Any
    scheduler: Any
    state: TrainState
    moe: Optional[Any]            # dit_moe.models.moe for MoE models, else None
    all_reduce: Optional[Any]     # sum over ranks for router state, None on one process
    # Ranks hold parts of the model: fsdp.Sharding (train.strategy=fsdp on several processes) or
    # parallel.ep_train.ExpertParallel (train.expert_parallel > 1); None when every rank holds all of it.
    sharding: Optional[Any] = None


def build_parts(cfg: ExperimentConfig, data: Data, accelerator, init_from: Optional[str] = None) -> Parts:
    """Model (same initial weights on every rank), EMA, AdamW and the LR schedule, prepared by Accelerate.

    init_from: a checkpoint whose weights both model and EMA start from (``train.init_from``, fresh runs only:
    a resume loads its own state, and must not depend on the source still existing).
    """
    t, world, rank, device = cfg.train, accelerator.num_processes, accelerator.process_index, accelerator.device
    seed_everything(t.seed)
    model = build_model(cfg)
    if not model.arch.is_moe and cfg.routing != type(cfg.routing)():
        logger.info(f"note: {cfg.model.name} is dense; the routing section is ignored")
    ema = build_model(cfg)
    ema.load_state_dict(model.state_dict())
    if init_from is not None:                # after build_model, before prepare: every rank loads the same weights
        src = load_init_weights(model, ema, init_from)
        logger.info(f"train.init_from: model and EMA start from the weights of {src.path} (step {src.step} of "
                    f"{src.model_config.name}); optimizer, schedule and step start afresh")
    ema = ema.to(device)
    ema.requires_grad_(False).eval()
    model.train()
    seed_everything(t.seed * world + rank)   # per-rank stream for noise, timesteps, label dropout (DiT's rule)

    sharding = None
    if t.strategy == "fsdp" and world > 1:   # one process has nothing to shard: it trains as ddp does
        from .fsdp import Sharding   # not at the top: FSDP2 and torch.distributed load only for a sharded run

        sharding = Sharding(accelerator)
        model = sharding.shard(model.to(device))   # before the optimizer: it must see the sharded parameters
        sharding.shard(ema)
        logger.info(sharding.describe(model))
    elif t.strategy == "fsdp":
        logger.info("train.strategy=fsdp on one process: nothing to shard, the model trains unsharded")
    elif t.expert_parallel > 1:
        from .parallel.ep_train import ExpertParallel   # not at the top: as fsdp, only for an expert-parallel run

        sharding = ExpertParallel(accelerator, t.expert_parallel)
        model = sharding.shard(model.to(device))   # before the optimizer: it must see the rank's experts only
        sharding.shard(ema)
        logger.info(sharding.describe(model))
    if t.compile:                            # in place: parameter names, state dicts and checkpoints unchanged
        compile_blocks(model)
    optimizer = build_optimizer(model.parameters(), t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_of(t))
    raw_model = model
    state = TrainState(steps_per_epoch=data.steps_per_epoch, global_batch_size=t.global_batch_size,
                       num_processes=world)
    if sharding is None:
        model, optimizer, data.loader, scheduler = accelerator.prepare(model, optimizer, data.loader, scheduler)
        # Registration order names the files (custom_checkpoint_0: EMA, _1: train state); keep it.
        accelerator.register_for_checkpointing(ema)
        accelerator.register_for_checkpointing(state)
    elif sharding.wraps_ddp:                 # ep: DDP for the replicated part; full_state.py writes the files
        sharding.exclude_from_ddp(model)
        model, optimizer, data.loader, scheduler = accelerator.prepare(model, optimizer, data.loader, scheduler)
    else:                                    # the model must not be DDP-wrapped; fsdp.py writes the same files
        optimizer, data.loader, scheduler = accelerator.prepare(optimizer, data.loader, scheduler)
        model = sharding.with_autocast(model)
    moe = moe_module if raw_model.arch.is_moe else None
    all_reduce = (lambda x: accelerator.reduce(x, "sum")) if world > 1 else None
    return Parts(model, raw_model, ema, optimizer, scheduler, state, moe, all_reduce, sharding)


def build_optimizer(params, t) -> torch.optim.Optimizer:
    """The run's AdamW (TrainConfig ``t``); benchmarks/cpu_step.py times the same one.

    Fused (one kernel over all parameters) on CPU and CUDA: on the CPU the default per-parameter loop costs ~4x as
    much, which is felt by MoE models, whose (mostly inactive) experts triple the parameters of the dense model of
    equal FLOPs. It rounds differently from the loop in the last bit (tests/test_step_numerics.py bounds the gap).
    """
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, fused=fused or None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
#                                           What the log shows first
# ---------------------------------------------------------------------------------------------------------

def describe_run(cfg: ExperimentConfig, parts: Parts, data: Data, accelerator, run_dir: Path) -> list[str]:
    """The lines the log starts with: model, routing, data, optimisation."""
    t, model, info = cfg.train, parts.raw_model, data.info
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
            threshold = controller.threshold.detach().float().cpu().tolist()
            lines.append(f"DTop-p controller: target {controller.target} experts/token, scope {controller.scope}, "
                         f"initial threshold {threshold[0] if len(threshold) == 1 else threshold}")
    else:
        lines.append("routing: dense model (no experts)")
    lines.append(f"data: {info.source}, {len(data.dataset)} examples, {info.num_classes} classes, "
                 f"{info.in_channels}x{info.latent_size}x{info.latent_size}; global batch {t.global_batch_size} = "
                 f"{accelerator.num_processes} process(es) x {t.grad_accum} accumulation step(s) x {data.micro_batch}; "
                 f"{data.steps_per_epoch} steps per epoch")
    lines.append(f"training: {t.steps} steps, AdamW lr {t.lr} ({t.lr_schedule}, warm-up {t.warmup_steps}), "
                 f"EMA {t.ema_decay}{' with warm-up' if t.ema_warmup else ''}, grad clip {t.grad_clip}, "
                 f"precision {accelerator.mixed_precision}, device {accelerator.device}; run folder {run_dir}")
    return lines


def flat_config(cfg: ExperimentConfig) -> dict:
    """section.key -> int/float/str/bool, as trackers' hparams tables want."""
    out = {}
    for section, values in cfg.to_dict().items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
