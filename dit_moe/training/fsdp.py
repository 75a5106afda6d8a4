"""FSDP2 training (``train.strategy=fsdp``): parameters, gradients, AdamW states and the EMA sharded over the ranks.

Sharding plan (torchtitan's): every ``DiTBlock`` is one ``fully_shard`` unit -- its attention, adaLN, router and
stacked expert weights (E, D, H), each sharded on dim 0, so with E >= world size every rank holds whole experts --
and the root unit holds the embedders and the final layer. Each unit is all-gathered just before its forward,
freed after it (``reshard_after_forward``) and gathered again for its backward; gradients are reduce-scattered
(averaged) per unit, so no rank ever holds more than one block's full gradients. The EMA copy is sharded the same
way and updated shard by shard; it is gathered only to be saved or to draw the sample grid.

Why ``fully_shard`` by hand rather than Accelerate's FSDP plugin (accelerate 1.15, ``fsdp_version=2``):
  * ``Accelerator(cpu=True)`` ignores the plugin (a CPU run is ``MULTI_CPU`` and never becomes
    ``DistributedType.FSDP``), so that path could neither run nor be tested on CPU / gloo;
  * its ``save_state`` writes ``pytorch_model_fsdp.bin`` and an optimizer state keyed by parameter names, and pickles
    registered objects as they are (a sharded EMA): not the files a ddp run writes.
The model therefore bypasses ``accelerator.prepare`` (which would wrap it in DDP); the optimizer, data loader and
schedule still go through it, and a checkpoint is written by ``full_state.FullStateCheckpoints`` with Accelerate's
own ``save_accelerator_state`` and ``save_custom_state`` from full state dicts gathered to rank 0
(``torch.distributed.checkpoint.state_dict``), so its folder holds exactly the files of a ddp run
(``model.safetensors`` with the unsharded names and shapes, ``optimizer.bin`` with integer parameter ids, the EMA in
``custom_checkpoint_0.pkl``, ...): a ddp checkpoint resumes under fsdp and back.

Router state needs nothing here: it lives in buffers, which FSDP does not shard, and ``routing_step`` all-reduces
it explicitly as under ddp. fully_shard refuses 0-d parameters (DTop-p's DRN ``log_scale``): while sharded they are
(1,) parameters, and the full state dicts give them back their () shape. Mixed precision is Accelerate's ddp
semantics (fp32 sharded master weights, autocast around the forward, outputs cast to fp32); fp16 (GradScaler) is
refused by the config check.
"""
from __future__ import annotations


import torch
import torch.nn as nn
from accelerate.utils import convert_outputs_to_fp32
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from .full_state import FullStateCheckpoints


# Set once this process has sharded a model over several ranks. torch 2.14's FSDP2 keeps the gloo/NCCL process
# group reachable after ``destroy_process_group`` (DTensor's sharding caches hold the DeviceMesh, which holds the
# group; measured: 13 threads left after a 2-rank CPU training run, 2 after the same run under ddp), so the group is
# torn down only during interpreter finalization, where a rank can abort ("terminate called without an active
# exception", seen once in CI after a finished run). ``dit_moe.cli`` reads this to end such a process without that
# teardown.
_sharded_over_processes = False


def sharded_over_processes() -> bool:
    """True once this process has sharded a model over more than one rank (see ``_sharded_over_processes``)."""
    return _sharded_over_processes


