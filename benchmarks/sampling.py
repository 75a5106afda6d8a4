"""Sampling speed and quality of trained digits checkpoints, per sampler: images/s, digits FID, classifier accuracy.

    python benchmarks/sampling.py runs/default [runs/flow ...] [--num-samples 1000] [--cfg 1 2] [--device cpu]

For every checkpoint the samplers of its objective run with the protocol's step counts -- DDPM models: DDPM-250,
DDIM-50, DPM++-25; flow models: Euler-50, Heun-25 (49 model calls), SDE-100 -- at each --cfg scale (default: 1 and the
checkpoint's own sample.cfg_scale), on the same class-balanced labels and seeds, with the checkpoint's guidance
interval and time shift. Each run goes through ``dit_moe.sampling.generate`` (the path sample.py takes) into a fresh
temporary folder, so images/s include decoding and PNG writing and nothing is resumed. FID uses the ``digits-cnn``
features against the embedded digits; accuracy is the share of samples the digits classifier labels as requested.
The runs are sequential in one process: compare rows of one invocation on an otherwise idle machine.

Prints a Markdown table; the last line is one JSON object {"rows": [...], "threads": ..., "device": ...}.
Not part of the test suite (minutes per checkpoint on a CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from dit_moe import inference, sampling
from dit_moe.data.builtin import reference_digits

PROTOCOL = {"ddpm": [("ddpm", 250), ("ddim", 50), ("dpm", 25)], "flow": [("euler", 50), ("heun", 25), ("sde", 100)]}


def bench_checkpoint(path: str, cfg_scales, num_samples: int, batch_size: int, device: str, reference: Path,
                     interval="checkpoint") -> list:
    bundle = inference.load(path, device=device)
    if interval != "checkpoint":
        bundle.defaults = dataclasses.replace(bundle.defaults, guidance_interval=interval)
    scales = cfg_scales or sorted({1.0, float(bundle.defaults.cfg_scale)})
    rows = []
    for sampler, steps in PROTOCOL[bundle.objective.kind]:
        for cfg in scales:
            settings = sampling.resolve_settings(
                dataclasses.replace(bundle.defaults, sampler=sampler, steps=steps, cfg_scale=cfg, batch_size=batch_size),
                bundle.objective, bundle.shape[0])
            with tempfile.TemporaryDirectory(prefix="bench-sampling-") as out:
                r = sampling.generate(bundle, out, settings, num_samples=num_samples, progress=False,
                                      evaluation=sampling.Evaluation(str(reference), extractor="digits-cnn",
                                                                     classifier_accuracy=True))
            rows.append({"checkpoint": str(path), "objective": bundle.objective.kind, "sampler": sampler,
                         "steps": steps, "model_calls": sampling.num_model_calls(settings), "cfg_scale": cfg,
                         "guidance_interval": settings.guidance_interval, "time_shift": settings.time_shift,
                         "images_per_second": r["images_per_second"], "fid": r["metrics"]["fid"],
                         "accuracy": r["classifier_accuracy"], "num_samples": num_samples})
            print(f"  {sampler}-{steps} cfg {cfg}: {r['images_per_second']:.1f} img/s, FID {r['metrics']['fid']:.2f}, "
                  f"accuracy {100 * r['classifier_accuracy']:.1f}%", flush=True)
    return rows


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="digits checkpoints or run folders (DDPM and/or flow)")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--cfg", type=float, nargs="+", help="guidance scales (default: 1 and the checkpoint's)")
    ap.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                    help="guide only at noise levels LO <= t <= HI (default: the checkpoint's own)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    interval = tuple(args.guidance_interval) if args.guidance_interval else "checkpoint"
    with tempfile.TemporaryDirectory(prefix="bench-ref-") as tmp:
        reference = reference_digits(Path(tmp) / "digits.npz")
        rows = []
        for path in args.checkpoints:
            print(f"{path}:", flush=True)
            rows += bench_checkpoint(path, args.cfg, args.num_samples, args.batch_size, args.device, reference,
                                     interval)
    print("\n| checkpoint | objective | sampler | model calls | cfg | guided at t in | images/s | digits FID | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['objective']} | {r['sampler']}-{r['steps']} | {r['model_calls']} | "
              f"{r['cfg_scale']:g} | {list(r['guidance_interval']) if r['guidance_interval'] and r['cfg_scale'] != 1 else '-'} | "
              f"{r['images_per_second']:.1f} | {r['fid']:.2f} | {100 * r['accuracy']:.1f}% |")
    result = {"rows": rows, "threads": torch.get_num_threads(), "device": args.device}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
