"""The one threshold calibrator hits its target for DTop-p and for fixed Top-p, globally and per layer."""
import pytest
import torch

from dit_moe.config import RoutingConfig
from dit_moe.models.calibration import Thresholds, bisect, calibrate_thresholds
from dit_moe.models.routing_tap import RoutingTap
from dit_moe.registry import build_model


def _model(routing, scope="global"):
    torch.manual_seed(0)
    model = build_model("DiT-T/2-E8K2", RoutingConfig(type=routing, scope=scope), input_size=8, in_channels=1,
                        num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


g = torch.Generator().manual_seed(0)
INPUTS = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g),
           torch.randint(0, 10, (8,), generator=g))]


def _replay(model):
    def run():
        for x, t, y in INPUTS:
            model(x, t, y)
    return run


def _measure(model):
    with torch.no_grad(), RoutingTap(model) as tap:
        _replay(model)()
    return tap.report()


@pytest.mark.parametrize("routing,scope", [("dtopp", "global"), ("dtopp", "layer"), ("topp", "global"),
                                           ("topp", "layer")])
def test_calibrator_hits_the_target(routing, scope):
    model = _model(routing, scope="layer" if (routing, scope) == ("dtopp", "layer") else "global")
    target = 2.5
    result = calibrate_thresholds(model, _replay(model), target, scope=scope, tol=0.01)
    assert result["kind"] == routing and result["scope"] == scope
    assert len(result["threshold"]) == (1 if scope == "global" else 4)
    report = _measure(model.eval())                       # the thresholds stay set: an independent re-measurement
    if scope == "global":
        assert abs(report["mean"] - target) <= 0.01 and report["mean"] == pytest.approx(result["measured"])
    else:
        assert all(abs(v - target) <= 0.01 for v in report["per_layer"]), report["per_layer"]
    assert Thresholds(model, scope).get().tolist() == pytest.approx(result["threshold"])
    # More experts need a higher threshold.
    higher = calibrate_thresholds(model, _replay(model), 4.0, scope=scope, tol=0.01, restore=True)
    assert all(h > p for h, p in zip(higher["threshold"], result["threshold"]))
    assert Thresholds(model, scope).get().tolist() == pytest.approx(result["threshold"])     # restored


def test_unreachable_target_and_wrong_models_are_refused():
    model = _model("topp")
    with pytest.raises(ValueError, match="not reachable"):
        calibrate_thresholds(model, _replay(model), 7.99, hi=0.3)
    with pytest.raises(ValueError, match="must be in \\[1, 8\\]"):
        calibrate_thresholds(model, _replay(model), 9.0)
    with pytest.raises(ValueError, match="no threshold routers"):
        Thresholds(_model("topk"))
    with pytest.raises(ValueError, match="scope global; cannot calibrate with scope layer"):
        Thresholds(_model("dtopp"), "layer")


def test_bisect_is_exact_on_a_step_function():
    calls = []

    def f(p):
        calls.append(p)
        return 1.0 + 3 * (p > 0.3) + 2 * (p > 0.6)           # 1, 4, 6
    p, v = bisect(f, 4.0, iters=40, tol=0.0)
    assert v == 4.0 and 0.3 < p <= 0.6
    assert len(calls) <= 42
