"""Aux-loss-free balancing: a bias on the selection scores only, the DeepSeek-V3 sign update, checkpoints."""
import json

import pytest
import torch

from dit_moe.config import ConfigError, ExperimentConfig, ModelConfig, RoutingConfig
from dit_moe.models.moe import build_controller, build_moe_mlp, moe_layers, routing_step
from dit_moe.models.routers import DTopPRouter, ThresholdController, TopKRouter, TopPRouter
from dit_moe.registry import build_model
from dit_moe.validation import validate
from dit_moe.weights.build import build_from_checkpoint, load_weights
from dit_moe.weights.checkpoint import save_checkpoint
from dit_moe.weights.init_from import load_init_weights

D, E = 16, 6


def _routers():
    ctrl = ThresholdController(E, target=2, num_layers=1)
    dtopp = DTopPRouter(D, E, ctrl, 0, balance_bias=True)
    dtopp._keep = ctrl
    return {"topk": TopKRouter(D, E, 2, balance_bias=True), "topp": TopPRouter(D, E, 0.5, balance_bias=True),
            "dtopp": dtopp}


@pytest.mark.parametrize("kind", ["topk", "topp", "dtopp"])
def test_bias_changes_selection_not_combine_weights(kind):
    torch.manual_seed(0)
    router = _routers()[kind]
    x = torch.randn(64, D)
    plain = router(x)
    assert router.balance_bias is not None and (router.balance_bias == 0).all()
    assert torch.equal(plain.mask, router.select(plain.probs)[0])
    with torch.no_grad():
        router.balance_bias[3] = 2.0                           # above any probability gap: expert 3 ranks first
    biased = router(x)
    assert torch.equal(biased.probs, plain.probs)             # scores for weights, aux losses, Default MoE: unbiased
    assert biased.mask[:, 3].all() and not plain.mask[:, 3].all()
    assert not torch.equal(biased.mask, plain.mask)
    # Combine weights are the unbiased probabilities of the selected experts (renormalised for DTop-p).
    w = biased.probs * biased.mask
    if router.renormalize:
        w = w / w.sum(1, keepdim=True)
    torch.testing.assert_close(biased.weight, w[biased.token_idx, biased.expert_idx])
    if kind != "topk":                                        # the prefix: mass of pi accumulated in the biased order
        order = (biased.probs + router.balance_bias).argsort(1, descending=True)
        sorted_p = biased.probs.gather(1, order)
        before = sorted_p.cumsum(1) - sorted_p
        threshold = 0.5 if kind == "topp" else router.controller.threshold
        keep = before < threshold
        keep[:, 0] = True
        assert torch.equal(torch.zeros_like(keep).scatter_(1, order, keep), biased.mask)


def test_update_is_rate_times_sign_exactly():
    router = TopKRouter(D, 4, 2, balance_bias=True, bias_rate=0.25)
    router.update_balance_bias(torch.tensor([5, 1, 3, 3]))         # mean 3: over, under, exact, exact
    assert router.balance_bias.tolist() == [-0.25, 0.25, 0.0, 0.0]
    router.update_balance_bias(torch.tensor([0, 0, 0, 0]))         # nothing routed: no change
    router.update_balance_bias(torch.tensor([1, 1, 7, 3]))
    assert router.balance_bias.tolist() == [0.0, 0.5, -0.25, 0.0]
    plain = TopKRouter(D, 4, 2)
    plain.update_balance_bias(torch.tensor([5, 1, 3, 3]))          # no bias: nothing to update, no state
    assert plain.balance_bias is None and "balance_bias" not in plain.state_dict()


def test_bias_moves_a_skewed_router_toward_balance():
    """A frozen router that sends most tokens to two experts: after routing_step updates, the load is near uniform."""
    torch.manual_seed(0)
    cfg = RoutingConfig(type="topk", balance_bias=True, bias_rate=2e-3)
    moe = build_moe_mlp(D, 0, E, 2, ModelConfig(expert_hidden_ratio=1.0), cfg, None).train()
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.1)
        moe.router.weight[:2] += 0.2                                # experts 0, 1 favoured by every token
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, D, generator=g) + 0.5

    def max_share():
        with torch.no_grad():
            moe(x)
        return float(routing_step(moe)["load"].max() * E)
    shares = [max_share() for _ in range(300)]
    assert shares[0] > 2.5 and max(shares[-50:]) <= 1.25, (shares[0], shares[-50:])
    assert moe.router.lb_coef == 0.0                                # balance_bias: the LB loss defaults to off
    assert moe.router.balance_bias[:2].max() < 0 < moe.router.balance_bias[2:].max()


