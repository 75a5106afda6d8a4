"""The study config: a typed schema read by ``dit_moe.config.from_dict`` (as experiment configs are), one validation
pass for what a type cannot say, and every arm's experiment config resolved before any compute is spent.

    name: short                     # default: the file name
    output: runs/short              # default: runs/<file name>
    base: {config: configs/default.yaml, overrides: [train.steps=1000, ...]}
    seeds: [0, 1, 2]
    evaluation: {sampler: ddim, steps: 50, flow_sampler: euler, num_samples: 500, ...}   # EvalSpec; keys optional
    comparison: {baseline: topk, confidence: 0.95, interactions: [...]}            # ComparisonSpec; optional
    records: docs/study/records     # one JSON per finished (arm, seed), kept in git (dit_moe/study/records.py)
    report: docs/study              # results.md and the PNGs (--plots-dir overrides)
    sweep: {arms: [dtopp, topk], targets: [1.0, 2.0, 4.0], top_k: [1, 2, 4]}     # SweepSpec; optional
    arms:
      - {name: topk, overrides: [routing.type=topk], description: "..."}
      - {name: topp-cal, overrides: [routing.type=topp], calibrate: {from: topp-0.4, target: 2.0}}
      - {name: topk-flow, overrides: [diffusion.objective=flow, model.learn_sigma=false], baseline: topk}

An unknown key or a value of the wrong type is the same ``ConfigError`` message as in an experiment config, naming
the key (``evaluation.num_sample``, ``arms[2].calibrate.targt``), raised as a ``StudyError`` prefixed with the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence


from ..config import (SAMPLERS, ConfigError, DiffusionConfig, ExperimentConfig, apply_overrides, from_dict,
                      find_config, load_config, read_yaml, shipped_configs)
from ..errors import DitMoeError
from ..registry import parse_name

__all__ = ["StudyError", "BaseSpec", "CalibrationSpec", "ArmSpec", "EvalSpec", "InteractionSpec", "ComparisonSpec",
           "SweepSpec", "StudyFile", "StudyConfig", "RESULT_FILE", "CALIBRATION_FILE", "TIMING_FILE",
           "study_problems", "load_study", "arm_config", "arm_objective"]

RESULT_FILE = "study_result.json"         # <output>/runs/<arm>-s<seed>/: one finished run's numbers
CALIBRATION_FILE = "calibration.json"     # <output>/ and <records>/: calibrated Top-p thresholds
TIMING_FILE = "timing.json"               # <output>/ and <records>/: the timing pass (s/step per arm)


class StudyError(DitMoeError, ValueError):
    """A bad study config or a study step that failed; the message names the file, key or run at fault."""


# ---------------------------------------------------------------------------------------------------------
#                                           The schema
# ---------------------------------------------------------------------------------------------------------

@dataclass
class EvalSpec:
    """Evaluation shared by every arm (changing any of these changes every number of the table).

    The sampler is chosen per objective, so one study can hold arms of both (``diffusion.objective=flow`` as an
    ordinary arm or command-line override): ``sampler``/``steps`` for DDPM arms, ``flow_sampler``/``flow_steps``
    for flow arms; everything else (CFG scale, sample seed, count, reference) is shared."""
    sampler: str = field(default="ddim", metadata={"choices": SAMPLERS["ddpm"]})          # arms of objective ddpm
    steps: int = 50
    flow_sampler: str = field(default="euler", metadata={"choices": SAMPLERS["flow"]})    # arms of objective flow
    flow_steps: int = 50
    cfg_scale: float = 2.0
    num_samples: int = 500
    batch_size: int = 250
    seed: int = 0
    reference: str = "builtin-digits"     # builtin-digits (the embedded digits as npz) | path to an npz / image folder
    extractor: str = "digits-cnn"         # torch-fidelity feature extractor of the FID
    inception_weights: Optional[str] = None
    classifier_accuracy: bool = True      # digits only: share of samples the digits classifier labels as requested
    analysis_per_class: int = 2           # samples per class of the routing analysis trajectory
    probe_batches: int = 4                # routing probe: batches of noisy training inputs (fixed seed)
    probe_batch_size: int = 256
    timing_steps: int = 40                # timing pass: steps per arm, run one after another on the idle machine
    final_fraction: float = 0.1           # final loss = mean over this last fraction of logged steps
    active_fraction: float = 0.25         # train-time activated experts over this last fraction of logged steps

    def sampler_for(self, objective: str) -> tuple[str, int]:
        """(sampler, steps) of the arms trained with ``objective``."""
        return (self.flow_sampler, self.flow_steps) if objective == "flow" else (self.sampler, self.steps)


@dataclass
class InteractionSpec:
    """Does a paired difference depend on a setting? Per seed (first[0] - first[1]) - (second[0] - second[1]).

    E.g. {name: objective, first: [dtopp, topk], second: [dtopp-flow, topk-flow]}: does the DTop-p vs Top-k gap
    change from DDPM to flow matching (and does the ranking flip)?"""
    name: str
    first: list[str]                      # [arm, its reference] in the first setting
    second: list[str]                     # the same two arms in the second setting


@dataclass
class ComparisonSpec:
    """Paired comparisons in the report (dit_moe/study/paired.py): every arm against a baseline arm of the same seed
    (same init seed, data order and training noise, same sampling noise), with a paired t interval and a sign test."""
    baseline: Optional[str] = None        # arm the others are paired with (an arm's own `baseline` wins); None: none
    confidence: float = 0.95              # two-sided level of the paired t interval
    interactions: Optional[list[InteractionSpec]] = None

    def __post_init__(self):
        self.interactions = list(self.interactions or [])


@dataclass
class CalibrationSpec:
    """A fixed Top-p threshold bisected on another arm's final model so that it activates ``target`` experts."""
    source: str = field(metadata={"key": "from"})    # the arm whose first seed's final model calibrates p
    target: float = 2.0


