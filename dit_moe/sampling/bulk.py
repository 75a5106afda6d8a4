"""Bulk sampling for FID: N samples into a folder (PNGs + ADM-style npz + samples.json), resumable, multi-process.

``sample_to_folder`` writes ``DIR/images/000123.png`` (named by global index; each process writes its own indices),
then the main process writes the ADM-style ``DIR/samples.npz`` (``arr_0`` uint8 NHWC, ``labels``) and
``DIR/samples.json`` (settings, throughput, activated experts per timestep bucket). ``evaluate_samples`` computes the
metrics of such a folder against a reference (``DIR/metrics.json``) and, on the digits, the share of samples the
digits classifier recognises. ``generate`` does both for an inference bundle and returns everything as one dict:
sample.py, the demo and the study read their numbers from that return value.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import evaluate
from ..config import SampleConfig
from ..data import to_uint8
from ..features import digits_classifier
from .experts import expert_tap, summarize_active
from .loop import make_generators, make_labels, objective_for, sample_latents
from .settings import SamplingError, resolve_settings

__all__ = ["IMAGE_DIR", "NPZ_FILE", "INFO_FILE", "STATS_DIR", "METRICS_FILE", "SingleProcess", "existing_indices",
           "write_npz", "read_samples", "sample_to_folder", "Evaluation", "evaluate_samples", "sample_accuracy",
           "generate"]

IMAGE_DIR = "images"
NPZ_FILE = "samples.npz"
INFO_FILE = "samples.json"
STATS_DIR = "stats"
METRICS_FILE = "metrics.json"


class SingleProcess:
    """The process-group interface ``sample_to_folder`` needs, for one process (Accelerate's PartialState fits too)."""
    process_index = 0
    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def _image_path(out_dir: Path, index: int) -> Path:
    return out_dir / IMAGE_DIR / f"{index:06d}.png"


def existing_indices(out_dir: Path, num_samples: int) -> set[int]:
    """Indices in [0, num_samples) whose PNG is on disk (files are renamed into place, so they are complete)."""
    found = set()
    folder = Path(out_dir) / IMAGE_DIR
    if folder.is_dir():
        for f in folder.iterdir():
            if f.suffix == ".png" and f.stem.isdigit() and int(f.stem) < num_samples:
                found.add(int(f.stem))
    return found


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through a temporary file and a rename; a failed write (a full disk) is one line naming the
    file, and leaves neither it nor the temporary behind."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise SamplingError(f"{path}: cannot write ({e.strerror or e}); the samples written so far are kept: "
                                "free space, then rerun the same command to resume") from e
        raise


def _to_runs(indices, rank: int, world: int) -> list[list[int]]:
    """Rank ``rank``'s indices (i % world == rank) as [start, stop) runs of i // world: a few numbers, not 50K."""
    runs: list[list[int]] = []
    for k in sorted(i // world for i in indices):
        if runs and runs[-1][1] == k:
            runs[-1][1] = k + 1
        else:
            runs.append([k, k + 1])
    return runs


def _from_runs(runs, rank: int, world: int):
    return (k * world + rank for start, stop in runs for k in range(start, stop))


def _write_json(path: Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2)
    _atomic_write(path, write)


def _save_png(path: Path, image_hwc: np.ndarray) -> None:
    _atomic_write(path, lambda tmp: Image.fromarray(image_hwc, "RGB").save(tmp, format="PNG"))


def write_npz(out_dir: Path, labels: np.ndarray) -> Path:
    """Pack ``images/*.png`` into the ADM reference layout: ``arr_0`` uint8 (N, H, W, 3) and ``labels`` (N,).

    The image array is filled through a memory-mapped .npy file and stored uncompressed in the zip, so 50K
    ImageNet-sized samples never need to sit in RAM at once.
    """
    out_dir = Path(out_dir)
    first = np.asarray(Image.open(_image_path(out_dir, 0)).convert("RGB"))
    path = out_dir / NPZ_FILE
    try:
        return _pack_npz(out_dir, path, labels, first)
    except OSError as e:          # the memory-mapped array or its temporary folder on a full disk
        raise SamplingError(f"{path}: cannot write ({e.strerror or e}); the images are kept: free space, then "
                            "rerun the same command") from e


def _pack_npz(out_dir: Path, path: Path, labels: np.ndarray, first: np.ndarray) -> Path:
    n = len(labels)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".npz-") as tmp:
        arr_file = os.path.join(tmp, "arr_0.npy")
        arr = np.lib.format.open_memmap(arr_file, mode="w+", dtype=np.uint8, shape=(n,) + first.shape)
        if hasattr(os, "posix_fallocate"):
            # The memory map is a sparse file: on a full disk, filling it would kill the process with SIGBUS.
            # Reserving its blocks first turns that into an OSError here.
            with open(arr_file, "r+b") as fh:
                os.posix_fallocate(fh.fileno(), 0, os.path.getsize(arr_file))
        for i in range(n):
            img = np.asarray(Image.open(_image_path(out_dir, i)).convert("RGB"))
            if img.shape != first.shape:
                raise SamplingError(f"{_image_path(out_dir, i)}: image of shape {img.shape}, expected {first.shape}")
            arr[i] = img
        arr.flush()
        del arr
        lab_file = os.path.join(tmp, "labels.npy")
        np.save(lab_file, np.asarray(labels, dtype=np.int64))

        def write(target):
            with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.write(arr_file, "arr_0.npy")
                zf.write(lab_file, "labels.npy")
        _atomic_write(path, write)
    return path