def test_routing_step_moves_bias_from_counts_of_every_micro_batch():
    torch.manual_seed(0)
    cfg = RoutingConfig(type="topk", balance_bias=True)
    moe = build_moe_mlp(D, 0, E, 2, ModelConfig(expert_hidden_ratio=1.0), cfg, None).train()
    xs = [torch.randn(2, 8, D) for _ in range(2)]
    counts = sum(moe.router(x.reshape(-1, D)).counts for x in xs)
    for x in xs:
        moe(x)
    routing_step(moe)
    expected = 1e-3 * torch.sign(counts.float().mean() - counts.float())
    assert torch.equal(moe.router.balance_bias, expected)
    routing_step(moe)                                             # no forward since: nothing accumulated, no move
    assert torch.equal(moe.router.balance_bias, expected)


def _model(**routing):
    torch.manual_seed(0)
    return build_model("DiT-T/2-E4K2", RoutingConfig(**routing), input_size=8, in_channels=1, num_classes=10)


def test_bias_in_checkpoints_and_stats(tmp_path):
    model = _model(type="topk", balance_bias=True)
    layers = moe_layers(model)
    with torch.no_grad():
        for i, l in enumerate(layers):
            l.router.balance_bias.copy_(torch.arange(4.0) * (i + 1))
    keys = [k for k in model.state_dict() if k.endswith("balance_bias")]
    assert len(keys) == len(layers) == 4
    assert routing_step(model)["balance_bias"].shape == (4, 4)
    save_checkpoint(tmp_path / "ck", model, model)
    rebuilt, ckpt = build_from_checkpoint(tmp_path / "ck")
    assert ckpt.routing_config.balance_bias and all(
        torch.equal(a.router.balance_bias, b.router.balance_bias) for a, b in zip(layers, moe_layers(rebuilt)))


def test_checkpoints_without_the_new_keys_still_load(tmp_path):
    """A checkpoint written before expert choice and the balance bias existed (its routing section lacks the keys,
    its weights the bias) loads, and can start a balanced run (init_from: the bias starts at 0)."""
    old = _model(type="topk")
    save_checkpoint(tmp_path / "old", old, old)
    cfg_file = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for key in ("capacity_factor", "ec_pool", "ec_eval_pool", "balance_bias", "bias_rate"):
        del cfg["routing"][key]
    cfg_file.write_text(json.dumps(cfg))
    model, ckpt = build_from_checkpoint(tmp_path / "old")
    assert ckpt.routing_config == RoutingConfig(type="topk") and moe_layers(model)[0].router.balance_bias is None
    load_weights(_model(type="topk"), tmp_path / "old")
    balanced, ema = _model(type="topk", balance_bias=True), _model(type="topk", balance_bias=True)
    with torch.no_grad():
        moe_layers(balanced)[0].router.balance_bias.fill_(5.0)
    load_init_weights(balanced, ema, tmp_path / "old")
    assert all((l.router.balance_bias == 0).all() for l in moe_layers(balanced) + moe_layers(ema))
    assert torch.equal(moe_layers(balanced)[0].router.weight, moe_layers(old)[0].router.weight)


def test_config_rules():
    base = {"model": {"name": "DiT-T/2-E8K2", "input_size": 8, "in_channels": 1}}
    for rtype in ("topk", "topp", "dtopp"):
        validate(ExperimentConfig.from_dict({**base, "routing": {"type": rtype, "balance_bias": True}}))
    with pytest.raises(ConfigError, match="routing.bias_rate=0.0 must be > 0"):
        validate(ExperimentConfig.from_dict({**base, "routing": {"balance_bias": True, "bias_rate": 0.0}}))
    with pytest.raises(ConfigError, match="does not apply to routing.type=expert_choice"):
        validate(ExperimentConfig.from_dict({**base, "routing": {"type": "expert_choice", "balance_bias": True}}))
    # lb defaults to 0 with the bias, an explicit lb_coef is kept
    assert moe_layers(_model(type="dtopp", balance_bias=True))[0].router.lb_coef == 0.0
    assert moe_layers(_model(type="topk", balance_bias=True, lb_coef=0.01))[0].router.lb_coef == 0.01
    assert moe_layers(_model(type="topk"))[0].router.lb_coef == 0.01
    ctrl = build_controller(RoutingConfig(type="dtopp", balance_bias=True), 4, 2, 4)
    assert ctrl is not None
