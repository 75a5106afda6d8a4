"""``train.init_from=DIR``: start a run from another checkpoint's weights (fine-tuning, upcycled models).

Unlike ``--resume``, which continues a run exactly (optimizer, schedule, step, data position, RNG), init_from only
copies weights: the run starts at step 0 with a new optimizer. Both the model and its EMA start from the source's
EMA weights (its raw weights when it saved no EMA): the EMA weights are the ones a checkpoint is sampled and scored
with, the published DiT files hold nothing else, and a fresh run's EMA equals its model at step 0. Persistent
router state comes along (DTop-p threshold and integral, Default MoE vectors, balance biases); the router's
hyper-parameters are the new config's. A source without aux-loss-free balancing gives a run with
``routing.balance_bias=true`` its bias at zero.

The configured model must have the same tensors (names and shapes) as the source, and the same numerical
conventions (model.timestep_freq_shift, model.mlp_norm_eps), which no shape shows. Other fields may differ
(input_size: the position table is rebuilt; class_dropout_prob; routing hyper-parameters; the K of a name).
"""
from __future__ import annotations

import os

import torch

from ..registry import parse_name
from .build import fit
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint

__all__ = ["load_init_weights"]

CONVENTION_FIELDS = ("timestep_freq_shift", "mlp_norm_eps")


def load_init_weights(model: torch.nn.Module, ema: torch.nn.Module, path: str | os.PathLike,
                      which: str = "ema") -> Checkpoint:
    """Copy the checkpoint's ``which`` weights (default EMA, falling back to raw) into ``model`` and ``ema``.

    ``model`` is built by ``registry.build_model`` from the run's config. Raises CheckpointError naming the
    checkpoint and the fields or tensors that do not fit; nothing is loaded then.
    """
    ckpt = load_checkpoint(path)
    where = f"train.init_from={path}"
    mine = getattr(model, "model_config", None)
    theirs = ckpt.model_config
    if mine is not None:
        for f in CONVENTION_FIELDS:
            if getattr(mine, f) != getattr(theirs, f):
                raise CheckpointError(f"{where}: model.{f} is {getattr(theirs, f)!r} in {ckpt.path} but {getattr(mine, f)!r} "
                                      f"in the config; set model.{f}={getattr(theirs, f)} (the weights were trained so)")
    state = ckpt.state_dict(which)
    own = model.state_dict()
    state.update({k: torch.zeros_like(v) for k, v in own.items()       # balancing starts here: b = 0
                  if k.endswith("router.balance_bias") and k not in state})
    hint = ""
    if mine is not None and parse_name(mine.name).is_moe and not parse_name(theirs.name).is_moe:
        hint = f"; a dense checkpoint becomes an MoE one with: dit-moe upcycle {ckpt.path} --model {mine.name}"
    elif mine is not None and getattr(model, "routing_config", None) is not None and \
            model.routing_config.type != ckpt.routing_config.type:
        hint = f" (routing.type {ckpt.routing_config.type} there, {model.routing_config.type} here)"
    fit(state, model, f"{where}: {ckpt.path} ({theirs.name})", hint=hint)
    model.load_state_dict(state)
    ema.load_state_dict(state)
    return ckpt
