"""The routing study (`dit-moe study CONFIG`): Top-k vs Top-p vs DTop-p vs Default MoE at matched compute.

A study config (YAML, see ``configs/study-digits.yaml``) names a base experiment config (path + dotted overrides),
a list of arms (name + dotted overrides, optionally a calibrated Top-p threshold), the seeds, the evaluation
settings and an output folder. Every (arm, seed) is an ordinary training run in ``<output>/runs/<arm>-s<seed>/``
(so ``dit-moe analyze`` and ``dit-moe sample`` work on it), followed by the same evaluation for every arm:

1. training with ``dit_moe.training.train`` (resumable: an interrupted study continues where it stopped);
2. a routing probe of the final (raw, non-EMA) weights on fixed noisy training inputs: the activated experts per
   (token, layer) at the end of training, mean and per-token standard deviation (the training log only keeps the
   per-step means);
3. ``num_samples`` class-balanced EMA samples through ``dit_moe.sampling.generate`` (same sampler, steps, CFG and seed for
   every arm), their FID against the reference and, on the digits, the share the digits classifier recognises;
   ``samples.json`` gives the activated experts per token during sampling (both CFG halves);
4. ``dit_moe.analyze``: routing plots of the final checkpoint on its sampling trajectory (whose per-token standard
   deviation the table reports) and the training curves;
5. ``study_result.json`` in the run folder. A run with its final checkpoint and this file is skipped on re-run
   (one evaluated with other evaluation settings than the study's is an error naming them).

Arms may take a calibrated fixed Top-p threshold (``calibrate: {from: ARM, target: 2.0}``): once the first seed of
ARM has finished, its final raw weights are loaded, and the global top-p threshold of every router is bisected so
that the probe inputs activate ``target`` experts per token on average; the arm then trains from scratch with that
threshold (``<output>/calibration.json`` keeps the result). The arm's training log shows where the count drifts to.

Aggregation (``<output>/results.json``, ``results.md``, and PNGs in ``<output>/plots`` or ``--plots-dir``): per arm,
mean and standard deviation across seeds of the final diffusion loss (mse + vb, mean over the last 10% of logged
steps), FID, classifier accuracy, activated experts during training (mean over the last quarter of the logged
steps, its spread across steps, and the probe's per-token std), during sampling (samples.json mean; analysis
per-token std), and seconds per training step; and every arm paired seed by seed with its baseline arm
(``comparison.baseline``, e.g. Top-k): per-seed differences of FID, accuracy and loss, a paired t interval, a sign
count and a plain "resolved at n seeds" statement, plus interactions such as "does the DTop-p vs Top-k gap depend
on the objective" (``paired``). Each arm is evaluated with the sampler of its objective (``evaluation.sampler``
for DDPM arms, ``evaluation.flow_sampler`` for flow arms), so ``diffusion.objective=flow`` is an ordinary override.

Several runs can go in parallel on one machine (``--jobs N``: N worker processes, each with cores / N threads).
Under ``accelerate launch`` (one process per GPU) every run uses all processes (``--jobs`` must be 1); the probe,
calibration, analysis and bookkeeping happen on the main process.

One file per job: ``config`` (the typed schema, ``load_study``, ``arm_config``), ``arm`` (one run through
``dit_moe.pipeline``'s stages, and its record), ``run`` (arms x seeds, resumable, worker processes, calibration,
timing), ``probe`` (the routing probe and Top-p calibration on fixed noisy training inputs), ``sweep`` and
``readouts`` (read-outs of a finished run), ``records``, ``paired`` (per-seed statistics), ``report`` (aggregate,
tables, plots) and ``cli``.
"""
from .cli import main
from .config import (CALIBRATION_FILE, RESULT_FILE, ArmSpec, BaseSpec, CalibrationSpec, ComparisonSpec, EvalSpec,
                     InteractionSpec, StudyConfig, StudyError, StudyFile, arm_config, arm_objective, load_study,
                     study_problems)
from .paired import compare_arms, interaction, paired_stats, sign_test, t_quantile
from .report import STAT_KEYS, aggregate, paired_tables, plot_study, results_table, write_report
from .probe import calibrate_topp_threshold, probe_inputs, probe_routing
from .arm import run_arm, summarize_run
from .run import check_inputs, report_study, run_study, time_arms

__all__ = [
    "StudyError",
    "ArmSpec",
    "BaseSpec",
    "CalibrationSpec",
    "EvalSpec",
    "ComparisonSpec",
    "InteractionSpec",
    "StudyConfig",
    "StudyFile",
    "CALIBRATION_FILE",
    "RESULT_FILE",
    "STAT_KEYS",
    "load_study",
    "study_problems",
    "arm_config",
    "arm_objective",
    "paired_stats",
    "sign_test",
    "t_quantile",
    "compare_arms",
    "interaction",
    "paired_tables",
    "probe_inputs",
    "probe_routing",
    "calibrate_topp_threshold",
    "check_inputs",
    "run_arm",
    "summarize_run",
    "time_arms",
    "aggregate",
    "results_table",
    "plot_study",
    "write_report",
    "run_study",
    "report_study",
    "main",
]
