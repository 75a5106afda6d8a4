"""Sparse upcycling: a dense DiT checkpoint -> a DiT-MoE checkpoint that computes the dense model at step 0.

    dit-moe upcycle checkpoints/DiT-XL-2-256 --model DiT-XL/2-E8K2 --routing dtopp --out checkpoints/XL2-E8K2
    dit-moe upcycle DiT-XL-2-256x256.pt --model DiT-XL/2-E8K2 --routing topk --noise 0.01 --out ...
    dit-moe train --config CONFIG train.init_from=checkpoints/XL2-E8K2 ...     # fine-tune: new optimizer, step 0

SRC is a dense dit-moe checkpoint or anything ``dit-moe convert`` reads (converted on the fly).
Trailing ``section.key=value`` items override the written experiment config (routing.target=2, model.moe_every=2).

Experts. Every MoE block's experts are filled from that block's dense MLP (fc1: D -> H = 4D, GELU-tanh, fc2), which
only GELU experts can hold (SwiGLU experts are refused). With expert width h = model.expert_hidden_ratio * D:
  * h = H: every expert is a copy of the MLP;
  * h < H (fine-grained): the H hidden units are cut into P = H / h blocks of consecutive units; expert e holds
    block e mod P (E must be a multiple of P), with its output projection scaled by P and the full output bias b2.
    With combine weights w summing to 1 the layer computes  y = P * sum_g W_g * MLP_g(x) + b2,  W_g = the summed
    weight of the active experts holding block g, MLP_g = that block's share of fc2(gelu(fc1 x)) without bias. So
    it is exactly the dense MLP iff every W_g = 1/P, and an unbiased estimate of it when the active experts are a
    uniformly random subset with equal weights. (P = 1 is the copy case: any weights summing to 1 are exact.)
Noise (--noise s): each expert's w_in and w_out get s * std(that tensor) * N(0, 1), from a generator seeded by
--seed in a fixed order (block, tensor, expert); the model and the EMA copy get the same draws.

Router initialisation (--router-init):
  * random (default): the router's own fresh initialisation, seeded by --seed, as sparse upcycling (Komatsuzaki
    et al. 2023) and DiT-MoE's upcycle.py do: tokens spread over the experts from the first step, so identical
    experts start to differ through the data they see.
  * zero: uniform probabilities 1/E, which partitioned experts need to be exact; Top-k's ties then send every token
    to the same K experts until the router moves. Refused for DTop-p: its dynamic routing normalisation divides the
    logits by their spread, which a zero router makes 0; the forward is uniform (0 / eps) but the backward is scaled
    by 1 / eps (gradients ~1e5 measured on the first step).
routing.renormalize is written as true when left to the router's default (Top-k and Top-p publish false): without
renormalisation Top-k and Top-p compute (sum of the selected probabilities) x the dense MLP at step 0 (a warning).

Exact at step 0 (``exactness`` states it per configuration, tests/test_upcycle.py checks each in float64):
  * copies (h = 4D), either router init: Top-k and fixed Top-p with renormalisation, DTop-p (renormalises);
  * partitions (h < 4D): --router-init zero with every expert selected: Top-k with K = E, fixed Top-p with a
    threshold above (E - 1) / E (1.0 for instance) and no k_max below E. A sparser selection, or unequal weights
    (a random router), is not exact in general (a zero router's Top-k ties may happen to pick K experts that
    cover every block equally, which depends on torch.topk's tie order, so it is not promised).
Default MoE composes with all of these: its vectors start at zero, so its term is 0 at step 0 in both modes
(``forward`` adds it once the EMA of expert outputs warms up; ``grad_only`` never changes the output). DTop-p's
controller starts as in a fresh run (the cold-start threshold p0 derived for standardised logits, integral 0). Attention, embeddings, adaLN, the
final layer and blocks that stay dense (model.moe_every > 1) are copied; the EMA copy is upcycled the same way
from the source's EMA weights. The result is a step-0 checkpoint. Memory: model + EMA of the MoE in fp32 plus the
source, about 10 bytes per MoE parameter (measured peak 5.5 GB for DiT-B/2-E8K2, 527M parameters; expect ~28 GB
for DiT-XL/2-E8K2, 2.76B).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import ConfigError, ExperimentConfig, ModelConfig, RoutingConfig, apply_overrides
from ..errors import DitMoeError
from ..models import moe
from ..registry import parse_name
from .checkpoint import is_checkpoint, save_checkpoint
from .convert import read_source
from .layouts import check_state, module_from_state
from .outputs import prepare_output

__all__ = ["UpcycleError", "ROUTER_INITS", "partitions", "exactness", "upcycle_state_dict", "upcycle",
           "add_arguments", "run", "main"]

ROUTER_INITS = ("random", "zero")
# Fields of the dense model an upcycled model must keep (they shape or define the function of the copied parts).
KEPT_FIELDS = ("input_size", "in_channels", "num_classes", "learn_sigma", "timestep_freq_shift", "mlp_norm_eps")


class UpcycleError(DitMoeError, ValueError):
    """An upcycling request that cannot be honoured; the message says which value and why."""


def partitions(cfg: ModelConfig, hidden: int, num_experts: int) -> int:
    """P = dense hidden width / expert width, validated (integral, dividing E)."""
    dense, width = 4 * hidden, int(round(cfg.expert_hidden_ratio * hidden))
    if width > dense or dense % width:
        raise UpcycleError(f"model.expert_hidden_ratio={cfg.expert_hidden_ratio} gives experts of width {width}, which "
                           f"do not partition the dense MLP's {dense} hidden units (use 4, 2, 1, 0.5, ...)")
    p = dense // width
    if num_experts % p:
        raise UpcycleError(f"{num_experts} experts cannot hold {p} partitions of the dense MLP equally "
                           f"(expert_hidden_ratio={cfg.expert_hidden_ratio}: E must be a multiple of {p})")
    return p


def exactness(cfg: ModelConfig, routing: RoutingConfig, router_init: str) -> tuple[bool, str]:
    """Whether the upcycled model equals the dense one at step 0, and why (module docstring)."""
    arch = parse_name(cfg.name)
    E, K = arch.num_experts, arch.top_k
    p = partitions(cfg, arch.hidden_size, E)
    renorm = routing.renormalize is not False
    if routing.type == "topk":
        everything = K == E
    elif routing.type == "topp":
        everything = routing.threshold > (E - 1) / E and routing.k_max in (None, E)
    else:
        everything = False
    if p == 1:
        if renorm or everything:
            return True, "exact at step 0: identical experts whose combine weights sum to 1"
        return False, "not exact at step 0: without renormalisation the output is (sum of the selected probabilities) x the dense MLP"
    if router_init == "zero" and everything:
        return True, f"exact at step 0: {p} partitions, uniform router, all {E} experts active with weight 1/{E}"
    return False, (f"not exact at step 0 in general: each expert holds 1/{p} of the dense MLP (scaled by {p}); exact "
                   f"with --router-init zero and all {E} experts active (Top-k K=E, Top-p threshold > {(E - 1) / E:.3g})")


# ---------------------------------------------------------------------------------------------------------
#                                        Building the MoE weights
# ---------------------------------------------------------------------------------------------------------

def _experts_from_mlp(fc1_w, fc1_b, fc2_w, fc2_b, num_experts: int, p: int) -> dict:
    """Dense MLP (fc1 (H, D), fc2 (D, H)) -> ExpertBank tensors: expert e holds hidden block e mod p, output x p."""
    h = fc1_w.shape[0] // p
    blocks = [slice(g * h, (g + 1) * h) for g in range(p)]
    return {
        "w_in": torch.stack([fc1_w[blocks[e % p]].t() for e in range(num_experts)]).contiguous(),        # (E, D, h)
        "b_in": torch.stack([fc1_b[blocks[e % p]] for e in range(num_experts)]).contiguous(),            # (E, h)
        "w_out": torch.stack([fc2_w[:, blocks[e % p]].t() * p for e in range(num_experts)]).contiguous(),  # (E, h, D)
        "b_out": fc2_b.unsqueeze(0).repeat(num_experts, 1),                                              # (E, D)
    }


def _fresh_routing_state(cfg: ModelConfig, routing: RoutingConfig, router_init: str, seed: int) -> dict:
    """Router, controller and Default MoE tensors of a fresh model (no expert bank is built), seeded."""
    arch = parse_name(cfg.name)
    layers = [i for i in range(arch.depth) if i % cfg.moe_every == cfg.moe_every - 1]
    state = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controller = moe.build_controller(routing, arch.num_experts, arch.top_k, len(layers))
        for j, block in enumerate(layers):
            router = moe.build_router(arch.hidden_size, j, arch.num_experts, arch.top_k, routing, controller)
            if router_init == "zero":
                torch.nn.init.zeros_(router.weight)
            state.update({f"blocks.{block}.mlp.router.{k}": v for k, v in router.state_dict().items()})
            if routing.default_moe:
                state[f"blocks.{block}.mlp.default_vectors.vectors"] = torch.zeros(arch.num_experts, arch.hidden_size)
    if controller is not None:
        state.update({f"routing_controller.{k}": v for k, v in controller.state_dict().items()})
    return state


def upcycle_state_dict(dense: dict, cfg: ModelConfig, routing: RoutingConfig, fresh: dict) -> dict:
    """A dense DiT state dict -> the MoE state dict of ``cfg`` (experts filled, everything else copied)."""
    arch = parse_name(cfg.name)
    p = partitions(cfg, arch.hidden_size, arch.num_experts)
    out = dict(fresh)
    used = set()
    for i in range(arch.depth):
        if i % cfg.moe_every != cfg.moe_every - 1:
            continue
        mlp = [f"blocks.{i}.mlp.{n}" for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
        missing = [k for k in mlp if k not in dense]
        if missing:
            raise UpcycleError(f"source has no dense MLP tensor {missing[0]}")
        experts = _experts_from_mlp(*(dense[k].float() for k in mlp), arch.num_experts, p)
        out.update({f"blocks.{i}.mlp.experts.{k}": v for k, v in experts.items()})
        used.update(mlp)
    out.update({k: v for k, v in dense.items() if k not in used})
    check_state(out, cfg, f"upcycled {cfg.name}", routing)
    return out


def _add_noise(states: list[dict], cfg: ModelConfig, scale: float, seed: int) -> None:
    """The same seeded relative noise on every expert's w_in and w_out, in place, for each state in ``states``."""
    g = torch.Generator().manual_seed(seed)
    arch = parse_name(cfg.name)
    for i in range(arch.depth):
        for name in ("w_in", "w_out"):
            key = f"blocks.{i}.mlp.experts.{name}"
            if key not in states[0]:
                continue
            ref = states[0][key]
            delta = torch.stack([scale * ref[e].std() * torch.randn(ref[e].shape, generator=g)
                                 for e in range(ref.shape[0])])
            for s in states:
                s[key] = s[key] + delta


