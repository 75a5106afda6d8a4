"""Features of a Dataset through one of torch-fidelity's extractors, on the device asked for.

Besides the extractors' own features, ``SPATIAL_TAPS`` names for some extractors an intermediate spatial map that
sFID uses, read with a forward hook during the same pass (no second network, no second forward).
"""
import contextlib
import os
import pickle
import sys
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from .. import features as _features  # noqa: F401  (registers "digits-cnn" and "test-tiny")
from ..errors import EvaluationError, InputNotFoundError

__all__ = ["DEFAULT_EXTRACTOR", "SPATIAL_TAPS", "SpatialTap", "spatial_tap", "check_extractor", "make_extractor",
           "extract_features"]

DEFAULT_EXTRACTOR = "inception-v3-compat"


@dataclass(frozen=True)
class SpatialTap:
    """Where an extractor's spatial features (sFID) come from: the output (N, C, H, W) of submodule ``module``,
    its first ``channels`` channels, average-pooled to ``pool`` (H, W) when set, flattened in (H, W, C) order
    (ADM's NHWC order, so that statistics line up with ADM's mu_s/sigma_s) to (N, H * W * channels).
    ``carrier`` is a feature of the extractor computed after ``module``: requested when nothing else is, so that
    torch-fidelity's forward (which stops after the last requested feature) runs through ``module``."""
    layer: str
    module: str
    channels: int
    carrier: str
    pool: tuple = None

    def features(self, spatial):
        """(N, C, H, W) module output -> (N, H' * W' * channels) float32 on the CPU."""
        x = spatial[:, :self.channels]
        if self.pool is not None:
            x = torch.nn.functional.adaptive_avg_pool2d(x, self.pool)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1).float().cpu()


# ADM's evaluator takes sFID features from tensor "mixed_6/conv:0" of the TF 2015-12-05 Inception graph, first 7
# channels: 17 x 17 x 7 = 2023 values per image. In that graph the mixed blocks count mixed, mixed_1, mixed_2
# (torch-fidelity's Mixed_5b-5d, 35 x 35), mixed_3 (Mixed_6a, the reduction to 17 x 17), mixed_4 ... mixed_7
# (Mixed_6b-6e), so mixed_6 is Mixed_6d; its first op scope "conv" is the 1x1 branch: torch-fidelity's weight
# converter (utils/util_convert_inception_weights.py) maps "mixed_6/conv/conv2d_params" and ".../batchnorm" to
# Mixed_6d.branch1x1.conv/.bn. The tensor "mixed_6/conv:0" is the op after conv and batchnorm, the ReLU, which is
# what BasicConv2d Mixed_6d.branch1x1 returns: 192 channels at 17 x 17 for the 299 x 299 input both resize to.
# "test-tiny" has a tap for fast tests: its tanh map, 4 channels pooled to 3 x 3 (36 values).
SPATIAL_TAPS = {
    "inception-v3-compat": SpatialTap("mixed_6/conv", "Mixed_6d.branch1x1", channels=7, carrier="768"),
    "test-tiny": SpatialTap("spatial", "spatial_tap", channels=4, carrier="16", pool=(3, 3)),
}


def spatial_tap(name):
    """The SpatialTap of extractor ``name``; EvaluationError when it has none (sFID is not defined for it)."""
    if name not in SPATIAL_TAPS:
        raise EvaluationError(f"sfid needs spatial features, defined for extractors {sorted(SPATIAL_TAPS)}; "
                              f"extractor {name!r} has none")
    return SPATIAL_TAPS[name]


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
    """A torch-fidelity extractor `name` producing `layers`, on `device` (cuda= passed explicitly). `layers` may
    name the extractor's spatial tap layer (SPATIAL_TAPS); `extract_features` then also returns it."""
    check_extractor(name)
    device = _resolve_device(device)
    layers = set(layers)
    tap = SPATIAL_TAPS.get(name)
    if tap is not None and tap.layer in layers:
        layers.discard(tap.layer)
        if not layers:
            layers.add(tap.carrier)
    kwargs = {"verbose": verbose}
    if inception_weights is not None:
        if not os.path.isfile(inception_weights):
            raise InputNotFoundError(f"feature extractor weights {inception_weights} do not exist")
        kwargs["feature_extractor_weights_path"] = os.fspath(inception_weights)
    try:
        with _on_device(device):
            return create_feature_extractor(name, sorted(layers), cuda=device.type == "cuda", **kwargs)
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
def extract_features(dataset, extractor, batch_size=64, device=None, num_workers=0, verbose=False, spatial=False):
    """Run `extractor` over a Dataset of uint8 (3, H, W) -> {layer: (N, D) float32 CPU tensor}; with `spatial`,
    also {tap.layer: (N, D_s)}, the spatial features of the extractor's SpatialTap read in the same pass."""
    device = _resolve_device(device)
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=cuda)
    out = {name: [] for name in extractor.get_requested_features_list()}
    hook = None
    if spatial:
        tap = spatial_tap(extractor.get_name())
        out[tap.layer] = []
        hook = extractor.get_submodule(tap.module).register_forward_hook(
            lambda module, args, output: out[tap.layer].append(tap.features(output)))
    done = 0
    try:
        with _on_device(device):
            for batch in loader:
                if cuda:
                    batch = batch.cuda(non_blocking=True)
                for name, feats in extractor.convert_features_tuple_to_dict(extractor(batch)).items():
                    out[name].append(feats.float().cpu())
                done += batch.shape[0]
                if verbose:
                    print(f"\r  features: {done}/{len(dataset)}", end="", file=sys.stderr)
    finally:
        if hook is not None:
            hook.remove()
    if verbose:
        print(file=sys.stderr)
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def _default_workers(source, device):
    # decoding PNG/JPEG files is the bottleneck in front of a GPU; in-memory arrays need no workers
    if source.kind == "folder" and device.type == "cuda":
        return min(4, os.cpu_count() or 1)
    return 0