@dataclass
class ArmSpec:
    name: str
    overrides: Optional[list[str]] = None           # section.key=value, after the base overrides
    calibrate: Optional[CalibrationSpec] = None
    description: Optional[str] = ""
    baseline: Optional[str] = None                  # the arm this one is paired with (None: comparison.baseline)

    def __post_init__(self):
        self.overrides = list(self.overrides or [])
        self.description = self.description or ""

    @property
    def calibrate_from(self) -> Optional[str]:
        return self.calibrate.source if self.calibrate is not None else None

    @property
    def calibrate_target(self) -> float:
        return self.calibrate.target if self.calibrate is not None else 2.0


@dataclass
class SweepSpec:
    """Compute against quality at sampling time, on each final model of ``arms`` (EMA weights, the study's sampler,
    CFG, seed and reference): DTop-p arms are re-targeted to each of ``targets`` experts per token (the threshold
    calibrated on the model's own sampling trajectory, as ``dit-moe sample --target-experts`` does); Top-k arms
    sample with each k of ``top_k`` (the router takes any k; its weights stay the raw softmax probabilities). Not an
    evaluation setting: a run's table numbers do not depend on it, and a record without it is completed when its
    checkpoint is still there."""
    arms: list[str]
    targets: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 4.0])    # DTop-p arms
    top_k: list[int] = field(default_factory=lambda: [1, 2, 3, 4])                     # Top-k arms
    num_samples: Optional[int] = None             # per point; default evaluation.num_samples
    calibration_samples: int = 16                 # DTop-p: trajectories the threshold is bisected on

    def settings(self, ev: "EvalSpec") -> dict:
        """What a recorded sweep must match to be reused."""
        return {"targets": [float(t) for t in self.targets], "top_k": [int(k) for k in self.top_k],
                "num_samples": self.num_samples or ev.num_samples, "calibration_samples": self.calibration_samples}


@dataclass
class BaseSpec:
    """The experiment every arm starts from: a config file (None: the defaults) and dotted overrides."""
    config: Optional[str] = None
    overrides: Optional[list[str]] = None

    def __post_init__(self):
        self.overrides = list(self.overrides or [])


@dataclass
class StudyFile:
    """A study YAML file, as written."""
    base: BaseSpec
    seeds: list[int]
    arms: list[ArmSpec]
    name: Optional[str] = None
    output: Optional[str] = None
    evaluation: EvalSpec = field(default_factory=EvalSpec)
    comparison: ComparisonSpec = field(default_factory=ComparisonSpec)
    records: Optional[str] = None         # folder of the per-run records (relative: to the current directory)
    report: Optional[str] = None          # folder of results.md and the PNGs (default: <output>, <output>/plots)
    sweep: Optional[SweepSpec] = None


