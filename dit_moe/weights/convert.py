"""Published DiT weights in (and out): facebookresearch/DiT files and diffusers DiT models as dit-moe checkpoints.

    dit-moe convert DiT-XL-2-256x256.pt --out checkpoints/DiT-XL-2-256
    dit-moe convert facebook/DiT-XL-2-256 --out checkpoints/DiT-XL-2-256-hf   # hub id or a local folder
    dit-moe convert checkpoints/my-dense --to diffusers --out exported/my-dense  # a DiTPipeline folder
    dit-moe convert runs/my-moe --to hub --out hub/my-moe [--push-to-hub me/my-moe]  # Hub folder + model card

Sources. A ``.pt``/``.pth`` file of facebookresearch/DiT: a plain state dict (the published DiT-XL-2-256x256.pt and
-512x512.pt hold the EMA weights) or a training checkpoint ``{"model", "ema", "opt", "args"}`` (model and EMA are
both kept; the optimizer state is dropped: fine-tuning starts a new optimizer). A ``.safetensors`` file in DiT
layout. A diffusers ``DiTTransformer2DModel``: a pipeline folder (``transformer/``, ``vae/``), a transformer folder,
or a hub id such as ``facebook/DiT-XL-2-256`` (from the Hugging Face cache when offline). Architecture, patch,
input size, channels, learned sigma and classes are read from the tensor shapes (and the diffusers config) and
checked against the registry; a file that fits no registry name is refused with its shapes.

Numerical conventions. diffusers' DiT differs from the original in two places that do not show in the weights:
its timestep embedding divides the frequency exponent by (half - 1) (``Timesteps(downscale_freq_shift=1)``), the
original by half; and the LayerNorm before each MLP uses the config's ``norm_eps`` (default 1e-5), the original
1e-6. On random weights the first changes outputs by ~10% of their scale, the second by ~5e-6. A converted model
records both in its ModelConfig (``timestep_freq_shift``, ``mlp_norm_eps``) instead of absorbing them: by default
(``--convention`` = the source's own) a converted model computes exactly what its source computes (a DiT file
DiT's function, a diffusers folder diffusers' function), and every model trained here keeps DiT's defaults
(shift 0, eps 1e-6), so existing checkpoints are unchanged. The hub's ``facebook/DiT-XL-2-*`` were converted
from the original DiT weights, which were trained under DiT's conventions: ``--convention dit`` reproduces the
original code (and its published FIDs), the default reproduces diffusers' ``DiTPipeline``.

Safe loading. ``.pt`` files are read with ``torch.load(weights_only=True)``, which executes no pickled code. DiT's
training checkpoints hold an ``argparse.Namespace`` in ``args``; that one class is allowed (scoped, with
``torch.serialization.safe_globals``), its fields are kept in the checkpoint's metadata and cross-checked against
the shapes. A file with any other Python object is refused, with the object's name.

The checkpoint carries DiT's evaluation protocol as its sampling defaults (DDPM, 250 steps, learned sigma, cfg
1.5, guidance on the first 3 latent channels as DiT's sampler does), the VAE (``stabilityai/sd-vae-ft-ema`` for
DiT files, the pipeline's own ``vae/`` for diffusers folders, ``--vae`` to choose), its scaling factor and the
ImageNet class names (torchvision's list, no download). Export (``--to diffusers``) is the inverse mapping for
dense models (MoE models export as a ``DiTMoEPipeline``, dit_moe/weights/diffusers_moe.py); diffusers hard-codes
``downscale_freq_shift=1``, so a model with DiT's timestep convention exports with a warning that diffusers will
compute a slightly different function.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from safetensors import SafetensorError
from safetensors.torch import load_file
from torchvision.models import ResNet50_Weights

from ..checks import check_at_least
from ..config import DataConfig, ExperimentConfig, ModelConfig, SampleConfig, TrainConfig
from ..data import DataInfo
from ..registry import parse_name
from .checkpoint import EMA_FILE, is_checkpoint, load_checkpoint, save_checkpoint
from .export import export_diffusers
from .hub import export_hub
from .layouts import (check_state, detect_layout, diffusers_model_config, diffusers_to_dit_moe, dit_to_dit_moe,
                      infer_dit_config, module_from_state)
from .outputs import ConvertError, one_line, prepare_output

__all__ = ["Imported", "read_source", "save_imported", "dit_experiment", "imagenet_class_names", "add_arguments", "run",
           "main"]

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"     # DiT's sample_ddp.py default for its FID runs
SD_VAE_SCALING, SD_VAE_FACTOR = 0.18215, 8
CONVENTIONS = ("dit", "diffusers")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Imported:
    """Weights read from a source, in dit-moe layout, with everything the checkpoint will describe."""
    source: str
    kind: str                         # "dit" | "diffusers" | "dit-moe"
    model_config: ModelConfig
    model: dict
    ema: Optional[dict]
    experiment: ExperimentConfig
    data_info: Optional[dict]
    step: int = 0
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
#                                          Reading a source
# ---------------------------------------------------------------------------------------------------------

def read_source(src: str | os.PathLike, *, convention: Optional[str] = None, vae: Optional[str] = None,
                input_size: Optional[int] = None) -> Imported:
    """Any supported source (module docstring) -> Imported. A dit-moe checkpoint or run folder is read as is."""
    if convention is not None and convention not in CONVENTIONS:
        raise ConvertError(f"convention {convention!r} is not one of {CONVENTIONS}")
    path = Path(src)
    if path.is_file():
        return _read_weights_file(path, convention, vae, input_size)
    if path.is_dir():
        if is_checkpoint(path) or (path / "checkpoints").is_dir():
            return _read_dit_moe(path)
        if (path / "model_index.json").is_file() or (path / "config.json").is_file():
            return _read_diffusers(*_load_local_diffusers(path), str(path), convention, vae, input_size)
        raise ConvertError(f"{path}: not a dit-moe checkpoint, a diffusers DiT folder (model_index.json or "
                           "transformer config.json) or a weights file")
    if _HUB_ID.match(str(src)):
        return _read_diffusers(*_load_hub_diffusers(str(src)), str(src), convention, vae, input_size)
    raise ConvertError(f"{src}: no such file or folder (nor a Hugging Face hub id like facebook/DiT-XL-2-256)")


def _conventions(convention: Optional[str], source_kind: str, norm_eps: float = 1e-5) -> dict:
    convention = convention or source_kind
    if convention == "dit":
        return dict(timestep_freq_shift=0, mlp_norm_eps=1e-6)
    if source_kind != "diffusers":
        raise ConvertError("--convention diffusers applies to diffusers models; DiT files use DiT's conventions")
    return dict(timestep_freq_shift=1, mlp_norm_eps=float(norm_eps))


def _torch_load(path: Path) -> object:
    # DiT's training checkpoints pickle their argparse options; that class (plain data) is the only one allowed.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise ConvertError(f"{path}: holds a Python object ({found[1]}) that torch.load(weights_only=True) refuses; "
                               "not loaded, for safety (re-save only its state dict)") from None
        raise ConvertError(f"{path}: not a PyTorch checkpoint ({one_line(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise ConvertError(f"{path}: not a PyTorch checkpoint ({one_line(e)})") from None


def _as_state_dict(obj: object, where: str) -> dict:
    if not isinstance(obj, dict) or not obj:
        raise ConvertError(f"{where}: expected a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConvertError(f"{where}: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor")
    if all(k.startswith("module.") for k in obj):                # saved from a DDP-wrapped model
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _unwrap(obj: object, where: str) -> tuple[Optional[dict], Optional[dict], dict]:
    """(model state, EMA state, other top-level entries) of a loaded file."""
    if isinstance(obj, dict) and any(k in obj for k in ("model", "ema")) and \
            all(isinstance(obj.get(k), (dict, type(None))) for k in ("model", "ema")):
        model = _as_state_dict(obj["model"], f"{where}['model']") if obj.get("model") is not None else None
        ema = _as_state_dict(obj["ema"], f"{where}['ema']") if obj.get("ema") is not None else None
        return model, ema, {k: v for k, v in obj.items() if k not in ("model", "ema")}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return _as_state_dict(obj["state_dict"], f"{where}['state_dict']"), None, {}
    if isinstance(obj, dict) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConvertError(f"{where}: not a DiT checkpoint (top-level keys {sorted(map(str, obj))[:8]}; expected a state "
                           "dict or a dict with 'model'/'ema')")
    return _as_state_dict(obj, where), None, {}


def _read_weights_file(path: Path, convention, vae, input_size) -> Imported:
    where = str(path)
    if path.suffix == ".safetensors":
        try:
            obj = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConvertError(f"{path}: not a safetensors file ({one_line(e)})") from None
    else:
        obj = _torch_load(path)
    model, ema, extra = _unwrap(obj, where)
    for sd, tag in ((model, "model"), (ema, "ema")):
        layout = detect_layout(sd) if sd is not None else "dit"
        if layout == "diffusers":
            raise ConvertError(f"{where}: diffusers-layout weights without their config; convert the diffusers folder "
                               "(the one holding transformer/config.json) instead")
        if layout != "dit":
            raise ConvertError(f"{where}: {'an MoE' if layout == 'moe' else 'not a DiT'} state dict ({tag}: first keys "
                               f"{sorted(sd)[:4]}); expected facebookresearch/DiT's dense layout (x_embedder.proj.weight, ...)")
    primary = ema if ema is not None else model
    cfg = infer_dit_config(primary, where, input_size, **_conventions(convention, "dit"))
    args = extra.get("args")
    args = dict(vars(args)) if isinstance(args, argparse.Namespace) else None
    if args:
        _check_args(args, cfg, where)
    states = {tag: dit_to_dit_moe(sd) for tag, sd in (("model", model), ("ema", ema)) if sd is not None}
    for tag, sd in states.items():
        check_state(sd, cfg, f"{where} ({tag})")
    if vae is None and cfg.in_channels == 4:
        vae = f"stabilityai/sd-vae-ft-{args['vae']}" if args and args.get("vae") in ("ema", "mse") else DEFAULT_VAE
    single = len(states) == 1
    wrapped = isinstance(obj, dict) and ("model" in obj or "ema" in obj)
    origin = ("'ema' entry" if model is None else "'model' entry") if wrapped else \
        "state dict (DiT's published files hold EMA weights)"
    meta = {"converted_from": str(path.resolve()), "source_format": "facebookresearch/DiT",
            "weights": f"the file's {origin} as model.safetensors (no ema.safetensors: EMA readers fall back to it)"
            if single else "model and ema from the file's 'model' and 'ema' entries",
            "dropped": sorted(k for k in extra if k != "args"), **({"dit_args": _plain(args)} if args else {})}
    return Imported(str(path), "dit", cfg, states.get("model", states.get("ema")), None if single else states["ema"],
                    dit_experiment(cfg), _data_info(cfg, vae, None, str(path.resolve())), meta=meta)


def _plain(d: dict) -> dict:
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in d.items()}


def _check_args(args: dict, cfg: ModelConfig, where: str) -> None:
    """DiT's own record of the run must agree with what the shapes say."""
    checks = [("model", cfg.name), ("num_classes", cfg.num_classes)]
    if "image_size" in args and cfg.in_channels == 4:
        checks.append(("image_size", cfg.input_size * SD_VAE_FACTOR))
    for key, ours in checks:
        if key in args and args[key] != ours:
            raise ConvertError(f"{where}: args.{key}={args[key]!r} but the tensor shapes say {ours!r}")


