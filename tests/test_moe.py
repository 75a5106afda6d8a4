"""MoE-MLP dispatch against a dense masked reference, Default MoE, accumulators and checkpointing."""
import copy

import pytest
import torch

import dit_moe.models.moe as moe_mod
from dit_moe.config import ModelConfig, RoutingConfig
from dit_moe.models.default_moe import DefaultVectors
from dit_moe.models.dit import DiT
from dit_moe.models.moe import (ExpertBank, MoEMLP, build_controller, build_moe_mlp, collect_aux_loss, moe_layers,
                                routing_step)
from dit_moe.models.routers import ThresholdController, TopKRouter, TopPRouter

D, E = 12, 6


def _expert_outputs(bank: ExpertBank, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token: (N, D) -> (E, N, D), straight from the stacked weights."""
    h = torch.einsum("nd,edh->enh", x, bank.w_in)
    if bank.b_in is not None:
        h = h + bank.b_in[:, None]
    y = torch.einsum("enh,ehd->end", bank.activation(h), bank.w_out)
    return y + bank.b_out[:, None] if bank.b_out is not None else y


def _dense_reference(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """y = sum_e w_te E_e(x_t) (+ shared) (+ default term), computing every expert on every token and masking."""
    r = moe.router
    probs = r.probs(r.logits(x))
    mask, _ = r.select(probs)
    w = probs * mask
    if r.renormalize:
        w = w / w.sum(1, keepdim=True)
    y = torch.einsum("ne,end->nd", w.to(x.dtype), _expert_outputs(moe.experts, x))
    if moe.shared is not None:
        y = y + _expert_outputs(moe.shared, x)[0]
    if moe.default_vectors is not None:
        y = y + moe.default_vectors.term(probs, mask).to(x.dtype)
    return y


def _make(router, kind="gelu", shared=False, default=None, hidden=20):
    torch.manual_seed(0)
    moe = MoEMLP(D, router, ExpertBank(E, D, hidden, kind), ExpertBank(1, D, 8, kind) if shared else None, default)
    with torch.no_grad():  # same gate for every test model; non-zero biases so that a bias bug cannot hide
        moe.router.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(5)))
        for name, p in moe.named_parameters():
            if name.endswith(("b_in", "b_out")):
                p.normal_(0, 0.1)
    return moe


def _grads(module, x, fn):
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


CASES = {
    "topk": lambda: _make(TopKRouter(D, E, top_k=2)),
    "topk_renorm_swiglu": lambda: _make(TopKRouter(D, E, top_k=3, renormalize=True), kind="swiglu"),
    "topp_variable": lambda: _make(TopPRouter(D, E, threshold=0.6)),
    "topk_shared": lambda: _make(TopKRouter(D, E, top_k=2), shared=True),
    "dtopp_default_forward": lambda: _make(_dtopp_router(), default=_random_default("forward")),
}


def _dtopp_router():
    ctrl = ThresholdController(E, target=2, num_layers=1)
    ctrl.threshold.fill_(0.55)
    r = moe_mod.DTopPRouter(D, E, ctrl, layer=0)
    r._keep_alive = ctrl  # plain attribute: the test owns no model to hold the controller
    return r


def _random_default(mode):
    d = DefaultVectors(E, D, mode=mode)
    d.vectors.normal_(generator=torch.Generator().manual_seed(3))
    return d


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("grouped", [False, True])
def test_dispatch_matches_dense_reference(case, grouped, monkeypatch):
    # fp64 for the segment loop; torch's CPU grouped_mm exists for fp32 only, checked at fp32 tolerance.
    dtype, tol = (torch.float32, 1e-5) if grouped else (torch.float64, 1e-10)
    monkeypatch.setattr(moe_mod, "USE_GROUPED_MM", grouped)
    moe = CASES[case]().to(dtype)
    if grouped and not moe_mod._grouped_mm_available(moe.experts, torch.device("cpu"), dtype):
        pytest.skip("this torch build has no CPU grouped_mm")
    x = torch.randn(40, D, dtype=dtype, generator=torch.Generator().manual_seed(1))
    out, gx, gp = _grads(moe, x, lambda t: moe(t))
    ref, rgx, rgp = _grads(moe, x, lambda t: _dense_reference(moe, t))
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, rgx, rtol=tol, atol=tol)
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], rtol=tol, atol=tol, msg=name)
    assert gp["router.weight"].abs().sum() > 0
    if case == "topp_variable":
        m = moe.router(x).num_active
        assert m.min() < m.max()


@pytest.mark.parametrize("hidden", [12, 38, 16])
def test_grouped_mm_probes_the_real_shape_and_falls_back(hidden, monkeypatch):
    """Issue 13.4: grouped_mm needs rows that are a multiple of 16 bytes (bf16 hidden 12 or 38 are not; CPU grouped_mm
    enforces the same rule). The probe runs the bank's own shapes, so those widths take the segment loop instead of
    raising, and aligned widths (16) keep the grouped path."""
    monkeypatch.setattr(moe_mod, "USE_GROUPED_MM", True)
    monkeypatch.setattr(moe_mod, "_grouped_mm_ok", {})
    bank = ExpertBank(E, 16, hidden, "gelu")
    moe = MoEMLP(16, TopKRouter(16, E, top_k=2), bank).to(torch.bfloat16)
    moe.router.float()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).requires_grad_(True)
    moe(x).float().square().sum().backward()
    aligned = hidden * 2 % 16 == 0
    assert moe_mod._grouped_mm_ok == {("cpu", torch.bfloat16, "gelu", E, 16, hidden): aligned}
    # whichever path ran, it matches the segment loop
    got = moe(x)
    monkeypatch.setattr(moe_mod, "USE_GROUPED_MM", False)
    torch.testing.assert_close(got, moe(x), rtol=2e-2, atol=2e-2)


def test_grouped_mm_probe_first_reached_under_inference_mode(monkeypatch):
    """Sampling may be the first caller: the probe's backward must not fail there and disable the grouped path."""
    monkeypatch.setattr(moe_mod, "USE_GROUPED_MM", True)
    monkeypatch.setattr(moe_mod, "_grouped_mm_ok", {})
    moe = MoEMLP(16, TopKRouter(16, E, top_k=2), ExpertBank(E, 16, 32, "gelu"))
    with torch.inference_mode():
        moe(torch.randn(10, 16))
    assert list(moe_mod._grouped_mm_ok.values()) == [True]


def _capture_expert_outputs(moe):
    """Forward hook storing the (M, D) expert outputs of the last call."""
    store = {}
    moe.experts.register_forward_hook(lambda mod, inp, out: store.__setitem__("ys", out))
    return store


@pytest.mark.parametrize("grouped", [False, True])
def test_bf16_autocast_combines_in_fp32_and_rounds_once(grouped, monkeypatch):
    """Issue 13.5: under bf16 autocast the weighted expert outputs (and shared / default terms) are summed in fp32
    and cast once, so the output is the bf16 rounding of the exact (fp64) combination of the bf16 expert outputs:
    within half a bf16 ulp. Summing in bf16 rounds every partial sum (errors of several ulps with 6 experts)."""
    monkeypatch.setattr(moe_mod, "USE_GROUPED_MM", grouped)
    moe = _make(TopKRouter(D, E, top_k=E), shared=True, default=_random_default("forward"), hidden=16)
    store = _capture_expert_outputs(moe)
    shared_out = {}
    moe.shared.register_forward_hook(lambda mod, inp, out: shared_out.__setitem__("y", out))
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16
    r = moe.router(x)
    exact = torch.zeros(256, D, dtype=torch.float64).index_add_(
        0, r.token_idx, store["ys"].double() * r.weight.double().unsqueeze(1))
    exact += shared_out["y"].double() + moe.default_vectors.term(r.probs, r.mask).double()
    err = (y.double() - exact).abs()
    half_ulp = exact.abs().clamp(min=1e-30).log2().floor().exp2() * 2.0 ** -8
    assert (err <= half_ulp * (1 + 1e-3) + 1e-6).all(), f"max error {(err / half_ulp).max():.2f} half-ulps"


def test_expert_with_zero_tokens():
    moe = _make(TopKRouter(D, E, top_k=2)).double()
    with torch.no_grad():
        moe.router.weight[3] = -5.0          # with positive tokens expert 3 always has the lowest logit
    x = torch.rand(30, D, dtype=torch.float64) + 0.1
    assert moe.router(x).sizes[3] == 0
    out, gx, gp = _grads(moe, x, lambda t: moe(t))
    ref, rgx, rgp = _grads(moe, x, lambda t: _dense_reference(moe, t))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rgx)
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], msg=name)
    # the idle expert's slice has a zero (not missing) gradient: DDP sees every parameter used
    assert gp["experts.w_in"][3].abs().sum() == 0 and gp["experts.w_in"].abs().sum() > 0


