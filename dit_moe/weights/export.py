"""Export a dit-moe checkpoint to diffusers: dense models as a DiTTransformer2DModel and, with a VAE, a DiTPipeline
folder; MoE models as a DiTMoEPipeline folder (dit_moe/weights/diffusers_moe.py).

    dit-moe convert CHECKPOINT --to diffusers --out DIR [--weights ema|model] [--vae VAE] [--transformer-only]

The inverse of the diffusers import (dit_moe/weights/layouts.py): q, k, v split from the fused qkv, one copy of the
timestep/label embedders per block, the MLP LayerNorm eps as the config's norm_eps. MoE models cannot be a
DiTTransformer2DModel (one dense MLP per diffusers block): they keep dit-moe's network inside diffusers' ModelMixin.
diffusers hard-codes the timestep convention ``downscale_freq_shift=1``: a model with DiT's convention
(model.timestep_freq_shift=0, everything trained here and every DiT file) exports with a warning that diffusers
computes a slightly different function; a model imported from diffusers round-trips exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from ..registry import parse_name
from .build import build_from_checkpoint
from .checkpoint import load_checkpoint, read_newest
from .layouts import dit_moe_to_diffusers
from .outputs import ConvertError, one_line, prepare_output, replace_dir

__all__ = ["export_diffusers"]

# DiT's training schedule (linear betas, T = 1000), for the scheduler of the exported DiTPipeline.
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def _is_diffusers_folder(path: Path) -> bool:  # DiTPipeline or DiTMoEPipeline folders alike
    return (path / "model_index.json").is_file() or (path / "transformer" / "config.json").is_file()


def export_diffusers(checkpoint: str | os.PathLike, out: str | os.PathLike, *, which: str = "ema",
                     vae: Optional[str] = None, transformer_only: bool = False, overwrite: bool = False) -> Path:
    """A dense dit-moe checkpoint -> ``out/transformer`` (DiTTransformer2DModel) and, with a VAE, a whole
    DiTPipeline folder (``vae/``, ``scheduler/``, ``model_index.json`` with the class names)."""
    # Here, not at the top: diffusers takes seconds to import, and `dit-moe convert` loads this module for any source.
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    out = prepare_output(out, overwrite, _is_diffusers_folder, "diffusers folder")
    ckpt = read_newest(checkpoint, load_checkpoint)          # the description decides; the model is built once
    cfg = ckpt.model_config
    if parse_name(cfg.name).is_moe:
        # diffusers' DiTTransformer2DModel has one dense MLP per block: MoE models export as a DiTMoEPipeline
        from .diffusers_moe import PipelineError, export_pipeline
        try:
            export_pipeline(ckpt, out, which=which, vae=vae, transformer_only=transformer_only)
        except PipelineError as e:
            raise ConvertError(str(e)) from None
        return out
    model, _ = build_from_checkpoint(ckpt, which=which)
    if cfg.class_dropout_prob <= 0:
        raise ConvertError(f"{ckpt.path}: trained without label dropout (no null class row); diffusers' DiT always has one")
    if cfg.timestep_freq_shift != 1:
        print(f"warning: {cfg.name} uses DiT's timestep frequencies (model.timestep_freq_shift=0); diffusers hard-codes "
              "downscale_freq_shift=1, so the exported model computes a slightly different function", file=sys.stderr)
    state, config = dit_moe_to_diffusers(model.state_dict(), cfg)
    transformer = DiTTransformer2DModel(**config)
    transformer.load_state_dict(state, strict=True)
    info = ckpt.data_info or {}
    vae = vae or info.get("vae")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if transformer_only or vae is None:
            transformer.save_pretrained(tmp / "transformer")
        else:
            try:
                autoencoder = AutoencoderKL.from_pretrained(vae)
            except (OSError, ValueError) as e:
                raise ConvertError(f"cannot load the VAE {vae!r} for the pipeline ({one_line(e)}); pass --vae DIR "
                                   "(a local AutoencoderKL) or --transformer-only") from None
            scheduler = DDIMScheduler(**DIT_SCHEDULE, clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True)
            DiTPipeline(transformer=transformer, vae=autoencoder, scheduler=scheduler).save_pretrained(tmp)
            index = json.loads((tmp / "model_index.json").read_text())
            names = info.get("class_names") or [str(i) for i in range(cfg.num_classes)]
            index["id2label"] = {str(i): str(n) for i, n in enumerate(names)}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
