"""Faults that used to lose work: kills at every point of a save, concurrent runs, corrupt checkpoints, disk full,
changed settings on resume, NaN data. Each test says what survives and what the user is told."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_moe.config import load_config, save_config
from dit_moe.diffusion import GaussianDiffusion
from dit_moe.errors import DataError, TrainingInterrupted
from dit_moe.registry import build_model
from dit_moe.training import checkpointing, train
from dit_moe.training.checkpointing import is_intact
from dit_moe.weights import checkpoint as checkpoint_mod
from dit_moe.weights.checkpoint import CheckpointError, list_checkpoints, load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# The tests share the module fixtures `straight` and `stopped_keep_2`: one xdist worker runs them all, so each is
# trained once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("training_faults")


def tiny(tmp_path, name, *overrides):
    """6 steps of a DiT-T/2-E8K2 DTop-p run on the digits, checkpoints every 2 steps."""
    return load_config(None, [
        "model.name=DiT-T/2-E8K2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
        "routing.type=dtopp", "routing.target=2", "data.source=builtin",
        f"train.run_dir={tmp_path}", f"train.run_name={name}", "train.tracker=null",
        "train.global_batch_size=32", "train.lr=1e-3", "train.warmup_steps=2", "train.lr_schedule=cosine",
        "train.ema_decay=0.9", "train.log_every=2", "train.ckpt_every=2", f"train.steps={STEPS}",
        "train.keep_last=1", "sample.steps=2", "sample.num_per_class=1", *overrides])


class Killed(BaseException):
    """A simulated kill: not an Exception, so nothing in the code under test handles it."""


def new_process():
    """What a fresh process would have: no Accelerate singletons left by an interrupted run."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def complete(run):
    """The checkpoints --resume latest can use right now."""
    return [p.name for p in list_checkpoints(run) if is_intact(p)]


def same_weights(a, b):
    for file in ("model.safetensors", "ema.safetensors"):
        sa, sb = load_file(str(a / file)), load_file(str(b / file))
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{file}:{k} differs"


