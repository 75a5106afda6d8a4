"""
FID, Inception Score, KID and precision/recall of generated images against a reference.

    python -m dit_moe.evaluate GENERATED REFERENCE --metrics fid,isc,kid,prc --out metrics.json

GENERATED / REFERENCE may each be
  * a folder of images (png/jpg/jpeg),
  * an ADM-style sample batch `.npz` with `arr_0` (uint8, N x H x W x 3), memory-mapped when stored uncompressed,
  * a statistics `.npz` with `mu`/`sigma`: an ADM reference batch (Inception pool_3 statistics; those files also
    carry 10K images in `arr_0` for precision/recall) or a file written by `save_stats` (which also records the
    extractor, layer, number of images and resolution),
  * in Python, a `torch.utils.data.Dataset` of uint8 (3, H, W) tensors, e.g. `ImageTensorDataset` over decoded
    latents.

Features come from torch-fidelity's extractors (`feature_extractor`, default "inception-v3-compat": the
2015-12-05 TF Inception weights ported to PyTorch with TF1-compatible resizing). Each input goes through the
extractor once; the FID is computed here in float64 from mean/covariance (`frechet_distance`), so precomputed
statistics and image sets use the same code, and IS/KID/PRC are computed by torch-fidelity's own metric
functions on those same features (the functions its `calculate_metrics` calls; `tests/test_evaluate.py` checks
that both routes give the same numbers).

Precision/recall use the same extractor as the other metrics: with the default that is Inception pool_3 (2048)
with k=3, i.e. ADM-style P/R, not torch-fidelity's VGG16 default. The JSON says so in `prc_features`.

Inception weights: torch-fidelity downloads its standard file on first use (internet needed once, then cached
under $TORCH_HOME/hub/checkpoints); offline machines pass `--inception-weights PATH` to a copy of
`weights-inception-2015-12-05-6726825d.pth`.
"""

import argparse
import contextlib
import json
import math
import os
import pickle
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import torch_fidelity
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from dit_moe import features as _features  # noqa: F401  (registers "digits-cnn" and "test-tiny")
from dit_moe.errors import DitMoeError, EvaluationError, InputNotFoundError, cli_error

METRICS = ("fid", "isc", "kid", "prc")
DEFAULT_EXTRACTOR = "inception-v3-compat"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
STATS_FORMAT = "dit_moe-fid-stats-v1"
ADM_STATS_EXTRACTOR = ("inception-v3-compat", "2048")  # ADM's mu/sigma are TF Inception pool_3 statistics

# Settings of torch-fidelity's metric functions that change the numbers; recorded in the JSON.
ISC_SPLITS = 10
SHUFFLE_SEED = 2020          # torch-fidelity's rng_seed: IS shuffling and KID subset draws
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PRC_NEIGHBORHOOD = 3


#################################################################################
#                                 Image sources                                  #
#################################################################################

class ImageTensorDataset(Dataset):
    """Adapter for images already in memory: uint8 (N, 3, H, W) tensor or array -> items uint8 (3, H, W)."""

    def __init__(self, images_uint8):
        images = torch.as_tensor(images_uint8)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise EvaluationError(
                f"ImageTensorDataset expects uint8 images (N, 3, H, W), got dtype {images.dtype} shape "
                f"{tuple(images.shape)} (NHWC arrays need .permute(0, 3, 1, 2))")
        self.images = images

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


class ImageFolderDataset(Dataset):
    """Images of one folder as uint8 (3, H, W); every image must have the folder's resolution."""

    def __init__(self, root, recursive=False):
        self.root = root
        self.files = _list_images(root, recursive)
        if not self.files:
            raise EvaluationError(f"image folder {root} contains no {'/'.join(IMAGE_EXTENSIONS)} files"
                             f"{'' if recursive else ' (not searched recursively)'}")
        with _open_image(self.files[0]) as img:
            self.resolution = (img.height, img.width)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with _open_image(self.files[i]) as img:
            try:
                img = img.convert("RGB")
            except OSError as e:    # truncated or corrupt data after a readable header
                raise EvaluationError(f"image {self.files[i]} cannot be decoded ({e})") from e
        if (img.height, img.width) != self.resolution:
            raise EvaluationError(f"image {self.files[i]} is {img.height}x{img.width}, but {self.files[0]} in the same "
                             f"folder is {self.resolution[0]}x{self.resolution[1]}")
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


