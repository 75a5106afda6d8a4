"""Image folder -> latent shards: VAE posterior moments of every image and of its mirror image.

    dit-moe extract IMAGE_ROOT OUTPUT [--vae stabilityai/sd-vae-ft-ema] [--image-size 256]
    accelerate launch -m dit_moe extract IMAGE_ROOT OUTPUT ...     # one process per GPU

IMAGE_ROOT is an ImageNet-style class folder, IMAGE_ROOT/<class_name>/**/<image>; labels are the positions of
the sorted class folder names. Every image gets the ADM centre crop (`center_crop`), goes to [-1, 1], and is
encoded together with its horizontal flip by diffusers' AutoencoderKL; the posterior mean and std of both are
stored in float16 (format: dit_moe/data/latents.py).

Each process takes a strided slice of the sorted list of files still to do and writes its own shards
(shard-r<rank>-<counter>.safetensors). A shard is written under a temporary name and renamed, so a shard
either exists whole or not at all; the source files of each shard are listed in its metadata, so a re-run with
the same OUTPUT skips them and continues (also with a different number of processes). Files that fail to
decode are reported, skipped, listed in the manifest, and tried again by a re-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers.models import AutoencoderKL
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .cli import run_command
from .data.latents import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME
from .errors import DataError, InputNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SHARD_RE = re.compile(r"^shard-r(\d+)-(\d+)\.safetensors$")


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM centre crop (guided-diffusion's preprocessing, used by DiT): a size x size RGB image.

    Halve with a box filter while the short side is at least 2 * size (cheap, and it averages away the
    aliasing a single large bicubic step would keep), then bicubic-resize so the short side is exactly
    size, then cut the centre square.
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    W, H = image.size
    left, top = (W - size) // 2, (H - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


# 16-bit grey images: Pillow's convert("RGB") clips their 0..65535 values at 255 (almost everything turns white).
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded image -> 8-bit RGB; 16-bit grey is rescaled (x * 255 / 65535), not clipped.

    Modes whose range is not known (32-bit integer "I", float "F") are refused rather than guessed.
    """
    if image.mode in _SIXTEEN_BIT:
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round(arr * (255.0 / 65535.0)).astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        raise DataError(f"{image.mode!r} images ({'32-bit integer' if image.mode == 'I' else 'float'} grey) have no "
                        "known value range; convert them to 8 or 16 bits per channel")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Decode, convert to RGB, centre-crop: float32 (3, size, size) in [-1, 1]. Raises on a broken file."""
    with Image.open(path) as image:
        image.load()                  # forces the full decode, so truncation shows up here
        image = to_rgb(image)
    return image_to_tensor(center_crop(image, size))


def list_images(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """Class folder -> (class_names, files relative to root (posix, sorted), labels)."""
    root = Path(root)
    if not root.is_dir():
        raise InputNotFoundError(f"image folder {str(root)!r} does not exist")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise DataError(f"image folder {str(root)!r} has no class sub-folders (expected root/<class_name>/<image>)")
    files, labels = [], []
    for label, name in enumerate(class_names):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(Path(dirpath, fn).relative_to(root).as_posix())
                    labels.append(label)
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no image files with extensions {IMAGE_EXTENSIONS}")
    order = sorted(range(len(files)), key=files.__getitem__)
    return class_names, [files[i] for i in order], [labels[i] for i in order]


class _ImageFiles(Dataset):
    """Decodes in DataLoader workers; a broken file becomes (None, reason) instead of killing the run."""

    def __init__(self, root: Path, files: list[str], labels: list[int], size: int):
        self.root, self.files, self.labels, self.size = root, files, labels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            x, reason = load_image(self.root / self.files[i], self.size), None
        except Exception as e:  # any decoder failure of one file: reported by path and skipped, never silent
            x, reason = None, f"{type(e).__name__}: {e}"
        return self.files[i], self.labels[i], x, reason


def _collate(batch):
    ok = [b for b in batch if b[2] is not None]
    return {
        "files": [b[0] for b in ok],
        "labels": torch.tensor([b[1] for b in ok], dtype=torch.int64),
        "images": torch.stack([b[2] for b in ok]) if ok else None,
        "skipped": [{"path": b[0], "reason": b[3]} for b in batch if b[2] is None],
    }


# ----------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_pair(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, H, W) in [-1, 1] -> posterior mean, std, each (B, 2, C, h, w); [:, 1] is the mirror image.

    The mirror is encoded, not obtained by flipping the latent: the VAE is not equivariant to mirroring.
    """
    B = images.shape[0]
    posterior = vae.encode(torch.cat([images, images.flip(-1)])).latent_dist
    mean = posterior.mean.float()
    std = posterior.std.float()
    return torch.stack([mean[:B], mean[B:]], 1), torch.stack([std[:B], std[B:]], 1)


