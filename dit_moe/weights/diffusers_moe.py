"""dit-moe models (MoE included) in diffusers: a ``ModelMixin`` transformer and a ``DiffusionPipeline``.

    from dit_moe.weights.diffusers_moe import DiTMoEPipeline
    pipe = DiTMoEPipeline.from_pretrained("exported/my-moe")        # written by dit-moe convert --to diffusers
    images = pipe(class_labels=[207, 360], num_inference_steps=250, guidance_scale=1.5,
                  generator=torch.Generator().manual_seed(0)).images

diffusers' ``DiTTransformer2DModel`` has one dense MLP per block, so an MoE model cannot become one; here the
network stays dit-moe's own DiT (routers, experts, persistent router buffers), wrapped as ``DiTMoETransformer2DModel``
whose config is the checkpoint's model and routing sections, so ``save_pretrained`` / ``from_pretrained`` work as for
any diffusers model. Loading needs diffusers and dit_moe, nothing else.

Schedulers, chosen by the checkpoint's objective so that the pipeline computes what ``dit-moe sample`` computes:

* DDPM checkpoints: ``DDPMScheduler`` on the training schedule (linear betas 1e-4..0.02, T = 1000),
  ``timestep_spacing="linspace"`` (ADM's respacing) and ``variance_type="learned_range"`` for learned-sigma models:
  the scheduler consumes all 2C output channels, as our ``ddpm`` sampler (DiT's protocol) does. diffusers'
  ``DiTPipeline`` instead drops the variance channels and steps a DDIM/DPM scheduler.
* flow checkpoints: ``FlowMatchEulerDiscreteScheduler`` with the training ``time_shift``: its sigmas are our grid
  ``shift_time(linspace(1, 0, steps + 1))`` and its step x + (sigma_next - sigma) v is our ``euler`` sampler; the
  network sees timestep 1000 sigma, as in training.

Guidance is the model's own batched ``forward_with_cfg`` (conditional + null class in one forward): the first
``guidance_channels`` channels guided (all latent channels by default, 3 = DiT's legacy), learned-variance channels
conditional, and no guidance at noise levels outside ``guidance_interval`` -- the pipeline config carries both from
the checkpoint's sampling defaults. ``guidance_scale`` 1 runs the conditional half only.

Noise. As in diffusers, a list of generators (one per image) draws each image's noise from its own generator; with
``generator=[torch.Generator().manual_seed(s) for s in dit_moe.sampling.loop seeds]`` (``make_generators``) the
pipeline reproduces ``dit-moe sample`` image for image (tests/test_diffusers_moe.py states the tolerance).

Layering: the one module of weights/ that reaches up, to ``dit_moe.inference.load`` and the sampling settings, so
that the pipeline is built from the same bundle and defaults ``dit-moe sample`` uses instead of a second reading of
them. Saved pipelines name this module in ``model_index.json``: it must stay at this path.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from diffusers import (AutoencoderKL, ConfigMixin, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler,
                       ImagePipelineOutput, ModelMixin)
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from ..config import ModelConfig, RoutingConfig, SampleConfig, from_dict
from ..diffusion import DDPMObjective, TIMESTEP_SCALE
from ..errors import DitMoeError
from ..inference import load
from ..registry import build_model
from ..sampling.settings import SAMPLERS, resolve_settings
from .outputs import one_line, replace_dir

__all__ = ["DiTMoETransformer2DModel", "DiTMoEPipeline", "PipelineError", "make_pipeline_scheduler",
           "pipeline_from_model", "pipeline_from_checkpoint", "export_pipeline"]

# The training noise schedule (dit_moe.sampling.solvers.SCHEDULE, DiT's recipe).
_DDPM_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


class PipelineError(DitMoeError, ValueError):
    """Inputs the pipeline cannot run with (labels, steps, an unknown scheduler); the message names the value."""


class DiTMoETransformer2DModel(ModelMixin, ConfigMixin):
    """dit-moe's DiT (dense or MoE) as a diffusers model. Config: ``model`` and ``routing``, the checkpoint's
    ModelConfig and RoutingConfig as dicts. Weights: the DiT's state dict under ``net.``.

    ``forward(sample (N, C, h, w), timestep (N,), class_labels (N,), guidance_scale=1, guidance_channels=None)``
    -> (N, C or 2C, h, w): the model's ``forward_with_cfg`` (guided prediction, learned variance conditional).
    """

    @register_to_config
    def __init__(self, model: dict, routing: dict):
        super().__init__()
        self.net = build_model(from_dict(ModelConfig, dict(model), "model"),
                               from_dict(RoutingConfig, dict(routing), "routing"))

    @classmethod
    def from_dit(cls, net: torch.nn.Module) -> "DiTMoETransformer2DModel":
        """Wrap a built dit-moe model (``registry.build_model``), weights included."""
        wrapper = cls(model=asdict(net.model_config), routing=asdict(net.routing_config))
        wrapper.net.load_state_dict(net.state_dict())
        return wrapper

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def learn_sigma(self) -> bool:
        return bool(self.net.learn_sigma)

    def forward(self, sample, timestep, class_labels, guidance_scale: float = 1.0,
                guidance_channels: Optional[int] = None):
        return self.net.forward_with_cfg(sample, timestep, class_labels, float(guidance_scale), guidance_channels)


def make_pipeline_scheduler(objective, clip_denoised: bool = False, time_shift: Optional[float] = None):
    """The diffusers scheduler that reproduces ``dit-moe sample``'s ddpm sampler (DDPM objective) or euler sampler
    (flow objective, ``time_shift`` default the objective's) for ``objective`` (``dit_moe.diffusion``)."""
    if objective.kind == "ddpm":
        return DDPMScheduler(**_DDPM_SCHEDULE, prediction_type="epsilon",
                             variance_type="learned_range" if objective.learn_sigma else "fixed_large",
                             timestep_spacing="linspace", clip_sample=bool(clip_denoised), clip_sample_range=1.0)
    if objective.kind == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(TIMESTEP_SCALE),
                                               shift=float(objective.time_shift if time_shift is None
                                                           else time_shift))
    raise PipelineError(f"objective {objective.kind!r} has no diffusers scheduler here (ddpm or flow)")


