"""MoE-MLP: the block's MLP slot filled with E routed experts (plus optional shared experts).

Dispatch (one path for training and inference, dropless, any number of experts per token):
  1. the router returns the M (token, expert, weight) pairs sorted by expert and the per-expert counts (device);
  2. tokens are gathered once, (M, D), so every expert's tokens form one contiguous segment;
  3. each expert runs on its segment (``experts.ExpertBank``): one grouped matmul over all segments with device
     offsets where torch runs it for the device, dtype and shape, else a loop over the E segments;
  4. outputs are scaled by their weight and scatter-added back to their tokens in fp32, cast once, (N, D).
Steps 2-3 are ``run_experts``; with expert parallelism the layer's ``dispatcher`` (``ExpertDispatcher``) replaces
step 3: it sends the pairs to the processes holding their experts, which run ``run_experts`` on their shard.

Host synchronisation on the grouped (GPU) path: none for Top-k (M = N k) and expert choice (M = E C), both static;
one per MoE layer for the threshold routers (M is data-dependent; see ``RouterOutput.from_mask``). The segment loop
needs the sizes on the host and reads them once per layer. Statistics are accumulated on the device.

Router state changes once per optimizer step, never inside forward: training forwards only accumulate sums
(tensor ops, no host sync) into a non-persistent buffer; ``routing_step(model, all_reduce)`` reduces every layer's
sums in one all-reduce and then steps the DTop-p controller, the Default MoE vectors, the balance biases and the
logged statistics. What is summed per token, and the names of the metrics, are defined once in ``routing_tap``.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .default_moe import DefaultVectors
from .experts import EXPERT_KINDS, ExpertBank, compute_dtype
from .routers import (DTopPRouter, ExpertChoiceRouter, Router, RouterOutput, ThresholdController, TopKRouter,
                      TopPRouter)
from .routing_tap import METRICS, num_sums, stats_from_sums, sum_slices, token_stats

__all__ = ["EXPERT_KINDS", "ExpertBank", "ExpertDispatcher", "METRICS", "MoEMLP", "ROUTER_TYPES", "USE_GROUPED_MM",
           "build_controller", "build_moe_mlp", "build_router", "collect_aux_loss", "moe_layers", "routing_stats",
           "routing_step", "run_experts"]

logger = logging.getLogger(__name__)
ACTIVE, TOKENS = sum_slices(1)["active"], sum_slices(1)["tokens"]     # where token_stats keeps sum m and N

# Grouped matmul policy: "auto" uses torch's grouped_mm off the CPU where it runs the bank's shapes; True forces it
# wherever it runs (CPU fp32/bf16 works but is slower than the segment loop there, see benchmarks/moe_dispatch.py);
# False never. Whether it runs is probed once per (device, dtype, bank shape): widths whose rows are not a multiple
# of 16 bytes (bf16 hidden 12 or 38) raise in grouped_mm, and those banks take the segment loop instead.
USE_GROUPED_MM: bool | str = "auto"
_grouped_mm_ok: dict[tuple, bool] = {}


def _grouped_mm_available(bank: ExpertBank, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``bank`` runs on grouped_mm for (device, dtype): probed forward and backward once, then cached."""
    if USE_GROUPED_MM is False or not hasattr(F, "grouped_mm"):
        return False
    if USE_GROUPED_MM == "auto" and device.type == "cpu":
        return False
    key = (device.type, dtype, bank.kind, bank.num_experts, bank.dim, bank.hidden)
    if key not in _grouped_mm_ok:
        try:
            bank.grouped_runs(device, dtype)
            _grouped_mm_ok[key] = True
        except RuntimeError as err:  # unsupported device / dtype / shape / architecture: the segment loop runs
            logger.warning(f"grouped_mm cannot run {bank.kind} experts E={bank.num_experts} D={bank.dim} "
                           f"H={bank.hidden} in {dtype} on {device.type} ({err}); using the segment loop")
            _grouped_mm_ok[key] = False
    return _grouped_mm_ok[key]


