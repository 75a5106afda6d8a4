"""Routing decisions, recorded: along a sampling trajectory, or on fixed noisy training inputs.

``RoutingRecorder`` keeps, for every router call of every MoE layer, the experts of each token and the expert
loads. ``trace_routing`` samples a bundle's labels with it attached and returns dense arrays indexed by
(model call, layer, CFG half, image, token) -- what ``dit_moe.analyze`` turns into numbers and plots.
``probe_inputs`` / ``probe_routing`` measure a model on fixed noisy training inputs (the routing study's probe), and
``calibrate_topp_threshold`` bisects a fixed Top-p threshold on them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..config import SampleConfig
from .errors import AnalysisError
from .loop import make_generators, sample_latents
from .settings import guidance_scale, resolve_settings
from .solvers import num_model_calls

if TYPE_CHECKING:
    import torch

    from ..config import ExperimentConfig

__all__ = ["AnalysisError", "RoutingRecorder", "trace_routing", "probe_inputs", "probe_routing",
           "calibrate_topp_threshold"]


def _moe_blocks(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(block index, MoEMLP) of every MoE block, in depth order."""
    from ..models.moe import MoEMLP, moe_layers

    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        found = [(i, b.mlp) for i, b in enumerate(blocks) if isinstance(getattr(b, "mlp", None), MoEMLP)]
    else:
        found = list(enumerate(moe_layers(model)))
    return found


class RoutingRecorder:
    """Forward hooks on every MoE layer's router that keep each call's routing decision on the host.

    Per router call and MoE layer l it stores ``num_active`` (N,) int16 (experts of each token) and the mask's
    per-expert counts over the first ``split`` tokens and over the rest, (2, E) int64 (``split`` = the tokens of the
    conditional half under CFG; None = all tokens in the first row). ``step`` tags the calls with the trajectory
    step they belong to. Use as a context manager; the model is not modified.
    """

    def __init__(self, model: torch.nn.Module):
        found = _moe_blocks(model)
        if not found:
            name = getattr(getattr(model, "model_config", None), "name", type(model).__name__)
            raise AnalysisError(f"{name} is not an MoE model (no MoE layers, no routers): nothing to analyze")
        self.block_index = [i for i, _ in found]
        self.routers = [mlp.router for _, mlp in found]
        self.num_experts = self.routers[0].num_experts
        self.step = 0
        self.split: Optional[int] = None
        self.calls: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in self.routers]
        self._handles = []

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def clear(self) -> None:
        self.calls = [[] for _ in self.routers]

    def _hook(self, layer: int):
        import torch

        def hook(module, inputs, out):
            if getattr(out, "num_active", None) is None or getattr(out, "mask", None) is None:
                raise AnalysisError(f"router {type(module).__name__} of MoE layer {layer} returned no num_active/mask")
            mask = out.mask.detach()
            n = mask.shape[0] if self.split is None else self.split
            counts = torch.stack([mask[:n].sum(0), mask[n:].sum(0)]).to("cpu", torch.int64)
            self.calls[layer].append((self.step, out.num_active.detach().to("cpu", torch.int16), counts))
        return hook

    def __enter__(self) -> "RoutingRecorder":
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def per_layer_mean(self) -> torch.Tensor:
        """Mean activated experts per token of each layer over every recorded call, (L,) float64."""
        import torch

        out = []
        for calls in self.calls:
            if not calls:
                out.append(float("nan"))
                continue
            n = torch.cat([c[1] for c in calls]).to(torch.float64)
            out.append(float(n.mean()))
        return torch.tensor(out, dtype=torch.float64)

    def per_layer_load(self) -> torch.Tensor:
        """Share of (token, expert) assignments per expert of each layer over every recorded call, (L, E)."""
        import torch

        rows = []
        for calls in self.calls:
            c = sum(call[2].sum(0) for call in calls) if calls else torch.zeros(self.num_experts, dtype=torch.int64)
            rows.append(c.to(torch.float64) / max(int(c.sum()), 1))
        return torch.stack(rows)