class NpzImageDataset(Dataset):
    """
    `arr_0` of an ADM-style npz (uint8, N x H x W x 3) as uint8 (3, H, W) items.

    Stored (uncompressed) members are memory-mapped; compressed ones are decompressed on first access only,
    so a reference batch whose FID comes from its mu/sigma never reads its 10K images.
    """

    def __init__(self, path, key="arr_0"):
        self.path, self.key = path, key
        shape, dtype = _npz_member_header(path, key)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise EvaluationError(f"{path}: {key} must be uint8 images (N, H, W, 3) like ADM sample batches, got dtype "
                             f"{dtype} shape {shape}")
        if shape[0] == 0:
            raise EvaluationError(f"{path}: {key} holds no images")
        self.shape = shape
        self.resolution = tuple(shape[1:3])
        self._array = None

    @property
    def array(self):
        if self._array is None:
            self._array = _npz_array_memmap(self.path, self.key)
            if self._array is None:
                with np.load(self.path) as npz:
                    self._array = npz[self.key]
        return self._array

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.array[i].transpose(2, 0, 1)))


def _open_image(path):
    try:
        return Image.open(path)
    except OSError as e:            # PIL's UnidentifiedImageError is an OSError
        raise EvaluationError(f"image {path} cannot be read ({e})") from e


def _list_images(root, recursive):
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not recursive:
            break
    return sorted(found)


def _read_npy_header(fh, where):
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise EvaluationError(f"{where}: unsupported .npy format version {version}")
    return shape, fortran, dtype


def _npz_member_header(path, key):
    """(shape, dtype) of `key` in an npz, read from the member's header without loading the array."""
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as fh:
        shape, _, dtype = _read_npy_header(fh, f"{path}:{key}")
    return shape, dtype


def _npz_array_memmap(path, key):
    """
    Memory-map `key` of an npz if it is stored uncompressed (np.savez, as ADM writes), else None.

    A 50K x 256 x 256 x 3 sample batch is ~10 GB; mapping it avoids holding it in RAM. The member's bytes sit
    at a fixed offset in the zip: after the local file header (30 bytes + name + extra) comes a plain .npy.
    """
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        shape, fortran, dtype = _read_npy_header(fh, f"{path}:{key}")
        offset = fh.tell()
    if dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


@dataclass
class Source:
    """One side of the comparison: images (a Dataset), statistics, or both (ADM reference batches)."""
    name: str                      # path or description, written to the JSON
    kind: str                      # "folder" | "npz" | "stats" | "npz+stats" | "dataset"
    dataset: Dataset = None
    stats: dict = None             # mu, sigma, feature_extractor, feature_layer, num_images, resolution
    resolution: tuple = None       # (H, W) when known
    num_images: int = None

    @property
    def has_images(self):
        return self.dataset is not None


def open_source(src, recursive=False):
    """A folder / npz path / Dataset -> Source. Errors name the path at fault."""
    if isinstance(src, Source):
        return src
    if isinstance(src, Dataset):
        return _dataset_source(src)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"expected a path or a torch Dataset of uint8 (3, H, W) images, got {type(src).__name__}")
    path = os.fspath(src)
    if not os.path.exists(path):
        raise InputNotFoundError(f"{path} does not exist")
    if os.path.isdir(path):
        ds = ImageFolderDataset(path, recursive=recursive)
        return Source(path, "folder", dataset=ds, resolution=ds.resolution, num_images=len(ds))
    if not zipfile.is_zipfile(path):
        raise EvaluationError(f"{path} is neither a folder of images nor an .npz file")
    return _npz_source(path)


