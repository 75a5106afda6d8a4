"""The installed toolkit runs outside the repository: the wheel carries the shipped configs, and `dit-moe train` and
`dit-moe demo` find `default` from any folder after a plain (non-editable) install into a fresh venv.

The fresh venv gets the wheel alone (--no-deps); its dependencies come from this test environment through a path
line, so nothing is downloaded and no file of the checkout is importable from it."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.steps=2", "train.log_every=1", "train.ckpt_every=2", "train.global_batch_size=16",
        "train.warmup_steps=1", "train.tracker=null", "sample.num_per_class=1", "sample.steps=2"]


def _run(cmd, cwd, env):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_runs_train_and_demo_outside_the_repository(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # The wheel is built from a copy of what it packages: the build writes build/ and *.egg-info beside
    # pyproject.toml, and a test writes nothing into the checkout (another worker may be reading it).
    src = tmp_path / "src"
    shutil.copytree(REPO / "dit_moe", src / "dit_moe", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "wheel",
          src], tmp_path, env)
    wheel = next((tmp_path / "wheel").glob("dit_moe-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                     env).stdout.strip())
    (site / "test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         tmp_path, env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([python, "-c", "import dit_moe, dit_moe.config as c; print(dit_moe.__file__); "
                  "print(c.find_config('default'))"], work, env).stdout.split()
    assert all(str(venv) in w for w in where), where               # the wheel's copy, not the checkout's
    dit_moe = venv / "bin" / "dit-moe"
    _run([dit_moe, "train", "train.run_dir=runs", *TINY], work, env)
    assert (work / "runs" / "default" / "checkpoints" / "step-0000002").is_dir()
    _run([dit_moe, "train", "--config", "configs/default.yaml", "train.run_dir=runs", "train.run_name=spelled",
          *TINY], work, env)                                       # the repository spelling works too
    out = _run([dit_moe, "demo", "--num-samples", "20", "--device", "cpu", "train.run_dir=demo", *TINY], work, env)
    assert "digits FID:" in out.stdout and (work / "demo" / "default" / "demo.json").is_file()


def test_shipped_configs_by_name_from_any_folder(tmp_path, monkeypatch):
    import pytest

    from dit_moe import study
    from dit_moe.config import CONFIG_DIR, ConfigError, find_config, load_config

    monkeypatch.chdir(tmp_path)
    assert find_config("default") == find_config("default.yaml") == find_config("configs/default.yaml") \
        == CONFIG_DIR / "default.yaml"
    assert load_config("imagenet-S2-E8K2-dtopp").routing.type == "dtopp"
    spec = study.load_study("study-digits-v2")                 # its base config, configs/default.yaml, is found too
    assert spec.base_config == CONFIG_DIR / "default.yaml"
    (tmp_path / "default.yaml").write_text("train: {steps: 7}\n")
    assert load_config("default.yaml").train.steps == 7          # a file that exists wins over the shipped name
    with pytest.raises(ConfigError, match=r"config file not found: elsewhere/default.yaml \(shipped configs, usable "
                                          r"by name: default, imagenet-S2-E8K2-dtopp"):
        load_config("elsewhere/default.yaml")
    # The repository keeps one copy: configs/ is the package's folder.
    assert (REPO / "configs").resolve() == CONFIG_DIR