def trace_routing(bundle, recorder: RoutingRecorder, labels: "torch.Tensor", settings: SampleConfig,
                  seed: int = 0, batch_size: int = 32) -> dict:
    """Sample ``labels`` (in batches) with ``recorder`` attached and gather every model call's routing.

    Returns ``active`` (S, L, 2, Ns, T) int16 -- experts of token t of image n at model call s in layer l, half 0 the
    conditional copy, half 1 the null-class copy (-1 where that call ran unguided: cfg 1 or outside the guidance
    interval) --, ``counts`` (S, L, 2, E) int64 expert loads of each half, ``timesteps`` (S,) network timesteps,
    ``guided`` (S,) bool, ``latents`` (Ns, C, h, w), ``grid`` (h, w) in patches.
    """
    import torch

    model, shape = bundle.model, bundle.shape
    settings = resolve_settings(settings, bundle.objective, shape[0])
    Ns = labels.shape[0]
    T = (shape[1] // model.patch_size) * (shape[2] // model.patch_size)
    S, L, E = num_model_calls(settings), recorder.num_layers, recorder.num_experts
    active = torch.full((S, L, 2, Ns, T), -1, dtype=torch.int16)
    counts = torch.zeros(S, L, 2, E, dtype=torch.int64)
    timesteps: list = []
    guided: list[bool] = []
    latents = []
    with torch.no_grad(), recorder:
        for b0 in range(0, Ns, batch_size):
            idx = list(range(b0, min(b0 + batch_size, Ns)))
            B = len(idx)
            recorder.clear()
            recorder.split = B * T
            seen: list = []

            def callback(i, t, x_in, seen=seen):
                recorder.step = i
                seen.append(t)

            lat = sample_latents(model, labels[idx], make_generators(seed, idx), settings, shape,
                                 device=bundle.device, callback=callback, objective=bundle.objective)
            latents.append(lat.cpu())
            if len(seen) != S:
                raise AnalysisError(f"the {settings.sampler} sampler made {len(seen)} model calls, expected {S}")
            timesteps = seen
            guided = [guidance_scale(settings, float(bundle.objective.noise_level(t))) != 1.0 for t in seen]
            for l, calls in enumerate(recorder.calls):
                if len(calls) != S:
                    raise AnalysisError(f"MoE layer {l}: {len(calls)} router calls for {S} model calls "
                                        "(the trace expects one routed forward per model call)")
                for step, n, c in calls:
                    rows = 2 * B if guided[step] else B
                    if n.numel() != rows * T:
                        raise AnalysisError(f"MoE layer {l}: {n.numel()} routed tokens, expected {rows} images x {T}")
                    n = n.view(rows, T)
                    active[step, l, 0, b0:b0 + B] = n[:B]
                    if guided[step]:
                        active[step, l, 1, b0:b0 + B] = n[B:]
                    counts[step, l] += c
    return {"active": active, "counts": counts, "timesteps": timesteps, "guided": guided,
            "latents": torch.cat(latents), "grid": (shape[1] // model.patch_size, shape[2] // model.patch_size)}


def probe_inputs(cfg: "ExperimentConfig", num_batches: int, batch_size: int, seed: int = 1234):
    """Fixed noisy training inputs [(x_t (B, C, H, W), t (B,), y (B,))]: the same for every arm and seed."""
    import torch

    from ..data import build_dataset
    from ..diffusion import build_objective

    dataset, _ = build_dataset(cfg.data.source, cfg.data.path, flip=False)
    objective = build_objective(cfg, learn_sigma=cfg.model.learn_sigma)   # the arm's objective: ddpm or flow inputs
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        idx = torch.randint(0, len(dataset), (batch_size,), generator=g).tolist()
        items = [dataset[i] for i in idx]
        x0 = torch.stack([x for x, _ in items]).float()
        y = torch.stack([torch.as_tensor(y) for _, y in items]).long()
        x_t, t, _ = objective.draw(x0, generator=g)
        out.append((x_t, t, y))
    return out


def probe_routing(model, inputs) -> dict:
    """Activated experts per (token, layer) of ``model`` on ``inputs`` (eval mode, no CFG): mean, std, per layer.

    The per-token standard deviation is over all (token, layer) pairs, as ``dit_moe.analyze`` reports it for
    the sampling trajectory.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    recorder = RoutingRecorder(model)
    try:
        with torch.no_grad(), recorder:
            for x, t, y in inputs:
                model(x.to(device), t.to(device), y.to(device))
    finally:
        model.train(was_training)
    per_layer = [torch.cat([c[1] for c in calls]).to(torch.float64) for calls in recorder.calls]
    allv = torch.cat(per_layer)
    return {"mean": float(allv.mean()), "std": float(allv.std(unbiased=False)),
            "per_layer": [float(v.mean()) for v in per_layer], "tokens": int(allv.numel())}


def calibrate_topp_threshold(model, inputs, target: float, iters: int = 30, tol: float = 1e-3) -> dict:
    """Bisect one global top-p threshold (set on every Top-p router) so that ``inputs`` activate ``target`` experts.

    Activated experts grow with p (a token keeps experts while the mass before them is below p), so bisection on
    [1e-4, 1] converges. Returns {threshold, measured, per_layer, std}.
    """
    from ..models.routers.topp import TopPRouter

    routers = [m for m in model.modules() if isinstance(m, TopPRouter)]
    if not routers:
        raise AnalysisError("calibration needs a model with fixed Top-p routers (routing.type=topp)")
    original = [r.threshold for r in routers]

    def measure(p: float) -> dict:
        for r in routers:
            r.threshold = p
        return probe_routing(model, inputs)

    try:
        lo, hi = 1e-4, 1.0
        best = None
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            m = measure(mid)
            if best is None or abs(m["mean"] - target) < abs(best[1]["mean"] - target):
                best = (mid, m)
            if abs(m["mean"] - target) <= tol:
                break
            lo, hi = (mid, hi) if m["mean"] < target else (lo, mid)
    finally:
        for r, p in zip(routers, original):
            r.threshold = p
    p, m = best
    return {"threshold": round(p, 6), "measured": m["mean"], "std": m["std"], "per_layer": m["per_layer"],
            "target": target}
