"""Sampling: DDPM and flow samplers with classifier-free guidance, grids, and bulk sampling for FID.

One file per job:

    settings.py   SampleConfig resolved against the objective (default sampler and steps, time shift), checks
    solvers.py    DDPM: diffusers DDPM / DDIM / DPM-Solver++ schedulers; flow: Euler, Heun, Euler-Maruyama SDE
    loop.py       per-sample seeds and generators, labels, CFG with a guidance interval, ``sample_latents``
    grid.py       labelled grids (``sample_grid``) and the trainer's EMA grid (``training_grid``)
    bulk.py       N samples to a folder + ADM npz, resumable across processes; metrics of the folder (``generate``)
    experts.py    activated experts per token while sampling (MoE models; a dit_moe.models.routing_tap.RoutingTap)
    calibrate.py  DTop-p: the threshold that makes sampling activate K experts per token
    flags.py      the sampling command-line flags, shared by sample.py, analyze and the demo
    cli.py        ``dit-moe sample`` (= ``python sample.py``)

A checkpoint becomes a sampler through ``dit_moe.inference.load`` (model, objective, decoder, data info, the
checkpoint's sample defaults); the time convention is in dit_moe/diffusion/__init__.py.

Names are imported from their submodule on first use, so ``import dit_moe.sampling.flags`` (argument parsers) does not
load torch.
"""
import importlib

_EXPORTS = {
    "settings": ("SampleConfig", "resolve_settings", "guidance_scale", "SAMPLERS",
                 "DDPM_SAMPLERS", "FLOW_SAMPLERS", "ALL_SAMPLERS", "DEFAULT_STEPS"),
    "errors": ("SamplingError",),
    "solvers": ("SCHEDULE", "make_scheduler", "scheduler_step_kwargs", "flow_grid", "euler", "heun", "sde", "solve",
                "num_model_calls"),
    "loop": ("LABEL_POLICIES", "derive_seed", "sample_seed", "make_generators", "make_labels", "check_labels",
             "initial_noise", "objective_for", "sample_latents"),
    "grid": ("make_grid", "short_name", "resolve_classes", "grid_labels", "sample_grid", "training_grid"),
    "experts": ("expert_tap", "summarize_active", "format_active", "has_routers"),
    "calibrate": ("require_dtopp", "calibrate_threshold"),
    "bulk": ("SingleProcess", "existing_indices", "write_npz", "read_samples", "sample_to_folder", "Evaluation",
             "evaluate_samples", "sample_accuracy", "generate", "IMAGE_DIR", "NPZ_FILE", "INFO_FILE", "STATS_DIR",
             "METRICS_FILE"),
    "flags": ("FLAGS", "add_checkpoint_arguments", "add_sampler_arguments", "add_class_arguments", "flag_overrides",
              "check_sample_flags", "settings_from_args"),
    "cli": ("add_arguments", "run", "main"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