def load_vae(vae: str, device: torch.device | str = "cpu"):
    try:
        model = AutoencoderKL.from_pretrained(vae)
    except OSError as e:   # diffusers/huggingface_hub: no such folder or hub id, offline, missing files
        raise InputNotFoundError(f"--vae {vae!r}: cannot load an AutoencoderKL ({str(e).splitlines()[0]})") from e
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def _normalise_vae_id(vae: str) -> str:
    # A local directory is recorded as an absolute path so the manifest works from any working directory.
    return str(Path(vae).resolve()) if Path(vae).is_dir() else vae


# ----------------------------------------------------------------------------------------------------------
# Shards and manifest
# ----------------------------------------------------------------------------------------------------------


def _shard_name(rank: int, counter: int) -> str:
    return f"shard-r{rank:02d}-{counter:05d}.safetensors"


def _existing_shards(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if SHARD_RE.match(p.name))


def _shard_files(path: Path, vae: str, image_size: int) -> list[str]:
    """Source files of a finished shard, after checking it belongs to this extraction."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            n = f.get_slice("label").get_shape()[0]
    except SafetensorError as e:
        raise DataError(f"existing shard {str(path)!r} is not a readable safetensors file ({e}); remove it and re-run") from e
    if meta.get("vae") != vae or meta.get("image_size") != str(image_size):
        raise DataError(
            f"existing shard {str(path)!r} was extracted with vae={meta.get('vae')!r}, image_size={meta.get('image_size')}; "
            f"this run asks for vae={vae!r}, image_size={image_size}. Use another output directory."
        )
    files = json.loads(meta["files"])
    if len(files) != n:
        raise DataError(f"existing shard {str(path)!r} lists {len(files)} files in its metadata but holds {n} rows")
    return files


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _first_difference(a: list[str], b: list[str]) -> tuple[str, str]:
    i = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))

    def describe(names: list[str]) -> str:
        return f"{len(names)} classes, #{i} = {names[i] if i < len(names) else None!r}"

    return describe(a), describe(b)


def _check_compatible(old: dict, new: dict, path: Path) -> None:
    for key in ("format", "version", "vae", "image_size", "latent_shape", "class_names"):
        was, now = old.get(key), new[key]
        if was != now:
            if key == "class_names":  # a thousand names say less than the first difference
                was, now = _first_difference(was or [], now)
            raise DataError(
                f"{str(path)!r} was written for {key}={was!r}, this run has {key}={now!r}; "
                "use another output directory (or delete the old one) instead of mixing extractions"
            )


# ----------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------


def extract_latents(
    image_root: str | os.PathLike,
    output: str | os.PathLike,
    vae: str = DEFAULT_VAE,
    image_size: int = 256,
    batch_size: int = 32,
    shard_size: int = 1024,
    num_workers: int = 4,
    limit: int | None = None,
    accelerator=None,
    progress: bool = True,
) -> dict:
    """Extract (or resume extracting) latents of `image_root` into `output`; returns the manifest.

    limit: at most this many images per process in this call (the run is then left incomplete, to be
    resumed). accelerator: an `accelerate.Accelerator` (default: a new one, which reads the launch config).
    """
    if image_size <= 0 or image_size % 8:
        raise DataError(f"image_size must be a positive multiple of 8, got {image_size}")
    if batch_size <= 0 or shard_size <= 0:
        raise DataError(f"batch_size and shard_size must be positive, got {batch_size}, {shard_size}")
    if num_workers < 0 or (limit is not None and limit < 1):
        raise DataError(f"num_workers must be >= 0 and limit >= 1 (or None), got {num_workers}, {limit}")
    accelerator = accelerator or Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    root, out = Path(image_root).resolve(), Path(output)
    vae_id = _normalise_vae_id(vae)

    class_names, files, labels = list_images(root)
    model = load_vae(vae, accelerator.device)
    down = 2 ** (len(model.config.block_out_channels) - 1)
    if image_size % down:
        raise DataError(f"image_size {image_size} is not divisible by the VAE's downsampling factor {down}")
    C, h = model.config.latent_channels, image_size // down
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "complete": False,
        "vae": vae_id,
        "scaling_factor": float(model.config.scaling_factor),
        "shift_factor": float(model.config.get("shift_factor") or 0.0),
        "image_size": image_size,
        "latent_shape": [C, h, h],
        "class_names": class_names,
        "num_classes": len(class_names),
        "dtype": "float16",
        "source": str(root),
    }

    # 1. Every process reads the same state before anyone writes: the partition below depends on it.
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        _check_compatible(json.loads(manifest_path.read_text()), header, manifest_path)
    elif out.is_dir() and _existing_shards(out):
        raise DataError(f"{str(out)!r} holds shards but no {MANIFEST_NAME}; refusing to guess what they are")
    done: set[str] = set()
    next_counter = 0
    if out.is_dir():
        for p in _existing_shards(out):
            shard_files = _shard_files(p, vae_id, image_size)
            dup = done.intersection(shard_files)
            if dup:
                raise DataError(f"shard {str(p)!r} repeats {len(dup)} already extracted file(s), e.g. {sorted(dup)[0]!r}")
            done.update(shard_files)
            r, c = map(int, SHARD_RE.match(p.name).groups())
            if r == rank:
                next_counter = max(next_counter, c + 1)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".shard-*.tmp"):  # left by a run killed mid-write
            tmp.unlink()
        if not manifest_path.is_file():
            _write_json(manifest_path, {**header, "shards": [], "num_images": 0, "skipped": []})
    accelerator.wait_for_everyone()

    # 2. This process's share of what is left.
    todo = [i for i, f in enumerate(files) if f not in done][rank::world]
    if limit is not None:
        todo = todo[:limit]
    loader = DataLoader(
        _ImageFiles(root, [files[i] for i in todo], [labels[i] for i in todo], image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    if accelerator.is_main_process:
        remaining = len(files) - len(done)
        logger.info(
            "%d images, %d already in shards; extracting %d into %s with %d process(es)",
            len(files), len(done), remaining if limit is None else min(remaining, limit * world), out, world,
        )

    buffer: dict[str, list] = {"mean": [], "std": [], "label": [], "files": []}
    skipped: list[dict] = []

    def flush(n: int) -> None:
        nonlocal next_counter
        mean, std, lab = (torch.cat(buffer[k]) for k in ("mean", "std", "label"))
        names = buffer["files"]
        tensors = {"mean": mean[:n].contiguous(), "std": std[:n].contiguous(), "label": lab[:n].contiguous()}
        meta = {
            "format": FORMAT_NAME,
            "version": str(FORMAT_VERSION),
            "vae": vae_id,
            "image_size": str(image_size),
            "files": json.dumps(names[:n]),
        }
        name = _shard_name(rank, next_counter)
        tmp = out / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out / name)  # atomic: a shard exists whole or not at all
        next_counter += 1
        buffer.update(mean=[mean[n:]], std=[std[n:]], label=[lab[n:]], files=names[n:])

    bar = tqdm(total=len(todo), disable=not (progress and accelerator.is_local_main_process), unit="img", desc="extract")
    for batch in loader:
        for s in batch["skipped"]:
            logger.warning("skipping %s: %s", root / s["path"], s["reason"])
        skipped.extend(batch["skipped"])
        if batch["images"] is not None:
            mean, std = encode_pair(model, batch["images"].to(accelerator.device))
            buffer["mean"].append(mean.half().cpu())
            buffer["std"].append(std.half().cpu())
            buffer["label"].append(batch["labels"])
            buffer["files"].extend(batch["files"])
            while len(buffer["files"]) >= shard_size:
                flush(shard_size)
        bar.update(len(batch["files"]) + len(batch["skipped"]))
    if buffer["files"]:
        flush(len(buffer["files"]))
    bar.close()

    # 3. The main process writes the manifest from what is on disk, not from what this run thinks it did.
    skipped = gather_object(skipped)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards, seen = [], set()
        for p in _existing_shards(out):
            shard_files = _shard_files(p, vae_id, image_size)
            seen.update(shard_files)
            shards.append({"file": p.name, "count": len(shard_files)})
        skipped = sorted(skipped, key=lambda s: s["path"])
        complete = (seen | {s["path"] for s in skipped}) == set(files)
        manifest = {
            **header,
            "complete": complete,
            "shards": shards,
            "num_images": sum(s["count"] for s in shards),
            "skipped": skipped,
        }
        _write_json(manifest_path, manifest)
        logger.info("%d images in %d shards, %d skipped, complete=%s", manifest["num_images"], len(shards), len(skipped), complete)
    accelerator.wait_for_everyone()
    return json.loads(manifest_path.read_text())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("image_root", help="folder of class sub-folders: IMAGE_ROOT/<class_name>/<image>")
    parser.add_argument("output", help="output directory; re-running with the same one resumes")
    parser.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL hub id or local directory (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the ADM centre crop, a multiple of 8 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE call, per process; the mirror doubles it (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding processes per extraction process (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many images per process (resume later)")


def run(args: argparse.Namespace) -> dict:
    """``extract_latents`` with the command line's values; returns the manifest."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return extract_latents(
        args.image_root,
        args.output,
        vae=args.vae,
        image_size=args.image_size,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_workers=args.num_workers,
        limit=args.limit,
    )


def main(argv: list[str] | None = None) -> int:
    return run_command("extract", argv, prog="python -m dit_moe.extract", label="extract")


if __name__ == "__main__":
    sys.exit(main())