def read_samples(out_dir: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images uint8 (N, H, W, 3), labels (N,), samples.json) of a finished bulk run."""
    out_dir = Path(out_dir)
    with np.load(out_dir / NPZ_FILE) as data:
        images, labels = data["arr_0"], data["labels"]
    return images, labels, json.loads((out_dir / INFO_FILE).read_text())


def _check_resume(out_dir: Path, settings: dict) -> Optional[dict]:
    """The existing samples.json of ``out_dir`` if its settings match ours; an error naming the differences if not."""
    info_file = out_dir / INFO_FILE
    if not info_file.exists():
        return None
    try:
        old = json.loads(info_file.read_text())
    except json.JSONDecodeError as e:
        raise SamplingError(f"{info_file}: unreadable ({e}); remove it or choose another --out") from e
    theirs = old.get("settings", {})
    diff = [f"{k}: {theirs.get(k)!r} on disk vs {settings.get(k)!r} now"
            for k in sorted(set(theirs) | set(settings)) if theirs.get(k) != settings.get(k)]
    if diff:
        raise SamplingError(f"{out_dir}: holds samples made with other settings, refusing to mix them "
                            f"({'; '.join(diff)}); choose another output folder")
    return old


def sample_to_folder(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    settings: SampleConfig,
    num_samples: int,
    num_classes: int,
    shape: tuple[int, int, int],
    decode: Callable[[torch.Tensor], torch.Tensor],
    labels: str = "balanced",
    state=None,
    run_info: Optional[dict] = None,
    extra: Optional[dict] = None,
    progress: bool = True,
    objective=None,
) -> dict:
    """Draw ``num_samples`` samples into ``out_dir``, resumably, across processes; returns samples.json's content.

    Process r of W draws the missing indices i with i % W == r, in batches of ``settings.batch_size``; a sample's
    pixels depend only on (settings, settings.seed, i). Existing PNGs are kept. After a barrier the main process checks that all
    N images exist, writes ``samples.npz`` and ``samples.json``. ``run_info`` (model, checkpoint, VAE, ...)
    joins the settings that must match for a resume; ``extra`` is informational (e.g. the calibration result).
    ``decode`` maps latents (N, C, h, w) to images (N, 3|1, H, W) in [-1, 1]; ``objective`` as in sample_latents.
    """
    state = state or SingleProcess()
    objective = objective if objective is not None else objective_for(model, settings)
    settings = resolve_settings(settings, objective, shape[0])      # checks batch_size and seed too
    if num_samples < 1:
        raise SamplingError(f"num_samples={num_samples} must be >= 1")
    seed, batch_size = settings.seed, settings.batch_size
    out_dir = Path(out_dir)
    all_labels = make_labels(labels, num_samples, num_classes, seed)
    run_settings = {
        **(run_info or {}),
        "sampler": settings.sampler, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
        "guidance_channels": "all" if settings.guidance_channels is None else settings.guidance_channels,
        "clip_denoised": settings.clip_denoised, "labels": labels, "num_samples": num_samples,
        "num_classes": num_classes, "seed": seed,
    }
    # Written only when they apply, so folders sampled before these options existed still resume.
    if settings.guidance_interval is not None:
        run_settings["guidance_interval"] = list(settings.guidance_interval)
    if objective.kind == "flow":
        run_settings["time_shift"] = settings.time_shift
    _check_resume(out_dir, run_settings)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / STATS_DIR).mkdir(exist_ok=True)
    info = {"settings": run_settings, "status": "running", **({} if extra is None else {"extra": extra})}
    # List what exists before the barrier: after it, other processes start adding files.
    start = time.perf_counter()
    done = existing_indices(out_dir, num_samples)
    if state.is_main_process:
        _write_json(out_dir / INFO_FILE, info)
    state.wait_for_everyone()

    rank, world = state.process_index, state.num_processes
    todo = [i for i in range(num_samples) if i % world == rank and i not in done]

    stats_file = out_dir / STATS_DIR / f"rank{rank:05d}.json"
    saved = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    tap = expert_tap(model, saved.get("active_experts"), where=str(stats_file))   # reads t from the model's forward
    # Images on disk whose routing the saved statistics do not count (a kill between a batch's PNGs and its
    # statistics): drawn again, deterministically, to count them -- their PNGs are not rewritten. Statistics
    # written before coverage was recorded are taken as covering this rank's images, as they did then.
    covered = set(_from_runs(saved["covered"], rank, world)) if "covered" in saved else \
        {i for i in done if i % world == rank}
    recount = sorted(i for i in done if i % world == rank and i not in covered) if tap is not None else []

    bar = None
    if progress and state.is_main_process:
        bar = tqdm(total=len(todo), desc=f"sampling (rank 0 of {world})", unit="img", dynamic_ncols=True)
    device = next(model.parameters()).device
    try:
        if tap is not None:
            tap.__enter__()
        batches = [(recount[b:b + batch_size], False) for b in range(0, len(recount), batch_size)]
        batches += [(todo[b:b + batch_size], True) for b in range(0, len(todo), batch_size)]
        for idx, write in batches:
            latents = sample_latents(model, all_labels[idx], make_generators(seed, idx), settings, shape,
                                     device=device, objective=objective)
            if write:
                images = to_uint8(decode(latents)).permute(0, 2, 3, 1).cpu().numpy()   # (n, H, W, 3)
                for i, img in zip(idx, images):
                    _save_png(_image_path(out_dir, i), img)
            if tap is not None:
                covered.update(idx)
                _write_json(stats_file, {"active_experts": tap.state(), "covered": _to_runs(covered, rank, world)})
            if bar is not None and write:
                bar.update(len(idx))
    finally:
        if tap is not None:
            tap.__exit__(None, None, None)
        if bar is not None:
            bar.close()
    state.wait_for_everyone()

    if not state.is_main_process:
        return {"settings": run_settings, "status": "generated", "rank": rank, "generated": len(todo)}
    have = existing_indices(out_dir, num_samples)
    missing = sorted(set(range(num_samples)) - have)
    if missing:
        raise SamplingError(f"{out_dir / IMAGE_DIR}: {len(missing)} of {num_samples} samples missing "
                            f"(first {missing[:5]}); a process failed, rerun the same command to resume")
    seconds = time.perf_counter() - start
    new = len(have) - len(done)
    write_npz(out_dir, all_labels.numpy())
    docs = [json.loads(f.read_text()) for f in sorted((out_dir / STATS_DIR).glob("rank*.json"))]
    active = summarize_active([d["active_experts"] for d in docs])
    if active is not None:
        # How many images the statistics count (None: written before coverage was recorded, so unknown).
        active["images"] = sum(stop - start for d in docs for start, stop in d["covered"]) \
            if all("covered" in d for d in docs) else None
    info.update({
        "status": "complete",
        "npz": NPZ_FILE,
        "class_counts": torch.bincount(all_labels, minlength=num_classes).tolist(),
        "generated_this_run": new,
        "resumed_from": len(done),
        "processes": world,
        "seconds": round(seconds, 3),
        "images_per_second": round(new / seconds, 3) if seconds > 0 else None,
        "active_experts": active,
    })
    _write_json(out_dir / INFO_FILE, info)
    return info


# ---------------------------------------------------------------------------------------------------------
#                                      Metrics of a finished folder
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    """What to measure after bulk sampling: metrics against ``reference`` (image folder, ADM reference npz or a
    statistics npz) with a torch-fidelity feature extractor, and optionally the digits classifier's accuracy."""
    reference: str
    metrics: tuple = ("fid",)
    extractor: str = evaluate.DEFAULT_EXTRACTOR
    inception_weights: Optional[str] = None
    classifier_accuracy: bool = False

    def check(self, label: str = "reference") -> None:
        """Raise the error the evaluation would raise after sampling, now: unknown metrics or extractor, missing
        weights, a reference that does not exist, cannot be read, or lacks what the metrics need (prefixed with
        ``label``)."""
        evaluate.check_reference(self.reference, metrics=tuple(self.metrics), label=label,
                                 feature_extractor=self.extractor, inception_weights=self.inception_weights)


