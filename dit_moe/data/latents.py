"""Sharded latent dataset: VAE posteriors of an image folder, memory-mapped and validated.

`python -m dit_moe.extract` writes, and `LatentDataset` reads, one directory:

    <root>/
      manifest.json
      shard-r00-00000.safetensors     # r00 = rank that wrote it, 00000 = its shard counter
      shard-r00-00001.safetensors
      shard-r01-00000.safetensors
      ...

Each shard is a safetensors file holding n images (n <= the extraction's --shard-size):

    mean   float16 (n, 2, C, h, w)   posterior mean of the VAE encoder; [:, 0] the image, [:, 1] its horizontal flip
    std    float16 (n, 2, C, h, w)   posterior standard deviation, same layout
    label  int64   (n,)              class index in [0, num_classes), the position of the class folder in class_names

and string metadata: "format" ("dit-moe-latents"), "version", "vae", "image_size", and "files", a JSON list of the
n source paths (relative to the image root, in row order), which is how an interrupted extraction knows what is
already done. The flip is encoded, not flipped in latent space: a VAE is not equivariant to mirroring.

manifest.json (JSON object):

    format, version       "dit-moe-latents", 1
    complete              false while an extraction is running or was interrupted; true once every file is done
    vae                   hub id or absolute local directory of the AutoencoderKL
    scaling_factor        from the VAE config (0.18215 for the SD VAEs); shift_factor likewise (0.0 when absent)
    image_size            side of the ADM centre crop, in pixels
    latent_shape          [C, h, w]
    class_names           sorted class folder names; num_classes = len(class_names)
    dtype                 "float16"
    source                absolute path of the image folder
    shards                [{"file": "shard-r00-00000.safetensors", "count": n}, ...] sorted by file name
    num_images            sum of the counts
    skipped               [{"path": ..., "reason": ...}] files that could not be decoded

A training sample is drawn fresh every time (`LatentDataset.__getitem__`): a flip with probability 1/2 and a
posterior sample z = mean + std * eps, eps ~ N(0, I), then scaled: x = (z - shift_factor) * scaling_factor.
Storing moments instead of one frozen sample keeps both augmentations alive across epochs.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from ..errors import DataError, InputNotFoundError

FORMAT_NAME = "dit-moe-latents"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def read_manifest(root: str | os.PathLike) -> dict:
    """Load and check the keys of `root/manifest.json`; errors name the file and the key."""
    root = Path(root)
    if not root.is_dir():
        raise InputNotFoundError(f"latent directory {str(root)!r} does not exist")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise InputNotFoundError(
            f"{str(path)!r} not found: {str(root)!r} is not a latent directory (create one with `python -m dit_moe.extract`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise DataError(f"{str(path)!r} must hold a JSON object, found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{str(path)!r}: key 'format' is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{str(path)!r}: key 'version' is {manifest.get('version')!r}, this code reads version {FORMAT_VERSION}"
        )
    required = ("vae", "scaling_factor", "image_size", "latent_shape", "class_names", "num_classes", "shards", "num_images")
    for key in required:
        if key not in manifest:
            raise DataError(f"{str(path)!r}: missing key {key!r}")
    if len(manifest["latent_shape"]) != 3:
        raise DataError(f"{str(path)!r}: key 'latent_shape' must be [C, h, w], found {manifest['latent_shape']!r}")
    for k, shard in enumerate(manifest["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("count"), int)):
            raise DataError(f"{str(path)!r}: shards[{k}] must be {{'file': str, 'count': int}}, found {shard!r}")
    if manifest["num_classes"] != len(manifest["class_names"]):
        raise DataError(
            f"{str(path)!r}: num_classes={manifest['num_classes']} but class_names has {len(manifest['class_names'])} entries"
        )
    return manifest


class LatentDataset(Dataset):
    """Random access to the samples of an extracted latent directory.

    Shards are opened lazily with `safe_open` (a memory map), once per process, so DataLoader workers share
    nothing but the page cache. Every shard is validated against the manifest in the constructor: a missing
    or corrupt file, a wrong tensor shape or dtype, a count that disagrees with the manifest, or a label
    outside [0, num_classes) raises an error that names the shard.

    Item i: (x, y) with x float32 (C, h, w) a scaled posterior sample and y an int64 scalar tensor.
    The flip and the noise come from torch's global RNG, so DataLoader worker seeding and Accelerate's RNG
    checkpointing make a run reproducible.
    """

    def __init__(self, root: str | os.PathLike, flip: bool = True):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if not self.manifest.get("complete", False):
            raise DataError(
                f"{str(self.root / MANIFEST_NAME)!r} says the extraction is incomplete; "
                "re-run `python -m dit_moe.extract` with the same arguments to finish it"
            )
        self.flip = flip
        self.scaling_factor = float(self.manifest["scaling_factor"])
        self.shift_factor = float(self.manifest.get("shift_factor") or 0.0)
        self.num_classes = int(self.manifest["num_classes"])
        self.latent_shape = tuple(int(s) for s in self.manifest["latent_shape"])
        self.shard_files = [self.root / s["file"] for s in self.manifest["shards"]]
        counts = [int(s["count"]) for s in self.manifest["shards"]]
        if sum(counts) != self.manifest["num_images"]:
            raise DataError(
                f"{str(self.root / MANIFEST_NAME)!r}: num_images={self.manifest['num_images']} "
                f"but the shard counts sum to {sum(counts)}"
            )
        # offsets[k] = index of the first sample of shard k; offsets[-1] = len(self)
        self.offsets = [0]
        for c in counts:
            self.offsets.append(self.offsets[-1] + c)
        self.labels = torch.cat([self._validate(f, c) for f, c in zip(self.shard_files, counts)]) if counts else (
            torch.zeros(0, dtype=torch.int64)
        )
        self._handles: dict[int, object] = {}
        self._pid = None

    def _validate(self, path: Path, count: int) -> torch.Tensor:
        """Check one shard's header (and its labels) against the manifest; returns its labels (n,)."""
        if not path.is_file():
            raise InputNotFoundError(f"shard {str(path)!r} listed in the manifest is missing")
        C, h, w = self.latent_shape
        expected = {"mean": ((count, 2, C, h, w), "F16"), "std": ((count, 2, C, h, w), "F16"), "label": ((count,), "I64")}
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                if keys != set(expected):
                    raise DataError(f"shard {str(path)!r} holds tensors {sorted(keys)}, expected {sorted(expected)}")
                for key, (shape, dtype) in expected.items():
                    sl = f.get_slice(key)
                    if tuple(sl.get_shape()) != shape or sl.get_dtype() != dtype:
                        raise DataError(
                            f"shard {str(path)!r}: tensor {key!r} is {sl.get_dtype()} {tuple(sl.get_shape())}, "
                            f"the manifest implies {dtype} {shape}"
                        )
                labels = f.get_tensor("label")
        except SafetensorError as e:
            raise DataError(f"shard {str(path)!r} is not a readable safetensors file: {e}") from e
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise DataError(f"shard {str(path)!r}: label {bad} outside [0, {self.num_classes})")
        return labels

    def nonfinite_shards(self) -> list[Path]:
        """The shards whose stored moments hold NaN or inf (reads every shard: call it when something is wrong)."""
        bad = []
        for path in self.shard_files:
            with safe_open(str(path), framework="pt") as f:
                if any(not torch.isfinite(f.get_tensor(key)).all() for key in ("mean", "std")):
                    bad.append(path)
        return bad

    def _handle(self, k: int):
        # A memory map opened before a fork must not be shared with DataLoader workers: reopen per process.
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.shard_files[k]), framework="pt")
        return self._handles[k]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples in {str(self.root)!r}")
        k = bisect.bisect_right(self.offsets, i) - 1
        row = i - self.offsets[k]
        f = self._handle(k)
        side = int(torch.rand(()) < 0.5) if self.flip else 0  # 1 = the horizontally flipped image
        mean = f.get_slice("mean")[row, side].float()  # (C, h, w)
        std = f.get_slice("std")[row, side].float()
        z = mean + std * torch.randn(mean.shape)
        x = (z - self.shift_factor) * self.scaling_factor
        return x, self.labels[i].clone()

    def __repr__(self) -> str:
        return (
            f"LatentDataset({str(self.root)!r}, n={len(self)}, latent_shape={self.latent_shape}, "
            f"classes={self.num_classes}, flip={self.flip})"
        )
