"""Training under expert parallelism (``train.expert_parallel: N``): the dp x ep mesh, what each rank holds and reduces.

The W processes form a 2-D ``DeviceMesh`` of dp = W / N rows and N columns; the ranks of a row are one ep group
(contiguous ranks: on GPUs, those of one node first), the ranks of a column one dp group::

    W = 4, N = 2:      ep group 0 = ranks {0, 1}, ep group 1 = {2, 3};   dp groups {0, 2} and {1, 3}

What each rank holds and how each gradient is reduced (torchtitan's "dp2ep" layout with ddp on the dp side):

* the routed experts of every MoE layer: E / N whole experts (ep rank j holds [j E/N, (j+1) E/N),
  ``ep.shard_model_experts``), the same block as every rank of its dp group. A shard's gradient already sums the
  contributions of the whole ep group's tokens (the all-to-all's backward brings them home); ``reduce_gradients``
  all-reduces it over the dp group and divides by W, which is exactly the ddp average (1 / W) sum over all ranks;
* everything else (attention, adaLN, router, shared experts, Default MoE vectors, embedders): whole on every rank,
  trained by Accelerate's DDP over all W ranks, which is told to ignore the expert shards
  (``_set_params_and_buffers_to_ignore_for_model``): they differ between ep ranks by design, and DDP would otherwise
  broadcast rank 0's at start and average unlike shards;
* AdamW and the EMA see exactly the parameters the rank holds (built after sharding; the EMA is sharded alike and
  updated shard by shard);
* router state (DTop-p controller, Default MoE vectors' EMA inputs, balance biases, statistics) lives in buffers,
  reduced over the whole world by ``routing_step`` as without expert parallelism (``ep.py`` says why that is enough).

Gradient clipping takes the global norm: the replicated gradients' squares (the same on every rank) plus the expert
shards' squares summed over the ep group. Checkpoints are the ddp files (``full_state.FullStateCheckpoints``): each
expert tensor -- weights, EMA, AdamW moments -- is all-gathered over the ep group when saving and cut to the rank's
block when loading, so an ep checkpoint resumes under any N that divides E (or under ddp / fsdp) and one process
samples from it.

Why not torchtitan's ``ExpertParallel`` parallel style (read first): it turns the expert weights into DTensors
sharded on the ep mesh and leaves the dp side to FSDP2 over a "dp_shard_mod_ep" mesh. Here the dp side is ddp, and
plain local tensors keep the model, optimizer, EMA and state-dict code of a ddp run unchanged; DDP's documented
ignore list plus one flat all-reduce per step is all the expert gradients need.

Not supported yet, refused by the config check: ``train.strategy=fsdp`` with expert parallelism (sharding the
replicated part over dp, as torchtitan does, would compose but is not built), fp16 (the gradient scaler's inf check
would run on different expert shards per rank and could skip the step on some ranks only).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from ...config import ConfigError
from ...models.moe import MoEMLP
from ..full_state import FullStateCheckpoints
from .ep import expert_range, shard_model_experts


class ExpertParallel(FullStateCheckpoints):
    """The ep plan of one run over ``accelerator.num_processes`` ranks with ep groups of ``size`` (N)."""

    wraps_ddp = True

    def __init__(self, accelerator, size: int):
        world = accelerator.num_processes
        if size < 2 or size > world or world % size:
            raise ConfigError(f"train.expert_parallel={size} must divide the number of processes ({world}) and be "
                              "between 2 and it")
        self.accelerator, self.size, self.world = accelerator, size, world
        self.mesh = init_device_mesh(accelerator.device.type, (world // size, size), mesh_dim_names=("dp", "ep"))
        self.ep_group, self.dp_group = self.mesh.get_group("ep"), self.mesh.get_group("dp")
        self.ep_rank = dist.get_rank(self.ep_group)
        self.expert_names: set[str] = set()       # state-dict names of the routed experts' parameters
        self._trained: list[nn.Parameter] = []     # the trained model's expert shards (not the EMA's)

    # ----------------------------------------------------------------------------------- sharding
    def shard(self, model: nn.Module) -> nn.Module:
        """Keep this rank's experts of every MoE layer (in place; model and EMA alike); returns ``model``."""
        shard_model_experts(model, self.ep_group)
        self.expert_names = {f"{name}.experts.{p}" for name, m in model.named_modules() if isinstance(m, MoEMLP)
                             for p, _ in m.experts.named_parameters()}
        return model

    def exclude_from_ddp(self, model: nn.Module) -> None:
        """Before ``accelerator.prepare``: DDP leaves the expert shards to ``reduce_gradients``."""
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(self.expert_names))
        self._trained = [p for n, p in model.named_parameters() if n in self.expert_names]

    def describe(self, model: nn.Module) -> str:
        layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
        start, stop = expert_range(layers[0].num_experts, self.size, self.ep_rank)
        held = sum(p.numel() for p in model.parameters())
        experts = sum(p.numel() for n, p in model.named_parameters() if n in self.expert_names)
        full = held + (self.size - 1) * experts
        return (f"expert parallelism: {self.world // self.size} (dp) x {self.size} (ep) mesh; rank "
                f"{self.accelerator.process_index} holds experts [{start}, {stop}) of each of {len(layers)} MoE "
                f"layers, {held / 1e6:.2f}M of {full / 1e6:.2f}M parameters")

    def is_split(self, name: str) -> bool:
        return name in self.expert_names

    # ----------------------------------------------------------------------------------- gradients
    def reduce_gradients(self) -> None:
        """Expert shards' gradients -> the ddp average: sum over the dp group (one flat all-reduce), / W."""
        params = self._trained
        for p in params:
            if p.grad is None:      # no row reached this shard on any rank: ddp's gradient of those experts is 0
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if self.world // self.size > 1:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.dp_group)
            for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)
        torch._foreach_div_(grads, float(self.world))

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """Clip by the global 2-norm (replicated gradients once, expert shards summed over the ep group)."""
        params = [p for p in parameters if p.grad is not None]
        experts = {id(p) for p in self._trained}
        square = lambda grads: (torch.nn.utils.get_total_norm(grads, 2.0).float() ** 2 if grads
                                else torch.zeros((), device=self.accelerator.device))
        shard = square([p.grad for p in params if id(p) in experts])
        dist.all_reduce(shard, group=self.ep_group)
        norm = (square([p.grad for p in params if id(p) not in experts]) + shard).sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    # ----------------------------------------------------------------------------------- full state dicts
    def _whole(self, t: torch.Tensor) -> torch.Tensor:
        """An expert tensor (E/N, ...) of this rank -> (E, ...) of its ep group (every rank of the group calls)."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.ep_group)
        return torch.cat(parts)

    def _part(self, t: torch.Tensor) -> torch.Tensor:
        """(E, ...) -> this rank's block (E/N, ...)."""
        return t.chunk(self.size)[self.ep_rank].clone()

    def full_state(self, module: nn.Module) -> dict:
        sd = {k: (self._whole(v) if k in self.expert_names else v).detach().cpu()
              for k, v in module.state_dict().items()}
        return sd if self.accelerator.is_main_process else {}

    def load_full_state(self, module: nn.Module, sd: dict) -> None:
        module.load_state_dict({k: (self._part(v) if k in self.expert_names else v) for k, v in sd.items()})

    def _optimizer_entries(self, model: nn.Module, osd: dict, convert) -> dict:
        """``osd`` with ``convert`` applied to the expert parameters' moment tensors (ids in parameter order)."""
        names = [n for n, _ in model.named_parameters()]
        state = {}
        for i in sorted(osd["state"]):        # the same order on every rank: the gathers pair up
            expert = names[i] in self.expert_names
            state[i] = {k: (convert(v) if expert and k != "step" and torch.is_tensor(v) and v.dim() else v)
                        for k, v in osd["state"][i].items()}
        return {"state": state, "param_groups": osd["param_groups"]}

    def full_optimizer_state(self, model: nn.Module, optimizer) -> dict:
        osd = self._optimizer_entries(model, optimizer.state_dict(), lambda v: self._whole(v).cpu())
        return osd if self.accelerator.is_main_process else {}

    def load_full_optimizer_state(self, model: nn.Module, optimizer, osd: dict) -> None:
        optimizer.load_state_dict(self._optimizer_entries(model, osd, self._part))
