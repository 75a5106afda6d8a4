"""Gaussian diffusion (objective ``ddpm``): the DiT training objective and the ADM reference sampling step.

The recipe is DiT's (itself improved-DDPM's "hybrid" objective):

* forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), linear betas 1e-4..0.02, T = 1000;
* the model predicts epsilon (first C output channels) and, with ``learn_sigma``, a value v in [-1, 1] per
  element (last C channels) that interpolates the log-variance of p(x_{t-1} | x_t) between log(posterior
  variance) and log(beta_t) ("learned_range");
* loss = MSE(eps) + L_vb, where L_vb is the variational-bound term of that step in bits per dimension,
  computed with the predicted mean *detached* so it only trains the variance. DiT uses it un-rescaled
  (ADM's LossType.MSE), so L_vb is not multiplied by T / 1000.

The schedule comes from a diffusers ``DDPMScheduler`` (so training and a diffusers-based sampler share
one definition of the betas); the derived tables are held in float64 and cast to the input dtype when
gathered, as ADM does with numpy float64.

Respacing (ADM's ``SpacedDiffusion``): given a subset t_0 < t_1 < ... of the training timesteps, the
respaced process has betas 1 - abar[t_i] / abar[t_{i-1}], so its cumulative products are exactly abar[t_i].
All methods of ``GaussianDiffusion`` take *respaced indices* t in [0, num_timesteps); the network is
always called with the *original* timestep ``timestep_map[t]``.
"""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DDPMObjective",
    "mean_flat",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "linspace_timesteps",
    "GaussianDiffusion",
]


#################################################################################
#                         Elementwise Gaussian Helpers                          #
#################################################################################

def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) in nats (arguments broadcast)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Standard normal CDF via the tanh approximation (max abs error 1.8e-4), the one ADM's decoder uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability of the 8-bit bin containing x under N(means, exp(log_scales)^2), elementwise.

    x lies in [-1, 1] on the grid of 256 levels, so each bin has half-width 1/255. The two outer bins
    extend to infinity, which makes the 256 bin probabilities sum to one.
    x, means, log_scales: broadcastable tensors, e.g. (N, C, H, W). Returns natural-log probabilities.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"discretized_gaussian_log_likelihood: shapes differ: x {tuple(x.shape)}, "
            f"means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    half_bin = 1.0 / 255.0
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    # The clamps keep log() finite where the approximate CDF saturates; they only bite far in the tails.
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    # Thresholds at +-0.999 pick the edge bins robustly to float error in x.
    return torch.where(
        x < -0.999,
        log_cdf_upper,
        torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin),
    )


#################################################################################
#                                Timestep Spacing                               #
#################################################################################