def sample_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """Share of uint8 (N, H, W, 3) digit images that the digits classifier labels as the class they were drawn for."""
    grey = torch.from_numpy(np.asarray(images)).float().mean(dim=-1).unsqueeze(1) / 127.5 - 1.0   # (N, 1, H, W)
    with torch.no_grad():
        pred = digits_classifier()(grey).argmax(dim=1)
    return (pred == torch.from_numpy(np.asarray(labels)).long()).float().mean().item()


def evaluate_samples(out_dir: str | Path, evaluation: Evaluation, summary: dict, device="cpu") -> dict:
    """Metrics of the finished bulk folder ``out_dir`` (its npz) per ``evaluation``; also written to metrics.json.

    Returns {"metrics": {...}, "settings": {...}, "classifier_accuracy": float | None}.
    """
    out_dir = Path(out_dir)
    settings = {**summary["settings"], "samples": str(out_dir / NPZ_FILE)}
    if summary.get("active_experts"):
        settings["active_experts_mean"] = summary["active_experts"]["mean"]
    result = evaluate.compute_metrics(str(out_dir / NPZ_FILE), evaluation.reference, metrics=tuple(evaluation.metrics),
                                      feature_extractor=evaluation.extractor,
                                      inception_weights=evaluation.inception_weights,
                                      device=torch.device(device).type, settings=settings)
    evaluate.write_metrics_json(out_dir / METRICS_FILE, result["metrics"], result["settings"])
    accuracy = None
    if evaluation.classifier_accuracy:
        images, labels, _ = read_samples(out_dir)
        accuracy = sample_accuracy(images, labels)
    return {"metrics": result["metrics"], "settings": result["settings"], "classifier_accuracy": accuracy}


