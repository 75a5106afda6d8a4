"""One inference path: checkpoints (flow, and DDPM written before the diffusion section existed) -> bundles ->
samples; the guidance interval and forward counts; the trainer's EMA grid; bad input caught before sampling."""
import json

import numpy as np
import pytest
import torch

from dit_moe import inference, sampling
from dit_moe.config import DiffusionConfig, ExperimentConfig, ModelConfig, SampleConfig
from dit_moe.data import DataInfo
from dit_moe.diffusion import DDPMObjective, RectifiedFlow
from dit_moe.registry import build_model
from dit_moe.sampling import (main, make_generators, num_model_calls, resolve_settings,
                              sample_latents)
from dit_moe.weights.checkpoint import save_checkpoint

from test_sampling import _randomise

SHAPE = (1, 8, 8)
DATA_INFO = DataInfo(num_classes=10, in_channels=1, latent_size=8, image_size=8,
                     class_names=tuple("zero one two three four five six seven eight nine".split()),
                     vae=None, scaling_factor=1.0, source="builtin:digits")


def tiny(flow: bool, name="DiT-T/2"):
    torch.manual_seed(0)
    return _randomise(build_model(name, input_size=8, in_channels=1, num_classes=10, learn_sigma=not flow))


def flow_experiment(**sample):
    return ExperimentConfig(model=ModelConfig(name="DiT-T/2", input_size=8, in_channels=1, num_classes=10,
                                              learn_sigma=False),
                            diffusion=DiffusionConfig(objective="flow", t_sampling="logit_normal", time_shift=2.0),
                            sample=SampleConfig(**{"steps": 4, "cfg_scale": 2.0, "num_per_class": 1, **sample}))


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("flow") / "ckpt"
    model = tiny(flow=True)
    save_checkpoint(path, model, model, step=7, experiment=flow_experiment(), data_info=DATA_INFO.to_dict())
    return path


@pytest.fixture(scope="module")
def old_ddpm_ckpt(tmp_path_factory):
    """A DDPM checkpoint in the format written before this change: no diffusion section, the old sample keys."""
    path = tmp_path_factory.mktemp("ddpm") / "ckpt"
    model = tiny(flow=False)
    save_checkpoint(path, model, model, step=3, data_info=DATA_INFO.to_dict(),
                    experiment=ExperimentConfig(sample=SampleConfig(sampler="ddim", steps=5, cfg_scale=2.0)))
    cfg = json.loads((path / "config.json").read_text())
    del cfg["experiment"]["diffusion"]
    for key in ("clip_denoised", "guidance_interval", "time_shift"):
        del cfg["experiment"]["sample"][key]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


class Forwards:
    """Counts DiT forwards and the rows of each (a hook on the patch embedding, which every forward calls once)."""

    def __init__(self, model):
        self.rows = []
        self.handle = model.x_embedder.register_forward_pre_hook(lambda m, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------------
#                                              Checkpoints
# ---------------------------------------------------------------------------------------------------------

def test_flow_checkpoint_round_trip(flow_ckpt):
    bundle = inference.load(flow_ckpt, device="cpu")
    assert isinstance(bundle.objective, RectifiedFlow)
    assert (bundle.objective.t_sampling, bundle.objective.time_shift) == ("logit_normal", 2.0)
    assert bundle.model.out_channels == 1 and bundle.shape == SHAPE and bundle.num_classes == 10
    settings = resolve_settings(bundle.defaults, bundle.objective, 1)
    # The checkpoint's sample section has no sampler: the objective's default, with the training time shift.
    assert (settings.sampler, settings.steps, settings.time_shift) == ("euler", 4, 2.0)
    saved = tiny(flow=True).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in bundle.model.state_dict().items())


