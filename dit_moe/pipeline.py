"""The stages a run goes through, shared by `dit-moe demo` (dit_moe/demo.py) and the routing study's ``run_arm``
(dit_moe/study/arm.py): each stage is a function of objects (a config, a run folder, a bundle, settings).

    train_run             config -> its run folder, trained (or continued from its latest checkpoint)
    final_checkpoint      the run's checkpoint of its last step, if written
    reference_file        the FID reference: "builtin-digits" written once into a folder, or a given path
    generate_and_evaluate EMA samples of a loaded bundle (``dit_moe.inference.load``) into a folder, their FID
                          (and the digits classifier's accuracy): ``dit_moe.sampling.generate``
    analyze_run           the routing analysis of a checkpoint on its sampling trajectory, and the training curves
    Stopwatch             wall (and CPU) seconds of each stage; ``seconds_per_step`` the training speed of a log

Arrows point down: demo / study -> pipeline -> training, inference, sampling, analyze, data.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .analyze import analyze_checkpoint, plot_training_curves, read_metrics
from .config import ExperimentConfig, SampleConfig
from .data.builtin import reference_digits
from .inference import InferenceBundle
from .sampling import Evaluation, generate
from .training import train

__all__ = ["BUILTIN_REFERENCE", "Stopwatch", "train_run", "final_checkpoint", "reference_file",
           "generate_and_evaluate", "analyze_run", "seconds_per_step"]

BUILTIN_REFERENCE = "builtin-digits"     # every embedded digit, written as an npz by ``reference_file``


class Stopwatch:
    """Seconds per stage: ``with watch.stage("train"):`` records ``train_s`` (wall, 0.1 s) and, with ``cpu=True``,
    ``train_cpu_s`` (this process's CPU seconds: the cost on a shared machine) into ``watch.timings``."""

    def __init__(self, cpu: bool = False, timings: Optional[dict] = None):
        self.cpu = cpu
        self.timings = {} if timings is None else timings

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0, c0 = time.time(), time.process_time()
        yield
        self.timings[f"{name}_s"] = round(time.time() - t0, 1)
        if self.cpu:
            self.timings[f"{name}_cpu_s"] = round(time.process_time() - c0, 1)


def train_run(cfg: ExperimentConfig) -> Path:
    """Train ``cfg`` in its run folder, continuing from the latest checkpoint there (a finished run returns at once;
    under a multi-process launch every process takes part). Returns the run folder."""
    return train(cfg, resume="latest")


def final_checkpoint(run_dir: Path, steps: int) -> Optional[Path]:
    """``<run_dir>/checkpoints/step-<steps>``, the checkpoint of the run's last step, or None if it is not there."""
    ckpt = Path(run_dir) / "checkpoints" / f"step-{steps:07d}"
    return ckpt if ckpt.is_dir() else None


def reference_file(reference: str, folder: Path) -> Path:
    """The FID reference as a path: ``BUILTIN_REFERENCE`` -> ``<folder>/reference/digits.npz`` (written if missing),
    anything else is the path of a reference file or folder."""
    if reference != BUILTIN_REFERENCE:
        return Path(reference)
    path = Path(folder) / "reference" / "digits.npz"
    if not path.is_file():
        reference_digits(path)
    return path


def generate_and_evaluate(bundle: InferenceBundle, out_dir: Path, settings: SampleConfig, num_samples: int,
                          evaluation: Evaluation, state=None) -> dict:
    """``num_samples`` class-balanced samples of ``bundle`` with ``settings`` into ``out_dir`` (resumable), and their
    metrics against ``evaluation.reference``; under a multi-process launch (``state``) every process samples its
    share. Returns ``dit_moe.sampling.generate``'s summary (metrics, classifier_accuracy, active_experts, ...)."""
    return generate(bundle, out_dir, settings, num_samples=num_samples, state=state, progress=False,
                    evaluation=evaluation)


def analyze_run(checkpoint: Path, run_dir: Path, *, routing: bool = True, **analysis) -> tuple[Optional[dict], list]:
    """The routing analysis of ``checkpoint`` (``dit_moe.analyze.analyze_checkpoint(checkpoint, **analysis)``) and
    the training curves of ``run_dir``; returns (analysis.json's content, curve files). ``routing=False`` (a dense
    model: no routers) skips the analysis and returns None for it; any analysis error is the caller's to see."""
    report = analyze_checkpoint(checkpoint, **analysis) if routing else None
    return report, plot_training_curves(run_dir)


def seconds_per_step(run_dir: Path) -> float:
    """Median seconds per training step over the logging intervals of ``<run_dir>/metrics.jsonl`` after the first
    (which includes start-up: the first forward, allocation); the first alone when there is no other."""
    rows = read_metrics(run_dir)
    sps = [r["steps_per_sec"] for r in rows[1:] if r.get("steps_per_sec")] or [rows[0]["steps_per_sec"]]
    return float(np.median([1.0 / s for s in sps]))