@dataclass
class StudyConfig:
    """A loaded study: the file's contents with paths resolved and command-line overrides applied."""
    name: str
    output: Path
    base_config: Optional[Path]
    base_overrides: list
    seeds: list
    arms: list                            # [ArmSpec]
    evaluation: EvalSpec
    path: Optional[Path] = None           # the YAML file
    comparison: ComparisonSpec = field(default_factory=ComparisonSpec)
    records: Optional[Path] = None        # None: results live in the run folders only
    report: Optional[Path] = None         # results.md + PNGs (None: <output>/plots)
    sweep: Optional[SweepSpec] = None

    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        raise StudyError(f"{self.path}: no arm named {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def baseline_of(self, arm: ArmSpec) -> Optional[str]:
        """The arm ``arm`` is paired with in the report (None: the baseline itself, or no comparison)."""
        base = arm.baseline or self.comparison.baseline
        return None if base == arm.name else base


# ---------------------------------------------------------------------------------------------------------
#                                     Validation and loading
# ---------------------------------------------------------------------------------------------------------

def study_problems(spec: StudyFile) -> list[str]:
    """What the types of the schema cannot say: ranges, distinct seeds and arm names, calibration sources."""
    problems = []
    bad = problems.append
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        bad(f"seeds must be a non-empty list of distinct integers, got {spec.seeds!r}")
    ev = spec.evaluation
    for key in ("steps", "flow_steps", "num_samples", "batch_size", "analysis_per_class", "probe_batches",
                "probe_batch_size", "timing_steps"):
        if getattr(ev, key) < 1:
            bad(f"evaluation.{key}={getattr(ev, key)} must be >= 1")
    for key in ("final_fraction", "active_fraction"):
        if not 0 < getattr(ev, key) <= 1:
            bad(f"evaluation.{key}={getattr(ev, key)} must be in (0, 1]")
    if not spec.arms:
        bad("arms must be a non-empty list of {name, overrides} mappings")
    names = [a.name for a in spec.arms]
    for i, arm in enumerate(spec.arms):
        if not arm.name or any(c in arm.name for c in "/\\ "):
            bad(f"arms[{i}].name must be a non-empty string without '/', '\\' or spaces, got {arm.name!r}")
        c = arm.calibrate
        if c is None:
            continue
        if not (math.isfinite(c.target) and c.target >= 1):
            bad(f"arms[{i}] ({arm.name}).calibrate.target must be a number >= 1, got {c.target!r}")
        if c.source not in names:
            bad(f"arms[{i}] ({arm.name}).calibrate.from: no arm named {c.source!r}; arms: {', '.join(names)}")
        elif spec.arms[names.index(c.source)].calibrate is not None:
            bad(f"arm {arm.name!r} calibrates from {c.source!r}, which is calibrated itself")
    cmp = spec.comparison
    if not 0 < cmp.confidence < 1:
        bad(f"comparison.confidence={cmp.confidence} must be in (0, 1)")
    if cmp.baseline is not None and cmp.baseline not in names:
        bad(f"comparison.baseline: no arm named {cmp.baseline!r}; arms: {', '.join(names)}")
    for i, arm in enumerate(spec.arms):
        if arm.baseline is not None and arm.baseline not in names:
            bad(f"arms[{i}] ({arm.name}).baseline: no arm named {arm.baseline!r}; arms: {', '.join(names)}")
    for i, inter in enumerate(cmp.interactions):
        for key in ("first", "second"):
            pair = getattr(inter, key)
            if len(pair) != 2 or pair[0] == pair[1]:
                bad(f"comparison.interactions[{i}].{key} must be two different arm names [arm, reference], "
                    f"got {pair!r}")
            for n in pair:
                if n not in names:
                    bad(f"comparison.interactions[{i}].{key}: no arm named {n!r}; arms: {', '.join(names)}")
    sw = spec.sweep
    if sw is not None:
        for n in sw.arms:
            if n not in names:
                bad(f"sweep.arms: no arm named {n!r}; arms: {', '.join(names)}")
        if not sw.arms:
            bad("sweep.arms must name at least one arm")
        if not sw.targets or not all(math.isfinite(t) and t >= 1 for t in sw.targets):
            bad(f"sweep.targets must be a non-empty list of numbers >= 1, got {sw.targets!r}")
        if not sw.top_k or not all(k >= 1 for k in sw.top_k):
            bad(f"sweep.top_k must be a non-empty list of integers >= 1, got {sw.top_k!r}")
        if sw.num_samples is not None and sw.num_samples < 1:
            bad(f"sweep.num_samples={sw.num_samples} must be >= 1")
        if sw.calibration_samples < 1:
            bad(f"sweep.calibration_samples={sw.calibration_samples} must be >= 1")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        bad(f"duplicate arm name(s) {', '.join(dup)}")
    return problems


def load_study(path: str | Path, overrides: Sequence[str] = (), output: Optional[str] = None,
               records: Optional[str] = None) -> StudyConfig:
    """Read and validate a study YAML; ``overrides`` (``section.key=value``) are appended to the base overrides;
    ``output`` and ``records`` replace the file's folders.

    Every arm's experiment config is resolved here, so a typo in any arm fails before any compute is spent.
    Relative paths in the file (base config, output, reference) are relative to the current directory, except a
    base config that only exists relative to the study file's folder or the repository root.
    """
    path = find_config(path, StudyError)           # a path, or a shipped study config's name
    d = read_yaml(path, StudyError)
    try:
        spec = from_dict(StudyFile, d if d is not None else {}, where="")
    except ConfigError as e:
        raise StudyError(f"{path}: {e}") from None
    problems = study_problems(spec)
    if problems:
        raise StudyError(f"{path}: invalid study ({len(problems)} problem{'s' * (len(problems) > 1)}): "
                         + "; ".join(problems))

    base_config = None
    if spec.base.config is not None:
        base_config = Path(spec.base.config)
        if not base_config.is_file() and (path.parent / base_config).is_file():
            base_config = path.parent / base_config
        try:
            base_config = find_config(base_config)
        except ConfigError:
            raise StudyError(f"{path}: base.config {spec.base.config!r} not found (shipped configs: "
                             f"{', '.join(shipped_configs())})") from None
    study = StudyConfig(
        name=spec.name or path.stem, output=Path(output or spec.output or f"runs/{path.stem}"),
        base_config=base_config, base_overrides=spec.base.overrides + list(overrides), seeds=list(spec.seeds),
        arms=spec.arms, evaluation=spec.evaluation, path=path, comparison=spec.comparison,
        records=Path(records or spec.records) if (records or spec.records) else None,
        report=Path(spec.report) if spec.report else None, sweep=spec.sweep)
    for arm in study.arms:
        cfg = arm_config(study, arm, study.seeds[0], threshold=0.5 if arm.calibrate_from else None)
        if arm.calibrate_from is not None and cfg.routing.type != "topp":
            raise StudyError(f"{path}: arm {arm.name!r} has a calibrated threshold but routing.type "
                             f"{cfg.routing.type!r}; calibration sets the fixed Top-p threshold (routing.type=topp)")
        if study.sweep is not None and arm.name in study.sweep.arms:
            _check_sweep_arm(study, arm, cfg)
    return study


def _check_sweep_arm(study: StudyConfig, arm: ArmSpec, cfg: ExperimentConfig) -> None:
    sw, where = study.sweep, f"{study.path}: sweep.arms: arm {arm.name!r}"
    num_experts = parse_name(cfg.model.name).num_experts
    if cfg.routing.type == "dtopp":
        bad = [t for t in sw.targets if t > num_experts]
        if bad:
            raise StudyError(f"{where}: sweep.targets {bad} exceed its {num_experts} experts")
    elif cfg.routing.type == "topk" and num_experts > 1:
        bad = [k for k in sw.top_k if k > num_experts]
        if bad:
            raise StudyError(f"{where}: sweep.top_k {bad} exceed its {num_experts} experts")
    else:
        kind = "dense" if num_experts == 1 else f"routing.type {cfg.routing.type!r}"
        raise StudyError(f"{where} is {kind}; the sweep re-targets DTop-p (dtopp) and Top-k (topk) models only")


def arm_objective(study: StudyConfig, arm: ArmSpec) -> str:
    """The training objective of ``arm`` (base config + base overrides + arm overrides), read before validation:
    the sampler written into its sample section depends on it, and validation checks the two together."""
    d = {}
    try:
        if study.base_config is not None:
            d = read_yaml(study.base_config) or {}
        d = apply_overrides(d if isinstance(d, dict) else {}, [*study.base_overrides, *arm.overrides])
    except ConfigError as e:
        raise StudyError(f"{study.path}: arm {arm.name!r}: {e}") from None
    section = d.get("diffusion")
    objective = section.get("objective", DiffusionConfig().objective) if isinstance(section, dict) else "ddpm"
    return str(objective)     # an invalid value fails in arm_config's validation, naming diffusion.objective


def arm_config(study: StudyConfig, arm: ArmSpec, seed: int, threshold: Optional[float] = None) -> ExperimentConfig:
    """The experiment config of one run: base + base overrides + arm overrides + seed, run folder, sampler."""
    ev = study.evaluation
    sampler, steps = ev.sampler_for(arm_objective(study, arm))
    overrides = [
        *study.base_overrides, *arm.overrides,
        f"train.seed={seed}", f"train.run_dir={study.output / 'runs'}", f"train.run_name={arm.name}-s{seed}",
        # The checkpoint's sample section = the study's sampler, so grids and `dit-moe sample RUN` match the table.
        f"sample.sampler={sampler}", f"sample.steps={steps}", f"sample.cfg_scale={ev.cfg_scale}",
        # Guidance at every step for every arm, whatever interval the base config's sample section names.
        "sample.guidance_interval=null",
    ]
    if threshold is not None:
        overrides.append(f"routing.threshold={threshold!r}")
    try:
        return load_config(study.base_config, overrides)
    except ConfigError as e:
        raise StudyError(f"{study.path}: arm {arm.name!r}: {e}") from None