def test_fp32_router_under_autocast():
    moe = _make(TopKRouter(D, E, top_k=2))
    x = torch.randn(2, 5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
        r = moe.router(x.reshape(-1, D))
    assert out.shape == (2, 5, D)
    assert r.probs.dtype == torch.float32 and r.weight.dtype == torch.float32
    assert moe.router.weight.dtype == torch.float32


# ------------------------------------------------------------------ Default MoE

def _probs_grad(moe, x):
    """Gradient of a loss w.r.t. the router probabilities (N, E)."""
    captured = {}
    original = moe.router.probs

    def probs(logits):
        p = original(logits)
        p.retain_grad()
        captured["p"] = p
        return p
    moe.router.probs = probs
    moe(x).pow(2).sum().backward()
    del moe.router.probs
    return captured["p"].grad


def test_default_moe_gives_router_gradient_for_every_expert():
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(2))
    plain = _make(TopKRouter(D, E, top_k=2, lb_coef=0.0))
    g_plain = _probs_grad(plain, x)
    mask = plain.router(x).mask
    assert (g_plain[~mask] == 0).all(), "plain top-k: no gradient for non-selected experts"
    for mode in ("grad_only", "forward"):
        dm = _make(TopKRouter(D, E, top_k=2, lb_coef=0.0), default=_random_default(mode))
        g = _probs_grad(dm, x)
        assert (g != 0).all(), f"{mode}: every expert's probability gets a gradient"
        assert dm.default_vectors.vectors.grad is None


