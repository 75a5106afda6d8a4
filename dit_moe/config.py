"""Typed, validated experiment configuration.

An experiment is six sections of plain data -- model, routing, data, train, sample, diffusion -- read from YAML
and overridden from the command line with dotted keys (``train.lr=2e-4``). Every key is checked against the
dataclass fields: an unknown key or a value of the wrong type is a ``ConfigError`` that names the key and
lists the valid ones, so a typo never silently falls back to a default. Ranges and rules between sections
(a flow model has no learned sigma; a sampler must belong to the objective; routing against the model's experts)
are checked in ONE pass, ``validate`` (dit_moe/validation.py), which ``load_config`` and the trainer run before any
work is done.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import DitMoeError


class ConfigError(DitMoeError, ValueError):
    """A configuration key or value is invalid; the message names it."""


# ---------------------------------------------------------------------------------------------------------
#                                              Sections
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Architecture. ``name`` is a registry name (``DiT-S/2``, ``DiT-B/2-E8K2``); the data decides the rest."""
    name: str = "DiT-T/2-E8K2"
    input_size: int = 32              # latent side length (256px ImageNet -> 32)
    in_channels: int = 4
    num_classes: int = 1000           # the null (unconditional) class index is num_classes
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    grad_checkpointing: bool = False
    # Numerical conventions of imported models (the defaults are the original DiT's; see dit_moe/weights/convert.py).
    timestep_freq_shift: int = 0      # timestep frequencies exp(-ln(1e4) i / (half - shift)); diffusers' DiT: 1
    mlp_norm_eps: float = 1e-6        # eps of the LayerNorm before each block's MLP; diffusers' DiT: its norm_eps
    # MoE experts (ignored for dense names)
    expert_kind: str = "gelu"         # gelu (DiT's MLP) | swiglu (DiT-MoE's experts)
    expert_hidden_ratio: float = 4.0  # expert hidden width = ratio * hidden_size (fine-grained experts: lower it)
    num_shared_experts: int = 0       # always-active experts (DiT-MoE uses one of width 2D)
    shared_hidden_ratio: float = 2.0
    moe_every: int = 1                # every n-th block is MoE (1 = all blocks, as DiT-MoE)


@dataclass
class RoutingConfig:
    """Router family and hyper-parameters; ``None`` means the router's default (README, Routing options)."""
    type: str = "topk"                      # topk | topp | dtopp | expert_choice
    renormalize: Optional[bool] = None      # topk/topp: False, dtopp: True
    lb_coef: Optional[float] = None         # load-balance loss; topk/topp: 0.01, dtopp: 1e-4
    lb_global: bool = False                 # all-reduce load statistics over ranks
    entropy_coef: Optional[float] = None    # topk: 0, topp: 0, dtopp: 1e-3
    threshold: float = 0.4                  # topp: fixed p (Huang et al.)
    k_max: Optional[int] = None             # topp/dtopp: hard cap on experts per token (None: no cap)
    # DTop-p controller (docs/dtopp-controller.md)
    target: Optional[float] = None          # target mean activated experts per token (None: the name's K)
    scope: str = "global"                   # global | layer
    threshold_space: str = "logit"          # logit: the PI law acts on log(p / (1 - p)); linear: on p (the paper's form)
    kp: Optional[float] = None              # None: logit 0.2, linear 0.05 (stable for loop gain g/E < 1.43 / 5.7)
    ki: Optional[float] = None              # None: logit 1.0, linear 0.25
    p0: Optional[float] = None              # None: the threshold at which standardised Gaussian logits hit the target
    p_min: float = 0.01
    p_max: float = 0.99
    i_max: Optional[float] = None           # ignored (old configs load): the incremental PI law cannot wind up
    drn_log_scale_max: float = 3.0          # DRN scale s = exp(theta), theta >= -max (and <= max)
    drn_scale_max: Optional[float] = None   # None: the largest s at which p_max can still reach the target
    # Default MoE (composes with every router)
    default_moe: bool = False
    default_mode: str = "forward"           # forward (the published method) | grad_only
    default_beta: float = 0.99
    # Expert choice (dit_moe/models/routers/expert_choice.py): each expert takes C = capacity_factor * n * K / E tokens
    capacity_factor: float = 1.0            # 1: the compute of Top-K on average
    ec_pool: str = "sample"                 # sample: the n = T tokens of each image | batch: all B T tokens
    ec_eval_pool: Optional[str] = None      # pool of eval-mode forwards (sampling); None: ec_pool
    # Aux-loss-free balancing (DeepSeek-V3): bias on the selection scores, b += bias_rate * sign(mean load - load)
    balance_bias: bool = False              # topk | topp | dtopp; lb_coef then defaults to 0
    bias_rate: float = 1e-3                 # DeepSeek-V3's update speed


