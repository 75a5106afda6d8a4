"""No device-to-host synchronisation from routing or dispatch on the code path CUDA takes (issue 14.2).

On a GPU a host read of a device value (``.item()``, ``.tolist()``, ``nonzero`` without a static size, ``bincount``
sizing its output, boolean indexing) stalls the CPU until the GPU queue drains. The grouped-matmul path needs none
for Top-k (with or without a balance bias) and expert choice (both have a static number of pairs), and one per MoE
layer for the threshold routers (their number of pairs is data-dependent). This test
forces that path on the CPU (``USE_GROUPED_MM = True``) and records, with a TorchDispatchMode, every aten op that
forces such a read on CUDA, plus Python-level copies of tensors to lists or NumPy (which bypass the dispatcher).

Where the one sync of a threshold router is, and why: ``RouterOutput.from_mask`` reads the number of selected
(token, expert) pairs M = mask.sum() to the host (``int(counts.sum())``, one ``_local_scalar_dense``) because
``nonzero_static`` and every buffer after it ((M, D) gathered tokens, grouped_mm's (M, H) activations) need M as a
Python int; without it each token would have to be padded to E experts. Expert choice needs none: M = E C is
known from the shapes. Backward and ``routing_step`` (controller, Default MoE vectors, balance bias, statistics)
read nothing. ``test_every_router_at_most_one_sync_per_moe_layer`` attributes each sync to the MoE layer whose
forward made it and asserts the bound for every router and option; on a GPU, benchmarks/gpu_check.py runs
tests/test_cuda.py, which checks Top-k with ``torch.cuda.set_sync_debug_mode("error")``.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dit_moe.models.moe as moe_mod
from dit_moe.config import ModelConfig, RoutingConfig
from dit_moe.models.dit import DiT
from dit_moe.models.moe import build_controller, build_moe_mlp, collect_aux_loss, routing_step

# aten ops that read a device value on the host (or size their output from one) when run on CUDA
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "argwhere", "masked_select",
            "bincount", "histc", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
            "nonzero_numpy", "masked_scatter"}


class SyncRecorder(TorchDispatchMode):
    """Records the aten ops (and tensor -> Python copies) that synchronise with the device."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self.syncs.append(name)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and func._overloadname == "Tensor":
            self.syncs.append("repeat_interleave without output_size")
        elif name in ("index", "index_put", "index_put_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.syncs.append(f"{name} with a boolean mask")
        return func(*args, **kwargs)


@pytest.fixture
def record(monkeypatch):
    monkeypatch.setattr(moe_mod, "USE_GROUPED_MM", True)          # the path CUDA takes
    recorder = SyncRecorder()
    for method in ("tolist", "numpy", "cpu"):                     # they bypass the dispatcher on CPU tensors
        original = getattr(torch.Tensor, method)

        def wrapped(self, *a, _original=original, _name=method, **kw):
            recorder.syncs.append(f"Tensor.{_name}")
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, method, wrapped)
    return recorder


def _moe_mlp(cfg, shared=0, dim=16, experts=4):
    torch.manual_seed(0)
    mc = ModelConfig(expert_hidden_ratio=2.0, num_shared_experts=shared)
    controller = build_controller(cfg, experts, 2, 1)
    moe = build_moe_mlp(dim, 0, experts, 2, mc, cfg, controller)
    moe.controller_ref = controller                              # keep the controller alive (no model owns it)
    return moe.train()


def _tiny_dit(cfg, depth=2, shared=0):
    mc = ModelConfig(expert_hidden_ratio=2.0, num_shared_experts=shared)
    controller = build_controller(cfg, 4, 2, depth)
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=4, num_classes=10,
                mlp_factory=lambda i: build_moe_mlp(32, i, 4, 2, mc, cfg, controller))
    if controller is not None:
        model.routing_controller = controller
    return model.train()


def _dit_step(model):
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.randint(0, 1000, (3,), generator=g), torch.randint(0, 10, (3,), generator=g)
    out = model(x, t, y)
    (out.square().mean() + collect_aux_loss(model)[0]).backward()


def _mlp_step(moe):
    x = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (moe(x).square().mean() + collect_aux_loss(moe)[0]).backward()


def _count(record, step, module):
    step(module)                                                  # warm-up: the one-off grouped_mm probe
    routing_step(module)
    record.syncs.clear()
    with record:
        step(module)
        routing_step(module)                                      # controller, Default MoE, statistics
    return list(record.syncs)


TOPK_CASES = {
    "topk": RoutingConfig(type="topk"),
    "topk_renorm_shared": RoutingConfig(type="topk", renormalize=True),
    "topk_default_moe": RoutingConfig(type="topk", default_moe=True, default_mode="forward"),
    "topk_balance_bias": RoutingConfig(type="topk", balance_bias=True),
    "expert_choice": RoutingConfig(type="expert_choice"),
    "expert_choice_batch_renorm_default_moe": RoutingConfig(type="expert_choice", ec_pool="batch", renormalize=True,
                                                            default_moe=True),
}


@pytest.mark.parametrize("case", sorted(TOPK_CASES))
def test_topk_moe_mlp_forward_backward_has_no_host_sync(case, record):
    moe = _moe_mlp(TOPK_CASES[case], shared=1 if "shared" in case else 0)
    assert moe_mod._grouped_mm_available(moe.experts, torch.device("cpu"), torch.float32)
    assert _count(record, _mlp_step, moe) == []


@pytest.mark.parametrize("cfg", [RoutingConfig(type="topk"), RoutingConfig(type="topk", balance_bias=True),
                                 RoutingConfig(type="expert_choice")], ids=["topk", "topk_bias", "expert_choice"])
