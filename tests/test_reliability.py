"""Faults that used to give a silently wrong result or a traceback (disk full, non-finite weights, live readers,
hand-edited checkpoints, config edge cases, evaluate's KID subset): each is now refused or survived, in one line."""
import dataclasses
import os
from pathlib import Path

import pytest

import train as train_cli
from dit_moe.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT = str(REPO / "configs" / "default.yaml")


def _error_line(capsys, prog="train.py"):
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


# ---------------------------------------------------------------------------------------------------------
#                                         Config edge cases
# ---------------------------------------------------------------------------------------------------------

def test_duplicate_yaml_key_is_refused_naming_key_and_line(tmp_path, capsys):
    f = tmp_path / "dup.yaml"
    f.write_text("train:\n  steps: 1000\n  lr: 0.001\n  steps: 4\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: not valid YAML: .*duplicate key 'steps' \(first given on line 2\)"
                                          r" \(line 4, column 3\)"):
        load_config(f)
    rc = train_cli.main(["--config", str(f), f"train.run_dir={tmp_path / 'runs'}"])
    assert rc == 2 and "duplicate key 'steps'" in _error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_same_key_in_different_sections_and_merges_still_load(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text("base: &b {steps: 3, lr: 0.002}\ntrain:\n  <<: *b\n  steps: 5\nsample:\n  steps: 7\n")
    with pytest.raises(ConfigError, match="unknown section|unknown key"):     # `base` is not a section: parsed fine
        load_config(f)
    f.write_text("train:\n  steps: 5\nsample:\n  steps: 7\n")
    cfg = load_config(f)
    assert (cfg.train.steps, cfg.sample.steps) == (5, 7)


def test_override_into_a_section_that_is_not_a_mapping(tmp_path, capsys):
    f = tmp_path / "list.yaml"
    f.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"override 'train.steps=3': section 'train' is a list in the config file"):
        load_config(f, ["train.steps=3"])
    assert train_cli.main(["--config", str(f), "train.steps=3", f"train.run_dir={tmp_path / 'r'}"]) == 2
    assert "section 'train' is a list" in _error_line(capsys)


def test_non_utf8_config_is_one_line(tmp_path, capsys):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("train:\n  run_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at offset 22\)"):
        load_config(f)
    assert train_cli.main(["--config", str(f), f"train.run_dir={tmp_path / 'r'}"]) == 2
    assert "not UTF-8" in _error_line(capsys)