def generate(bundle, out_dir: str | Path, settings: Optional[SampleConfig] = None, *, num_samples: int,
             labels: str = "balanced", state=None, progress: bool = True, evaluation: Optional[Evaluation] = None,
             run_info: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """``num_samples`` samples of an inference bundle into ``out_dir`` (resumable), then ``evaluation`` on the main
    process. ``run_info`` adds identifying fields to the bundle's (a resume must match them), ``extra`` is
    informational. Returns samples.json's content, plus ``metrics`` and ``classifier_accuracy`` when evaluated
    (main process only; other processes get their own part's summary)."""
    settings = resolve_settings(settings or bundle.defaults, bundle.objective, bundle.shape[0])
    if evaluation is not None and (state is None or state.is_main_process):
        evaluation.check()                 # a bad reference fails before any sample is drawn
    summary = sample_to_folder(
        bundle.model, out_dir, settings=settings, num_samples=num_samples, num_classes=bundle.num_classes,
        shape=bundle.shape, decode=bundle.decode, labels=labels, state=state, run_info={**bundle.run_info(), **(run_info or {})}, extra=extra, progress=progress,
        objective=bundle.objective)
    if evaluation is not None and (state is None or state.is_main_process):
        result = evaluate_samples(out_dir, evaluation, summary, bundle.device)
        summary["metrics"] = result["metrics"]
        summary["metrics_settings"] = result["settings"]
        summary["classifier_accuracy"] = result["classifier_accuracy"]
    return summary
