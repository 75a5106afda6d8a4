"""DTop-p (Jin et al. 2025, arXiv 2512.13996): top-p routing whose threshold a PI controller sets so that the
running mean of activated experts per token tracks a target, plus dynamic routing normalisation (DRN) per layer.

Published: the controlled variable (mean activated experts over all tokens and MoE layers), the E-normalised error,
a PI law between batches, DRN (per-layer logits standardised to mean 0 / std 1, times a learnable scale), top-p
selection with renormalised weights. Our choices, derived in docs/dtopp-controller.md: the PI law on the
threshold's log-odds and its gains, the incremental (velocity) form with the clamp as its anti-windup, the initial
threshold, the per-token standardisation axis and its eps, and the bound on the DRN scale that keeps the threshold
able to reach the target.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn as nn

from .base import Router, top_p_mask


# ---------------------------------------------------------------------------------------------------------
#                           What standardised logits need from the threshold
# ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def standard_normal_threshold(num_experts: int, target: float, scale: float = 1.0, samples: int = 1 << 16) -> float:
    """The top-p threshold at which tokens with i.i.d. standard-normal logits, standardised per token and times
    ``scale``, activate ``target`` experts on average: DTop-p's starting threshold.

    A freshly initialised router gives such logits (z_e = w_e . h with independent rows w_e), and DRN's
    standardisation removes their scale, so this holds whatever the width. With the exclusive-cumsum rule a token
    takes rank j iff the mass before it is below p, so a(p) = (1/n) #{(t, j): before_tj < p}: the threshold is the
    ((target - 1) n)-th smallest of the masses before ranks 2..E (no bisection). Monte Carlo over n = 65536 tokens,
    fixed seed, float64: deterministic, within ~1e-3 of its limit. E = 8, target 2: 0.508 (target / E = 0.25
    starts at 1.05 experts).
    """
    if not 1.0 <= target <= num_experts:
        raise ValueError(f"target={target} experts must be in [1, num_experts={num_experts}]")
    if target >= num_experts:
        return 1.0
    z = torch.randn(samples, num_experts, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                    device="cpu")                       # also under a meta / cuda default device
    std, mean = torch.std_mean(z, dim=1, correction=0, keepdim=True)
    sorted_probs = (scale * (z - mean) / std).softmax(1).sort(1, descending=True).values
    before = (sorted_probs.cumsum(1) - sorted_probs)[:, 1:].flatten().sort().values   # rank 1 is always kept
    need = round((target - 1.0) * samples)                                           # extra ranks to admit
    if need == 0:
        return float(before[0]) / 2
    lo, hi = float(before[need - 1]), float(before[min(need, before.numel() - 1)])
    return (lo + hi) / 2


def drn_scale_bound(num_experts: int, target: float, threshold: float) -> float:
    """Largest DRN scale s at which EVERY token, whatever its logits, still activates ceil(target) experts at
    ``threshold``; ``math.inf`` when target <= 1 (one expert is always reachable).

    After standardisation a token's logits have mean 0 and variance 1 over the E experts, which bounds how peaked
    softmax(s z) can be. A token takes k = ceil(target) experts iff its k - 1 most probable hold less than the
    threshold. For k = 2: with the top logit at z1 the others sum to -z1, so by Jensen sum_j exp(s z_j) >=
    (E-1) exp(-s z1 / (E-1)) and the top mass is at most 1 / (1 + (E-1) exp(-s z1 E / (E-1))), largest at
    z1 = sqrt(E-1) (the one-hot shape). Hence s_max = sqrt(E-1) / E * ln((E-1) p / (1-p)). For k > 2 the most
    peaked shapes are three-valued (one top logit, k-2 tied below it, the rest tied; found by adversarial search,
    which the tests repeat): s_max is bisected over that family, scanned finely, and over the two-valued shapes.
    """
    k = math.ceil(target - 1e-9)
    if k <= 1 or threshold >= 1.0:
        return math.inf
    j, E = k - 1, num_experts
    if not j / E < threshold:
        raise ValueError(f"threshold {threshold} cannot activate {k} of {E} experts even for uniform routing")
    phi = torch.linspace(0, math.pi / 2, 2001, dtype=torch.float64, device="cpu")
    shapes = torch.zeros(phi.numel() + E - 1, E, dtype=torch.float64, device="cpu")
    shapes[: phi.numel(), 0] = phi.cos() + phi.sin()                 # top logit
    shapes[: phi.numel(), 1:j] = phi.cos().unsqueeze(1)              # the j - 1 tied below it; the rest at 0
    for q in range(1, E):                                            # two-valued: q high, E - q low
        shapes[phi.numel() + q - 1, :q] = 1.0
    std, mean = torch.std_mean(shapes, dim=1, correction=0, keepdim=True)
    shapes = (shapes - mean) / std

    def worst_mass(s: float) -> float:                               # top-j mass of the most peaked shape
        return float((s * shapes).softmax(1)[:, :j].sum(1).max())
    lo, hi = 0.0, 1.0
    while worst_mass(hi) < threshold:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if worst_mass(mid) < threshold else (lo, mid)
    return lo


def margin_threshold(p_max: float) -> float:
    """The threshold the DRN scale bound is computed for: the one whose odds p / (1 - p) are half those of p_max
    (0.99 -> 0.9802), so a maximally peaked token reaches its experts a margin ln 2 in logit below p_max."""
    return p_max / (2.0 - p_max)


# ---------------------------------------------------------------------------------------------------------
#                                         The PI controller
# ---------------------------------------------------------------------------------------------------------

SPACES = ("logit", "linear")
GAINS = {"logit": (0.2, 1.0), "linear": (0.05, 0.25)}   # (Kp, Ki) defaults per space, docs/dtopp-controller.md


class ThresholdController(nn.Module):
    """PI controller on the top-p threshold, shared by every DTop-p layer of a model.

    State (buffers, so checkpoints and EMA copies carry it): ``threshold`` p, ``integral`` I, ``measured`` a and
    ``error`` e, each (1,) for scope ``global`` or (L,) for scope ``layer`` (entry i drives MoE layer i). Once per
    optimizer step, from the activated-expert sums of every micro-batch and every rank:

        a_t = sum_l sum_t m_lt / (L N)      (global; per layer: a_l = sum_t m_lt / N)
        e_t = (target - a_t) / E
        u_t = clip(u_{t-1} + Kp (e_t - e_{t-1}) + Ki e_t,  u(p_min), u(p_max)),     p_t = u^-1(u_t)

    with u(p) = log(p / (1 - p)) (``space="logit"``, the default) or u(p) = p (``"linear"``: the PI law on p
    itself, as the paper states it). Unclamped this is exactly the positional law u_t = u(p0) + Kp e_t +
    Ki sum_{s<=t} e_s. Clamped, it is that law with back-calculation anti-windup: the integral never runs past what
    the bound lets the threshold use, so the threshold leaves the bound on the first step the error changes sign.
    ``integral`` holds that back-calculated sum (for logging). An update whose unclamped value left the bounds sets
    ``saturated`` (1 or -1 for the upper or lower bound, else 0) and counts in ``saturated_steps`` (non-persistent
    diagnostics). a > target gives e < 0 and lowers p.

    Stability (derivation and measurements in docs/dtopp-controller.md). Linearise the routers at the operating
    point, a = a* + g (u - u*), gamma = g / E. The loop is z^2 - (1 - gamma (Kp + Ki)) z - gamma Kp = 0; the Jury
    conditions give stability iff gamma Ki > 0, gamma Kp < 1 and gamma (2 Kp + Ki) < 2. In p (linear space) the
    gain g = da/dp grows without bound as routers sharpen and the threshold nears 1: measured on the default
    config (DiT-T/2-E8K2, digits), gamma is 0.54 at the start, 3.1 at step 500, 6.6 at step 1000 and 8-13 later,
    so no fixed gains stay stable (Kp = 1, Ki = 0.1 needs gamma < 0.952, Kp = 0.05, Ki = 0.25 gamma < 5.71).
    In log-odds the experts needed grow about linearly with u (softmax tails are exponential): the measured gamma
    stays 0.14-0.30 over 6000 steps, and Kp = 0.2, Ki = 1.0 is stable for gamma < 1.43 and settles in 4-8 steps.
    """

    def __init__(self, num_experts: int, target: float, num_layers: int, scope: str = "global",
                 kp: float | None = None, ki: float | None = None, p0: float | None = None, p_min: float = 0.01,
                 p_max: float = 0.99, i_max: float | None = None, space: str = "logit"):
        super().__init__()
        if scope not in ("global", "layer"):
            raise ValueError(f"DTop-p scope={scope!r} must be 'global' or 'layer'")
        if space not in SPACES:
            raise ValueError(f"DTop-p threshold_space={space!r} must be one of {SPACES}")
        if not 1 <= target <= num_experts:
            raise ValueError(f"DTop-p target={target} must be in [1, num_experts={num_experts}]")
        if not 0.0 < p_min <= p_max <= 1.0:
            raise ValueError(f"DTop-p threshold bounds p_min={p_min}, p_max={p_max} must satisfy 0 < p_min <= p_max <= 1")
        kp = GAINS[space][0] if kp is None else kp
        ki = GAINS[space][1] if ki is None else ki
        if kp < 0 or ki < 0 or kp + ki == 0:
            raise ValueError(f"DTop-p gains kp={kp}, ki={ki} must be >= 0 and not both 0")
        if i_max is not None:
            warnings.warn("routing.i_max is ignored: the incremental PI law cannot wind up (see ThresholdController)",
                          stacklevel=2)
        self.num_experts = num_experts
        self.target = float(target)
        self.num_layers = num_layers
        self.scope = scope
        self.space = space
        self.kp, self.ki = kp, ki
        self.p0 = standard_normal_threshold(num_experts, self.target) if p0 is None else p0
        self.p_min, self.p_max = p_min, p_max
        self.warned = False
        size = 1 if scope == "global" else num_layers
        self.register_buffer("threshold", torch.full((size,), min(max(self.p0, p_min), p_max)))
        self.register_buffer("integral", torch.zeros(size))
        self.register_buffer("measured", torch.zeros(size))
        self.register_buffer("error", torch.zeros(size))
        self.register_buffer("saturated", torch.zeros(size), persistent=False)
        self.register_buffer("saturated_steps", torch.zeros(size), persistent=False)

    def to_u(self, p):
        """Threshold -> the controller's coordinate (log-odds, clipped at 1e-6 from 0 and 1, or p itself)."""
        if self.space == "linear":
            return p
        if isinstance(p, torch.Tensor):
            return torch.logit(p, eps=1e-6)
        p = min(max(p, 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))

    def from_u(self, u: torch.Tensor) -> torch.Tensor:
        return u if self.space == "linear" else torch.sigmoid(u)

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
        raw = self.to_u(self.threshold) + self.kp * (e - self.error) + self.ki * e
        lo, hi = self.to_u(self.p_min), self.to_u(self.p_max)
        u = raw.clamp(lo, hi)
        integral = self.integral + e + ((u - raw) / self.ki if self.ki else 0.0)     # back-calculated
        saturated = (raw > hi).float() - (raw < lo).float()
        p = self.from_u(u).clamp(self.p_min, self.p_max)
        for buf, new in ((self.threshold, p), (self.integral, integral), (self.measured, a), (self.error, e),
                         (self.saturated, saturated), (self.saturated_steps, self.saturated_steps + saturated.abs())):
            buf.copy_(torch.where(valid, new, buf))

    def warn_if_saturated(self) -> None:
        """Warn once (``warnings``) if any update has saturated. Reads one value to the host: call on log steps."""
        if self.warned or not bool(self.saturated_steps.sum() > 0):
            return
        self.warned = True
        warnings.warn(f"DTop-p threshold saturated ({int(self.saturated_steps.max())} steps so far, now "
                      f"{self.threshold.tolist()}, bounds [{self.p_min}, {self.p_max}]): the activated experts "
                      f"cannot follow the target {self.target}. Widen routing.p_min/p_max or lower "
                      "routing.drn_scale_max / entropy_coef.", RuntimeWarning, stacklevel=2)

    def extra_repr(self) -> str:
        return (f"target={self.target}, scope={self.scope}, space={self.space}, kp={self.kp}, ki={self.ki}, "
                f"p0={self.p0:.4g}, p=[{self.p_min}, {self.p_max}]")


