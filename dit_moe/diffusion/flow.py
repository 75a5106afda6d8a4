"""Rectified flow (objective ``flow``): the linear interpolant between data and noise, velocity prediction.

Time convention (the one of dit_moe/diffusion/__init__.py): t = 0 is data, t = 1 is pure noise,

    x_t = (1 - t) x0 + t eps,        eps ~ N(0, I),
    v   = d x_t / d t = eps - x0     (the regression target; loss = mean squared error on it).

The minimiser of the loss is the conditional expectation v*(x, t) = E[eps - x0 | x_t = x], whose ODE
dx/dt = v*(x, t), integrated from t = 1 (noise) to t = 0, transports N(0, I) to the data distribution (SiT's
"Linear" path with velocity prediction; SD3, DiT-MoE, DiffMoE and ProMoE train this). Two quantities the samplers
use follow from v and x_t alone:

    E[x0  | x_t] = x_t - t v,        E[eps | x_t] = x_t + (1 - t) v.

Training times t: ``uniform`` on [0, 1] or ``logit_normal`` (sigmoid of N(t_mean, t_std^2), SD3 / ProMoE), then the
resolution shift t' = s t / (1 + (s - 1) t) (SD3, LightningDiT; s > 1 spends more time at high noise, s = 1 is none).
The network sees t * 1000 (``TIMESTEP_SCALE``), the range DiT's sinusoidal timestep embedding sees under DDPM and the
value diffusers' FlowMatch schedulers pass as ``timestep``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .ddpm import mean_flat

__all__ = ["TIMESTEP_SCALE", "shift_time", "time_grid", "RectifiedFlow"]

TIMESTEP_SCALE = 1000.0
T_SAMPLING = ("uniform", "logit_normal")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t' = s t / (1 + (s - 1) t): keeps 0 and 1, moves every inner time towards noise for s > 1."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def time_grid(steps: int, shift: float = 1.0) -> Tensor:
    """The sampling grid: steps + 1 times from 1 (noise) down to 0 (data), evenly spaced then shifted; float64."""
    if steps < 1:
        raise ValueError(f"time_grid: steps={steps} must be >= 1")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


class RectifiedFlow:
    """The flow objective: training losses, noisy inputs, and the time <-> network-timestep map.

    t_sampling: ``uniform`` | ``logit_normal`` (with t_mean, t_std); time_shift: s of ``shift_time`` (1 = none).
    """

    kind = "flow"
    learn_sigma = False

    def __init__(self, t_sampling: str = "uniform", t_mean: float = 0.0, t_std: float = 1.0, time_shift: float = 1.0):
        if t_sampling not in T_SAMPLING:
            raise ValueError(f"RectifiedFlow: t_sampling={t_sampling!r} is not one of {T_SAMPLING}")
        if not t_std > 0 or not time_shift > 0:
            raise ValueError(f"RectifiedFlow: t_std={t_std} and time_shift={time_shift} must be > 0")
        self.t_sampling, self.t_mean, self.t_std = t_sampling, float(t_mean), float(t_std)
        self.time_shift = float(time_shift)

    # ------------------------------------------------------------------ time

    def sample_t(self, n: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """n training times in [0, 1], float32 (n,), from torch's global RNG (or a CPU ``generator``)."""
        if self.t_sampling == "uniform":
            u = torch.rand(n, generator=generator) if generator is not None else torch.rand(n, device=device)
        else:
            z = torch.randn(n, generator=generator) if generator is not None else torch.randn(n, device=device)
            u = torch.sigmoid(self.t_mean + self.t_std * z)
        return shift_time(u, self.time_shift).to(device)

    @staticmethod
    def model_timesteps(t: Tensor) -> Tensor:
        """Flow time t (N,) -> what the network is conditioned on: t * 1000, float32."""
        return (t * TIMESTEP_SCALE).to(torch.float32)

    @staticmethod
    def noise_level(timesteps) -> Tensor:
        """Network timesteps -> noise level on the common scale, which for flow is the time itself (float64)."""
        return torch.as_tensor(timesteps, dtype=torch.float64) / TIMESTEP_SCALE

    # ------------------------------------------------------------------ path

    @staticmethod
    def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t) x0 + t eps. x0, noise: (N, C, H, W); t: (N,)."""
        if noise.shape != x0.shape:
            raise ValueError(f"interpolate: noise {tuple(noise.shape)} does not match x0 {tuple(x0.shape)}")
        t = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - t) * x0 + t * noise

    def draw(self, x0: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """A noisy training input of x0 (N, C, H, W): (x_t, network timesteps (N,), noise); times first, then noise."""
        t = self.sample_t(x0.shape[0], x0.device, generator)
        if generator is None:
            noise = torch.randn_like(x0)
        else:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        return self.interpolate(x0, noise, t), self.model_timesteps(t), noise

    # ------------------------------------------------------------------ objective

    def training_losses(self, model_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor) -> Dict[str, Tensor]:
        """Per-sample terms (N,): ``loss`` = ``mse`` = mean over elements of (v_pred - (eps - x0))^2.

        model_fn(x_t, t * 1000) -> v_pred with x0's shape. ``mse`` carries the same value under the key DDPM uses
        for its regression term, so logs and tables read one key for both objectives. Draws come from torch's
        global RNG: times first, then noise (then whatever model_fn draws, e.g. label dropout).
        """
        x_t, timesteps, noise = self.draw(x0)
        out = model_fn(x_t, timesteps)
        if out.shape != x0.shape:
            raise ValueError(f"flow training_losses: model output {tuple(out.shape)} must match x0 {tuple(x0.shape)} "
                             "(a flow model predicts a velocity: C output channels, model.learn_sigma=false)")
        # The loss runs in at least fp32 even if the network ran in bf16.
        compute_dtype = torch.promote_types(x0.dtype, torch.float32)
        target = noise.to(compute_dtype) - x0.to(compute_dtype)
        mse = mean_flat((out.to(compute_dtype) - target) ** 2)
        return dict(loss=mse, mse=mse)

    def describe(self) -> str:
        t = "uniform t" if self.t_sampling == "uniform" else f"logit-normal t (mean {self.t_mean}, std {self.t_std})"
        shift = f", time shift {self.time_shift}" if self.time_shift != 1.0 else ""
        return f"objective flow: rectified flow, velocity MSE, {t}{shift}; network timestep = 1000 t"
