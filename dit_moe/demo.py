"""`dit-moe demo` (what `make demo` runs; also `python -m dit_moe.demo`): the whole pipeline on the embedded digits, one command.

1. trains ``configs/default.yaml`` (a tiny DiT-MoE with DTop-p routing on sklearn's 8x8 digits, rectified flow; resumes
   if interrupted),
2. samples a labelled grid of every class with the EMA weights (the checkpoint's sampler unless flags say otherwise),
3. draws class-balanced samples and computes the digits FID against the whole dataset (features: ``digits-cnn``, the
   penultimate layer of a small CNN trained on the digits, see dit_moe/features.py) and the accuracy of that classifier
   on the samples (does a sample show the digit it was asked for?),
4. runs the routing analysis and plots the training curves,
5. prints where every file is and writes ``demo.json`` into the run folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import inference, pipeline, sampling
from .cli import run_command
from .config import load_config
from .validation import sample_problems
from .sampling.flags import add_checkpoint_arguments, add_sampler_arguments, flag_overrides

DEFAULT_CONFIG = "default"            # the shipped configs/default.yaml (dit_moe.config.find_config)


def guidance_text(cfg_scale: float, interval) -> str:
    """"cfg 2.0 at t in [0.0, 0.7]": the guidance as the demo prints it (no interval at cfg 1: nothing is guided)."""
    return f"cfg {cfg_scale}" + (" at t in [{}, {}]".format(*interval) if interval and cfg_scale != 1 else "")


def run_demo(config: str | Path = DEFAULT_CONFIG, overrides: list[str] | None = None, num_samples: int = 1000,
             sampling_overrides: dict | None = None, device: str | None = None, weights: str = "ema",
             vae: str | None = None) -> dict:
    """The four stages (``dit_moe.pipeline``); returns what the demo prints (also written to ``demo.json`` in the run
    folder).

    ``sampling_overrides``: SampleConfig fields (sampler, steps, cfg_scale, guidance_interval, ...) applied on top
    of the trained checkpoint's sample section, for the grid, the FID samples and the analysis alike; ``weights``
    and ``vae`` as in ``dit_moe.inference.load``.
    """
    watch = pipeline.Stopwatch()
    cfg = load_config(config, overrides or [])
    if cfg.train.run_name is None:
        cfg.train.run_name = Path(config).name.removesuffix(".yaml")
    if num_samples < 1:
        raise sampling.SamplingError(f"--num-samples {num_samples} must be >= 1")
    # The sampling settings against the objective to be trained: a bad flag fails now, not after training.
    problems = sample_problems(dataclasses.replace(cfg.sample, **(sampling_overrides or {})), cfg.diffusion.objective,
                              cfg.model.in_channels, name=lambda f: sampling.FLAGS.get(f, f))
    if problems:
        raise sampling.SamplingError(problems[0])
    device = str(inference.resolve_device(device))

    print(f"[1/4] training {cfg.model.name} ({cfg.routing.type}, objective {cfg.diffusion.objective}) for "
          f"{cfg.train.steps} steps on {cfg.data.source} data")
    with watch.stage("train"):
        run_dir = pipeline.train_run(cfg)   # continues an interrupted demo; a finished one returns at once
    print(f"      {watch.timings['train_s']:.1f} s")

    bundle = inference.load(run_dir, weights=weights, device=device, vae=vae)
    settings = sampling.resolve_settings(dataclasses.replace(bundle.defaults, **(sampling_overrides or {})),
                                         bundle.objective, bundle.shape[0], name=lambda f: sampling.FLAGS.get(f, f))
    print(f"[2/4] sampling a labelled grid with the EMA weights ({settings.sampler} {settings.steps} steps, "
          f"{guidance_text(settings.cfg_scale, settings.guidance_interval)})")
    with watch.stage("grid"):
        grid = sampling.sample_grid(bundle, settings, out=run_dir / "samples.png")
    print(f"      {watch.timings['grid_s']:.1f} s")

    print(f"[3/4] {num_samples} class-balanced samples -> digits FID and classifier accuracy")
    with watch.stage("sample_eval"):
        reference = pipeline.reference_file(pipeline.BUILTIN_REFERENCE, run_dir)
        samples_dir = run_dir / "samples"
        bulk = settings if "batch_size" in (sampling_overrides or {}) else dataclasses.replace(settings, batch_size=250)
        summary = pipeline.generate_and_evaluate(
            bundle, samples_dir, bulk, num_samples,
            sampling.Evaluation(reference=str(reference), extractor="digits-cnn", classifier_accuracy=True))
    print(f"      {watch.timings['sample_eval_s']:.1f} s")

    print("[4/4] routing analysis and training curves")
    with watch.stage("analysis"):
        analysis, curves = pipeline.analyze_run(
            run_dir, run_dir, device=device, which=weights, vae=vae, sampler=settings.sampler,
            cfg_scale=settings.cfg_scale, guidance_interval=settings.guidance_interval, time_shift=settings.time_shift)
    print(f"      {watch.timings['analysis_s']:.1f} s")

    result = {
        "run_dir": str(run_dir),
        "model": cfg.model.name, "routing": cfg.routing.type, "objective": cfg.diffusion.objective,
        "fid_digits": summary["metrics"].get("fid"), "classifier_accuracy": summary["classifier_accuracy"],
        "cfg_scale": settings.cfg_scale, "sampler": settings.sampler, "steps": settings.steps,
        "guidance_interval": list(settings.guidance_interval) if settings.guidance_interval else None,
        "num_samples": num_samples, "sample_images_per_second": summary.get("images_per_second"),
        "files": {
            "grid": grid["path"], "samples": str(samples_dir / sampling.NPZ_FILE),
            "metrics": str(samples_dir / sampling.METRICS_FILE), "metrics_log": str(run_dir / "metrics.jsonl"),
            "analysis": [str(f) for f in analysis.get("files", [])], "curves": [str(f) for f in curves],
        },
        "timings": watch.timings,
    }
    (run_dir / "demo.json").write_text(json.dumps(result, indent=2))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="experiment config: a path, or a shipped config's name (default: default)")
    parser.add_argument("--num-samples", type=int, default=1000, help="samples for the FID and the accuracy")
    add_checkpoint_arguments(parser)
    add_sampler_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def run(args: argparse.Namespace) -> dict:
    """``run_demo`` with the command line's values; prints where everything is and returns demo.json's content."""
    r = run_demo(args.config, args.overrides, args.num_samples, flag_overrides(args), args.device, args.weights,
                 args.vae)
    f = r["files"]
    print("\n=== dit-moe demo finished ===")
    print(f"run folder:           {r['run_dir']}")
    print(f"samples grid:         {f['grid']}")
    print(f"digits FID:           {r['fid_digits']:.3f}  ({r['num_samples']} samples, {r['objective']} model, "
          f"{r['sampler']} {r['steps']} steps, {guidance_text(r['cfg_scale'], r['guidance_interval'])}, "
          "features: digits-cnn)")
    print(f"classifier accuracy:  {100 * r['classifier_accuracy']:.1f}% of samples show the requested digit")
    print(f"metrics:              {f['metrics']}")
    print(f"training log:         {f['metrics_log']}")
    print("analysis plots:       " + "\n                      ".join(f["analysis"] + f["curves"]))
    print(f"timings (s):          {r['timings']}")
    return r


def main(argv=None) -> int:
    return run_command("demo", argv, prog="python -m dit_moe.demo", label="demo")


if __name__ == "__main__":
    sys.exit(main())