def test_invalid_yaml_is_one_line_with_its_position(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "\n" not in str(e.value) and "bad.yaml: not valid YAML" in str(e.value) and "line" in str(e.value)


def test_study_yaml_goes_through_the_same_reader(tmp_path):
    from dit_moe import study

    f = tmp_path / "s.yaml"
    f.write_text("seeds: [0]\nseeds: [1]\narms: []\nbase: {}\n")
    with pytest.raises(study.StudyError, match=r"s.yaml: not valid YAML: .*duplicate key 'seeds'"):
        study.load_study(f)


# ---------------------------------------------------------------------------------------------------------
#                                          Training log
# ---------------------------------------------------------------------------------------------------------

TINY = ["train.steps=4", "train.log_every=1", "train.ckpt_every=4", "train.global_batch_size=16",
        "sample.num_per_class=1", "train.tracker=null"]


def test_logged_lr_is_the_rate_of_the_logged_step(tmp_path):
    """Linear warm-up over 4 steps: step N (1-based) ran at lr * N / 4 (it used to log step N + 1's rate)."""
    import json

    from dit_moe.training import train

    cfg = load_config(DEFAULT, [*TINY, "train.warmup_steps=4", "train.lr=0.001", f"train.run_dir={tmp_path}",
                                "train.run_name=lr"])
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([0.001 * n / 4 for n in (1, 2, 3, 4)])


def test_full_disk_at_the_start_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    import errno
    import pathlib

    original = pathlib.Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(".run.lock.tmp"):
            original(self, "")                      # the file is created, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    rc = train_cli.main(["--config", DEFAULT, *TINY, f"train.run_dir={tmp_path / 'runs'}", "train.run_name=r"])
    line = _error_line(capsys)
    assert rc == 2 and "cannot create the run folder" in line and "No space left on device" in line
    assert not (tmp_path / "runs" / "r").exists()


# ---------------------------------------------------------------------------------------------------------
#                                     Bulk sampling on a full disk
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from test_sampling import _save

    return _save(tmp_path_factory.mktemp("ckpt") / "dense")


@pytest.mark.parametrize("what", ["png", "npz"])
def test_full_disk_during_bulk_sampling_names_the_file(tiny_ckpt, tmp_path, monkeypatch, capsys, what):
    import errno

    import numpy as np
    from PIL import Image

    from dit_moe.sampling import main

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if what == "png":
        original = Image.Image.save
        monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: enospc() if ".000004.png." in str(fp)
                            else original(self, fp, *a, **k))
    else:
        monkeypatch.setattr(np.lib.format, "open_memmap", enospc)
    out = tmp_path / "bulk"
    rc = main([str(tiny_ckpt), "--num-samples", "6", "--batch-size", "2", "--out", str(out), "--device", "cpu",
               "--no-progress"])
    line = _error_line(capsys, "sample.py")
    name = out / "images" / "000004.png" if what == "png" else out / "samples.npz"
    assert rc == 2 and line.startswith(f"sample.py: error: {name}: cannot write (No space left on device)"), line
    assert not [p for p in out.rglob(".*") if p.is_file()], "a temporary file was left behind"
    kept = sorted(p.name for p in (out / "images").iterdir())
    assert kept == ([f"{i:06d}.png" for i in range(4)] if what == "png" else [f"{i:06d}.png" for i in range(6)])


# ---------------------------------------------------------------------------------------------------------
#                                        Non-finite weights
# ---------------------------------------------------------------------------------------------------------

def _poison(ckpt_dir, files=("ema.safetensors", "model.safetensors"), name="final_layer.linear.weight"):
    from safetensors.torch import load_file, save_file

    for f in files:
        path = ckpt_dir / f
        state = load_file(str(path))
        state[name][0, 0] = float("nan")
        save_file(state, str(path), metadata={"format": "dit-moe"})


@pytest.mark.parametrize("args", [[], ["--num-samples", "4"]], ids=["grid", "bulk"])
def test_nan_weights_are_refused_for_sampling_naming_the_tensor(tiny_ckpt, tmp_path, capsys, args):
    import shutil

    from dit_moe.sampling import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    _poison(ckpt)
    out = tmp_path / ("grid.png" if not args else "bulk")
    rc = main([str(ckpt), *args, "--out", str(out), "--device", "cpu", "--no-progress"])
    line = _error_line(capsys, "sample.py")
    assert rc == 2 and f"{ckpt / 'ema.safetensors'}: tensor 'final_layer.linear.weight' has 1 non-finite" in line
    assert not out.exists()


