"""Sampling: schedulers and the DDIM clip pitfall, guidance on an exact synthetic model, ADM loop parity, seeds,
grids, resumable multi-process bulk sampling with its npz, DTop-p threshold calibration, and CLI errors."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from dit_moe import sampling
from dit_moe.config import ExperimentConfig, RoutingConfig, SampleConfig
from dit_moe.data import DataInfo, load_decoder
from dit_moe.diffusion import GaussianDiffusion, linspace_timesteps
from dit_moe.registry import build_model
from dit_moe.weights.checkpoint import save_checkpoint
from dit_moe.sampling import (
    DDPM_SAMPLERS as SAMPLERS, SamplingError, calibrate_threshold, main, make_generators, make_labels,
    make_scheduler, read_samples, sample_latents, sample_to_folder, scheduler_step_kwargs,
)

SHAPE = (1, 8, 8)


# ---------------------------------------------------------------------------------------------------------
#                         An exact "model": class-conditional Gaussians and their mixture
# ---------------------------------------------------------------------------------------------------------

class GaussianClasses(torch.nn.Module):
    """The exact denoiser of data x0 ~ N(mu_y, s^2 I) per class y; the null class is the uniform mixture.

    For x_t = sqrt(a) x0 + sqrt(1 - a) eps: E[eps | x_t, k] = sqrt(1 - a) (x_t - sqrt(a) mu_k) / (a s^2 + 1 - a), and
    the mixture's eps averages those with the posterior class weights. With learn_sigma the variance output is a
    fixed v in [-1, 1], so the learned-range path runs with a non-trivial variance.
    """

    def __init__(self, means, s, learn_sigma=True, v=0.3):
        super().__init__()
        self.register_buffer("means", means.double())                      # (K, C, H, W)
        self.register_buffer("abar", make_scheduler(SampleConfig("ddpm", 10)).alphas_cumprod.double())
        self.s, self.v = s, v
        self.num_classes, self.in_channels = means.shape[0], means.shape[1]
        self.learn_sigma = learn_sigma
        self.anchor = torch.nn.Parameter(torch.zeros(()))                   # gives the sampler a device

    def forward(self, x, t, y):
        x = x.double()
        a = self.abar[t].view(-1, 1, 1, 1, 1)
        var = a * self.s ** 2 + 1 - a
        diff = x.unsqueeze(1) - a.sqrt() * self.means.unsqueeze(0)           # (N, K, C, H, W)
        eps_k = (1 - a).sqrt() * diff / var
        log_w = -(diff ** 2).flatten(2).sum(-1) / (2 * var.view(-1, 1))
        onehot = torch.nn.functional.one_hot(y.clamp(max=self.num_classes - 1), self.num_classes).double()
        w = torch.where((y == self.num_classes)[:, None], log_w.softmax(1), onehot)
        eps = (w[..., None, None, None] * eps_k).sum(1).float()
        return torch.cat([eps, torch.full_like(eps, self.v)], 1) if self.learn_sigma else eps

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=None):
        cond = self.forward(x, t, y)
        if cfg_scale == 1.0:
            return cond
        uncond = self.forward(x, t, torch.full_like(y, self.num_classes))
        C = self.in_channels
        return torch.cat([uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C]), cond[:, C:]], 1)

    def accuracy(self, x, y):
        """Fraction of samples nearest to their own class mean (a perfect classifier for this data)."""
        d = ((x.double().unsqueeze(1) - self.means.unsqueeze(0)) ** 2).flatten(2).sum(-1)
        return (d.argmin(1) == y).double().mean().item()


def gaussian_classes(mean_value, s, learn_sigma=True):
    g = torch.Generator().manual_seed(0)
    means = (torch.randint(0, 2, (4, 1, 4, 4), generator=g).float() * 2 - 1) * mean_value
    return GaussianClasses(means, s, learn_sigma)


def draw(model, settings, n=64, seed=0):
    y = torch.arange(n) % model.num_classes
    return sample_latents(model, y, make_generators(seed, range(n)), settings, (1, 4, 4)), y


# ---------------------------------------------------------------------------------------------------------
#                                        Schedulers and guidance
# ---------------------------------------------------------------------------------------------------------

def test_scheduler_configs():
    ddpm = make_scheduler(SampleConfig("ddpm", 250))
    c = ddpm.config
    assert (c.num_train_timesteps, c.beta_schedule, c.beta_start, c.beta_end) == (1000, "linear", 1e-4, 0.02)
    assert c.variance_type == "learned_range" and c.timestep_spacing == "linspace" and c.clip_sample is False
    # 250 steps land on ADM's space_timesteps(1000, "250"), DiT's sampling chain.
    assert ddpm.timesteps.tolist() == linspace_timesteps(1000, 250)[::-1]
    assert make_scheduler(SampleConfig("ddpm", 10), learn_sigma=False).config.variance_type == "fixed_large"

    ddim = make_scheduler(SampleConfig("ddim", 50))
    assert ddim.config.clip_sample is False and ddim.timesteps[0] == 999
    assert make_scheduler(SampleConfig("ddim", 50, clip_denoised=True)).config.clip_sample is True
    # The pitfall guard: DDIM always re-derives eps from the (possibly clipped) x0.
    assert scheduler_step_kwargs(SampleConfig("ddim", 50, clip_denoised=True))["use_clipped_model_output"] is True
    assert scheduler_step_kwargs(SampleConfig("ddim", 50))["eta"] == 0.0

    dpm = make_scheduler(SampleConfig("dpm", 20))
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.thresholding is False
    assert len(dpm.timesteps) == 20
    with pytest.raises(SamplingError, match="sampler 'euler'"):
        make_scheduler(SampleConfig("euler", 20))
    with pytest.raises(SamplingError, match="steps=0"):
        make_scheduler(SampleConfig("ddim", 0))


def test_ddim_clip_pitfall_guard(monkeypatch):
    """Guided DDIM with clipping recognises its class; diffusers' default step kwargs would invert the samples."""
    model = gaussian_classes(0.9, 0.3)
    settings = SampleConfig("ddim", 25, cfg_scale=3.0, clip_denoised=True)
    x, y = draw(model, settings)
    assert model.accuracy(x, y) > 0.95
    # Negative control: the same run with use_clipped_model_output left at its default (False).
    monkeypatch.setattr(sampling.solvers, "scheduler_step_kwargs", lambda s: {"eta": 0.0})
    bad, _ = draw(model, settings)
    assert model.accuracy(bad, y) < 0.5


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("clip", [False, True])
def test_guidance_makes_samples_more_recognisable(sampler, clip):
    model = gaussian_classes(0.25, 0.35)          # overlapping classes: unguided samples are sometimes ambiguous
    acc = {cfg: model.accuracy(*draw(model, SampleConfig(sampler, 15, cfg, clip_denoised=clip), n=96))
           for cfg in (1.0, 3.0)}
    assert acc[3.0] >= acc[1.0] and acc[3.0] > 0.95, acc


