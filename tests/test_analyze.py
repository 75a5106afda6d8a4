"""Routing analysis: every listed file is written, the numbers agree with the model's own statistics, headless plots."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_moe.analyze import (AnalysisError, analyze_checkpoint, default_out_dir, main,
                             plot_training_curves, read_metrics)
from dit_moe.config import RoutingConfig
from dit_moe.data import DataInfo
from dit_moe.models import moe
from dit_moe.models.routing_tap import RoutingTap
from dit_moe.registry import build_model
from dit_moe.sampling import SampleConfig, make_generators, sample_latents
from dit_moe.weights.checkpoint import CheckpointError, save_checkpoint

CLASSES = [0, 3, 7]
PER_CLASS = 2
STEPS = 3
CHECKPOINT_FILES = {"active_per_layer.png", "active_per_timestep.png", "active_per_class.png", "active_spatial.png",
                    "expert_load.png", "analysis.json"}
PNG = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def tiny(routing="topk", name="DiT-T/2-E4K2", seed=0):
    torch.manual_seed(seed)
    model = build_model(name, RoutingConfig(type=routing), input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():  # leave adaLN-Zero's identity start, so routing depends on t and y
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save(model, run: Path, step=5) -> Path:
    info = DataInfo(num_classes=10, in_channels=1, latent_size=8, image_size=8,
                    class_names=tuple(f"digit {i}" for i in range(10)), vae=None, scaling_factor=1.0, source="test")
    return save_checkpoint(run / "checkpoints" / f"step-{step:07d}", model, model, step=step, data_info=info.to_dict())


@pytest.fixture(scope="module")
def dtopp_run(tmp_path_factory):
    """A DTop-p checkpoint analysed through the command line; (checkpoint, report, model)."""
    run = tmp_path_factory.mktemp("dtopp") / "run"
    model = tiny("dtopp")
    ckpt = save(model, run)
    argv = [str(ckpt), "--steps", str(STEPS), "--classes", *map(str, CLASSES), "--num-per-class", str(PER_CLASS),
            "--sampler", "ddpm", "--cfg-scale", "1.5", "--device", "cpu", "--spatial-steps", "2"]
    assert main(argv) == 0
    report = json.loads((run / "analysis" / "analysis.json").read_text())
    return ckpt, report, model.eval()


@pytest.fixture(scope="module")
def topk_report(tmp_path_factory):
    run = tmp_path_factory.mktemp("topk") / "run"
    ckpt = save(tiny("topk"), run)
    out = run.parent / "elsewhere"
    report = analyze_checkpoint(ckpt, out_dir=out, classes=CLASSES, num_per_class=1, num_steps=STEPS,
                                sampler="ddim", cfg_scale=4.0, device="cpu", batch_size=2)
    return report, out


# ---------------------------------------------------------------------------------------------------------
#                                      Files and numbers of a checkpoint
# ---------------------------------------------------------------------------------------------------------

def test_writes_every_listed_file(dtopp_run):
    ckpt, report, _ = dtopp_run
    out = ckpt.parent.parent / "analysis"
    assert default_out_dir(ckpt) == out and Path(report["out_dir"]) == out
    assert set(report["files"]) == CHECKPOINT_FILES | {"drn_scale.png"}
    for f in report["files"]:
        data = (out / f).read_bytes()
        assert data.startswith(PNG) if f.endswith(".png") else json.loads(data)["files"] == report["files"]
    assert report["routing"] == "dtopp" and report["step"] == 5 and report["target_experts"] == 2.0


def test_shapes_and_ranges(dtopp_run):
    _, report, _ = dtopp_run
    ae, L, E = report["active_experts"], 4, 4
    assert len(ae["per_layer"]) == L and all(1.0 <= v <= E for v in ae["per_layer"])
    assert len(ae["per_step"]["timesteps"]) == STEPS and ae["per_step"]["timesteps"][0] == 999
    assert np.array(ae["per_step"]["per_layer"]).shape == (STEPS, L)
    assert np.array(ae["histogram"]).shape == (L, E + 1)
    np.testing.assert_allclose(np.array(ae["histogram"]).sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.array(ae["histogram"]) @ np.arange(E + 1), ae["per_layer"], atol=1e-5)
    pc = ae["per_class"]
    assert pc["classes"] == CLASSES and pc["names"] == [f"digit {c}" for c in CLASSES]
    assert np.array(pc["per_layer"]).shape == (len(CLASSES), L)
    load = np.array(report["expert_load"]["per_layer"])
    assert load.shape == (L, E)
    np.testing.assert_allclose(load.sum(1), 1.0, atol=1e-5)
    sp = report["spatial"]
    assert sp["grid"] == [4, 4] and len(sp["timesteps"]) == 2 and sp["classes"] == CLASSES
    maps = np.array(sp["maps"])
    assert maps.shape == (2, len(CLASSES), 4, 4) and ((maps >= 1) & (maps <= E)).all()
    # Threshold routing varies by token: a flat map would mean the hooks saw one decision for everything.
    assert maps.std() > 0 and np.array(ae["histogram"])[:, 2:].sum() > 0


def test_dtopp_state_reported(dtopp_run):
    _, report, model = dtopp_run
    scales = [float(l.router.scale().detach()) for l in moe.moe_layers(model)]
    np.testing.assert_allclose(report["drn_scale"], scales, rtol=1e-5)
    np.testing.assert_allclose(report["threshold"], model.routing_controller.threshold.tolist(), rtol=1e-6)


def test_trajectory_numbers_match_sampling_meter(dtopp_run):
    """The same trajectory, counted by the tap's running sums (what sampling reports), gives the same numbers as the
    analysis' per-call records."""
    _, report, model = dtopp_run
    labels = torch.tensor([c for c in CLASSES for _ in range(PER_CLASS)])
    settings = SampleConfig(sampler="ddpm", steps=STEPS, cfg_scale=1.5)
    with RoutingTap(model) as tap:
        sample_latents(model, labels, make_generators(0, range(len(labels))), settings, (1, 8, 8))
    ref = tap.report()
    ae = report["active_experts"]
    np.testing.assert_allclose(ae["per_layer"], ref["per_layer"], rtol=1e-5)
    np.testing.assert_allclose(ae["mean"], ref["mean"], rtol=1e-6)
    ours = [np.nan if v is None else v for v in ae["per_bucket"]["mean"]]
    theirs = [np.nan if v is None else v for v in ref["per_bucket"]]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_recorder_agrees_with_routing_stats():
    """Per-layer mean experts and load of one training forward's records == what routing_step/routing_stats report."""
    for routing in ("topp", "dtopp"):
        model = tiny(routing, seed=1).train()
        x, t, y = torch.randn(6, 1, 8, 8), torch.randint(0, 1000, (6,)), torch.randint(0, 10, (6,))
        with RoutingTap(model, records=True) as rec:
            model(x, t, y)
        stats = moe.routing_step(model)
        means = torch.tensor([float(c[0]["active"].double().mean()) for c in rec.records])
        loads = torch.stack([c[0]["counts"].sum(0).double() / c[0]["counts"].sum() for c in rec.records])
        np.testing.assert_allclose(means.numpy(), stats["mean_active"].numpy(), rtol=1e-6)
        np.testing.assert_allclose(loads.numpy(), stats["load"].numpy(), rtol=1e-5, atol=1e-7)
        assert (means > 1).any(), routing  # not trivially one expert per token
        # The hooks are gone after the with-block.
        model(x, t, y)
        assert all(len(c) == 1 for c in rec.records)


