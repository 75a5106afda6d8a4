"""Solvers: one function per objective that integrates from noise to data, calling ``predict`` for the model.

``predict(x_in, timestep, level)`` returns the (guided) model output for x_in (N, C, h, w) at the network timestep
``timestep`` and noise level ``level`` in [0, 1] (dit_moe/diffusion/__init__.py); the sampling loop builds it
(CFG, guidance interval, callbacks). Per-sample generators supply all noise, so sample i depends only on its own.

DDPM samplers (diffusers schedulers on the training schedule, linear betas 1e-4..0.02, T = 1000):

* ``ddpm``: ancestral DDPM with the model's learned variance (``DDPMScheduler``, ``variance_type="learned_range"``),
  timesteps spaced like ADM's ``space_timesteps(1000, "250")`` (``timestep_spacing="linspace"``). DiT's protocol for
  its published FIDs; consumes all 2C output channels (eps | v).
* ``ddim``: deterministic DDIM (eta = 0), ``timestep_spacing="trailing"`` so the chain starts at t = 999 and each step
  lands exactly on the next timestep. Consumes eps only.
* ``dpm``: DPM-Solver++ (2nd order multistep). Consumes eps only.

Clipping. ``clip_denoised`` clamps the predicted x0 to [-1, 1] (useful for pixel-space data, wrong for latents, so off
by default as in DiT). diffusers' DDIM has a trap here: with ``clip_sample=True`` and the default
``use_clipped_model_output=False`` the step mixes the *clipped* x0 with the *unclipped* eps; under guidance the two
disagree strongly and samples are wrecked (measured: 8% of cfg-3 digits recognised, ~100% with the fix). Every
scheduler is built with ``clip_sample`` set explicitly, and DDIM always steps with ``use_clipped_model_output=True``.

Flow samplers (velocity models; the grid is ``dit_moe.diffusion.time_grid(steps, time_shift)``, 1 -> 0):

* ``euler``: x <- x + (t_next - t) v(x, t); ``steps`` model calls. The last step lands on E[x0 | x_t] = x_t - t v.
* ``heun``: Euler predictor, trapezoidal corrector with v at t_next; the last step (t_next = 0) stays Euler, as in
  EDM / REPA; 2 steps - 1 model calls.
* ``sde``: Euler-Maruyama on the reverse SDE with SiT's default diffusion coefficient ("sigma" form, w(t) = t; REPA
  uses the same, g^2 = 2t): dx = [v + w E[eps | x] / t] dt + sqrt(2 w) dW backwards in time, i.e. per step of size h
  x <- x - h ((2 - t) v + x) + sqrt(2 t h) z. The last step is denoised, x0 = x_t - t v (SiT's "Tweedie" last step);
  ``steps`` model calls.

Why not diffusers for flow: ``FlowMatchEulerDiscreteScheduler`` is the same Euler step and a test checks that ours
agrees with it (and ``FlowMatchHeunDiscreteScheduler`` with our Heun); but the guidance interval and the expert
meters need the noise level of every model call (Heun's second call included), the SDE has no diffusers
counterpart, and the three solvers share one time grid here, so they are three short loops over that grid.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..config import SampleConfig
from ..diffusion import TIMESTEP_SCALE, time_grid
from .settings import DDPM_SAMPLERS, SamplingError

__all__ = ["SCHEDULE", "make_scheduler", "scheduler_step_kwargs", "num_model_calls", "solve", "solve_ddpm",
           "flow_grid", "euler", "heun", "sde"]

# The training noise schedule (dit_moe.diffusion.GaussianDiffusion's defaults, DiT's recipe).
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)

Predict = Callable[[torch.Tensor, float, float], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
#                                          DDPM: diffusers schedulers
# ---------------------------------------------------------------------------------------------------------

def make_scheduler(settings: SampleConfig, learn_sigma: bool = True):
    """A fresh diffusers scheduler for ``settings`` with its timesteps set (multistep solvers keep state: one per run)."""
    # Not at the top: diffusers takes seconds to import, and flow models (the embedded default) never need it.
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if settings.sampler not in DDPM_SAMPLERS:
        raise SamplingError(f"sampler {settings.sampler!r} is not a DDPM sampler ({', '.join(DDPM_SAMPLERS)})")
    if settings.steps is None or not 1 <= settings.steps <= SCHEDULE["num_train_timesteps"]:
        raise SamplingError(f"steps={settings.steps} must be in [1, {SCHEDULE['num_train_timesteps']}]")
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


def scheduler_step_kwargs(settings: SampleConfig) -> dict:
    """Extra keyword arguments of ``scheduler.step``; DDIM must re-derive eps from the clipped x0 (module docstring)."""
    if settings.sampler == "ddim":
        return {"eta": 0.0, "use_clipped_model_output": True}
    return {}


def solve_ddpm(settings: SampleConfig, objective, x: torch.Tensor, predict: Predict,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
    """The diffusers scheduler loop from noise x (N, C, h, w); ``objective`` maps timesteps to noise levels."""
    learn_sigma = bool(objective.learn_sigma)
    scheduler = make_scheduler(settings, learn_sigma=learn_sigma)
    step_kwargs = scheduler_step_kwargs(settings)
    C = x.shape[1]
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        t_int = int(t)
        x_in = scheduler.scale_model_input(x, t)
        out = predict(x_in, t_int, float(objective.noise_level(t_int))).float()
        if out.shape[1] not in (C, 2 * C) or (learn_sigma and out.shape[1] != 2 * C):
            raise SamplingError(f"model output has {out.shape[1]} channels; expected {2 * C if learn_sigma else C} "
                                f"for {C} input channels (learn_sigma={learn_sigma})")
        if not (settings.sampler == "ddpm" and learn_sigma):
            out = out[:, :C]  # DDIM / DPM-Solver / fixed variance: epsilon only
        x = scheduler.step(out, t, x, generator=list(generators), **step_kwargs).prev_sample
    return x


# ---------------------------------------------------------------------------------------------------------
#                                     Flow: Euler, Heun, Euler-Maruyama
# ---------------------------------------------------------------------------------------------------------

def flow_grid(settings: SampleConfig) -> list[float]:
    """The (steps + 1) times 1 -> 0 of a flow run, shifted by settings.time_shift (None or 1 = no shift)."""
    shift = 1.0 if settings.time_shift is None else float(settings.time_shift)
    return time_grid(int(settings.steps), shift).tolist()


def _velocity(predict: Predict, x: torch.Tensor, t: float) -> torch.Tensor:
    v = predict(x, t * TIMESTEP_SCALE, t).float()
    if v.shape != x.shape:
        raise SamplingError(f"a flow model must output a velocity of the input's shape {tuple(x.shape)}, got "
                            f"{tuple(v.shape)} (a learned-sigma model is a DDPM model)")
    return v


def euler(x: torch.Tensor, grid: Sequence[float], predict: Predict) -> torch.Tensor:
    """Explicit Euler on the probability-flow ODE over ``grid`` (descending to 0): len(grid) - 1 model calls."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * _velocity(predict, x, t)
    return x


