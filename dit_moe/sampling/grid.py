"""Labelled sample grids: the picture sample.py draws by default and the trainer draws with its EMA weights.

``sample_grid`` samples a few classes with a bundle (dit_moe.inference) and lays them out with captions;
``training_grid`` is the trainer's periodic EMA grid, RNG-isolated so that a resumed run replays the same training
randomness. Both go through ``sample_latents`` like every other sampler.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..config import ExperimentConfig, SampleConfig
from ..data import to_uint8
from ..inference import from_model
from .experts import expert_tap
from .loop import derive_seed, make_generators, sample_latents
from .settings import SamplingError, resolve_settings

__all__ = ["make_grid", "short_name", "resolve_classes", "grid_labels", "sample_grid", "training_grid"]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def make_grid(images: torch.Tensor, captions: Optional[Sequence[str]] = None, ncol: int = 8,
              min_cell: int = 64, pad: int = 2):
    """uint8 images (N, 3, H, W) -> a PIL grid with a caption above each cell.

    Images smaller than ``min_cell`` are upscaled by an integer factor with nearest neighbour, so 8x8 digits
    stay crisp and readable.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise SamplingError(f"make_grid expects uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    N, _, H, W = images.shape
    if captions is not None and len(captions) != N:
        raise SamplingError(f"make_grid: {len(captions)} captions for {N} images")
    scale = max(1, math.ceil(min_cell / min(H, W)))
    cw, ch = W * scale, H * scale
    font = _font(max(10, min(16, cw // 6)))
    band = (font.getbbox("Ag")[3] + 4) if captions is not None else 0
    ncol = max(1, min(ncol, N))
    nrow = math.ceil(N / ncol)
    grid = Image.new("RGB", (ncol * (cw + pad) + pad, nrow * (ch + band + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for k in range(N):
        r, c = divmod(k, ncol)
        x0, y0 = pad + c * (cw + pad), pad + r * (ch + band + pad)
        tile = Image.fromarray(images[k].permute(1, 2, 0).cpu().numpy(), "RGB")
        grid.paste(tile.resize((cw, ch), Image.NEAREST), (x0, y0 + band))
        if captions is not None:
            draw.text((x0 + 1, y0 + 1), _fit(draw, str(captions[k]), font, cw - 2), fill="black", font=font)
    return grid


def short_name(name: str) -> str:
    """ImageNet-style names list synonyms ("tench, Tinca tinca"): keep the first."""
    return name.split(",")[0].strip()


def resolve_classes(tokens: Sequence[str], class_names: Sequence[str], num_classes: int, where: str) -> list[int]:
    ids = []
    lookup = {n: i for i, n in enumerate(class_names)}
    lookup.update({short_name(n): i for i, n in enumerate(class_names) if short_name(n) not in lookup})
    for tok in tokens:
        try:
            c = int(tok)
        except ValueError:
            if tok not in lookup:
                raise SamplingError(f"--classes: unknown class {tok!r} for {where} (ids 0..{num_classes - 1}; "
                                    f"names such as {', '.join(map(repr, list(class_names)[:5]))})") from None
            c = lookup[tok]
        if not 0 <= c < num_classes:
            raise SamplingError(f"--classes: class id {c} out of range [0, {num_classes}) for {where}")
        ids.append(c)
    return ids


def grid_labels(bundle, settings: SampleConfig, classes: Optional[Sequence] = None) -> tuple[list[int], torch.Tensor]:
    """(classes, labels): the given class ids/names, or all classes when <= 16, else 8 seeded ones; each repeated
    ``settings.num_per_class`` times."""
    info, K = bundle.data_info, bundle.num_classes
    if classes:
        ids = resolve_classes([str(c) for c in classes], info.class_names, K, bundle.where)
    elif K <= 16:
        ids = list(range(K))
    else:
        g = torch.Generator().manual_seed(derive_seed(settings.seed, 3))
        ids = torch.randperm(K, generator=g)[:8].tolist()
    return ids, torch.tensor([c for c in ids for _ in range(settings.num_per_class)], dtype=torch.long)


def _captions(bundle, labels: torch.Tensor) -> list[str]:
    names = bundle.data_info.class_names
    return [short_name(names[c]) if c < len(names) else str(c) for c in labels.tolist()]


def _draw(bundle, labels: torch.Tensor, settings: SampleConfig) -> torch.Tensor:
    """uint8 images (N, 3, H, W) of ``labels``; sample i uses generator (seed, i), batches of settings.batch_size."""
    images = []
    for b in range(0, len(labels), settings.batch_size):
        idx = list(range(b, min(b + settings.batch_size, len(labels))))
        lat = sample_latents(bundle.model, labels[idx], make_generators(settings.seed, idx), settings, bundle.shape,
                             device=bundle.device, objective=bundle.objective)
        images.append(to_uint8(bundle.decode(lat)).cpu())
    return torch.cat(images)


def sample_grid(bundle, settings: Optional[SampleConfig] = None, classes: Optional[Sequence] = None,
                out: Optional[str | Path] = None, ncol: Optional[int] = None) -> dict:
    """A labelled grid of ``classes`` (see grid_labels) with ``settings`` (default: the checkpoint's); saved to
    ``out`` when given. Returns {grid (PIL image), path, classes, labels, settings, active_experts, seconds}."""
    settings = resolve_settings(settings or bundle.defaults, bundle.objective, bundle.shape[0])
    ids, labels = grid_labels(bundle, settings, classes)
    t0 = time.perf_counter()
    tap = expert_tap(bundle.model)
    with (tap if tap is not None else contextlib.nullcontext()):
        images = _draw(bundle, labels, settings)
    grid = make_grid(images, _captions(bundle, labels), ncol=ncol or settings.num_per_class)
    path = None
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
    return {"grid": grid, "path": str(path) if path else None, "classes": ids, "labels": labels.tolist(),
            "settings": settings, "active_experts": tap.report() if tap else None,
            "seconds": time.perf_counter() - t0}


def training_grid(model: torch.nn.Module, experiment: ExperimentConfig, data_info, device, out_path: str | Path,
                  max_classes: int = 10, max_per_class: int = 8) -> dict:
    """The trainer's EMA grid: up to ``max_classes`` evenly spread classes x min(sample.num_per_class, 8) samples
    with the experiment's sample settings, written to ``out_path`` (PNG). Returns sample_grid's summary.

    RNG-isolated: the samples come from their own per-sample generators, and ``fork_rng`` restores torch's global
    (and CUDA) RNG afterwards, so the training stream -- which a resume replays -- is untouched.
    """
    bundle = from_model(model, experiment, data_info, device)
    K = bundle.num_classes
    classes = torch.linspace(0, K - 1, min(K, max_classes)).round().long().tolist()
    base = resolve_settings(experiment.sample, bundle.objective, bundle.shape[0])
    per = max(1, min(base.num_per_class, max_per_class))
    settings = dataclasses.replace(base, num_per_class=per, batch_size=len(classes) * per)
    device = torch.device(device)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return sample_grid(bundle, settings, classes=classes, out=out_path, ncol=per)
