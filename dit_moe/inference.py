"""From a trained model to everything sampling needs: the one road every sampler of the toolkit takes.

``load(path)`` turns a checkpoint (or a run folder: its latest checkpoint) into an ``InferenceBundle``::

    bundle.model        the network with the chosen weights (``ema`` by default, or ``model``), eval mode, on device
    bundle.objective    what the network predicts (dit_moe.diffusion: DDPMObjective | RectifiedFlow); checkpoints
                        written before the ``diffusion`` section existed are DDPM
    bundle.decode       latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1] (identity for pixel data, else the
                        AutoencoderKL the data was extracted with, or ``vae``); loaded on first use, cached
    bundle.data_info    classes, channels, sizes, VAE (dit_moe.data.DataInfo)
    bundle.defaults     the checkpoint's ``sample`` section (SampleConfig; None fields resolve per objective)

``from_model`` builds the same bundle around a model in memory (the EMA grid during training). sample.py, the
training grid, ``dit_moe.analyze``, the demo and the study all start here; nothing else rebuilds a sampling model.
The model itself comes from ``dit_moe.weights.build.build_from_checkpoint``, the one builder of a model from a
checkpoint (which reads its config.json once).
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import DiffusionConfig, ExperimentConfig, SampleConfig
from .data import DataInfo, load_decoder
from .diffusion import build_objective
from .errors import DitMoeError
from .weights.build import build_from_checkpoint
from .weights.checkpoint import Checkpoint

__all__ = ["InferenceError", "InferenceBundle", "load", "from_model", "get_decoder", "resolve_device"]


class InferenceError(DitMoeError, ValueError):
    """A checkpoint cannot be turned into a sampler (bad data_info, no way to decode); the message names the path."""


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    """``device`` as a torch.device (default: CUDA when available); InferenceError naming the value when it is not a
    device name or names a CUDA device this machine lacks."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InferenceError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device {device!r}: CUDA is not available on this machine")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InferenceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


@functools.lru_cache(maxsize=4)
def _cached_decoder(info: DataInfo, device: torch.device, vae: Optional[str]):
    return load_decoder(info, device=device, vae=vae)


def get_decoder(info: DataInfo, device, vae: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``dit_moe.data.load_decoder``, cached per (data, device, vae): a training run's periodic grids and a study's
    evaluations load a VAE once."""
    return _cached_decoder(info, torch.device(device), vae)


@dataclass
class InferenceBundle:
    model: torch.nn.Module
    objective: object
    data_info: DataInfo
    defaults: SampleConfig
    device: torch.device
    experiment: Optional[ExperimentConfig] = None
    checkpoint: Optional[Checkpoint] = None      # when loaded from disk
    weights: str = "ema"
    vae: Optional[str] = None                    # decoder override (hub id or local folder)
    decodable: bool = True                       # False: latents without a VAE to decode them (see load)
    _decode: Optional[Callable] = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, h, w) of what the model denoises."""
        return (self.data_info.in_channels, self.data_info.latent_size, self.data_info.latent_size)

    @property
    def num_classes(self) -> int:
        return self.data_info.num_classes

    @property
    def where(self) -> str:
        return str(self.checkpoint.path) if self.checkpoint is not None else "model"

    @property
    def vae_name(self) -> str:
        return self.vae or self.data_info.vae or "identity"

    @property
    def decode(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self._decode is None:
            if not self.decodable:
                raise InferenceError(f"{self.where}: checkpoint has no data_info and {self.data_info.in_channels}-"
                                     "channel latents; pass --vae to say how to decode them")
            self._decode = get_decoder(self.data_info, self.device, self.vae)
        return self._decode

    def run_info(self) -> dict:
        """What identifies the samples of this bundle (joins the sampling settings of a bulk run)."""
        ckpt = self.checkpoint
        arch = getattr(self.model, "arch", None)
        routing = getattr(self.model, "routing_config", None)
        info = {
            "model": getattr(getattr(self.model, "model_config", None), "name", type(self.model).__name__),
            "checkpoint": str(Path(ckpt.path).resolve()) if ckpt is not None else None,
            "checkpoint_step": ckpt.step if ckpt is not None else None,
            "weights": self.weights, "vae": self.vae_name,
            "routing": routing.type if arch is not None and arch.is_moe and routing is not None else None,
        }
        if self.objective.kind != "ddpm":
            info["objective"] = self.objective.kind
        return info


def _fallback_data_info(ckpt, vae: Optional[str]) -> tuple[DataInfo, bool]:
    cfg = ckpt.model_config
    decodable = vae is not None or cfg.in_channels in (1, 3)
    if decodable and vae is None:
        print(f"note: {ckpt.path} has no data_info; decoding its {cfg.in_channels}-channel output as pixels",
              file=sys.stderr)
    info = DataInfo(num_classes=cfg.num_classes, in_channels=cfg.in_channels, latent_size=cfg.input_size,
                    image_size=cfg.input_size, class_names=tuple(str(i) for i in range(cfg.num_classes)),
                    vae=None, scaling_factor=1.0, source="unknown")
    return info, decodable


def load(path: Checkpoint | str | Path, weights: str = "ema", device: Optional[str | torch.device] = None,
         vae: Optional[str] = None, check: Optional[Callable[[Checkpoint], None]] = None) -> InferenceBundle:
    """The bundle of the checkpoint at ``path`` (a checkpoint folder, a run folder: its latest checkpoint, or a
    ``Checkpoint`` already read).

    weights: ``ema`` (falls back to the raw weights when none were saved) or ``model``; device: default CUDA when
    available; vae: decode with this AutoencoderKL instead of the checkpoint's; check: called with the checkpoint's
    description before its weights are read (``weights.build.build_from_checkpoint``), to refuse it early. Raises
    CheckpointError (missing or broken checkpoint), ConfigError (inconsistent configuration) or InferenceError
    (unusable data_info).
    """
    device = resolve_device(device)
    model, ckpt = build_from_checkpoint(path, which=weights, device=device, check=check)
    experiment = ckpt.experiment
    objective = build_objective(experiment.diffusion if experiment is not None else DiffusionConfig(),
                                learn_sigma=ckpt.model_config.learn_sigma)
    decodable = True
    if ckpt.data_info:
        try:
            info = DataInfo.from_dict(ckpt.data_info)
        except (ValueError, TypeError) as e:
            raise InferenceError(f"{ckpt.path}: invalid data_info ({e})") from e
    else:
        info, decodable = _fallback_data_info(ckpt, vae)
    defaults = dataclasses.replace(experiment.sample) if experiment is not None else SampleConfig()
    return InferenceBundle(model=model, objective=objective, data_info=info, defaults=defaults, device=device,
                           experiment=experiment, checkpoint=ckpt, weights=weights, vae=vae, decodable=decodable)


def from_model(model: torch.nn.Module, experiment: ExperimentConfig, data_info: DataInfo | dict,
               device: Optional[str | torch.device] = None, weights: str = "ema") -> InferenceBundle:
    """A bundle around a model in memory (e.g. the trainer's EMA copy), described by its experiment config."""
    info = data_info if isinstance(data_info, DataInfo) else DataInfo.from_dict(data_info)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    learn_sigma = bool(getattr(model, "learn_sigma", experiment.model.learn_sigma))
    objective = build_objective(experiment, learn_sigma=learn_sigma)
    return InferenceBundle(model=model, objective=objective, data_info=info, defaults=dataclasses.replace(
        experiment.sample), device=device, experiment=experiment, weights=weights)
