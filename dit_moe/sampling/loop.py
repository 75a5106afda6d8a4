"""The sampling loop: per-sample seeds, labels, classifier-free guidance with a guidance interval, the solver.

Reproducibility. Sample ``i`` of a run seeded with ``seed`` draws its initial noise and every step's noise from its
own generator seeded by ``sample_seed(seed, i)``, so a sample does not depend on the batch size, on the number of
processes, or on which samples were already on disk when a bulk run resumed.

Guidance. Every model call goes through ``model.forward_with_cfg(x, t, y, scale, guidance_channels)`` (DiT's batched
conditional + null-class forward; ``scale == 1`` runs the conditional half only). The loop picks the scale per call:
``cfg_scale`` at noise levels inside ``guidance_interval`` (all of them without one), 1 outside it -- so
``cfg_scale = 1`` and every call outside the interval cost one forward of the batch, not two. CFG combines the first
``guidance_channels`` output channels (all latent channels by default, 3 = DiT's legacy choice), for epsilon and
velocity models alike; learned-variance channels take the conditional prediction.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..config import SAMPLERS, SampleConfig
from ..diffusion import DDPMObjective, RectifiedFlow
from ..models.compile import compile_blocks
from .settings import SamplingError, guidance_scale, resolve_settings
from .solvers import solve

__all__ = ["LABEL_POLICIES", "derive_seed", "sample_seed", "make_generators", "make_labels", "check_labels",
           "initial_noise", "objective_for", "sample_latents"]

LABEL_POLICIES = ("balanced", "random")

Callback = Callable[[int, float, torch.Tensor], None]


def objective_for(model, settings: SampleConfig):
    """The objective of a bare model that came without one: flow when asked for a flow sampler, else DDPM.

    Code that starts from a checkpoint gets the objective from ``dit_moe.inference.load``; this only keeps plain
    ``sample_latents(model, ...)`` calls (DDPM models, as before flow existed) working.
    """
    if settings.sampler in SAMPLERS["flow"]:
        return RectifiedFlow()
    return DDPMObjective(learn_sigma=bool(getattr(model, "learn_sigma", True)))


def derive_seed(seed: int, *key: int) -> int:
    """A 63-bit seed from (seed, key...): well mixed, stable across platforms and numpy versions."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SamplingError(f"seed must be a non-negative integer, got {seed!r}")
    words = np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` in a run seeded with ``seed``."""
    return derive_seed(seed, 0, index)


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
    g = torch.Generator().manual_seed(derive_seed(seed, 1))
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


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, int, int], device) -> torch.Tensor:
    """x at t = 1: one standard normal (C, h, w) per generator, drawn on the CPU, (N, C, h, w) on ``device``."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    labels: torch.Tensor,
    generators: Sequence[torch.Generator],
    settings: SampleConfig,
    shape: tuple[int, int, int],
    device: Optional[torch.device | str] = None,
    callback: Optional[Callback] = None,
    objective=None,
) -> torch.Tensor:
    """Sample labels (N,) with one generator per sample; returns x_0 (N, C, h, w) float32.

    ``objective`` (from ``dit_moe.inference`` or ``dit_moe.diffusion.build_objective``) says what the model predicts;
    without one a bare model counts as DDPM unless ``settings.sampler`` is a flow sampler. ``settings`` may have
    None fields (resolved here). ``callback(call_index, timestep, x_in)`` runs before every model call (activated-
    expert meters, calibration); ``timestep`` is what the network is conditioned on (ddpm: int, flow: 1000 t).
    ``settings.compile`` compiles the model's blocks in place (``dit_moe.models.compile``) before the first call.
    """
    C, h, w = shape
    labels = torch.as_tensor(labels, dtype=torch.long)
    if hasattr(model, "num_classes"):
        labels = check_labels(labels, model.num_classes)
    if len(generators) != labels.shape[0]:
        raise SamplingError(f"need one generator per sample: {len(generators)} generators for {labels.shape[0]} labels")
    objective = objective if objective is not None else objective_for(model, settings)
    settings = resolve_settings(settings, objective, C)
    if device is None:
        device = next(model.parameters()).device
    if settings.compile:                  # in place and once: later calls (batches, the next grid) reuse the graphs
        compile_blocks(model)
    gens = list(generators)
    N = labels.shape[0]
    y = labels.to(device)
    timestep_dtype = torch.long if objective.kind == "ddpm" else torch.float32
    calls = [0]

    def predict(x_in: torch.Tensor, timestep: float, level: float) -> torch.Tensor:
        if callback is not None:
            callback(calls[0], timestep, x_in)
        calls[0] += 1
        t = torch.full((N,), timestep, dtype=timestep_dtype, device=device)
        return model.forward_with_cfg(x_in, t, y, guidance_scale(settings, level), settings.guidance_channels)

    x = solve(settings, objective, initial_noise(gens, shape, device), predict, gens).float()
    # One check per call, not per step (callers copy the result to the host next anyway): a NaN or inf would
    # otherwise become a black image with exit code 0.
    finite = torch.isfinite(x).flatten(1).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise SamplingError(f"the model's outputs are not finite (NaN or inf) for {len(bad)} of {N} samples "
                            f"(labels {labels[bad[:5]].tolist()}); these images are not written: check the "
                            "checkpoint's weights and the sampling settings (precision, CFG scale)")
    return x