@dataclass
class DataConfig:
    source: str = "builtin"          # builtin | latents
    path: Optional[str] = None       # builtin: dataset name (default digits); latents: extraction folder
    flip: bool = True                # latents: pick the stored horizontal flip at random
    num_workers: int = 0


@dataclass
class TrainConfig:
    run_dir: str = "runs"
    # None: <model name>-<routing.type>, e.g. DiT-T-2-E8K2-dtopp (training/rundir.py); `dit-moe train` sets it to the
    # config file's name (runs/default for configs/default.yaml) unless --run-name or train.run_name is given
    run_name: Optional[str] = None
    seed: int = 0
    steps: int = 1000
    global_batch_size: int = 128
    grad_accum: int = 1
    # ddp: every rank holds the whole model, grads and AdamW states (Accelerate's DDP); fsdp: FSDP2 shards them and
    # the EMA over the ranks, one unit per DiT block (dit_moe/training/fsdp.py; README, Memory per strategy)
    strategy: str = "ddp"
    # N > 1: expert parallelism. Each MoE layer's routed experts are split over groups of N processes (E/N whole
    # experts each) and the routed tokens travel to them by all-to-all; the rest trains under ddp over all processes
    # (dit_moe/training/parallel/ep_train.py; README, Multi-GPU training). N must divide E and the process count.
    expert_parallel: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"    # constant | cosine
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False         # decay min(ema_decay, (1+step)/(10+step)): short runs forget the init sooner
    mixed_precision: str = "no"      # no | fp16 | bf16
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 2
    sample_every: int = 0            # 0: only at the end
    tracker: Optional[str] = "tensorboard"   # tensorboard | wandb | None
    init_from: Optional[str] = None  # a fresh run (new optimizer, step 0) from this checkpoint's weights (not --resume)
    # torch.compile every DiT block (the MoE dispatch stays eager; dit_moe/models/compile.py). Off by default: on
    # small CPU models the compile time is never won back and steps are not faster (docs/performance.md).
    compile: bool = False


# Samplers of each objective (dit_moe/sampling/solvers.py) and their default number of steps. The first one listed is
# the objective's default sampler.
SAMPLERS = {"ddpm": ("ddpm", "ddim", "dpm"), "flow": ("euler", "heun", "sde")}
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm": 25, "euler": 50, "heun": 25, "sde": 100}
ALL_SAMPLERS = tuple(s for group in SAMPLERS.values() for s in group)


@dataclass
class SampleConfig:
    """How to sample: the checkpoint's defaults, and (with flags or keyword overrides) one sampling run.

    ``None`` fields are resolved against the objective by ``dit_moe.sampling.resolve_settings``: sampler -> the
    objective's default (ddpm: ddpm, flow: euler), steps -> the sampler's default (``DEFAULT_STEPS``), time_shift ->
    ``diffusion.time_shift`` (flow samplers only). ``guidance_interval`` (lo, hi) applies guidance only at noise
    levels lo <= t <= hi, t in [0, 1] as defined in dit_moe/diffusion/__init__.py (None: every step).
    """
    sampler: Optional[str] = None             # ddpm | ddim | dpm (objective ddpm); euler | heun | sde (objective flow)
    steps: Optional[int] = None
    cfg_scale: float = 1.5
    guidance_channels: Optional[int] = None   # None: all latent channels; 3: DiT's legacy behaviour
    clip_denoised: bool = False               # DDPM samplers: clamp the predicted x0 to [-1, 1] (pixel data)
    guidance_interval: Optional[tuple[float, float]] = None
    time_shift: Optional[float] = None        # flow samplers: t' = s t / (1 + (s - 1) t) of the time grid
    num_per_class: int = 8
    seed: int = 0
    batch_size: int = 64
    compile: bool = False                     # torch.compile the blocks for sampling (same samples up to rounding)