def _dataset_source(ds):
    if len(ds) == 0:
        raise EvaluationError(f"{type(ds).__name__} holds no images")
    first = ds[0]
    if not torch.is_tensor(first) or first.dtype != torch.uint8 or first.dim() != 3 or first.shape[0] != 3:
        got = f"dtype {first.dtype} shape {tuple(first.shape)}" if torch.is_tensor(first) else type(first).__name__
        raise EvaluationError(f"{type(ds).__name__} must yield uint8 (3, H, W) tensors, its first item is {got}")
    name = f"{type(ds).__name__}({len(ds)} images)"
    return Source(name, "dataset", dataset=ds, resolution=tuple(first.shape[1:]), num_images=len(ds))


def _npz_source(path):
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            stats = _read_stats(path, npz) if {"mu", "sigma"} <= keys else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EvaluationError(f"{path} is not a readable .npz ({e})") from e
    if "arr_0" not in keys and stats is None:
        raise EvaluationError(f"{path} has neither images (arr_0) nor statistics (mu and sigma); keys: {sorted(keys)}")
    dataset = NpzImageDataset(path) if "arr_0" in keys else None
    kind = "npz+stats" if dataset is not None and stats is not None else ("npz" if dataset is not None else "stats")
    resolution = dataset.resolution if dataset is not None else stats["resolution"]
    num_images = len(dataset) if dataset is not None else stats["num_images"]
    return Source(path, kind, dataset=dataset, stats=stats, resolution=resolution, num_images=num_images)


#################################################################################
#                                  Statistics                                    #
#################################################################################

def _read_stats(path, npz):
    mu = np.asarray(npz["mu"], dtype=np.float64)
    sigma = np.asarray(npz["sigma"], dtype=np.float64)
    _check_stats_shapes(mu, sigma, path)
    if "format" in npz.files:  # written by save_stats
        if str(npz["format"][()]) != STATS_FORMAT:
            raise EvaluationError(f"{path}: unknown statistics format {str(npz['format'][()])!r}, expected {STATS_FORMAT!r}")
        res = tuple(int(r) for r in npz["resolution"])
        return {
            "mu": mu, "sigma": sigma,
            "feature_extractor": str(npz["feature_extractor"][()]),
            "feature_layer": str(npz["feature_layer"][()]),
            "num_images": int(npz["num_images"][()]),
            "resolution": res if min(res) > 0 else None,
            "origin": "dit_moe",
        }
    # ADM reference batch: TF Inception pool_3, image count and resolution not recorded
    extractor, layer = ADM_STATS_EXTRACTOR
    return {"mu": mu, "sigma": sigma, "feature_extractor": extractor, "feature_layer": layer,
            "num_images": None, "resolution": None, "origin": "ADM"}


