"""Sampling: classifier-free-guided reverse diffusion with diffusers schedulers, grids, and bulk sampling for FID.

Samplers (``SamplerSettings.sampler``), all on the training schedule (linear betas 1e-4..0.02, T = 1000):

* ``ddpm``: ancestral DDPM with the model's learned variance (diffusers ``DDPMScheduler``, ``variance_type=
  "learned_range"``), timesteps spaced like ADM's ``space_timesteps(1000, "250")`` (``timestep_spacing="linspace"``).
  This is DiT's protocol for its published FIDs. It consumes all 2C output channels (eps | v).
* ``ddim``: deterministic DDIM (eta = 0), ``timestep_spacing="trailing"`` so the chain starts at t = 999 and each
  step lands exactly on the next timestep (diffusers' DDIM steps back by T // steps). Consumes eps only.
* ``dpm``: DPM-Solver++ (2nd order multistep). Consumes eps only.

Clipping. ``clip_denoised`` clamps the predicted x0 to [-1, 1] (useful for pixel-space data, wrong for latents, so
off by default as in DiT). diffusers' DDIM has a trap here: with ``clip_sample=True`` and the default
``use_clipped_model_output=False`` the step mixes the *clipped* x0 with the *unclipped* eps; under guidance the
two disagree strongly and samples are wrecked (measured: 8% of cfg-3 digits recognised, ~100% with the fix).
Every scheduler is built with ``clip_sample`` set explicitly, and DDIM always steps with
``use_clipped_model_output=True`` (see ``scheduler_step_kwargs``).

Reproducibility. Sample ``i`` of a run seeded with ``seed`` draws its initial noise and every step's noise from its
own generator seeded by ``sample_seed(seed, i)``, so a sample does not depend on the batch size, on the number of
processes, or on which samples were already on disk when a bulk run resumed.

Bulk sampling (``sample_to_folder``) writes ``DIR/images/000123.png`` (named by global index; each process writes
its own indices), then the main process writes the ADM-style ``DIR/samples.npz`` (``arr_0`` uint8 NHWC,
``labels``) and ``DIR/samples.json`` (settings, throughput, activated experts per timestep bucket).

Inference-time sparsity (``calibrate_threshold``): a DTop-p model's top-p threshold is set by bisection so that the
model, on its own sampling trajectory, activates a chosen number of experts per token.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "SCHEDULE",
    "SAMPLERS",
    "LABEL_POLICIES",
    "SamplingError",
    "SamplerSettings",
    "make_scheduler",
    "scheduler_step_kwargs",
    "sample_seed",
    "make_generators",
    "make_labels",
    "sample_latents",
    "make_grid",
    "ActiveExpertMeter",
    "summarize_active",
    "format_active",
    "require_dtopp",
    "calibrate_threshold",
    "SingleProcess",
    "sample_to_folder",
    "read_samples",
    "write_npz",
    "build_parser",
    "main",
]

# The training noise schedule (dit_moe.diffusion.GaussianDiffusion's defaults, DiT's recipe).
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
SAMPLERS = ("ddpm", "ddim", "dpm")
LABEL_POLICIES = ("balanced", "random")
IMAGE_DIR = "images"
NPZ_FILE = "samples.npz"
INFO_FILE = "samples.json"
STATS_DIR = "stats"
METRICS_FILE = "metrics.json"


class SamplingError(ValueError):
    """Bad sampling inputs (class ids, labels, settings, output folder); the message names the value at fault."""


# ---------------------------------------------------------------------------------------------------------
#                                          Schedulers
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerSettings:
    """How to run the reverse process. ``guidance_channels=None`` guides all latent channels (3: DiT's legacy)."""
    sampler: str = "ddpm"
    steps: int = 250
    cfg_scale: float = 1.5
    guidance_channels: Optional[int] = None
    clip_denoised: bool = False

    def validate(self, in_channels: Optional[int] = None) -> "SamplerSettings":
        if self.sampler not in SAMPLERS:
            raise SamplingError(f"sampler {self.sampler!r} is not one of {SAMPLERS}")
        if not 1 <= self.steps <= SCHEDULE["num_train_timesteps"]:
            raise SamplingError(f"steps={self.steps} must be in [1, {SCHEDULE['num_train_timesteps']}]")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise SamplingError(f"cfg_scale={self.cfg_scale} must be a finite number >= 0 (1 = no guidance)")
        if self.guidance_channels is not None and in_channels is not None and not 1 <= self.guidance_channels <= in_channels:
            raise SamplingError(f"guidance_channels={self.guidance_channels} must be in [1, {in_channels}] (or None = all)")
        return self


def make_scheduler(settings: SamplerSettings, learn_sigma: bool = True):
    """A fresh diffusers scheduler for ``settings`` with its timesteps set (multistep solvers keep state: one per run)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    settings.validate()
    clip = bool(settings.clip_denoised)
    if settings.sampler == "ddpm":
        scheduler = DDPMScheduler(
            **SCHEDULE, prediction_type="epsilon",
            variance_type="learned_range" if learn_sigma else "fixed_large",
            timestep_spacing="linspace", clip_sample=clip, clip_sample_range=1.0,
        )
    elif settings.sampler == "ddim":
        scheduler = DDIMScheduler(
            **SCHEDULE, prediction_type="epsilon", timestep_spacing="trailing",
            clip_sample=clip, clip_sample_range=1.0, set_alpha_to_one=True,
        )
    else:
        # Dynamic thresholding with sample_max_value = 1 is a plain clamp of x0 to [-1, 1].
        scheduler = DPMSolverMultistepScheduler(
            **SCHEDULE, prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
            timestep_spacing="linspace", lower_order_final=True,
            thresholding=clip, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
        )
    scheduler.set_timesteps(settings.steps)
    return scheduler


def scheduler_step_kwargs(settings: SamplerSettings) -> dict:
    """Extra keyword arguments of ``scheduler.step``; DDIM must re-derive eps from the clipped x0 (module docstring)."""
    if settings.sampler == "ddim":
        return {"eta": 0.0, "use_clipped_model_output": True}
    return {}


# ---------------------------------------------------------------------------------------------------------
#                                    Seeds, labels, the sampling loop
# ---------------------------------------------------------------------------------------------------------

def _derive_seed(seed: int, *key: int) -> int:
    """A 63-bit seed from (seed, key...): well mixed, stable across platforms and numpy versions."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SamplingError(f"seed must be a non-negative integer, got {seed!r}")
    words = np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` in a run seeded with ``seed``."""
    return _derive_seed(seed, 0, index)


def make_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample (CPU so that CPU and CUDA runs draw the same noise)."""
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]


def make_labels(policy: str, num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Labels (num_samples,) int64 of a bulk run.

    balanced: sample i gets class i % num_classes, then a seeded permutation (every class within one of
    num_samples / num_classes); random: uniform draws (DiT's sample_ddp). Both depend only on the arguments.
    """
    if policy not in LABEL_POLICIES:
        raise SamplingError(f"labels policy {policy!r} is not one of {LABEL_POLICIES}")
    if num_samples < 1 or num_classes < 1:
        raise SamplingError(f"need num_samples >= 1 and num_classes >= 1, got {num_samples}, {num_classes}")
    g = torch.Generator().manual_seed(_derive_seed(seed, 1))
    if policy == "balanced":
        base = torch.arange(num_samples) % num_classes
        return base[torch.randperm(num_samples, generator=g)]
    return torch.randint(0, num_classes, (num_samples,), generator=g)


def check_labels(labels: torch.Tensor, num_classes: int, where: str = "labels") -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.ndim != 1:
        raise SamplingError(f"{where}: expected a 1-D list of class ids, got shape {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise SamplingError(f"{where}: class id(s) {sorted(set(bad.tolist()))[:10]} out of range [0, {num_classes}) "
                            f"(the null class {num_classes} is reserved for guidance)")
    return labels


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    labels: torch.Tensor,
    generators: Sequence[torch.Generator],
    settings: SamplerSettings,
    shape: tuple[int, int, int],
    device: Optional[torch.device | str] = None,
    callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Run the reverse process for labels (N,) and one generator per sample; returns x_0 (N, C, h, w) float32.

    ``model.forward_with_cfg(x, t, y, cfg_scale, guidance_channels)`` gives (N, 2C, h, w) (eps | v) or (N, C, h, w).
    ``callback(step_index, t, x_in)`` runs before each model call (activated-expert meters, calibration).
    """
    C, h, w = shape
    labels = torch.as_tensor(labels, dtype=torch.long)
    if hasattr(model, "num_classes"):
        labels = check_labels(labels, model.num_classes)
    if len(generators) != labels.shape[0]:
        raise SamplingError(f"need one generator per sample: {len(generators)} generators for {labels.shape[0]} labels")
    settings.validate(C)
    if device is None:
        device = next(model.parameters()).device
    learn_sigma = bool(getattr(model, "learn_sigma", True))
    scheduler = make_scheduler(settings, learn_sigma=learn_sigma)
    step_kwargs = scheduler_step_kwargs(settings)
    gens = list(generators)

    N = labels.shape[0]
    x = torch.stack([torch.randn((C, h, w), generator=g) for g in gens]).to(device)
    x = x * scheduler.init_noise_sigma
    y = labels.to(device)
    for i, t in enumerate(scheduler.timesteps):
        t_int = int(t)
        x_in = scheduler.scale_model_input(x, t)
        if callback is not None:
            callback(i, t_int, x_in)
        tt = torch.full((N,), t_int, dtype=torch.long, device=device)
        out = model.forward_with_cfg(x_in, tt, y, settings.cfg_scale, settings.guidance_channels).float()
        if out.shape[1] not in (C, 2 * C) or (learn_sigma and out.shape[1] != 2 * C):
            raise SamplingError(f"model output has {out.shape[1]} channels; expected {2 * C if learn_sigma else C} "
                                f"for {C} input channels (learn_sigma={learn_sigma})")
        if not (settings.sampler == "ddpm" and learn_sigma):
            out = out[:, :C]  # DDIM / DPM-Solver / fixed variance: epsilon only
        x = scheduler.step(out, t, x, generator=gens, **step_kwargs).prev_sample
    return x.float()


# ---------------------------------------------------------------------------------------------------------
#                                               Grids
# ---------------------------------------------------------------------------------------------------------

def _font(size: int):
    from PIL import ImageFont

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
    from PIL import Image, ImageDraw

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


# ---------------------------------------------------------------------------------------------------------
#                                 Activated experts (MoE models)
# ---------------------------------------------------------------------------------------------------------

def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from .models.routers.base import Router

    return [m for m in model.modules() if isinstance(m, Router)]


class ActiveExpertMeter:
    """Counts routed experts activated per token, per MoE layer and per timestep bucket, via router forward hooks.

    Use as a context manager around sampling; ``set_timestep(t)`` before each model call picks the bucket
    (bucket b covers training timesteps [b T / B, (b + 1) T / B)). Under CFG both halves of the batch count:
    that is the compute actually spent. Sums stay on the model's device (no host sync per layer).
    """

    def __init__(self, model: torch.nn.Module, num_buckets: int = 10):
        self.routers = _routers(model)
        if not self.routers:
            raise SamplingError("ActiveExpertMeter: the model has no routers (a dense model activates no experts)")
        device = next(model.parameters()).device
        L = len(self.routers)
        self.num_buckets = num_buckets
        self.sums = torch.zeros(num_buckets, L, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(num_buckets, L, dtype=torch.float64, device=device)
        self.bucket = 0
        self._handles = []

    def set_timestep(self, t: int) -> None:
        T = SCHEDULE["num_train_timesteps"]
        self.bucket = min(self.num_buckets - 1, max(0, int(t) * self.num_buckets // T))

    def reset(self) -> None:
        self.sums.zero_()
        self.tokens.zero_()

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            n = getattr(output, "num_active", None)
            if n is None:
                raise SamplingError(f"router {type(module).__name__} returned no num_active; cannot count experts")
            self.sums[self.bucket, layer] += n.detach().to(torch.float64).sum()
            self.tokens[self.bucket, layer] += n.numel()
        return hook

    def __enter__(self):
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def per_layer(self) -> torch.Tensor:
        """Mean activated experts per token of each layer over all buckets seen, (L,)."""
        return (self.sums.sum(0) / self.tokens.sum(0).clamp(min=1)).cpu()

    def state(self) -> dict:
        return {"num_buckets": self.num_buckets, "sums": self.sums.cpu().tolist(), "tokens": self.tokens.cpu().tolist()}

    def load_state(self, state: dict) -> None:
        sums = torch.tensor(state["sums"], dtype=torch.float64)
        if state.get("num_buckets") != self.num_buckets or sums.shape != self.sums.shape:
            raise SamplingError(f"activated-expert statistics of shape {tuple(sums.shape)} do not fit "
                                f"{self.num_buckets} buckets x {self.sums.shape[1]} layers")
        self.sums.copy_(sums)
        self.tokens.copy_(torch.tensor(state["tokens"], dtype=torch.float64))


def summarize_active(states: Sequence[dict]) -> Optional[dict]:
    """Merge meter states (one per process) into a report: mean activated experts per bucket, per layer, overall."""
    states = [s for s in states if s]
    if not states:
        return None
    sums = sum(torch.tensor(s["sums"], dtype=torch.float64) for s in states)
    tokens = sum(torch.tensor(s["tokens"], dtype=torch.float64) for s in states)
    B = sums.shape[0]
    T = SCHEDULE["num_train_timesteps"]
    per_bucket = (sums.sum(1) / tokens.sum(1).clamp(min=1)).tolist()
    return {
        "mean": float(sums.sum() / tokens.sum().clamp(min=1)),
        "per_layer": (sums.sum(0) / tokens.sum(0).clamp(min=1)).tolist(),
        "timestep_buckets": [[b * T // B, (b + 1) * T // B - 1] for b in range(B)],
        "per_bucket": [v if tokens[b].sum() > 0 else None for b, v in enumerate(per_bucket)],
        "tokens": float(tokens.sum()),
    }


def format_active(report: Optional[dict]) -> str:
    if not report:
        return ""
    lines = [f"activated experts per token: mean {report['mean']:.3f}; per layer "
             + " ".join(f"{v:.2f}" for v in report["per_layer"])]
    for (lo, hi), v in zip(report["timestep_buckets"], report["per_bucket"]):
        if v is not None:
            lines.append(f"  t in [{lo:4d}, {hi:4d}]: {v:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
#                             Inference-time sparsity for DTop-p models
# ---------------------------------------------------------------------------------------------------------

def require_dtopp(model: torch.nn.Module, where: str = "model"):
    """The model's DTop-p controller, or a clear error naming what the model is instead."""
    routing = getattr(model, "routing_config", None)
    rtype = getattr(routing, "type", None)
    controller = getattr(model, "routing_controller", None)
    name = getattr(getattr(model, "model_config", None), "name", type(model).__name__)
    if rtype != "dtopp" or controller is None or not hasattr(controller, "threshold"):
        kind = "a dense model" if not getattr(getattr(model, "arch", None), "is_moe", False) else f"routing type {rtype!r}"
        raise SamplingError(f"{where}: --target-experts needs a DTop-p model (routing.type 'dtopp'); "
                            f"{name} is {kind}")
    return controller


@torch.no_grad()
def _measure(model, meter: ActiveExpertMeter, inputs, labels, settings: SamplerSettings) -> torch.Tensor:
    """Mean activated experts per layer (L,) over recorded sampling inputs [(x_in, t)], with the sampler's CFG."""
    meter.reset()
    with meter:
        for x_in, t in inputs:
            tt = torch.full((x_in.shape[0],), t, dtype=torch.long, device=x_in.device)
            model.forward_with_cfg(x_in, tt, labels, settings.cfg_scale, settings.guidance_channels)
    return meter.per_layer()


def _bisect(f: Callable[[float], float], target: float, iters: int, tol: float = 1e-3,
            lo: float = 1e-6, hi: float = 1.0) -> tuple[float, float]:
    """p in [lo, hi] whose f(p) (non-decreasing in p) is closest to target; returns (p, f(p)).

    lo > 0: top-p keeps an expert while the mass before it is below p, so p = 0 would keep none.
    Stops early once |f(p) - target| <= tol.
    """
    f_lo, f_hi = f(lo), f(hi)
    if not f_lo - tol <= target <= f_hi + tol:
        raise SamplingError(f"target {target} experts per token is not reachable: thresholds in [{lo}, {hi}] "
                            f"give {f_lo:.3f} .. {f_hi:.3f} experts")
    best = min(((lo, f_lo), (hi, f_hi)), key=lambda pf: abs(pf[1] - target))
    for _ in range(iters):
        if abs(best[1] - target) <= tol:
            break
        mid = 0.5 * (lo + hi)
        f_mid = f(mid)
        if abs(f_mid - target) < abs(best[1] - target):
            best = (mid, f_mid)
        if f_mid < target:
            lo = mid
        else:
            hi = mid
    return best


def calibrate_threshold(
    model: torch.nn.Module,
    target: float,
    *,
    settings: SamplerSettings,
    shape: tuple[int, int, int],
    num_classes: int,
    seed: int = 0,
    num_samples: int = 16,
    num_points: int = 8,
    rounds: int = 2,
    iters: int = 20,
    tol: float = 1e-3,
) -> dict:
    """Set a DTop-p model's threshold so that sampling activates ``target`` experts per token on average.

    The calibration inputs are the model's own sampling trajectory: ``num_samples`` class-balanced samples are
    drawn with ``settings``, and their model inputs at ``num_points`` timesteps spread over the chain are kept.
    The threshold is then bisected on those inputs (activated experts grow with p). Global scope: one p for
    all layers, matched on the mean over layers. Layer scope: each layer's p in turn, front to back (layer l only
    sees the thresholds of layers < l, so the sweep is exact). ``rounds`` > 1 redraws the trajectory with the
    new threshold and bisects again, since the trajectory itself moves with p.
    Returns {target, scope, threshold, measured, per_layer}; the controller's ``threshold`` buffer is set in place.
    """
    controller = require_dtopp(model)
    num_experts = controller.num_experts
    if not 1 <= target <= num_experts:
        raise SamplingError(f"target_experts={target} must be in [1, {num_experts}] (the model has {num_experts} experts)")
    if num_samples < 1 or num_points < 1 or rounds < 1:
        raise SamplingError("calibration needs num_samples, num_points and rounds >= 1")
    was_training = model.training
    model.eval()
    threshold = controller.threshold
    device = threshold.device
    meter = ActiveExpertMeter(model, num_buckets=1)
    labels = make_labels("balanced", num_samples, num_classes, seed)
    gens_seed = _derive_seed(seed, 2)
    keep = set(np.linspace(0, settings.steps - 1, min(num_points, settings.steps)).round().astype(int).tolist())
    y = labels.to(next(model.parameters()).device)

    def set_threshold(values: torch.Tensor) -> None:
        threshold.copy_(values.to(device=device, dtype=threshold.dtype).expand_as(threshold))

    try:
        for _ in range(rounds):
            inputs: list[tuple[torch.Tensor, int]] = []
            sample_latents(model, labels, make_generators(gens_seed, range(num_samples)), settings, shape,
                           callback=lambda i, t, x: inputs.append((x.clone(), t)) if i in keep else None)
            if threshold.numel() == 1:
                def f(p: float) -> float:
                    set_threshold(torch.tensor([p]))
                    return float(_measure(model, meter, inputs, y, settings).mean())
                p, _ = _bisect(f, float(target), iters, tol)
                set_threshold(torch.tensor([p]))
            else:
                values = threshold.detach().clone().float().cpu()
                for layer in range(values.numel()):
                    def f(p: float, layer=layer) -> float:
                        values[layer] = p
                        set_threshold(values)
                        return float(_measure(model, meter, inputs, y, settings)[layer])
                    values[layer], _ = _bisect(f, float(target), iters, tol)
                set_threshold(values)
        per_layer = _measure(model, meter, inputs, y, settings)
    finally:
        model.train(was_training)
    return {
        "target": float(target),
        "scope": "global" if threshold.numel() == 1 else "layer",
        "threshold": threshold.detach().float().cpu().tolist(),
        "measured": float(per_layer.mean()),
        "per_layer": per_layer.tolist(),
        "calibration": {"num_samples": num_samples, "num_points": len(keep), "rounds": rounds, "iters": iters,
                        "tol": tol},
    }


# ---------------------------------------------------------------------------------------------------------
#                                   Bulk sampling to a folder / npz
# ---------------------------------------------------------------------------------------------------------

class SingleProcess:
    """The process-group interface ``sample_to_folder`` needs, for one process (Accelerate's PartialState fits too)."""
    process_index = 0
    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def _image_path(out_dir: Path, index: int) -> Path:
    return out_dir / IMAGE_DIR / f"{index:06d}.png"


def existing_indices(out_dir: Path, num_samples: int) -> set[int]:
    """Indices in [0, num_samples) whose PNG is on disk (files are renamed into place, so they are complete)."""
    found = set()
    folder = Path(out_dir) / IMAGE_DIR
    if folder.is_dir():
        for f in folder.iterdir():
            if f.suffix == ".png" and f.stem.isdigit() and int(f.stem) < num_samples:
                found.add(int(f.stem))
    return found


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_json(path: Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2)
    _atomic_write(path, write)


def _save_png(path: Path, image_hwc: np.ndarray) -> None:
    from PIL import Image

    _atomic_write(path, lambda tmp: Image.fromarray(image_hwc, "RGB").save(tmp, format="PNG"))


def write_npz(out_dir: Path, labels: np.ndarray) -> Path:
    """Pack ``images/*.png`` into the ADM reference layout: ``arr_0`` uint8 (N, H, W, 3) and ``labels`` (N,).

    The image array is filled through a memory-mapped .npy file and stored uncompressed in the zip, so 50K
    ImageNet-sized samples never need to sit in RAM at once.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    n = len(labels)
    first = np.asarray(Image.open(_image_path(out_dir, 0)).convert("RGB"))
    path = out_dir / NPZ_FILE
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".npz-") as tmp:
        arr_file = os.path.join(tmp, "arr_0.npy")
        arr = np.lib.format.open_memmap(arr_file, mode="w+", dtype=np.uint8, shape=(n,) + first.shape)
        for i in range(n):
            img = np.asarray(Image.open(_image_path(out_dir, i)).convert("RGB"))
            if img.shape != first.shape:
                raise SamplingError(f"{_image_path(out_dir, i)}: image of shape {img.shape}, expected {first.shape}")
            arr[i] = img
        arr.flush()
        del arr
        lab_file = os.path.join(tmp, "labels.npy")
        np.save(lab_file, np.asarray(labels, dtype=np.int64))

        def write(target):
            with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.write(arr_file, "arr_0.npy")
                zf.write(lab_file, "labels.npy")
        _atomic_write(path, write)
    return path


def read_samples(out_dir: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images uint8 (N, H, W, 3), labels (N,), samples.json) of a finished bulk run."""
    out_dir = Path(out_dir)
    with np.load(out_dir / NPZ_FILE) as data:
        images, labels = data["arr_0"], data["labels"]
    return images, labels, json.loads((out_dir / INFO_FILE).read_text())


def _check_resume(out_dir: Path, settings: dict) -> Optional[dict]:
    """The existing samples.json of ``out_dir`` if its settings match ours; an error naming the differences if not."""
    info_file = out_dir / INFO_FILE
    if not info_file.exists():
        return None
    try:
        old = json.loads(info_file.read_text())
    except json.JSONDecodeError as e:
        raise SamplingError(f"{info_file}: unreadable ({e}); remove it or choose another --out") from e
    theirs = old.get("settings", {})
    diff = [f"{k}: {theirs.get(k)!r} on disk vs {settings.get(k)!r} now"
            for k in sorted(set(theirs) | set(settings)) if theirs.get(k) != settings.get(k)]
    if diff:
        raise SamplingError(f"{out_dir}: holds samples made with other settings, refusing to mix them "
                            f"({'; '.join(diff)}); choose another output folder")
    return old


def sample_to_folder(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    settings: SamplerSettings,
    num_samples: int,
    num_classes: int,
    shape: tuple[int, int, int],
    decode: Callable[[torch.Tensor], torch.Tensor],
    seed: int = 0,
    labels: str = "balanced",
    batch_size: int = 64,
    state=None,
    run_info: Optional[dict] = None,
    extra: Optional[dict] = None,
    progress: bool = True,
) -> dict:
    """Draw ``num_samples`` samples into ``out_dir``, resumably, across processes; returns samples.json's content.

    Process r of W draws the missing indices i with i % W == r, in batches of ``batch_size``; a sample's pixels
    depend only on (settings, seed, i). Existing PNGs are kept. After a barrier the main process checks that all
    N images exist, writes ``samples.npz`` and ``samples.json``. ``run_info`` (model, checkpoint, VAE, ...)
    joins the settings that must match for a resume; ``extra`` is informational (e.g. the calibration result).
    ``decode`` maps latents (N, C, h, w) to images (N, 3|1, H, W) in [-1, 1].
    """
    from .data import to_uint8

    state = state or SingleProcess()
    settings.validate(shape[0])
    if num_samples < 1:
        raise SamplingError(f"num_samples={num_samples} must be >= 1")
    if batch_size < 1:
        raise SamplingError(f"batch_size={batch_size} must be >= 1")
    out_dir = Path(out_dir)
    all_labels = make_labels(labels, num_samples, num_classes, seed)
    run_settings = {
        **(run_info or {}),
        "sampler": settings.sampler, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
        "guidance_channels": "all" if settings.guidance_channels is None else settings.guidance_channels,
        "clip_denoised": settings.clip_denoised, "labels": labels, "num_samples": num_samples,
        "num_classes": num_classes, "seed": seed,
    }
    _check_resume(out_dir, run_settings)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / STATS_DIR).mkdir(exist_ok=True)
    info = {"settings": run_settings, "status": "running", **({} if extra is None else {"extra": extra})}
    # List what exists before the barrier: after it, other processes start adding files.
    start = time.perf_counter()
    done = existing_indices(out_dir, num_samples)
    if state.is_main_process:
        _write_json(out_dir / INFO_FILE, info)
    state.wait_for_everyone()

    rank, world = state.process_index, state.num_processes
    todo = [i for i in range(num_samples) if i % world == rank and i not in done]

    meter = ActiveExpertMeter(model) if _routers(model) else None
    stats_file = out_dir / STATS_DIR / f"rank{rank:05d}.json"
    if meter is not None and stats_file.exists():
        meter.load_state(json.loads(stats_file.read_text())["active_experts"])

    bar = None
    if progress and state.is_main_process:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=f"sampling (rank 0 of {world})", unit="img", dynamic_ncols=True)
    device = next(model.parameters()).device
    callback = (lambda i, t, x: meter.set_timestep(t)) if meter is not None else None
    try:
        if meter is not None:
            meter.__enter__()
        for b in range(0, len(todo), batch_size):
            idx = todo[b:b + batch_size]
            latents = sample_latents(model, all_labels[idx], make_generators(seed, idx), settings, shape,
                                     device=device, callback=callback)
            images = to_uint8(decode(latents)).permute(0, 2, 3, 1).cpu().numpy()   # (n, H, W, 3)
            for i, img in zip(idx, images):
                _save_png(_image_path(out_dir, i), img)
            if meter is not None:
                _write_json(stats_file, {"active_experts": meter.state()})
            if bar is not None:
                bar.update(len(idx))
    finally:
        if meter is not None:
            meter.__exit__(None, None, None)
        if bar is not None:
            bar.close()
    state.wait_for_everyone()

    if not state.is_main_process:
        return {"settings": run_settings, "status": "generated", "rank": rank, "generated": len(todo)}
    have = existing_indices(out_dir, num_samples)
    missing = sorted(set(range(num_samples)) - have)
    if missing:
        raise SamplingError(f"{out_dir / IMAGE_DIR}: {len(missing)} of {num_samples} samples missing "
                            f"(first {missing[:5]}); a process failed, rerun the same command to resume")
    seconds = time.perf_counter() - start
    new = len(have) - len(done)
    write_npz(out_dir, all_labels.numpy())
    stats = [json.loads(f.read_text())["active_experts"] for f in sorted((out_dir / STATS_DIR).glob("rank*.json"))]
    info.update({
        "status": "complete",
        "npz": NPZ_FILE,
        "class_counts": torch.bincount(all_labels, minlength=num_classes).tolist(),
        "generated_this_run": new,
        "resumed_from": len(done),
        "processes": world,
        "seconds": round(seconds, 3),
        "images_per_second": round(new / seconds, 3) if seconds > 0 else None,
        "active_experts": summarize_active(stats),
    })
    _write_json(out_dir / INFO_FILE, info)
    return info


# ---------------------------------------------------------------------------------------------------------
#                                          Command line
# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py",
        description="Sample a trained dit-moe checkpoint: a labelled grid (default) or N samples to a folder/npz "
                    "for FID (--num-samples, works under `accelerate launch`). Defaults come from the checkpoint's "
                    "experiment `sample` section; flags override them.",
    )
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--sampler", choices=SAMPLERS, help="ddpm (learned variance, DiT's protocol), ddim, dpm (DPM-Solver++)")
    p.add_argument("--steps", type=int, help="number of sampling steps (DiT: 250 DDPM steps)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--guidance-channels", type=int,
                   help="guide only the first N latent channels (3 = DiT's legacy behaviour; default all)")
    p.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=False,
                   help="clamp predicted x0 to [-1, 1] (pixel-space data; wrong for latents)")
    p.add_argument("--seed", type=int, help="global seed; sample i uses a seed derived from (seed, i)")
    p.add_argument("--batch-size", type=int, help="samples per forward pass (per process)")
    p.add_argument("--device", help="torch device (default: Accelerate's device, i.e. CUDA when available)")
    p.add_argument("--vae", help="decode with this AutoencoderKL (hub id or local directory) instead of the checkpoint's")
    g = p.add_argument_group("grid")
    g.add_argument("--classes", nargs="+", help="class ids or names to show (default: all classes if <= 16, else 8 random)")
    g.add_argument("--num-per-class", type=int, help="samples per class in the grid")
    g.add_argument("--ncol", type=int, help="grid columns (default: samples per class)")
    b = p.add_argument_group("bulk sampling")
    b.add_argument("--num-samples", type=int, help="draw N samples into --out (PNG files + samples.npz + samples.json)")
    b.add_argument("--labels", choices=LABEL_POLICIES, default="balanced",
                   help="balanced: i %% num_classes, seeded permutation (default); random: uniform (DiT's sample_ddp)")
    b.add_argument("--fid", metavar="REF", help="after sampling, compute metrics against REF (image folder, ADM "
                   "reference npz, or statistics npz) and write DIR/metrics.json")
    b.add_argument("--metrics", default="fid", help="with --fid: comma-separated subset of fid,isc,kid,prc")
    b.add_argument("--extractor", default="inception-v3-compat",
                   help="with --fid: torch-fidelity feature extractor (digits-cnn for the embedded digits)")
    b.add_argument("--inception-weights", metavar="PATH", help="with --fid: local Inception weights (offline machines)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", help="grid: PNG path (default samples.png); bulk: output folder (required)")
    s = p.add_argument_group("DTop-p inference-time sparsity")
    s.add_argument("--target-experts", type=float,
                   help="calibrate the DTop-p threshold so sampling activates K experts per token")
    s.add_argument("--calibration-samples", type=int, default=16, help="samples whose trajectory calibrates the threshold")
    return p


def _resolve_classes(tokens: Sequence[str], class_names: Sequence[str], num_classes: int, where: str) -> list[int]:
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


def _data_info(ckpt):
    from .data import DataInfo

    if ckpt.data_info:
        try:
            return DataInfo.from_dict(ckpt.data_info)
        except (ValueError, TypeError) as e:
            raise SamplingError(f"{ckpt.path}: invalid data_info ({e})") from e
    cfg = ckpt.model_config
    if cfg.in_channels not in (1, 3):
        raise SamplingError(f"{ckpt.path}: checkpoint has no data_info and {cfg.in_channels}-channel latents; "
                            "pass --vae to say how to decode them")
    print(f"note: {ckpt.path} has no data_info; decoding its {cfg.in_channels}-channel output as pixels", file=sys.stderr)
    return DataInfo(num_classes=cfg.num_classes, in_channels=cfg.in_channels, latent_size=cfg.input_size,
                    image_size=cfg.input_size, class_names=tuple(str(i) for i in range(cfg.num_classes)),
                    vae=None, scaling_factor=1.0, source="unknown")


def run(args: argparse.Namespace) -> dict:
    """Everything behind the command line; returns a summary (samples.json content for bulk runs)."""
    from .checkpoint import build_from_checkpoint
    from .config import SampleConfig
    from .data import load_decoder, to_uint8

    bulk = args.num_samples is not None
    if bulk and not args.out:
        raise SamplingError("--num-samples needs --out DIR (the folder that receives images/, samples.npz, samples.json)")
    if args.fid and not bulk:
        raise SamplingError("--fid needs bulk sampling (--num-samples N --out DIR)")
    state = SingleProcess()
    if bulk:
        from accelerate import PartialState
        # Without cpu=True Accelerate sets up no process group on a machine without CUDA (torchrun on CPUs).
        state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    device = torch.device(args.device) if args.device else getattr(state, "device", None) or torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")

    model, ckpt = build_from_checkpoint(args.checkpoint, which=args.weights, device=device)
    defaults = ckpt.experiment.sample if ckpt.experiment is not None else SampleConfig()
    pick = lambda value, default: default if value is None else value  # noqa: E731
    settings = SamplerSettings(
        sampler=pick(args.sampler, defaults.sampler), steps=pick(args.steps, defaults.steps),
        cfg_scale=pick(args.cfg_scale, defaults.cfg_scale),
        guidance_channels=pick(args.guidance_channels, defaults.guidance_channels),
        clip_denoised=bool(args.clip_denoised),
    ).validate(model.in_channels)
    seed = pick(args.seed, defaults.seed)
    batch_size = pick(args.batch_size, defaults.batch_size)
    info = _data_info(ckpt)
    cfg = ckpt.model_config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    where = str(ckpt.path)

    calibration = None
    if args.target_experts is not None:
        require_dtopp(model, where)
        calibration = calibrate_threshold(model, args.target_experts, settings=settings, shape=shape,
                                          num_classes=cfg.num_classes, seed=seed,
                                          num_samples=args.calibration_samples)
        if state.num_processes > 1:
            # Every rank calibrated on the same inputs; GPU non-determinism must not leave them with different p.
            from accelerate.utils import broadcast
            threshold = model.routing_controller.threshold
            threshold.copy_(broadcast(threshold.clone(), from_process=0))
            calibration["threshold"] = threshold.float().cpu().tolist()
        if state.is_main_process:
            print(f"calibrated DTop-p threshold {['%.4f' % v for v in calibration['threshold']]} -> "
                  f"{calibration['measured']:.3f} experts per token (target {args.target_experts})")
    decode = load_decoder(info, device=device, vae=args.vae)
    vae_name = args.vae or info.vae or "identity"

    if not bulk:
        num_per_class = pick(args.num_per_class, defaults.num_per_class)
        if args.classes:
            classes = _resolve_classes(args.classes, info.class_names, cfg.num_classes, where)
        elif cfg.num_classes <= 16:
            classes = list(range(cfg.num_classes))
        else:
            g = torch.Generator().manual_seed(_derive_seed(seed, 3))
            classes = torch.randperm(cfg.num_classes, generator=g)[:8].tolist()
        labels = torch.tensor([c for c in classes for _ in range(num_per_class)], dtype=torch.long)
        images = []
        meter = ActiveExpertMeter(model) if _routers(model) else None
        with (meter if meter is not None else contextlib.nullcontext()):
            for b in range(0, len(labels), batch_size):
                idx = list(range(b, min(b + batch_size, len(labels))))
                lat = sample_latents(model, labels[idx], make_generators(seed, idx), settings, shape,
                                     callback=(lambda i, t, x: meter.set_timestep(t)) if meter else None)
                images.append(to_uint8(decode(lat)).cpu())
        names = [short_name(info.class_names[c]) if c < len(info.class_names) else str(c) for c in labels.tolist()]
        grid = make_grid(torch.cat(images), names, ncol=args.ncol or num_per_class)
        out = Path(args.out or "samples.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        report = summarize_active([meter.state()]) if meter is not None else None
        print(f"wrote {out} ({len(labels)} samples, {settings.sampler} {settings.steps} steps, cfg {settings.cfg_scale})")
        if report:
            print(format_active(report))
        return {"grid": str(out), "classes": classes, "active_experts": report, "calibration": calibration}

    run_info = {
        "model": cfg.name, "checkpoint": str(Path(ckpt.path).resolve()), "checkpoint_step": ckpt.step,
        "weights": args.weights, "vae": vae_name, "routing": ckpt.routing_config.type if model.arch.is_moe else None,
        "target_experts": args.target_experts,
    }
    summary = sample_to_folder(
        model, args.out, settings=settings, num_samples=args.num_samples, num_classes=cfg.num_classes, shape=shape,
        decode=decode, seed=seed, labels=args.labels, batch_size=batch_size, state=state, run_info=run_info,
        extra={"calibration": calibration} if calibration else None, progress=not args.no_progress,
    )
    if state.is_main_process:
        print(f"wrote {args.num_samples} samples to {args.out} ({summary['generated_this_run']} new, "
              f"{summary['images_per_second']} images/s over {summary['processes']} process(es))")
        if summary.get("active_experts"):
            print(format_active(summary["active_experts"]))
        if args.fid:
            summary["metrics"] = _evaluate(args.out, args.fid, summary, args, device)
    return summary


def _evaluate(out_dir: str | Path, reference: str, summary: dict, args: argparse.Namespace, device) -> dict:
    """``--fid REF``: metrics of the samples' npz against REF through dit_moe.evaluate, written to metrics.json."""
    try:
        from . import evaluate
    except ImportError as e:
        raise SamplingError(f"--fid needs dit_moe.evaluate, which failed to import ({e})") from e
    out_dir = Path(out_dir)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    settings = {**summary["settings"], "samples": str(out_dir / NPZ_FILE)}
    if summary.get("active_experts"):
        settings["active_experts_mean"] = summary["active_experts"]["mean"]
    result = evaluate.compute_metrics(str(out_dir / NPZ_FILE), reference, metrics=metrics,
                                      feature_extractor=args.extractor, inception_weights=args.inception_weights,
                                      device=torch.device(device).type, settings=settings)
    evaluate.write_metrics_json(out_dir / METRICS_FILE, result["metrics"], result["settings"])
    print(f"metrics vs {reference} ({out_dir / METRICS_FILE}): " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result["metrics"].items()))
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (SamplingError, CheckpointError, ConfigError, OSError) as e:   # OSError: e.g. a VAE that cannot be loaded
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
