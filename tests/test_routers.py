"""Routers: selection rules, weights, DRN, aux losses and the DTop-p PI controller."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from dit_moe.config import ModelConfig, RoutingConfig
from dit_moe.models.moe import build_controller, build_moe_mlp, collect_aux_loss, routing_step, routing_stats
from dit_moe.models.routers import (DTopPRouter, ThresholdController, TopKRouter, TopPRouter, load_balance_loss,
                                    top_p_mask)
from dit_moe.models.routers.dtopp import drn_scale_bound, margin_threshold, standard_normal_threshold


def _tokens(n=64, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ selection

def test_topk_picks_exactly_k_and_raw_weights():
    torch.manual_seed(0)
    r = TopKRouter(16, 8, top_k=3)
    out = r(_tokens())
    assert (out.num_active == 3).all() and out.token_idx.numel() == 64 * 3
    top = out.probs.topk(3, dim=1).indices
    assert torch.equal(out.mask, torch.zeros_like(out.mask).scatter_(1, top, True))
    # Weights are the raw softmax probabilities (DiT-MoE: no renormalisation), pairs sorted by expert.
    assert torch.allclose(out.weight, out.probs[out.token_idx, out.expert_idx])
    assert (out.expert_idx.diff() >= 0).all()
    assert out.sizes == tuple(out.mask.sum(0).tolist()) == tuple(out.counts.tolist())


def test_topk_renormalisation_sums_to_one():
    torch.manual_seed(0)
    out = TopKRouter(16, 8, top_k=2, renormalize=True)(_tokens())
    sums = torch.zeros(64).index_add_(0, out.token_idx, out.weight)
    assert torch.allclose(sums, torch.ones(64), atol=1e-6)


@pytest.mark.parametrize("p", [0.05, 0.4, 0.75, 0.99])
def test_topp_minimal_prefix_reaching_p(p):
    torch.manual_seed(0)
    probs = torch.randn(200, 8).mul(2).softmax(1)
    mask, _ = top_p_mask(probs, p)
    m = mask.sum(1)
    assert (m >= 1).all()
    sorted_probs = probs.sort(1, descending=True).values
    reached = sorted_probs.cumsum(1).gather(1, (m - 1).unsqueeze(1)).squeeze(1)
    before = reached - sorted_probs.gather(1, (m - 1).unsqueeze(1)).squeeze(1)
    assert (reached >= p - 1e-6).all(), "the selection must reach p"
    assert (before < p).all(), "one expert fewer must not reach p (minimal prefix)"
    # the selection is the m most probable experts
    assert ((probs * mask).sum(1) == reached).all() or torch.allclose((probs * mask).sum(1), reached)
    if p > 0.3:
        assert m.min() < m.max(), "a spread of probabilities must give a variable expert count"


def test_topp_never_zero_experts_and_k_max_cap():
    probs = torch.full((4, 8), 1 / 8)
    mask, capped = top_p_mask(probs, 1e-9)
    assert (mask.sum(1) == 1).all() and not capped.any()
    mask, capped = top_p_mask(probs, 0.99, k_max=3)
    assert (mask.sum(1) == 3).all() and capped.all()
    # a constant distribution selects ceil(p E) experts (spec 6: "dtopp with a constant pi selects the expected m")
    mask, _ = top_p_mask(probs, 0.3)
    assert (mask.sum(1) == 3).all()


def test_topp_router_raw_weights_and_renormalised():
    torch.manual_seed(0)
    x = _tokens()
    out = TopPRouter(16, 8, threshold=0.5)(x)
    assert torch.allclose(out.weight, out.probs[out.token_idx, out.expert_idx])
    r = TopPRouter(16, 8, threshold=0.5, renormalize=True)
    out = r(x)
    assert torch.allclose(torch.zeros(64).index_add_(0, out.token_idx, out.weight), torch.ones(64), atol=1e-6)


# ------------------------------------------------------------------ DTop-p router

def _dtopp(num_layers=1, scope="global", **kw):
    ctrl = ThresholdController(8, target=2, num_layers=num_layers, scope=scope, **kw)
    return ctrl, [DTopPRouter(16, 8, ctrl, layer=i) for i in range(num_layers)]


def test_drn_invariant_to_constant_shift_and_scale_gets_gradient():
    torch.manual_seed(0)
    _, (r,) = _dtopp()
    with torch.no_grad():
        r.log_scale.fill_(0.7)
    z = torch.randn(32, 8)
    shift = torch.randn(32, 1) * 5
    assert torch.allclose(r.probs(z), r.probs(z + shift), atol=1e-5)
    # per-token standardisation also removes a positive rescaling of the logits
    assert torch.allclose(r.probs(z), r.probs(3 * z), atol=1e-5)
    r.train()
    out = r(_tokens(n=32))
    (out.weight.pow(2).sum() + out.aux_loss).backward()
    assert r.log_scale.grad is not None and r.log_scale.grad.abs() > 0
    assert r.weight.grad.abs().sum() > 0


def test_drn_scale_projected_not_clamped_and_comes_back_from_its_bound():
    """Issue 13.1: theta driven onto its bound by an optimizer must move back once the loss pushes it inward
    (a clamp inside scale() passed a zero gradient at the bound, freezing theta there for good)."""
    _, (r,) = _dtopp()
    hi = r.log_scale_max
    with torch.no_grad():
        r.log_scale.fill_(10.0)
    assert torch.isclose(r.scale(), torch.tensor(10.0).exp()), "no clamp in the forward"
    r.clamp_scale_()
    assert r.log_scale.item() == pytest.approx(hi)
    opt = torch.optim.Adam([r.log_scale], lr=0.05)
    for sign, steps in ((-1.0, 200), (1.0, 100)):          # sharpen (outward) then flatten (inward)
        for _ in range(steps):
            opt.zero_grad()
            (sign * r.scale()).backward()
            assert r.log_scale.grad.abs() > 0, "theta on its bound still gets its gradient"
            opt.step()
            r.clamp_scale_()
        if sign < 0:
            assert r.log_scale.item() == pytest.approx(hi)
    assert r.log_scale.item() < hi - 1.0, "theta must come back from the bound"
    assert r.log_scale.item() >= r.log_scale_min


def test_drn_scale_bound_closed_form_sufficient_and_tight():
    """At s = s_max even a one-hot token still takes 2 experts at the bound's threshold; 5% sharper it takes 1."""
    E, p = 8, margin_threshold(0.99)
    assert p == pytest.approx(0.9802, abs=1e-4)
    s_max = drn_scale_bound(E, 2.0, p)
    assert s_max == pytest.approx(math.sqrt(E - 1) / E * math.log((E - 1) * p / (1 - p)), rel=1e-9)
    one_hot = torch.full((1, E), -1.0)
    one_hot[0, 0] = 1.0
    _, (r,) = _dtopp()
    for scale, experts in ((s_max * 0.999, 2), (s_max * 1.05, 1)):
        with torch.no_grad():
            r.log_scale.fill_(math.log(scale))
        mask, _ = top_p_mask(r.probs(one_hot.double()), p)
        assert mask.sum().item() == experts
    # no standardised logit vector is more peaked than the one-hot shape: random ones take >= 2 experts at s_max
    with torch.no_grad():
        r.log_scale.fill_(math.log(s_max))
    z = torch.randn(20000, E, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 3
    assert (top_p_mask(r.probs(z), p)[0].sum(1) >= 2).all()
    # the default bound: p_max 0.99 with the odds halved
    assert r.log_scale_max == pytest.approx(math.log(s_max))
    assert drn_scale_bound(E, 1.0, p) == math.inf and drn_scale_bound(E, 2.0, 1.0) == math.inf


@pytest.mark.parametrize("E,target", [(8, 3.0), (6, 4.0), (16, 3.0), (8, 4.5)])
def test_drn_scale_bound_worst_shape_is_two_valued(E, target):
    """For k = ceil(target) > 2 the bound maximises the top-(k-1) mass over three- and two-valued standardised
    shapes; an adversarial search (gradient ascent from many random starts) finds nothing more peaked."""
    p = 0.98
    s = drn_scale_bound(E, target, p)
    j = math.ceil(target) - 1
    z = torch.randn(512, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(600):
        std, mean = torch.std_mean(z, 1, correction=0, keepdim=True)
        mass = (s * (z - mean) / std).softmax(1).topk(j, 1).values.sum(1)
        opt.zero_grad()
        (-mass.sum()).backward()
        opt.step()
    assert mass.max().item() <= p + 1e-6
    assert mass.max().item() > p - 1e-3, "the search reaches the bound: it is tight"


def test_dtopp_reads_threshold_at_call_time():
    torch.manual_seed(0)
    ctrl, (r,) = _dtopp()
    x = _tokens()
    ctrl.threshold.fill_(0.01)
    assert (r(x).num_active == 1).all()
    # What model.to(...) does: buffers replaced by new tensors; the router must see the new one.
    ctrl._apply(lambda t: t.clone())
    ctrl.threshold.fill_(0.999)
    assert r(x).num_active.float().mean() > 4


def test_dtopp_layer_scope_reads_own_entry():
    ctrl, routers = _dtopp(num_layers=2, scope="layer")
    assert ctrl.threshold.shape == (2,)
    ctrl.threshold.copy_(torch.tensor([0.01, 0.999]))
    x = _tokens()
    assert (routers[0](x).num_active == 1).all()
    assert routers[1](x).num_active.float().mean() > 4


# ------------------------------------------------------------------ aux losses

def test_load_balance_equals_coefficient_under_perfect_balance():
    probs = torch.full((64, 8), 1 / 8)
    counts = torch.full((8,), 16)
    assert torch.isclose(load_balance_loss(probs, counts), torch.tensor(1.0))
    r = TopKRouter(16, 8, top_k=2, lb_coef=0.01)
    r.train()
    assert torch.isclose(r.aux_losses(probs, counts)["lb"], torch.tensor(0.01))
    # variable k: f_i = E count_i / sum_t m_t still gives the coefficient
    assert torch.isclose(load_balance_loss(probs, torch.full((8,), 23)), torch.tensor(1.0))
    # imbalance costs more
    skew = torch.zeros(64, 8)
    skew[:, 0] = 1
    assert load_balance_loss(skew, torch.tensor([64, 0, 0, 0, 0, 0, 0, 0])) > 1


def test_aux_loss_only_in_training_and_dense_model_gives_zero():
    torch.manual_seed(0)
    r = TopPRouter(16, 8, entropy_coef=1e-3)
    r.train()
    out = r(_tokens())
    assert set(out.aux_terms) == {"lb", "entropy"} and out.aux_loss.requires_grad
    r.eval()
    assert r(_tokens()).aux_loss.item() == 0.0
    total, terms = collect_aux_loss(nn.Sequential(nn.Linear(4, 4)))
    assert total.item() == 0.0 and terms == {}


# ------------------------------------------------------------------ PI controller

def test_controller_sign_both_ways_and_clamps():
    ctrl = ThresholdController(8, target=2, num_layers=3, p0=0.25)
    p0 = ctrl.threshold.item()
    assert p0 == pytest.approx(2 / 8)
    ctrl.update(torch.full((3,), 4.0 * 100), torch.full((3,), 100.0))     # too many experts -> lower p
    assert ctrl.threshold.item() < p0 and ctrl.measured.item() == pytest.approx(4.0)
    ctrl = ThresholdController(8, target=2, num_layers=3, kp=1.0, ki=0.1, p0=0.25, space="linear")
    ctrl.update(torch.full((3,), 1.0 * 100), torch.full((3,), 100.0))     # too few -> raise p
    assert ctrl.threshold.item() > p0
    # the exact positional PI formula on the first step (in p for the linear space, in log-odds for logit)
    e = (2 - 1) / 8
    assert ctrl.integral.item() == pytest.approx(e)
    assert ctrl.threshold.item() == pytest.approx(0.25 + 1.0 * e + 0.1 * e)
    ctrl = ThresholdController(8, target=2, num_layers=3, p0=0.25)
    assert (ctrl.space, ctrl.kp, ctrl.ki) == ("logit", 0.2, 1.0)
    ctrl.update(torch.full((3,), 1.0 * 100), torch.full((3,), 100.0))
    assert ctrl.threshold.item() == pytest.approx(1 / (1 + math.exp(-(math.log(0.25 / 0.75) + 1.2 * e))))


@pytest.mark.parametrize("space", ["logit", "linear"])
def test_controller_incremental_law_equals_positional_pi_when_unsaturated(space):
    kp, ki, p0 = 0.3, 0.2, 0.5
    ctrl = ThresholdController(8, target=2, num_layers=1, kp=kp, ki=ki, p0=p0, space=space)
    a = 2.0 + 0.5 * torch.sin(torch.arange(40.0, dtype=torch.float64))
    total = 0.0
    for a_t in a.tolist():
        ctrl.update(torch.tensor([a_t]), torch.tensor([1.0]))
        e = (2.0 - a_t) / 8
        total += e
        u = ctrl.to_u(p0) + kp * e + ki * total
        assert ctrl.threshold.item() == pytest.approx(u if space == "linear" else 1 / (1 + math.exp(-u)), abs=1e-6)
        assert ctrl.integral.item() == pytest.approx(total, abs=1e-6)
    assert ctrl.saturated_steps.item() == 0


@pytest.mark.parametrize("space", ["logit", "linear"])
def test_controller_no_windup_leaves_bound_at_once_and_flags_saturation(space):
    """Issue 13.2: after a long saturation the threshold must leave the bound on the first step the error changes
    sign (a clipped-integral positional law stayed pinned for i_max / |e| steps, running at up to twice the target)."""
    ctrl = ThresholdController(8, target=2, num_layers=1, space=space)
    for _ in range(500):
        ctrl.update(torch.tensor([1.0]), torch.tensor([1.0]))               # too few experts even at p_max
    assert ctrl.threshold.item() == pytest.approx(ctrl.p_max)
    integral = ctrl.integral.item()
    ctrl.update(torch.tensor([2.5]), torch.tensor([1.0]))                   # now too many
    assert ctrl.threshold.item() < ctrl.p_max - 1e-4
    for _ in range(500):
        ctrl.update(torch.tensor([8.0]), torch.tensor([1.0]))
    assert ctrl.threshold.item() == pytest.approx(ctrl.p_min)
    ctrl.update(torch.tensor([1.5]), torch.tensor([1.0]))
    assert ctrl.threshold.item() > ctrl.p_min + 1e-4
    # the integral was back-calculated: exactly what kept the positional law on the bound
    assert ctrl.to_u(ctrl.p0) + ctrl.kp / 8 + ctrl.ki * integral == pytest.approx(ctrl.to_u(ctrl.p_max), abs=1e-3)
    assert ctrl.saturated.item() == 0 and ctrl.saturated_steps.item() > 900
    for _ in range(3):
        ctrl.update(torch.tensor([8.0]), torch.tensor([1.0]))
    assert ctrl.saturated.item() == -1


def test_saturation_is_a_routing_stat_and_warns_once():
    # p_max below 1/E: one expert per token whatever the router does, so the controller saturates every step
    net = _TinyMoENet(RoutingConfig(type="dtopp", p_max=0.1, drn_scale_max=2.0))
    with pytest.warns(RuntimeWarning, match="saturated"):
        _train(net, steps=20)
        stats = routing_stats(net)
    assert stats["threshold_saturated"].item() == 1 and stats["saturated_steps"].item() == 20
    with pytest.raises(ValueError, match="cannot activate 2 of 8"):           # the derived bound says so upfront
        _TinyMoENet(RoutingConfig(type="dtopp", p_max=0.1))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        routing_stats(net)                                                   # once only


def test_cold_start_on_target_for_standardised_logits():
    """Issue 13.3: a fresh DiT-T/2-E8K2 (DTop-p, target 2) starts within 10% of the target on the digits; the old
    p0 = target / E gave ~1.05 experts once DRN standardises the logits."""
    from dit_moe.data.builtin import DigitsDataset
    from dit_moe.registry import build_model

    torch.manual_seed(0)
    model = build_model("DiT-T/2-E8K2", routing=RoutingConfig(type="dtopp", target=2.0), input_size=8,
                        in_channels=1, num_classes=10)
    data = DigitsDataset()
    x, y = data.images[:128], data.labels[:128]
    t = torch.randint(0, 1000, (128,), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        model(x, t, y)
    stats = routing_step(model)
    assert abs(stats["measured"].item() - 2.0) < 0.2, stats["mean_active"]
    assert standard_normal_threshold(8, 2.0) == pytest.approx(0.508, abs=0.005)


def test_drn_gradient_bounded_when_logit_spread_collapses():
    """Issue 13.5: DRN divides by the per-token logit spread; with eps = 1e-2 on it (not 1e-6 added) the gradient
    w.r.t. the logits of a token whose logits (almost) agree is at most ~ s / eps."""
    _, (r,) = _dtopp()
    z = (0.3 + 1e-7 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    target = torch.softmax(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), 1)
    (r.probs(z) - target).pow(2).sum().backward()
    assert z.grad.abs().max() < 200.0                                        # ~1e6 with 1e-6 added to the std


def test_controller_ignores_empty_measurement_and_state_dict_round_trip():
    ctrl = ThresholdController(8, target=2, num_layers=2, scope="layer")
    ctrl.update(torch.tensor([150.0, 300.0]), torch.tensor([100.0, 100.0]))
    state = copy.deepcopy(ctrl.state_dict())
    before = {k: v.clone() for k, v in state.items()}
    ctrl.update(torch.zeros(2), torch.zeros(2))                              # nothing measured: unchanged
    assert all(torch.equal(before[k], v) for k, v in ctrl.state_dict().items())
    fresh = ThresholdController(8, target=2, num_layers=2, scope="layer")
    fresh.load_state_dict(state)
    for c in (ctrl, fresh):
        c.update(torch.tensor([250.0, 180.0]), torch.tensor([100.0, 100.0]))
    assert all(torch.equal(a, b) for a, b in zip(ctrl.state_dict().values(), fresh.state_dict().values()))
    assert set(state) == {"threshold", "integral", "measured", "error"}


class _TinyMoENet(nn.Module):
    """Residual stack of MoE-MLPs on a small regression task: a router that keeps learning."""

    def __init__(self, routing_cfg, num_layers=3, dim=32, num_experts=8):
        super().__init__()
        self.routing_controller = build_controller(routing_cfg, num_experts, 2, num_layers)
        mc = ModelConfig(expert_hidden_ratio=2.0)
        self.inp = nn.Linear(8, dim)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_layers)])
        self.moes = nn.ModuleList([build_moe_mlp(dim, i, num_experts, 2, mc, routing_cfg, self.routing_controller)
                                   for i in range(num_layers)])
        self.out = nn.Linear(dim, 1)

    def forward(self, x):
        h = self.inp(x)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return self.out(h)