def _is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (the tensor itself when it is not sharded)."""
    return t.to_local() if _is_dtensor(t) else t


class Sharding(FullStateCheckpoints):
    """The FSDP2 plan of one run: the device mesh, which modules are sharded, and the 0-d parameters' names."""

    def __init__(self, accelerator):
        global _sharded_over_processes

        self.accelerator = accelerator
        self.mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        if accelerator.num_processes > 1:
            _sharded_over_processes = True
        self.scalars: set[str] = set()         # names of 0-d parameters stored as (1,) while sharded

    # ----------------------------------------------------------------------------------- sharding
    def shard(self, model: nn.Module) -> nn.Module:
        """fully_shard every DiT block, then the root (in place); returns ``model``."""
        self.scalars |= _reshape_scalars(model)
        for block in model.blocks:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=True)
        fully_shard(model, mesh=self.mesh)      # the root: None lets FSDP keep it gathered between fwd and bwd
        return model

    def describe(self, model: nn.Module) -> str:
        """One log line: units, this rank's share of the parameters, what a stacked expert weight became."""
        total = sum(p.numel() for p in model.parameters())
        mine = sum(local(p).numel() for p in model.parameters())
        line = (f"fsdp: {len(model.blocks) + 1} units sharded over {self.accelerator.num_processes} ranks; rank "
                f"{self.accelerator.process_index} holds {mine / 1e6:.2f}M of {total / 1e6:.2f}M parameters")
        experts = next((p for n, p in model.named_parameters() if n.endswith("experts.w_in")), None)
        if experts is not None:
            line += f"; stacked experts {tuple(experts.shape)} -> {tuple(local(experts).shape)} on this rank"
        return line

    def with_autocast(self, model: nn.Module) -> nn.Module:
        """Accelerate's mixed precision for an unprepared model: autocast around forward, outputs cast to fp32."""
        if self.accelerator.mixed_precision == "no":
            return model

        inner, autocast = model.forward, self.accelerator.autocast

        def forward(*args, **kwargs):
            with autocast():
                return inner(*args, **kwargs)

        model.forward = convert_outputs_to_fp32(forward)   # FSDP's hooks sit on __call__: they still run
        return model

    # ----------------------------------------------------------------------------------- gradients
    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """Clip the sharded gradients by their global 2-norm (torchtitan's recipe); returns that norm."""
        params = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if _is_dtensor(norm):
            norm = norm.full_tensor()           # the per-rank partial norms, reduced
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    # ----------------------------------------------------------------------------------- full state dicts
    def full_state(self, module: nn.Module) -> dict:
        """The module's full state dict on rank 0 (CPU tensors, the unsharded names and shapes); {} on other ranks.

        Every rank must call it (it all-gathers)."""
        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: (v.reshape(()) if k in self.scalars else v) for k, v in sd.items()}

    def load_full_state(self, module: nn.Module, sd: dict) -> None:
        """Load a full state dict (the same on every rank) into the sharded ``module``: each rank keeps its shard."""
        sd = {k: (v.reshape(1) if k in self.scalars else v) for k, v in sd.items()}
        set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True, strict=True))

    def full_optimizer_state(self, model: nn.Module, optimizer) -> dict:
        """The optimizer's full state on rank 0, keyed like ``optimizer.state_dict()`` of the unsharded model
        (integer ids in ``model.parameters()`` order, one group): what a ddp run saves. {} on other ranks."""
        osd = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not osd:
            return {}
        ids = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        state = {ids[name]: {k: (v.reshape(()) if name in self.scalars and torch.is_tensor(v) and v.dim() == 1
                                 and k != "step" else v) for k, v in s.items()}
                 for name, s in osd["state"].items()}
        groups = [{**g, "params": [ids[name] for name in g["params"]]} for g in osd["param_groups"]]
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_full_optimizer_state(self, model: nn.Module, optimizer, osd: dict) -> None:
        """Load an integer-keyed full optimizer state (every rank reads the same file) into the sharded optimizer."""
        names = [name for name, _ in model.named_parameters()]
        state = {names[i]: {k: (v.reshape(1) if names[i] in self.scalars and torch.is_tensor(v) and v.dim() == 0
                                and k != "step" else v) for k, v in s.items()}
                 for i, s in osd["state"].items()}
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))
        for group, saved in zip(optimizer.param_groups, osd["param_groups"]):   # as saved (betas stay a tuple),
            group.update({k: v for k, v in saved.items() if k != "params"})      # like Optimizer.load_state_dict


def _reshape_scalars(model: nn.Module) -> set[str]:
    """Replace every 0-d parameter by a (1,) parameter with the same value (fully_shard refuses 0-d ones); returns
    their names. Forwards that broadcast them (DTop-p's ``log_scale.exp() * logits``) compute the same numbers."""
    names = set()
    for mod_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                setattr(module, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
                names.add(f"{mod_name}.{name}" if mod_name else name)
    return names
