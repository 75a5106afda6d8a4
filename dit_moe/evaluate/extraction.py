"""Features of a Dataset through one of torch-fidelity's extractors, on the device asked for."""
import contextlib
import os
import pickle
import sys

import torch
from torch.utils.data import DataLoader
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from .. import features as _features  # noqa: F401  (registers "digits-cnn" and "test-tiny")
from ..errors import EvaluationError, InputNotFoundError

__all__ = ["DEFAULT_EXTRACTOR", "check_extractor", "make_extractor", "extract_features"]

DEFAULT_EXTRACTOR = "inception-v3-compat"


def _resolve_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise EvaluationError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {device} requested but CUDA is not available")
    return device


def _on_device(device):
    # torch-fidelity moves extractors with .cuda(), i.e. to the current CUDA device
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def check_extractor(name):
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise EvaluationError(f"unknown feature extractor {name!r}; registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    return FEATURE_EXTRACTORS_REGISTRY[name]


def make_extractor(name, layers, inception_weights=None, device=None, verbose=False):
    """A torch-fidelity extractor `name` producing `layers`, on `device` (cuda= passed explicitly)."""
    check_extractor(name)
    device = _resolve_device(device)
    kwargs = {"verbose": verbose}
    if inception_weights is not None:
        if not os.path.isfile(inception_weights):
            raise InputNotFoundError(f"feature extractor weights {inception_weights} do not exist")
        kwargs["feature_extractor_weights_path"] = os.fspath(inception_weights)
    try:
        with _on_device(device):
            return create_feature_extractor(name, sorted(set(layers)), cuda=device.type == "cuda", **kwargs)
    except OSError as e:
        if inception_weights is not None:
            raise EvaluationError(f"feature extractor weights {inception_weights} cannot be read ({e})") from e
        # urllib's errors are OSErrors: torch-fidelity could not download the weights
        raise EvaluationError(f"feature extractor {name}: its weights could not be downloaded ({e}); on an offline "
                              "machine pass --inception-weights PATH") from e
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        if inception_weights is None:
            raise
        raise EvaluationError(f"feature extractor weights {inception_weights} cannot be loaded ({e})") from e


@torch.no_grad()
def extract_features(dataset, extractor, batch_size=64, device=None, num_workers=0, verbose=False):
    """Run `extractor` over a Dataset of uint8 (3, H, W) -> {layer: (N, D) float32 CPU tensor}."""
    device = _resolve_device(device)
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=cuda)
    out = {name: [] for name in extractor.get_requested_features_list()}
    done = 0
    with _on_device(device):
        for batch in loader:
            if cuda:
                batch = batch.cuda(non_blocking=True)
            for name, feats in extractor.convert_features_tuple_to_dict(extractor(batch)).items():
                out[name].append(feats.float().cpu())
            done += batch.shape[0]
            if verbose:
                print(f"\r  features: {done}/{len(dataset)}", end="", file=sys.stderr)
    if verbose:
        print(file=sys.stderr)
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def _default_workers(source, device):
    # decoding PNG/JPEG files is the bottleneck in front of a GPU; in-memory arrays need no workers
    if source.kind == "folder" and device.type == "cuda":
        return min(4, os.cpu_count() or 1)
    return 0