@dataclass
class DiffusionConfig:
    """The training objective (time convention and formulas: dit_moe/diffusion/__init__.py).

    ddpm: DiT's epsilon prediction with the learned-variance hybrid loss (linear betas, T = 1000).
    flow: rectified flow, x_t = (1 - t) x0 + t eps, velocity target eps - x0, MSE loss; t ~ uniform or
    logit-normal (sigmoid of N(t_mean, t_std^2)), then shifted by time_shift (1.0 = no shift).
    """
    objective: str = "ddpm"           # ddpm | flow
    t_sampling: str = "uniform"       # flow: uniform | logit_normal
    t_mean: float = 0.0               # flow, logit_normal
    t_std: float = 1.0                # flow, logit_normal
    time_shift: float = 1.0           # flow: shift of the training t and of the default sampling grid


def objective_problem(objective: str, learn_sigma: bool) -> Optional[str]:
    """What is wrong with a model of ``learn_sigma`` trained with ``objective`` (None: nothing); the one statement
    of this rule, checked by ``dit_moe.validation.validate`` and by ``dit_moe.diffusion.build_objective`` (a
    checkpoint's config)."""
    if objective == "flow" and learn_sigma:
        return ("diffusion.objective=flow needs model.learn_sigma=false (a flow model predicts a velocity with C "
                "output channels; there is no variance to learn)")
    return None


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)   # absent in old checkpoints: ddpm

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ExperimentConfig":
        return from_dict(cls, d, where)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
#                                   Reading: types, choices, overrides
# ---------------------------------------------------------------------------------------------------------

