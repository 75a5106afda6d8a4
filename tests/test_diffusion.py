"""Tests for dit_moe.diffusion: Gaussian helpers, schedule tables, hybrid loss, respacing, diffusers parity."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch.distributions import Normal, kl_divergence

from dit_moe.diffusion import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    linspace_timesteps,
    mean_flat,
    normal_kl,
)

LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion()


@pytest.fixture(scope="module")
def spaced250():
    return GaussianDiffusion(timesteps=linspace_timesteps(1000, 250))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ddpm_scheduler(float64_tables=False):
    """diffusers' DDPM scheduler configured as DiT samples (ADM "250" respacing, learned range, no clipping)."""
    s = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        variance_type="learned_range", timestep_spacing="linspace", clip_sample=False,
    )
    s.set_timesteps(250)
    if float64_tables:
        s.alphas_cumprod = torch.cumprod(1.0 - s.betas.double(), dim=0)
        s.one = torch.tensor(1.0, dtype=torch.float64)
    return s


def reverse_step(out, index, noise):
    """ADM's reverse step from p_mean_variance's output: x_{t-1} = mean + [index > 0] exp(log_variance / 2) noise
    (the last step, respaced index 0, returns the mean)."""
    return out["mean"] + (index > 0) * torch.exp(0.5 * out["log_variance"]) * noise

# ----------------------------------------------------------------------------- Gaussian helpers

def test_normal_kl_matches_torch_distributions():
    g = _gen(0)
    m1, m2 = torch.randn(500, generator=g, dtype=torch.float64), torch.randn(500, generator=g, dtype=torch.float64)
    lv1, lv2 = 2 * torch.randn(500, generator=g, dtype=torch.float64), 2 * torch.randn(500, generator=g, dtype=torch.float64)
    ref = kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(m2, torch.exp(0.5 * lv2)))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


def test_approx_standard_normal_cdf_error_bound():
    x = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    err = (approx_standard_normal_cdf(x) - Normal(0.0, 1.0).cdf(x)).abs().max()
    assert err < 2e-4


def test_discretized_gaussian_log_likelihood_against_exact_bins():
    levels = torch.arange(256, dtype=torch.float64) / 255 * 2 - 1  # the 8-bit grid in [-1, 1], edges included
    g = _gen(1)
    means = (torch.rand(7, 1, generator=g, dtype=torch.float64) * 2 - 1).expand(7, 256)
    log_scales = torch.tensor([-4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5], dtype=torch.float64)[:, None].expand(7, 256)
    x = levels[None].expand(7, 256)
    logp = discretized_gaussian_log_likelihood(x, means, log_scales)

    dist = Normal(means, torch.exp(log_scales))
    upper = dist.cdf(x + 1 / 255)
    lower = dist.cdf(x - 1 / 255)
    exact = upper - lower
    exact[:, 0] = upper[:, 0]           # the bottom bin reaches -inf
    exact[:, -1] = 1 - lower[:, -1]     # the top bin reaches +inf
    assert torch.allclose(exact.sum(1), torch.ones(7, dtype=torch.float64))
    # Each bin is a difference of two approximate CDF values, each within 2e-4 of the exact one.
    assert (logp.exp() - exact).abs().max() < 4e-4
    likely = exact > 0.05
    assert torch.allclose(logp[likely], exact[likely].log(), atol=1e-2)
    # Edge bins: the telescoping sum of the approximation is exactly one, so edges are handled as open bins.
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-9)


def test_discretized_gaussian_log_likelihood_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        discretized_gaussian_log_likelihood(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))


# ----------------------------------------------------------------------------- forward process and tables

def test_tables_are_float64_and_follow_the_linear_schedule(diffusion):
    assert diffusion.betas.dtype == torch.float64
    torch.testing.assert_close(diffusion.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), rtol=0, atol=2e-9)
    torch.testing.assert_close(diffusion.alphas_cumprod, torch.cumprod(1 - diffusion.betas, 0), rtol=1e-12, atol=0)
    assert diffusion.num_timesteps == 1000 and torch.equal(diffusion.timestep_map, torch.arange(1000))