def test_grad_only_forward_equals_plain_routing_and_forward_mode_adds_term():
    x = torch.randn(20, D)
    plain = _make(TopKRouter(D, E, top_k=2))
    dm = _make(TopKRouter(D, E, top_k=2), default=_random_default("grad_only"))
    assert torch.equal(plain(x), dm(x))
    fwd = _make(TopKRouter(D, E, top_k=2), default=_random_default("forward"))
    r = fwd.router(x)
    expected = plain(x) + (r.probs * ~r.mask) @ fwd.default_vectors.vectors
    torch.testing.assert_close(fwd(x), expected)
    zero = _make(TopKRouter(D, E, top_k=2), default=DefaultVectors(E, D, mode="forward"))
    assert torch.equal(plain(x), zero(x)), "forward mode with zero vectors equals top-k"


def test_default_vectors_ema_update_matches_formula():
    moe = _make(TopKRouter(D, E, top_k=2), default=_random_default("grad_only"))
    with torch.no_grad():
        moe.router.weight[4] = -5.0
    beta = moe.default_vectors.beta
    old = moe.default_vectors.vectors.clone()
    xs = [torch.rand(16, D) + 0.1, torch.rand(24, D) + 0.1]            # two micro-batches, one optimizer step
    moe.train()
    sums, counts = torch.zeros(E, D), torch.zeros(E)
    for x in xs:
        moe(x)
        with torch.no_grad():
            mask = moe.router(x).mask
            outs = _expert_outputs(moe.experts, x)                    # (E, N, D)
            sums += torch.einsum("ne,end->ed", mask.float(), outs)
            counts += mask.sum(0)
    routing_step(moe)
    assert counts[4] == 0
    expected = beta * old + (1 - beta) * sums / counts.clamp(min=1)[:, None]
    expected[counts == 0] = old[counts == 0]                          # no token: unchanged
    torch.testing.assert_close(moe.default_vectors.vectors, expected)
    assert moe.routing_acc.abs().sum() == 0, "accumulators reset after the step"


# ------------------------------------------------------------------ model integration