CHOICES = {
    "model.expert_kind": ("gelu", "swiglu"),
    "model.timestep_freq_shift": (0, 1),
    "routing.type": ("topk", "topp", "dtopp", "expert_choice"),
    "routing.ec_pool": ("sample", "batch"),
    "routing.ec_eval_pool": ("sample", "batch", None),
    "routing.scope": ("global", "layer"),
    "routing.threshold_space": ("logit", "linear"),
    "routing.default_mode": ("grad_only", "forward"),
    "data.source": ("builtin", "latents"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.strategy": ("ddp", "fsdp"),
    "train.tracker": ("tensorboard", "wandb", None),
    "sample.sampler": ALL_SAMPLERS + (None,),
    "diffusion.objective": tuple(SAMPLERS),
    "diffusion.t_sampling": ("uniform", "logit_normal"),
}


def _to_plain(x):
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


class CliText(str):
    """A command-line value not yet interpreted: it is read as YAML, except where the field is a string."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected. Nested
    dataclasses and ``list[...]`` (of scalars or dataclasses) are checked element by element."""
    if isinstance(value, CliText):
        # `train.run_name=nan` or `model.name=123` stay strings; everything else is parsed as YAML.
        if tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
                         and value not in ("null", "~", "None")):
            return str(value)
        value = _parse_scalar(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and (dataclasses.is_dataclass(inner[0]) or typing.get_origin(inner[0]) is list):
            return _coerce(value, inner[0], key)       # the nested message names the key inside
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def from_dict(cls, d: dict, where: str = "config"):
    """Build dataclass ``cls`` from a nested dict, validating every key, type and choice.

    The one schema mechanism of the toolkit (experiment configs, study configs). A field's ``metadata`` may give
    ``key`` (its name in the file, e.g. ``from``, a Python keyword) and ``choices``; a field without a default is
    a required key. ``where`` names ``d`` in messages (``""``: the top of a file, whose keys need no prefix).
    """
    at = f"{where}: " if where else ""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{at}expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{at}unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    missing = [k for k, f in fields.items() if k not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{at}missing key(s) {', '.join(missing)}")
    kwargs = {}
    for name, value in d.items():
        f = fields[name]
        key = name if where in ("config", "") else f"{where}.{name}"
        kwargs[f.name] = _coerce(value, hints[f.name], key)
        choices = f.metadata.get("choices", CHOICES.get(key))
        if choices is not None and kwargs[f.name] not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """A command-line value, read as YAML so ``2e-4``, ``true``, ``null`` and ``[0.9, 0.95]`` work."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "2e-4" as a string; accept it as a float.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a nested dict (validated later by ``from_dict``)."""
    d = json.loads(json.dumps(d))  # deep copy of plain data
    valid_sections = [f.name for f in dataclasses.fields(ExperimentConfig)]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=2e-4")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override {item!r}: expected section.key=value with section in {valid_sections}")
        section, name = parts
        if section not in valid_sections:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; valid sections: {', '.join(valid_sections)}")
        d.setdefault(section, {})
        if d[section] is None:
            d[section] = {}
        if not isinstance(d[section], dict):
            raise ConfigError(f"override {item!r}: section {section!r} is a {type(d[section]).__name__} in the "
                              f"config file, expected a mapping of keys")
        d[section][name] = CliText(text)
    return d


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently, so
    `steps: 1000` ... `steps: 4` would train 4 steps)."""


def _no_duplicate_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue                      # `<<: *base` merges: later keys override merged ones on purpose
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:
            continue                      # an unhashable key: the safe constructor names it below
        if first != key_node.start_mark.line + 1:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first given on line {first})",
                                                    key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def read_yaml(path: str | Path, error: type[Exception] = None):
    """The YAML document of a user's file, or one line naming the file and the problem (``error``, default
    ConfigError): not found, not UTF-8 (with the byte offset), not valid YAML or a duplicate key (with the line)."""
    error = error or ConfigError
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected a YAML file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise error(f"{path}: not valid YAML: {what}{where}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


CONFIG_DIR = Path(__file__).resolve().parent / "configs"     # the shipped configs (package data)


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(value: str | Path, error: type[Exception] = None) -> Path:
    """The YAML file ``value`` names: a path that exists, else a shipped config by name (``default``,
    ``imagenet-S2-E8K2-dtopp``, ``study-digits-v2``; ``.yaml`` optional), also under its repository spelling
    ``configs/<name>.yaml`` -- so commands written for a checkout work the same after a plain ``pip install``."""
    error = error or ConfigError
    path = Path(value)
    if path.exists():
        return path
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if (len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "configs")) and \
            (CONFIG_DIR / f"{stem}.yaml").is_file():
        return CONFIG_DIR / f"{stem}.yaml"
    raise error(f"config file not found: {value} (shipped configs, usable by name: {', '.join(shipped_configs())})")


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config -- a path or a shipped config's name (``find_config``), or the defaults when
    ``path`` is None -- and apply dotted overrides, checking keys, types and choices; not yet the validation pass
    (dit_moe/validation.py: ``load_config`` runs it, and ``dit-moe train`` leaves it to the trainer, which knows the
    number of processes)."""
    return _read(path, overrides)[0]


def _read(path, overrides) -> tuple[ExperimentConfig, str]:
    """``read_config``, and how messages name the config (its file, or ``defaults``)."""
    d: dict = {}
    if path is not None:
        path = find_config(path)
        d = read_yaml(path) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(d).__name__}")
    where = str(path) if path is not None else "defaults"
    d = apply_overrides(d, overrides or [])
    try:
        return ExperimentConfig.from_dict(d), where
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """``read_config``, then the validation pass: a config ready for any use."""
    from .validation import validate   # validation.py imports this module's sections: this import must wait

    cfg, where = _read(path, overrides)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

