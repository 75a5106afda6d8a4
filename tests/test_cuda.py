"""CUDA-only checks (marker ``cuda``; skipped without a GPU). ``benchmarks/gpu_check.py`` runs them on a GPU machine.

    pytest -m cuda tests/test_cuda.py

- the grouped_mm expert path against the segment loop, fp32 and bf16, outputs and every gradient;
- no device-to-host synchronisation in a Top-k (and expert-choice) forward + backward + routing_step, enforced by
  ``torch.cuda.set_sync_debug_mode("error")`` (the CPU test tests/test_host_syncs.py records the same on CPU);
- compiled blocks against eager on the GPU;
- a few bf16 training steps of each router through the trainer (flow objective: no diffusers needed).
Tolerances: fp32 rtol 1e-4 (grouped_mm and mm may split the reduction differently, no TF32); bf16 1e-2 of the
largest magnitude (8 mantissa bits, accumulation order differs between the two kernels).
"""
import pytest
import torch
import torch.nn.functional as F

import dit_moe.models.moe as moe_mod
from dit_moe.config import ModelConfig, RoutingConfig, load_config
from dit_moe.models.experts import ExpertBank
from dit_moe.models.moe import build_moe_mlp, collect_aux_loss, routing_step
from dit_moe.registry import build_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICE = "cuda"


def _close(a, b, dtype, what):
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")
    else:
        scale = b.float().abs().max().clamp(min=1e-6)
        err = (a.float() - b.float()).abs().max()
        assert err <= 1e-2 * scale, f"{what}: max error {err:.3g} vs max magnitude {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_grouped_mm_matches_segment_loop(kind, dtype):
    if not hasattr(F, "grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no F.grouped_mm")
    torch.manual_seed(0)
    bank = ExpertBank(8, 128, 256, kind).to(DEVICE)
    try:
        bank.grouped_runs(torch.device(DEVICE), dtype)
    except RuntimeError as err:               # the toolkit then takes the segment loop for this dtype (moe.py)
        pytest.skip(f"grouped_mm cannot run {dtype} on {torch.cuda.get_device_name()}: {err}")
    counts = torch.tensor([40, 0, 17, 64, 3, 100, 1, 31], device=DEVICE)      # an empty expert, odd sizes
    expert_idx = torch.repeat_interleave(torch.arange(8, device=DEVICE), counts)
    x = torch.randn(int(counts.sum()), 128, device=DEVICE, dtype=dtype)
    gy = torch.randn(x.shape[0], 128, device=DEVICE, dtype=dtype)
    results = {}
    for grouped in (True, False):
        xi = x.clone().requires_grad_(True)
        bank.zero_grad(set_to_none=True)
        y = bank(xi, sizes=None if grouped else tuple(counts.tolist()), counts=counts, expert_idx=expert_idx,
                 grouped=grouped)
        y.backward(gy)
        results[grouped] = (y.detach(), xi.grad, {n: p.grad.clone() for n, p in bank.named_parameters()})
    (yg, gxg, gpg), (ys, gxs, gps) = results[True], results[False]
    assert yg.dtype == dtype
    _close(yg, ys, dtype, "output")
    _close(gxg, gxs, dtype, "grad x")
    for n in gps:
        _close(gpg[n], gps[n], dtype, f"grad {n}")


def test_moe_mlp_grouped_matches_segment_under_bf16_autocast(monkeypatch):
    torch.manual_seed(0)
    moe = build_moe_mlp(128, 0, 8, 2, ModelConfig(), RoutingConfig(type="topk"), None).to(DEVICE).train()
    x = torch.randn(4, 64, 128, device=DEVICE)
    out = {}
    for grouped in (True, False):
        monkeypatch.setattr(moe_mod, "USE_GROUPED_MM", grouped)
        xi = x.clone().requires_grad_(True)
        moe.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = moe(xi)
        (y.float().square().mean() + collect_aux_loss(moe)[0]).backward()
        out[grouped] = (y.detach(), xi.grad, {n: p.grad.clone() for n, p in moe.named_parameters()})
    assert out[True][0].dtype == torch.bfloat16
    _close(out[True][0], out[False][0], torch.bfloat16, "output")
    _close(out[True][1], out[False][1], torch.bfloat16, "grad x")
    for n in out[False][2]:
        _close(out[True][2][n], out[False][2][n], torch.bfloat16, f"grad {n}")


def _tiny_dit(cfg):
    torch.manual_seed(0)
    return build_model("DiT-T/2-E8K2", cfg, input_size=8, in_channels=4, num_classes=10).to(DEVICE).train()


def _step(model):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(4, 4, 8, 8, device=DEVICE, generator=g)
    t = torch.randint(0, 1000, (4,), device=DEVICE, generator=g)
    y = torch.randint(0, 10, (4,), device=DEVICE, generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, y)
    (out.float().square().mean() + collect_aux_loss(model)[0]).backward()
    routing_step(model)


@pytest.mark.parametrize("cfg", [RoutingConfig(type="topk"), RoutingConfig(type="topk", balance_bias=True),
                                 RoutingConfig(type="topk", default_moe=True), RoutingConfig(type="expert_choice")],
                         ids=["topk", "topk_bias", "topk_default_moe", "expert_choice"])
def test_static_routers_have_no_host_sync_on_cuda(cfg):
    model = _tiny_dit(cfg)
    _step(model)                                  # warm-up: the one-off grouped_mm probe, lazy CUDA init
    assert any(ok for (dev, *_), ok in moe_mod._grouped_mm_ok.items() if dev == "cuda"), \
        f"grouped_mm did not run here: {moe_mod._grouped_mm_ok}"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_sync_debug_mode_catches_the_threshold_routers_one_sync():
    """Not vacuous: Top-p's one read per layer (the pair count) raises under the same mode."""
    model = _tiny_dit(RoutingConfig(type="topp"))
    _step(model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            _step(model)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_compiled_blocks_match_eager_on_cuda():
    import copy

    from dit_moe.models.compile import compile_blocks

    eager = _tiny_dit(RoutingConfig(type="topk"))
    compiled = compile_blocks(copy.deepcopy(eager))
    x = torch.randn(4, 4, 8, 8, device=DEVICE)
    t, y = torch.tensor([1, 10, 500, 999], device=DEVICE), torch.tensor([0, 1, 2, 10], device=DEVICE)
    outs = []
    for m in (eager, compiled):
        torch.manual_seed(0)
        outs.append(m(x, t, y))
        (outs[-1].square().mean() + collect_aux_loss(m)[0]).backward()
    _close(outs[1], outs[0], torch.float32, "output")
    grads = dict(eager.named_parameters())
    for n, p in compiled.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.parametrize("rtype", ["topk", "topp", "dtopp", "expert_choice"])
def test_bf16_training_steps_of_each_router(tmp_path, rtype):
    import json

    from accelerate.state import AcceleratorState, GradientState

    from dit_moe.training import train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cfg = load_config(None, [
        "model.name=DiT-T/2-E8K2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
        f"routing.type={rtype}", "data.source=builtin", "diffusion.objective=flow", "model.learn_sigma=false",
        f"train.run_dir={tmp_path}", "train.run_name=bf16", "train.tracker=null", "train.mixed_precision=bf16",
        "train.global_batch_size=64", "train.steps=6", "train.log_every=2", "train.ckpt_every=1000",
        "sample.steps=2", "sample.num_per_class=1"])
    run = train(cfg)
    log = (run / "log.txt").read_text()
    assert "precision bf16" in log and "device cuda" in log, log[-2000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(l == l and l < 10 for l in losses), losses
