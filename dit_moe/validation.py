"""The one validation pass of experiment configs: ranges, finiteness and the rules between sections.

Types, choices and unknown keys are checked while a config is read (``dit_moe.config.from_dict``); what a type
cannot say is checked here, all at once, so one ``ConfigError`` lists every problem: ``validate`` for a whole
experiment (``load_config`` and the trainer run it before any work or any folder is created) and
``sample_problems`` for sampling settings against a model's objective (also used on command-line flags before a
checkpoint is loaded).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from typing import Optional

from .config import ALL_SAMPLERS, SAMPLERS, ConfigError, ExperimentConfig, SampleConfig, objective_problem


def sample_problems(s: SampleConfig, objective: Optional[str], in_channels: Optional[int] = None,
                    name=lambda field: field) -> list[str]:
    """What is wrong with sampling settings ``s`` for a model of ``objective``: one line per problem, each starting
    with ``name(field)`` (``sample.steps`` in a config file, ``--steps`` on the command line). ``objective`` None:
    only the rules that hold for every model (command-line values checked before a checkpoint is loaded)."""
    problems = []
    if s.sampler is not None:
        if s.sampler not in ALL_SAMPLERS:
            problems.append(f"{name('sampler')}: {s.sampler!r} is not one of {ALL_SAMPLERS}")
        elif objective is not None and s.sampler not in SAMPLERS[objective]:
            problems.append(f"{name('sampler')}: {s.sampler!r} is a "
                            f"{'flow' if objective == 'ddpm' else 'DDPM'} sampler; a model trained with diffusion."
                            f"objective={objective} samples with {' | '.join(SAMPLERS[objective])}")
    if s.steps is not None and not 1 <= s.steps <= 1000:
        problems.append(f"{name('steps')}: steps={s.steps} must be in [1, 1000]")
    if not (math.isfinite(s.cfg_scale) and s.cfg_scale >= 0):
        problems.append(f"{name('cfg_scale')}: cfg_scale={s.cfg_scale} must be a finite number >= 0 (1 = no guidance)")
    if s.guidance_channels is not None and (s.guidance_channels < 1 or (in_channels is not None
                                                                       and s.guidance_channels > in_channels)):
        problems.append(f"{name('guidance_channels')}: guidance_channels={s.guidance_channels} must be in "
                        f"[1, {in_channels if in_channels is not None else 'C'}] (or None = all)")
    if s.guidance_interval is not None:
        lo, hi = s.guidance_interval
        if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
            problems.append(f"{name('guidance_interval')}: ({lo}, {hi}) must lie in [0, 1] (noise level t: 0 = data, "
                            "1 = pure noise)")
        elif lo > hi:
            problems.append(f"{name('guidance_interval')}: LO={lo} > HI={hi}; give the interval as LO HI with LO <= HI")
    if s.time_shift is not None:
        if not (math.isfinite(s.time_shift) and s.time_shift > 0):
            problems.append(f"{name('time_shift')}: time_shift={s.time_shift} must be a finite number > 0 (1 = none)")
        elif objective is not None and objective != "flow":
            problems.append(f"{name('time_shift')}: the time shift applies to flow samplers; this model was trained "
                            f"with diffusion.objective={objective}")
    if s.clip_denoised and objective is not None and objective != "ddpm":
        problems.append(f"{name('clip_denoised')}: clipping the predicted x0 is a DDPM-sampler option; this model "
                        f"was trained with diffusion.objective={objective}")
    for key in ("num_per_class", "batch_size"):
        if getattr(s, key) < 1:
            problems.append(f"{name(key)}: {key}={getattr(s, key)} must be >= 1")
    if s.seed < 0:
        problems.append(f"{name('seed')}: seed={s.seed} must be >= 0")
    if s.compile and compile_problem():
        problems.append(f"{name('compile')}: {compile_problem()}")
    return problems


def compile_problem() -> Optional[str]:
    """Why torch.compile cannot run here (None if it can): inductor needs a C++ compiler for CPU code. Checked
    before any work, so a missing compiler is one line, not a traceback at the first step."""
    import torch   # not at the top: the command-line flag modules import this module, and --help loads no torch

    if torch.cuda.is_available():
        return None
    if not any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++"))):
        return "torch.compile on the CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX); none found"
    return None


# ---------------------------------------------------------------------------------------------------------
#                                 The validation pass (ranges, cross-section rules)
# ---------------------------------------------------------------------------------------------------------

def validate(cfg: ExperimentConfig, num_processes: Optional[int] = None) -> None:
    """Check every range and cross-section rule at once; one ``ConfigError`` lists every problem.

    Types and choices are checked when the config is built (``from_dict``); this pass checks what a type cannot
    say: ranges, finiteness, and rules that tie keys together (routing against the model name's E and K, the
    batch against accumulation and processes, the run name against the run folder). It runs before any work or
    any folder is created. ``num_processes``: the world size, when known (the global batch must divide by it).
    Rules that need the data (shape, size) are checked when the data is opened.
    """
    problems: list[str] = []
    bad = problems.append

    # ----- every float must be a number: NaN and inf pass every range check below unnoticed
    for section in dataclasses.fields(cfg):
        sec = getattr(cfg, section.name)
        for f in dataclasses.fields(sec):
            values = getattr(sec, f.name)
            for v in (values if isinstance(values, tuple) else (values,)):
                if isinstance(v, float) and not math.isfinite(v):
                    bad(f"{section.name}.{f.name}={values} must be a finite number")
    nonfinite = {p.split("=")[0] for p in problems}

    def check(key: str, ok: bool, message: str) -> None:
        if key not in nonfinite and not ok:
            bad(f"{key}={_value(cfg, key)!r} {message}")

    m, r, d, t, s = cfg.model, cfg.routing, cfg.data, cfg.train, cfg.sample
    # ----- model
    arch = None
    try:
        from .registry import parse_name  # not at the top: the registry imports torch (see compile_problem)

        arch = parse_name(m.name)
    except ConfigError as e:
        bad(str(e))
    check("model.input_size", m.input_size >= 1, "must be >= 1")
    if arch is not None and m.input_size >= 1:
        check("model.input_size", m.input_size % arch.patch_size == 0,
              f"is not divisible by the patch size {arch.patch_size} of {m.name}")
    check("model.in_channels", m.in_channels >= 1, "must be >= 1")
    check("model.num_classes", m.num_classes >= 1, "must be >= 1")
    check("model.class_dropout_prob", 0.0 <= m.class_dropout_prob < 1.0, "must be in [0, 1)")
    check("model.expert_hidden_ratio", m.expert_hidden_ratio > 0, "must be > 0")
    check("model.num_shared_experts", m.num_shared_experts >= 0, "must be >= 0")
    check("model.shared_hidden_ratio", m.shared_hidden_ratio > 0, "must be > 0")
    check("model.moe_every", m.moe_every >= 1, "must be >= 1")
    if hasattr(m, "mlp_norm_eps"):
        check("model.mlp_norm_eps", m.mlp_norm_eps > 0, "must be > 0")
    if arch is not None and arch.is_moe:
        check("model.moe_every", m.moe_every <= arch.depth, f"leaves no MoE block in the {arch.depth} blocks of {m.name}")

    # ----- routing (ignored by dense models, which say so when training starts)
    if arch is not None and arch.is_moe:
        E = arch.num_experts
        if r.target is not None:
            check("routing.target", 1 <= r.target <= E,
                  f"must be in [1, {E}] (every token takes at least one of the {E} experts of {m.name})")
        if r.k_max is not None:
            check("routing.k_max", 1 <= r.k_max <= E, f"must be in [1, {E}] or null (no cap)")
        if r.type == "dtopp" and r.k_max is not None and 1 <= r.k_max <= E:
            target = arch.top_k if r.target is None else r.target
            check("routing.k_max", target <= r.k_max, f"is below the target of {target} experts per token")
        check("routing.threshold", 0.0 < r.threshold <= 1.0, "must be in (0, 1]")
        if "routing.p_min" not in nonfinite and "routing.p_max" not in nonfinite and not 0.0 < r.p_min <= r.p_max <= 1.0:
            bad(f"routing.p_min={r.p_min}, routing.p_max={r.p_max} must satisfy 0 < p_min <= p_max <= 1")
        if r.p0 is not None:
            check("routing.p0", 0.0 < r.p0 <= 1.0, "must be in (0, 1] or null (derived from E and the target)")
        for key in ("kp", "ki"):
            if getattr(r, key) is not None:
                check(f"routing.{key}", getattr(r, key) >= 0,
                      "must be >= 0 (a negative gain drives the count away from the target)")
        if r.kp == 0 and r.ki == 0:
            bad("routing.kp=0 and routing.ki=0: the DTop-p controller needs a non-zero gain")
        if r.drn_scale_max is not None:
            check("routing.drn_scale_max", r.drn_scale_max > 0, "must be > 0 or null (derived from E, target, p_max)")
        for key in ("lb_coef", "entropy_coef"):
            if getattr(r, key) is not None:
                check(f"routing.{key}", getattr(r, key) >= 0, "must be >= 0 or null (the router's default)")
        check("routing.drn_log_scale_max", r.drn_log_scale_max >= 0, "must be >= 0 (0 fixes the DRN scale at 1)")
        check("routing.default_beta", 0.0 <= r.default_beta < 1.0, "must be in [0, 1)")
        check("routing.capacity_factor", 0.0 < r.capacity_factor <= E / arch.top_k,
              f"must be in (0, E/K = {E / arch.top_k:g}] (at E/K every expert takes every token)")
        check("routing.bias_rate", r.bias_rate > 0, "must be > 0 (DeepSeek-V3: 1e-3)")
        if r.balance_bias and r.type == "expert_choice":
            bad("routing.balance_bias=true does not apply to routing.type=expert_choice: every expert takes exactly "
                "C tokens, the load is balanced by construction")

    # ----- data
    check("data.num_workers", d.num_workers >= 0, "must be >= 0 (0: load in the training process)")
    # data.path is checked when the data is opened: shipped configs leave it to the command line

    # ----- train
    check("train.run_dir", bool(t.run_dir), "must name a folder")
    if t.run_name is not None:
        name = t.run_name
        check("train.run_name", name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name,
              "must be one folder name inside train.run_dir (no '/', not '..' or empty)")
    check("train.steps", t.steps >= 1, "must be >= 1")
    check("train.grad_accum", t.grad_accum >= 1, "must be >= 1")
    check("train.global_batch_size", t.global_batch_size >= 1, "must be >= 1")
    if t.global_batch_size >= 1 and t.grad_accum >= 1:
        denom = (num_processes or 1) * t.grad_accum
        if t.global_batch_size % denom:
            bad(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                + (f"num_processes ({num_processes}) x " if num_processes else "")
                + f"train.grad_accum ({t.grad_accum}) = {denom}")
    check("train.expert_parallel", t.expert_parallel >= 1, "must be >= 1 (1: every process holds every expert)")
    if t.expert_parallel > 1:
        ep = f"train.expert_parallel={t.expert_parallel}"
        if arch is not None and not arch.is_moe:
            bad(f"{ep} needs a MoE model (a name like DiT-S/2-E8K2); {m.name} is dense")
        elif arch is not None and arch.num_experts % t.expert_parallel:
            bad(f"{ep} must divide the {arch.num_experts} experts per MoE layer of {m.name}")
        if num_processes is not None and (t.expert_parallel > num_processes or num_processes % t.expert_parallel):
            bad(f"{ep} must divide the number of processes ({num_processes}); launch with torchrun "
                f"--nproc_per_node M where M is a multiple of {t.expert_parallel}")
        if t.strategy == "fsdp":
            bad(f"{ep} with train.strategy=fsdp is not supported yet (fsdp over the data-parallel dimension is not "
                "built); use train.strategy=ddp, which trains the non-expert part with ddp over all processes")
        if t.mixed_precision == "fp16":
            bad(f"{ep} with train.mixed_precision=fp16: the gradient scaler would check different expert shards on "
                "each process; use bf16")
    if t.strategy == "fsdp" and t.compile:
        bad("train.compile=true with train.strategy=fsdp: compiled blocks under FSDP2 have not been tested yet; "
            "use one of the two")
    if t.strategy == "fsdp" and t.mixed_precision == "fp16":
        bad("train.strategy=fsdp with train.mixed_precision=fp16: the sharded path has no gradient scaler; use bf16")
    check("train.lr", t.lr > 0, "must be > 0")
    check("train.weight_decay", t.weight_decay >= 0, "must be >= 0")
    if "train.betas" not in nonfinite and not all(0.0 <= b < 1.0 for b in t.betas):
        bad(f"train.betas={list(t.betas)} must both be in [0, 1)")
    check("train.warmup_steps", t.warmup_steps >= 0, "must be >= 0")
    check("train.min_lr_ratio", 0.0 <= t.min_lr_ratio <= 1.0, "must be in [0, 1]")
    if t.grad_clip is not None:
        check("train.grad_clip", t.grad_clip > 0, "must be > 0 or null (no clipping)")
    check("train.ema_decay", 0.0 <= t.ema_decay < 1.0, "must be in [0, 1)")
    check("train.log_every", t.log_every >= 1, "must be >= 1")
    check("train.ckpt_every", t.ckpt_every >= 1, "must be >= 1")
    check("train.keep_last", t.keep_last >= 1, "must be >= 1")
    check("train.sample_every", t.sample_every >= 0, "must be >= 0 (0: only at the end)")
    if t.compile and compile_problem():
        bad(f"train.compile=true: {compile_problem()}")

    # ----- diffusion and sample
    g = cfg.diffusion
    if objective_problem(g.objective, m.learn_sigma):
        bad(objective_problem(g.objective, m.learn_sigma))
    check("diffusion.time_shift", g.time_shift > 0, "must be > 0 (1 = no shift)")
    check("diffusion.t_std", g.t_std > 0, "must be > 0")
    if g.objective != "flow":
        flow_only = [f"diffusion.{k}={getattr(g, k)!r}" for k, v in (("t_sampling", "uniform"), ("t_mean", 0.0),
                     ("t_std", 1.0), ("time_shift", 1.0)) if getattr(g, k) != v]
        if flow_only:
            bad(f"{', '.join(flow_only)} only apply to diffusion.objective=flow (the objective is {g.objective})")
    problems.extend(p for p in sample_problems(s, g.objective, m.in_channels, name=lambda f: f"sample.{f}")
                    if p.split(":")[0] not in nonfinite)

    if problems:
        raise ConfigError(f"invalid configuration ({len(problems)} problem{'s' * (len(problems) > 1)}): "
                          + "; ".join(problems))


def _value(cfg: ExperimentConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)
