"""Checkpoint format: bit-exact round trip, atomic writes, and clear errors on bad input."""
import json
import os
import stat

import pytest
import torch

from dit_moe.config import ExperimentConfig
from dit_moe.registry import build_model
from dit_moe.weights.build import build_from_checkpoint, load_weights
from dit_moe.weights.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint


def tiny(name="DiT-T/2", seed=0):
    torch.manual_seed(seed)
    model = build_model(name, input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():  # non-zero everywhere, so a round trip that loses a tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_bit_exact(tmp_path):
    model, ema = tiny(seed=0), tiny(seed=1)
    exp = ExperimentConfig()
    save_checkpoint(tmp_path / "ck", model, ema, step=42, experiment=exp, data_info={"vae": None}, meta={"note": "x"})
    rebuilt, ckpt = build_from_checkpoint(tmp_path / "ck")             # EMA by default
    assert same_state(rebuilt, ema) and not same_state(rebuilt, model)
    raw, _ = build_from_checkpoint(tmp_path / "ck", which="model")
    assert same_state(raw, model)
    assert ckpt.step == 42 and ckpt.data_info == {"vae": None} and ckpt.meta == {"note": "x"}
    assert ckpt.experiment == exp
    assert ckpt.model_config == model.model_config and ckpt.routing_config == model.routing_config
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 999]), torch.tensor([1, 10])
    assert torch.equal(rebuilt(x, t, y), ema.eval()(x, t, y))


def test_run_directory_resolves_to_latest(tmp_path):
    model = tiny()
    for step in (10, 200, 30):
        save_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{step:07d}", model, step=step)
    assert resolve_checkpoint(tmp_path / "run").name == "step-0000200"
    assert load_checkpoint(tmp_path / "run").step == 200


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_corrupt_weights_named(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny(), tiny())
    f = tmp_path / "ck" / "ema.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="ema.safetensors: corrupt or truncated"):
        build_from_checkpoint(tmp_path / "ck")


def test_corrupt_config_named(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny())
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: corrupt"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a dit-moe checkpoint"):
        load_checkpoint(tmp_path / "ck")


def test_other_architecture_refused(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny("DiT-T/4"))
    with pytest.raises(CheckpointError, match="another architecture.*DiT-T/4"):
        load_weights(tiny("DiT-T/2"), tmp_path / "ck")


def test_interrupted_save_keeps_previous(tmp_path):
    good = tiny(seed=0)
    save_checkpoint(tmp_path / "ck", good, step=1)

    def explode(tmp_dir):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", tiny(seed=5), step=2, write_extra=explode)
    assert load_checkpoint(tmp_path / "ck").step == 1
    rebuilt, _ = build_from_checkpoint(tmp_path / "ck", which="model")
    assert same_state(rebuilt, good)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]             # no temporary left behind


def test_overwrite_replaces_atomically(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny(seed=0), step=1)
    save_checkpoint(tmp_path / "ck", tiny(seed=3), step=2, write_extra=lambda d: (d / "extra.txt").write_text("hi"))
    assert load_checkpoint(tmp_path / "ck").step == 2
    assert (tmp_path / "ck" / "extra.txt").read_text() == "hi"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_follow_the_umask(tmp_path, umask):
    """mkdtemp makes 0700 folders and safetensors writes 0600 files: a saved checkpoint gets the modes of any new file
    instead (0755 / 0644 under umask 022), so the rest of a group can read it; a private umask keeps it private."""
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "ckpt", tiny(), step=1, ema=tiny())
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [path, *path.iterdir()]}
    assert modes == {"ckpt": 0o777 & ~umask, "config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask,
                     "ema.safetensors": 0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}
