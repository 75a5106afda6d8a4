"""DTop-p (Jin et al. 2025, arXiv 2512.13996): top-p routing whose threshold a PI controller sets so that the
running mean of activated experts per token tracks a target, plus dynamic routing normalisation (DRN) per layer.

See routing-spec.md section 3 for the formulas and for which details are our own choices.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .base import Router, top_p_mask


class ThresholdController(nn.Module):
    """Positional PI controller on the top-p threshold, shared by every DTop-p layer of a model.

    State (buffers, so checkpoints and EMA copies carry it): ``threshold`` p, ``integral`` I and ``measured`` a,
    each of shape (1,) for scope ``global`` or (L,) for scope ``layer`` (entry i drives MoE layer i). Once per
    optimizer step, from the activated-expert sums of every micro-batch and every rank:

        a = sum_l sum_t m_lt / (L * N)      (global; per layer: a_l = sum_t m_lt / N)
        e = (target - a) / E
        I = clip(I + e, -I_max, I_max)      (anti-windup)
        p = clip(p0 + Kp * e + Ki * I, p_min, p_max)

    a > target gives e < 0 and lowers p, so fewer experts fire on the next step.

    Gains. With g = da/dp the loop's sensitivity, this one-step-delay positional PI is stable iff
    (g / E) * (Ki + 2 Kp) < 2 (Jury criterion on z^2 - (1 - kp' - ki') z - kp', kp' = Kp g/E, ki' = Ki g/E).
    Near-uniform routing has g ~ E and a sharpening router (DRN scale, entropy loss) several E, so the spec's
    Kp = 1, Ki = 0.1 sits at the edge of stability from the start (it oscillates once g > E) and, being mostly
    proportional, lags a drifting router. The defaults Kp = 0.05, Ki = 0.25 are stable up to g ~ 5.7 E and settle
    in ~40 steps on a small learning router (evidence in the helper report and tests/test_routers.py).
    """

    def __init__(self, num_experts: int, target: float, num_layers: int, scope: str = "global", kp: float = 0.05,
                 ki: float = 0.25, p0: float | None = None, p_min: float = 0.01, p_max: float = 0.99,
                 i_max: float | None = None):
        super().__init__()
        if scope not in ("global", "layer"):
            raise ValueError(f"DTop-p scope={scope!r} must be 'global' or 'layer'")
        if not 0 < target <= num_experts:
            raise ValueError(f"DTop-p target={target} must be in (0, num_experts={num_experts}]")
        if not 0.0 < p_min <= p_max <= 1.0:
            raise ValueError(f"DTop-p threshold bounds p_min={p_min}, p_max={p_max} must satisfy 0 < p_min <= p_max <= 1")
        if i_max is None and ki <= 0:
            raise ValueError(f"DTop-p ki={ki} must be > 0 when i_max is not given (default i_max = 1 / ki)")
        self.num_experts = num_experts
        self.target = float(target)
        self.num_layers = num_layers
        self.scope = scope
        self.kp, self.ki = kp, ki
        self.p0 = target / num_experts if p0 is None else p0
        self.p_min, self.p_max = p_min, p_max
        self.i_max = 1.0 / ki if i_max is None else i_max
        size = 1 if scope == "global" else num_layers
        self.register_buffer("threshold", torch.full((size,), min(max(self.p0, p_min), p_max)))
        self.register_buffer("integral", torch.zeros(size))
        self.register_buffer("measured", torch.zeros(size))
        self.register_buffer("error", torch.zeros(size))

    def slot(self, layer: int) -> int:
        """Which threshold entry MoE layer ``layer`` (0-based among MoE layers) reads."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"MoE layer {layer} out of range for a controller built for {self.num_layers} layers")
        return 0 if self.scope == "global" else layer

    @torch.no_grad()
    def update(self, active_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        """One PI step from per-layer sums (L,) of activated experts and token counts, already summed over ranks.

        Entries without tokens (nothing was accumulated, e.g. eval) leave the state unchanged. No host sync.
        """
        if active_sum.shape != (self.num_layers,):
            raise ValueError(f"controller expects {self.num_layers} layer sums, got shape {tuple(active_sum.shape)}")
        if self.scope == "global":
            active_sum, tokens = active_sum.sum(0, keepdim=True), tokens.sum(0, keepdim=True)
        valid = tokens > 0
        a = active_sum / tokens.clamp(min=1)
        e = (self.target - a) / self.num_experts
        integral = (self.integral + e).clamp(-self.i_max, self.i_max)
        p = (self.p0 + self.kp * e + self.ki * integral).clamp(self.p_min, self.p_max)
        for buf, new in ((self.threshold, p), (self.integral, integral), (self.measured, a), (self.error, e)):
            buf.copy_(torch.where(valid, new, buf))

    def extra_repr(self) -> str:
        return (f"target={self.target}, scope={self.scope}, kp={self.kp}, ki={self.ki}, p0={self.p0:.4g}, "
                f"p=[{self.p_min}, {self.p_max}], i_max={self.i_max:.4g}")


class DTopPRouter(Router):
    """Top-p routing with a controller-set threshold and dynamic routing normalisation.

    DRN: per-token standardisation of the logits over the expert axis, times one learnable positive scale
    s = exp(theta) per layer (theta init 0, clamped to [-log_scale_max, log_scale_max]):
        pi_t = softmax(s * (z_t - mean_e z_t) / (std_e z_t + eps))
    Selection: the smallest prefix of sorted pi_t reaching the controller's threshold; weights renormalised over it.
    The controller is referenced, not registered: the model owns it once (``model.routing_controller``).
    """

    def __init__(self, dim: int, num_experts: int, controller: ThresholdController, layer: int,
                 k_max: int | None = None, renormalize: bool = True, lb_coef: float = 1e-4, entropy_coef: float = 1e-3,
                 lb_global: bool = False, log_scale_max: float = 3.0, eps: float = 1e-6):
        if k_max is not None and not 1 <= k_max <= num_experts:
            raise ValueError(f"k_max={k_max} must be in [1, num_experts={num_experts}]")
        if controller.num_experts != num_experts:
            raise ValueError(f"controller built for {controller.num_experts} experts, router has {num_experts}")
        super().__init__(dim, num_experts, renormalize, lb_coef, entropy_coef, lb_global)
        self.layer_index = layer                 # position among the MoE layers
        self.slot = controller.slot(layer)
        self.k_max = k_max
        self.log_scale_max = log_scale_max
        self.eps = eps
        self.log_scale = nn.Parameter(torch.zeros((), dtype=torch.float32))
        # A tuple is not an nn.Module attribute: the controller stays out of this module's state_dict, while
        # copy.deepcopy(model) maps it onto the copy's controller (deepcopy's memo).
        self._controller = (controller,)

    @property
    def controller(self) -> ThresholdController:
        return self._controller[0]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "log_scale"):
            nn.init.zeros_(self.log_scale)

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(-self.log_scale_max, self.log_scale_max).exp()

    @torch.no_grad()
    def clamp_scale_(self) -> None:
        """Keep theta inside its bounds after an optimizer step, so the clamp in ``scale`` never kills its gradient."""
        self.log_scale.clamp_(-self.log_scale_max, self.log_scale_max)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        std, mean = torch.std_mean(logits, dim=1, correction=0, keepdim=True)
        return (self.scale() * (logits - mean) / (std + self.eps)).softmax(dim=1)

    def select(self, probs: torch.Tensor):
        # Read the buffer at call time: after model.to(...) or deepcopy it is the moved / copied tensor.
        return top_p_mask(probs, self.controller.threshold[self.slot], self.k_max)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, slot={self.slot}, k_max={self.k_max}"
