"""Config: YAML loading, dotted overrides, and errors that name the key."""
from pathlib import Path

import pytest

from dit_moe.config import ConfigError, ExperimentConfig, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=2e-4", "routing.type=dtopp", "model.name=DiT-S/2-E8K2", "train.grad_clip=null",
                             "train.betas=[0.9, 0.95]", "routing.kp=1"])
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.routing.type == "dtopp" and cfg.model.name == "DiT-S/2-E8K2"
    assert cfg.train.grad_clip is None and cfg.train.betas == (0.9, 0.95)
    assert cfg.routing.kp == 1.0 and isinstance(cfg.routing.kp, float)


def test_yaml_file_and_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: DiT-T/2\n  input_size: 8\ntrain:\n  steps: 7\n")
    cfg = load_config(p, ["train.steps=9"])
    assert cfg.model.input_size == 8 and cfg.train.steps == 9
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override,match", [
    ("train.lrr=1", r"train: unknown key\(s\) lrr; valid keys: run_dir, .*lr,"),
    ("trian.lr=1", r"unknown section 'trian'; valid sections: model, routing, data, train, sample"),
    ("train.steps=1.5", r"train.steps: expected an integer, got 1.5"),
    ("train.steps=abc", r"train.steps: expected an integer"),
    ("routing.type=topq", r"routing.type: 'topq' is not one of"),
    ("model.learn_sigma=1", r"model.learn_sigma: expected true/false"),
    ("train.lr", r"expected section.key=value"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("model:\n  nmae: DiT-S/2\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: model: unknown key\(s\) nmae"):
        load_config(tmp_path / "typo.yaml")


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("study-")),
                         ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    """Every experiment config we ship loads (study-*.yaml are study configs: tests/test_study.py loads each)."""
    load_config(path)


def test_string_fields_keep_command_line_text():
    cfg = load_config(None, ["train.run_name=nan", "model.name=DiT-S/2", "train.tracker=null", "train.run_dir=123"])
    assert cfg.train.run_name == "nan" and cfg.train.run_dir == "123" and cfg.train.tracker is None
