"""The one way to read router outputs: per-token routing sums, the routing metric names, and ``RoutingTap``.

Everything that reports routing -- the training statistics (``MoEMLP`` accumulates, ``moe.routing_step`` reduces,
``moe.routing_stats`` reports, ``dit_moe.training`` logs), the activated-expert report of sampling, the routing
analysis and the study's probe -- computes its numbers from the same per-token vector (``token_stats``) and
names them with the same table (``METRICS``). Sums of that vector over any set of tokens give every metric
(``stats_from_sums``), so a training log, a sampling report and an analysis agree by construction.

``RoutingTap(model)`` is a context manager that hooks every router of a model (nothing else is modified) and
keeps running sums on the device per MoE layer and per timestep bucket (optionally per class, per patch and per
model call: no host sync per call) and, with ``records=True``, also a per-call record of every token's experts on the
host (the analysis' spatial maps and per-image spread: the only numbers that need single tokens). The timesteps
and class labels of each forward come from forward pre-hooks on the DiT's timestep and label embedders, so sampling
loops, CFG (the null-class copies are counted, as compute spent, and recognisable by their label) and training
forwards need no cooperation; a model without them takes ``set_context(t, y)``.
Timestep buckets are on the network's scale 0 .. 1000 for both objectives (dit_moe/diffusion/__init__.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .routers.base import Router, RouterOutput

__all__ = ["HEAD", "METRICS", "RoutingMetric", "RoutingTap", "num_sums", "sum_slices", "token_stats",
           "stats_from_sums", "summarize", "NUM_TRAIN_TIMESTEPS"]

NUM_TRAIN_TIMESTEPS = 1000      # the network's timestep scale (DDPM k, flow 1000 t)

# ---------------------------------------------------------------------------------------------------------
#                                 Per-token sums and the metric names
# ---------------------------------------------------------------------------------------------------------

# Columns of token_stats: these scalars per token, then its selection mask (E), then one-hot of its expert count (E+1).
HEAD = ("active", "tokens", "active_sq", "entropy", "capped", "logit_std")


def num_sums(num_experts: int) -> int:
    return len(HEAD) + 2 * num_experts + 1


def sum_slices(num_experts: int) -> dict[str, slice | int]:
    H, E = len(HEAD), num_experts
    return {**{name: i for i, name in enumerate(HEAD)}, "counts": slice(H, H + E), "hist": slice(H + E, H + 2 * E + 1)}


def token_stats(r: RouterOutput) -> torch.Tensor:
    """(N, S) per-token routing values of one router call, fp32 (fp64 for an fp64 model); S = num_sums(E).

    active m (experts taken), 1, m^2, router entropy -sum pi log pi (nats), capped (the k_max cap shortened the
    selection), spread of the raw logits over the experts, the selection mask (E) and one-hot of m (E + 1).
    Tensor ops only: no host synchronisation.
    """
    probs = r.probs.detach()
    N, E = probs.shape
    dtype = torch.promote_types(probs.dtype, torch.float32)
    m = r.num_active.to(dtype)
    entropy = -(probs * probs.clamp(min=1e-20).log()).sum(1).to(dtype)
    capped = r.capped.to(dtype) if r.capped is not None else torch.zeros_like(m)
    spread = r.logits.detach().std(dim=1, correction=0).to(dtype) if r.logits is not None else torch.zeros_like(m)
    hist = torch.zeros(N, E + 1, dtype=dtype, device=m.device).scatter_(1, r.num_active.unsqueeze(1), 1.0)
    head = torch.stack([m, torch.ones_like(m), m * m, entropy, capped, spread], dim=1)
    return torch.cat([head, r.mask.to(dtype), hist], dim=1)


@dataclass(frozen=True)
class RoutingMetric:
    """One routing metric: its definition, and how training logs it (``log``: (metrics.jsonl key, reduction over
    MoE layers: mean | layers | as_is | max_share | squeeze); ``routers``: routing types it is logged for)."""
    doc: str
    log: tuple = ()
    routers: Optional[tuple] = None


# The names of every routing number the toolkit reports: routing_stats (models/moe.py), RoutingTap reports,
# metrics.jsonl (through ``log``), docs/routing-metrics.md. Per MoE layer unless noted.
METRICS: dict[str, RoutingMetric] = {
    "mean_active": RoutingMetric("routed experts per token, mean over tokens",
                                 (("active_experts", "mean"), ("active_experts_per_layer", "layers"))),
    "active_std": RoutingMetric("standard deviation over tokens of the routed experts per token (0 for Top-k)",
                                (("active_experts_std", "mean"),), ("topp", "dtopp", "expert_choice")),
    "entropy": RoutingMetric("router entropy -sum_e pi log pi (nats), mean over tokens", (("router_entropy", "mean"),)),
    "cap_frac": RoutingMetric("fraction of tokens whose Top-p selection the routing.k_max cap shortened",
                              (("cap_frac", "mean"),), ("topp", "dtopp")),
    "unrouted_frac": RoutingMetric("fraction of tokens no expert took (expert choice): their routed output is zero, "
                                   "the block adds only its residual, shared experts and Default MoE term",
                                   (("unrouted_frac", "mean"),), ("expert_choice",)),
    "logit_std": RoutingMetric("spread (std over experts) of the raw router logits, mean over tokens",
                               (("logit_std", "layers"),)),
    "load": RoutingMetric("share of the (token, expert) assignments per expert, (E,); max_share x E = 1 is balanced",
                          (("expert_load", "as_is"), ("load_max", "max_share"))),
    "active_hist": RoutingMetric("fraction of tokens with m = 0 .. E routed experts, (E + 1,)"),
    "tokens": RoutingMetric("tokens counted"),
    "drn_scale": RoutingMetric("DTop-p: DRN scale s = exp(theta)", (("drn_scale", "mean"),)),
    "balance_bias": RoutingMetric("aux-loss-free balancing: the bias b (E,) added to the selection scores",
                                  (("balance_bias", "as_is"),)),
    # DTop-p controller, one entry per threshold (1 global, L layer-wise), not per layer
    "threshold": RoutingMetric("DTop-p: the controller's top-p threshold", (("threshold", "squeeze"),)),
    "integral": RoutingMetric("DTop-p: the PI integral (back-calculated)", (("controller_integral", "squeeze"),)),
    "measured": RoutingMetric("DTop-p: the activated experts the last update measured (all ranks, micro-batches)"),
    "error": RoutingMetric("DTop-p: the last error (target - measured) / E", (("controller_error", "squeeze"),)),
    "threshold_saturated": RoutingMetric("DTop-p: 1 / -1 if the last update wanted to pass p_max / p_min, else 0",
                                         (("threshold_saturated", "squeeze"),)),
    "saturated_steps": RoutingMetric("DTop-p: updates that hit a bound since the model was built",
                                     (("saturated_steps", "squeeze"),)),
}


def stats_from_sums(s: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """Sums (..., S) of ``token_stats`` rows -> the sums-derived METRICS, each (...) or (..., E) / (..., E + 1)."""
    ix = sum_slices(num_experts)
    tokens = s[..., ix["tokens"]]
    n = tokens.clamp(min=1)
    mean = s[..., ix["active"]] / n
    counts, hist = s[..., ix["counts"]], s[..., ix["hist"]]
    return {
        "mean_active": mean,
        "active_std": (s[..., ix["active_sq"]] / n - mean * mean).clamp(min=0).sqrt(),
        "entropy": s[..., ix["entropy"]] / n,
        "cap_frac": s[..., ix["capped"]] / n,
        "unrouted_frac": hist[..., 0] / n,
        "logit_std": s[..., ix["logit_std"]] / n,
        "load": counts / counts.sum(-1, keepdim=True).clamp(min=1),
        "active_hist": hist / n.unsqueeze(-1),
        "tokens": tokens,
    }


# ---------------------------------------------------------------------------------------------------------
#                                              The tap
# ---------------------------------------------------------------------------------------------------------

class RoutingTap:
    """Router forward hooks on every MoE layer of ``model``: running sums or per-call records (see module doc).

    Sums (float64, on the model's device) per MoE layer l: ``sums`` (buckets, L, S) by timestep bucket (bucket b
    covers network timesteps [b 1000 / buckets, (b + 1) 1000 / buckets)); with ``by_class`` also
    (num_classes + 1, L, S) by the class each sample asked for (the last row: the null class, i.e. the CFG copies
    and label-dropped samples); with ``by_patch`` (T, L, S) by token position in raster order; with ``by_call``
    (calls, L, S) by model forward since ``reset`` (grows with the calls seen). ``records``: per
    layer a list of per-call dicts on the host: ``call`` (model forward index since ``reset``), ``t`` (B,),
    ``y`` (B,), ``active`` (B, T) int16 experts per token, ``counts`` (2, E) int64 expert loads over the
    samples with a real class and over the null-class samples.
    """

    def __init__(self, model: nn.Module, buckets: int = 10, *, records: bool = False, by_class: bool = False,
                 by_patch: bool = False, by_call: bool = False, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        self.model = model
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        if not self.routers:
            name = getattr(getattr(model, "model_config", None), "name", type(model).__name__)
            raise ValueError(f"{name} has no routers (a dense model routes no tokens)")
        if buckets < 1:
            raise ValueError(f"RoutingTap: buckets={buckets} must be >= 1")
        self.num_experts = self.routers[0].num_experts
        self.buckets, self.num_train_timesteps = buckets, num_train_timesteps
        self.keep_records, self.by_class, self.by_patch, self.by_call = records, by_class, by_patch, by_call
        labels = getattr(model, "y_embedder", None)
        self.null_class = getattr(labels, "null_class", None)
        if by_class and self.null_class is None:
            raise ValueError("RoutingTap(by_class=True) needs a model with a label embedder (DiT)")
        self.device = next(model.parameters()).device
        self._handles: list = []
        self.reset()

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def reset(self) -> None:
        S, L = num_sums(self.num_experts), self.num_layers
        z = lambda n: torch.zeros(n, L, S, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums = z(self.buckets)
        self.class_sums = z(self.null_class + 1) if self.by_class else None
        self.patch_sums: Optional[torch.Tensor] = None          # (T, L, S), sized by the first call
        self.call_sums = z(0) if self.by_call else None           # (calls, L, S), grown as calls come
        self.records: list[list[dict]] = [[] for _ in self.routers]
        self.calls = -1
        self.t: Optional[torch.Tensor] = None
        self.y: Optional[torch.Tensor] = None

    def set_context(self, t=None, y=None) -> None:
        """Timesteps (B,) and labels (B,) of the next router calls, for models without DiT embedders."""
        self.calls += 1
        self.t = None if t is None else torch.as_tensor(t, device=self.device).reshape(-1)
        self.y = None if y is None else torch.as_tensor(y, device=self.device).reshape(-1)

    # ----- hooks
    def _on_timestep(self, module, args):
        self.calls += 1
        self.t = args[0].detach().reshape(-1)

    def _on_labels(self, module, args):
        self.y = args[0].detach().reshape(-1)

    def _per_sample(self, value: Optional[torch.Tensor], samples: int, what: str) -> Optional[torch.Tensor]:
        if value is None:
            return None
        if value.numel() == 1 and samples > 1:
            return value.expand(samples)
        if value.numel() != samples:
            raise ValueError(f"RoutingTap: a router call of {samples} samples after a forward with {value.numel()} "
                             f"{what}; call set_context(t, y) before calling the MoE layers directly")
        return value

    def _on_route(self, layer: int):
        def hook(module, args, out: RouterOutput):
            B = out.samples
            T = out.num_active.shape[0] // B
            t = self._per_sample(self.t, B, "timesteps")
            y = self._per_sample(self.y, B, "labels")
            if self.keep_records:
                self._record(layer, out, t, y, B, T)
            rows = token_stats(out).to(torch.float64)                                   # (N, S)
            if t is None:
                self.sums[0, layer] += rows.sum(0)
            else:
                bucket = (t.double() * self.buckets / self.num_train_timesteps).floor().long()
                bucket = bucket.clamp(0, self.buckets - 1).repeat_interleave(T, output_size=B * T)
                self.sums[:, layer].index_add_(0, bucket, rows)
            if self.by_class:
                if y is None:
                    raise ValueError("RoutingTap(by_class=True): the forward gave no class labels")
                self.class_sums[:, layer].index_add_(0, y.long().repeat_interleave(T, output_size=B * T), rows)
            if self.by_patch:
                if self.patch_sums is None:
                    self.patch_sums = torch.zeros(T, self.num_layers, rows.shape[1], dtype=torch.float64,
                                                  device=self.device)
                if self.patch_sums.shape[0] != T:
                    raise ValueError(f"RoutingTap(by_patch=True): {T} tokens per sample after "
                                     f"{self.patch_sums.shape[0]}")
                self.patch_sums[:, layer] += rows.view(B, T, -1).sum(0)
            if self.by_call:
                if self.calls < 0:
                    raise ValueError("RoutingTap(by_call=True): a router call before any model forward; call "
                                     "set_context(t, y) before calling the MoE layers directly")
                if self.call_sums.shape[0] <= self.calls:
                    more = self.call_sums.new_zeros(self.calls + 1 - self.call_sums.shape[0], *self.call_sums.shape[1:])
                    self.call_sums = torch.cat([self.call_sums, more])
                self.call_sums[self.calls, layer] += rows.sum(0)
        return hook

    def _record(self, layer: int, out: RouterOutput, t, y, B: int, T: int) -> None:
        mask = out.mask.detach()
        null = (y == self.null_class) if (y is not None and self.null_class is not None) else \
            torch.zeros(B, dtype=torch.bool, device=mask.device)
        halves = torch.stack([~null, null]).double().repeat_interleave(T, dim=1, output_size=B * T)   # (2, N)
        counts = (halves @ mask.double()).round().long()                   # (2, E); float: CUDA has no int matmul
        self.records[layer].append({
            "call": self.calls, "t": None if t is None else t.cpu(), "y": None if y is None else y.cpu(),
            "active": out.num_active.detach().view(B, T).to("cpu", torch.int16), "counts": counts.cpu()})

    def __enter__(self) -> "RoutingTap":
        if self._handles:
            raise RuntimeError("RoutingTap is already attached")
        self._handles = [r.register_forward_hook(self._on_route(i)) for i, r in enumerate(self.routers)]
        for name, fn in (("t_embedder", self._on_timestep), ("y_embedder", self._on_labels)):
            sub = getattr(self.model, name, None)
            if isinstance(sub, nn.Module):
                self._handles.append(sub.register_forward_pre_hook(fn))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.t = self.y = None
        return False

    # ----- results
    def state(self) -> dict:
        """JSON-able running sums (merge several processes' states with ``summarize``)."""
        return {"format": "routing-tap/1", "num_experts": self.num_experts, "buckets": self.buckets,
                "num_train_timesteps": self.num_train_timesteps, "sums": self.sums.cpu().tolist()}

    def load_state(self, state: dict) -> None:
        sums = torch.tensor(state.get("sums", []), dtype=torch.float64)
        if state.get("format") != "routing-tap/1" or sums.shape != self.sums.shape:
            raise ValueError(f"routing statistics of format {state.get('format')!r}, shape {tuple(sums.shape)} do "
                             f"not fit this tap ({self.buckets} buckets x {self.num_layers} layers x "
                             f"{self.sums.shape[2]} sums)")
        self.sums.copy_(sums)

    def per_layer(self) -> torch.Tensor:
        """Mean routed experts per token of each layer over everything seen, (L,) float64 on the CPU."""
        return stats_from_sums(self.sums.sum(0), self.num_experts)["mean_active"].cpu()

    def report(self) -> dict:
        out = summarize([self.state()])
        for name, sums in (("per_class", self.class_sums), ("per_patch", self.patch_sums)):
            if sums is not None:
                stats = stats_from_sums(sums.cpu(), self.num_experts)
                out[name] = {"mean": _means(sums.cpu(), self.num_experts),
                             "per_layer": stats["mean_active"].tolist(), "tokens": stats["tokens"].sum(1).tolist()}
        return out


def _means(sums: torch.Tensor, num_experts: int) -> list:
    """(K, L, S) -> mean routed experts per token of each row over all layers (None where no token was seen)."""
    stats = stats_from_sums(sums.sum(1), num_experts)
    return [float(m) if n > 0 else None for m, n in zip(stats["mean_active"], stats["tokens"])]


def summarize(states: Sequence[Optional[dict]]) -> Optional[dict]:
    """Merge tap states (one per process) into the report: ``mean`` / ``std`` over all (token, layer) pairs,
    ``per_layer`` (L,), ``per_bucket`` (buckets,) with their ``timestep_buckets``, ``load`` (L, E),
    ``unrouted_frac``, ``tokens`` (token-layer pairs counted), and ``layers``: every sums-derived METRICS entry
    per layer. None when no state has anything."""
    states = [s for s in states if s]
    if not states:
        return None
    sums = sum(torch.tensor(s["sums"], dtype=torch.float64) for s in states)             # (K, L, S)
    E, K, Tn = states[0]["num_experts"], states[0]["buckets"], states[0]["num_train_timesteps"]
    layers = stats_from_sums(sums.sum(0), E)
    total = stats_from_sums(sums.sum((0, 1)), E)
    return {
        "mean": float(total["mean_active"]),
        "std": float(total["active_std"]),
        "per_layer": layers["mean_active"].tolist(),
        "timestep_buckets": [[b * Tn // K, (b + 1) * Tn // K - 1] for b in range(K)],
        "per_bucket": _means(sums, E),
        "load": layers["load"].tolist(),
        "unrouted_frac": float(total["unrouted_frac"]),
        "tokens": float(total["tokens"]),
        "layers": {k: v.tolist() for k, v in layers.items()},
    }