def on_loss_call(monkeypatch, fn):
    """Call fn(n) at the n-th call of the diffusion loss (1 micro-batch per step: n = step index + 1)."""
    original = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def wrapped(self, *args, **kwargs):
        calls["n"] += 1
        fn(calls["n"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", wrapped)


def stop_after(cfg, step, monkeypatch):
    """Run ``cfg`` (6 steps) but stop it by SIGTERM after ``step`` steps; returns the run folder."""
    on_loss_call(monkeypatch, lambda n: n == step and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(TrainingInterrupted):
        train(cfg)
    monkeypatch.undo()
    return Path(cfg.train.run_dir) / cfg.train.run_name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every recovered run must match bit for bit."""
    run = train(tiny(tmp_path_factory.mktemp("straight"), "straight"))
    return list_checkpoints(run)[-1]


@pytest.fixture(scope="module")
def stopped_keep_2(tmp_path_factory):
    """A keep_last=2 run stopped by SIGTERM after step 4 (checkpoints 2 and 4), made once; tests damage a copy."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return stop_after(tiny(tmp_path_factory.mktemp("stopped"), "run", "train.keep_last=2"), 4, monkeypatch)


# ---------------------------------------------------------------------------------------------------------
#                                    Kills at every point of a save
# ---------------------------------------------------------------------------------------------------------

def inject_kill(monkeypatch, point, step, run, seen):
    """Raise Killed at ``point`` of the save of ``step``, recording first what --resume latest would see."""
    name = f"step-{step:07d}"

    def kill():
        seen.append(complete(run))
        raise Killed(point)

    if point == "staging":                      # every rank's Accelerate state written, nothing published
        from accelerate import Accelerator
        original = Accelerator.save_state

        def save_state(self, output_dir=None, **kw):
            result = original(self, output_dir, **kw)
            if name in str(output_dir):
                kill()
            return result
        monkeypatch.setattr(Accelerator, "save_state", save_state)
    elif point == "writing":                    # inside save_checkpoint: model written to the temporary, EMA not
        original = checkpoint_mod.save_file

        def save_file(tensors, filename, metadata=None):
            if f".{name}.tmp-" in filename and filename.endswith("ema.safetensors"):
                kill()
            return original(tensors, filename, metadata=metadata)
        monkeypatch.setattr(checkpoint_mod, "save_file", save_file)
    elif point == "published":                  # the new checkpoint renamed into place, the old not yet retired
        original = checkpointing.save_checkpoint

        def save_checkpoint(path, *args, **kw):
            result = original(path, *args, **kw)
            if Path(path).name == name:
                kill()
            return result
        monkeypatch.setattr(checkpointing, "save_checkpoint", save_checkpoint)
    elif point == "retiring":                   # an old checkpoint renamed to .trash, not yet deleted
        original = shutil.rmtree

        def rmtree(path, *args, **kw):
            if ".trash-" in str(path):
                kill()
            return original(path, *args, **kw)
        monkeypatch.setattr(shutil, "rmtree", rmtree)


@pytest.mark.parametrize("keep_last,point", [(1, "staging"), (1, "writing"), (1, "published"), (1, "retiring"),
                                             (2, "published"), (2, "retiring")])
def test_kill_during_periodic_save_then_resume_latest(tmp_path, monkeypatch, straight, keep_last, point):
    cfg = tiny(tmp_path, "run", f"train.keep_last={keep_last}")
    run, seen = tmp_path / "run", []
    at = 4 if keep_last == 1 or point == "published" else 6       # keep_last=2 first retires at step 6
    inject_kill(monkeypatch, point, at, run, seen)
    with pytest.raises(Killed):
        train(cfg)
    assert seen and seen[-1], f"no complete checkpoint visible at the kill ({point})"
    monkeypatch.undo()
    new_process()
    resumed = train(cfg, resume="latest")
    log = (run / "log.txt").read_text()
    assert f"resumed from {run / 'checkpoints' / seen[-1][-1]}" in log
    assert not list((run / "checkpoints").glob(".*")), "temporaries left after the resumed run"
    assert [p.name for p in list_checkpoints(resumed)][-1] == f"step-{STEPS:07d}"
    assert len(list_checkpoints(resumed)) == keep_last
    same_weights(list_checkpoints(resumed)[-1], straight)


@pytest.mark.parametrize("point", ["staging", "writing", "published", "retiring"])
def test_kill_during_stop_save_then_resume_latest(tmp_path, monkeypatch, straight, point):
    """SIGTERM in step 5 (keep_last=1): the stop-save of step 5 is killed at each point; step 4 or 5 survives."""
    cfg = tiny(tmp_path, "run")
    run, seen = tmp_path / "run", []
    on_loss_call(monkeypatch, lambda n: n == 5 and os.kill(os.getpid(), signal.SIGTERM))
    inject_kill(monkeypatch, point, 5, run, seen)
    with pytest.raises(Killed):
        train(cfg)
    assert seen and seen[-1] in (["step-0000004"], ["step-0000005"], ["step-0000004", "step-0000005"])
    monkeypatch.undo()
    new_process()
    same_weights(list_checkpoints(train(cfg, resume="latest"))[-1], straight)


def test_stop_signal_at_a_checkpoint_step_writes_it_once(tmp_path, monkeypatch, straight):
    cfg = tiny(tmp_path, "run")
    writes = []
    original = checkpointing.save_checkpoint
    monkeypatch.setattr(checkpointing, "save_checkpoint",
                        lambda path, *a, **kw: writes.append(Path(path).name) or original(path, *a, **kw))
    on_loss_call(monkeypatch, lambda n: n == 4 and os.kill(os.getpid(), signal.SIGTERM))   # during step 4
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    assert writes == ["step-0000002", "step-0000004"]          # the periodic save of step 4 is the stop-save
    assert info.value.checkpoint.name == "step-0000004" and info.value.step == 4
    assert load_checkpoint(info.value.checkpoint).meta["reason"] == "periodic"
    monkeypatch.undo()
    same_weights(list_checkpoints(train(cfg, resume="latest"))[-1], straight)


def test_sigkill_during_rotation_then_resume(tmp_path, straight):
    """A real kill -9 while the old checkpoint is being deleted (keep_last=1): lock and trash are left behind."""
    cfg = tiny(tmp_path, "run")
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(f"""
        import os, shutil, signal, sys
        from dit_moe.config import load_config, save_config
        from dit_moe.training import train
        original = shutil.rmtree
        def rmtree(path, *a, **kw):
            if ".trash-" in str(path) and "step-0000002" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(path, *a, **kw)
        shutil.rmtree = rmtree
        train(load_config(sys.argv[1]))
    """))
    save_config(cfg, tmp_path / "cfg.yaml")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "cfg.yaml")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "run.lock").exists()                          # the dead process's lock
    assert complete(run) == ["step-0000004"]
    assert list((run / "checkpoints").glob(".step-0000002.trash-*")), "the kill should leave the trash folder"

    resumed = train(cfg, resume="latest")           # the dead process's lock does not block; its trash is swept
    log = (run / "log.txt").read_text()
    assert "removed the stale lock" in log and "removed 1 temporary folder" in log
    assert f"resumed from {run / 'checkpoints' / 'step-0000004'}" in log
    assert not list((run / "checkpoints").glob(".*")) and not (run / "run.lock").exists()
    same_weights(list_checkpoints(resumed)[-1], straight)