def _load_local_diffusers(path: Path):
    """A pipeline folder or a transformer folder -> (loaded DiTTransformer2DModel, pipeline folder or None)."""
    pipeline = path if (path / "model_index.json").is_file() else (
        path.parent if (path.parent / "model_index.json").is_file() else None)
    tdir = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    if not (tdir / "config.json").is_file():
        raise ConvertError(f"{path}: diffusers pipeline without transformer/config.json")
    cls = json.loads((tdir / "config.json").read_text()).get("_class_name")
    if cls not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise ConvertError(f"{tdir / 'config.json'}: a {cls}, not a DiTTransformer2DModel")
    from diffusers import DiTTransformer2DModel   # here, not at the top: diffusers takes seconds to import

    try:
        transformer = DiTTransformer2DModel.from_pretrained(str(tdir))
    except (OSError, ValueError, RuntimeError, NotImplementedError) as e:
        raise ConvertError(f"{tdir}: cannot load the DiTTransformer2DModel ({one_line(e)})") from None
    return transformer, pipeline


def _load_hub_diffusers(repo_id: str):
    """A hub id -> (DiTTransformer2DModel, local snapshot folder), from the cache when offline."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel   # here, not at the top: seconds to import

    try:
        with warnings.catch_warnings():     # diffusers passes a deprecated hub argument; not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            transformer = DiTTransformer2DModel.from_pretrained(repo_id, subfolder="transformer")
    except (OSError, ValueError) as e:
        # Offline, diffusers reports a missing config.json, which misleads: say where the files must be instead.
        why = " (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else f" [{one_line(e)}]"
        raise ConvertError(
            f"{repo_id}: not a local path, and its transformer is neither on the Hugging Face hub{why} nor in the "
            f"cache {constants.HF_HUB_CACHE}; on a machine with internet run `hf download {repo_id} "
            "--local-dir DIR`, copy DIR here and convert DIR (or copy that machine's hub cache there)") from None
    found = try_to_load_from_cache(repo_id, "transformer/config.json")
    snapshot = Path(found).parent.parent if isinstance(found, str) else None
    try:    # the VAE is what the checkpoint decodes with: make sure it is in the cache next to the transformer
        AutoencoderKL.load_config(repo_id, subfolder="vae")
        AutoencoderKL.from_pretrained(repo_id, subfolder="vae")
    except (OSError, ValueError) as e:
        print(f"note: {repo_id} has no usable vae/ ({one_line(e)}); recording {DEFAULT_VAE}", file=sys.stderr)
    try:
        hf_hub_download(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 - optional: only the class names come from it
        pass
    return transformer, snapshot


def _read_diffusers(transformer, pipeline: Optional[Path], where: str, convention, vae, input_size) -> Imported:
    config = dict(transformer.config)
    cfg = diffusers_model_config(config, where, input_size,
                                 **_conventions(convention, "diffusers", config.get("norm_eps", 1e-5)))
    state = diffusers_to_dit_moe(transformer.state_dict(), parse_name(cfg.name).depth, where)
    check_state(state, cfg, where)
    id2label = None
    if pipeline is not None:
        if vae is None and (pipeline / "vae" / "config.json").is_file():
            vae = str((pipeline / "vae").resolve())
        index = json.loads((pipeline / "model_index.json").read_text()) if (pipeline / "model_index.json").is_file() else {}
        id2label = index.get("id2label")
    if vae is None and cfg.in_channels == 4:
        print(f"note: {where} has no vae/ folder; recording {DEFAULT_VAE} as its decoder (--vae to choose)", file=sys.stderr)
        vae = DEFAULT_VAE
    names = [str(id2label[str(i)]).split(",")[0].strip() for i in range(cfg.num_classes)] if id2label else None
    meta = {"converted_from": where, "source_format": "diffusers DiTTransformer2DModel",
            "diffusers_config": {k: v for k, v in config.items() if not k.startswith("_")}}
    return Imported(where, "diffusers", cfg, state, None, dit_experiment(cfg), _data_info(cfg, vae, names, where),
                    meta=meta)


def _read_dit_moe(path: Path) -> Imported:
    ckpt = load_checkpoint(path)
    ema = ckpt.state_dict("ema") if (ckpt.path / EMA_FILE).is_file() else None
    experiment = ckpt.experiment or ExperimentConfig(model=ckpt.model_config, routing=ckpt.routing_config)
    return Imported(str(ckpt.path), "dit-moe", ckpt.model_config, ckpt.state_dict("model"), ema, experiment,
                    ckpt.data_info, ckpt.step, dict(ckpt.meta))


# ---------------------------------------------------------------------------------------------------------
#                             DiT's protocol, the decoder, the class names
# ---------------------------------------------------------------------------------------------------------

def dit_experiment(cfg: ModelConfig) -> ExperimentConfig:
    """The experiment a converted model carries: DiT's sampling protocol for its FIDs, DiT's training recipe."""
    sample = SampleConfig(sampler="ddpm", steps=250, cfg_scale=1.5, guidance_channels=3 if cfg.in_channels == 4 else None,
                          num_per_class=4, seed=0, batch_size=32)
    train = TrainConfig(global_batch_size=256, lr=1e-4, weight_decay=0.0, grad_clip=None, ema_decay=0.9999)
    return ExperimentConfig(model=cfg, data=DataConfig(source="latents"), train=train, sample=sample)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in index order, from torchvision's weight metadata (shipped, no download)."""
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _vae_geometry(vae: str, channels: int) -> tuple[float, float, int]:
    """(scaling factor, shift factor, spatial down-sampling) from a local VAE's config, else the SD VAEs' values."""
    config = Path(vae) / "config.json"
    if not config.is_file():
        return SD_VAE_SCALING, 0.0, SD_VAE_FACTOR
    c = json.loads(config.read_text())
    if int(c.get("latent_channels", channels)) != channels:
        raise ConvertError(f"{config}: the VAE has {c['latent_channels']} latent channels, the model {channels}")
    return float(c.get("scaling_factor", SD_VAE_SCALING)), float(c.get("shift_factor") or 0.0), \
        2 ** (len(c.get("block_out_channels", [0] * 4)) - 1)