class DiTMoEPipeline(DiffusionPipeline):
    """Class-conditional generation with a dit-moe model, like diffusers' ``DiTPipeline``.

    Components: ``transformer`` (DiTMoETransformer2DModel), ``scheduler`` (DDPMScheduler for DDPM checkpoints,
    FlowMatchEulerDiscreteScheduler for flow ones), ``vae`` (AutoencoderKL, None for pixel-space models).
    Config: ``id2label`` (class names), ``scaling_factor`` / ``shift_factor`` of the latents, the checkpoint's
    sampling defaults ``guidance_scale``, ``num_inference_steps``, ``guidance_channels``, ``guidance_interval``.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: DiTMoETransformer2DModel, scheduler, vae: Optional[AutoencoderKL] = None,
                 id2label: Optional[dict] = None, scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 guidance_scale: float = 1.0, num_inference_steps: int = 250,
                 guidance_channels: Optional[int] = None, guidance_interval: Optional[Sequence[float]] = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(
            id2label={str(k): str(v) for k, v in (id2label or {}).items()} or None,
            scaling_factor=float(scaling_factor), shift_factor=float(shift_factor),
            guidance_scale=float(guidance_scale), num_inference_steps=int(num_inference_steps),
            guidance_channels=guidance_channels,
            guidance_interval=list(guidance_interval) if guidance_interval is not None else None)
        self.labels = {}
        for key, value in (id2label or {}).items():
            for label in str(value).split(","):
                self.labels[label.strip()] = int(key)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class names (``id2label``'s, comma-separated synonyms each) -> class ids, as DiTPipeline."""
        names = [label] if isinstance(label, str) else list(label)
        missing = [n for n in names if n not in self.labels]
        if missing:
            raise PipelineError(f"unknown class name(s) {missing[:5]}; known: {sorted(self.labels)[:20]}")
        return [self.labels[n] for n in names]

    def _guidance_at(self, level: float, scale: float) -> float:
        interval = self.config.guidance_interval
        if interval is not None and not interval[0] <= level <= interval[1]:
            return 1.0
        return scale

    def _set_timesteps(self, steps: int, device) -> None:
        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            # the unshifted grid without its final 0: the scheduler shifts it and appends the terminal 0
            self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist(), device=device)
        elif isinstance(self.scheduler, DDPMScheduler):
            self.scheduler.set_timesteps(steps, device=device)
        else:
            raise PipelineError(f"scheduler {type(self.scheduler).__name__} is not supported; DDPMScheduler (ddpm) "
                                "or FlowMatchEulerDiscreteScheduler (flow)")

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> images (N, 3, H, W) in [0, 1]: the VAE, or the identity for pixel models (grey -> RGB)."""
        if self.vae is not None:
            z = latents.to(self.vae.dtype) / self.config.scaling_factor + self.config.shift_factor
            x = self.vae.decode(z).sample.float()
        else:
            x = latents.float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
        return (x / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: Optional[float] = None, generator=None,
                 num_inference_steps: Optional[int] = None, output_type: str = "pil", return_dict: bool = True):
        """Images of ``class_labels`` (ids or class names), as ``DiTPipeline.__call__``.

        guidance_scale / num_inference_steps: default the checkpoint's sampling defaults (pipeline config).
        generator: a torch.Generator, or one per image (each image's noise from its own, as ``dit-moe sample``).
        output_type: "pil", "np" (N, H, W, 3) in [0, 1], "pt" (N, 3, H, W) in [0, 1] or "latent" (N, C, h, w).
        """
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        class_labels = [self.get_label_ids(c)[0] if isinstance(c, str) else int(c) for c in class_labels]
        net = self.transformer
        bad = [c for c in class_labels if not 0 <= c < net.num_classes]
        if bad:
            raise PipelineError(f"class id(s) {bad[:5]} out of range [0, {net.num_classes})")
        scale = float(self.config.guidance_scale if guidance_scale is None else guidance_scale)
        if scale != 1.0 and net.net.model_config.class_dropout_prob <= 0:
            raise PipelineError(f"guidance_scale={scale}: the model was trained without label dropout (no null "
                                "class), so it can only sample with guidance_scale=1")
        steps = int(self.config.num_inference_steps if num_inference_steps is None else num_inference_steps)
        if steps < 1:
            raise PipelineError(f"num_inference_steps={steps} must be >= 1")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise PipelineError(f"output_type {output_type!r} is not one of pil, np, pt, latent")
        device = self._execution_device
        size, C = net.net.model_config.input_size, net.in_channels
        n = len(class_labels)
        latents = randn_tensor((n, C, size, size), generator=generator, device=device,
                               dtype=next(net.parameters()).dtype)
        y = torch.tensor(class_labels, device=device)
        self._set_timesteps(steps, device)
        flow = isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler)
        learned_range = not flow and self.scheduler.config.variance_type == "learned_range"
        ddpm_levels = None if flow else DDPMObjective(learn_sigma=learned_range)
        if not flow:                            # the flow scheduler starts at sigma = 1 and scales nothing
            latents = latents * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = latents if flow else self.scheduler.scale_model_input(latents, t)
            if flow:
                level = float(t) / TIMESTEP_SCALE
                timestep = torch.full((n,), float(t), dtype=torch.float32, device=device)
            else:
                level = float(ddpm_levels.noise_level(int(t)))
                timestep = torch.full((n,), int(t), dtype=torch.long, device=device)
            out = net(x_in, timestep, y, self._guidance_at(level, scale), self.config.guidance_channels).float()
            if not learned_range:
                out = out[:, :C]                # flow: velocity; fixed variance: epsilon only
            latents = self.scheduler.step(out, t, latents, generator=generator).prev_sample
        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents(latents)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def pipeline_defaults(objective, sample_defaults) -> SampleConfig:
    """The checkpoint's sampling defaults for the pipeline's sampler (ddpm for DDPM, euler for flow): its steps,
    CFG scale, guidance channels/interval, clipping and time shift where it names that sampler, the sampler's
    defaults otherwise."""
    sampler = SAMPLERS[objective.kind][0]
    s = sample_defaults if sample_defaults is not None else SampleConfig()
    steps = s.steps if s.sampler in (None, sampler) else None
    keep = {k: getattr(s, k) for k in ("cfg_scale", "guidance_channels", "guidance_interval", "clip_denoised")}
    time_shift = s.time_shift if s.sampler in (None, sampler) else None
    return resolve_settings(SampleConfig(sampler=sampler, steps=steps, time_shift=time_shift, **keep), objective)


def pipeline_from_model(net: torch.nn.Module, objective, data_info: Optional[dict], sample_defaults=None,
                        vae: Optional[AutoencoderKL] = None) -> DiTMoEPipeline:
    """A DiTMoEPipeline around a built dit-moe model: scheduler from ``objective``, class names and latent scaling
    from ``data_info`` (a DataInfo dict), guidance defaults from ``sample_defaults`` (the checkpoint's SampleConfig,
    see ``pipeline_defaults``)."""
    info = data_info or {}
    names = info.get("class_names") or [str(i) for i in range(net.num_classes)]
    s = pipeline_defaults(objective, sample_defaults)
    return DiTMoEPipeline(
        transformer=DiTMoETransformer2DModel.from_dit(net).eval(),
        scheduler=make_pipeline_scheduler(objective, bool(s.clip_denoised), s.time_shift), vae=vae,
        id2label={i: n for i, n in enumerate(names)}, scaling_factor=float(info.get("scaling_factor", 1.0)),
        shift_factor=float(info.get("shift_factor", 0.0)), guidance_scale=float(s.cfg_scale),
        num_inference_steps=int(s.steps), guidance_channels=s.guidance_channels,
        guidance_interval=list(s.guidance_interval) if s.guidance_interval is not None else None)


def _load_vae(vae: Optional[str]) -> Optional[AutoencoderKL]:
    if vae is None:
        return None
    try:
        return AutoencoderKL.from_pretrained(vae)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot load the VAE {vae!r} for the pipeline ({one_line(e)}); pass --vae DIR (a local "
                            "AutoencoderKL) or --transformer-only") from None


def pipeline_from_checkpoint(checkpoint, which: str = "ema", vae: Optional[str] = None,
                             with_vae: bool = True) -> DiTMoEPipeline:
    """The DiTMoEPipeline of a dit-moe checkpoint (folder, run folder, Hub folder or cached Hub id): its weights
    (``ema`` or ``model``), objective, sampling defaults, class names and decoder (``vae`` overrides it)."""
    return _pipeline_from_bundle(load(checkpoint, weights=which, device="cpu", vae=vae), with_vae)


def _pipeline_from_bundle(bundle, with_vae: bool) -> DiTMoEPipeline:
    if with_vae and not bundle.decodable:
        raise PipelineError(f"{bundle.where}: no decoder for its {bundle.data_info.in_channels}-channel latents "
                            "(no data_info); pass --vae, or export --transformer-only")
    decoder = bundle.vae or bundle.data_info.vae
    return pipeline_from_model(bundle.model, bundle.objective, bundle.data_info.to_dict(), bundle.defaults,
                               vae=_load_vae(decoder) if with_vae else None)


def export_pipeline(checkpoint, out, *, which: str = "ema", vae: Optional[str] = None,
                    transformer_only: bool = False) -> None:
    """Write the DiTMoEPipeline of ``checkpoint`` to the (prepared, absent or replaceable) folder ``out`` with
    ``save_pretrained``; with ``transformer_only``, or when nothing can decode the latents (a checkpoint without
    data_info, as for dense exports), only ``out/transformer``. Atomic: a temporary sibling renamed."""
    out = Path(out)
    bundle = load(checkpoint, weights=which, device="cpu", vae=vae)
    transformer_only = transformer_only or not bundle.decodable
    pipe = _pipeline_from_bundle(bundle, with_vae=not transformer_only)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if transformer_only:
            pipe.transformer.save_pretrained(tmp / "transformer")
        else:
            pipe.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
