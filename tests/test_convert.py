"""Published-weights import/export: parity with diffusers' own DiTTransformer2DModel forward (an implementation
nobody here wrote), DiT-layout files (plain, EMA-wrapped, training checkpoints), refusals that name the tensor,
the offline hub error, export round trips, and the converted model through sample.py, evaluate and DiTPipeline.

How the conventions are matched. A tiny random diffusers DiT converted with the default convention gets
timestep_freq_shift=1 and mlp_norm_eps=norm_eps, so dit-moe computes diffusers' function itself. For DiT-layout
files the reference is the same diffusers model with its two conventions set to the original DiT's (module
attributes ``time_proj.downscale_freq_shift = 0`` and ``norm3.eps = 1e-6``), which makes it an implementation of
DiT's forward. diffusers' output includes the learned-sigma channels; all 8 channels are compared.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dit_moe.registry import build_model
from dit_moe.weights.build import build_from_checkpoint
from dit_moe.weights.checkpoint import load_checkpoint, save_checkpoint
from dit_moe.weights.convert import main

TOL = 1e-10
NUM_CLASSES = 10


def tiny_diffusers(num_classes=NUM_CLASSES, norm_eps=1e-5, out_channels=8, seed=0):
    """A random DiTTransformer2DModel shaped like DiT-T/2 (4 blocks x 128, 4 heads, 8x8 latents) whose per-block
    embedders are tied, as in every diffusers model converted from DiT."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    d = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=out_channels,
                              num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes,
                              norm_eps=norm_eps)
    first = d.transformer_blocks[0].norm1.emb.state_dict()
    for block in d.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return d.eval()


def as_original_dit(d):
    """The diffusers model with the original DiT's timestep frequencies and MLP LayerNorm eps."""
    for block in d.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    return d


