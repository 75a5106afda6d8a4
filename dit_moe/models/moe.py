"""MoE-MLP: the block's MLP slot filled with E routed experts (plus optional shared experts).

Dispatch (one path for training and inference, dropless, any number of experts per token):
  1. the router returns the M (token, expert, weight) pairs sorted by expert and the per-expert counts;
  2. tokens are gathered once, (M, D), so every expert's tokens form one contiguous segment;
  3. each expert runs on its segment: one grouped matmul over all segments where torch has one for the device
     and dtype, else a loop over the E segments (E small matmuls, no per-token work);
  4. outputs are scaled by their weight in fp32 and scatter-added back to their tokens, (N, D).

Router state changes once per optimizer step, never inside forward: training forwards only accumulate sums
(tensor ops, no host sync) into a non-persistent buffer; ``routing_step(model, all_reduce)`` reduces every layer's
sums in one all-reduce and then steps the DTop-p controller, the Default MoE vectors and the logged statistics.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .default_moe import DefaultVectors
from .routers import DTopPRouter, Router, RouterOutput, ThresholdController, TopKRouter, TopPRouter

EXPERT_KINDS = ("gelu", "swiglu")

# Grouped matmul policy: "auto" uses torch's grouped_mm off the CPU where a probe call succeeds; True forces it
# (CPU fp32 works but is slower than the segment loop there, see benchmarks/moe_dispatch.py); False never.
USE_GROUPED_MM: bool | str = "auto"
_grouped_mm_ok: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether F.grouped_mm runs for (device, dtype): probed once with a tiny call, then cached."""
    if USE_GROUPED_MM is False or not hasattr(F, "grouped_mm"):
        return False
    if USE_GROUPED_MM == "auto" and device.type == "cpu":
        return False
    key = (device.type, dtype)
    if key not in _grouped_mm_ok:
        try:
            a = torch.zeros(16, 16, device=device, dtype=dtype)
            b = torch.zeros(2, 16, 16, device=device, dtype=dtype)
            F.grouped_mm(a, b, offs=torch.tensor([8, 16], device=device, dtype=torch.int32))
            _grouped_mm_ok[key] = True
        except RuntimeError:  # unsupported device / dtype / architecture: the segment loop is the fallback
            _grouped_mm_ok[key] = False
    return _grouped_mm_ok[key]


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


class ExpertBank(nn.Module):
    """E expert MLPs of one kind stored as stacked weights (one parameter per weight kind).

    gelu:   y = W_out^T gelu_tanh(W_in^T x + b_in) + b_out   (DiT's MLP), W_in (E, D, H), W_out (E, H, D)
    swiglu: y = W_out^T (silu(x W_g) * (x W_u))               (DiT-MoE, no biases), W_in = [W_g | W_u] (E, D, 2H)
    Stacking keeps every expert inside the same parameters, so DDP never meets a parameter without gradient
    when an expert receives no token. Init: xavier-uniform per expert and per projection (DiT's init for its
    MLP, which DiT-MoE's experts inherit), zero biases.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, kind: str = "gelu"):
        super().__init__()
        if kind not in EXPERT_KINDS:
            raise ValueError(f"expert kind={kind!r} must be one of {EXPERT_KINDS}")
        if hidden < 1:
            raise ValueError(f"expert hidden width must be >= 1, got {hidden}")
        self.num_experts, self.dim, self.hidden, self.kind = num_experts, dim, hidden, kind
        width_in = 2 * hidden if kind == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width_in))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        if kind == "gelu":
            self.b_in = nn.Parameter(torch.empty(num_experts, hidden))
            self.b_out = nn.Parameter(torch.empty(num_experts, dim))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            # The SwiGLU gate and up projections are two (D, H) maps side by side: each gets its own xavier bound.
            self.w_in.uniform_(-1, 1).mul_(_xavier_bound(self.dim, self.hidden))
            self.w_out.uniform_(-1, 1).mul_(_xavier_bound(self.hidden, self.dim))
            if self.b_in is not None:
                self.b_in.zero_()
                self.b_out.zero_()

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        """(M, H or 2H) pre-activations -> (M, H)."""
        return _act_forward_backward(self.kind, h)

    def forward(self, x: torch.Tensor, sizes: tuple[int, ...], counts: torch.Tensor | None = None,
                expert_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(M, D) tokens sorted by expert, segment sizes (E,) -> (M, D) outputs of each token's expert.

        ``counts`` (E,) device tensor and ``expert_idx`` (M,) are only used by the grouped-matmul path.
        """
        if len(sizes) != self.num_experts:
            raise ValueError(f"got {len(sizes)} segment sizes for {self.num_experts} experts")
        # Under autocast run the experts in the autocast dtype, with autocast itself off inside.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.to(dtype)
        w_in, b_in, w_out, b_out = (None if p is None else p.to(dtype) for p in (self.w_in, self.b_in, self.w_out, self.b_out))
        with torch.autocast(device_type=x.device.type, enabled=False):
            if counts is not None and expert_idx is not None and _grouped_mm_available(x.device, dtype):
                offs = counts.cumsum(0).to(torch.int32)
                h = F.grouped_mm(x, w_in, offs=offs)
                if b_in is not None:
                    h = h + b_in[expert_idx]
                y = F.grouped_mm(self.activation(h), w_out, offs=offs)
                return y + b_out[expert_idx] if b_out is not None else y
            return _SegmentMLP.apply(x, sizes, self.kind, w_in, b_in, w_out, b_out)