def linspace_timesteps(num_train_timesteps: int, num_steps: int) -> List[int]:
    """The `num_steps` sampling timesteps, ascending, evenly spread over [0, num_train_timesteps - 1].

    This is diffusers' ``timestep_spacing="linspace"`` (its ``scheduler.timesteps`` is this list reversed)
    and also ADM's ``space_timesteps(T, str(num_steps))``, which DiT samples with (e.g. "250" -> 0, 4, 8,
    ..., 995, 999). Both the first and the last training timestep are always included.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"linspace_timesteps: num_steps={num_steps} must be in [1, num_train_timesteps={num_train_timesteps}]"
        )
    steps = np.linspace(0, num_train_timesteps - 1, num_steps).round().astype(np.int64)
    return [int(s) for s in steps]


#################################################################################
#                               Gaussian Diffusion                              #
#################################################################################

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class GaussianDiffusion:
    """Noise schedule, epsilon/learned-range parameterisation, hybrid loss, and one reverse step.

    num_timesteps: length T of the training process (the diffusers scheduler's ``num_train_timesteps``).
    timesteps: optional ascending subset of range(T) to respace to (see module docstring); after
        construction ``self.num_timesteps`` is the respaced length and ``self.timestep_map`` (K,) maps a
        respaced index to the original timestep the network is conditioned on.
    learn_sigma: model output has 2C channels (eps, v) and the loss adds L_vb; otherwise C channels, the
        reverse variance is fixed to ADM's "fixed_large" (beta_t, with the posterior variance at t=0), as
        DiT uses for learn_sigma=False, and the loss is the plain epsilon MSE.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        learn_sigma: bool = True,
        timesteps: Optional[Sequence[int]] = None,
    ):
        if beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"GaussianDiffusion: beta_schedule={beta_schedule!r} not in {_BETA_SCHEDULES}")
        if num_timesteps < 2:
            raise ValueError(f"GaussianDiffusion: num_timesteps={num_timesteps} must be >= 2")
        from diffusers import DDPMScheduler  # not at the top: diffusers takes seconds to import; flow never needs it

        scheduler = DDPMScheduler(
            num_train_timesteps=num_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
        )
        self.num_train_timesteps = num_timesteps
        self.learn_sigma = learn_sigma
        self.schedule_config = dict(
            num_train_timesteps=num_timesteps, beta_schedule=beta_schedule,
            beta_start=beta_start, beta_end=beta_end,
        )
        # diffusers builds its betas in float32 and accumulates their product in float32 (relative error
        # ~4e-7 at t=999); we take its betas and redo the product in float64, as ADM does.
        base_betas = scheduler.betas.to(torch.float64)
        base_alphas_cumprod = torch.cumprod(1.0 - base_betas, dim=0)

        if timesteps is None:
            timestep_map = torch.arange(num_timesteps, dtype=torch.long)
        else:
            timestep_map = torch.as_tensor(list(timesteps), dtype=torch.long)
            if timestep_map.ndim != 1 or timestep_map.numel() < 2:
                raise ValueError(f"GaussianDiffusion: timesteps must list at least 2 timesteps, got {list(timesteps)}")
            if (timestep_map[1:] <= timestep_map[:-1]).any():
                raise ValueError("GaussianDiffusion: timesteps must be strictly increasing")
            if timestep_map[0] < 0 or timestep_map[-1] >= num_timesteps:
                raise ValueError(
                    f"GaussianDiffusion: timesteps must lie in [0, {num_timesteps}), got "
                    f"{int(timestep_map[0])}..{int(timestep_map[-1])}"
                )
        self.timestep_map = timestep_map
        self.num_timesteps = int(timestep_map.numel())

        # ---- float64 tables over the (possibly respaced) process, indexed by respaced t ----
        alphas_cumprod = base_alphas_cumprod[timestep_map]
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / alphas_cumprod_prev
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev

        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # posterior_variance[0] is 0 when timestep 0 is in the chain; ADM replaces its log by the next
        # entry's so the learned-range interpolation and the t=0 decoder stay finite.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)
        self.log_betas = torch.log(betas)
        # "fixed_large" reverse variance: beta_t, but the posterior variance at t=0 (beta_0 would be too
        # large for the decoder step).
        self.fixed_large_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))

        self._device_tables: Dict[Tuple[torch.device, str], Tensor] = {}

    # ------------------------------------------------------------------ helpers

    def _gather(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """Table `name` at respaced indices t (N,), as x.dtype, shaped (N, 1, ..., 1) to broadcast over x."""
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"GaussianDiffusion: t must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, "
                f"got {tuple(t.shape)}"
            )
        key = (t.device, name)
        table = self._device_tables.get(key)
        if table is None:
            # MPS has no float64; everywhere else the gather happens in float64 before the final cast.
            dtype = torch.float32 if t.device.type == "mps" else torch.float64
            table = getattr(self, name).to(device=t.device, dtype=dtype)
            self._device_tables[key] = table
        return table[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def _as_timesteps(self, t, x: Tensor) -> Tensor:
        """Accept an int, a 0-d or a (N,) tensor of respaced indices; return a (N,) long tensor on x.device."""
        if not isinstance(t, Tensor):
            return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        t = t.to(device=x.device, dtype=torch.long)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def original_timesteps(self, t: Tensor) -> Tensor:
        """Respaced indices (N,) -> the training timesteps (N,) the network is conditioned on."""
        return self.timestep_map.to(t.device)[t]

    def sample_timesteps(self, n: int, device, generator: Optional[torch.Generator] = None) -> Tensor:
        """n timesteps drawn uniformly from [0, num_timesteps) (ADM's UniformSampler), (n,) long."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given noise. x0, noise: (N, C, H, W); t: (N,)."""
        if noise.shape != x0.shape:
            raise ValueError(f"q_sample: noise {tuple(noise.shape)} does not match x0 {tuple(x0.shape)}")
        return (
            self._gather("sqrt_alphas_cumprod", t, x0) * x0
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Mean (N, C, H, W), variance and clipped log-variance (N, 1, 1, 1) of q(x_{t-1} | x_t, x_0)."""
        mean = self._gather("posterior_mean_coef1", t, x_t) * x0 + self._gather("posterior_mean_coef2", t, x_t) * x_t
        variance = self._gather("posterior_variance", t, x_t)
        log_variance_clipped = self._gather("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance_clipped

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t, clip_denoised: bool = False) -> Dict[str, Tensor]:
        """Parameters of p(x_{t-1} | x_t) from a network output.

        model_output: (N, 2C, H, W) = (eps, v) with learn_sigma, else (N, C, H, W) = eps.
        x_t: (N, C, H, W); t: respaced indices (N,) or an int.
        Returns mean, variance, log_variance (all (N, C, H, W)) and pred_xstart (N, C, H, W).
        """
        t = self._as_timesteps(t, x_t)
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.ndim != x_t.ndim or model_output.shape[1] != expected or model_output.shape[2:] != x_t.shape[2:]:
            raise ValueError(
                f"p_mean_variance: model_output {tuple(model_output.shape)} should have {expected} channels "
                f"(learn_sigma={self.learn_sigma}) and the spatial shape of x_t {tuple(x_t.shape)}"
            )
        if self.learn_sigma:
            eps, v = model_output.split(channels, dim=1)
            min_log = self._gather("posterior_log_variance_clipped", t, x_t)
            max_log = self._gather("log_betas", t, x_t)
            frac = (v + 1.0) / 2.0  # v = -1 -> posterior variance, v = +1 -> beta_t
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            eps = model_output
            log_variance = self._gather("fixed_large_log_variance", t, x_t).expand_as(x_t)
        pred_xstart = (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return dict(mean=mean, variance=torch.exp(log_variance), log_variance=log_variance, pred_xstart=pred_xstart)

    # ------------------------------------------------------------------ objective

    def vb_terms_bpd(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Variational-bound term L_{t} of each sample in bits per dimension, (N,).

        t > 0: KL( q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t) ); t = 0: -log p(x_0 | x_1) under the
        discretized Gaussian decoder (x0 read as 8-bit data in [-1, 1], as DiT does even on latents).
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
        ) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model_fn: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        t: Tensor,
        noise: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """DiT's per-sample loss terms, each (N,): loss = mse + vb.

        model_fn(x_t, timesteps) -> model output; called with the original (un-respaced) timesteps.
        x0: (N, C, H, W) clean latents; t: respaced indices (N,); noise: (N, C, H, W), drawn if None.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        model_output = model_fn(x_t, self.original_timesteps(t))
        # The loss math (exp/log of variances) runs in at least fp32 even if the network ran in bf16.
        compute_dtype = torch.promote_types(x0.dtype, torch.float32)
        model_output = model_output.to(compute_dtype)
        x0_c, x_t_c, noise_c = x0.to(compute_dtype), x_t.to(compute_dtype), noise.to(compute_dtype)
        channels = x0.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"training_losses: learn_sigma model output {tuple(model_output.shape)} must have "
                    f"{2 * channels} channels for x0 {tuple(x0.shape)}"
                )
            eps, v = model_output.split(channels, dim=1)
            # Detach the mean: L_vb trains only the variance, the MSE alone trains epsilon.
            frozen = torch.cat([eps.detach(), v], dim=1)
            vb = self.vb_terms_bpd(frozen, x0_c, x_t_c, t)
        else:
            if model_output.shape != x0.shape:
                raise ValueError(
                    f"training_losses: model output {tuple(model_output.shape)} must match x0 {tuple(x0.shape)} "
                    "when learn_sigma=False"
                )
            eps = model_output
            vb = torch.zeros(x0.shape[0], dtype=compute_dtype, device=x0.device)
        mse = mean_flat((noise_c - eps) ** 2)
        return dict(loss=mse + vb, mse=mse, vb=vb)


#################################################################################
#                        The Objective interface for DDPM                       #
#################################################################################

class DDPMObjective:
    """``diffusion.objective=ddpm`` behind the interface of dit_moe/diffusion/__init__.py.

    The network is conditioned on the integer training timestep (0 .. T-1, T = 1000, 999 = pure noise). Its noise
    level on the common scale is t = sigma / (1 + sigma), sigma = sqrt((1 - abar) / abar): the time of the linear
    (flow) path with the same signal-to-noise ratio.
    """

    kind = "ddpm"

    def __init__(self, learn_sigma: bool = True):
        self.diffusion = GaussianDiffusion(learn_sigma=learn_sigma)
        self.learn_sigma = learn_sigma
        self.num_train_timesteps = self.diffusion.num_train_timesteps
        abar = self.diffusion.alphas_cumprod                     # float64, un-respaced
        sigma = ((1.0 - abar) / abar).sqrt()
        self._levels = sigma / (1.0 + sigma)                     # (T,) float64, increasing with the timestep

    def training_losses(self, model_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor) -> Dict[str, Tensor]:
        """DiT's hybrid loss of x0 (N, C, H, W): {loss, mse, vb}, each (N,).

        Draws from torch's global RNG in the order the trainer always has: timesteps (randint), then noise
        (randn_like), then whatever model_fn draws (label dropout) -- so old runs keep their numerics.
        """
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device)
        return self.diffusion.training_losses(model_fn, x0, t)

    def draw(self, x0: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """A noisy training input of x0 (N, C, H, W): (x_t, network timesteps (N,) long, noise); timesteps first."""
        T, n = self.diffusion.num_timesteps, x0.shape[0]
        if generator is None:
            t = torch.randint(0, T, (n,), device=x0.device)
            noise = torch.randn_like(x0)
        else:  # a CPU generator: draw on the CPU, then move (the same numbers on every device)
            t = torch.randint(0, T, (n,), generator=generator).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        return self.diffusion.q_sample(x0, t, noise), t, noise

    def noise_level(self, timesteps) -> Tensor:
        """Network timesteps (N,) (or a number) -> noise level t in [0, 1] (float64), see the class docstring."""
        idx = torch.as_tensor(timesteps).round().long().clamp(0, self.num_train_timesteps - 1)
        return self._levels[idx]

    def describe(self) -> str:
        loss = " + learned variance (hybrid loss mse + vb)" if self.learn_sigma else " (mse)"
        return f"objective ddpm: epsilon prediction{loss}, linear betas 1e-4..0.02, T = {self.num_train_timesteps}"