def test_nan_weights_are_refused_by_analysis_and_conversion(tiny_ckpt, tmp_path):
    import shutil

    from dit_moe.weights.build import build_from_checkpoint
    from dit_moe.weights.checkpoint import CheckpointError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    _poison(ckpt, files=("model.safetensors",))
    build_from_checkpoint(ckpt, "ema")                         # the EMA weights are fine
    with pytest.raises(CheckpointError, match="model.safetensors: tensor 'final_layer.linear.weight'"):
        build_from_checkpoint(ckpt, "model")
    from dit_moe.weights.convert import main as convert_main
    _poison(ckpt, files=("ema.safetensors",))
    assert convert_main([str(ckpt), "--to", "diffusers", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_non_finite_outputs_stop_sampling_before_writing(tiny_ckpt, tmp_path, monkeypatch):
    """Finite weights, non-finite outputs (an overflow): the batch is refused, no black image is written."""
    from dit_moe import inference, sampling

    bundle = inference.load(tiny_ckpt, device="cpu")
    original = bundle.model.forward_with_cfg
    monkeypatch.setattr(bundle.model, "forward_with_cfg", lambda *a, **k: original(*a, **k) * float("inf"))
    with pytest.raises(sampling.SamplingError, match=r"outputs are not finite \(NaN or inf\) for 4 of 4 samples"):
        sampling.generate(bundle, tmp_path / "out", num_samples=4, progress=False)
    assert not list((tmp_path / "out" / "images").glob("*.png"))


# ---------------------------------------------------------------------------------------------------------
#                                    Weights from another checkpoint
# ---------------------------------------------------------------------------------------------------------

def test_weights_of_another_routing_type_are_refused(tmp_path, capsys):
    """Expert-choice weights copied into a Top-k checkpoint have the same tensor names and shapes; the weight
    files' fingerprint tells them apart. A file without a fingerprint (older checkpoints) still loads."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dit_moe.weights.build import build_from_checkpoint
    from dit_moe.weights.checkpoint import CheckpointError
    from dit_moe.config import RoutingConfig
    from dit_moe.sampling import main
    from test_sampling import _save

    topk = _save(tmp_path / "topk", "DiT-T/2-E4K2", RoutingConfig(type="topk"))
    ec = _save(tmp_path / "ec", "DiT-T/2-E4K2", RoutingConfig(type="expert_choice"))
    assert set(load_file(str(topk / "ema.safetensors"))) == set(load_file(str(ec / "ema.safetensors")))
    mixed = tmp_path / "mixed"
    shutil.copytree(topk, mixed)
    shutil.copy(ec / "ema.safetensors", mixed / "ema.safetensors")
    with pytest.raises(CheckpointError, match=r"ema.safetensors: weights of another architecture or routing than .*"
                                              r"config.json \(routing.type: 'expert_choice' in the weights, 'topk' in"):
        build_from_checkpoint(mixed)
    assert main([str(mixed), "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
    assert "routing.type: 'expert_choice' in the weights" in _error_line(capsys, "sample.py")
    # Written before fingerprints: only the format in the metadata. Loads as before.
    for f in ("ema.safetensors", "model.safetensors"):
        save_file(load_file(str(topk / f)), str(topk / f), metadata={"format": "dit-moe/1"})
    build_from_checkpoint(topk)


# ---------------------------------------------------------------------------------------------------------
#                          Routing statistics of bulk sampling killed mid-batch
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("routing", ["dtopp", "expert_choice"])
def test_statistics_of_a_resumed_bulk_run_count_every_image_once(tmp_path, monkeypatch, routing):
    """A kill between two PNGs of a batch (before its statistics are saved): the resumed run's statistics equal
    an uninterrupted run's, and the images written before the kill are not rewritten."""
    import torch

    import dit_moe.sampling.bulk as bulk
    from dit_moe.config import RoutingConfig
    from dit_moe.data import DataInfo, load_decoder
    from dit_moe.registry import build_model
    from dit_moe.sampling import sample_to_folder
    from test_sampling import DATA_INFO, SETTINGS, SHAPE, _randomise

    torch.manual_seed(0)
    model = _randomise(build_model("DiT-T/2-E4K2", RoutingConfig(type=routing), input_size=8, in_channels=1,
                                   num_classes=10))
    decode = load_decoder(DataInfo.from_dict(DATA_INFO))
    run = lambda out: sample_to_folder(model, out, settings=dataclasses.replace(SETTINGS, batch_size=4),
                                       num_samples=12, num_classes=10, shape=SHAPE, decode=decode, progress=False)
    fresh = run(tmp_path / "fresh")

    class Killed(BaseException):
        pass

    original = bulk._save_png

    def dying(path, img):
        if path.name == "000006.png":
            raise Killed()
        original(path, img)

    monkeypatch.setattr(bulk, "_save_png", dying)
    with pytest.raises(Killed):
        run(tmp_path / "resumed")
    monkeypatch.setattr(bulk, "_save_png", original)
    images = tmp_path / "resumed" / "images"
    assert sorted(p.name for p in images.iterdir()) == [f"{i:06d}.png" for i in range(6)]   # batch 2 half written
    stamps = {p.name: p.stat().st_mtime_ns for p in images.iterdir()}
    info = run(tmp_path / "resumed")
    assert {n: (images / n).stat().st_mtime_ns for n in stamps} == stamps
    a, b = fresh["active_experts"], info["active_experts"]
    assert b["images"] == a["images"] == 12
    for key in ("mean", "per_layer", "per_bucket", "load"):
        assert _close(b[key], a[key]), (key, a[key], b[key])


def _close(a, b) -> bool:
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b if a is None or b is None else a == pytest.approx(b, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
#                                   Reading a run while it trains
# ---------------------------------------------------------------------------------------------------------

def _rotating_run(tmp_path, monkeypatch, tiny_ckpt, reads_before_rotation=0):
    """A run folder with one checkpoint; read number ``reads_before_rotation + 1`` (0: the description, 1: the
    weights) rotates it away (a newer one published, the old one renamed aside and deleted), as
    `train.keep_last=1` does between a reader's listing and its read."""
    import shutil

    import dit_moe.weights.build as build_mod
    import dit_moe.weights.checkpoint as checkpoint_mod

    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(tiny_ckpt, root / "step-0000001")
    calls = []

    def rotating(original, folder_of):
        def read(path):
            calls.append(folder_of(Path(path)))
            if len(calls) == reads_before_rotation + 1:
                shutil.copytree(tiny_ckpt, root / ".staging")
                os.replace(root / ".staging", root / "step-0000002")           # published atomically
                os.replace(root / "step-0000001", root / ".step-0000001.trash")  # rotated: renamed, then deleted
                shutil.rmtree(root / ".step-0000001.trash")
            return original(path)
        return read

    monkeypatch.setattr(build_mod, "load_checkpoint", rotating(build_mod.load_checkpoint, lambda p: p))
    monkeypatch.setattr(checkpoint_mod, "load_tensors", rotating(checkpoint_mod.load_tensors, lambda f: f.parent))
    return tmp_path / "run", calls


@pytest.mark.parametrize("reads", [0, 1])
def test_sampling_a_run_whose_checkpoint_is_rotated_away_reads_the_newest(tmp_path, monkeypatch, tiny_ckpt, reads):
    """Rotated during the first read of its description, or between that and the weights."""
    from dit_moe.sampling import main

    run, calls = _rotating_run(tmp_path, monkeypatch, tiny_ckpt, reads_before_rotation=reads)
    assert main([str(run), "--out", str(tmp_path / "grid.png"), "--device", "cpu"]) == 0
    assert (tmp_path / "grid.png").is_file() and [p.name for p in calls[-1:]] == ["step-0000002"]


def test_an_explicit_checkpoint_that_vanishes_is_still_an_error(tmp_path, monkeypatch, tiny_ckpt):
    from dit_moe.weights.build import build_from_checkpoint
    from dit_moe.weights.checkpoint import CheckpointError

    run, _ = _rotating_run(tmp_path, monkeypatch, tiny_ckpt)
    with pytest.raises(CheckpointError, match="step-0000001: no such checkpoint"):
        build_from_checkpoint(run / "checkpoints" / "step-0000001")


def test_analysing_a_run_whose_checkpoint_is_rotated_away(tmp_path, monkeypatch):
    from dit_moe import analyze
    from dit_moe.config import RoutingConfig
    from test_sampling import _save

    moe = _save(tmp_path / "moe", "DiT-T/2-E4K2", RoutingConfig(type="dtopp"))
    for reads in (0, 1):              # rotated during the first description read, or between it and the weights
        monkeypatch.undo()
        run, calls = _rotating_run(tmp_path / f"r{reads}", monkeypatch, moe, reads_before_rotation=reads)
        report = analyze.analyze_checkpoint(run, num_per_class=1, num_steps=2, out_dir=tmp_path / f"a{reads}",
                                            device="cpu")
        assert report["checkpoint"].endswith("step-0000002"), reads