def test_flow_checkpoint_samples_through_sample_py_with_only_its_path(flow_ckpt, tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    assert main([str(flow_ckpt)]) == 0
    assert "euler 4 steps, cfg 2.0, time shift 2.0" in capsys.readouterr().out
    grid = np.asarray(Image.open(tmp_path / "samples.png").convert("RGB"))
    assert grid.shape[1] == 64 + 2 + 2 and grid.shape[0] > 10 * (64 + 2)   # a row per class, 1 per class
    # The same pictures through the library: the grid is made of sample_latents(..., objective=flow) images.
    bundle = inference.load(flow_ckpt, device="cpu")
    result = sampling.sample_grid(bundle)
    assert np.array_equal(np.asarray(result["grid"].convert("RGB")), grid)
    lat = sample_latents(bundle.model, torch.arange(10), make_generators(0, range(10)),
                         SampleConfig(sampler="euler", steps=4, cfg_scale=2.0, time_shift=2.0), SHAPE,
                         objective=RectifiedFlow())
    assert lat.std() > 0.05
    # Bulk sampling works from the path alone too, and records the objective with the settings.
    out = tmp_path / "bulk"
    assert main([str(flow_ckpt), "--num-samples", "4", "--out", str(out), "--no-progress"]) == 0
    _, _, meta = sampling.read_samples(out)
    assert (meta["settings"]["objective"], meta["settings"]["sampler"], meta["settings"]["time_shift"]) == \
        ("flow", "euler", 2.0)


# Computed with main's code before this change (dit_moe/sampling.py at 7b68d5f): the tiny DiT-T/2 of `tiny(False)`,
# labels [0, 3, 7], make_generators(5, range(3)); x[:, 0, 0, :3] and x.sum() after sampling.
PINNED = {
    ("ddpm", 6, 2.0): ([[208.245697, -31.710287, -357.481628], [-216.786285, -60.809578, 78.09597],
                        [-195.839996, -262.076141, -318.350952]], -8783.92676),
    ("ddim", 5, 2.0): ([[231.547409, -51.769276, -327.98584], [-174.40773, -89.820702, 118.290138],
                        [-167.807419, -316.852386, -295.925293]], -8181.89648),
    ("dpm", 5, 1.5): ([[244.964401, -49.772945, -319.735046], [-166.158783, -89.590187, 124.206512],
                       [-157.474426, -315.912506, -290.098083]], -7934.06348),
}


@pytest.mark.parametrize("key", list(PINNED), ids=lambda k: k[0])
def test_old_ddpm_checkpoint_samples_as_before(old_ddpm_ckpt, key):
    bundle = inference.load(old_ddpm_ckpt, device="cpu")
    assert isinstance(bundle.objective, DDPMObjective) and bundle.objective.learn_sigma
    assert (bundle.defaults.sampler, bundle.defaults.steps, bundle.defaults.clip_denoised) == ("ddim", 5, False)
    sampler, steps, cfg = key
    settings = SampleConfig(sampler, steps, cfg)
    y = torch.tensor([0, 3, 7])
    ours = sample_latents(bundle.model, y, make_generators(5, range(3)), settings, SHAPE, objective=bundle.objective)
    # ... identical to an explicit DDPM objective and to a bare model (the call the trainer makes today) ...
    explicit = sample_latents(tiny(False), y, make_generators(5, range(3)), settings, SHAPE,
                              objective=DDPMObjective(learn_sigma=True))
    bare = sample_latents(tiny(False), y, make_generators(5, range(3)), settings, SHAPE)
    assert torch.equal(ours, explicit) and torch.equal(ours, bare)
    # ... and to what main's code produced.
    values, total = PINNED[key]
    np.testing.assert_allclose(ours[:, 0, 0, :3].numpy(), values, rtol=1e-5, atol=1e-3)
    assert float(ours.sum()) == pytest.approx(total, rel=1e-5)


def test_old_ddpm_checkpoint_through_the_cli(old_ddpm_ckpt, tmp_path):
    out = tmp_path / "bulk"
    assert main([str(old_ddpm_ckpt), "--num-samples", "3", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    _, _, meta = sampling.read_samples(out)
    assert "objective" not in meta["settings"] and meta["settings"]["sampler"] == "ddim"


# ---------------------------------------------------------------------------------------------------------
#                                    Guidance interval and forward counts
# ---------------------------------------------------------------------------------------------------------

def _run(model, objective, settings, n=3):
    """Sample n labels, recording every model call: (timestep, level, x_in, output, rows of the forward)."""
    calls = []
    original = model.forward_with_cfg

    def recording(x, t, y, scale, channels=None):
        out = original(x, t, y, scale, channels)
        calls.append({"t": t[0].item(), "x": x.clone(), "out": out.clone(), "scale": scale})
        return out

    model.forward_with_cfg = recording
    try:
        with Forwards(model) as fw:
            x = sample_latents(model, torch.arange(n) % 10, make_generators(1, range(n)), settings, SHAPE,
                               objective=objective)
    finally:
        del model.forward_with_cfg
    for c in calls:
        c["level"] = float(objective.noise_level(c["t"]))
    return x, calls, fw.rows


@pytest.mark.parametrize("flow, sampler", [(True, "euler"), (True, "heun"), (True, "sde"), (False, "ddim"),
                                           (False, "ddpm")])
def test_guidance_interval_leaves_the_other_steps_unguided(flow, sampler):
    model = tiny(flow)
    objective = RectifiedFlow() if flow else DDPMObjective(learn_sigma=True)
    lo, hi = 0.3, 0.7
    guided_settings = SampleConfig(sampler=sampler, steps=8, cfg_scale=4.0, guidance_interval=(lo, hi))
    x_g, guided, rows_g = _run(model, objective, guided_settings)
    x_u, plain, rows_u = _run(model, objective, SampleConfig(sampler=sampler, steps=8, cfg_scale=1.0))
    calls = num_model_calls(resolve_settings(guided_settings, objective, 1))
    assert len(guided) == len(plain) == len(rows_g) == len(rows_u) == calls
    inside = [lo <= c["level"] <= hi for c in guided]
    assert any(inside) and not all(inside)
    first_inside = inside.index(True)
    for i, (g, u) in enumerate(zip(guided, plain)):
        if i < first_inside:          # before the interval: the two trajectories coincide step for step
            assert torch.equal(g["x"], u["x"]) and torch.equal(g["out"], u["out"]), i
        if inside[i]:
            assert g["scale"] == 4.0 and rows_g[i] == 6, i                     # conditional + null half
        else:
            # Outside: exactly the unguided (conditional-only) prediction of its input, one half of the batch.
            assert g["scale"] == 1.0 and rows_g[i] == 3, i
            assert torch.equal(g["out"], model(g["x"], torch.full((3,), g["t"], dtype=torch.long if not flow
                                                                  else torch.float32), torch.arange(3))), i
    assert not torch.equal(guided[first_inside + 1]["x"], plain[first_inside + 1]["x"])
    assert not torch.allclose(x_g, x_u)


@pytest.mark.parametrize("flow, sampler, steps", [(True, "euler", 5), (True, "heun", 5), (True, "sde", 5),
                                                  (False, "ddpm", 5), (False, "dpm", 5)])
def test_cfg_one_runs_one_forward_per_step(flow, sampler, steps):
    model = tiny(flow)
    objective = RectifiedFlow() if flow else DDPMObjective(learn_sigma=True)
    calls = 2 * steps - 1 if sampler == "heun" else steps
    _, _, rows = _run(model, objective, SampleConfig(sampler=sampler, steps=steps, cfg_scale=1.0), n=3)
    assert rows == [3] * calls
    _, _, rows = _run(model, objective, SampleConfig(sampler=sampler, steps=steps, cfg_scale=3.0), n=3)
    assert rows == [6] * calls                                                  # guided: one batched forward of 2N


def test_guidance_interval_is_on_the_noise_level_scale():
    """DDPM timestep 999 is t = 0.994 and 0 is t = 0.01: an interval [0, 0.5] skips the noisy half for both."""
    s = SampleConfig(sampler="ddim", steps=10, cfg_scale=3.0, guidance_interval=(0.0, 0.5))
    ddpm = DDPMObjective()
    levels = [float(ddpm.noise_level(t)) for t in (999, 500, 100)]
    assert [sampling.guidance_scale(s, v) for v in levels] == [1.0, 1.0, 3.0]
    assert sampling.guidance_scale(s, 0.5) == 3.0 and sampling.guidance_scale(s, 0.5001) == 1.0   # closed interval


# ---------------------------------------------------------------------------------------------------------
#                                          The trainer's EMA grid
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flow", [False, True])
def test_training_grid_is_rng_isolated_and_deterministic(flow, tmp_path):
    from PIL import Image

    model = tiny(flow)
    exp = flow_experiment(num_per_class=2) if flow else ExperimentConfig(
        model=ModelConfig(name="DiT-T/2", input_size=8, in_channels=1, num_classes=10),
        sample=SampleConfig(sampler="ddim", steps=3, cfg_scale=2.0, num_per_class=2))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sampling.training_grid(model, exp, DATA_INFO, "cpu", tmp_path / "a.png")
    assert torch.equal(torch.get_rng_state(), before)                   # the training RNG stream is untouched
    b = sampling.training_grid(model, exp, DATA_INFO.to_dict(), "cpu", tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert a["classes"] == list(range(10)) and a["labels"] == [c for c in range(10) for _ in range(2)]
    assert a["settings"].sampler == ("euler" if flow else "ddim") and b["path"] == str(tmp_path / "b.png")
    assert np.asarray(Image.open(tmp_path / "a.png")).std() > 10


# ---------------------------------------------------------------------------------------------------------
#                                 Bad input: one line naming the option, no sampling
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which, argv, message", [
    ("flow", ["--guidance-interval", "0.7", "0.2"], "--guidance-interval: LO=0.7 > HI=0.2"),
    ("flow", ["--guidance-interval", "0", "1.5"], "--guidance-interval: (0.0, 1.5) must lie in [0, 1]"),
    ("flow", ["--sampler", "ddim"], "--sampler: 'ddim' is a DDPM sampler; a model trained with "
                                    "diffusion.objective=flow samples with euler | heun | sde"),
    ("flow", ["--clip-denoised"], "--clip-denoised: clipping the predicted x0 is a DDPM-sampler option"),
    ("flow", ["--time-shift", "0"], "--time-shift: time_shift=0.0 must be a finite number > 0"),
    ("ddpm", ["--sampler", "heun"], "--sampler: 'heun' is a flow sampler; a model trained with "
                                    "diffusion.objective=ddpm samples with ddpm | ddim | dpm"),
    ("ddpm", ["--time-shift", "3"], "--time-shift: the time shift applies to flow samplers"),
    ("ddpm", ["--guidance-interval", "-0.1", "0.5"], "--guidance-interval"),
])
def test_bad_sampling_flags_fail_before_sampling(flow_ckpt, old_ddpm_ckpt, tmp_path, capsys, monkeypatch,
                                                  which, argv, message):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled despite bad flags")

    monkeypatch.setattr(sampling.loop, "solve", no_sampling)
    ckpt = flow_ckpt if which == "flow" else old_ddpm_ckpt
    for mode in ([], ["--num-samples", "2"]):
        assert main([str(ckpt), *argv, *mode, "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_flow_with_learned_sigma_is_refused_at_load(tmp_path, capsys):
    """A checkpoint whose config says flow but whose model learns sigma cannot be sampled: one line, exit 2."""
    model = tiny(flow=False)
    exp = flow_experiment()
    exp.model.learn_sigma = True           # built in Python, so no validation ran before saving
    save_checkpoint(tmp_path / "bad", model, step=1, experiment=exp, data_info=DATA_INFO.to_dict())
    assert main([str(tmp_path / "bad"), "--device", "cpu", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "diffusion.objective=flow needs model.learn_sigma=false" in err and err.count("\n") == 1
