"""Expert banks: E expert MLPs as stacked weights, run on expert-sorted tokens in one of two ways.

    grouped   torch's grouped_mm over all segments at once; segment boundaries are device offsets (the cumsum of
              the per-expert counts), so nothing is read to the host. The GPU path.
    segments  a loop over the E contiguous segments with host-side sizes, as one autograd node (_SegmentMLP).
              The CPU path (grouped_mm is slower there), and the fallback where grouped_mm cannot run a shape.

Which path runs is decided by the caller (``MoEMLP`` probes grouped_mm per shape and dtype).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPERT_KINDS = ("gelu", "swiglu")


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype experts run in: the autocast dtype under autocast (autocast itself is off inside), else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


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

    def _weights(self, dtype: torch.dtype):
        return tuple(None if p is None else p.to(dtype) for p in (self.w_in, self.b_in, self.w_out, self.b_out))

    def forward(self, x: torch.Tensor, sizes: Sequence[int] | None = None, counts: torch.Tensor | None = None,
                expert_idx: torch.Tensor | None = None, grouped: bool = False) -> torch.Tensor:
        """(M, D) tokens sorted by expert -> (M, D) outputs of each token's expert, in ``compute_dtype(x)``.

        grouped: ``counts`` (E,) device tensor and ``expert_idx`` (M,) (for the biases); no host sync.
        segments: ``sizes`` (E,) host ints (taken from ``counts`` with one device-to-host copy if not given).
        """
        dtype = compute_dtype(x)
        x = x.to(dtype)
        w_in, b_in, w_out, b_out = self._weights(dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if grouped:
                return self._grouped(x, counts, expert_idx, w_in, b_in, w_out, b_out)
            if sizes is None:
                sizes = tuple(counts.tolist())
            if len(sizes) != self.num_experts:
                raise ValueError(f"got {len(sizes)} segment sizes for {self.num_experts} experts")
            return _SegmentMLP.apply(x, tuple(sizes), self.kind, w_in, b_in, w_out, b_out)

    def _grouped(self, x, counts, expert_idx, w_in, b_in, w_out, b_out) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)                        # (E,) segment ends, on the device
        h = F.grouped_mm(x, w_in, offs=offs)
        if b_in is not None:
            h = h + b_in.index_select(0, expert_idx)
        y = F.grouped_mm(self.activation(h), w_out, offs=offs)
        return y + b_out.index_select(0, expert_idx) if b_out is not None else y

    def grouped_runs(self, device: torch.device, dtype: torch.dtype) -> None:
        """Run the grouped path forward and backward once on a few tokens with this bank's real weight shapes (an
        empty expert included); raises what grouped_mm raises (e.g. row strides not a multiple of 16 bytes)."""
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
            self._probe(device, dtype)          # also when first reached from sampling under inference_mode

    def _probe(self, device: torch.device, dtype: torch.dtype) -> None:
        E = self.num_experts
        counts = torch.ones(E, dtype=torch.long, device=device)
        counts[0] = 0
        counts[-1] += 1
        expert_idx = torch.repeat_interleave(torch.arange(E, device=device), counts, output_size=E)
        x = torch.zeros(E, self.dim, device=device, dtype=dtype, requires_grad=True)
        weights = [w.detach().to(device, dtype).requires_grad_(True) if w is not None else None
                   for w in (self.w_in, self.b_in, self.w_out, self.b_out)]
        y = self._grouped(x, counts, expert_idx, *weights)
        torch.autograd.grad(y, [x] + [w for w in weights if w is not None], torch.ones_like(y))


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


def _activation_into(kind: str, h: torch.Tensor, out: torch.Tensor) -> None:
    """``out = activation(h)`` written in place: the same numbers as ``_act_forward_backward(kind, h)``."""
    if kind == "gelu":
        torch.ops.aten.gelu.out(h, approximate="tanh", out=out)
    else:
        gate, up = h.chunk(2, dim=-1)
        torch.mul(F.silu(gate), up, out=out)


class _SegmentMLP(torch.autograd.Function):
    """All E expert MLPs on their contiguous segments of (M, D) expert-sorted tokens, as one autograd node.

    Autograd through per-expert slices of the stacked weights (w_in[e]) would build a full-size zero gradient of
    the whole stack for every expert and sum E of them, and concatenating the segment outputs would copy them
    once more. Here the forward writes each segment straight into one (M, .) buffer and the backward writes each
    expert's weight gradient into its slice of one gradient tensor. Saved: the input, the pre-activations and the
    activations (M, H), as a dense MLP's autograd saves them: recomputing the activation in the backward cost more
    time (benchmarks/cpu_step.py) than the buffer costs memory.
    """

    @staticmethod
    def forward(ctx, x, sizes, kind, w_in, b_in, w_out, b_out):
        M, D = x.shape
        h = x.new_empty(M, w_in.shape[2])
        a = x.new_empty(M, w_out.shape[1])
        y = x.new_empty(M, w_out.shape[2])
        start = 0
        for e, n in enumerate(sizes):
            if n:
                s = slice(start, start + n)
                if b_in is None:
                    torch.mm(x[s], w_in[e], out=h[s])
                    _activation_into(kind, h[s], a[s])
                    torch.mm(a[s], w_out[e], out=y[s])
                else:
                    torch.addmm(b_in[e], x[s], w_in[e], out=h[s])
                    _activation_into(kind, h[s], a[s])
                    torch.addmm(b_out[e], a[s], w_out[e], out=y[s])
            start += n
        ctx.sizes, ctx.kind, ctx.has_bias = sizes, kind, b_in is not None
        ctx.save_for_backward(x, h, a, w_in, w_out)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, h, a, w_in, w_out = ctx.saved_tensors
        need_x, _, _, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad
        gy = gy.contiguous()
        gx = torch.empty_like(x) if need_x else None
        g_w_in = torch.empty_like(w_in) if need_w_in else None
        g_w_out = torch.empty_like(w_out) if need_w_out else None
        g_b_in = x.new_empty(w_in.shape[0], w_in.shape[2]) if ctx.has_bias and need_b_in else None
        g_b_out = x.new_empty(w_out.shape[0], w_out.shape[2]) if ctx.has_bias and need_b_out else None
        start = 0
        for e, n in enumerate(ctx.sizes):
            if not n:       # an expert without tokens: a zero gradient slice (DDP then sees every parameter used)
                for g in (g_w_in, g_w_out, g_b_in, g_b_out):
                    if g is not None:
                        g[e].zero_()
            else:
                s = slice(start, start + n)
                he, ge = h[s], gy[s]
                if g_w_out is not None:
                    torch.mm(a[s].t(), ge, out=g_w_out[e])
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
