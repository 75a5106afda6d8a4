"""Training objectives behind one interface: ``ddpm`` (DiT's hybrid loss) and ``flow`` (rectified flow).

Time convention -- the one place it is defined; every module of dit_moe uses it:

* **t in [0, 1] is the noise level; t = 0 is data, t = 1 is pure noise.** Sampling runs from t = 1 down to 0.
* ``flow``: t is the time of the linear path x_t = (1 - t) x0 + t eps (velocity target v = eps - x0).
* ``ddpm``: the network is trained on integer timesteps k = 0 .. 999 (999 = most noise) of
  x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps. Its noise level is the time of the linear path with the same
  signal-to-noise ratio: t = sigma / (1 + sigma), sigma = sqrt((1 - abar_k) / abar_k) (EDM's sigma; for flow
  sigma = t / (1 - t), so the same formula holds for both). k = 0 is t = 0.01, k = 999 is t = 0.994.
* What the **network** is conditioned on: ddpm the integer k, flow 1000 t (a float), so DiT's sinusoidal timestep
  embedding sees the range 0 .. 1000 under both objectives (diffusers' FlowMatch schedulers pass the same value).

Guidance intervals (``sample.guidance_interval``, ``--guidance-interval LO HI``) are expressed on this scale of t
(activated-expert buckets use the network timestep, 0 .. 1000 under both objectives). Why t and
not k or sigma: t is bounded and means the same amount of noise for both objectives, and the interval values REPA
and LightningDiT publish for flow models (e.g. guidance for t <= 0.7) carry over unchanged; an interval in EDM's
sigma (Kynkaanniemi et al.) converts by t = sigma / (1 + sigma).

The interface (SiT's ``transport`` style: built once from the config by ``build_objective``, then plain calls)::

    objective.kind                                   "ddpm" | "flow"
    objective.learn_sigma                            the model's output has 2C channels (ddpm only)
    objective.training_losses(model_fn, x0) -> {"loss": (N,), ...}
        model_fn(x_t, network_timesteps) -> model output. "loss" is what is optimised; the other keys are logged
        (ddpm: mse, vb; flow: mse = the velocity MSE). Timesteps and noise are drawn inside from torch's global
        RNG (the trainer's stream: a resume restores it), timesteps first, then noise.
    objective.draw(x0, generator=None) -> (x_t, network_timesteps, noise)      a noisy training input
    objective.noise_level(network_timesteps) -> t in [0, 1] (float64)
    objective.describe() -> str                      one line for the trainer's start-up log
"""
from __future__ import annotations

from typing import Union

from ..config import ConfigError, DiffusionConfig, ExperimentConfig, objective_problem
from .ddpm import (DDPMObjective, GaussianDiffusion, approx_standard_normal_cdf, discretized_gaussian_log_likelihood,
                   linspace_timesteps, mean_flat, normal_kl)
from .flow import TIMESTEP_SCALE, RectifiedFlow, shift_time, time_grid

__all__ = [
    "Objective",
    "build_objective",
    "DDPMObjective",
    "RectifiedFlow",
    "GaussianDiffusion",
    "TIMESTEP_SCALE",
    "shift_time",
    "time_grid",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "linspace_timesteps",
    "mean_flat",
    "normal_kl",
]

Objective = Union[DDPMObjective, RectifiedFlow]


def build_objective(cfg: ExperimentConfig | DiffusionConfig, learn_sigma: bool) -> Objective:
    """The objective of an experiment (its ``diffusion`` section) for a model with/without learned sigma.

    Raises ConfigError for diffusion.objective=flow with model.learn_sigma=true (``config.objective_problem``).
    """
    d = cfg if isinstance(cfg, DiffusionConfig) else cfg.diffusion
    problem = objective_problem(d.objective, learn_sigma)
    if problem:
        raise ConfigError(problem)
    if d.objective == "ddpm":
        return DDPMObjective(learn_sigma=learn_sigma)
    if d.objective == "flow":
        return RectifiedFlow(t_sampling=d.t_sampling, t_mean=d.t_mean, t_std=d.t_std, time_shift=d.time_shift)
    raise ConfigError(f"diffusion.objective: {d.objective!r} is not one of ('ddpm', 'flow')")
