"""The two sides of a comparison: image folders, ADM-style npz batches, statistics files, Datasets -> ``Source``.

``open_source`` opens one input cheaply (a folder's first image, an npz member's header): the resolution, the
image count and any statistics are known before a feature is extracted, so a bad input fails before any work.
"""
import os
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import EvaluationError, InputNotFoundError
from .statistics import _read_stats

__all__ = ["IMAGE_EXTENSIONS", "ImageTensorDataset", "ImageFolderDataset", "NpzImageDataset", "Source", "open_source"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


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