def test_topk_is_flat(topk_report):
    report, out = topk_report
    ae = report["active_experts"]
    assert set(report["files"]) == CHECKPOINT_FILES and all((out / f).is_file() for f in report["files"])
    assert report["drn_scale"] is None and report["target_experts"] == 2.0
    assert ae["mean"] == 2.0 and ae["std"] == 0.0 and ae["per_layer"] == [2.0] * 4
    assert np.all(np.array(ae["per_step"]["per_layer"]) == 2.0)
    assert ae["per_class"]["mean"] == [2.0] * len(CLASSES)
    assert np.all(np.array(ae["histogram"])[:, 2] == 1.0)
    assert np.all(np.array(report["spatial"]["maps"]) == 2.0)
    assert report["settings"]["sampler"] == "ddim" and report["settings"]["cfg_scale"] == 4.0


# ---------------------------------------------------------------------------------------------------------
#                                               Errors
# ---------------------------------------------------------------------------------------------------------

def test_dense_model_is_refused(tmp_path):
    torch.manual_seed(0)
    dense = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    ckpt = save_checkpoint(tmp_path / "dense", dense)
    with pytest.raises(AnalysisError, match="not an MoE model"):
        analyze_checkpoint(ckpt, num_steps=2, device="cpu")
    with pytest.raises(ValueError, match="has no routers"):
        RoutingTap(dense, records=True)