def _act_forward_backward(kind: str, h: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """The expert activation of pre-activations h, or (with ``grad``) the gradient w.r.t. h of that activation."""
    if kind == "gelu":
        if grad is None:
            return F.gelu(h, approximate="tanh")
        return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")
    gate, up = h.chunk(2, dim=-1)
    if grad is None:
        return F.silu(gate) * up
    sig = torch.sigmoid(gate)
    silu = gate * sig
    return torch.cat([grad * up * (sig * (1 + gate * (1 - sig))), grad * silu], dim=-1)


class _SegmentMLP(torch.autograd.Function):
    """All E expert MLPs on their contiguous segments of (M, D) expert-sorted tokens, as one autograd node.

    Autograd through per-expert slices of the stacked weights (w_in[e]) would build a full-size zero gradient of
    the whole stack for every expert and sum E of them, and concatenating the segment outputs would copy them
    once more. Here the forward writes each segment straight into one (M, .) buffer and the backward writes each
    expert's weight gradient into its slice of one gradient tensor. Saved: the input and the pre-activations; the
    activation is recomputed per segment in the backward (one elementwise pass instead of an (M, H) buffer).
    """

    @staticmethod
    def forward(ctx, x, sizes, kind, w_in, b_in, w_out, b_out):
        M, D = x.shape
        h = x.new_empty(M, w_in.shape[2])
        y = x.new_empty(M, w_out.shape[2])
        start = 0
        for e, n in enumerate(sizes):
            if n:
                s = slice(start, start + n)
                if b_in is None:
                    torch.mm(x[s], w_in[e], out=h[s])
                    torch.mm(_act_forward_backward(kind, h[s]), w_out[e], out=y[s])
                else:
                    torch.addmm(b_in[e], x[s], w_in[e], out=h[s])
                    torch.addmm(b_out[e], _act_forward_backward(kind, h[s]), w_out[e], out=y[s])
            start += n
        ctx.sizes, ctx.kind, ctx.has_bias = sizes, kind, b_in is not None
        ctx.save_for_backward(x, h, w_in, w_out)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, h, w_in, w_out = ctx.saved_tensors
        need_x, _, _, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad
        gy = gy.contiguous()
        gx = torch.empty_like(x) if need_x else None
        # Experts without tokens keep a zero gradient slice (DDP then sees every parameter used).
        alloc = torch.zeros_like if 0 in ctx.sizes else torch.empty_like
        g_w_in = alloc(w_in) if need_w_in else None
        g_w_out = alloc(w_out) if need_w_out else None
        g_b_in = x.new_zeros(w_in.shape[0], w_in.shape[2]) if ctx.has_bias and need_b_in else None
        g_b_out = x.new_zeros(w_out.shape[0], w_out.shape[2]) if ctx.has_bias and need_b_out else None
        start = 0
        for e, n in enumerate(ctx.sizes):
            if n:
                s = slice(start, start + n)
                he, ge = h[s], gy[s]
                if g_w_out is not None:
                    torch.mm(_act_forward_backward(ctx.kind, he).t(), ge, out=g_w_out[e])
                if g_b_out is not None:
                    torch.sum(ge, 0, out=g_b_out[e])
                gh = _act_forward_backward(ctx.kind, he, ge @ w_out[e].t())
                if g_w_in is not None:
                    torch.mm(x[s].t(), gh, out=g_w_in[e])
                if g_b_in is not None:
                    torch.sum(gh, 0, out=g_b_in[e])
                if gx is not None:
                    torch.mm(gh, w_in[e].t(), out=gx[s])
            start += n
        return gx, None, None, g_w_in, g_b_in, g_w_out, g_b_out


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. when a checkpointed block recomputes its forward.

    Both torch.utils.checkpoint variants recompute inside the backward graph task, so this detects the recompute
    without any help from the caller; forwards of the training step itself run with no graph task (-1).
    """
    return torch._C._current_graph_task_id() != -1


class MoEMLP(nn.Module):
    """(B, T, D) -> (B, T, D): routed experts, optional shared experts, optional Default MoE term.

    Training forwards store ``last_aux_loss`` (weighted aux losses of this layer, a scalar tensor in the graph) and
    ``last_aux_terms`` (its named parts) and accumulate routing statistics for ``routing_step``; eval forwards only
    route. A recompute under gradient checkpointing has no side effect (see ``_in_backward``).
    """

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
        self.last_aux_loss: torch.Tensor | None = None
        self.last_aux_terms: dict[str, torch.Tensor] = {}
        E = self.num_experts
        # Accumulator layout: [active_sum, tokens, entropy_sum, capped, counts (E), histogram of m in 0..E (E+1)]
        # then, with Default MoE, the per-expert output sums (E * D).
        self.num_stats = 4 + 2 * E + 1
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
        x = x.reshape(-1, self.dim)                                       # (N, D)
        r = self.router(x)
        xs = x.index_select(0, r.token_idx)                               # (M, D), expert-contiguous
        ys = self.experts(xs, r.sizes, r.counts, r.expert_idx)            # (M, D)
        # Scale in (at least) fp32, then back to the expert dtype (bf16 under autocast).
        weighted = (ys.to(r.weight.dtype) * r.weight.unsqueeze(1)).to(ys.dtype)
        y = ys.new_zeros(x.shape[0], self.dim).index_add(0, r.token_idx, weighted)
        if self.shared is not None:
            y = y + self.shared(x, (x.shape[0],))
        if self.default_vectors is not None:
            y = y + self.default_vectors.term(r.probs, r.mask).to(y.dtype)
        if self.training and not _in_backward():
            self.last_aux_loss, self.last_aux_terms = r.aux_loss, r.aux_terms
            self._accumulate(r, ys)
        return y.reshape(*shape[:-1], y.shape[-1])

    @torch.no_grad()
    def _accumulate(self, r: RouterOutput, ys: torch.Tensor) -> None:
        E = self.num_experts
        m = r.num_active
        entropy = -(r.probs * r.probs.clamp(min=1e-20).log()).sum()
        capped = r.capped.sum() if r.capped is not None else m.new_zeros(())
        hist = torch.zeros(E + 1, device=m.device).index_add_(0, m, torch.ones_like(m, dtype=torch.float32))
        head = torch.stack([m.sum().float(), torch.ones((), device=m.device) * m.shape[0], entropy, capped.float()])
        self.routing_acc[: self.num_stats].add_(torch.cat([head, r.counts.float(), hist]))
        if self.default_vectors is not None:
            sums = DefaultVectors.output_sums(ys, r.expert_idx, E)
            self.routing_acc[self.num_stats:].add_(sums.flatten())

    def layer_stats(self) -> dict[str, torch.Tensor]:
        """This layer's statistics from the last ``routing_step`` (tensors; zeros before the first)."""
        E = self.num_experts
        s = self.routing_last
        tokens = s[1].clamp(min=1)
        counts = s[4: 4 + E]
        stats = {
            "mean_active": s[0] / tokens,
            "entropy": s[2] / tokens,
            "cap_frac": s[3] / tokens,
            "load": counts / counts.sum().clamp(min=1),
            "active_hist": s[4 + E:] / tokens,
        }
        if isinstance(self.router, DTopPRouter):
            stats["drn_scale"] = self.router.scale().detach()
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
    (identical on every rank), clamps the DRN scales, records the statistics and zeroes the accumulators.
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
            layer.default_vectors.update(acc[layer.num_stats:].view(E, layer.dim), acc[4: 4 + E])
        if isinstance(layer.router, DTopPRouter):
            layer.router.clamp_scale_()
            dtopp.append((layer.router.layer_index, acc[0], acc[1]))
        layer.routing_acc.zero_()
    if controller is not None:
        dtopp.sort(key=lambda t: t[0])
        if [t[0] for t in dtopp] != list(range(controller.num_layers)):
            raise RuntimeError(f"DTop-p layers {[t[0] for t in dtopp]} do not match the controller's "
                               f"{controller.num_layers} layers")
        controller.update(torch.stack([t[1] for t in dtopp]), torch.stack([t[2] for t in dtopp]))
    return routing_stats(model)


def routing_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """Latest routing statistics as tensors (converted by the caller on logging steps only).

    Per MoE layer, stacked over layers (L, ...): ``mean_active``, ``entropy``, ``cap_frac``, ``load`` (L, E),
    ``active_hist`` (L, E+1; fraction of tokens with m experts), ``drn_scale`` (DTop-p). Controller (DTop-p):
    ``threshold``, ``integral``, ``measured``, ``error`` with one entry per threshold (1 global, L layer-wise).
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    per_layer = [l.layer_stats() for l in layers]
    out = {k: torch.stack([s[k] for s in per_layer]) for k in per_layer[0] if all(k in s for s in per_layer)}
    controller = _controller_of(layers)
    if controller is not None:
        for name in ("threshold", "integral", "measured", "error"):
            out[name] = getattr(controller, name).detach().clone()
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
        p_min=routing_cfg.p_min, p_max=routing_cfg.p_max, i_max=routing_cfg.i_max)


def build_router(dim: int, moe_layer: int, num_experts: int, top_k: int, routing_cfg,
                 controller: ThresholdController | None) -> Router:
    """A router from ``RoutingConfig``; None-valued fields take the router's published default."""
    c = routing_cfg
    if c.type == "topk":
        return TopKRouter(dim, num_experts, top_k, renormalize=_or(c.renormalize, False), lb_coef=_or(c.lb_coef, 0.01),
                          entropy_coef=_or(c.entropy_coef, 0.0), lb_global=c.lb_global)
    if c.type == "topp":
        return TopPRouter(dim, num_experts, threshold=c.threshold, k_max=c.k_max,
                          renormalize=_or(c.renormalize, False), lb_coef=_or(c.lb_coef, 0.01),
                          entropy_coef=_or(c.entropy_coef, 0.0), lb_global=c.lb_global)
    if c.type == "dtopp":
        if controller is None:
            raise ValueError("routing.type=dtopp needs the model's ThresholdController (build_controller)")
        return DTopPRouter(dim, num_experts, controller, moe_layer, k_max=c.k_max,
                           renormalize=_or(c.renormalize, True), lb_coef=_or(c.lb_coef, 1e-4),
                           entropy_coef=_or(c.entropy_coef, 1e-3), lb_global=c.lb_global,
                           log_scale_max=c.drn_log_scale_max)
    raise ValueError(f"routing.type={c.type!r} must be one of topk, topp, dtopp")


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