def _train(net, steps, seed=0, lr=3e-3):
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    measured = []
    for _ in range(steps):
        x = torch.randn(256, 8, generator=g)
        with torch.no_grad():
            y = teacher(x)
        loss = (net(x) - y).pow(2).mean() + collect_aux_loss(net)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        measured.append(routing_step(net)["measured"].clone())
    return torch.stack(measured)


@pytest.mark.parametrize("space", ["logit", "linear"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_controller_drives_learning_router_to_target(scope, space):
    """A router that keeps sharpening is a ramp disturbance, which a PI loop follows with a lag ~ E rate / Ki:
    at the default config's learning rate (1e-3) the running mean stays within 3% of the target."""
    torch.manual_seed(0)
    net = _TinyMoENet(RoutingConfig(type="dtopp", target=2.0, scope=scope, threshold_space=space))
    measured = _train(net, steps=200, lr=1e-3)
    tail = measured[-100:]
    assert abs(tail.mean().item() - 2.0) / 2.0 < 0.03, f"running mean {tail.mean():.3f} misses target 2"
    if scope == "layer":
        assert ((tail.mean(0) - 2.0).abs() / 2.0 < 0.03).all()
    assert net.routing_controller.saturated_steps.sum() == 0


def test_eval_freezes_controller():
    torch.manual_seed(0)
    net = _TinyMoENet(RoutingConfig(type="dtopp"))
    _train(net, steps=3)
    state = {k: v.clone() for k, v in net.routing_controller.state_dict().items()}
    net.eval()
    with torch.no_grad():
        net(torch.randn(64, 8))
    routing_step(net)
    assert all(torch.equal(state[k], v) for k, v in net.routing_controller.state_dict().items())
    assert routing_stats(net)["threshold"].shape == (1,)


def test_controller_state_in_model_state_dict_once_and_deepcopy():
    net = _TinyMoENet(RoutingConfig(type="dtopp"))
    keys = [k for k in net.state_dict() if k.endswith("threshold")]
    assert keys == ["routing_controller.threshold"]
    _train(net, steps=2)
    ema = copy.deepcopy(net)
    for moe in ema.moes:
        assert moe.router.controller is ema.routing_controller
    assert ema.routing_controller is not net.routing_controller
    ema.routing_controller.threshold.fill_(0.5)
    assert net.moes[0].router.controller.threshold.item() != 0.5


def test_top_p_mask_keeps_one_expert_at_zero_threshold_and_nan():
    from dit_moe.models.routers.base import top_p_mask

    probs = torch.softmax(torch.randn(6, 8), dim=1)
    mask, _ = top_p_mask(probs, 0.0)
    assert torch.equal(mask.sum(1), torch.ones(6, dtype=torch.long))
    assert torch.equal(mask.float().argmax(1), probs.argmax(1))
    nan_mask, _ = top_p_mask(torch.full((3, 8), float("nan")), 0.5)
    assert torch.equal(nan_mask.sum(1), torch.ones(3, dtype=torch.long))


def test_old_config_keys_still_build():
    """Configs written before the controller rework: i_max is accepted (and ignored, with a warning) and explicit
    gains keep their meaning in the space they are given for."""
    with pytest.warns(UserWarning, match="i_max is ignored"):
        ctrl = build_controller(RoutingConfig(type="dtopp", i_max=4.0), 8, 2, 2)
    assert ctrl.space == "logit" and (ctrl.kp, ctrl.ki) == (0.2, 1.0)
    ctrl = build_controller(RoutingConfig(type="dtopp", threshold_space="linear", kp=0.05, ki=0.25), 8, 2, 2)
    assert (ctrl.space, ctrl.kp, ctrl.ki) == ("linear", 0.05, 0.25)
    with pytest.raises(ValueError, match="threshold_space"):
        build_controller(RoutingConfig(type="dtopp", threshold_space="log"), 8, 2, 2)
