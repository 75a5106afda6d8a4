"""Datasets behind one description: what the model sees (`DataInfo`) and how to get back to pixels.

Two sources:
- "builtin": a small real dataset embedded in an installed package, in pixel space (identity "VAE");
- "latents": a directory written by `python -m dit_moe.extract` (see dit_moe/data/latents.py for the format).

Both yield (x float32 (C, h, w), y int64 scalar tensor). `load_decoder` turns model outputs back into
images in [-1, 1]; `to_uint8` applies the ADM convention used by every FID pipeline.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .builtin import BUILTIN_DATASETS, DigitsDataset
from .latents import LatentDataset

__all__ = [
    "DataInfo",
    "DigitsDataset",
    "LatentDataset",
    "build_dataset",
    "load_decoder",
    "to_uint8",
    "SOURCES",
]

SOURCES = ("builtin", "latents")


@dataclass(frozen=True)
class DataInfo:
    """Everything a model, a sampler or a checkpoint needs to know about the data.

    latent_size is the side of what the model sees (h = w); image_size the side of the decoded image.
    vae is None for pixel-space data (the decoder is the identity); otherwise decoding is
    vae.decode(x / scaling_factor + shift_factor).
    """

    num_classes: int
    in_channels: int
    latent_size: int
    image_size: int
    class_names: tuple[str, ...]
    vae: str | None
    scaling_factor: float
    source: str
    shift_factor: float = 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"DataInfo: unknown key(s) {unknown}; known keys are {sorted(names)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"DataInfo: missing key(s) {missing}")
        d = dict(d)
        d["class_names"] = tuple(d["class_names"])
        return cls(**d)


def build_dataset(source: str, path: str | None = None, flip: bool | None = None) -> tuple[Dataset, DataInfo]:
    """Build a dataset and its description.

    source "builtin": path names the embedded set (default "digits"); source "latents": path is the extraction
    directory. flip=None keeps the dataset's own default (latents: random flip; digits: none).
    """
    if source == "builtin":
        name = path or "digits"
        if name not in BUILTIN_DATASETS:
            raise DataError(f"unknown builtin dataset {name!r}; available: {sorted(BUILTIN_DATASETS)}")
        cls = BUILTIN_DATASETS[name]
        dataset = cls() if flip is None else cls(flip=flip)
        info = DataInfo(
            num_classes=cls.num_classes,
            in_channels=cls.in_channels,
            latent_size=cls.image_size,
            image_size=cls.image_size,
            class_names=tuple(cls.class_names),
            vae=None,
            scaling_factor=1.0,
            source=f"builtin:{name}",
        )
        return dataset, info
    if source == "latents":
        if not path:
            raise DataError("data.path must name the extraction folder (written by `python -m dit_moe.extract`) "
                            "when data.source=latents")
        dataset = LatentDataset(path) if flip is None else LatentDataset(path, flip=flip)
        m = dataset.manifest
        C, h, w = dataset.latent_shape
        if h != w:
            raise DataError(f"{os.path.join(path, 'manifest.json')!r}: latent_shape {[C, h, w]} is not square")
        info = DataInfo(
            num_classes=dataset.num_classes,
            in_channels=C,
            latent_size=h,
            image_size=int(m["image_size"]),
            class_names=tuple(m["class_names"]),
            vae=m["vae"],
            scaling_factor=dataset.scaling_factor,
            source=os.path.abspath(path),
            shift_factor=dataset.shift_factor,
        )
        return dataset, info
    raise DataError(f"unknown data source {source!r}; expected one of {list(SOURCES)}")


def load_decoder(info: DataInfo, device: str | torch.device = "cpu", vae: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return decode: latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1], on `device`.

    Pixel-space data (info.vae None and no vae override) is decoded by the identity, grey repeated to 3
    channels. Otherwise the AutoencoderKL at `vae` (default info.vae; a hub id or a local directory) decodes
    x / scaling_factor + shift_factor. Overriding the VAE is how DiT samples with the MSE decoder from
    latents extracted with the EMA encoder.
    """
    vae = vae or info.vae
    if vae is None:

        def decode_identity(x: torch.Tensor) -> torch.Tensor:
            if x.ndim != 4 or x.shape[1] not in (1, 3):
                raise ValueError(f"identity decoder expects (N, 1|3, H, W), got {tuple(x.shape)}")
            x = x.to(device=device, dtype=torch.float32)
            return x.expand(-1, 3, -1, -1).clamp(-1, 1) if x.shape[1] == 1 else x.clamp(-1, 1)

        return decode_identity

    from diffusers.models import AutoencoderKL   # here, not at the top: diffusers takes seconds to import

    model = AutoencoderKL.from_pretrained(vae).to(device).eval()
    model.requires_grad_(False)
    if model.config.latent_channels != info.in_channels:
        raise DataError(
            f"VAE {vae!r} has {model.config.latent_channels} latent channels, the data has {info.in_channels}"
        )

    @torch.no_grad()
    def decode_vae(x: torch.Tensor) -> torch.Tensor:
        z = x.to(device=device, dtype=torch.float32) / info.scaling_factor + info.shift_factor
        return model.decode(z).sample.clamp(-1, 1)

    return decode_vae


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> uint8 (N, 3, H, W), ADM/DiT convention clamp(127.5 x + 128, 0, 255).

    Grey (C = 1) is repeated to 3 channels so every image reaches Inception in the same form.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"to_uint8 expects (N, 1|3, H, W), got {tuple(images.shape)}")
    out = (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8)
    return out.expand(-1, 3, -1, -1).contiguous() if out.shape[1] == 1 else out
