"""The checkpoint format: one self-describing directory.

    <checkpoint>/
        config.json          format tag, step, model + routing config (enough to rebuild), full experiment config,
                             data description (VAE, scaling factor, classes) and free-form metadata
        model.safetensors    model state dict (parameters and persistent buffers: router controller, default vectors)
        ema.safetensors      EMA weights, same keys (optional)
        ...                  anything a ``write_extra`` callback adds (the trainer puts the Accelerate state here)

Writes are atomic: everything is written into a temporary sibling directory, flushed, then renamed into place,
so an interrupted save never leaves a half-written checkpoint under the final name. Loading the weights into a model
(the fit check) and building a model from a checkpoint: dit_moe/weights/build.py.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import ConfigError, ExperimentConfig, ModelConfig, RoutingConfig, from_dict
from ..errors import DitMoeError
from ..registry import parse_name

T = TypeVar("T")
FORMAT = "dit-moe/1"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"


class CheckpointError(DitMoeError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model; the message names the path."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_config: ModelConfig
    routing_config: RoutingConfig
    experiment: Optional[ExperimentConfig]
    data_info: Optional[dict]
    meta: dict = field(default_factory=dict)

    def state_dict(self, which: str = "ema") -> dict:
        """Load the weights: ``ema`` (falls back to ``model`` when no EMA was saved) or ``model``; weights whose
        fingerprint names another architecture or routing than this checkpoint's config.json are refused."""
        if which not in ("ema", "model"):
            raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
        file = self.path / (EMA_FILE if which == "ema" else MODEL_FILE)
        if which == "ema" and not file.exists():
            file = self.path / MODEL_FILE
        state = load_tensors(file)
        check_fingerprint(file, self.model_config, self.routing_config)
        return state


# The architecture and routing a weight file was written for, in its safetensors metadata: names of tensors alone
# do not tell a Top-k router's weights from an expert-choice one's.
_FINGERPRINT_KEYS = {"model": "dit_moe.model", "routing": "dit_moe.routing"}


def weights_metadata(model_config: ModelConfig, routing_config: RoutingConfig) -> dict:
    return {"format": FORMAT, _FINGERPRINT_KEYS["model"]: json.dumps(asdict(model_config), sort_keys=True),
            _FINGERPRINT_KEYS["routing"]: json.dumps(asdict(routing_config), sort_keys=True)}


def check_fingerprint(file: Path, model_config: ModelConfig, routing_config: RoutingConfig) -> None:
    """Refuse ``file`` when its metadata names another architecture or routing (files written before the
    fingerprint existed have none and pass; a key the older writer did not know is not compared)."""
    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e
    for section, now in (("model", asdict(model_config)), ("routing", asdict(routing_config))):
        text = meta.get(_FINGERPRINT_KEYS[section])
        if text is None:
            continue
        try:
            saved = json.loads(text)
        except json.JSONDecodeError:
            raise CheckpointError(f"{file}: corrupt weights fingerprint ({_FINGERPRINT_KEYS[section]})") from None
        diff = [f"{section}.{k}: {saved[k]!r} in the weights, {now[k]!r} in {CONFIG_FILE}"
                for k in now if k in saved and saved[k] != now[k]]
        if diff:
            raise CheckpointError(f"{file}: weights of another architecture or routing than {file.parent / CONFIG_FILE}"
                                  f" ({'; '.join(diff[:3])}); the files of two checkpoints were mixed")


def load_tensors(file: Path) -> dict:
    if not file.exists():
        raise CheckpointError(f"{file}: missing weights file")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e
    check_finite(state, file)
    return state