def heun(x: torch.Tensor, grid: Sequence[float], predict: Predict) -> torch.Tensor:
    """Heun's method (trapezoidal corrector); the step onto t = 0 stays first order. 2 (len(grid) - 1) - 1 calls
    when the grid ends at 0."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        v = _velocity(predict, x, t)
        x_euler = x + (t_next - t) * v
        if t_next > 0:
            x = x + (t_next - t) * 0.5 * (v + _velocity(predict, x_euler, t_next))
        else:
            x = x_euler
    return x


def sde(x: torch.Tensor, grid: Sequence[float], predict: Predict,
        generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Euler-Maruyama with w(t) = t over ``grid``, then the denoised last step x0 = x - t v: len(grid) - 1 calls."""
    C, h, w = x.shape[1:]
    for t, t_next in zip(grid[:-2], grid[1:-1]):
        step = t - t_next
        v = _velocity(predict, x, t)
        z = torch.stack([torch.randn((C, h, w), generator=g) for g in generators]).to(x.device)
        x = x - step * ((2.0 - t) * v + x) + math.sqrt(2.0 * t * step) * z
    t_last = grid[-2]
    return x - t_last * _velocity(predict, x, t_last)


# ---------------------------------------------------------------------------------------------------------
#                                               Dispatch
# ---------------------------------------------------------------------------------------------------------

def num_model_calls(settings: SampleConfig) -> int:
    """Model calls (forward passes of the conditional batch) of one run of resolved ``settings``."""
    if settings.sampler == "heun":
        return 2 * settings.steps - 1
    return int(settings.steps)


def solve(settings: SampleConfig, objective, x: torch.Tensor, predict: Predict,
          generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Run the solver of resolved ``settings`` from the initial noise x (N, C, h, w); returns x_0."""
    if objective.kind == "ddpm":
        return solve_ddpm(settings, objective, x, predict, generators)
    grid = flow_grid(settings)
    if settings.sampler == "euler":
        return euler(x, grid, predict)
    if settings.sampler == "heun":
        return heun(x, grid, predict)
    if settings.sampler == "sde":
        return sde(x, grid, predict, generators)
    raise SamplingError(f"sampler {settings.sampler!r} is not a flow sampler")