def _data_info(cfg: ModelConfig, vae: Optional[str], names: Optional[list], source: str) -> dict:
    if vae is not None and Path(vae).is_dir():
        vae = str(Path(vae).resolve())          # a local folder: recorded absolute, so any working directory finds it
    if names is None:
        names = imagenet_class_names() if cfg.num_classes == 1000 else [str(i) for i in range(cfg.num_classes)]
    scaling, shift, factor = _vae_geometry(vae, cfg.in_channels) if vae else (1.0, 0.0, 1)
    return DataInfo(num_classes=cfg.num_classes, in_channels=cfg.in_channels, latent_size=cfg.input_size,
                    image_size=cfg.input_size * factor, class_names=tuple(names), vae=vae, scaling_factor=scaling,
                    source=source, shift_factor=shift).to_dict()


# ---------------------------------------------------------------------------------------------------------
#                                             Writing
# ---------------------------------------------------------------------------------------------------------

def save_imported(imp: Imported, out: str | os.PathLike, *, overwrite: bool = False, routing=None) -> Path:
    """Write ``imp`` as a dit-moe checkpoint folder (atomically, through checkpoint.save_checkpoint)."""
    out = prepare_output(out, overwrite, is_checkpoint, "dit-moe checkpoint")
    routing = routing if routing is not None else imp.experiment.routing
    model = module_from_state(imp.model_config, imp.model, routing)
    ema = module_from_state(imp.model_config, imp.ema, routing) if imp.ema is not None else None
    return save_checkpoint(out, model, ema, step=imp.step, experiment=imp.experiment, data_info=imp.data_info,
                           meta=imp.meta)