def run_experts(bank: ExpertBank, xs: torch.Tensor, counts: torch.Tensor, expert_idx: torch.Tensor,
                sizes: tuple[int, ...] | None = None) -> torch.Tensor:
    """(M, D) expert-sorted tokens -> (M, D) outputs of their experts: grouped_mm where it runs, else the segment loop.

    ``counts`` (E,) device tokens per expert of ``bank``, ``expert_idx`` (M,) each row's expert (the grouped path's
    biases), ``sizes`` the host copy of ``counts`` if the caller has it (the segment loop reads it otherwise). The one
    local expert path: ``MoEMLP`` runs it on all its experts, an expert-parallel dispatcher on a rank's shard.
    """
    if _grouped_mm_available(bank, xs.device, compute_dtype(xs)):
        return bank(xs, None, counts, expert_idx, grouped=True)
    return bank(xs, tuple(counts.tolist()) if sizes is None else sizes, counts, expert_idx)


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. when a checkpointed block recomputes its forward.

    Both torch.utils.checkpoint variants recompute inside the backward graph task, so this detects the recompute
    without any help from the caller; forwards of the training step itself run with no graph task (-1).
    """
    return torch._C._current_graph_task_id() != -1


class ExpertDispatcher(Protocol):
    """How a layer's routed tokens reach experts that live elsewhere (expert parallelism); ``MoEMLP.dispatcher``.

    ``dispatcher(experts, xs, counts) -> ys``: ``xs`` (M, D) this process's (token, expert) pairs sorted by expert,
    ``counts`` (E,) device pairs per GLOBAL expert, ``experts`` the bank this process holds (its shard); returns the
    (M, D) outputs of each pair's expert in the same pair order, in the graph (autograd flows back through it). The
    implementation is training code (``dit_moe.training.parallel.ep``): models only know this interface.
    """

    def __call__(self, experts: ExpertBank, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor: ...


class MoEMLP(nn.Module):
    """(B, T, D) -> (B, T, D): routed experts, optional shared experts, optional Default MoE term.

    ``dispatcher`` (an ``ExpertDispatcher``, default None) replaces the local expert run by one that sends the pairs
    to the processes holding their experts; routing, combine, aux losses and statistics stay local either way.

    Training forwards store ``last_aux_loss`` (weighted aux losses of this layer, a scalar tensor in the graph) and
    ``last_aux_terms`` (its named parts) and accumulate routing statistics for ``routing_step``; eval forwards only
    route. A recompute under gradient checkpointing has no side effect (see ``_in_backward``).
    """

    # Accumulator layout (fp32): the per-token sums of routing_tap.token_stats (num_sums(E) values), then, with
    # Default MoE, the per-expert output sums (E * D).

    def __init__(self, dim: int, router: Router, experts: ExpertBank, shared: Optional[ExpertBank] = None,
                 default_vectors: Optional[DefaultVectors] = None):
        super().__init__()
        if experts.num_experts != router.num_experts:
            raise ValueError(f"router has {router.num_experts} experts, expert bank {experts.num_experts}")
        self.dim = dim
        self.num_experts = router.num_experts
        self.router = router
        self.experts = experts
        self.shared = shared
        self.default_vectors = default_vectors
        # Expert parallelism's hook (None: every expert runs here). Not a submodule: it holds a process group, no state.
        self.dispatcher: ExpertDispatcher | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_aux_terms: dict[str, torch.Tensor] = {}
        E = self.num_experts
        self.counts_slice = sum_slices(E)["counts"]
        self.num_stats = num_sums(E)
        size = self.num_stats + (E * dim if default_vectors is not None else 0)
        self.register_buffer("routing_acc", torch.zeros(size), persistent=False)
        self.register_buffer("routing_last", torch.zeros(self.num_stats), persistent=False)

    def __getstate__(self):
        # The latest aux loss is a graph tensor: deepcopy (EMA model) and pickling must not try to copy it.
        state = super().__getstate__()
        return {**state, "last_aux_loss": None, "last_aux_terms": {}}

    def init_weights(self) -> None:
        """(Re)initialise router, experts and default vectors; DiT calls it after its xavier sweep."""
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.shared is not None:
            self.shared.reset_parameters()
        if self.default_vectors is not None:
            self.default_vectors.vectors.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        samples = shape[:-2].numel() if len(shape) > 2 else 1             # images: expert choice pools per image
        x = x.reshape(-1, self.dim)                                       # (N, D)
        scores = self.router.scores(x)                                    # gate + softmax: compiled with the block
        return self._routed(x, samples, scores, shape)

    def _routed(self, x: torch.Tensor, samples: int, scores, shape: torch.Size) -> torch.Tensor:
        """(N, D) -> (B, T, D) of ``shape``: selection, dispatch, combine, statistics; always eager.

        Why eager: the threshold routers' pair count is data-dependent (one host read, then nonzero_static), the
        segment loop needs host sizes, the grouped_mm probe and the RoutingTap hooks are Python; traced, these
        would break the graph anyway, eager they make one clean break per MoE block. ``compile_blocks``
        (dit_moe/models/compile.py) wraps this method in ``torch.compiler.disable`` -- there, not with a decorator
        here, because the decorator imports torch._dynamo, seconds of start-up for every command.
        """
        r = self.router(x, samples, scores=scores)
        xs = x.index_select(0, r.token_idx)                               # (M, D), expert-contiguous
        if self.dispatcher is None:
            ys = run_experts(self.experts, xs, r.counts, r.expert_idx)      # (M, D)
        else:
            ys = self.dispatcher(self.experts, xs, r.counts)              # (M, D), the same pair order
        # Combine and accumulate in (at least) fp32, cast once to the expert dtype (bf16 under autocast).
        acc = torch.promote_types(r.weight.dtype, torch.float32)
        y = torch.zeros(x.shape[0], self.dim, dtype=acc, device=x.device).index_add(
            0, r.token_idx, ys.to(acc) * r.weight.to(acc).unsqueeze(1))
        if self.shared is not None:
            y = y + self.shared(x, (x.shape[0],)).to(acc)
        if self.default_vectors is not None:
            y = y + self.default_vectors.term(r.probs, r.mask).to(acc)
        if self.training and not _in_backward():
            self.last_aux_loss, self.last_aux_terms = r.aux_loss, r.aux_terms
            self._accumulate(r, ys)
        return y.to(ys.dtype).reshape(*shape[:-1], self.dim)

    @torch.no_grad()
    def _accumulate(self, r: RouterOutput, ys: torch.Tensor) -> None:
        self.routing_acc[: self.num_stats].add_(token_stats(r).sum(0).to(self.routing_acc.dtype))
        if self.default_vectors is not None:
            sums = DefaultVectors.output_sums(ys, r.expert_idx, self.num_experts)
            self.routing_acc[self.num_stats:].add_(sums.flatten())

    def layer_stats(self) -> dict[str, torch.Tensor]:
        """This layer's statistics (METRICS names) from the last ``routing_step`` (tensors; zeros before the first)."""
        stats = stats_from_sums(self.routing_last, self.num_experts)
        if isinstance(self.router, DTopPRouter):
            scale = self.router.scale().detach()
            if hasattr(scale, "full_tensor"):      # FSDP2 shards the parameter (as (1,)): every rank gathers it
                scale = scale.full_tensor().reshape(())
            stats["drn_scale"] = scale
        if self.router.balance_bias is not None:
            stats["balance_bias"] = self.router.balance_bias.detach().clone()
        return stats

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, shared={self.shared is not None}"