def test_checkpoint_left_aside_by_a_crash_is_recovered(tmp_path, monkeypatch, straight):
    """save_checkpoint overwriting a step moves the old folder aside first; a crash there must not hide it."""
    run = stop_after(tiny(tmp_path, "run"), 4, monkeypatch)
    (run / "checkpoints" / "step-0000004").rename(run / "checkpoints" / ".step-0000004.old-12345")
    assert list_checkpoints(run) == []
    resumed = train(tiny(tmp_path, "run"), resume="latest")
    log = (run / "log.txt").read_text()
    assert "recovered checkpoint" in log and f"resumed from {run / 'checkpoints' / 'step-0000004'}" in log
    same_weights(list_checkpoints(resumed)[-1], straight)


# ---------------------------------------------------------------------------------------------------------
#                                Corrupt checkpoints, missing state, disk full
# ---------------------------------------------------------------------------------------------------------

def _damage(f: Path, damage: str) -> None:
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "delete":
        f.unlink()
    elif damage == "nan":                     # a readable file whose weights are not finite
        from safetensors.torch import load_file, save_file
        state = load_file(str(f))
        state["final_layer.linear.weight"][0, 0] = float("nan")
        save_file(state, str(f), metadata={"format": "pt"})
    elif damage == "unknown-model":           # a hand-edited description naming no known architecture
        c = json.loads(f.read_text())
        c["model"]["name"] = "DiT-Q/2"
        f.write_text(json.dumps(c))


@pytest.mark.parametrize("bad_file,damage,reason", [
    ("accelerate/optimizer.bin", "truncate", ""),
    ("model.safetensors", "truncate", ""),
    ("accelerate/custom_checkpoint_1.pkl", "delete", ""),
    ("accelerate/model.safetensors", "nan", "tensor 'final_layer.linear.weight' has 1 non-finite value"),
    ("ema.safetensors", "nan", "tensor 'final_layer.linear.weight' has 1 non-finite value"),
    ("config.json", "unknown-model", "invalid configuration: unknown model name 'DiT-Q/2'"),
])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, stopped_keep_2, straight, bad_file, damage,
                                                              reason):
    run = tmp_path / "run"
    shutil.copytree(stopped_keep_2, run)          # the same folder as stop_after(...) here would leave
    f = run / "checkpoints" / "step-0000004" / bad_file
    _damage(f, damage)
    resumed = train(tiny(tmp_path, "run", "train.keep_last=2"), resume="latest")
    log = (run / "log.txt").read_text()
    assert f"checkpoint step-0000004 is unusable: {f}" in log and reason in log
    assert f"resumed from {run / 'checkpoints' / 'step-0000002'}" in log
    assert (run / "checkpoints" / "corrupt-step-0000004").is_dir()      # kept for inspection, out of the way
    assert [p.name for p in list_checkpoints(resumed)] == ["step-0000004", "step-0000006"]
    same_weights(list_checkpoints(resumed)[-1], straight)


def test_no_intact_checkpoint_refuses_to_start_afresh(tmp_path):
    run = train(tiny(tmp_path, "run", "train.steps=2"))
    f = run / "checkpoints" / "step-0000002" / "accelerate" / "optimizer.bin"
    f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*optimizer.bin"):
        train(tiny(tmp_path, "run"), resume="latest")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*corrupt-step-0000002"):
        train(tiny(tmp_path, "run"), resume="latest")              # a second try is refused too
    assert not list_checkpoints(run)


def test_missing_rng_state_resumes_with_a_loud_warning(tmp_path):
    cfg = tiny(tmp_path, "run", "train.steps=2")
    run = train(cfg)
    (run / "checkpoints" / "step-0000002" / "accelerate" / "random_states_0.pkl").unlink()
    train(tiny(tmp_path, "run", "train.steps=4"), resume="latest")
    log = (run / "log.txt").read_text()
    assert "WARNING:" in log and "random_states_0.pkl: missing" in log and "NOT bit-identical" in log
    assert "resumed from" in log and list_checkpoints(run)[-1].name == "step-0000004"