def test_ddpm_loop_matches_adm_reference():
    """Our diffusers DDPM loop = ADM's respaced p_sample loop (same noise), learned variance included."""
    model = gaussian_classes(0.5, 0.4)
    steps, n = 12, 6
    y = torch.arange(n) % 4
    ours = sample_latents(model, y, make_generators(3, range(n)), SampleConfig("ddpm", steps, 2.0), (1, 4, 4))

    timesteps = linspace_timesteps(1000, steps)
    diffusion = GaussianDiffusion(timesteps=timesteps)
    gens = make_generators(3, range(n))
    x = torch.stack([torch.randn((1, 4, 4), generator=g) for g in gens]).double()
    for i in reversed(range(steps)):
        t = torch.full((n,), timesteps[i], dtype=torch.long)
        out = model.forward_with_cfg(x.float(), t, y, 2.0).double()
        noise = torch.stack([torch.randn((1, 4, 4), generator=g) for g in gens]).double() if i > 0 else torch.zeros_like(x)
        step = diffusion.p_mean_variance(out, x, i)            # ADM's reverse step (the last one adds no noise)
        x = step["mean"] + (i > 0) * torch.exp(0.5 * step["log_variance"]) * noise
    torch.testing.assert_close(ours, x.float(), atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
#                                   A tiny real checkpoint (pixel space)
# ---------------------------------------------------------------------------------------------------------

DATA_INFO = DataInfo(num_classes=10, in_channels=1, latent_size=8, image_size=8,
                     class_names=tuple("zero one two three four five six seven eight nine".split()),
                     vae=None, scaling_factor=1.0, source="builtin:digits").to_dict()


def _randomise(model, seed=1, scale=0.05):
    """adaLN-Zero makes a fresh model output zeros; random gates and output weights make outputs depend on x, t, y."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.final_layer.parameters()) + [q for b in model.blocks for q in b.adaLN_modulation.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _save(path, name="DiT-T/2", routing=None):
    torch.manual_seed(0)
    model = _randomise(build_model(name, routing, input_size=8, in_channels=1, num_classes=10))
    exp = ExperimentConfig(sample=SampleConfig(sampler="ddim", steps=4, cfg_scale=2.0, num_per_class=2, batch_size=8))
    save_checkpoint(path, model, model, step=123, experiment=exp, data_info=DATA_INFO)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("ckpt") / "dense")


@pytest.fixture(scope="module")
def dtopp_ckpt(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("ckpt") / "dtopp", "DiT-T/2-E4K2", RoutingConfig(type="dtopp"))


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return _randomise(build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10))


SETTINGS = SampleConfig("ddim", 4, 2.0, clip_denoised=True)


def _bulk(model, out, n=20, batch_size=8, settings=SETTINGS, **kw):
    return sample_to_folder(model, out, settings=dataclasses.replace(settings, batch_size=batch_size), num_samples=n,
                            num_classes=10, shape=SHAPE, decode=load_decoder(DataInfo.from_dict(DATA_INFO)),
                            progress=False, **kw)


def test_deterministic_under_seed(dense):
    y = torch.tensor([0, 3, 7])
    for sampler in SAMPLERS:
        s = SampleConfig(sampler, 5, 2.0, clip_denoised=True)
        a = sample_latents(dense, y, make_generators(5, range(3)), s, SHAPE)
        b = sample_latents(dense, y, make_generators(5, range(3)), s, SHAPE)
        c = sample_latents(dense, y, make_generators(6, range(3)), s, SHAPE)
        assert torch.equal(a, b) and not torch.allclose(a, c)


def test_cfg_scale_one_is_conditional_sampling(dense):
    class CondOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.learn_sigma = m.learn_sigma

        def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=None):
            return self.m(x, t, y)

    y = torch.tensor([1, 2, 9, 9])
    for sampler in SAMPLERS:
        gens = lambda: make_generators(0, range(4))  # noqa: E731
        one = sample_latents(dense, y, gens(), SampleConfig(sampler, 5, 1.0), SHAPE)
        cond = sample_latents(CondOnly(dense), y, gens(), SampleConfig(sampler, 5, 4.0), SHAPE)
        guided = sample_latents(dense, y, gens(), SampleConfig(sampler, 5, 4.0), SHAPE)
        torch.testing.assert_close(one, cond, rtol=0, atol=0)
        assert not torch.allclose(one, guided)


def test_labels_balanced_and_random():
    lab = make_labels("balanced", 103, 10, seed=0)
    counts = torch.bincount(lab, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103
    assert torch.equal(lab, make_labels("balanced", 103, 10, seed=0))
    assert not torch.equal(lab, make_labels("balanced", 103, 10, seed=1))
    assert not torch.equal(lab[:10], torch.arange(10))       # permuted, not i % C in order
    rnd = make_labels("random", 1000, 10, seed=0)
    assert rnd.min() >= 0 and rnd.max() < 10 and torch.bincount(rnd).min() > 50
    with pytest.raises(SamplingError, match="labels policy 'uniform'"):
        make_labels("uniform", 10, 10, 0)
    with pytest.raises(SamplingError, match=r"class id\(s\) \[10, 12\] out of range \[0, 10\)"):
        sampling.check_labels(torch.tensor([0, 10, 12]), 10)


def test_sampling_rejects_out_of_range_labels(dense):
    # Label 10 is the null class: sampling it would silently give unconditional samples.
    with pytest.raises(SamplingError, match=r"class id\(s\) \[10\] out of range \[0, 10\)"):
        sample_latents(dense, torch.tensor([1, 10]), make_generators(0, range(2)), SETTINGS, SHAPE)
    with pytest.raises(SamplingError, match="one generator per sample"):
        sample_latents(dense, torch.tensor([1, 2]), make_generators(0, range(3)), SETTINGS, SHAPE)


# ---------------------------------------------------------------------------------------------------------
#                                            Bulk sampling
# ---------------------------------------------------------------------------------------------------------

def test_bulk_npz_layout_and_settings(dense, tmp_path):
    info = _bulk(dense, tmp_path, n=20, run_info={"model": "DiT-T/2"})
    images, labels, meta = read_samples(tmp_path)
    assert images.dtype == np.uint8 and images.shape == (20, 8, 8, 3)
    assert labels.dtype == np.int64 and np.bincount(labels, minlength=10).tolist() == [2] * 10
    assert images.std() > 10                                  # real pictures, not a constant
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / "000007.png")), images[7])
    with np.load(tmp_path / "samples.npz") as z:
        assert sorted(z.files) == ["arr_0", "labels"]
    assert meta == info and meta["status"] == "complete"
    s = meta["settings"]
    assert (s["model"], s["sampler"], s["steps"], s["cfg_scale"], s["guidance_channels"], s["labels"], s["seed"]) == \
        ("DiT-T/2", "ddim", 4, 2.0, "all", "balanced", 0)
    assert meta["generated_this_run"] == 20 and meta["images_per_second"] > 0
    assert meta["active_experts"] is None                    # dense model


def test_bulk_independent_of_batch_size_and_process_count(dense, tmp_path):
    _bulk(dense, tmp_path / "one", batch_size=8)
    _bulk(dense, tmp_path / "bs3", batch_size=3)

    class Rank:
        num_processes = 2

        def __init__(self, r):
            self.process_index, self.is_main_process = r, r == 0

        def wait_for_everyone(self):
            pass

    # Two processes, run one after the other: rank 1 draws the odd indices, rank 0 the even ones and packs the npz.
    part = _bulk(dense, tmp_path / "two", batch_size=5, state=Rank(1))
    assert part["generated"] == 10
    _bulk(dense, tmp_path / "two", batch_size=5, state=Rank(0))
    ref, ref_labels, _ = read_samples(tmp_path / "one")
    for other in ("bs3", "two"):
        images, labels, _ = read_samples(tmp_path / other)
        assert np.array_equal(images, ref) and np.array_equal(labels, ref_labels)


def test_bulk_resume_keeps_samples_and_loses_none(dense, tmp_path):
    fresh = tmp_path / "fresh"
    _bulk(dense, fresh, n=20, batch_size=4)

    # A run that dies after two batches ...
    out = tmp_path / "resumed"
    decode = load_decoder(DataInfo.from_dict(DATA_INFO))
    calls = []

    def dying_decode(x):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt("killed")
        return decode(x)

    with pytest.raises(KeyboardInterrupt):
        sample_to_folder(dense, out, settings=dataclasses.replace(SETTINGS, batch_size=4), num_samples=20,
                         num_classes=10, shape=SHAPE, decode=dying_decode, progress=False)
    kept = sorted(os.listdir(out / "images"))
    assert len(kept) == 8 and not (out / "samples.npz").exists()
    stamps = {f: os.stat(out / "images" / f).st_mtime_ns for f in kept}
    # ... is resumed by the same call: the 8 samples stay untouched, the 12 missing ones are drawn.
    info = _bulk(dense, out, n=20, batch_size=4)
    assert info["resumed_from"] == 8 and info["generated_this_run"] == 12
    assert {f: os.stat(out / "images" / f).st_mtime_ns for f in kept} == stamps
    assert sorted(os.listdir(out / "images")) == [f"{i:06d}.png" for i in range(20)]
    a, la, _ = read_samples(fresh)
    b, lb, _ = read_samples(out)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    # A finished folder resumes to a no-op.
    assert _bulk(dense, out, n=20, batch_size=4)["generated_this_run"] == 0


def test_bulk_refuses_to_mix_settings(dense, tmp_path):
    _bulk(dense, tmp_path, n=4)
    with pytest.raises(SamplingError, match=r"cfg_scale: 2.0 on disk vs 3.0 now"):
        _bulk(dense, tmp_path, n=4, settings=SampleConfig("ddim", 4, 3.0, clip_denoised=True))
    with pytest.raises(SamplingError, match="num_samples"):
        _bulk(dense, tmp_path, n=6)


# ---------------------------------------------------------------------------------------------------------
#                                         Command line and grids
# ---------------------------------------------------------------------------------------------------------

def test_cli_grid(ckpt, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main([str(ckpt), "--classes", "3", "seven", "--num-per-class", "3", "--out", str(out), "--device", "cpu"]) == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    # 2 rows x 3 columns of 8x8 digits upscaled 8x (nearest) with a caption band above each.
    assert grid.shape[1] == 3 * (64 + 2) + 2 and grid.shape[0] > 2 * (64 + 2)
    band = grid[2:12, 2:66]
    assert (band < 128).any()                               # the caption's ink
    assert "wrote" in capsys.readouterr().out


def test_cli_bulk_uses_checkpoint_defaults(ckpt, tmp_path, capsys):
    out = tmp_path / "bulk"
    assert main([str(ckpt), "--num-samples", "6", "--out", str(out), "--device", "cpu", "--no-progress",
                 "--clip-denoised", "--guidance-channels", "1"]) == 0
    _, labels, meta = read_samples(out)
    s = meta["settings"]
    assert (s["sampler"], s["steps"], s["cfg_scale"], s["checkpoint_step"], s["weights"], s["vae"]) == \
        ("ddim", 4, 2.0, 123, "ema", "identity")
    assert s["guidance_channels"] == 1 and len(labels) == 6
    assert "images/s" in capsys.readouterr().out


def test_cli_fid_hook(ckpt, tmp_path):
    ref = tmp_path / "ref"
    assert main([str(ckpt), "--num-samples", "10", "--out", str(ref), "--device", "cpu", "--no-progress",
                 "--seed", "1"]) == 0
    out = tmp_path / "gen"
    assert main([str(ckpt), "--num-samples", "10", "--out", str(out), "--device", "cpu", "--no-progress",
                 "--fid", str(ref / "samples.npz"), "--extractor", "test-tiny"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["fid"] >= 0
    assert metrics["settings"]["sampler"] == "ddim" and metrics["settings"]["checkpoint_step"] == 123


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "no such checkpoint"),
    (["{ckpt}", "--classes", "12"], "class id 12 out of range [0, 10)"),
    (["{ckpt}", "--classes", "eleven"], "unknown class 'eleven'"),
    (["{ckpt}", "--target-experts", "2"], "needs a DTop-p model"),
    (["{ckpt}", "--num-samples", "4"], "--num-samples needs --out"),
    (["{ckpt}", "--fid", "ref.npz"], "--fid needs bulk sampling"),
    (["{ckpt}", "--guidance-channels", "2"], "guidance_channels=2 must be in [1, 1]"),
    (["{dtopp}", "--target-experts", "5"], "target_experts=5.0 must be in [1, 4]"),
])
def test_cli_bad_inputs(ckpt, dtopp_ckpt, tmp_path, capsys, argv, message):
    fill = {"missing": str(tmp_path / "nope"), "ckpt": str(ckpt), "dtopp": str(dtopp_ckpt)}
    argv = [a.format(**fill) for a in argv] + ["--device", "cpu"]
    if "--num-samples" not in argv:
        argv += ["--out", str(tmp_path / "grid.png")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
#                                  MoE: activated experts and DTop-p calibration
# ---------------------------------------------------------------------------------------------------------

def test_meter_counts_topk_experts(tmp_path):
    torch.manual_seed(0)
    model = _randomise(build_model("DiT-T/2-E4K2", input_size=8, in_channels=1, num_classes=10))
    info = _bulk(model, tmp_path, n=4, batch_size=4)
    report = info["active_experts"]
    assert report["mean"] == 2.0 and report["per_layer"] == [2.0] * 4
    # DDIM with 4 trailing steps visits timesteps 999, 749, 499, 249: four buckets of ten, each exactly K = 2.
    assert [v for v in report["per_bucket"] if v is not None] == [2.0] * 4
    assert report["tokens"] == 4 * 4 * 16 * 2 * 4           # steps x layers x tokens x (cond + null) x samples


def test_calibrate_dtopp_threshold(dtopp_ckpt):
    from dit_moe.weights.build import build_from_checkpoint

    model, _ = build_from_checkpoint(dtopp_ckpt)
    before = model.routing_controller.threshold.clone()
    result = calibrate_threshold(model, 1.5, settings=SampleConfig("ddim", 4, 2.0), shape=SHAPE, num_classes=10,
                                 num_samples=4, num_points=2, rounds=1, iters=12, tol=0.02)
    assert abs(result["measured"] - 1.5) <= 0.05 and result["scope"] == "global"
    assert torch.equal(model.routing_controller.threshold, torch.tensor(result["threshold"]))
    assert not torch.equal(before, model.routing_controller.threshold)
    # The calibrated model samples at the target: activated experts are reported per timestep bucket.
    lo = calibrate_threshold(model, 1.1, settings=SampleConfig("ddim", 4, 2.0), shape=SHAPE, num_classes=10,
                             num_samples=4, num_points=2, rounds=1, iters=12, tol=0.02)
    assert lo["threshold"][0] < result["threshold"][0]


def test_cli_target_experts_reports_buckets(dtopp_ckpt, tmp_path, capsys):
    out = tmp_path / "sparse"
    assert main([str(dtopp_ckpt), "--num-samples", "4", "--out", str(out), "--device", "cpu", "--no-progress",
                 "--target-experts", "1.5", "--calibration-samples", "4"]) == 0
    meta = json.loads((out / "samples.json").read_text())
    assert meta["settings"]["target_experts"] == 1.5 and meta["settings"]["routing"] == "dtopp"
    cal = meta["extra"]["calibration"]
    assert abs(cal["measured"] - 1.5) < 0.1
    report = meta["active_experts"]
    assert abs(report["mean"] - 1.5) < 0.3 and sum(v is not None for v in report["per_bucket"]) == 4
    assert "t in [" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_two_real_processes_match_one(ckpt, tmp_path):
    """torchrun with 2 CPU processes (gloo through Accelerate) writes the same npz as one process."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    args = [str(ckpt), "--num-samples", "8", "--batch-size", "3", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), os.path.join(repo, "sample.py"), *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert main([*args, "--out", str(tmp_path / "one"), "--device", "cpu"]) == 0
    two, one = read_samples(tmp_path / "two"), read_samples(tmp_path / "one")
    assert two[2]["processes"] == 2
    assert np.array_equal(two[0], one[0]) and np.array_equal(two[1], one[1])


def test_vae_override_with_local_autoencoder(tmp_path, capsys):
    """Latent checkpoints decode with the VAE their data_info names; --vae swaps in a local AutoencoderKL."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    model = _randomise(build_model("DiT-T/2", input_size=4, in_channels=4, num_classes=3))
    info = DataInfo(num_classes=3, in_channels=4, latent_size=4, image_size=8, class_names=("a", "b", "c"),
                    vae="stabilityai/sd-vae-ft-ema", scaling_factor=0.18215, source="latents").to_dict()
    save_checkpoint(tmp_path / "ckpt", model, step=1, data_info=info)
    common = [str(tmp_path / "ckpt"), "--num-samples", "3", "--steps", "3", "--sampler", "dpm", "--device", "cpu",
              "--no-progress"]
    # The hub VAE is out of reach offline: a clear error, not a traceback.
    assert main(common + ["--out", str(tmp_path / "hub")]) == 2
    assert "sample.py: error:" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "local"), "--vae", str(tmp_path / "vae")]) == 0
    images, labels, meta = read_samples(tmp_path / "local")
    assert images.shape == (3, 8, 8, 3) and sorted(labels.tolist()) == [0, 1, 2]
    assert meta["settings"]["vae"] == str(tmp_path / "vae")