# ---------------------------------------------------------------------------------------------------------
#                                    Model-level routing functions
# ---------------------------------------------------------------------------------------------------------

def moe_layers(model: nn.Module) -> list[MoEMLP]:
    """The MoE-MLP modules of ``model`` in registration (= depth) order."""
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def _controller_of(layers: list[MoEMLP]) -> ThresholdController | None:
    controllers = {id(l.router.controller): l.router.controller for l in layers if isinstance(l.router, DTopPRouter)}
    if len(controllers) > 1:
        raise RuntimeError(f"the model's DTop-p routers reference {len(controllers)} different controllers; "
                           "build_controller must be called once per model")
    return next(iter(controllers.values()), None)


def collect_aux_loss(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the MoE layers' latest aux losses and of each named term; (0, {}) for a dense model."""
    total, terms = None, {}
    for layer in moe_layers(model):
        if layer.last_aux_loss is None:
            continue
        total = layer.last_aux_loss if total is None else total + layer.last_aux_loss
        for k, v in layer.last_aux_terms.items():
            terms[k] = terms[k] + v if k in terms else v
    if total is None:
        p = next(model.parameters(), None)
        total = torch.zeros((), device=p.device if p is not None else None)
    return total, terms


@torch.no_grad()
def routing_step(model: nn.Module, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Once per optimizer step: reduce the accumulated routing sums and update the router state.

    Concatenates every layer's accumulator into one flat fp32 tensor, calls ``all_reduce`` once (a SUM over
    ranks; None for one process), steps the DTop-p controller and the Default MoE vectors from the reduced sums
    (identical on every rank), moves the balance biases (``Router.update_balance_bias`` from the reduced counts),
    clamps the DRN scales, records the statistics and zeroes the accumulators.
    Returns ``routing_stats(model)``. Layers that saw no token (eval, nothing accumulated) keep their state.
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    flat = torch.cat([l.routing_acc for l in layers])
    if all_reduce is not None:
        flat = all_reduce(flat)
    chunks = flat.split([l.routing_acc.numel() for l in layers])

    controller = _controller_of(layers)
    dtopp = []
    for layer, acc in zip(layers, chunks):
        E = layer.num_experts
        layer.routing_last.copy_(acc[: layer.num_stats])
        if layer.default_vectors is not None:
            layer.default_vectors.update(acc[layer.num_stats:].view(E, layer.dim), acc[layer.counts_slice])
        layer.router.update_balance_bias(acc[layer.counts_slice])
        if isinstance(layer.router, DTopPRouter):
            layer.router.clamp_scale_()
            dtopp.append((layer.router.layer_index, acc[ACTIVE], acc[TOKENS]))
        layer.routing_acc.zero_()
    if controller is not None:
        dtopp.sort(key=lambda t: t[0])
        if [t[0] for t in dtopp] != list(range(controller.num_layers)):
            raise RuntimeError(f"DTop-p layers {[t[0] for t in dtopp]} do not match the controller's "
                               f"{controller.num_layers} layers")
        controller.update(torch.stack([t[1] for t in dtopp]), torch.stack([t[2] for t in dtopp]))
    return routing_stats(model, warn=False)      # every step: no host read here


def routing_stats(model: nn.Module, warn: bool = True) -> dict[str, torch.Tensor]:
    """Latest routing statistics as tensors (converted by the caller on logging steps only).

    Keys and their definitions: ``routing_tap.METRICS``. Per MoE layer, stacked over layers (L, ...):
    ``mean_active``, ``active_std``, ``entropy``, ``cap_frac``, ``unrouted_frac``, ``logit_std``, ``load`` (L, E),
    ``active_hist`` (L, E+1), ``tokens``, ``drn_scale`` (DTop-p), ``balance_bias`` (L, E; with the bias).
    Controller (DTop-p), one entry per threshold (1 global, L layer-wise): ``threshold``, ``integral``,
    ``measured``, ``error``, ``threshold_saturated`` and ``saturated_steps``. With ``warn``, a saturated
    controller warns once (this reads one value to the host).
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    per_layer = [l.layer_stats() for l in layers]
    out = {k: torch.stack([s[k] for s in per_layer]) for k in per_layer[0] if all(k in s for s in per_layer)}
    controller = _controller_of(layers)
    if controller is not None:
        for name in ("threshold", "integral", "measured", "error", "saturated_steps"):
            out[name] = getattr(controller, name).detach().clone()
        out["threshold_saturated"] = controller.saturated.detach().clone()
        if warn:
            controller.warn_if_saturated()
    return out


# ---------------------------------------------------------------------------------------------------------
#                                           Builders (registry)
# ---------------------------------------------------------------------------------------------------------

def _or(value, default):
    return default if value is None else value


def build_controller(routing_cfg, num_experts: int, top_k: int, num_moe_layers: int) -> ThresholdController | None:
    """The model's DTop-p threshold controller (target defaults to the name's K), None for other routers."""
    if routing_cfg.type != "dtopp":
        return None
    return ThresholdController(
        num_experts=num_experts, target=_or(routing_cfg.target, float(top_k)), num_layers=num_moe_layers,
        scope=routing_cfg.scope, kp=routing_cfg.kp, ki=routing_cfg.ki, p0=routing_cfg.p0,
        p_min=routing_cfg.p_min, p_max=routing_cfg.p_max, i_max=routing_cfg.i_max,
        space=routing_cfg.threshold_space)


ROUTER_TYPES = ("topk", "topp", "dtopp", "expert_choice")


def build_router(dim: int, moe_layer: int, num_experts: int, top_k: int, routing_cfg,
                 controller: ThresholdController | None) -> Router:
    """A router from ``RoutingConfig``; None-valued fields take the router's published default.

    With ``balance_bias`` (aux-loss-free balancing) the load-balance loss defaults to 0: the bias replaces it.
    """
    c = routing_cfg
    bias = dict(balance_bias=getattr(c, "balance_bias", False), bias_rate=getattr(c, "bias_rate", 1e-3))
    lb_off = bias["balance_bias"]
    if c.type == "topk":
        return TopKRouter(dim, num_experts, top_k, renormalize=_or(c.renormalize, False),
                          lb_coef=_or(c.lb_coef, 0.0 if lb_off else 0.01), entropy_coef=_or(c.entropy_coef, 0.0),
                          lb_global=c.lb_global, **bias)
    if c.type == "topp":
        return TopPRouter(dim, num_experts, threshold=c.threshold, k_max=c.k_max,
                          renormalize=_or(c.renormalize, False), lb_coef=_or(c.lb_coef, 0.0 if lb_off else 0.01),
                          entropy_coef=_or(c.entropy_coef, 0.0), lb_global=c.lb_global, **bias)
    if c.type == "dtopp":
        if controller is None:
            raise ValueError("routing.type=dtopp needs the model's ThresholdController (build_controller)")
        return DTopPRouter(dim, num_experts, controller, moe_layer, k_max=c.k_max,
                           renormalize=_or(c.renormalize, True), lb_coef=_or(c.lb_coef, 0.0 if lb_off else 1e-4),
                           entropy_coef=_or(c.entropy_coef, 1e-3), lb_global=c.lb_global,
                           log_scale_max=c.drn_log_scale_max, scale_max=c.drn_scale_max, **bias)
    if c.type == "expert_choice":
        if bias["balance_bias"]:
            raise ValueError("routing.balance_bias=true with routing.type=expert_choice: expert choice balances "
                             "the load by construction (every expert takes C tokens)")
        return ExpertChoiceRouter(dim, num_experts, top_k, capacity_factor=c.capacity_factor, pool=c.ec_pool,
                                  eval_pool=c.ec_eval_pool, renormalize=_or(c.renormalize, False),
                                  lb_coef=_or(c.lb_coef, 0.0), entropy_coef=_or(c.entropy_coef, 0.0),
                                  lb_global=c.lb_global)
    raise ValueError(f"routing.type={c.type!r} must be one of {', '.join(ROUTER_TYPES)}")


def build_moe_mlp(dim: int, layer_index: int, num_experts: int, top_k: int, model_cfg, routing_cfg,
                  controller: ThresholdController | None) -> MoEMLP:
    """The MoE-MLP of the model's MoE layer number ``layer_index`` (0..L-1 counted over MoE layers only: the
    registry passes the position among the MoE blocks, which is also the DTop-p layer-scope threshold entry)."""
    router = build_router(dim, layer_index, num_experts, top_k, routing_cfg, controller)
    experts = ExpertBank(num_experts, dim, int(round(model_cfg.expert_hidden_ratio * dim)), model_cfg.expert_kind)
    shared = None
    if model_cfg.num_shared_experts > 0:
        # S shared experts of width r*D summed together are one MLP of width S*r*D.
        width = int(round(model_cfg.num_shared_experts * model_cfg.shared_hidden_ratio * dim))
        shared = ExpertBank(1, dim, width, model_cfg.expert_kind)
    default = None
    if routing_cfg.default_moe:
        default = DefaultVectors(num_experts, dim, beta=routing_cfg.default_beta, mode=routing_cfg.default_mode)
    return MoEMLP(dim, router, experts, shared, default)