# ---------------------------------------------------------------------------------------------------------
#                                              The command
# ---------------------------------------------------------------------------------------------------------

def _target_experiment(base: ExperimentConfig, model: str, routing: Optional[str], overrides: Sequence[str]) -> ExperimentConfig:
    d = base.to_dict()
    d["model"]["name"] = model
    if routing is not None:
        d["routing"]["type"] = routing
    try:
        return ExperimentConfig.from_dict(apply_overrides(d, list(overrides)))
    except ConfigError as e:
        raise UpcycleError(f"bad setting: {e}") from None


def upcycle(src: str, model: str, out: str, *, routing: Optional[str] = None, overrides: Sequence[str] = (),
            noise: float = 0.0, seed: int = 0, router_init: str = "random", overwrite: bool = False,
            log=print) -> Path:
    """Upcycle ``src`` into the MoE registry name ``model``; returns the written checkpoint folder."""
    out_path = prepare_output(out, overwrite, is_checkpoint, "dit-moe checkpoint")
    if out_path.resolve() == Path(src).resolve():
        raise UpcycleError(f"--out {out} is the source itself")
    if router_init not in ROUTER_INITS:
        raise UpcycleError(f"--router-init {router_init!r} is not one of {ROUTER_INITS}")
    if not noise >= 0:
        raise UpcycleError(f"--noise {noise} must be >= 0")
    if not any(o.startswith("model.name=") for o in overrides) and not parse_name(model).is_moe:   # before reading
        raise UpcycleError(f"--model {model} is dense; name the MoE target, e.g. {model}-E8K2")
    imp = read_source(src)
    source = imp.model_config
    src_arch = parse_name(source.name)
    if src_arch.is_moe:
        raise UpcycleError(f"{src}: already an MoE model ({source.name}); upcycling starts from a dense DiT")
    exp = _target_experiment(imp.experiment, model, routing, overrides)
    cfg, rcfg = exp.model, exp.routing
    arch = parse_name(cfg.name)
    if not arch.is_moe:
        raise UpcycleError(f"--model {cfg.name} is dense; name the MoE target, e.g. {source.name}-E8K2")
    if (arch.depth, arch.hidden_size, arch.patch_size) != (src_arch.depth, src_arch.hidden_size, src_arch.patch_size):
        raise UpcycleError(f"--model {cfg.name} ({arch.depth} blocks x {arch.hidden_size}, patch {arch.patch_size}) does not "
                           f"keep the source {source.name} ({src_arch.depth} x {src_arch.hidden_size}, patch "
                           f"{src_arch.patch_size}); use {source.name}-E{arch.num_experts}K{arch.top_k}")
    for f in KEPT_FIELDS:
        if getattr(cfg, f) != getattr(source, f):
            raise UpcycleError(f"model.{f}={getattr(cfg, f)!r} differs from the source's {getattr(source, f)!r}; "
                               "upcycling keeps the dense model's data and conventions")
    if cfg.expert_kind != "gelu":
        raise UpcycleError(f"model.expert_kind={cfg.expert_kind}: SwiGLU experts cannot hold a copy of DiT's GELU MLP; "
                           "use model.expert_kind=gelu")
    if cfg.num_shared_experts:
        raise UpcycleError("model.num_shared_experts > 0: a shared expert has no counterpart in the dense MLP; upcycle "
                           "with model.num_shared_experts=0")
    if rcfg.type == "dtopp" and router_init == "zero":
        raise UpcycleError("--router-init zero with routing.type=dtopp: DTop-p standardises logits by their spread, "
                           "which is 0 for a zero router (backward scaled by 1/eps); use --router-init random")
    if rcfg.renormalize is None:
        rcfg = dataclasses.replace(rcfg, renormalize=True)
        exp = dataclasses.replace(exp, routing=rcfg)
    elif not rcfg.renormalize:
        print("warning: routing.renormalize=false: at step 0 the upcycled model computes the sum of the selected "
              "probabilities times the dense MLP, not the dense model", file=sys.stderr)
    exact, why = exactness(cfg, rcfg, router_init)

    fresh = _fresh_routing_state(cfg, rcfg, router_init, seed)
    states = [upcycle_state_dict(imp.model, cfg, rcfg, fresh)]
    if imp.ema is not None:
        states.append(upcycle_state_dict(imp.ema, cfg, rcfg, fresh))
    if noise > 0:
        _add_noise(states, cfg, noise, seed)
    modules = [module_from_state(cfg, s, rcfg) for s in states]
    meta = {"upcycled_from": str(Path(src).resolve()) if Path(src).exists() else str(src), "source_model": source.name,
            "source_step": imp.step, "router_init": router_init, "noise": noise, "seed": seed,
            "partitions": partitions(cfg, arch.hidden_size, arch.num_experts), "exact_at_step_0": exact,
            "exactness": why, "source_meta": imp.meta}
    path = save_checkpoint(out_path, modules[0], modules[1] if len(modules) > 1 else None, step=0, experiment=exp,
                           data_info=imp.data_info, meta=meta)
    log(f"wrote {path}: {source.name} -> {cfg.name} ({rcfg.type}, renormalize={rcfg.renormalize}, router init "
        f"{router_init}, noise {noise:g}, {'model + ema' if len(modules) > 1 else 'one set of weights'}); {why}")
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("source", help="dense dit-moe checkpoint (or a DiT .pt / diffusers folder / hub id)")
    p.add_argument("--model", required=True, help="MoE registry name of the same size and patch, e.g. DiT-XL/2-E8K2")
    p.add_argument("--routing", choices=("topk", "topp", "dtopp"), help="router family (default: the config's, topk)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--noise", type=float, default=0.0, help="relative noise per expert (0: exact copies)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and of the router initialisation")
    p.add_argument("--router-init", choices=ROUTER_INITS, default="random", help="router weights (see --help text)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dit-moe checkpoint at --out")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. routing.target=2 model.moe_every=2")


def run(args: argparse.Namespace) -> Path:
    return upcycle(args.source, args.model, args.out, routing=args.routing, overrides=args.overrides,
                   noise=args.noise, seed=args.seed, router_init=args.router_init, overwrite=args.overwrite)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dit_moe.weights.upcycle``: the command's own entry (``dit-moe upcycle`` is the same)."""
    from ..cli import run_command   # the command line sits above this layer: reached only when run as a program

    return run_command("upcycle", argv, prog="python -m dit_moe.weights.upcycle", label="upcycle")


if __name__ == "__main__":
    sys.exit(main())
