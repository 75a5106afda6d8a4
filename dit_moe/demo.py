"""`python -m dit_moe.demo` (what `make demo` runs): the whole pipeline on the embedded digits, one command.

1. trains ``configs/default.yaml`` (a tiny DiT-MoE with DTop-p routing on sklearn's 8x8 digits; resumes if interrupted),
2. samples a labelled grid of every class with the EMA weights,
3. draws class-balanced samples and computes the digits FID against the whole dataset (features: ``digits-cnn``, the
   penultimate layer of a small CNN trained on the digits, see dit_moe/features.py) and the accuracy of that classifier
   on the samples (does a sample show the digit it was asked for?),
4. runs the routing analysis and plots the training curves,
5. prints where every file is and writes ``demo.json`` into the run folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def reference_digits(path: Path) -> Path:
    """Write the embedded digits as an ADM-style npz (``arr_0`` uint8 NHWC) to use as the FID reference."""
    from .data import build_dataset, to_uint8

    dataset, _ = build_dataset("builtin", "digits")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=arr)
    return path


def sample_accuracy(samples_dir: Path) -> float:
    """Fraction of samples that the digits classifier labels as the class they were sampled for."""
    from .features import digits_classifier
    from .sampling import read_samples

    images, labels, _ = read_samples(samples_dir)
    grey = torch.from_numpy(images).float().mean(dim=-1).unsqueeze(1) / 127.5 - 1.0    # (N, 1, H, W) in [-1, 1]
    with torch.no_grad():
        pred = digits_classifier()(grey).argmax(dim=1)
    return (pred == torch.from_numpy(labels).long()).float().mean().item()


def run_demo(config: Path = DEFAULT_CONFIG, overrides: list[str] | None = None, num_samples: int = 1000,
             sampler: str = "ddpm", steps: int = 250) -> dict:
    from . import analyze, sampling
    from .config import load_config
    from .training import train

    timings = {}
    cfg = load_config(config, overrides or [])
    if cfg.train.run_name is None:
        cfg.train.run_name = Path(config).stem

    print(f"[1/4] training {cfg.model.name} ({cfg.routing.type}) for {cfg.train.steps} steps on {cfg.data.source} data")
    t0 = time.time()
    run_dir = train(cfg, resume="latest")   # continues an interrupted demo; a finished one returns at once
    timings["train_s"] = round(time.time() - t0, 1)

    print("[2/4] sampling a labelled grid with the EMA weights")
    t0 = time.time()
    grid = run_dir / "samples.png"
    common = ["--sampler", sampler, "--steps", str(steps), "--device", "cpu" if not torch.cuda.is_available() else "cuda"]
    if sampling.main([str(run_dir), "--out", str(grid), *common]) != 0:
        raise RuntimeError("sampling the grid failed (see the message above)")

    print(f"[3/4] {num_samples} class-balanced samples -> digits FID and classifier accuracy")
    reference = reference_digits(run_dir / "reference" / "digits.npz")
    samples_dir = run_dir / "samples"
    if sampling.main([str(run_dir), "--num-samples", str(num_samples), "--out", str(samples_dir), "--batch-size", "250",
                      "--fid", str(reference), "--extractor", "digits-cnn", "--no-progress", *common]) != 0:
        raise RuntimeError("bulk sampling / FID failed (see the message above)")
    metrics = json.loads((samples_dir / "metrics.json").read_text())
    values = metrics.get("metrics", metrics)
    fid = values.get("fid", values.get("frechet_inception_distance"))
    accuracy = sample_accuracy(samples_dir)
    timings["sample_eval_s"] = round(time.time() - t0, 1)

    print("[4/4] routing analysis and training curves")
    t0 = time.time()
    analysis = analyze.analyze_checkpoint(run_dir)
    curves = analyze.plot_training_curves(run_dir)
    timings["analysis_s"] = round(time.time() - t0, 1)

    result = {
        "run_dir": str(run_dir),
        "model": cfg.model.name, "routing": cfg.routing.type,
        "fid_digits": fid, "classifier_accuracy": accuracy,
        "cfg_scale": cfg.sample.cfg_scale, "sampler": sampler, "steps": steps, "num_samples": num_samples,
        "files": {
            "grid": str(grid), "samples": str(samples_dir / "samples.npz"), "metrics": str(samples_dir / "metrics.json"),
            "metrics_log": str(run_dir / "metrics.jsonl"),
            "analysis": [str(f) for f in analysis.get("files", [])], "curves": [str(f) for f in curves],
        },
        "timings": timings,
    }
    (run_dir / "demo.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit_moe.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--num-samples", type=int, default=1000, help="samples for the FID and the accuracy")
    parser.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim", "dpm"))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .training import TrainingError

    try:
        r = run_demo(args.config, args.overrides, args.num_samples, args.sampler, args.steps)
    except (ConfigError, CheckpointError, TrainingError, RuntimeError, ValueError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    f = r["files"]
    print("\n=== dit-moe demo finished ===")
    print(f"run folder:           {r['run_dir']}")
    print(f"samples grid:         {f['grid']}")
    print(f"digits FID:           {r['fid_digits']:.3f}  ({r['num_samples']} samples, {r['sampler']} {r['steps']} steps, "
          f"cfg {r['cfg_scale']}, features: digits-cnn)")
    print(f"classifier accuracy:  {100 * r['classifier_accuracy']:.1f}% of samples show the requested digit")
    print(f"metrics:              {f['metrics']}")
    print(f"training log:         {f['metrics_log']}")
    print("analysis plots:       " + "\n                      ".join(f["analysis"] + f["curves"]))
    print(f"timings (s):          {r['timings']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