def check_finite(state: dict, file) -> None:
    """Refuse weights with a NaN or inf, naming the tensor: such a model samples black images with exit code 0
    (training never saves after a non-finite loss, so these are corrupt or hand-edited files)."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{file}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf) of "
                                  f"{t.numel()}; these weights are unusable")


def _state_for_saving(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _default_permissions(folder: Path) -> None:
    """Give ``folder`` and its files the modes the user's umask gives new files (0755 / 0644 under umask 022):
    mkdtemp makes the folder 0700 and safetensors writes its files 0600, which would hide checkpoints and Hub
    folders from the rest of a group on a shared cluster."""
    umask = os.umask(0)
    os.umask(umask)
    for f in [folder, *folder.rglob("*")]:
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    ema: Optional[torch.nn.Module] = None,
    *,
    step: int = 0,
    experiment: Optional[ExperimentConfig] = None,
    data_info: Optional[dict] = None,
    meta: Optional[dict] = None,
    write_extra: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write ``model`` (and ``ema``) with their configs to the directory ``path``, atomically."""
    path = Path(path)
    if not hasattr(model, "model_config"):
        raise CheckpointError("save_checkpoint needs a model built by dit_moe.registry.build_model (no model_config)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        config = {
            "format": FORMAT,
            "step": int(step),
            "model": asdict(model.model_config),
            "routing": asdict(model.routing_config),
            "experiment": experiment.to_dict() if experiment is not None else None,
            "data_info": data_info,
            "meta": meta or {},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        stamp = weights_metadata(model.model_config, model.routing_config)
        save_file(_state_for_saving(model), str(tmp / MODEL_FILE), metadata=stamp)
        if ema is not None:
            save_file(_state_for_saving(ema), str(tmp / EMA_FILE), metadata=stamp)
        if write_extra is not None:
            write_extra(tmp)
        _default_permissions(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / MODEL_FILE).is_file()


def run_dir_of_checkpoint(path: str | Path) -> Optional[Path]:
    """The run folder of a checkpoint written by training (``<run>/checkpoints/step-N``), else None."""
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run (``<run>/checkpoints/step-*``), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if is_checkpoint(p))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        # A Hub id (owner/name) of a dit-moe Hub folder, from the Hugging Face cache (offline) or the Hub. Imported
        # here: huggingface_hub is only needed when a path does not exist (CLI start-up time).
        from .hub import hub_snapshot
        found, why = hub_snapshot(str(path))
        if found is None:
            raise CheckpointError(f"{path}: no such checkpoint or run directory{why}")
        return found
    if is_checkpoint(path):
        return path
    if path.is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1]
        if (path / CONFIG_FILE).exists():
            raise CheckpointError(f"{path}: checkpoint has no {MODEL_FILE}")
        raise CheckpointError(f"{path}: not a checkpoint (no {CONFIG_FILE}) and no checkpoints under {path / 'checkpoints'}")
    raise CheckpointError(f"{path}: a checkpoint is a directory with {CONFIG_FILE} and {MODEL_FILE}")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint's description (weights are loaded on demand by ``Checkpoint.state_dict``)."""
    path = resolve_checkpoint(path)
    cfg_file = path / CONFIG_FILE
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: corrupt checkpoint description ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: not a dit-moe checkpoint (format {config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r})")
    try:
        model_cfg = from_dict(ModelConfig, config["model"], "model")
        routing_cfg = from_dict(RoutingConfig, config["routing"], "routing")
        experiment = ExperimentConfig.from_dict(config["experiment"]) if config.get("experiment") else None
        parse_name(model_cfg.name)        # an unknown architecture is a broken description, as invalid JSON is
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: invalid configuration: {e}") from e
    return Checkpoint(path, int(config.get("step", 0)), model_cfg, routing_cfg, experiment,
                      config.get("data_info"), config.get("meta", {}))


def read_newest(path: str | Path, read: Callable[[Path], T], attempts: int = 5) -> T:
    """``read(checkpoint)`` of the checkpoint ``path`` names -- for a run folder, its newest complete one.

    A reader of a run that is still training can lose its checkpoint mid-read: rotation (``train.keep_last``)
    renames an old checkpoint away and deletes it. Checkpoints are published by an atomic rename, so the newest one
    listed is complete; when it is gone by the time it is read, the newest is listed and read again (files already
    open or mapped stay readable after the deletion, so a read that got past opening them is unaffected)."""
    for attempt in range(attempts):
        ckpt = resolve_checkpoint(path)
        try:
            return read(ckpt)
        except (CheckpointError, OSError):
            if ckpt == Path(path) or ckpt.exists() or attempt == attempts - 1:
                raise                      # an explicit checkpoint, or a real fault: not a rotation