def test_static_routers_tiny_dit_forward_backward_has_no_host_sync(cfg, record):
    assert _count(record, _dit_step, _tiny_dit(cfg)) == []


@pytest.mark.parametrize("rtype", ["topp", "dtopp"])
def test_threshold_routers_sync_once_per_moe_layer(rtype, record):
    """One host read per layer and forward: the number of pairs, in RouterOutput.from_mask."""
    assert _count(record, _mlp_step, _moe_mlp(RoutingConfig(type=rtype))) == ["_local_scalar_dense"]
    depth = 3
    assert _count(record, _dit_step, _tiny_dit(RoutingConfig(type=rtype, default_moe=True), depth=depth)) == \
        ["_local_scalar_dense"] * depth
    biased = RoutingConfig(type=rtype, balance_bias=True)
    assert _count(record, _dit_step, _tiny_dit(biased, depth=depth)) == ["_local_scalar_dense"] * depth


def test_recorder_catches_what_it_should(record):
    """The recorder itself: the old dispatch (host sizes from counts.tolist()) and typical sync ops are caught."""
    t = torch.tensor([0, 2, 1, 2])
    with record:
        t.tolist()
        int(t.sum())
        torch.bincount(t)
        t[t > 0]
        torch.nonzero_static(t, size=3)                           # static size: no sync
        torch.repeat_interleave(t, t, output_size=5)              # static size: no sync
    assert record.syncs == ["Tensor.tolist", "_local_scalar_dense", "bincount", "index with a boolean mask"]


def test_routing_tap_sums_add_no_host_sync(record):
    """The sampling meter (a RoutingTap keeping sums per bucket, class and patch) reads nothing to the host."""
    from dit_moe.models.routing_tap import RoutingTap

    model = _tiny_dit(RoutingConfig(type="expert_choice")).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 999]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        model(x, t, y)                                            # warm-up: the grouped_mm probe
        with RoutingTap(model, by_class=True, by_patch=True) as tap:
            model(x, t, y)                                        # the patch sums are sized on the first call
            record.syncs.clear()
            with record:
                model(x, t, y)
    assert record.syncs == []
    assert tap.sums[..., 1].sum() == 2 * 3 * 16 * 2             # calls x samples x tokens x layers


class LayerSyncs:
    """Attributes each recorded sync to the MoE layer whose forward was running (None: outside every layer)."""

    def __init__(self, record, model):
        self.record, self.current, self.per_layer, self.outside = record, None, {}, []
        self.handles = []
        for i, layer in enumerate(moe_mod.moe_layers(model)):
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)))
            self.handles.append(layer.register_forward_hook(lambda m, a, o: self._leave()))

    def _flush(self):
        target = self.outside if self.current is None else self.per_layer.setdefault(self.current, [])
        target.extend(self.record.syncs)
        self.record.syncs.clear()

    def _enter(self, i):
        self._flush()
        self.current = i

    def _leave(self):
        self._flush()
        self.current = None

    def count(self, step, model):
        step(model)                                               # warm-up: the one-off grouped_mm probe
        routing_step(model)
        self.record.syncs.clear()
        with self.record:
            step(model)                                           # forward + backward
            routing_step(model)
        self._flush()
        for h in self.handles:
            h.remove()
        return self.per_layer, self.outside


ALL_ROUTER_CASES = {
    "topk_shared_renorm": RoutingConfig(type="topk", renormalize=True),
    "topk_bias_default_moe": RoutingConfig(type="topk", balance_bias=True, default_moe=True),
    "topp_kmax_default_moe": RoutingConfig(type="topp", k_max=3, default_moe=True, default_mode="grad_only"),
    "topp_bias": RoutingConfig(type="topp", balance_bias=True),
    "dtopp_layer_scope_kmax": RoutingConfig(type="dtopp", scope="layer", k_max=3),
    "dtopp_bias_default_moe": RoutingConfig(type="dtopp", balance_bias=True, default_moe=True),
    "expert_choice_batch_pool": RoutingConfig(type="expert_choice", ec_pool="batch", default_moe=True),
    "expert_choice_sample_pool_cf2": RoutingConfig(type="expert_choice", capacity_factor=2.0),
}


@pytest.mark.parametrize("case", sorted(ALL_ROUTER_CASES))
def test_every_router_at_most_one_sync_per_moe_layer(case, record):
    """Bound for every router: <= 1 host read per MoE layer and forward (threshold routers: exactly the pair count
    in from_mask), 0 for the static ones (Top-k, expert choice), 0 in backward and in routing_step."""
    cfg = ALL_ROUTER_CASES[case]
    depth = 3
    model = _tiny_dit(cfg, depth=depth, shared=1 if "shared" in case else 0)
    per_layer, outside = LayerSyncs(record, model).count(_dit_step, model)
    assert outside == [], f"syncs outside the MoE layers' forwards (backward, routing_step, DiT): {outside}"
    assert all(len(v) <= 1 for v in per_layer.values()), per_layer
    expected = ["_local_scalar_dense"] if cfg.type in ("topp", "dtopp") else []
    assert [per_layer.get(i, []) for i in range(depth)] == [expected] * depth, per_layer


def test_layer_attribution_sees_the_segment_loop_syncs(record, monkeypatch):
    """The bound is not vacuous: the CPU segment loop reads the sizes to the host (counts.tolist()) and exceeds it."""
    monkeypatch.setattr(moe_mod, "USE_GROUPED_MM", False)
    model = _tiny_dit(RoutingConfig(type="topp"), depth=2)
    per_layer, outside = LayerSyncs(record, model).count(_dit_step, model)
    assert outside == [] and all(len(per_layer[i]) > 1 and "Tensor.tolist" in per_layer[i] for i in range(2)), \
        per_layer
