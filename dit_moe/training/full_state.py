"""Checkpoints of a run whose ranks each hold part of the model (fsdp, expert parallelism), in ddp's files.

A strategy that splits parameters over the ranks (``fsdp.Sharding``, ``parallel.ep_train.ExpertParallel``) gives
the four full-state operations below; this base class turns them into a checkpoint whose ``accelerate/`` folder
holds file for file what ``accelerator.save_state`` writes for ddp: ``model.safetensors`` with the unsharded names and
shapes, ``optimizer.bin`` with integer parameter ids (``model.parameters()`` order, one group), the EMA in
``custom_checkpoint_0.pkl`` and the train state in ``custom_checkpoint_1.pkl`` (the registration order of a ddp run,
``setup.build_parts``), plus the schedule, the loader, the scaler and every rank's RNG state, written by Accelerate's
own ``save_accelerator_state`` / ``save_custom_state``. So a checkpoint of any strategy resumes under any other, and
one process reads it for sampling, ``convert``, ``upcycle`` and ``analyze``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import accelerate.utils
import torch.nn as nn
from accelerate.checkpointing import (load_accelerator_state, load_custom_state, save_accelerator_state,
                                      save_custom_state)
from safetensors.torch import load_file

from ..registry import build_model


class FullStateCheckpoints:
    """Checkpoints from full state dicts gathered to rank 0. Subclasses set ``accelerator`` and implement:

    * ``full_state(module) -> dict``: the module's full state dict on rank 0 (CPU tensors), {} on the other ranks;
    * ``load_full_state(module, sd)``: every rank loads the same full state dict and keeps its part;
    * ``full_optimizer_state(model, optimizer) -> dict`` / ``load_full_optimizer_state(model, optimizer, osd)``:
      the same for the torch optimizer's state, keyed like ``optimizer.state_dict()`` of the unsharded model.

    Every rank calls every method (they are collectives).
    """

    accelerator = None
    # True: the model still goes through ``accelerator.prepare`` (DDP) for the parameters every rank holds whole.
    wraps_ddp = False

    def is_split(self, name: str) -> bool:
        """Whether each rank holds only part of the state-dict entry ``name`` (fsdp: every parameter)."""
        return True

    def reduce_gradients(self) -> None:
        """After the backward of an optimizer step's last micro-batch: reduce what neither DDP nor FSDP's hooks do
        (nothing by default: FSDP reduce-scatters during the backward)."""

    def full_state(self, module: nn.Module) -> dict:
        raise NotImplementedError

    def load_full_state(self, module: nn.Module, sd: dict) -> None:
        raise NotImplementedError

    def full_optimizer_state(self, model: nn.Module, optimizer) -> dict:
        raise NotImplementedError

    def load_full_optimizer_state(self, model: nn.Module, optimizer, osd: dict) -> None:
        raise NotImplementedError

    def gather(self, parts) -> "Gathered":
        """Model, EMA and optimizer full states (rank 0); every rank calls it before a checkpoint is written."""
        return Gathered(self.full_state(parts.raw_model), self.full_state(parts.ema),
                        self.full_optimizer_state(parts.raw_model, parts.optimizer.optimizer),
                        parts.raw_model)

    def save_state(self, gathered: "Gathered", parts, data, out_dir: Path) -> None:
        """The ``accelerate/`` folder of a checkpoint, file for file what ``accelerator.save_state`` writes for ddp."""
        acc = self.accelerator
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_accelerator_state(str(out_dir), [{k: v.contiguous() for k, v in gathered.model.items()}],
                               [_Fixed(gathered.optimizer)], [parts.scheduler], [data.loader], acc.process_index,
                               acc.step, acc.scaler)
        save_custom_state(_Fixed(gathered.ema), str(out_dir), 0)
        save_custom_state(parts.state, str(out_dir), 1)

    def load_state(self, parts, data, in_dir: Path) -> None:
        """Inverse of ``save_state`` (reads a ddp run's folder too): every rank reads the full files, keeps its part."""
        acc, in_dir = self.accelerator, Path(in_dir)
        self.load_full_state(parts.raw_model, load_file(str(in_dir / "model.safetensors")))
        self.load_full_optimizer_state(parts.raw_model, parts.optimizer.optimizer,
                                       accelerate.utils.load(in_dir / "optimizer.bin", map_location="cpu"))
        # The schedule, loader sampler, scaler and this rank's RNG streams, as accelerator.load_state reads them.
        override = load_accelerator_state(str(in_dir), [], [], [parts.scheduler], [data.loader], acc.process_index,
                                          acc.scaler)
        if "step" in override:
            acc.step = override["step"]
        ema = _Fixed({})
        load_custom_state(ema, str(in_dir), 0)
        self.load_full_state(parts.ema, ema.value)
        load_custom_state(parts.state, str(in_dir), 1)

    def plain_ema(self, parts, cfg) -> Optional[nn.Module]:
        """A whole, unsplit copy of the EMA on the main process (None elsewhere), for the sample grid."""
        sd = self.full_state(parts.ema)
        if not self.accelerator.is_main_process:
            return None
        ema = build_model(cfg)
        ema.load_state_dict(sd)
        return ema.to(self.accelerator.device).requires_grad_(False).eval()


class Gathered:
    """Full state dicts of one checkpoint (rank 0). Quacks like the model for
    ``dit_moe.weights.checkpoint.save_checkpoint`` (``model_config``, ``routing_config``, ``state_dict()``), which
    writes the weights files from it."""

    def __init__(self, model: dict, ema: dict, optimizer: dict, raw_model: nn.Module):
        self.model, self.ema, self.optimizer = model, ema, optimizer
        self.model_config, self.routing_config = raw_model.model_config, raw_model.routing_config

    def weights(self, which: str) -> "_Weights":
        return _Weights(getattr(self, which), self)


class _Weights:
    def __init__(self, sd: dict, owner: Gathered):
        self.sd, self.model_config, self.routing_config = sd, owner.model_config, owner.routing_config

    def state_dict(self) -> dict:
        return self.sd


class _Fixed:
    """A state that Accelerate's save/load functions handle through ``state_dict`` / ``load_state_dict``."""

    def __init__(self, value: dict):
        self.value = value

    def state_dict(self) -> dict:
        return self.value

    def load_state_dict(self, value: dict) -> None:
        self.value = value
