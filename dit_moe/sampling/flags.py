"""The sampling flags, defined once: sample.py, ``dit_moe.analyze`` and ``dit_moe.demo`` add them with these functions.

No torch import here (the analysis CLI's training-curve path must not load it).
"""
from __future__ import annotations

import argparse
import dataclasses

from ..cli import add_device_argument
from ..config import ALL_SAMPLERS, SampleConfig
from ..validation import sample_problems
from .errors import SamplingError
from .settings import resolve_settings

__all__ = ["FLAGS", "add_checkpoint_arguments", "add_sampler_arguments", "add_class_arguments", "flag_overrides",
           "check_sample_flags", "settings_from_args"]

# SampleConfig field -> the flag that sets it (error messages name the flag).
FLAGS = {"sampler": "--sampler", "steps": "--steps", "cfg_scale": "--cfg-scale",
         "guidance_channels": "--guidance-channels", "guidance_interval": "--guidance-interval",
         "time_shift": "--time-shift", "clip_denoised": "--clip-denoised", "seed": "--seed",
         "batch_size": "--batch-size", "num_per_class": "--num-per-class", "compile": "--compile"}


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """--weights, --device, --vae: how a checkpoint becomes a sampler (dit_moe.inference.load)."""
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights")
    add_device_argument(p)
    p.add_argument("--vae", help="decode with this AutoencoderKL (hub id or local directory) instead of the "
                                 "checkpoint's")


def add_sampler_arguments(p: argparse.ArgumentParser, steps_help: str = "") -> None:
    """The SampleConfig flags. Unset flags (None) keep the checkpoint's ``sample`` section."""
    g = p.add_argument_group("sampler (defaults: the checkpoint's sample section)")
    g.add_argument("--sampler", choices=ALL_SAMPLERS,
                   help="DDPM models: ddpm (learned variance, DiT's protocol), ddim, dpm (DPM-Solver++); flow models: "
                        "euler, heun (ODE), sde (Euler-Maruyama, SiT's diffusion coefficient)")
    g.add_argument("--steps", type=int, help="sampling steps (default per sampler: ddpm 250, ddim 50, dpm 25, "
                                             "euler 50, heun 25 = 49 model calls, sde 100)" + steps_help)
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = none: one forward per step)")
    g.add_argument("--guidance-channels", type=int,
                   help="guide only the first N latent channels (3 = DiT's legacy behaviour; default all)")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only at noise levels LO <= t <= HI, t in [0, 1] (0 = data, 1 = noise; DDPM timesteps "
                        "map to t = sigma / (1 + sigma)); e.g. 0 0.7 as REPA. Default: every step")
    g.add_argument("--time-shift", type=float,
                   help="flow samplers: shift of the time grid t' = s t / (1 + (s - 1) t) (default: the training "
                        "diffusion.time_shift; 1 = none)")
    g.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=None,
                   help="DDPM samplers: clamp predicted x0 to [-1, 1] (pixel-space data; wrong for latents)")
    g.add_argument("--seed", type=int, help="global seed; sample i uses a seed derived from (seed, i)")
    g.add_argument("--batch-size", type=int, help="samples per forward pass (per process)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model's blocks before sampling (pays off for long runs on a GPU; see "
                        "docs/performance.md)")


def add_class_arguments(p: argparse.ArgumentParser, per_class_default: str) -> None:
    """--classes and --num-per-class: which classes to draw, and how many samples each."""
    p.add_argument("--classes", nargs="+", help="class ids or names (default: all classes if <= 16, else 8 random; "
                                                "analyze: all if <= 10, else 6)")
    p.add_argument("--num-per-class", type=int, help=f"samples per class ({per_class_default})")


def flag_overrides(args: argparse.Namespace) -> dict:
    """The SampleConfig fields the command line set (flags left at None keep the checkpoint's values)."""
    given = {field: getattr(args, field) for field in FLAGS if getattr(args, field, None) is not None}
    if "guidance_interval" in given:
        given["guidance_interval"] = tuple(given["guidance_interval"])
    return given


def check_sample_flags(args: argparse.Namespace) -> None:
    """The sampler flags that were given, checked by every rule that does not depend on the model (ranges, the
    guidance interval); SamplingError naming the flag. Run before a checkpoint is loaded; ``settings_from_args``
    checks the rest against the model."""
    problems = sample_problems(SampleConfig(**flag_overrides(args)), None, None, name=lambda f: FLAGS.get(f, f))
    if problems:
        raise SamplingError(problems[0])


def settings_from_args(args: argparse.Namespace, bundle) -> SampleConfig:
    """The bundle's sample defaults overridden by the flags that were given, resolved and checked (SamplingError
    naming the flag)."""
    settings = dataclasses.replace(bundle.defaults, **flag_overrides(args))
    return resolve_settings(settings, bundle.objective, bundle.shape[0], name=lambda f: FLAGS.get(f, f))