@pytest.mark.parametrize("step", [0, 10, 500, 999])
def test_q_sample_statistics(diffusion, step):
    x0 = torch.full((4000, 1, 2, 2), 0.7, dtype=torch.float64)
    t = torch.full((4000,), step)
    xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=_gen(step), dtype=torch.float64))
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[step]
    n = xt.numel()
    var = 1 - abar
    assert abs(xt.mean() - abar.sqrt() * 0.7) < 5 * math.sqrt(var / n)
    assert abs(xt.var() / var - 1) < 5 * math.sqrt(2 / n)


def test_tables_cast_to_input_dtype(diffusion):
    t = torch.tensor([3, 900])
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.ones(2, 3, 4, 4, dtype=dtype)
        assert diffusion.q_sample(x, t, x).dtype == dtype


def test_posterior_matches_bayes_rule(diffusion):
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})."""
    g = _gen(2)
    t = torch.tensor([1, 2, 50, 400, 999])
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    beta = diffusion.betas
    abar = torch.cumprod(1 - beta, 0)
    b, a_prev = beta[t].view(-1, 1, 1, 1), abar[t - 1].view(-1, 1, 1, 1)
    precision = (1 - b) / b + 1 / (1 - a_prev)
    mean_ref = ((1 - b).sqrt() / b * xt + a_prev.sqrt() / (1 - a_prev) * x0) / precision
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(var, 1 / precision, rtol=1e-9, atol=0)
    torch.testing.assert_close(log_var, torch.log(1 / precision), rtol=1e-9, atol=1e-9)
    # At t = 0 the posterior collapses onto x_0; its log-variance is clipped to the t = 1 value.
    mean0, var0, log_var0 = diffusion.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    torch.testing.assert_close(mean0, x0[:1])
    assert var0.item() == 0.0 and log_var0.item() == pytest.approx(log_var[0].item())


# ----------------------------------------------------------------------------- objective

def _model_returning(out):
    calls = []

    def model_fn(x_t, t):
        calls.append(t.clone())
        return out

    model_fn.calls = calls
    return model_fn


def test_vb_is_zero_for_the_true_posterior_and_the_exact_kl_otherwise(diffusion):
    g = _gen(3)
    n, c = 6, 3
    t = torch.tensor([1, 5, 100, 300, 700, 999])
    x0 = torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64)

    # eps = true noise recovers x_0 exactly; v = -1 selects the posterior variance: p equals q.
    exact = torch.cat([noise, -torch.ones_like(noise)], 1)
    terms = diffusion.training_losses(_model_returning(exact), x0, t, noise)
    assert terms["vb"].abs().max() < 1e-9 and terms["mse"].abs().max() == 0

    # Any other output: vb is the KL between the two Gaussians, in bits per dimension.
    other = torch.cat([noise + 0.2 * torch.randn(noise.shape, generator=g, dtype=torch.float64),
                       torch.rand(noise.shape, generator=g, dtype=torch.float64) * 2 - 1], 1)
    terms = diffusion.training_losses(_model_returning(other), x0, t, noise)
    xt = diffusion.q_sample(x0, t, noise)
    q_mean, q_var, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    p = diffusion.p_mean_variance(other, xt, t)
    kl = kl_divergence(Normal(q_mean, q_var.sqrt().expand_as(q_mean)), Normal(p["mean"], p["variance"].sqrt()))
    torch.testing.assert_close(terms["vb"], mean_flat(kl) / LOG2, rtol=1e-8, atol=1e-12)
    assert (terms["vb"] > 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    torch.testing.assert_close(terms["mse"], mean_flat((other[:, :c] - noise) ** 2))


def test_vb_at_t0_is_the_discretized_decoder_nll(diffusion):
    g = _gen(4)
    x0 = (torch.randint(0, 256, (2, 3, 4, 4), generator=g) / 255 * 2 - 1).double()
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = torch.cat([noise + 0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64),
                     torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1], 1)
    t = torch.zeros(2, dtype=torch.long)
    terms = diffusion.training_losses(_model_returning(out), x0, t, noise)
    p = diffusion.p_mean_variance(out, diffusion.q_sample(x0, t, noise), t)
    dist = Normal(p["mean"], p["variance"].sqrt())
    prob = dist.cdf(x0 + 1 / 255) - dist.cdf(x0 - 1 / 255)
    prob = torch.where(x0 < -0.999, dist.cdf(x0 + 1 / 255), torch.where(x0 > 0.999, 1 - dist.cdf(x0 - 1 / 255), prob))
    nll_bits = -mean_flat(prob.log()) / LOG2
    torch.testing.assert_close(terms["vb"], nll_bits, rtol=2e-2, atol=0)
    assert (terms["vb"] > 0).all()


def test_learn_sigma_false_is_plain_mse():
    d = GaussianDiffusion(learn_sigma=False)
    g = _gen(5)
    x0, noise = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    out = torch.randn(4, 3, 4, 4, generator=g)
    terms = d.training_losses(_model_returning(out), x0, torch.tensor([0, 1, 500, 999]), noise)
    torch.testing.assert_close(terms["loss"], ((out - noise) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(terms["vb"], torch.zeros(4))
    # Fixed-large reverse variance: beta_t, except the posterior variance at t = 0.
    pm = d.p_mean_variance(out, x0, torch.tensor([0, 1, 500, 999]))
    expected = torch.stack([d.posterior_variance[1], d.betas[1], d.betas[500], d.betas[999]]).float()
    torch.testing.assert_close(pm["variance"][:, 0, 0, 0], expected)
    with pytest.raises(ValueError, match="learn_sigma=False"):
        d.training_losses(_model_returning(torch.zeros(4, 6, 4, 4)), x0, torch.zeros(4, dtype=torch.long), noise)


def test_vb_gradient_reaches_only_the_variance_channels(diffusion):
    g = _gen(6)
    x0, noise = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    out = torch.randn(4, 4, 4, 4, generator=g).requires_grad_(True)
    t = torch.tensor([0, 3, 400, 999])
    diffusion.training_losses(lambda x, s: out, x0, t, noise)["vb"].sum().backward()
    assert torch.equal(out.grad[:, :2], torch.zeros_like(out.grad[:, :2]))
    assert (out.grad[:, 2:].abs().flatten(1).amax(1) > 0).all()
    out.grad = None
    diffusion.training_losses(lambda x, s: out, x0, t, noise)["mse"].sum().backward()
    assert torch.equal(out.grad[:, 2:], torch.zeros_like(out.grad[:, 2:]))
    assert (out.grad[:, :2].abs() > 0).any()


def test_training_losses_rejects_wrong_channel_count(diffusion):
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="6 channels"):
        diffusion.training_losses(_model_returning(torch.zeros(2, 3, 4, 4)), x0, torch.zeros(2, dtype=torch.long))


def test_sample_timesteps_uniform_and_seeded(diffusion):
    a = diffusion.sample_timesteps(20000, "cpu", generator=_gen(7))
    b = diffusion.sample_timesteps(20000, "cpu", generator=_gen(7))
    assert torch.equal(a, b) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() <= 999
    counts = torch.bincount(a // 100, minlength=10).float()
    assert (counts / 2000 - 1).abs().max() < 0.1


# ----------------------------------------------------------------------------- respacing

def test_linspace_timesteps_match_diffusers_and_adm_spacing():
    for n in (1000, 500, 250, 100, 50, 27, 25, 10, 2):
        s = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
        s.set_timesteps(n)
        steps = linspace_timesteps(1000, n)
        assert steps == s.timesteps.flip(0).tolist()
        # ADM space_timesteps(1000, str(n)) rounds an accumulated fractional stride (T - 1) / (n - 1). At
        # exact .5 ties (n = 21, 23, 27, ...) float error may round it the other way; not at these counts.
        if n != 27:
            stride, position, adm = 999 / (n - 1), 0.0, []
            for _ in range(n):
                adm.append(round(position))
                position += stride
            assert steps == adm
    assert linspace_timesteps(1000, 250)[:3] == [0, 4, 8] and linspace_timesteps(1000, 250)[-2:] == [995, 999]
    with pytest.raises(ValueError, match="num_steps=0"):
        linspace_timesteps(1000, 0)


def test_respacing_with_all_timesteps_is_the_identity(diffusion):
    full = GaussianDiffusion(timesteps=range(1000))
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        torch.testing.assert_close(getattr(full, name), getattr(diffusion, name), rtol=1e-12, atol=1e-15)


def test_respaced_betas_reproduce_the_original_alphas_cumprod(diffusion, spaced250):
    assert spaced250.num_timesteps == 250
    torch.testing.assert_close(torch.cumprod(1 - spaced250.betas, 0),
                               diffusion.alphas_cumprod[spaced250.timestep_map], rtol=1e-12, atol=0)
    assert spaced250.betas[0] == pytest.approx(diffusion.betas[0].item(), rel=1e-12)
    # The network always sees the original timesteps.
    out = torch.zeros(3, 4, 2, 2)
    model_fn = _model_returning(out)
    spaced250.training_losses(model_fn, torch.zeros(3, 2, 2, 2), torch.tensor([0, 1, 249]))
    assert model_fn.calls[0].tolist() == [0, 4, 999]


@pytest.mark.parametrize("timesteps, match", [([5], "at least 2"), ([3, 3, 7], "strictly increasing"),
                                              ([0, 1000], r"\[0, 1000\)")])
def test_respacing_rejects_bad_timesteps(timesteps, match):
    with pytest.raises(ValueError, match=match):
        GaussianDiffusion(timesteps=timesteps)


# ----------------------------------------------------------------------------- diffusers parity

PARITY_STEPS = [0, 1, 100, 200, 247, 248, 249]  # positions in the diffusers timestep list (999 ... 0)


@pytest.mark.parametrize("float64_tables, tol", [(False, 1e-4), (True, 2e-6)])
def test_diffusers_ddpm_step_matches_adm_reference_step(spaced250, float64_tables, tol):
    """diffusers' DDPMScheduler step == our ADM-style respaced step, with the same variance noise.

    The stock scheduler keeps alphas_cumprod in float32, so 1 - abar loses digits near t = 0 (up to 7e-5
    relative in the std at t = 4); with its tables in float64 the two steps agree to float32 rounding.
    """
    scheduler = _ddpm_scheduler(float64_tables)
    assert scheduler.timesteps.flip(0).tolist() == spaced250.timestep_map.tolist()
    g = _gen(8)
    n, c = 2, 4
    for position in PARITY_STEPS:
        timestep = int(scheduler.timesteps[position])
        index = spaced250.num_timesteps - 1 - position
        x0, noise = torch.randn(n, c, 8, 8, generator=g), torch.randn(n, c, 8, 8, generator=g)
        xt = spaced250.q_sample(x0, torch.full((n,), index), noise)
        model_output = torch.cat([noise + 0.3 * torch.randn(n, c, 8, 8, generator=g),
                                  torch.rand(n, c, 8, 8, generator=g) * 2 - 1], 1)
        # diffusers draws its variance noise as torch.randn(sample shape, generator=...) on the CPU.
        ref = scheduler.step(model_output, timestep, xt, generator=_gen(100 + position))
        variance_noise = torch.randn(n, c, 8, 8, generator=_gen(100 + position))
        out = spaced250.p_mean_variance(model_output, xt, index)
        ours, pred_xstart = reverse_step(out, index, variance_noise), out["pred_xstart"]
        torch.testing.assert_close(ours, ref.prev_sample, rtol=0, atol=tol, msg=f"x_prev at t={timestep}")
        # x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) cancels digits at large t: compare on its own scale.
        torch.testing.assert_close(pred_xstart, ref.pred_original_sample, rtol=1e-5,
                                   atol=1e-6 * pred_xstart.abs().max().item(), msg=f"pred_xstart at t={timestep}")


def test_full_250_step_chain_matches_diffusers(spaced250):
    """A whole DDPM-250 chain with an analytic denoiser (data ~ N(0, 0.5^2)) lands on the same samples."""
    base_abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)

    def model(x, timestep):
        abar = base_abar[timestep].item()
        eps = math.sqrt(1 - abar) * x / (abar * 0.25 + 1 - abar)  # posterior mean of eps given x_t
        return torch.cat([eps, 0.5 * torch.tanh(x)], 1)

    scheduler = _ddpm_scheduler()
    x = torch.randn(4, 4, 8, 8, generator=_gen(9))
    a, b, ga, gb = x.clone(), x.clone(), _gen(10), _gen(10)
    for position, timestep in enumerate(scheduler.timesteps.tolist()):
        a = scheduler.step(model(a, timestep), timestep, a, generator=ga).prev_sample
        noise = torch.randn(b.shape, generator=gb) if timestep > 0 else torch.zeros_like(b)
        index = spaced250.num_timesteps - 1 - position
        b = reverse_step(spaced250.p_mean_variance(model(b, timestep), b, index), index, noise)
    assert abs(b.std().item() - 0.5) < 0.05
    assert (a - b).abs().max() < 1e-4