def test_missing_checkpoint_and_bad_classes(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="nope"):
        analyze_checkpoint(tmp_path / "nope")
    assert main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    ckpt = save(tiny("topk"), tmp_path / "run")
    with pytest.raises(AnalysisError, match=r"\[12\]"):
        analyze_checkpoint(ckpt, classes=[1, 12], num_steps=2, device="cpu")


# ---------------------------------------------------------------------------------------------------------
#                                           Training curves
# ---------------------------------------------------------------------------------------------------------

def write_log(run: Path, rows: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run


def moe_rows(n=6, layer_scope=False):
    """Records with dit_moe.training's keys (see its docstring)."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(1, n + 1):
        per_layer = (2 + 0.2 * rng.standard_normal(3)).tolist()
        load = rng.dirichlet(np.ones(4), size=3)
        rows.append({"step": 10 * s, "loss": 1.0 / s, "mse": 0.9 / s, "vb": 0.01, "aux_loss": 0.004,
                     "aux/lb": 0.001, "aux/entropy": 0.003, "active_experts": float(np.mean(per_layer)),
                     "active_experts_per_layer": per_layer, "target_experts": 2.0,
                     "threshold": [0.5, 0.4, 0.45] if layer_scope else 0.5 - 0.01 * s,
                     "controller_integral": 0.1 * s, "expert_load": load.tolist(),
                     "load_max": float(load.max() * 4), "drn_scale": 1.0})
    return rows


def test_training_curves(tmp_path):
    run = write_log(tmp_path / "run", moe_rows(), tail='{"step": 70, "loss"')   # killed mid-write
    files = plot_training_curves(run)
    assert [f.name for f in files] == ["train_loss.png", "train_active_experts.png", "train_threshold.png",
                                       "train_load_balance.png"]
    assert all(f.parent == run / "analysis" and f.read_bytes().startswith(PNG) for f in files)
    assert [r["step"] for r in read_metrics(run)] == [10, 20, 30, 40, 50, 60]
    # Layer-wise thresholds (a list per record) draw one curve per layer.
    files = plot_training_curves(write_log(tmp_path / "layer", moe_rows(layer_scope=True)), tmp_path / "out")
    assert "train_threshold.png" in [f.name for f in files]
    # A dense run has only the loss.
    dense = write_log(tmp_path / "dense", [{"step": s, "loss": 1.0, "mse": 1.0, "vb": 0.0} for s in (1, 2)])
    assert [f.name for f in plot_training_curves(dense)] == ["train_loss.png"]


def test_training_curves_errors(tmp_path):
    with pytest.raises(AnalysisError, match="metrics.jsonl"):
        plot_training_curves(tmp_path)
    write_log(tmp_path / "bad", moe_rows(2), tail="")
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(AnalysisError, match=r"metrics.jsonl:2"):
        plot_training_curves(tmp_path / "bad")
    write_log(tmp_path / "nokeys", [{"step": 1, "lr": 0.1}])
    with pytest.raises(AnalysisError, match="none of the keys"):
        plot_training_curves(tmp_path / "nokeys")


def test_cli_runs_headless(tmp_path):
    """No display, an interactive backend requested: the plots still render (Agg canvas, no pyplot); the training
    curves never load torch."""
    run = write_log(tmp_path / "run", moe_rows(3))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(MPLBACKEND="TkAgg", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    code = ("import sys; from dit_moe.analyze import main; rc = main(sys.argv[1:]); "
            "assert 'matplotlib.pyplot' not in sys.modules and 'torch' not in sys.modules; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "--run", str(run)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (run / "analysis" / "train_active_experts.png").read_bytes().startswith(PNG)
