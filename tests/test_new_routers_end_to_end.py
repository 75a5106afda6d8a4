"""Expert choice (+ Default MoE) and Top-k + balance bias through the whole toolkit: training logs, checkpoints,
resume, the routing analysis and the study's overrides."""
import json

import pytest

from dit_moe import study
from dit_moe.analyze import analyze_checkpoint
from dit_moe.config import load_config
from dit_moe.models.moe import moe_layers
from dit_moe.training import train
from dit_moe.weights.build import build_from_checkpoint
from dit_moe.weights.checkpoint import list_checkpoints

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def tiny(tmp_path, name, *overrides):
    return load_config(None, [
        "model.name=DiT-T/2-E8K2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
        "data.source=builtin", f"train.run_dir={tmp_path}", f"train.run_name={name}", "train.tracker=null",
        "train.global_batch_size=16", "train.lr=1e-3", "train.log_every=2", "train.ckpt_every=2", "train.steps=4",
        "sample.steps=2", "sample.num_per_class=1", *overrides])


@pytest.mark.parametrize("name,overrides,logged,absent", [
    ("ec", ["routing.type=expert_choice", "routing.ec_pool=batch", "routing.default_moe=true"],
     ["unrouted_frac", "active_experts_std"], ["balance_bias", "cap_frac"]),
    ("bias", ["routing.type=topk", "routing.balance_bias=true"], ["balance_bias"], ["unrouted_frac", "cap_frac"]),
])
def test_train_log_checkpoint_resume_analyze(tmp_path, name, overrides, logged, absent):
    run = train(tiny(tmp_path, name, *overrides))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    for key in logged + ["active_experts", "expert_load", "load_max", "router_entropy", "target_experts"]:
        assert key in last, key
    for key in absent:
        assert key not in last, key
    assert last["target_experts"] == 2.0 and last["aux_loss"] == 0.0          # no LB loss for either
    if name == "ec":
        assert last["active_experts"] == pytest.approx(2.0)                  # E C / N = K at capacity factor 1
        assert 0 <= last["unrouted_frac"] < 1
    else:
        assert len(last["balance_bias"]) == 4 and any(any(v != 0 for v in row) for row in last["balance_bias"])
    # The checkpoint holds the router state; a resume continues it exactly.
    model, ckpt = build_from_checkpoint(list_checkpoints(run)[-1], which="model")
    assert ckpt.routing_config.type == ("expert_choice" if name == "ec" else "topk")
    train(tiny(tmp_path, name, *overrides, "train.steps=6"), resume="latest")
    assert [p.name for p in list_checkpoints(run)][-1] == "step-0000006"
    report = analyze_checkpoint(list_checkpoints(run)[-1], classes=[0, 1], num_per_class=1, num_steps=2,
                                sampler="ddim", cfg_scale=2.0, device="cpu")
    assert report["active_experts"]["per_layer"] and all((run / "analysis" / f).is_file() for f in report["files"])
    if name == "bias":
        assert report["active_experts"]["mean"] == 2.0
        biases = [l.router.balance_bias for l in moe_layers(model)]
        assert all(b.abs().sum() > 0 for b in biases)


def test_study_expresses_the_new_arms_by_override(tmp_path):
    text = f"""
name: arms
output: {tmp_path / "out"}
base: {{config: {ROOT / "configs" / "default.yaml"}, overrides: [diffusion.objective=ddpm, model.learn_sigma=true, train.steps=4]}}
seeds: [0]
arms:
  - {{name: topk-bias, overrides: [routing.type=topk, routing.balance_bias=true]}}
  - {{name: ec, overrides: [routing.type=expert_choice]}}
  - {{name: ec-batch, overrides: [routing.type=expert_choice, routing.ec_pool=batch, routing.ec_eval_pool=sample]}}
  - {{name: dtopp-bias, overrides: [routing.type=dtopp, routing.balance_bias=true]}}
"""
    (tmp_path / "s.yaml").write_text(text)
    spec = study.load_study(tmp_path / "s.yaml")
    cfgs = {a.name: study.arm_config(spec, a, 0) for a in spec.arms}
    assert cfgs["topk-bias"].routing.balance_bias and cfgs["ec"].routing.type == "expert_choice"
    assert cfgs["ec-batch"].routing.ec_pool == "batch" and cfgs["ec-batch"].routing.ec_eval_pool == "sample"
    (tmp_path / "bad.yaml").write_text(text.replace("routing.type=expert_choice]", "routing.type=expert_choice, "
                                                    "routing.balance_bias=true]", 1))
    with pytest.raises(study.StudyError, match="balance_bias=true does not apply"):
        study.load_study(tmp_path / "bad.yaml")