@pytest.mark.parametrize("where", ["weights", "weights-safetensors", "accelerate", "accelerate-safetensors"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, where):
    """A full disk in each writer of a checkpoint, as each reports it: OSError, torch.save's RuntimeError, and
    safetensors' own SafetensorError (not an OSError; seen on a 200 MB and a 10 MB tmpfs)."""
    from safetensors import SafetensorError

    import train as cli

    def full(*args, **kwargs):
        if where.endswith("safetensors"):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        raise OSError(errno.ENOSPC, "No space left on device") if where == "weights" else \
            RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")

    if where.startswith("weights"):
        original = checkpoint_mod.save_file
        monkeypatch.setattr(checkpoint_mod, "save_file",
                            lambda t, f, metadata=None: full() if "step-0000004" in f else original(t, f, metadata=metadata))
    elif where == "accelerate-safetensors":       # accelerate writes model.safetensors with safetensors' save_file
        import accelerate.utils.other as acc_other

        original = acc_other.safe_save_file
        monkeypatch.setattr(acc_other, "safe_save_file", lambda t, f, *a, **kw: full() if "step-0000004" in str(f)
                            else original(t, f, *a, **kw))
    else:
        original = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: full() if "step-0000004" in str(f)
                            else original(obj, f, *a, **kw))
    run = tmp_path / "run"
    save_config(tiny(tmp_path, "run"), tmp_path / "run.yaml")
    args = ["--config", str(tmp_path / "run.yaml")]
    assert cli.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]  # not the bar
    assert len(err) == 1 and "could not write checkpoint" in err[0] and "step-0000004" in err[0]
    assert ("PytorchStreamWriter failed" if where == "accelerate" else "No space left on device") in err[0]
    assert f"the previous checkpoint {run / 'checkpoints' / 'step-0000002'} is intact" in err[0]
    assert complete(run) == ["step-0000002"]
    assert not list((run / "checkpoints").glob(".*")), "temporaries of the failed save left behind"
    assert not (run / "run.lock").exists()


# ---------------------------------------------------------------------------------------------------------
#                                    What the user changed on resume
# ---------------------------------------------------------------------------------------------------------

def record_lrs(monkeypatch):
    lrs = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return lrs


def test_new_lr_takes_effect_on_resume(tmp_path, monkeypatch):
    constant = ("train.lr_schedule=constant", "train.warmup_steps=0")
    train(tiny(tmp_path, "run", "train.steps=4", *constant))
    lrs = record_lrs(monkeypatch)
    run = train(tiny(tmp_path, "run", "train.lr=2.5e-4", *constant), resume="latest")
    assert lrs == [2.5e-4, 2.5e-4]                              # steps 5 and 6 run at the new rate
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == [1e-3, 1e-3, 2.5e-4]
    log = (run / "log.txt").read_text()
    assert "train.lr 0.001 -> 0.00025" in log and "runs at lr 0.00025 (the checkpoint's schedule: 0.001)" in log


def test_changed_schedule_is_applied_and_reported(tmp_path, monkeypatch):
    from dit_moe.training import lr_factor

    train(tiny(tmp_path, "run", "train.steps=4"))
    lrs = record_lrs(monkeypatch)
    run = train(tiny(tmp_path, "run", "train.steps=8", "train.betas=[0.8, 0.9]"), resume="latest")
    assert lrs == pytest.approx([1e-3 * lr_factor(s, 8, 2, "cosine", 0.0) for s in range(4, 8)], rel=1e-12)
    log = (run / "log.txt").read_text()
    assert "train.steps 4 -> 8: the learning-rate schedule follows the new values from step 5" in log
    assert "train.betas (0.9, 0.999) -> (0.8, 0.9): applied to the optimizer" in log


def test_metrics_do_not_repeat_steps_after_a_resume(tmp_path, monkeypatch):
    """Killed in step 5 after the step-4 log and checkpoint... and a record of step 6 from a crash after step 6."""
    cfg = tiny(tmp_path, "run", "train.ckpt_every=4", "train.steps=8")
    on_loss_call(monkeypatch, lambda n: n == 7 and (_ for _ in ()).throw(Killed("in step 7")))
    with pytest.raises(Killed):
        train(cfg)
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')                          # a line cut short by the kill
    monkeypatch.undo()
    new_process()
    train(cfg, resume="latest")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    superseded = (run / "metrics-superseded.jsonl").read_text().splitlines()
    assert json.loads(superseded[0])["step"] == 6 and superseded[1].startswith('{"step": 7')