# ---------------------------------------------------------------------------------------------------------
#                                            Command line
# ---------------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("source", help="DiT .pt/.safetensors file, diffusers DiT folder or hub id; with --to diffusers a "
                   "dit-moe checkpoint (or run folder)")
    p.add_argument("--out", required=True, help="output folder (a dit-moe checkpoint, a diffusers folder, or a Hub "
                   "folder)")
    p.add_argument("--to", choices=("dit-moe", "diffusers", "hub"), default="dit-moe",
                   help="direction (default dit-moe); hub: a Hugging Face Hub model folder with its model card "
                        "(dit_moe/weights/hub.py)")
    p.add_argument("--convention", choices=CONVENTIONS, help="timestep frequencies and MLP LayerNorm eps of the "
                   "converted model (default: the source's own; 'dit' for facebook/DiT-XL-2-* to match the original code)")
    p.add_argument("--vae", help="decoder to record (hub id or local AutoencoderKL folder); export: the pipeline's VAE")
    p.add_argument("--input-size", type=int, help="latent side, only for files without pos_embed")
    p.add_argument("--weights", choices=("ema", "model", "raw"), default="ema",
                   help="export: which weights (default ema; raw = model, the trained weights)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="--to hub: upload the folder (online, logged in)")
    p.add_argument("--private", action="store_true", help="--push-to-hub: create the repo private")
    p.add_argument("--metrics-json", action="append", default=[], metavar="PATH",
                   help="--to hub: a metrics JSON (dit-moe evaluate --out) to list in the model card; repeatable")
    p.add_argument("--transformer-only", action="store_true", help="export: only transformer/, no DiTPipeline")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output of the same kind")


def run(args: argparse.Namespace) -> Path:
    check_at_least("--input-size", args.input_size, 1, ConvertError)
    if Path(args.out).resolve() == Path(args.source).resolve():
        raise ConvertError(f"--out {args.out} is the source itself")
    if args.to == "hub":
        out = export_hub(args.source, args.out, weights="ema" if args.weights == "ema" else "raw",
                         overwrite=args.overwrite, push_to_hub=args.push_to_hub, private=args.private,
                         metrics_json=args.metrics_json)
        print(f"wrote {out} (Hub folder: config.json, model.safetensors, README.md; any dit-moe command takes it)")
        return out
    if args.push_to_hub:
        raise ConvertError("--push-to-hub needs --to hub")
    if args.to == "diffusers":
        out = export_diffusers(args.source, args.out, which="ema" if args.weights == "ema" else "model", vae=args.vae,
                               transformer_only=args.transformer_only, overwrite=args.overwrite)
        moe = "DiTMoE" in (out / "transformer" / "config.json").read_text()
        model_cls, pipe_cls = ("DiTMoETransformer2DModel", "DiTMoEPipeline") if moe else \
            ("DiTTransformer2DModel", "DiTPipeline")
        print(f"wrote {out} (diffusers: {model_cls}.from_pretrained('{out}', subfolder='transformer')"
              f"{'' if not (out / 'model_index.json').is_file() else f', {pipe_cls}.from_pretrained({str(out)!r})'}"
              f"{'; from dit_moe.weights.diffusers_moe import ' + pipe_cls if moe else ''})")
        return out
    prepare_output(args.out, args.overwrite, is_checkpoint, "dit-moe checkpoint")   # fail before any loading
    imp = read_source(args.source, convention=args.convention, vae=args.vae, input_size=args.input_size)
    if imp.kind == "dit-moe":
        raise ConvertError(f"{args.source}: already a dit-moe checkpoint; use it directly, upcycle it "
                           "(dit-moe upcycle) or export it (--to diffusers)")
    out = save_imported(imp, args.out, overwrite=args.overwrite)
    cfg = imp.model_config
    print(f"wrote {out}: {cfg.name}, {cfg.in_channels}x{cfg.input_size}x{cfg.input_size} latents, {cfg.num_classes} "
          f"classes, learn_sigma={cfg.learn_sigma}, timestep_freq_shift={cfg.timestep_freq_shift}, mlp_norm_eps="
          f"{cfg.mlp_norm_eps:g}, {'model + ema' if imp.ema is not None else 'one set of weights'}; decoder "
          f"{(imp.data_info or {}).get('vae')}; sampling defaults: DDPM 250 steps, cfg 1.5, guidance on "
          f"{imp.experiment.sample.guidance_channels or 'all'} channels")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dit_moe.weights.convert``: the command's own entry (``dit-moe convert`` is the same)."""
    from ..cli import run_command   # the command line sits above this layer: reached only when run as a program

    return run_command("convert", argv, prog="python -m dit_moe.weights.convert", label="convert")


if __name__ == "__main__":
    sys.exit(main())