def _dit(routing_cfg, grad_checkpointing=False, model_cfg=None, depth=2):
    mc = model_cfg or ModelConfig()
    ctrl = build_controller(routing_cfg, 4, 2, depth)
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=4, num_classes=10,
                grad_checkpointing=grad_checkpointing,
                mlp_factory=lambda i: build_moe_mlp(32, i, 4, 2, mc, routing_cfg, ctrl))
    if ctrl is not None:
        model.routing_controller = ctrl
    return model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 8, 8, generator=g), torch.randint(0, 1000, (3,), generator=g), torch.randint(0, 10, (3,), generator=g)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_does_not_double_count(use_reentrant, monkeypatch):
    cfg = RoutingConfig(type="dtopp", default_moe=True)
    accs = []
    for ckpt in (False, True):
        model = _dit(cfg, grad_checkpointing=ckpt)
        if ckpt and use_reentrant:
            import torch.utils.checkpoint as cp
            monkeypatch.setattr("dit_moe.models.dit.checkpoint",
                                lambda fn, *a, use_reentrant=False: cp.checkpoint(fn, *a, use_reentrant=True))
        model.train()
        x, t, y = _batch()
        x.requires_grad_(True)
        out = model(x, t, y, force_drop_ids=torch.zeros(3, dtype=torch.long))
        total, _ = collect_aux_loss(model)
        (out.square().mean() + total).backward()
        accs.append(torch.cat([m.routing_acc for m in moe_layers(model)]))
        grads = {n: p.grad for n, p in model.named_parameters()}
        if ckpt:
            assert all(grads[n] is not None for n in grads if "router" in n)
    assert accs[0][1] == 3 * 16, "tokens counted once per forward"
    torch.testing.assert_close(accs[0], accs[1])


def test_init_weights_survive_dit_xavier_and_meta_construction():
    cfg = RoutingConfig(type="topk")
    model = _dit(cfg, model_cfg=ModelConfig(num_shared_experts=1))
    gate = model.blocks[0].mlp.router.weight
    # kaiming_uniform(a=sqrt(5)) bound is 1/sqrt(D); xavier for (E, D) would be sqrt(6/(E+D)) ~ 0.41
    assert gate.abs().max() <= 1 / 32 ** 0.5 + 1e-6
    with torch.device("meta"):
        m = build_moe_mlp(384, 3, 8, 2, ModelConfig(expert_kind="swiglu", num_shared_experts=2),
                          RoutingConfig(type="dtopp", default_moe=True),
                          build_controller(RoutingConfig(type="dtopp"), 8, 2, 4))
    n = sum(p.numel() for p in m.parameters())
    assert n == 8 * 384 + 1 + 8 * 3 * 384 * 1536 + 3 * 384 * 1536  # gate, DRN scale, routed, one fused shared


def test_deepcopy_and_aux_collection_in_dit():
    model = _dit(RoutingConfig(type="dtopp", default_moe=True))
    model.train()
    out = model(*_batch())
    total, terms = collect_aux_loss(model)
    assert set(terms) == {"lb", "entropy"} and total.requires_grad
    assert torch.isclose(total, terms["lb"] + terms["entropy"])
    ema = copy.deepcopy(model)                        # after a forward: the stored graph tensor is not copied
    assert all(b.mlp.router.controller is ema.routing_controller for b in ema.blocks)
    assert ema.blocks[0].mlp.last_aux_loss is None
    assert out.shape == (3, 8, 8, 8)


def test_logit_std_stat_per_layer():
    """Issue 13.5: the per-layer spread of the raw router logits (mean over tokens of their std over experts)."""
    model = _dit(RoutingConfig(type="dtopp"))
    model.train()
    seen = []
    for b in model.blocks:
        b.mlp.router.register_forward_hook(lambda mod, inp, out: seen.append(out.logits.std(1, correction=0).mean()))
    model(*_batch())
    stats = routing_step(model)
    torch.testing.assert_close(stats["logit_std"], torch.stack(seen).detach())
    assert (stats["logit_std"] > 0).all()


def test_routing_step_reduces_once_and_reports_stats():
    model = _dit(RoutingConfig(type="dtopp", default_moe=True))
    model.train()
    for seed in range(2):
        model(*_batch(seed))
    calls = []

    def fake_all_reduce(t):
        calls.append(t.shape)
        return t * 2                                  # what a SUM over two identical ranks would give
    stats = routing_step(model, fake_all_reduce)
    assert len(calls) == 1 and calls[0][0] == sum(m.routing_acc.numel() for m in moe_layers(model))
    assert stats["mean_active"].shape == (2,) and stats["load"].shape == (2, 4)
    assert stats["active_hist"].shape == (2, 5)
    torch.testing.assert_close(stats["active_hist"].sum(1), torch.ones(2))
    torch.testing.assert_close(stats["load"].sum(1), torch.ones(2))
    assert stats["threshold"].shape == (1,) and stats["drn_scale"].shape == (2,)
    assert (stats["mean_active"] >= 1).all()
    assert torch.isclose(stats["measured"][0], stats["mean_active"].mean())