def _check_stats_shapes(mu, sigma, where):
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvaluationError(f"{where}: statistics must be mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvaluationError(f"{where}: statistics contain NaN or inf")


def feature_statistics(feats):
    """(N, D) features -> (mu (D,), sigma (D, D)), float64, unbiased covariance as in every FID code."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise EvaluationError(f"FID statistics need at least 2 feature vectors (N, D), got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """
    Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

    tr((sigma1 sigma2)^{1/2}) equals tr((A sigma2 A)^{1/2}) with A = sigma1^{1/2}, and A sigma2 A is symmetric
    positive semi-definite, so symmetric eigendecompositions (eigh) give it stably in float64 without the
    complex round-off that scipy.linalg.sqrtm of the non-symmetric product produces.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_stats_shapes(mu1, sigma1, "frechet_distance (first)")
    _check_stats_shapes(mu2, sigma2, "frechet_distance (second)")
    if mu1.shape != mu2.shape:
        raise EvaluationError(f"frechet_distance: feature dimensions differ, {mu1.shape[0]} vs {mu2.shape[0]}")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    # The distance is a sum of squares, >= 0; for (nearly) identical statistics the traces cancel and float64
    # round-off of order eps * tr(sigma) is left, of either sign. A negative value is that round-off, never a
    # distance (a genuinely wrong result would be far larger than the eigenvalues' rounding), so report 0.
    return max(fid, 0.0)


def _write_npz_atomic(path, **arrays):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_stats(path, mu, sigma, extractor, layer, num_images, resolution):
    _write_npz_atomic(
        path, format=np.array(STATS_FORMAT), mu=mu, sigma=sigma,
        feature_extractor=np.array(extractor), feature_layer=np.array(layer),
        num_images=np.array(num_images), resolution=np.array(resolution if resolution else (-1, -1)))


#################################################################################
#                               Feature extraction                               #
#################################################################################

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


def _check_extractor(name):
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise EvaluationError(f"unknown feature extractor {name!r}; registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    return FEATURE_EXTRACTORS_REGISTRY[name]


def make_extractor(name, layers, inception_weights=None, device=None, verbose=False):
    """A torch-fidelity extractor `name` producing `layers`, on `device` (cuda= passed explicitly)."""
    _check_extractor(name)
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


#################################################################################
#                                 The evaluator                                  #
#################################################################################

@dataclass
class _Plan:
    """Which side needs which features, and where each side's FID statistics come from."""
    layers: dict = field(default_factory=lambda: {"generated": set(), "reference": set()})
    fid_from_stats: dict = field(default_factory=dict)


def _fid_stats_usable(source, extractor, layer):
    s = source.stats
    return s is not None and (s["feature_extractor"], s["feature_layer"]) == (extractor, layer)


def compute_metrics(generated, reference, *, metrics=("fid",), feature_extractor=DEFAULT_EXTRACTOR,
                    inception_weights=None, batch_size=64, device=None, settings=None, verbose=False,
                    kid_subset_size=None, num_workers=None, recursive=False, save_reference_stats=None):
    """
    Metrics of `generated` against `reference`; returns {"metrics": {...}, "settings": {...}}.

    generated, reference: folder path, npz path (images `arr_0` and/or statistics `mu`/`sigma`), or a Dataset
        of uint8 (3, H, W) tensors (see module docstring).
    metrics: subset of ("fid", "isc", "kid", "prc"). Keys in the result: fid; isc_mean, isc_std; kid_mean,
        kid_std; precision, recall, f_score.
    feature_extractor: a torch-fidelity extractor name ("inception-v3-compat", "digits-cnn", "test-tiny", ...);
        all metrics use it (so P/R are on Inception pool_3 by default, as ADM).
    inception_weights: local weights file for the extractor (torch-fidelity's feature_extractor_weights_path);
        None = torch-fidelity's standard download.
    settings: the caller's settings that change the number (model, checkpoint step, sampler, steps, CFG, ...);
        merged with the evaluator's own (reference, extractor, counts, resolution, metric parameters). Where a
        caller key names something the evaluator determined and the values differ, the evaluator's value is
        kept and the caller's moves to "caller_<key>". A Dataset input is described by the caller's
        settings["generated"] / settings["reference"] when given.
    kid_subset_size: default min(1000, N_generated, N_reference).
    save_reference_stats: write the reference's FID statistics (save_stats format) to this path.
    """
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise EvaluationError(f"metrics must be a non-empty subset of {METRICS}, got {metrics}")
    cls = _check_extractor(feature_extractor)
    layer_for = {m: cls.get_default_feature_layer_for_metric(m) for m in metrics}
    device = _resolve_device(device)

    gen = open_source(generated, recursive=recursive)
    ref = open_source(reference, recursive=recursive)
    if gen.resolution and ref.resolution and tuple(gen.resolution) != tuple(ref.resolution):
        raise EvaluationError(f"resolution mismatch: generated {gen.name} is {gen.resolution[0]}x{gen.resolution[1]}, "
                         f"reference {ref.name} is {ref.resolution[0]}x{ref.resolution[1]}")

    # ---- plan: statistics where they fit the extractor, features otherwise
    plan = _Plan()
    fid_layer = cls.get_default_feature_layer_for_metric("fid")
    need_ref_stats_file = save_reference_stats is not None
    for role, src in (("generated", gen), ("reference", ref)):
        if "fid" in metrics or (role == "reference" and need_ref_stats_file):
            plan.fid_from_stats[role] = _fid_stats_usable(src, feature_extractor, fid_layer)
            if not plan.fid_from_stats[role]:
                if not src.has_images:
                    s = src.stats
                    raise EvaluationError(
                        f"{role} {src.name} holds FID statistics of {s['feature_extractor']}/{s['feature_layer']} "
                        f"but no images; cannot evaluate with extractor {feature_extractor}")
                plan.layers[role].add(fid_layer)
        for m in ("isc", "kid", "prc"):
            if m not in metrics or (m == "isc" and role == "reference"):
                continue
            if not src.has_images:
                raise EvaluationError(f"{m} needs {role} images, but {src.name} holds only statistics (mu/sigma); "
                                 f"precision/recall and KID need the reference images, e.g. arr_0 of an ADM "
                                 f"reference batch")
            plan.layers[role].add(layer_for[m])

    minimum = {"fid": 2, "isc": ISC_SPLITS, "kid": 2, "prc": PRC_NEIGHBORHOOD + 1}
    for role, src in (("generated", gen), ("reference", ref)):
        for m in metrics:
            uses_images = {"fid": plan.fid_from_stats.get(role) is False, "isc": role == "generated"}.get(m, True)
            if uses_images and len(src.dataset) < minimum[m]:
                raise EvaluationError(f"{m} needs at least {minimum[m]} {role} images, {src.name} has {len(src.dataset)}")

    # ---- one pass of the extractor per side
    feats = {}
    if plan.layers["generated"] or plan.layers["reference"]:
        extractor = make_extractor(feature_extractor, plan.layers["generated"] | plan.layers["reference"],
                                   inception_weights, device, verbose)
        for role, src in (("generated", gen), ("reference", ref)):
            if plan.layers[role]:
                if verbose:
                    print(f"extracting {feature_extractor} features of {role} {src.name}", file=sys.stderr)
                workers = _default_workers(src, device) if num_workers is None else num_workers
                feats[role] = extract_features(src.dataset, extractor, batch_size, device, workers, verbose)

    # ---- metrics
    out = {}
    own = {**_source_settings("generated", gen), **_source_settings("reference", ref)}
    own.update(
        resolution=list(gen.resolution or ref.resolution or []) or None,
        feature_extractor=feature_extractor,
        feature_layers={m: layer_for[m] for m in metrics},
        extractor_weights=_weights_description(feature_extractor, inception_weights),
        metrics_code=f"torch-fidelity {torch_fidelity.__version__} (IS/KID/PRC); FID: dit_moe.evaluate "
                     f"frechet_distance (float64)",
        eval_device=str(device),
    )
    fid_stats = {}
    for role, src in (("generated", gen), ("reference", ref)):
        if role not in plan.fid_from_stats:
            continue
        if plan.fid_from_stats[role]:
            fid_stats[role] = (src.stats["mu"], src.stats["sigma"])
            own[f"fid_{role}_statistics"] = f"mu/sigma from {src.name} ({src.stats['origin']})"
        else:
            fid_stats[role] = feature_statistics(feats[role][fid_layer].numpy())
            own[f"fid_{role}_statistics"] = f"features of {len(src.dataset)} images"
    if "fid" in metrics:
        out["fid"] = frechet_distance(*fid_stats["generated"], *fid_stats["reference"])
    tf_kwargs = {"verbose": verbose, "rng_seed": SHUFFLE_SEED, "samples_shuffle": True}
    if "isc" in metrics:
        r = isc_featuresdict_to_metric(feats["generated"], layer_for["isc"], isc_splits=ISC_SPLITS, **tf_kwargs)
        out["isc_mean"], out["isc_std"] = r["inception_score_mean"], r["inception_score_std"]
        own.update(isc_splits=ISC_SPLITS, isc_shuffle_seed=SHUFFLE_SEED)
    if "kid" in metrics:
        n1, n2 = len(gen.dataset), len(ref.dataset)
        size = min(KID_SUBSET_SIZE, n1, n2) if kid_subset_size is None else kid_subset_size
        r = kid_featuresdict_to_metric(feats["generated"], feats["reference"], layer_for["kid"],
                                       kid_subsets=KID_SUBSETS, kid_subset_size=size, **tf_kwargs)
        out["kid_mean"], out["kid_std"] = r["kernel_inception_distance_mean"], r["kernel_inception_distance_std"]
        own.update(kid_subsets=KID_SUBSETS, kid_subset_size=size, kid_kernel="poly3", kid_seed=SHUFFLE_SEED)
    if "prc" in metrics:
        r = prc_featuresdict_to_metric(feats["generated"], feats["reference"], layer_for["prc"],
                                       prc_neighborhood=PRC_NEIGHBORHOOD, **tf_kwargs)
        out.update(precision=r["precision"], recall=r["recall"], f_score=r["f_score"])
        adm = " (Inception pool_3, ADM-style)" if feature_extractor == DEFAULT_EXTRACTOR else ""
        own.update(prc_features=f"{feature_extractor}/{layer_for['prc']}{adm}", prc_neighborhood=PRC_NEIGHBORHOOD)

    if need_ref_stats_file:
        mu, sigma = fid_stats["reference"]
        _write_stats(save_reference_stats, mu, sigma, feature_extractor, fid_layer, ref.num_images or -1,
                     ref.resolution)

    return {"metrics": out, "settings": _merge_settings(settings, own, gen, ref)}


def _source_settings(role, src):
    out = {f"{role}_kind": src.kind}
    if src.kind != "dataset":  # a Dataset's description comes from the caller's settings when given
        out[role] = os.path.abspath(src.name)
    if src.num_images is not None:
        out[f"num_{role}"] = src.num_images
    return out


def _weights_description(extractor, weights):
    if weights is not None:
        return os.path.abspath(weights)
    if extractor == DEFAULT_EXTRACTOR:
        return "torch-fidelity default download (weights-inception-2015-12-05-6726825d.pth)"
    if extractor == "digits-cnn":
        return f"{_features.digits_cnn_path()} (recipe {_features.DIGITS_TRAIN_DEFAULTS})"
    return "built into the extractor"


def _merge_settings(caller, own, gen, ref):
    merged = dict(caller or {})
    for role, src in (("generated", gen), ("reference", ref)):
        if src.kind == "dataset" and role not in merged:
            merged[role] = src.name
    for key, value in own.items():
        # what the evaluator measured stays at the plain key; a differing caller value is kept beside it
        if key in merged and _jsonable(merged[key]) != _jsonable(value):
            merged[f"caller_{key}"] = merged[key]
        merged[key] = value
    return merged


def save_stats(source, path, *, feature_extractor=DEFAULT_EXTRACTOR, inception_weights=None, batch_size=64,
               device=None, verbose=False, recursive=False, num_workers=None):
    """
    Write FID statistics of `source` (folder, npz with arr_0, or Dataset) to the .npz `path`:
    mu, sigma (float64), feature_extractor, feature_layer, num_images, resolution (H, W). Returns them as a dict.
    """
    cls = _check_extractor(feature_extractor)
    layer = cls.get_default_feature_layer_for_metric("fid")
    src = open_source(source, recursive=recursive)
    if not src.has_images:
        raise EvaluationError(f"{src.name} holds statistics, not images; nothing to compute")
    device = _resolve_device(device)
    extractor = make_extractor(feature_extractor, [layer], inception_weights, device, verbose)
    workers = _default_workers(src, device) if num_workers is None else num_workers
    feats = extract_features(src.dataset, extractor, batch_size, device, workers, verbose)[layer]
    mu, sigma = feature_statistics(feats.numpy())
    _write_stats(path, mu, sigma, feature_extractor, layer, len(src.dataset), src.resolution)
    return {"mu": mu, "sigma": sigma, "feature_extractor": feature_extractor, "feature_layer": layer,
            "num_images": len(src.dataset), "resolution": src.resolution}


def load_stats(path):
    """Statistics of a save_stats file or an ADM reference batch, as the dict save_stats returns."""
    src = open_source(path)
    if src.stats is None:
        raise EvaluationError(f"{path} holds no statistics (mu and sigma)")
    return src.stats


#################################################################################
#                                   Results                                      #
#################################################################################

def _jsonable(value):
    """Plain-JSON copy of `value` (numpy/torch scalars, tuples, paths); TypeError naming what does not fit."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool, int, type(None))):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0:
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to JSON")


def write_metrics_json(path, metrics, settings):
    """Atomically write {"metrics": ..., "settings": ...} to `path` as JSON."""
    try:
        payload = {"metrics": _jsonable(metrics), "settings": _jsonable(settings)}
    except TypeError as e:
        raise TypeError(f"{path}: {e}") from e
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return payload


#################################################################################
#                                      CLI                                       #
#################################################################################

def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dit_moe.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("generated", help="folder of images, or .npz with arr_0 (uint8 NHWC) or mu/sigma")
    p.add_argument("reference", help="folder of images, .npz with arr_0, ADM reference batch, or save_stats file")
    p.add_argument("--metrics", default="fid", help="comma-separated subset of fid,isc,kid,prc (default fid)")
    p.add_argument("--extractor", default=DEFAULT_EXTRACTOR,
                   help=f"torch-fidelity feature extractor (default {DEFAULT_EXTRACTOR}; digits-cnn for the demo)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="local extractor weights (offline machines), e.g. weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default: 4 for folders "
                                                                  "on CUDA, else 0)")
    p.add_argument("--recursive", action="store_true", help="search image folders recursively")
    p.add_argument("--kid-subset-size", type=int, default=None)
    p.add_argument("--settings", default=None, metavar="JSON",
                   help="JSON file of settings to record (model, checkpoint step, sampler, steps, cfg, seeds, ...)")
    p.add_argument("--out", default=None, help="write metrics + settings to this JSON file")
    p.add_argument("--save-ref-stats", default=None, metavar="PATH", help="also write the reference's FID "
                                                                          "statistics to this .npz")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    try:
        settings = _check_cli(args)
        result = compute_metrics(
            args.generated, args.reference, metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
            feature_extractor=args.extractor, inception_weights=args.inception_weights, batch_size=args.batch_size,
            device=args.device, settings=settings, verbose=args.verbose, kid_subset_size=args.kid_subset_size,
            num_workers=args.num_workers, recursive=args.recursive, save_reference_stats=args.save_ref_stats)
        if args.out:
            write_metrics_json(args.out, result["metrics"], result["settings"])
    except DitMoeError as e:
        return cli_error("evaluate", e)
    for key, value in result["metrics"].items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) and math.isfinite(value) else f"{key}: {value}")
    return 0


def _check_cli(args):
    """Every command-line value checked before any work; returns the --settings object (or None)."""
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--num-workers", args.num_workers, 0),
                             ("--kid-subset-size", args.kid_subset_size, 1)):
        if value is not None and value < low:
            raise EvaluationError(f"{flag} {value} must be >= {low}")
    for flag, path in (("--out", args.out), ("--save-ref-stats", args.save_ref_stats)):
        if path is not None and os.path.isdir(path):
            raise EvaluationError(f"{flag} {path} is a folder; give a file name")
        parent = os.path.dirname(os.path.abspath(path)) if path is not None else None
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise EvaluationError(f"{flag} {path}: {parent} is a file, not a folder")
    if args.inception_weights is not None and not os.path.isfile(args.inception_weights):
        raise InputNotFoundError(f"--inception-weights {args.inception_weights} does not exist")
    if not args.settings:
        return None
    if not os.path.isfile(args.settings):
        raise InputNotFoundError(f"--settings {args.settings} does not exist")
    try:
        with open(args.settings) as fh:
            settings = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationError(f"--settings {args.settings} is not valid JSON ({e})") from e
    if not isinstance(settings, dict):
        raise EvaluationError(f"--settings {args.settings} must hold a JSON object")
    return settings

if __name__ == "__main__":
    sys.exit(main())
