"""Sampling settings: one dataclass (``dit_moe.config.SampleConfig``) resolved against the model's objective.

A checkpoint's ``sample`` section, the command line and keyword arguments all describe a run with the same
``SampleConfig``. Its ``None`` fields mean "whatever the objective implies" and are filled in here:

    sampler     ddpm -> ddpm (DiT's protocol), flow -> euler
    steps       the sampler's default (config.DEFAULT_STEPS: ddpm 250, ddim 50, dpm 25, euler 50, heun 25, sde 100)
    time_shift  flow samplers: the training shift diffusion.time_shift (1 = none); DDPM samplers: none

and every value is checked (``dit_moe.validation.sample_problems``) before anything is sampled.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from ..config import ALL_SAMPLERS, DEFAULT_STEPS, SAMPLERS, SampleConfig
from ..validation import sample_problems
from .errors import SamplingError

__all__ = ["SamplingError", "SampleConfig", "resolve_settings", "guidance_scale",
           "SAMPLERS", "DDPM_SAMPLERS", "FLOW_SAMPLERS", "ALL_SAMPLERS", "DEFAULT_STEPS"]

DDPM_SAMPLERS = SAMPLERS["ddpm"]
FLOW_SAMPLERS = SAMPLERS["flow"]


def resolve_settings(settings: SampleConfig, objective, in_channels: Optional[int] = None,
                     name: Callable[[str], str] = lambda field: field) -> SampleConfig:
    """``settings`` with sampler, steps and time_shift filled in for ``objective``; SamplingError if anything is wrong.

    ``name(field)`` is how the message names a field (``--steps`` on the command line, ``sample.steps`` in a config).
    """
    problems = sample_problems(settings, objective.kind, in_channels, name)
    if problems:
        raise SamplingError(problems[0])
    sampler = settings.sampler or SAMPLERS[objective.kind][0]
    steps = settings.steps if settings.steps is not None else DEFAULT_STEPS[sampler]
    time_shift = settings.time_shift
    if objective.kind == "flow" and time_shift is None:
        time_shift = objective.time_shift
    return dataclasses.replace(settings, sampler=sampler, steps=steps, time_shift=time_shift)


def guidance_scale(settings: SampleConfig, level: float) -> float:
    """The CFG scale of a model call at noise level ``level`` in [0, 1]: cfg_scale inside the guidance interval
    (closed; no interval = everywhere), 1 (no guidance, conditional half only) outside it."""
    interval = settings.guidance_interval
    if interval is not None and not interval[0] <= level <= interval[1]:
        return 1.0
    return float(settings.cfg_scale)