def test_checkpoints_of_the_previous_format_load_and_their_drn_scale_is_projected_on_the_first_step():
    """Router and controller state-dict keys are those the toolkit wrote before the controller rework (no new
    persistent buffers: saturation counters are non-persistent), so old checkpoints load strictly. An old run's DRN
    scale beyond today's bound is kept for eval (the model samples as it was trained) and projected by the first
    routing_step of a resumed run."""
    import math

    cfg = RoutingConfig(type="dtopp", default_moe=True)
    model = _dit(cfg)
    keys = sorted(k for k in model.state_dict() if "router" in k or "routing_controller" in k or "default_vectors" in k)
    assert keys == ['blocks.0.mlp.default_vectors.vectors', 'blocks.0.mlp.router.log_scale', 'blocks.0.mlp.router.weight',
                    'blocks.1.mlp.default_vectors.vectors', 'blocks.1.mlp.router.log_scale', 'blocks.1.mlp.router.weight',
                    'routing_controller.error', 'routing_controller.integral', 'routing_controller.measured',
                    'routing_controller.threshold']
    state = model.state_dict()
    state["blocks.0.mlp.router.log_scale"] = torch.tensor(math.log(2.8))
    state["routing_controller.threshold"] = torch.tensor([0.99])
    fresh = _dit(cfg)
    fresh.load_state_dict(state)
    router = fresh.blocks[0].mlp.router
    assert router.scale().item() == pytest.approx(2.8)
    fresh.train()
    fresh(*_batch())
    routing_step(fresh)
    assert router.scale().item() == pytest.approx(math.exp(router.log_scale_max), rel=1e-6) and router.scale().item() < 2.8


def _previous_routed(layer: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """MoEMLP's forward as written before the expert dispatcher hook (kept verbatim as the pin), (N, D) -> (N, D)."""
    r = layer.router(x, 1, scores=layer.router.scores(x))
    xs = x.index_select(0, r.token_idx)
    grouped = moe_mod._grouped_mm_available(layer.experts, x.device, moe_mod.compute_dtype(x))
    ys = layer.experts(xs, None if grouped else r.sizes, r.counts, r.expert_idx, grouped=grouped)
    acc = torch.promote_types(r.weight.dtype, torch.float32)
    y = torch.zeros(x.shape[0], layer.dim, dtype=acc, device=x.device).index_add(
        0, r.token_idx, ys.to(acc) * r.weight.to(acc).unsqueeze(1))
    if layer.shared is not None:
        y = y + layer.shared(x, (x.shape[0],)).to(acc)
    if layer.default_vectors is not None:
        y = y + layer.default_vectors.term(r.probs, r.mask).to(acc)
    return y.to(ys.dtype)


PIN_CASES = {**CASES,
             "expert_choice": lambda: _make(moe_mod.ExpertChoiceRouter(D, E, top_k=2)),
             "topk_default_bias": lambda: _make(TopKRouter(D, E, top_k=2, balance_bias=True),
                                                default=_random_default("forward"))}


@pytest.mark.parametrize("case", sorted(PIN_CASES))
def test_local_dispatch_is_bit_identical_to_the_previous_code(case):
    """The dispatch refactor (``run_experts``, the ``dispatcher`` hook) changes no bit on CPU, for every router: the
    layer's output, input gradient and every parameter gradient are torch.equal to the code it replaced, with no
    dispatcher and with a dispatcher that runs the same bank locally (the hook's contract: pairs in, outputs out)."""
    moe = PIN_CASES[case]().train()
    if moe.router.balance_bias is not None:
        moe.router.balance_bias.copy_(torch.linspace(-0.05, 0.05, E))
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(1))
    ref = _grads(moe, x, lambda t: _previous_routed(moe, t))
    runs = {"none": _grads(moe, x, lambda t: moe(t))}
    moe.dispatcher = lambda bank, xs, counts: moe_mod.run_experts(bank, xs, counts,
                                                                  torch.repeat_interleave(counts))
    runs["local hook"] = _grads(moe, x, lambda t: moe(t))
    for how, (out, gx, gp) in runs.items():
        assert torch.equal(out, ref[0]) and torch.equal(gx, ref[1]), how
        for name, g in gp.items():
            assert torch.equal(g, ref[2][name]), (how, name)