# ---------------------------------------------------------------------------------------------------------
#                                     The router (DRN + top-p)
# ---------------------------------------------------------------------------------------------------------

class DTopPRouter(Router):
    """Top-p routing with a controller-set threshold and dynamic routing normalisation.

    DRN: per-token standardisation of the logits over the expert axis, times one learnable positive scale
    s = exp(theta) per layer (theta init 0):
        pi_t = softmax(s * (z_t - mean_e z_t) / max(std_e z_t, eps))
    eps = 1e-2 bounds the gradient (s / eps per logit) when a token's logit spread collapses; it binds only for
    tokens whose logit spread is below 2% of the typical one (~0.5 at init, ~1 trained; the smallest seen on the
    digits is 0.13), which then route almost uniformly.
    theta is kept in [-log_scale_max, log(scale_max)] by projection after each optimizer step (``clamp_scale_``,
    called by ``routing_step``); ``scale()`` itself does not clamp, so theta at its bound still gets its gradient
    and can move back. scale_max defaults to ``drn_scale_bound(E, target, margin_threshold(p_max))``: the
    sharpest scale at which even a one-hot token reaches ceil(target) experts at a threshold whose odds are half
    those of p_max (E = 8, target 2, p_max 0.99: 1.93), so the threshold can always reach the target.
    Selection: the smallest prefix of sorted pi_t reaching the controller's threshold; weights renormalised over it.
    A balance bias reorders that prefix (ranked by pi + b, mass of pi), as for fixed Top-p; the controller then
    sets the threshold for the count the reordered prefixes give.
    The controller is referenced, not registered: the model owns it once (``model.routing_controller``).
    """

    def __init__(self, dim: int, num_experts: int, controller: ThresholdController, layer: int,
                 k_max: int | None = None, renormalize: bool = True, lb_coef: float = 1e-4, entropy_coef: float = 1e-3,
                 lb_global: bool = False, log_scale_max: float = 3.0, scale_max: float | None = None,
                 eps: float = 1e-2, balance_bias: bool = False, bias_rate: float = 1e-3):
        if k_max is not None and not 1 <= k_max <= num_experts:
            raise ValueError(f"k_max={k_max} must be in [1, num_experts={num_experts}]")
        if controller.num_experts != num_experts:
            raise ValueError(f"controller built for {controller.num_experts} experts, router has {num_experts}")
        if scale_max is None:
            scale_max = drn_scale_bound(num_experts, controller.target, margin_threshold(controller.p_max))
        if not scale_max > math.exp(-log_scale_max):
            raise ValueError(f"DRN scale bound {scale_max} must exceed exp(-drn_log_scale_max) = "
                             f"{math.exp(-log_scale_max):.3g}")
        super().__init__(dim, num_experts, renormalize, lb_coef, entropy_coef, lb_global, balance_bias, bias_rate)
        self.layer_index = layer                 # position among the MoE layers
        self.slot = controller.slot(layer)
        self.k_max = k_max
        self.log_scale_min = -log_scale_max
        self.log_scale_max = min(log_scale_max, math.log(scale_max))
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
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_scale_(self) -> None:
        """Project theta onto its bounds; after each optimizer step (``routing_step``)."""
        self.log_scale.clamp_(self.log_scale_min, self.log_scale_max)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        std, mean = torch.std_mean(logits, dim=1, correction=0, keepdim=True)
        return (self.scale() * (logits - mean) / std.clamp(min=self.eps)).softmax(dim=1)

    def select(self, probs: torch.Tensor, samples: int = 1):
        # Read the buffer at call time: after model.to(...) or deepcopy it is the moved / copied tensor.
        return top_p_mask(probs, self.controller.threshold[self.slot], self.k_max, self.selection_scores(probs))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, slot={self.slot}, k_max={self.k_max}, "
                f"scale<=[{math.exp(self.log_scale_max):.4g}]")
