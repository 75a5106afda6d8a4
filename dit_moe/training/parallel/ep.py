"""Expert parallelism: a MoE layer's experts sharded over an "ep" process group, its routed tokens sent by all-to-all.

With an ep group of N processes, process j of the group holds experts [j E/N, (j+1) E/N) of every MoE layer (the
stacked expert weights sliced on dim 0; E divisible by N) and everything else whole. Each process routes its own
tokens with its own (replicated) router, exactly as without expert parallelism, and ``AllToAllDispatcher`` -- the
layer's ``MoEMLP.dispatcher`` -- carries the routed pairs to their experts and the outputs back:

    1. the router's pairs are sorted by expert (``RouterOutput``), and experts are assigned to processes in
       contiguous blocks, so the (M, D) gathered tokens are already sorted by destination process: no sort here;
    2. the per-expert counts (E,) are exchanged with one all-to-all of the (N, E/N) count matrix, so every process
       learns how many rows each source sends to each of its local experts; the split sizes are read to the host
       once (one synchronisation per layer, the same one the segment loop needs anyway);
    3. the hidden states are sent with ``all_to_all_single`` and uneven splits (a threshold router's M is
       data-dependent; a split may be 0, and a process may receive nothing);
    4. the received rows (source-major: per source, per local expert) are permuted to expert-major and run by the
       local ``ExpertBank`` through ``moe.run_experts`` -- the path the single-process layer runs (grouped_mm where
       it runs, else the segment loop);
    5. the outputs are permuted back and returned with the reverse all-to-all, in the caller's pair order, so the
       layer's fp32 combine, aux losses, Default MoE term and statistics run locally and unchanged.

Dropless for every router (all pairs travel; no capacity). Router state stays global as without expert
parallelism: routers run on every process on its tokens; ``routing_step`` all-reduces the routing sums over the
whole world. Default MoE's per-expert output sums are taken where the pairs' outputs come back (the token's own
process, over all E experts), so that one world all-reduce also gives every process every expert's EMA input.

Gradients: the two all-to-alls are autograd nodes (their backward is the reverse all-to-all), so an expert shard's
gradient on process j sums the contributions of every process's tokens routed to it; router and input gradients
are those of the process's own tokens. Reducing the expert gradients over the data-parallel replicas of the same
shard (and the other gradients over all processes) is the training plan's job (``ep_train.py``).

Which collective (evaluated 2026-12-07 on torch 2.14 and gloo with 2 processes, uneven splits with a 0 split and an
empty input, fp64: both give the exact rows forward and the exact reverse-routed gradients backward):
  * ``torch.distributed._functional_collectives.all_to_all_single`` -- the functional collective, autograd-aware
    since ``all_to_all_single_autograd`` became its alias (what torchtitan calls). Used here, waited on at once
    (``wait_tensor``) so the caller gets a plain tensor, and also for the count exchange (long, no autograd).
  * ``torch.distributed.nn.functional.all_to_all_single`` -- also correct on gloo, but deprecated in torch 2.14
    (a FutureWarning points to the functional collective), so not used.

torchtitan (torchtitan/models/common/token_dispatcher.py, ``AllToAllTokenDispatcher``) was read first. Reused in
spirit: the count exchange as an all-to-all of the (N, E/N) count matrix, the host split lists, the source-major
to expert-major permutation and its inverse, experts in contiguous blocks per rank. Not reused directly: it is bound
to its Config / DeviceMesh / spmd_types stack, takes Top-k's fixed (T, K) expert-id and score matrices (our routers
emit a flat, variable-length pair list, and expert choice picks tokens per expert), and scores the outputs in its
combine (ours combines in fp32 in ``MoEMLP`` for every router, so the dispatcher only moves and runs rows).

Contract for the caller. Every process of an ep group must run every MoE layer's forward (and, in training, its
backward) the same number of times in the same order, also with an empty local batch: each is a collective. That
holds for a model whose blocks all run (gradient checkpointing recomputes the forward in the same order on every
process). ``shard_experts`` replaces the bank's parameters, so the optimizer, DDP/FSDP and the EMA copy must be
built from the sharded model; a deepcopy (the EMA model) shares the dispatcher and its process group.

Training wires this in ``ep_train.ExpertParallel`` (``train.expert_parallel``): the dp x ep mesh, gradient
reduction, clipping and checkpoints.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from ...config import ConfigError
from ...models.experts import ExpertBank, compute_dtype
from ...models.moe import MoEMLP, moe_layers, run_experts

__all__ = ["AllToAllDispatcher", "expert_range", "shard_experts", "shard_model_experts"]


def expert_range(num_experts: int, group_size: int, group_rank: int) -> tuple[int, int]:
    """[start, stop) of the experts held by ``group_rank`` of an ep group of ``group_size``; E must divide evenly."""
    if group_size < 1 or num_experts % group_size:
        raise ConfigError(f"expert parallelism over {group_size} processes needs a number of experts divisible by "
                          f"{group_size}; the model has {num_experts} experts per MoE layer")
    n = num_experts // group_size
    return group_rank * n, (group_rank + 1) * n


def _slice_bank(bank: ExpertBank, start: int, stop: int) -> ExpertBank:
    """A new ExpertBank of experts [start, stop) of ``bank``: copies of those weight slices (new parameters)."""
    with torch.device("meta"):              # no init: it would draw from the global RNG, which the run's noise uses
        local = ExpertBank(stop - start, bank.dim, bank.hidden, bank.kind)
    local = local.to_empty(device=bank.w_in.device).to(dtype=bank.w_in.dtype)
    with torch.no_grad():
        for name, p in local.named_parameters():
            p.copy_(getattr(bank, name)[start:stop])
    return local


def shard_experts(layer: MoEMLP, group: dist.ProcessGroup | None = None) -> None:
    """Keep this process's block of ``layer``'s routed experts and install the all-to-all dispatcher.

    ``group``: the ep process group (None: the default group). The routed bank's parameters are REPLACED (new
    tensors of E/N experts): shard before building the optimizer. Shared experts, router and Default MoE vectors
    stay whole. Every process of the group must call it with the same, identically initialised layer.
    """
    if layer.dispatcher is not None:
        raise RuntimeError("this MoE layer is already expert-parallel")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    start, stop = expert_range(layer.num_experts, size, rank)
    layer.experts = _slice_bank(layer.experts, start, stop)
    layer.dispatcher = AllToAllDispatcher(layer.num_experts, group)


def shard_model_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """``shard_experts`` on every MoE layer of ``model``; returns the number of layers. A dense model is an error."""
    layers = moe_layers(model)
    if not layers:
        raise ConfigError("expert parallelism needs a MoE model (a name like DiT-S/2-E8K2); this model is dense")
    for layer in layers:
        shard_experts(layer, group)
    return len(layers)


class AllToAllDispatcher:
    """``MoEMLP.dispatcher`` for an ep group: (M, D) expert-sorted pairs -> (M, D) outputs from the owning processes.

    ``num_experts`` E: the layer's routed experts (global); process j of ``group`` holds [j E/N, (j+1) E/N).
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None):
        self.group = group
        self._group = dist.group.WORLD if group is None else group     # the functional collectives need a group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.start, self.stop = expert_range(num_experts, self.size, self.rank)
        self.num_experts, self.num_local = num_experts, self.stop - self.start

    def __deepcopy__(self, memo):
        return self             # no tensors; a copied model (the EMA) talks to the same process group

    def __call__(self, experts: ExpertBank, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """experts: this process's shard (E/N experts); xs (M, D) sorted by global expert; counts (E,) per expert."""
        if experts.num_experts != self.num_local:
            raise ValueError(f"the expert bank holds {experts.num_experts} experts, the ep shard {self.num_local}")
        N, e = self.size, self.num_local
        # The bank casts its input to the autocast dtype (bf16) anyway: sent in it, the rows take half the bytes and
        # give the same numbers, forward and backward.
        xs = xs.to(compute_dtype(xs))
        send = counts.view(N, e)                                  # (N, e): rows to each process, per its expert
        recv = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, self._group))   # (N, e): from each
        host = torch.cat([send.sum(1), recv.sum(1), recv.sum(0)]).tolist()    # the one host read of this layer
        send_splits, recv_splits, sizes = host[:N], host[N:2 * N], tuple(host[2 * N:])     # sizes: per local expert
        total = sum(recv_splits)
        xr = self._exchange(xs, recv_splits, send_splits)                         # (R, D) source-major
        order = _source_to_expert_major(recv, total)                              # (R,) expert-major -> source row
        local_counts = recv.sum(0)                                                # (e,) device
        local_idx = torch.repeat_interleave(torch.arange(e, device=xs.device), local_counts, output_size=total)
        ye = run_experts(experts, xr.index_select(0, order), local_counts, local_idx, sizes)   # (R, D)
        inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
        return self._exchange(ye.index_select(0, inverse), send_splits, recv_splits)         # (M, D)

    def _exchange(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """(sum in_splits, D) -> (sum out_splits, D): rows in_splits[j] go to process j; autograd-aware."""
        return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), out_splits, in_splits, self._group))


def _source_to_expert_major(recv: torch.Tensor, total: int) -> torch.Tensor:
    """(R,) row indices that reorder received rows from source-major to expert-major order.

    ``recv`` (N, e): rows from source s for local expert i; ``total`` R = its sum. The rows arrive as source 0's
    rows for local experts 0..e-1, then source 1's, ...; the bank needs expert 0's rows from sources 0..N-1, then
    expert 1's, ... (the sender's order kept inside each (source, expert) block). Output row p of block (i, s) is
    input row start(s, i) + (p - start of block (i, s) in the output).
    """
    flat = recv.flatten()
    in_start = (flat.cumsum(0) - flat).view_as(recv).t().reshape(-1)             # (e N,) block starts, expert-major
    lengths = recv.t().reshape(-1)
    block = torch.repeat_interleave(torch.arange(lengths.numel(), device=recv.device), lengths, output_size=total)
    out_start = lengths.cumsum(0) - lengths
    return in_start[block] + torch.arange(total, device=recv.device) - out_start[block]
