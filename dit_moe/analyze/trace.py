"""Routing decisions along a checkpoint's own sampling trajectory, read by one ``RoutingTap``.

``trace_routing`` samples a bundle's labels with a tap attached (dit_moe/models/routing_tap.py, the toolkit's one
reader of router outputs). Every number of the analysis report comes from the tap's running sums -- by timestep
bucket, by class (the null class row: the CFG copies) and by model call -- through ``stats_from_sums``, the same
definitions training and sampling report with. The tap also keeps per-call records of every token's experts, used
only where a plot needs single images or tokens: the spatial maps and the per-image spread of the per-class bars.
"""
from __future__ import annotations

import torch

from ..config import SampleConfig
from ..models.routing_tap import RoutingTap, num_sums
from ..sampling.loop import make_generators, sample_latents
from ..sampling.settings import guidance_scale, resolve_settings
from ..sampling.solvers import num_model_calls
from .errors import AnalysisError

__all__ = ["trace_routing"]


def trace_routing(bundle, labels: torch.Tensor, settings: SampleConfig, seed: int = 0, batch_size: int = 32,
                  num_buckets: int = 10) -> dict:
    """Sample ``labels`` (in batches) with a RoutingTap attached; its sums and per-call records over all batches.

    Returns the tap's sums (float64, CPU; S = ``num_sums(E)`` columns of ``token_stats``): ``bucket_sums``
    (num_buckets, L, S) by network timestep bucket, ``class_sums`` (num_classes + 1, L, S) by requested class (last
    row: the null-class copies of CFG), ``call_sums`` (calls, L, S) by model call; and ``active`` (calls, L, Ns, T)
    int16 experts of token t of image n in layer l at each model call, conditional half only (for the spatial maps
    and per-image spread); ``timesteps`` (calls,) network timesteps, ``guided`` (calls,) bool, ``latents``
    (Ns, C, h, w), ``grid`` (h, w) in patches, ``num_experts`` and ``moe_blocks`` (the DiT block of each MoE
    layer). AnalysisError for a model without routers.
    """
    model, shape = bundle.model, bundle.shape
    try:
        tap = RoutingTap(model, buckets=num_buckets, records=True, by_class=True, by_call=True)
    except ValueError as e:
        raise AnalysisError(f"{e}: nothing to analyze") from None
    blocks = list(getattr(model, "blocks", []))
    moe_blocks = [next((i for i, b in enumerate(blocks) if any(m is r for m in b.modules())), l)
                  for l, r in enumerate(tap.routers)]
    settings = resolve_settings(settings, bundle.objective, shape[0])
    Ns = labels.shape[0]
    T = (shape[1] // model.patch_size) * (shape[2] // model.patch_size)
    S, L, E = num_model_calls(settings), tap.num_layers, tap.num_experts
    active = torch.full((S, L, Ns, T), -1, dtype=torch.int16)
    zeros = lambda n: torch.zeros(n, L, num_sums(E), dtype=torch.float64)  # noqa: E731
    bucket_sums, class_sums, call_sums = zeros(num_buckets), zeros(tap.null_class + 1), zeros(S)
    timesteps: list = []
    guided: list[bool] = []
    latents = []
    with torch.no_grad(), tap:
        for b0 in range(0, Ns, batch_size):
            idx = list(range(b0, min(b0 + batch_size, Ns)))
            B = len(idx)
            tap.reset()
            seen: list = []
            lat = sample_latents(model, labels[idx], make_generators(seed, idx), settings, shape,
                                 device=bundle.device, callback=lambda i, t, x_in: seen.append(t),
                                 objective=bundle.objective)
            latents.append(lat.cpu())
            if len(seen) != S or tap.call_sums.shape[0] != S:
                raise AnalysisError(f"the {settings.sampler} sampler made {len(seen)} model calls "
                                    f"({tap.call_sums.shape[0]} routed), expected {S}")
            timesteps = seen
            guided = [guidance_scale(settings, float(bundle.objective.noise_level(t))) != 1.0 for t in seen]
            for l, calls in enumerate(tap.records):
                if len(calls) != S:
                    raise AnalysisError(f"MoE layer {l}: {len(calls)} router calls for {S} model calls "
                                        "(the trace expects one routed forward per model call)")
                for call in calls:
                    step, n = call["call"], call["active"]
                    null = call["y"] == tap.null_class
                    if n.shape != ((2 * B if guided[step] else B), T) or int(null.sum()) != (B if guided[step] else 0):
                        raise AnalysisError(f"MoE layer {l}: routed {tuple(n.shape)} (images, tokens) with "
                                            f"{int(null.sum())} null-class copies at model call {step}, expected "
                                            f"{B} images x {T} tokens (doubled under guidance)")
                    active[step, l, b0:b0 + B] = n[~null]
            bucket_sums += tap.sums.cpu()
            class_sums += tap.class_sums.cpu()
            call_sums += tap.call_sums.cpu()
    return {"bucket_sums": bucket_sums, "class_sums": class_sums, "call_sums": call_sums, "active": active,
            "timesteps": timesteps, "guided": guided, "latents": torch.cat(latents),
            "grid": (shape[1] // model.patch_size, shape[2] // model.patch_size), "num_experts": E,
            "moe_blocks": moe_blocks}
