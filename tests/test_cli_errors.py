"""Bad input at the command line: every command (train, sample, evaluate, analyze, extract, study, demo, convert,
upcycle; `dit-moe` and the old entry points alike) exits with code 2 and one line that names the key,
file or value, before any work and without creating anything. Also: the config validation pass, the error base,
FID of identical sets, 16-bit images in extraction."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train as train_cli
from dit_moe.config import ConfigError, ExperimentConfig, load_config
from dit_moe.errors import DataError, DitMoeError, EvaluationError, InputNotFoundError, TrainingError, one_line
from dit_moe.validation import validate
from dit_moe.weights.checkpoint import CheckpointError

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
    (["train.expert_parallel=2"], "train.expert_parallel=2 must divide the number of processes (1)"),
    (["train.expert_parallel=3"], "train.expert_parallel=3 must divide the 8 experts per MoE layer"),
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
        ([gen, gen, "--metrics", "kid", "--kid-subset-size", "5"],
         f"--kid-subset-size 5 is larger than the 4 images of the generated set {gen}; use at most 4"),
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

    def raw_and_clamped(seed):
        rng = np.random.default_rng(seed)
        mu, sigma = feature_statistics(rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)))
        # the formula without the clamp (frechet_distance's own steps)
        w, v = np.linalg.eigh((sigma + sigma.T) / 2)
        root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        m = root @ sigma @ root
        raw = 2 * np.trace(sigma) - 2 * np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
        return raw, frechet_distance(mu, sigma, mu, sigma)

    # Round-off of identical statistics has either sign, and which seeds give which depends on the LAPACK build:
    # among 20 seeds some leave a negative number, which the clamp must turn into exactly 0.
    results = [raw_and_clamped(seed) for seed in range(20)]
    assert any(raw < 0 for raw, _ in results)
    for raw, fid in results:
        assert fid == (0.0 if raw < 0 else raw) and fid < 1e-6
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


# ---------------------------------------------------------------------------------------------------------
#                                  The one command: dit-moe and its subcommands
# ---------------------------------------------------------------------------------------------------------

def _env():
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1")


def test_dit_moe_help_lists_every_command_without_loading_torch():
    from dit_moe.cli import COMMANDS

    code = ("import sys; from dit_moe.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert 'torch' not in sys.modules, 'dit-moe --help imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert set(COMMANDS) >= {"train", "sample", "evaluate", "analyze", "extract", "study", "demo", "models", "convert",
                             "upcycle"}
    for name, command in COMMANDS.items():           # one line each: the name and its help
        assert any(line.split()[:1] == [name] and command.help in line for line in lines), (name, proc.stdout)
    proc = subprocess.run([sys.executable, "-m", "dit_moe", "--help"], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.splitlines() == lines, proc.stderr


@pytest.mark.parametrize("name", ["train", "sample", "evaluate", "analyze", "extract", "study", "demo", "models",
                                  "convert", "upcycle"])
def test_every_command_mounts_its_own_arguments(name, capsys):
    from dit_moe.cli import main

    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: dit-moe {name} ")
    assert "--help" in out and len(out.splitlines()) > 3


def test_unknown_command_and_bad_flag_exit_2(capsys):
    from dit_moe.cli import main

    for argv, match in ((["trian"], "invalid choice: 'trian'"), ([], "required: COMMAND"),
                        (["sample", "ckpt", "--nope"], "unrecognized arguments: --nope")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and match in capsys.readouterr().err


def test_models_command_and_train_through_dit_moe(tmp_path, capsys):
    from dit_moe.cli import main

    assert main(["models", "--input-size", "32"]) == 0 and "DiT-XL/2" in capsys.readouterr().out
    # options between the overrides, as train.py always took them
    assert main(["train", f"train.run_dir={tmp_path}", "--config", DEFAULT, "routing.target=9"]) == 2
    line = one_error_line(capsys, "dit-moe train")
    assert "routing.target=9.0 must be in [1, 8]" in line and list(tmp_path.iterdir()) == []


SHARDED = """
import atexit, sys
import dit_moe.training.fsdp as fsdp
from dit_moe.cli import main
fsdp._sharded_over_processes = {sharded}
atexit.register(lambda: print("interpreter teardown ran"))
code = main(sys.argv[1:])
print("main returned", code)
sys.exit(code)
"""


@pytest.mark.parametrize("sharded", [True, False])
def test_a_process_that_sharded_a_model_ends_without_teardown_with_its_exit_code(tmp_path, sharded):
    """After train.strategy=fsdp over several ranks the command's exit code is kept, its output flushed, and the
    interpreter teardown (where torch's leftover process group can abort a rank) skipped; otherwise nothing changes."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    script = SHARDED.format(sharded=sharded)
    for argv, code, out in ((["models", "--input-size", "32"], 0, "DiT-XL/2"),
                            (["train", f"train.run_dir={tmp_path}", "routing.target=9"], 2, "")):
        proc = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == code, proc.stderr[-2000:]
        assert out in proc.stdout
        if code == 2:
            assert "dit-moe train: error:" in proc.stderr and "routing.target=9.0" in proc.stderr
        ran_teardown = "interpreter teardown ran" in proc.stdout and "main returned" in proc.stdout
        assert ran_teardown is not sharded, proc.stdout[-500:]


def test_every_user_error_class_derives_from_the_base():
    from dit_moe.weights.outputs import ConvertError
    from dit_moe.inference import InferenceError
    from dit_moe.analyze import AnalysisError
    from dit_moe.sampling import SamplingError
    from dit_moe.weights.layouts import LayoutError
    from dit_moe.study import StudyError
    from dit_moe.weights.upcycle import UpcycleError

    for cls in (SamplingError, AnalysisError, InferenceError, StudyError, ConvertError, LayoutError, UpcycleError):
        assert issubclass(cls, DitMoeError) and issubclass(cls, ValueError), cls


def test_os_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import dit_moe.analyze.cli as analyze_cli
    from dit_moe.cli import main

    def denied(args):
        raise PermissionError(13, "Permission denied", "/read-only/analysis")
    monkeypatch.setattr(analyze_cli, "run", denied)
    assert main(["analyze", "--run", "x"]) == 2
    line = one_error_line(capsys, "dit-moe analyze")
    assert "Permission denied" in line and "/read-only/analysis" in line

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(analyze_cli, "run", interrupted)
    assert main(["analyze", "--run", "x"]) == 130
    assert capsys.readouterr().err.strip() == "dit-moe analyze: interrupted (Ctrl-C)"

    def bug(args):
        raise KeyError("a bug")
    monkeypatch.setattr(analyze_cli, "run", bug)
    with pytest.raises(KeyError):
        main(["analyze", "--run", "x"])


# ---------------------------------------------------------------------------------------------------------
#                                 sample, analyze: every flag before any work
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A Top-k MoE run folder and a dense checkpoint of 8x8 one-channel 'digits' (10 classes)."""
    from dit_moe.weights.checkpoint import save_checkpoint
    from dit_moe.config import RoutingConfig
    from dit_moe.data import DataInfo
    from dit_moe.registry import build_model

    root = tmp_path_factory.mktemp("ckpts")
    info = DataInfo(num_classes=10, in_channels=1, latent_size=8, image_size=8, class_names=tuple(map(str, range(10))),
                    vae=None, scaling_factor=1.0, source="test").to_dict()
    torch.manual_seed(0)
    moe = build_model("DiT-T/2-E4K2", RoutingConfig(type="topk"), input_size=8, in_channels=1, num_classes=10)
    save_checkpoint(root / "run" / "checkpoints" / "step-0000005", moe, moe, step=5, data_info=info)
    dense = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    save_checkpoint(root / "dense", dense, dense, step=5, data_info=info)
    return root / "run", root / "dense"


def _inputs(tmp_path):
    """A folder, a plain file, a non-image folder and a broken 'npz' to point flags at."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    return tmp_path


def _no_sampling(monkeypatch):
    import dit_moe.sampling.loop as loop

    def solve(*args, **kwargs):
        raise AssertionError("sampled despite bad input")
    monkeypatch.setattr(loop, "solve", solve)


BAD_SAMPLE = [
    (["--batch-size", "0"], "--batch-size: batch_size=0 must be >= 1"),
    (["--num-per-class", "0"], "--num-per-class: num_per_class=0 must be >= 1"),
    (["--steps", "0"], "--steps: steps=0 must be in [1, 1000]"),
    (["--guidance-interval", "0.7", "0.2"], "--guidance-interval: LO=0.7 > HI=0.2"),
    (["--sampler", "euler"], "--sampler: 'euler' is a flow sampler"),
    (["--out", "{tmp}/folder"], "--out {tmp}/folder is a folder; give a file name"),
    (["--out", "{tmp}/file.txt/grid.png"], "{tmp}/file.txt is a file, not a folder"),
    (["--out", "{tmp}/grid"], "unknown image file extension '(none)'"),
    (["--ncol", "0"], "--ncol 0 must be >= 1"),
    (["--target-experts", "0"], "--target-experts 0.0 must be a finite number > 0"),
    (["--target-experts", "2"], "--target-experts needs a DTop-p model"),
    (["--calibration-samples", "0", "--target-experts", "2"], "--calibration-samples 0 must be >= 1"),
    (["--device", "bogus"], "device 'bogus' is not a torch device"),
    (["--fid", "{tmp}/empty"], "--fid needs bulk sampling"),
    (["--num-samples", "0", "--out", "{tmp}/bulk"], "--num-samples 0 must be >= 1"),
    (["--num-samples", "4"], "--num-samples needs --out DIR"),
    (["--num-samples", "4", "--out", "{tmp}/file.txt"], "--out {tmp}/file.txt is a file; give a folder"),
    (["--num-samples", "4", "--out", "{tmp}/bulk", "--fid", "{tmp}/BAD"], "--fid: {tmp}/BAD does not exist"),
    (["--num-samples", "4", "--out", "{tmp}/bulk", "--fid", "{tmp}/empty"], "--fid: image folder {tmp}/empty contains no"),
    (["--num-samples", "4", "--out", "{tmp}/bulk", "--fid", "{tmp}/bad.npz"], "neither a folder of images nor an .npz"),
    (["--num-samples", "4", "--out", "{tmp}/bulk", "--fid", "{tmp}/file.txt"], "neither a folder of images nor an .npz"),
    (["--num-samples", "4", "--out", "{tmp}/bulk", "--fid", "{tmp}/folder", "--extractor", "nope"],
     "unknown feature extractor 'nope'"),
    (["--num-samples", "4", "--out", "{tmp}/bulk", "--fid", "{tmp}/folder", "--metrics", "fid,bogus"],
     "metrics must be a non-empty subset"),
    (["--num-samples", "4", "--out", "{tmp}/bulk", "--fid", "{tmp}/folder", "--inception-weights", "{tmp}/w.pth"],
     "{tmp}/w.pth do not exist"),
]


@pytest.mark.parametrize("args,match", BAD_SAMPLE, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_bad_sample_input_exits_2_with_one_line_and_creates_nothing(checkpoints, tmp_path, capsys, monkeypatch,
                                                                    args, match):
    import sample as sample_cli

    tmp = _inputs(tmp_path)
    _no_sampling(monkeypatch)
    before = sorted(tmp.rglob("*"))
    argv = [str(checkpoints[0]), *[a.format(tmp=tmp) for a in args]]
    if "--device" not in args:
        argv += ["--device", "cpu"]
    assert sample_cli.main(argv) == 2
    line = one_error_line(capsys, "sample.py")
    assert match.format(tmp=tmp) in line, line
    assert sorted(tmp.rglob("*")) == before, "a failed start created files"


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    from dit_moe.cli import main

    for argv in (["sample", str(tmp_path / "nope")], ["analyze", str(tmp_path / "nope")]):
        assert main(argv) == 2
        assert f"{tmp_path / 'nope'}: no such checkpoint or run directory" in one_error_line(capsys, f"dit-moe {argv[0]}")
    assert list(tmp_path.iterdir()) == []


def test_sample_fid_is_checked_before_sampling_from_the_command_line(checkpoints, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "sample.py"), str(checkpoints[0]), "--num-samples", "4",
                           "--out", str(tmp_path / "bulk"), "--fid", str(tmp_path / "BAD"), "--device", "cpu"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"sample.py: error: --fid: {tmp_path / 'BAD'} does not exist"], proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,match", [
    (["{run}", "--num-per-class", "0"], "--num-per-class: num_per_class=0 must be >= 1"),
    (["{run}", "--batch-size", "0"], "--batch-size: batch_size=0 must be >= 1"),
    (["{run}", "--spatial-steps", "0"], "--spatial-steps 0 must be >= 1"),
    (["{run}", "--steps", "0"], "--steps: steps=0 must be in [1, 1000]"),
    (["{run}", "--classes", "99"], "class ids must be in [0, 10)"),
    (["{run}", "--classes", "cat"], "unknown class 'cat'"),
    (["{run}", "--device", "bogus"], "device 'bogus' is not a torch device"),
    (["{run}", "--out", "{tmp}/file.txt"], "--out {tmp}/file.txt is a file; give a folder"),
    (["{dense}"], "is not an MoE model"),
    (["--run", "{tmp}/folder"], "no training log"),
    ([], "give a CHECKPOINT, --run DIR, or both"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_bad_analyze_input_exits_2_with_one_line_and_creates_nothing(checkpoints, tmp_path, capsys, monkeypatch,
                                                                     args, match):
    from dit_moe.analyze import main

    tmp = _inputs(tmp_path)
    _no_sampling(monkeypatch)
    before = sorted(tmp.rglob("*")) + sorted(checkpoints[0].rglob("*"))
    argv = [a.format(tmp=tmp, run=checkpoints[0], dense=checkpoints[1]) for a in args]
    assert main(argv) == 2
    line = one_error_line(capsys, "analyze")
    assert match.format(tmp=tmp) in line, line
    assert sorted(tmp.rglob("*")) + sorted(checkpoints[0].rglob("*")) == before


# ---------------------------------------------------------------------------------------------------------
#                                  study, demo, convert, upcycle: before any work
# ---------------------------------------------------------------------------------------------------------

STUDY = """
output: {out}
base:
  config: {default}
  overrides: [train.steps=2, train.tracker=null]
seeds: [0]
evaluation: {{steps: 2, num_samples: 4, batch_size: 4{evaluation}}}
{comparison}
arms:
  - {{name: topk, overrides: [routing.type=topk]}}
  - {{name: topp, overrides: [routing.type=topp]{calibrate}}}
"""


@pytest.mark.parametrize("edit,args,match", [
    ({}, ["--jobs", "0"], "--jobs 0 must be >= 1"),
    ({}, ["--arms", "bogus"], "--arms: unknown arm(s) bogus; arms: topk, topp"),
    ({}, ["--seeds", "1", "1"], "--seeds [1, 1]: seeds must be distinct"),
    ({}, ["--device", "bogus"], "device 'bogus' is not a torch device"),
    ({}, ["--output", "{tmp}/file.txt"], "output {tmp}/file.txt is a file; give a folder"),
    ({}, ["--plots-dir", "{tmp}/file.txt"], "--plots-dir {tmp}/file.txt is a file; give a folder"),
    ({}, ["train.lr=nan"], "arm 'topk': "),
    ({}, ["train.stepz=1"], "unknown key(s) stepz"),
    ({"evaluation": ", num_sample: 3"}, [], "evaluation: unknown key(s) num_sample"),
    ({"evaluation": ", steps: two"}, [], "evaluation.steps: expected an integer, got 'two'"),
    ({"evaluation": ", sampler: bogus"}, [], "evaluation.sampler: 'bogus' is not one of"),
    ({"evaluation": ", num_samples: 0"}, [], "evaluation.num_samples=0 must be >= 1"),
    ({"evaluation": ", reference: {tmp}/BAD.npz"}, [], "evaluation.reference: {tmp}/BAD.npz does not exist"),
    ({"evaluation": ", reference: {tmp}/bad.npz"}, [], "evaluation.reference: {tmp}/bad.npz is neither"),
    ({"evaluation": ", extractor: nope"}, [], "unknown feature extractor 'nope'"),
    ({"calibrate": ", calibrate: {from: nope}"}, [], "arms[1] (topp).calibrate.from: no arm named 'nope'"),
    ({"calibrate": ", calibrate: {from: topk, targt: 2}"}, [], "arms[1].calibrate: unknown key(s) targt"),
    ({"calibrate": ", calibrate: {target: 2}"}, [], "arms[1].calibrate: missing key(s) from"),
    ({"calibrate": ", calibrate: {from: topk, target: 0.5}"}, [], "calibrate.target must be a number >= 1"),
    ({"evaluation": ", flow_sampler: ddim"}, [], "evaluation.flow_sampler: 'ddim' is not one of"),
    ({"comparison": "comparison: {baseline: nope}"}, [], "comparison.baseline: no arm named 'nope'"),
    ({"comparison": "comparison: {interactions: [{name: x, first: [topk, topp], second: [topp, nope]}]}"}, [],
     "comparison.interactions[0].second: no arm named 'nope'"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_bad_study_input_exits_2_with_one_line_and_creates_nothing(tmp_path, capsys, edit, args, match):
    from dit_moe.study import main

    tmp = _inputs(tmp_path)
    text = STUDY.format(out=tmp / "out", default=DEFAULT, evaluation=edit.get("evaluation", ""),
                        calibrate=edit.get("calibrate", ""), comparison=edit.get("comparison", "")
                        ).replace("{tmp}", str(tmp))
    (tmp / "study.yaml").write_text(text)
    before = sorted(tmp.rglob("*"))
    assert main([str(tmp / "study.yaml"), *[a.format(tmp=tmp) for a in args]]) == 2
    line = one_error_line(capsys, "study")
    assert match.format(tmp=tmp) in line, line
    assert sorted(tmp.rglob("*")) == before and not (tmp / "out").exists()


@pytest.mark.parametrize("args,match", [
    (["--num-samples", "0"], "--num-samples 0 must be >= 1"),
    (["--sampler", "ddim"], "--sampler: 'ddim' is a DDPM sampler"),    # the embedded default is a flow model
    (["--steps", "0"], "--steps: steps=0 must be in [1, 1000]"),
    (["--device", "bogus"], "device 'bogus' is not a torch device"),
    (["train.steps=0"], "train.steps=0 must be >= 1"),
])
def test_bad_demo_input_exits_2_before_training(tmp_path, capsys, args, match):
    from dit_moe import demo

    assert demo.main([*args, f"train.run_dir={tmp_path / 'runs'}", "train.steps=1" if args[0] != "train.steps=0"
                      else "train.log_every=1"]) == 2
    assert match in one_error_line(capsys, "demo")
    assert not (tmp_path / "runs").exists()


def test_bad_convert_and_upcycle_input_exit_2_and_create_nothing(checkpoints, tmp_path, capsys):
    from dit_moe.weights import convert, upcycle

    tmp = _inputs(tmp_path)
    dense = str(checkpoints[1])
    before = sorted(tmp.rglob("*"))
    for main, prog, argv, match in [
        (convert.main, "convert", [str(tmp / "nope.pt"), "--out", str(tmp / "c")], "nope.pt: no such file or folder"),
        (convert.main, "convert", [str(tmp / "file.txt"), "--out", str(tmp / "c")], "not a PyTorch checkpoint"),
        (convert.main, "convert", [dense, "--out", str(tmp / "file.txt")], "exists and is a file"),
        (convert.main, "convert", [dense, "--out", str(tmp / "c"), "--input-size", "0"], "--input-size 0 must be >= 1"),
        (upcycle.main, "upcycle", [str(tmp / "nope"), "--model", "DiT-T/2-E4K2", "--out", str(tmp / "u")],
         "no such file or folder"),
        (upcycle.main, "upcycle", [dense, "--model", "DiT-T/2", "--out", str(tmp / "u")], "--model DiT-T/2 is dense"),
        (upcycle.main, "upcycle", [dense, "--model", "DiT-T/2-E4K2", "--out", str(tmp / "u"), "--noise", "-1"],
         "--noise -1.0 must be >= 0"),
        (upcycle.main, "upcycle", [dense, "--model", "DiT-T/2-E4K2", "--out", str(tmp / "u"), "routing.targt=2"],
         "unknown key(s) targt"),
    ]:
        assert main(argv) == 2, argv
        assert match in one_error_line(capsys, prog), argv
    assert sorted(tmp.rglob("*")) == before
