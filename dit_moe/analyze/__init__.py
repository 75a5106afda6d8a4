"""Routing analysis: where, when and for what an MoE DiT spends its experts (`dit-moe analyze`).

Two jobs, one command:

* ``analyze_checkpoint``: rebuild a checkpoint, sample a few images per class with CFG along the real sampling
  trajectory (``dit_moe.sampling.sample_latents``), and sum with a ``RoutingTap`` (hooks on every MoE layer's
  router) the number of experts each token activates and each expert's load, by layer, model call, timestep bucket
  and class; per-token records are kept for the spatial maps and the per-image spread only. Writes PNG plots and ``analysis.json``:

      active_per_layer.png     mean activated experts per MoE layer (bars, +-1 std over tokens), target line
      active_per_timestep.png  mean activated experts against the timestep, one curve per group of layers
      active_per_class.png     mean activated experts per class (bars) and per class x layer (heat map)
      active_spatial.png       activated experts per token (mean over layers) laid over the generated image,
                               at a few timesteps of the chain
      expert_load.png          share of (token, expert) assignments per expert and layer (experts x layers)
      drn_scale.png            DTop-p only: the DRN scale s_l of every layer, and the threshold p

  Top-k models give flat plots (every token takes exactly K experts): that flatness is the baseline the threshold
  routers are compared against.

* ``plot_training_curves``: the run's ``metrics.jsonl`` (one JSON object per logging step, written by the trainer)
  as PNGs: loss, activated experts (mean and spread over layers) against the target, threshold p, load balance.

What counts as a token. Under classifier-free guidance every model call routes the conditional and the
unconditional (null-class) copy of each image; both are compute actually spent, so per-layer, per-timestep and
load numbers count both halves (as sampling's activated-expert report does: both read a ``RoutingTap``).
Per-class numbers and spatial maps use the conditional half only (the null half is the same for every class);
``per_layer_cond`` / ``per_layer_uncond`` split the per-layer means. Tokens of one image are its
(input_size / patch)^2 patches in raster order, batch-major.

One file per job: ``trace`` (``trace_routing``: the trajectory, sampled with a ``RoutingTap`` attached), ``report``
(``analyze_checkpoint``: the report's numbers, from the tap's sums), ``plots`` (its PNGs), ``curves``
(``read_metrics``, ``plot_training_curves``; no torch import), ``errors`` (``AnalysisError``) and ``cli``.
"""
from .errors import AnalysisError
from .cli import main
from .curves import METRICS_FILE, read_metrics, plot_training_curves

__all__ = [
    "AnalysisError",
    "JSON_FILE",
    "METRICS_FILE",
    "default_out_dir",
    "analyze_checkpoint",
    "read_metrics",
    "plot_training_curves",
    "main",
]


def __getattr__(name: str):
    # The checkpoint report (torch, the model, sampling) loads on first use: `dit-moe analyze --run` draws training
    # curves from metrics.jsonl and never imports torch (tests/test_analyze.py holds it to that).
    if name in ("JSON_FILE", "analyze_checkpoint", "default_out_dir"):
        from . import report
        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
