"""DiTMoEPipeline: a dit-moe MoE model in diffusers reproduces `dit-moe sample` (DDPM with learned variance; flow
with Euler), with and without guidance, and round-trips through save_pretrained / from_pretrained.

Tolerances. DDPM: the pipeline steps the same DDPMScheduler with the same model calls and per-image generators as
our ddpm sampler, so latents agree to float32 round-off (asserted atol 1e-5; measured: identical). Flow: diffusers
computes the shifted sigmas and the timesteps 1000 sigma in float32, our grid in float64, so the network sees
timesteps that differ in the last float32 bits; latents agree to atol 2e-4 (measured <= 6e-7). Images written by
`dit-moe sample` are uint8 of the same [-1, 1] latents (ADM's 127.5 x + 128 truncated), the pipeline's in [0, 1]:
they agree within one grey level.
"""
import json

import numpy as np
import pytest
import torch

from dit_moe.config import DiffusionConfig, ExperimentConfig, RoutingConfig, SampleConfig
from dit_moe.data import DataInfo
from dit_moe.inference import load
from dit_moe.registry import build_model
from dit_moe.sampling import main as sample_main, make_generators, read_samples, sample_latents
from dit_moe.weights.checkpoint import save_checkpoint
from dit_moe.weights.convert import main as convert_main
from dit_moe.weights.diffusers_moe import DiTMoEPipeline, DiTMoETransformer2DModel, pipeline_from_checkpoint

from test_sampling import _randomise

DATA_INFO = DataInfo(num_classes=10, in_channels=1, latent_size=8, image_size=8, class_names=tuple("0123456789"),
                     vae=None, scaling_factor=1.0, source="builtin:digits").to_dict()
LABELS = [3, 7, 1]
SEED = 5


def _save(path, objective):
    torch.manual_seed(0)
    flow = objective == "flow"
    model = _randomise(build_model("DiT-T/2-E4K2", RoutingConfig(type="topk"), input_size=8, in_channels=1,
                                   num_classes=10, learn_sigma=not flow))
    exp = ExperimentConfig(
        diffusion=DiffusionConfig(objective=objective, time_shift=2.0) if flow else DiffusionConfig(),
        sample=SampleConfig(sampler="euler" if flow else "ddpm", steps=6, cfg_scale=2.0, batch_size=8))
    save_checkpoint(path, model, model, step=7, experiment=exp, data_info=DATA_INFO)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {"ddpm": _save(root / "ddpm", "ddpm"), "flow": _save(root / "flow", "flow")}


def _ours(ckpt, cfg_scale, steps=6):
    bundle = load(ckpt, device="cpu")
    sampler = "euler" if bundle.objective.kind == "flow" else "ddpm"
    return sample_latents(bundle.model, torch.tensor(LABELS), make_generators(SEED, range(len(LABELS))),
                          SampleConfig(sampler=sampler, steps=steps, cfg_scale=cfg_scale), bundle.shape,
                          objective=bundle.objective)


@pytest.mark.parametrize("objective, atol", [("ddpm", 1e-5), ("flow", 2e-4)])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_pipeline_matches_dit_moe_sampler(ckpts, objective, atol, cfg_scale):
    pipe = pipeline_from_checkpoint(ckpts[objective])
    expected = {"ddpm": "DDPMScheduler", "flow": "FlowMatchEulerDiscreteScheduler"}[objective]
    assert type(pipe.scheduler).__name__ == expected
    if objective == "ddpm":
        assert pipe.scheduler.config.variance_type == "learned_range"
    else:
        assert pipe.scheduler.config.shift == 2.0
    latents = pipe(class_labels=LABELS, num_inference_steps=6, guidance_scale=cfg_scale,
                   generator=make_generators(SEED, range(len(LABELS))), output_type="latent").images
    ours = _ours(ckpts[objective], cfg_scale)
    assert ours.abs().max() > 0.1                         # not a trivial all-zero comparison
    torch.testing.assert_close(latents, ours, rtol=0, atol=atol)


def test_guidance_changes_the_images(ckpts):
    pipe = pipeline_from_checkpoint(ckpts["ddpm"])
    run = {s: pipe(class_labels=LABELS, num_inference_steps=6, guidance_scale=s, output_type="latent",
                   generator=make_generators(SEED, range(3))).images for s in (1.0, 2.5)}
    assert (run[1.0] - run[2.5]).abs().max() > 1e-2


def test_pipeline_images_match_dit_moe_sample_cli(ckpts, tmp_path):
    out = tmp_path / "bulk"
    assert sample_main([str(ckpts["ddpm"]), "--num-samples", "4", "--out", str(out), "--device", "cpu",
                        "--no-progress", "--seed", str(SEED), "--sampler", "ddpm", "--steps", "6",
                        "--cfg-scale", "2.0"]) == 0
    images, labels, _ = read_samples(out)                     # uint8 (N, H, W, 3), labels (N,)
    pipe = pipeline_from_checkpoint(ckpts["ddpm"])
    assert pipe.config.guidance_scale == 2.0 and pipe.config.num_inference_steps == 6   # the checkpoint's defaults
    np_images = pipe(class_labels=labels.tolist(), generator=make_generators(SEED, range(4)), output_type="np").images
    assert np_images.shape == images.shape
    ours = images.astype(np.float64) / 255.0
    assert np.abs(np_images - ours).max() <= 1.0 / 255 + 1e-6
    pil = pipe(class_labels=labels.tolist()[:1], generator=make_generators(SEED, [0]), num_inference_steps=2).images
    assert pil[0].size == (8, 8)


def test_save_pretrained_from_pretrained_round_trip(ckpts, tmp_path):
    for objective in ("ddpm", "flow"):
        pipe = pipeline_from_checkpoint(ckpts[objective])
        pipe.save_pretrained(tmp_path / objective)
        again = DiTMoEPipeline.from_pretrained(tmp_path / objective)
        assert type(again.transformer) is DiTMoETransformer2DModel
        assert type(again.scheduler) is type(pipe.scheduler) and again.vae is None
        assert dict(again.config)["guidance_scale"] == 2.0 and again.labels["7"] == 7
        for k, v in pipe.transformer.state_dict().items():
            torch.testing.assert_close(again.transformer.state_dict()[k], v, rtol=0, atol=0)
        kw = dict(class_labels=LABELS, num_inference_steps=3, guidance_scale=1.5, output_type="latent")
        torch.testing.assert_close(again(**kw, generator=make_generators(0, range(3))).images,
                                   pipe(**kw, generator=make_generators(0, range(3))).images, rtol=0, atol=0)
        assert again.get_label_ids(["3", "1"]) == [3, 1]


def test_convert_to_diffusers_writes_the_moe_pipeline(ckpts, tmp_path, capsys):
    out = tmp_path / "exported"
    assert convert_main([str(ckpts["ddpm"]), "--to", "diffusers", "--out", str(out)]) == 0
    assert "DiTMoEPipeline.from_pretrained" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DiTMoEPipeline"
    assert index["transformer"] == ["dit_moe.weights.diffusers_moe", "DiTMoETransformer2DModel"]
    assert index["scheduler"][1] == "DDPMScheduler"
    pipe = DiTMoEPipeline.from_pretrained(out)
    torch.testing.assert_close(pipe(class_labels=LABELS, num_inference_steps=6, guidance_scale=2.0,
                                    generator=make_generators(SEED, range(3)), output_type="latent").images,
                               _ours(ckpts["ddpm"], 2.0), rtol=0, atol=1e-5)
    # a non-empty folder is not replaced without --overwrite
    assert convert_main([str(ckpts["ddpm"]), "--to", "diffusers", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