# ---------------------------------------------------------------------------------------------------------
#                                             Bad data
# ---------------------------------------------------------------------------------------------------------

def write_latents(root, n=64, nan_shard=1):
    """A latent directory of n 1x8x8 images in two shards; shard ``nan_shard`` holds a NaN."""
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shards = []
    for k in range(2):
        m = n // 2
        mean = torch.randn(m, 2, 1, 8, 8, generator=g)
        if k == nan_shard:
            mean[3, :, 0, 2, 2] = float("nan")
        name = f"shard-r00-{k:05d}.safetensors"
        save_file({"mean": mean.half(), "std": torch.zeros(m, 2, 1, 8, 8).half(),
                   "label": torch.randint(0, 2, (m,), generator=g)}, str(root / name),
                  metadata={"files": json.dumps([f"c/{k}-{i}.png" for i in range(m)])})
        shards.append({"file": name, "count": m})
    (root / "manifest.json").write_text(json.dumps({
        "format": "dit-moe-latents", "version": 1, "complete": True, "vae": "some/vae", "scaling_factor": 1.0,
        "shift_factor": 0.0, "image_size": 64, "latent_shape": [1, 8, 8], "class_names": ["a", "b"],
        "num_classes": 2, "dtype": "float16", "source": "/nowhere", "shards": shards, "num_images": n,
        "skipped": []}))
    return root


def test_nan_in_the_data_is_reported_as_a_data_problem(tmp_path):
    latents = write_latents(tmp_path / "latents")
    cfg = tiny(tmp_path, "run", "data.source=latents", f"data.path={latents}", "model.num_classes=2",
               "train.global_batch_size=16", "train.steps=8", "train.ckpt_every=100")
    with pytest.raises(DataError, match=r"holds NaN or inf values.*shard-r00-00001.safetensors.*not the learning rate"):
        train(cfg)
    assert not list_checkpoints(tmp_path / "run")


def test_unwritable_metrics_log_stops_with_one_clear_error(tmp_path):
    """metrics.jsonl cannot be appended to (here: a folder is in the way; in life: a full disk)."""
    from dit_moe.errors import TrainingError

    (tmp_path / "run" / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(TrainingError, match=r"cannot append to .*metrics.jsonl.*checkpoints written so far are intact"):
        train(tiny(tmp_path, "run"))
    assert complete(tmp_path / "run") == [] and not (tmp_path / "run" / "run.lock").exists()


# ---------------------------------------------------------------------------------------------------------
#                                              train.init_from
# ---------------------------------------------------------------------------------------------------------

def test_init_from_starts_fresh_runs_only(tmp_path, monkeypatch):
    source = list_checkpoints(train(tiny(tmp_path, "source", "train.steps=2")))[-1]
    src = load_file(str(source / "ema.safetensors"))
    # lr ~ 0: after one step the weights are still the source's EMA weights
    cfg = tiny(tmp_path, "tuned", f"train.init_from={source}", "train.lr=1e-30", "train.steps=1")
    run = train(cfg)
    names = {n for n, _ in build_model(cfg).named_parameters()}      # buffers (router state) move on
    for file in ("model.safetensors", "ema.safetensors"):
        got = load_file(str(list_checkpoints(run)[-1] / file))
        assert all(torch.allclose(got[k], src[k], rtol=0, atol=1e-20) for k in names), file
    assert f"train.init_from: model and EMA start from the weights of {source}" in (run / "log.txt").read_text()
    shutil.rmtree(tmp_path / "source")                     # a resume does not need the source any more
    train(tiny(tmp_path, "tuned", f"train.init_from={source}", "train.lr=1e-30", "train.steps=2"), resume="latest")
    assert list_checkpoints(run)[-1].name == "step-0000002"


@pytest.mark.parametrize("what", ["missing", "other architecture"])
def test_bad_init_from_exits_2_and_leaves_no_run_folder(tmp_path, capsys, what):
    import train as cli

    if what == "missing":
        source, match = tmp_path / "nowhere", "train.init_from="
    else:
        source = list_checkpoints(train(tiny(tmp_path, "dense", "model.name=DiT-T/2", "train.steps=1")))[-1]
        match = "dit-moe upcycle"
    capsys.readouterr()
    save_config(tiny(tmp_path, "run", f"train.init_from={source}"), tmp_path / "run.yaml")
    assert cli.main(["--config", str(tmp_path / "run.yaml")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "run").exists()
