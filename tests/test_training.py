"""The training loop on CPU with tiny models: learning, exact resume, metrics, faults, config errors."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from dit_moe.config import ConfigError, load_config
from dit_moe.diffusion import GaussianDiffusion
from dit_moe.training import TrainingDivergedError, TrainingInterrupted, train
from dit_moe.weights.checkpoint import list_checkpoints, load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(REPO, "configs", "default.yaml")


def tiny(tmp_path, name="run", *overrides):
    """A DiT-T/2-E8K2 DTop-p run on the digits, small enough for seconds per test."""
    return load_config(None, [
        "model.name=DiT-T/2-E8K2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
        "routing.type=dtopp", "routing.target=2", "data.source=builtin",
        f"train.run_dir={tmp_path}", f"train.run_name={name}", "train.tracker=null",
        "train.global_batch_size=32", "train.lr=1e-3", "train.warmup_steps=2", "train.lr_schedule=cosine",
        "train.ema_decay=0.9", "train.log_every=2", "train.ckpt_every=1000", "train.steps=4",
        "sample.steps=2", "sample.num_per_class=1",   # the end-of-run EMA grid stays cheap
        *overrides])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def patch_losses(monkeypatch, on_call):
    """Wrap GaussianDiffusion.training_losses; on_call(call_index, terms) may alter the terms or signal."""
    original = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def wrapped(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        calls["n"] += 1
        return on_call(calls["n"], terms) or terms

    monkeypatch.setattr(GaussianDiffusion, "training_losses", wrapped)


def test_training_reduces_loss_and_logs_metrics(tmp_path):
    cfg = tiny(tmp_path, "learn", "train.steps=30", "train.log_every=5", "train.ckpt_every=10",
               "train.keep_last=2", "train.global_batch_size=64", "train.tracker=tensorboard",
               "train.sample_every=15", "sample.steps=5", "sample.num_per_class=2")
    run = train(cfg)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["loss"] < 0.7 * records[0]["loss"], [r["loss"] for r in records]
    for key in ("step", "loss", "mse", "vb", "aux_loss", "lr", "grad_norm", "steps_per_sec", "images_per_sec",
                "active_experts", "active_experts_per_layer", "target_experts", "threshold", "expert_load",
                "load_max", "num_processes"):
        assert key in records[-1], key
    last = records[-1]
    assert last["target_experts"] == 2.0 and last["num_processes"] == 1
    assert 1.0 <= last["active_experts"] <= 8.0 and len(last["active_experts_per_layer"]) == 4
    assert len(last["expert_load"]) == 4 and abs(sum(last["expert_load"][0]) - 1) < 1e-5
    # checkpoints at 10, 20, 30 with keep_last=2; self-describing and resumable
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step-0000020", "step-0000030"]
    ck = load_checkpoint(ckpts[-1])
    assert ck.step == 30 and ck.data_info["num_classes"] == 10 and ck.experiment == cfg
    assert (ckpts[-1] / "accelerate" / "optimizer.bin").is_file()
    assert not list((run / "checkpoints").glob(".*")), "staging/temporary folders left behind"
    assert (run / "config.yaml").is_file() and "parameters:" in (run / "log.txt").read_text()
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000015.png", "step-0000030.png"]


def test_resume_after_sigterm_is_bit_exact(tmp_path, monkeypatch):
    # 10 steps of 2 x 64 micro-batches; 1797 // 128 = 14 steps per epoch... use 256 to cross an epoch (7 steps).
    common = ("train.steps=10", "train.global_batch_size=256", "train.grad_accum=2", "train.ckpt_every=4",
              "train.log_every=3", "train.ema_warmup=true",
              # sample grids at steps 3, 6, 9 must not perturb the training RNG streams
              "train.sample_every=3", "sample.steps=4", "sample.num_per_class=1")
    straight = train(tiny(tmp_path, "straight", *common))

    # The same run, stopped by SIGTERM during step 5 (mid-epoch), then resumed to the end.
    def sigterm_in_step_5(n, terms):
        if n == 9:  # 2 micro-batches per step: call 9 is the first of step 5
            os.kill(os.getpid(), signal.SIGTERM)

    patch_losses(monkeypatch, sigterm_in_step_5)
    cfg = tiny(tmp_path, "resumed", *common)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    assert info.value.step == 5 and info.value.checkpoint.name == "step-0000005"
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-0000004", "step-0000005"]
    monkeypatch.undo()
    resumed = train(cfg, resume="latest")

    a, b = list_checkpoints(straight)[-1], list_checkpoints(resumed)[-1]
    assert a.name == b.name == "step-0000010"
    for file in ("model.safetensors", "ema.safetensors"):
        sa, sb = load_file(str(a / file)), load_file(str(b / file))
        assert sa.keys() == sb.keys()
        assert any("threshold" in k for k in sa), "router controller state must be in the checkpoint"
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{file}:{k} differs after resume"
    # the logged losses after the resume point match too
    la = {r["step"]: r["loss"] for r in read_metrics(straight)}
    lb = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert la[9] == lb[9] and la[10] == lb[10]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    def nan_from_step_5(n, terms):
        if n >= 5:
            terms = dict(terms)
            terms["loss"] = terms["loss"] * float("nan")
            return terms

    patch_losses(monkeypatch, nan_from_step_5)
    cfg = tiny(tmp_path, "diverge", "train.steps=12", "train.ckpt_every=2", "train.log_every=4")
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss .*step-0000004"):
        train(cfg)
    ckpts = list_checkpoints(tmp_path / "diverge")
    assert ckpts[-1].name == "step-0000004"      # the check before the step-6 save caught it
    weights = load_checkpoint(ckpts[-1]).state_dict("model")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="train.global_batch_size=30 is not divisible"):
        train(tiny(tmp_path, "a", "train.global_batch_size=30", "train.grad_accum=4"))
    with pytest.raises(ConfigError, match=r"model.in_channels=4 but the data"):
        train(tiny(tmp_path, "b", "model.in_channels=4"))
    with pytest.raises(ConfigError, match="unknown key.*stepz"):
        tiny(tmp_path, "c", "train.stepz=3")
    run = train(tiny(tmp_path, "d", "train.steps=1"))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tiny(tmp_path, "d", "train.steps=1"))
    with pytest.raises(ConfigError, match="routing.target"):
        train(tiny(tmp_path, "d", "train.steps=2", "routing.target=3"), resume="latest")
    assert run.name == "d"


def test_train_py_cli(tmp_path, capsys):
    import train as cli
    assert cli.main(["--config", DEFAULT, "train.global_batch_size=100", "train.grad_accum=3",
                     f"train.run_dir={tmp_path}"]) == 2
    assert "train.global_batch_size=100" in capsys.readouterr().err
    assert cli.main(["--config", DEFAULT, f"train.run_dir={tmp_path}", "--run-name", "cli",
                     "train.steps=2", "train.global_batch_size=16", "train.tracker=null", "sample.steps=2",
                     "sample.num_per_class=1"]) == 0
    assert (tmp_path / "cli" / "checkpoints" / "step-0000002").is_dir()
    assert load_config(tmp_path / "cli" / "config.yaml").train.steps == 2
