"""Bad input at the command line: train.py, evaluate and extract exit with code 2 and one line that names the key,
file or value, before any work and without creating anything. Also: the config validation pass, the error base,
FID of identical sets, 16-bit images in extraction."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train as train_cli
from dit_moe.checkpoint import CheckpointError
from dit_moe.config import ConfigError, ExperimentConfig, load_config, validate
from dit_moe.errors import DataError, DitMoeError, EvaluationError, InputNotFoundError, TrainingError, one_line

REPO = Path(__file__).resolve().parents[1]
DEFAULT = str(REPO / "configs" / "default.yaml")

BAD_TRAIN = [
    (["routing.target=9"], "routing.target=9.0 must be in [1, 8]"),
    (["routing.target=0.5"], "routing.target=0.5 must be in [1, 8]"),
    (["routing.p_min=0.5", "routing.p_max=0.2"], "routing.p_min=0.5, routing.p_max=0.2 must satisfy"),
    (["routing.k_max=0"], "routing.k_max=0 must be in [1, 8]"),
    (["routing.k_max=9"], "routing.k_max=9 must be in [1, 8]"),
    (["routing.k_max=1"], "routing.k_max=1 is below the target of 2.0 experts per token"),
    (["routing.kp=-1"], "routing.kp=-1.0 must be >= 0"),
    (["routing.ki=-0.1", "routing.i_max=1"], "routing.ki=-0.1 must be >= 0"),
    (["routing.threshold=1.5"], "routing.threshold=1.5 must be in (0, 1]"),
    (["routing.default_beta=1"], "routing.default_beta=1.0 must be in [0, 1)"),
    (["routing.lb_coef=-0.01"], "routing.lb_coef=-0.01 must be >= 0"),
    (["train.lr=nan"], "train.lr=nan must be a finite number"),
    (["train.lr=inf"], "train.lr=inf must be a finite number"),
    (["train.lr=-1e-4"], "train.lr=-0.0001 must be > 0"),
    (["train.grad_clip=nan"], "train.grad_clip=nan must be a finite number"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    (["train.run_name=../x"], "train.run_name='../x' must be one folder name inside train.run_dir"),
    (["train.run_name=/tmp/elsewhere"], "train.run_name='/tmp/elsewhere' must be one folder name"),
    (["train.steps=0"], "train.steps=0 must be >= 1"),
    (["train.global_batch_size=30", "train.grad_accum=4"], "train.global_batch_size=30 is not divisible by"),
    (["train.ema_decay=1"], "train.ema_decay=1.0 must be in [0, 1)"),
    (["train.keep_last=0"], "train.keep_last=0 must be >= 1"),
    (["train.betas=[0.9, 1.5]"], "train.betas=[0.9, 1.5] must both be in [0, 1)"),
    (["sample.steps=0"], "sample.steps: steps=0 must be in [1, 1000]"),
    (["model.name=DiT-Q/2"], "unknown model name 'DiT-Q/2'"),
    (["model.input_size=7"], "model.input_size=7 is not divisible by the patch size 2"),
    (["model.in_channels=4"], "model.in_channels=4 but the data (builtin:digits) has 1"),
    (["train.global_batch_size=4096"], "larger than the dataset"),
    (["data.source=latents"], "data.path must name the extraction folder"),
    (["data.source=latents", "data.path=/nonexistent/latents"], "latent directory '/nonexistent/latents' does not exist"),
    (["data.path=mnist"], "unknown builtin dataset 'mnist'"),
    (["train.stepz=3"], "unknown key(s) stepz"),
    (["train.steps=abc"], "train.steps: expected an integer"),
    (["--resume", "/nonexistent/run"], "/nonexistent/run: no such checkpoint or run directory"),
    (["--config", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
]


def one_error_line(capsys, prog):
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: "), err[0]
    return err[0]


@pytest.mark.parametrize("args,match", BAD_TRAIN, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_bad_train_input_exits_2_with_one_line_and_creates_nothing(tmp_path, capsys, args, match):
    rc = train_cli.main(["--config", DEFAULT, f"train.run_dir={tmp_path / 'runs'}", *args])
    line = one_error_line(capsys, "train.py")
    assert rc == 2 and match in line, line
    assert not (tmp_path / "runs").exists(), "a failed start created the run folder"


def test_every_problem_in_one_line(tmp_path, capsys):
    rc = train_cli.main(["--config", DEFAULT, f"train.run_dir={tmp_path}", "routing.target=9", "train.lr=nan",
                         "data.num_workers=-1", "routing.p_min=0.9", "routing.p_max=0.1"])
    line = one_error_line(capsys, "train.py")
    assert rc == 2 and "(4 problems)" in line
    for key in ("routing.target=9.0", "train.lr=nan", "data.num_workers=-1", "routing.p_min=0.9"):
        assert key in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override,match", [("train.lr=inf", "train.lr=inf must be a finite number"),
                                            ("routing.k_max=0", "routing.k_max=0 must be in [1, 8]")])
def test_bad_train_input_from_the_command_line(tmp_path, override, match):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", DEFAULT, f"train.run_dir={tmp_path}",
                           override], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and match in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_unexpected_bugs_keep_their_traceback(tmp_path, monkeypatch):
    import dit_moe.training.loop as loop

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(loop, "build_objective", bug)
    with pytest.raises(ZeroDivisionError):
        train_cli.main(["--config", DEFAULT, f"train.run_dir={tmp_path}", "train.steps=1", "train.tracker=null"])


# ---------------------------------------------------------------------------------------------------------
#                                         The validation pass
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("study-")),
                         ids=lambda p: p.name)
def test_shipped_configs_pass_validation(path):
    cfg = load_config(path)
    if cfg.data.source == "latents" and cfg.data.path is None:      # given on the command line
        cfg = load_config(path, ["data.path=latents/imagenet256"])
    validate(cfg)
    validate(ExperimentConfig())


def test_dense_models_ignore_the_routing_section():
    validate(load_config(None, ["model.name=DiT-S/2", "routing.target=99", "routing.k_max=0"]))
    with pytest.raises(ConfigError, match="routing.target"):
        validate(load_config(None, ["model.name=DiT-S/2-E8K2", "routing.target=99"]))


def test_error_base():
    for cls in (ConfigError, CheckpointError, DataError, InputNotFoundError, EvaluationError, TrainingError):
        assert issubclass(cls, DitMoeError)
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(InputNotFoundError, FileNotFoundError) and issubclass(CheckpointError, RuntimeError)
    # a DataLoader worker folds its traceback into the message; the user sees the original line
    worker = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                       '  File "x.py", line 1, in f\ndit_moe.errors.DataError: shard s.safetensors is bad')
    assert one_line(worker) == "shard s.safetensors is bad"
    assert one_line(ConfigError("a\nb")) == "a b"


# ---------------------------------------------------------------------------------------------------------
#                                               evaluate
# ---------------------------------------------------------------------------------------------------------

def write_images(folder, n, size, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return str(folder)


def test_bad_evaluate_input_exits_2_with_one_line(tmp_path, capsys):
    from dit_moe.evaluate import main

    gen = write_images(tmp_path / "gen", 4, 16)
    small = write_images(tmp_path / "small", 4, 8)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "00000.png").write_bytes(b"not a png")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    tiny = ["--extractor", "test-tiny", "--device", "cpu"]
    cases = [
        ([str(tmp_path / "nowhere"), gen], "nowhere does not exist"),
        ([gen, small], "resolution mismatch"),
        ([gen, gen, "--batch-size", "0"], "--batch-size 0 must be >= 1"),
        ([gen, gen, "--num-workers", "-1"], "--num-workers -1 must be >= 0"),
        ([gen, gen, "--kid-subset-size", "0"], "--kid-subset-size 0 must be >= 1"),
        ([gen, gen, "--out", str(tmp_path)], f"--out {tmp_path} is a folder"),
        ([gen, gen, "--out", str(tmp_path / "bad.json" / "m.json")], "is a file, not a folder"),
        ([gen, gen, "--metrics", "fid,bogus"], "metrics must be a non-empty subset"),
        ([gen, gen, "--settings", str(tmp_path / "missing.json")], "--settings"),
        ([gen, gen, "--settings", str(tmp_path / "bad.json")], "is not valid JSON"),
        ([gen, gen, "--settings", str(tmp_path / "list.json")], "must hold a JSON object"),
        ([gen, gen, "--inception-weights", str(tmp_path / "w.pth")], "w.pth does not exist"),
        ([gen, gen, "--extractor", "nope"], "unknown feature extractor 'nope'"),
        ([gen, str(broken)], "00000.png cannot be read"),
        ([gen, gen, "--metrics", "isc"], "isc needs at least 10 generated images"),
    ]
    before = sorted(tmp_path.rglob("*"))
    for args, match in cases:
        extra = tiny if "--extractor" not in args else ["--device", "cpu"]
        assert main(args + extra) == 2, args
        line = one_error_line(capsys, "evaluate")
        assert match in line, (args, line)
    assert sorted(tmp_path.rglob("*")) == before


def test_fid_of_identical_sets_is_not_negative(tmp_path, capsys):
    from dit_moe.evaluate import feature_statistics, frechet_distance, main

    rng = np.random.default_rng(2)
    mu, sigma = feature_statistics(rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)))
    # the formula without the clamp (frechet_distance's own steps): round-off leaves a negative number here
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root @ sigma @ root
    raw = 2 * np.trace(sigma) - 2 * np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    assert raw < 0
    assert frechet_distance(mu, sigma, mu, sigma) == 0.0
    gen = write_images(tmp_path / "gen", 8, 16)
    assert main([gen, gen, "--extractor", "test-tiny", "--device", "cpu"]) == 0
    fid = float(capsys.readouterr().out.split("fid:")[1].split()[0])
    assert fid >= 0.0


# ---------------------------------------------------------------------------------------------------------
#                                               extract
# ---------------------------------------------------------------------------------------------------------

def test_16_bit_grey_png_is_rescaled_not_saturated(tmp_path):
    from dit_moe.extract import load_image

    a = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    x = load_image(tmp_path / "g16.png", 32)                            # 32 = the image side: no resampling
    expected = torch.from_numpy(np.round(a * (255 / 65535)) / 127.5 - 1).float()
    assert x.shape == (3, 32, 32) and torch.allclose(x[0], expected, atol=1e-6) and torch.equal(x[0], x[2])
    assert len(torch.unique(x)) > 200                                   # Pillow's convert("RGB") left 17 levels
    Image.fromarray(np.zeros((8, 8), dtype=np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match="'F' images"):
        load_image(tmp_path / "f.tiff", 8)


def test_bad_extract_input_exits_2_with_one_line(tmp_path, capsys):
    from dit_moe.extract import main

    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "a.png")
    out = tmp_path / "out"
    for args, match in [([str(tmp_path / "nowhere"), str(out)], "nowhere' does not exist"),
                        ([str(tmp_path / "images"), str(out), "--image-size", "12"], "multiple of 8"),
                        ([str(tmp_path / "images"), str(out), "--num-workers", "-1"], "num_workers must be >= 0"),
                        ([str(tmp_path / "images"), str(out), "--vae", str(tmp_path / "no-vae")],
                         "cannot load an AutoencoderKL")]:
        assert main(args) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("extract: error: ")]
        assert len(errors) == 1 and match in errors[0], errors   # (the hub client may warn on stderr too)
    assert not out.exists()
