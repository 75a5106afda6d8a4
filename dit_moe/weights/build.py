"""From a checkpoint to a model: the one check that a state dict fits a model, and the one builder.

``fit(state, model, where)`` is the toolkit's only "does this state dict fit this model" test (loading a checkpoint,
``train.init_from``, converted and upcycled weights); ``build_from_checkpoint`` is the only place a model is built
from a checkpoint (``dit_moe.inference.load``, export to diffusers, the benchmarks all come through it). Each reads
the checkpoint's config.json once and hands the ``Checkpoint`` object on.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from ..errors import DitMoeError
from ..registry import build_model
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, read_newest

__all__ = ["fit", "load_weights", "build_from_checkpoint"]

SHOWN = 5    # problems named in the one-line error; the rest are counted


def fit(state: Mapping[str, torch.Tensor], model: torch.nn.Module, where: str, *, hint: str = "",
        error: type[DitMoeError] = CheckpointError) -> None:
    """Refuse ``state`` unless it holds exactly ``model``'s tensors (names and shapes).

    Raises ``error`` as one line: ``where``, the model's registry name, the first tensors at fault (missing ones with
    the expected shape, unexpected ones, shape mismatches) and ``hint``. ``model`` may live on the meta device (only
    the names and shapes of its state dict are read)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing tensor {k} {s}" for k, s in expected.items() if k not in state]
    problems += [f"unexpected tensor {k}" for k in state if k not in expected]
    problems += [f"tensor {k} has shape {tuple(state[k].shape)}, expected {s}" for k, s in expected.items()
                 if k in state and tuple(state[k].shape) != s]
    if problems:
        name = getattr(getattr(model, "model_config", None), "name", type(model).__name__)
        more = f" (+{len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise error(f"{where}: weights do not fit {name}: {'; '.join(problems[:SHOWN])}{more}{hint}")


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint | str | Path, which: str = "ema") -> Checkpoint:
    """Load a checkpoint's ``which`` weights into ``model``, refusing a checkpoint of another architecture.

    ``checkpoint`` is a ``Checkpoint`` already read (its config.json is not read again) or a path."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    mine = (asdict(model.model_config), asdict(model.routing_config)) if hasattr(model, "model_config") else None
    theirs = (asdict(ckpt.model_config), asdict(ckpt.routing_config))
    if mine is not None and mine != theirs:
        diff = [f"{sec}.{k}: checkpoint {theirs[i][k]!r} vs model {mine[i][k]!r}"
                for i, sec in enumerate(("model", "routing")) for k in theirs[i] if theirs[i][k] != mine[i].get(k)]
        raise CheckpointError(f"{ckpt.path}: checkpoint of another architecture ({'; '.join(diff)})")
    state = ckpt.state_dict(which)
    fit(state, model, str(ckpt.path))
    model.load_state_dict(state)
    return ckpt


def build_from_checkpoint(path: Checkpoint | str | Path, which: str = "ema", device: str | torch.device = "cpu",
                          check: Optional[Callable[[Checkpoint], None]] = None) -> tuple[torch.nn.Module, Checkpoint]:
    """Rebuild the model from the checkpoint alone and load its (EMA by default) weights; returns (model, checkpoint)
    with the model in eval mode on ``device``.

    ``path`` may be a run folder that is still training (``read_newest``), or a ``Checkpoint`` already read (its
    config.json is not read again). ``check(checkpoint)``, when given, sees the description before any weight is
    read and may refuse it by raising (analysis refuses a dense model so)."""
    def build(ckpt: Checkpoint):
        if check is not None:
            check(ckpt)
        model = build_model(ckpt.model_config, ckpt.routing_config)
        load_weights(model, ckpt, which)
        return model, ckpt

    if isinstance(path, Checkpoint):
        model, ckpt = build(path)
    else:
        model, ckpt = read_newest(path, lambda found: build(load_checkpoint(found)))
    return model.to(device).eval(), ckpt