def dit_layout(d) -> dict:
    """facebookresearch/DiT's state-dict names (models.py: DiT, DiTBlock, FinalLayer; timm PatchEmbed, Attention
    with fused qkv, Mlp fc1/fc2), filled from a diffusers model by this hand-written table."""
    s = {k: v.detach().clone() for k, v in d.state_dict().items()}
    emb = "transformer_blocks.0.norm1.emb."
    out = {
        "pos_embed": d.pos_embed.pos_embed.detach().clone(),                 # DiT's frozen (1, T, D) parameter
        "x_embedder.proj.weight": s["pos_embed.proj.weight"], "x_embedder.proj.bias": s["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": s[emb + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": s[emb + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": s[emb + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": s[emb + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": s[emb + "class_embedder.embedding_table.weight"],
        "final_layer.linear.weight": s["proj_out_2.weight"], "final_layer.linear.bias": s["proj_out_2.bias"],
        "final_layer.adaLN_modulation.1.weight": s["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": s["proj_out_1.bias"],
    }
    for i in range(len(d.transformer_blocks)):
        b = f"transformer_blocks.{i}."
        for w in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([s[f"{b}attn1.to_q.{w}"], s[f"{b}attn1.to_k.{w}"],
                                                         s[f"{b}attn1.to_v.{w}"]])
            out[f"blocks.{i}.attn.proj.{w}"] = s[f"{b}attn1.to_out.0.{w}"]
            out[f"blocks.{i}.mlp.fc1.{w}"] = s[f"{b}ff.net.0.proj.{w}"]
            out[f"blocks.{i}.mlp.fc2.{w}"] = s[f"{b}ff.net.2.{w}"]
            out[f"blocks.{i}.adaLN_modulation.1.{w}"] = s[f"{b}norm1.linear.{w}"]
    return out


def inputs(num_classes=NUM_CLASSES, n=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 500, 999][:n])
    y = torch.tensor([0, 5, num_classes - 1, num_classes][:n])          # the last one is the null class
    return x, t, y


def max_diff_to_diffusers(ckpt, d, which="ema"):
    model, _ = build_from_checkpoint(ckpt, which=which)
    x, t, y = inputs(d.config.num_embeds_ada_norm)
    with torch.no_grad():
        ours = model.double()(x, t, y)
        theirs = d.double()(x, timestep=t, class_labels=y).sample
    assert ours.shape == theirs.shape == (4, 8, 8, 8)
    assert theirs.abs().max() > 0.1                                       # a non-trivial function
    return (ours - theirs).abs().max().item()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16)


def save_pipeline(d, path):
    from diffusers import DDPMScheduler, DiTPipeline

    DiTPipeline(transformer=d, vae=tiny_vae(), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------
#                                               diffusers in
# ---------------------------------------------------------------------------------------------------------

def test_diffusers_folder_matches_diffusers_forward(tmp_path, capsys):
    d = tiny_diffusers()
    d.save_pretrained(tmp_path / "transformer")
    assert main([str(tmp_path / "transformer"), "--out", str(tmp_path / "ckpt")]) == 0
    assert "timestep_freq_shift=1" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "ckpt")
    cfg = ckpt.model_config
    assert (cfg.name, cfg.input_size, cfg.num_classes, cfg.learn_sigma) == ("DiT-T/2", 8, NUM_CLASSES, True)
    assert (cfg.timestep_freq_shift, cfg.mlp_norm_eps) == (1, 1e-5)
    s = ckpt.experiment.sample
    assert (s.sampler, s.steps, s.cfg_scale, s.guidance_channels) == ("ddpm", 250, 1.5, 3)
    assert max_diff_to_diffusers(tmp_path / "ckpt", d) <= TOL


def test_conventions_are_visible_and_matter(tmp_path):
    """With DiT's conventions the same weights compute DiT's function, which differs from diffusers' visibly."""
    d = tiny_diffusers()
    d.save_pretrained(tmp_path / "transformer")
    assert main([str(tmp_path / "transformer"), "--out", str(tmp_path / "dit"), "--convention", "dit"]) == 0
    cfg = load_checkpoint(tmp_path / "dit").model_config
    assert (cfg.timestep_freq_shift, cfg.mlp_norm_eps) == (0, 1e-6)
    assert max_diff_to_diffusers(tmp_path / "dit", d) > 1e-3
    assert max_diff_to_diffusers(tmp_path / "dit", as_original_dit(d)) <= TOL


def test_pipeline_folder_records_its_vae_and_untied_embedders_are_refused(tmp_path, capsys):
    d = tiny_diffusers(num_classes=1000)
    save_pipeline(d, tmp_path / "pipe")
    assert main([str(tmp_path / "pipe"), "--out", str(tmp_path / "ckpt")]) == 0
    info = load_checkpoint(tmp_path / "ckpt").data_info
    assert info["vae"] == str((tmp_path / "pipe" / "vae").resolve())
    assert (info["scaling_factor"], info["image_size"], info["latent_size"]) == (0.18215, 16, 8)
    assert info["class_names"][:2] == ["tench", "goldfish"] and len(info["class_names"]) == 1000

    with torch.no_grad():
        d.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.weight.add_(1e-3)
    d.save_pretrained(tmp_path / "untied")
    capsys.readouterr()
    assert main([str(tmp_path / "untied"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "transformer_blocks.2.norm1.emb.timestep_embedder.linear_1.weight differs from block 0's" in err
    assert not (tmp_path / "bad").exists()


def test_hub_id_offline_without_cache_says_where_to_put_files(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": os.getcwd()}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "dit_moe.weights.convert", "facebook/DiT-XL-2-256", "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert: error: facebook/DiT-XL-2-256: not a local path")
    assert "hf download facebook/DiT-XL-2-256 --local-dir DIR" in lines[0]
    assert str(tmp_path / "hf") in lines[0]


def test_hub_id_from_the_offline_cache(tmp_path):
    """A hub id resolves from a populated Hugging Face cache with HF_HUB_OFFLINE=1 (the layout `hf download` makes),
    and the checkpoint records the cached pipeline's own VAE."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny-dit" / "snapshots" / ("0" * 40)
    save_pipeline(tiny_diffusers(num_classes=1000), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": os.getcwd()}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "dit_moe.weights.convert", "someone/tiny-dit", "--out", str(tmp_path / "ckpt")],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.model_config.name == "DiT-T/2" and ckpt.meta["converted_from"] == "someone/tiny-dit"
    assert ckpt.data_info["vae"] == str((snapshot / "vae").resolve())


# ---------------------------------------------------------------------------------------------------------
#                                      facebookresearch/DiT files in
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit_reference():
    """(the original-DiT reference model, its DiT-layout state dict, an EMA copy with other weights)."""
    d = as_original_dit(tiny_diffusers(seed=3))
    state = dit_layout(d)
    ema = {k: v + 0.01 * torch.randn_like(v) if k != "pos_embed" else v for k, v in state.items()}
    return d, state, ema


def test_dit_files_plain_ema_wrapped_and_safetensors_match_dit(tmp_path, dit_reference):
    d, state, _ = dit_reference
    from safetensors.torch import save_file

    torch.save(state, tmp_path / "plain.pt")
    torch.save({"ema": state}, tmp_path / "wrapped.pt")
    save_file(state, str(tmp_path / "st.safetensors"))
    for name, file in (("plain", "plain.pt"), ("wrapped", "wrapped.pt"), ("st", "st.safetensors")):
        assert main([str(tmp_path / file), "--out", str(tmp_path / name)]) == 0
        ckpt = load_checkpoint(tmp_path / name)
        assert (ckpt.model_config.timestep_freq_shift, ckpt.model_config.mlp_norm_eps) == (0, 1e-6)
        assert ckpt.data_info["vae"] == "stabilityai/sd-vae-ft-ema"
        assert not (ckpt.path / "ema.safetensors").exists()                 # one set of weights, EMA falls back
        assert max_diff_to_diffusers(tmp_path / name, d, "ema") <= TOL


def test_local_vae_is_recorded_with_its_geometry(tmp_path, monkeypatch, dit_reference):
    tiny_vae().save_pretrained(tmp_path / "my-vae")
    torch.save(dit_reference[1], tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["m.pt", "--vae", "my-vae", "--out", "ckpt"]) == 0
    info = load_checkpoint(tmp_path / "ckpt").data_info
    assert info["vae"] == str((tmp_path / "my-vae").resolve()) and info["image_size"] == 16   # 2x down-sampling


def test_dit_training_checkpoint_keeps_model_and_ema_and_reads_args(tmp_path, dit_reference):
    d, state, ema = dit_reference
    args = argparse.Namespace(model="DiT-T/2", image_size=64, num_classes=NUM_CLASSES, vae="mse", global_seed=0)
    torch.save({"model": state, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "args": args},
               tmp_path / "0050000.pt")
    assert main([str(tmp_path / "0050000.pt"), "--out", str(tmp_path / "ckpt")]) == 0
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.meta["dit_args"]["vae"] == "mse" and ckpt.meta["dropped"] == ["opt"]
    assert ckpt.data_info["vae"] == "stabilityai/sd-vae-ft-mse"
    assert max_diff_to_diffusers(tmp_path / "ckpt", d, "model") <= TOL
    assert torch.equal(ckpt.state_dict("ema")["blocks.0.mlp.fc1.weight"], ema["blocks.0.mlp.fc1.weight"])

    torch.save({"model": state, "args": argparse.Namespace(model="DiT-S/2")}, tmp_path / "lying.pt")
    assert main([str(tmp_path / "lying.pt"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("blocks.1.mlp.fc2.bias"), "missing tensor blocks.1.mlp.fc2.bias"),
    (lambda s: s.update({"blocks.0.attn.extra": torch.zeros(3)}), "unexpected tensor blocks.0.attn.extra"),
    (lambda s: s.update({"blocks.2.attn.proj.weight": torch.zeros(128, 64)}),
     "tensor blocks.2.attn.proj.weight has shape (128, 64), expected (128, 128)"),
    (lambda s: s.update({"x_embedder.proj.weight": torch.zeros(96, 4, 2, 2)}), "match no registry model"),
    (lambda s: s.update({"pos_embed": s["pos_embed"] + 1}), "pos_embed is not DiT's fixed sin-cos table"),
])
def test_bad_state_dicts_are_refused_naming_the_tensor(tmp_path, capsys, dit_reference, edit, message):
    state = dict(dit_reference[1])
    edit(state)
    torch.save(state, tmp_path / "bad.pt")
    assert main([str(tmp_path / "bad.pt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all\n", "not a PyTorch checkpoint"),
    ([1, 2, 3], "expected a dict of tensors, found list"),
    ({"net": {"w": 1}}, "not a DiT checkpoint"),
    ({"model": {"blocks.0.mlp.experts.w_in": torch.zeros(2)}}, "an MoE state dict"),
    ({"a.weight": torch.zeros(2)}, "not a DiT state dict"),
])
def test_non_checkpoints_give_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "file.pt"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(path) in err[0]


def test_unsafe_pickles_are_not_loaded(tmp_path, capsys):
    import pathlib

    torch.save({"model": {"x": torch.zeros(1)}, "args": pathlib.PurePosixPath("/evil")}, tmp_path / "p.pt")
    assert main([str(tmp_path / "p.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "refuses; not loaded, for safety" in capsys.readouterr().err


def test_existing_output_and_dit_moe_sources(tmp_path, capsys, dit_reference):
    torch.save(dit_reference[1], tmp_path / "m.pt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main([str(tmp_path / "m.pt"), "--out", str(tmp_path / "busy")]) == 2
    assert "not empty; nothing written" in capsys.readouterr().err
    assert main([str(tmp_path / "m.pt"), "--out", str(tmp_path / "busy"), "--overwrite"]) == 2
    assert "refusing to replace a folder that is not a dit-moe checkpoint" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert main([str(tmp_path / "m.pt"), "--out", str(tmp_path / "ckpt")]) == 0
    assert main([str(tmp_path / "m.pt"), "--out", str(tmp_path / "ckpt"), "--overwrite"]) == 0
    assert main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "again")]) == 2
    assert "already a dit-moe checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
#                                            Export to diffusers
# ---------------------------------------------------------------------------------------------------------

def test_export_round_trip(tmp_path, capsys):
    from diffusers import DiTPipeline, DiTTransformer2DModel

    d = tiny_diffusers(num_classes=1000)
    save_pipeline(d, tmp_path / "pipe")
    assert main([str(tmp_path / "pipe"), "--out", str(tmp_path / "ckpt")]) == 0
    assert main([str(tmp_path / "ckpt"), "--to", "diffusers", "--out", str(tmp_path / "export")]) == 0
    back = DiTTransformer2DModel.from_pretrained(tmp_path / "export", subfolder="transformer")
    theirs, mine = d.state_dict(), back.state_dict()
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    assert back.config.norm_eps == d.config.norm_eps
    pipe = DiTPipeline.from_pretrained(tmp_path / "export")
    assert pipe.get_label_ids(["goldfish"]) == [1]
    assert "timestep_freq_shift" not in capsys.readouterr().err       # diffusers' conventions: no warning

    # A DiT-convention model exports with a warning; an existing export is only replaced with --overwrite.
    model = build_model("DiT-T/2", input_size=8, num_classes=NUM_CLASSES)
    save_checkpoint(tmp_path / "dense", model)
    assert main([str(tmp_path / "dense"), "--to", "diffusers", "--out", str(tmp_path / "export")]) == 2
    assert main([str(tmp_path / "dense"), "--to", "diffusers", "--out", str(tmp_path / "export"), "--overwrite"]) == 0
    assert "timestep_freq_shift=0" in capsys.readouterr().err
    assert not (tmp_path / "export" / "model_index.json").exists()    # pixel-free checkpoint: transformer only


def test_export_moe_writes_the_moe_transformer(tmp_path, capsys):
    """diffusers' DiTTransformer2DModel has one dense MLP per block: an MoE model exports as dit-moe's own
    DiTMoETransformer2DModel (the whole DiTMoEPipeline is tested in test_diffusers_moe.py); without data_info
    nothing decodes its latents, so, as for dense models, only transformer/ is written."""
    save_checkpoint(tmp_path / "moe", build_model("DiT-T/2-E4K2", input_size=8, num_classes=NUM_CLASSES))
    assert main([str(tmp_path / "moe"), "--to", "diffusers", "--out", str(tmp_path / "x")]) == 0
    assert "DiTMoETransformer2DModel.from_pretrained" in capsys.readouterr().out
    config = json.loads((tmp_path / "x" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "DiTMoETransformer2DModel" and config["model"]["name"] == "DiT-T/2-E4K2"
    assert not (tmp_path / "x" / "model_index.json").exists()


# ---------------------------------------------------------------------------------------------------------
#                     End to end: sample.py, evaluate, and diffusers' DiTPipeline sampling
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    d = tiny_diffusers(num_classes=1000, seed=5)          # DiTPipeline hard-codes the null class 1000
    save_pipeline(d, root / "pipe")
    assert main([str(root / "pipe"), "--out", str(root / "ckpt")]) == 0
    return root, d


def test_sample_grid_bulk_and_evaluate(converted_pipeline, tmp_path):
    from PIL import Image

    from dit_moe import evaluate, sampling

    root, _ = converted_pipeline
    ckpt = str(root / "ckpt")
    assert sampling.main([ckpt, "--classes", "tench", "1", "--num-per-class", "2", "--steps", "3", "--device", "cpu",
                          "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 16
    for name, seed in (("gen", "0"), ("ref", "1")):
        assert sampling.main([ckpt, "--num-samples", "8", "--steps", "3", "--seed", seed, "--device", "cpu",
                              "--no-progress", "--out", str(tmp_path / name)]) == 0
    images, labels, info = sampling.read_samples(tmp_path / "gen")
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
    s = info["settings"]                                   # DiT's protocol came from the checkpoint
    assert (s["sampler"], s["cfg_scale"], s["guidance_channels"], s["vae"]) == \
        ("ddpm", 1.5, 3, str((root / "pipe" / "vae").resolve()))
    result = evaluate.compute_metrics(str(tmp_path / "gen" / "samples.npz"), str(tmp_path / "ref" / "samples.npz"),
                                      metrics=("fid",), feature_extractor="test-tiny", device="cpu")
    assert np.isfinite(result["metrics"]["fid"]) and result["metrics"]["fid"] >= 0


def test_ddpm_matches_dit_pipeline(converted_pipeline):
    """diffusers' DiTPipeline and our DDPM loop on the same converted model, labels and noise.

    What differs by design: DiTPipeline drops the learned-variance channels and steps with the scheduler's fixed
    variance, guides all latent channels, and draws the step noise from the global RNG for its doubled (cond,
    uncond) batch. Matched here: a DDPMScheduler with our schedule and fixed_large variance that is handed our
    per-sample generators (a second set for the uncond half it discards), and our sampler seeing an eps-only model
    (so it also uses fixed_large) with guidance on all channels. Tolerance: 1e-5 on [0, 1] images in float32.
    """
    from diffusers import DDPMScheduler, DiTPipeline

    from dit_moe.data import DataInfo, load_decoder
    from dit_moe.sampling import SampleConfig, make_generators, sample_latents

    root, _ = converted_pipeline
    model, ckpt = build_from_checkpoint(root / "ckpt")
    labels, seed, steps = [3, 1, 999], 7, 6
    idx = range(len(labels))

    class SeededDDPM(DDPMScheduler):
        generators = None

        def step(self, *args, **kwargs):
            return super().step(*args, generator=self.generators, **kwargs)

    scheduler = SeededDDPM(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                           variance_type="fixed_large", timestep_spacing="linspace", clip_sample=False)
    pipe = DiTPipeline.from_pretrained(root / "pipe", scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gens = make_generators(seed, idx)
    scheduler.generators = gens + make_generators(seed + 1, idx)
    theirs = pipe(class_labels=labels, guidance_scale=1.5, generator=gens, num_inference_steps=steps,
                  output_type="pt").images

    class EpsOnly(torch.nn.Module):
        learn_sigma = False

        def __init__(self, m):
            super().__init__()
            self.m, self.num_classes = m, m.num_classes

        def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=None):
            return self.m.forward_with_cfg(x, t, y, cfg_scale, guidance_channels)[:, :self.m.in_channels]

    decode = load_decoder(DataInfo.from_dict(ckpt.data_info))
    settings = SampleConfig("ddpm", steps, 1.5, guidance_channels=None)
    ours = decode(sample_latents(EpsOnly(model), torch.tensor(labels), make_generators(seed, idx), settings, (4, 8, 8)))
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert (ours - theirs).abs().max().item() <= 1e-5           # measured 2.4e-7: float32 rounding
    # Our real DDPM uses the learned variance: a different (DiT's) sampler, visibly different images.
    learned = decode(sample_latents(model, torch.tensor(labels), make_generators(seed, idx), settings, (4, 8, 8)))
    assert ((learned / 2 + 0.5).clamp(0, 1) - theirs).abs().max().item() > 1e-4   # measured 2e-3
