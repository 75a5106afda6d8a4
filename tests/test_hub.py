"""Hub folders: a trained tiny MoE checkpoint exported with its model card, loaded back (path and cached Hub id)
with identical outputs, nothing but the three files, and the refusals (non-empty --out, --push-to-hub offline)."""
import json
import re
import shutil

import pytest
import torch

from dit_moe.config import load_config
from dit_moe.inference import load
from dit_moe.registry import count_params
from dit_moe.sampling import main as sample_main, make_generators
from dit_moe.training import train
from dit_moe.weights.build import build_from_checkpoint
from dit_moe.weights.checkpoint import list_checkpoints, load_checkpoint
from dit_moe.weights.convert import main as convert_main
from dit_moe.weights.diffusers_moe import pipeline_from_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DiT-T/2-E4K2 DTop-p run on the digits: 4 steps, routing logged every 2, then a bulk sample with --fid
    (test-tiny features) into the run folder, whose metrics.json names the checkpoint's step."""
    root = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [
        "model.name=DiT-T/2-E4K2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
        "routing.type=dtopp", "routing.target=2", "data.source=builtin", f"train.run_dir={root}",
        "train.run_name=moe", "train.tracker=null", "train.global_batch_size=16", "train.lr=1e-3",
        "train.ema_decay=0.9", "train.log_every=2", "train.ckpt_every=1000", "train.steps=4",
        "sample.sampler=ddim", "sample.steps=2", "sample.num_per_class=1"])
    run = train(cfg)
    ckpt = list_checkpoints(run)[-1]
    ref = root / "ref"
    assert sample_main([str(ckpt), "--num-samples", "10", "--out", str(ref), "--device", "cpu", "--no-progress",
                        "--seed", "1"]) == 0
    assert sample_main([str(ckpt), "--num-samples", "10", "--out", str(run / "eval"), "--device", "cpu",
                        "--no-progress", "--fid", str(ref / "samples.npz"), "--extractor", "test-tiny",
                        "--metrics", "fid,sfid"]) == 0
    return run, ckpt


def _last_routing_record(run):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "active_experts" in r][-1]


def test_export_holds_the_three_files_and_loads_back_identically(trained, tmp_path, capsys):
    run, ckpt = trained
    out = tmp_path / "hub"
    assert convert_main([str(run), "--to", "hub", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    # nothing but the listed files: no optimizer, scheduler, RNG or Accelerate state
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (ckpt / "accelerate").is_dir()                              # ... which the source checkpoint has
    config = json.loads((out / "config.json").read_text())
    assert config["routing"]["type"] == "dtopp" and config["experiment"]["diffusion"]["objective"] == "ddpm"
    assert config["experiment"]["sample"]["sampler"] == "ddim" and config["meta"]["hub_export"]["weights"] == "ema"
    assert config["data_info"]["vae"] is None                         # the decoder reference: pixels here
    # dit-moe loads it as a checkpoint: the same EMA network, identical outputs
    ours, _ = build_from_checkpoint(ckpt, which="ema")
    back = load(out, device="cpu")
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([10, 500, 999]), torch.tensor([1, 2, 3])
    torch.testing.assert_close(back.model(x, t, y), ours(x, t, y), rtol=0, atol=0)
    assert back.checkpoint.step == load_checkpoint(ckpt).step == 4
    # ... and so does the diffusers pipeline
    kw = dict(class_labels=[1, 2], num_inference_steps=3, guidance_scale=1.5, output_type="latent")
    torch.testing.assert_close(pipeline_from_checkpoint(out)(**kw, generator=make_generators(0, range(2))).images,
                               pipeline_from_checkpoint(ckpt)(**kw, generator=make_generators(0, range(2))).images,
                               rtol=0, atol=0)
    # every command that takes a checkpoint takes the folder
    assert sample_main([str(out), "--classes", "3", "--num-per-class", "1", "--out", str(tmp_path / "g.png"),
                        "--device", "cpu"]) == 0


def test_model_card_names_routing_activated_experts_and_metrics(trained, tmp_path):
    run, ckpt = trained
    out = tmp_path / "hub"
    assert convert_main([str(ckpt), "--to", "hub", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: dit-moe" in card and "mixture-of-experts" in card
    assert "Router: `dtopp`" in card and "target=2" in card
    rec = _last_routing_record(run)
    assert f"step {rec['step']}): {rec['active_experts']:.4g} per token" in card
    counts = count_params(load_checkpoint(ckpt).model_config, load_checkpoint(ckpt).routing_config)
    assert f"{counts['total_params'] / 1e6:.2f} M total, {counts['active_params'] / 1e6:.2f} M activated" in card
    assert f"{counts['gflops']:.3f} GMACs" in card
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert f"fid {metrics['metrics']['fid']:.4g}, sfid {metrics['metrics']['sfid']:.4g}" in card
    assert "feature_extractor=test-tiny" in card and "checkpoint_step=4" in card
    assert "steps: 4 (of 4 planned), global batch 16" in card
    assert re.search(r"dit-moe sample \S+ --num-samples 50000 .*--metrics fid,sfid,isc,kid,prc", card)
    assert "pipeline_from_checkpoint(" in card


def test_raw_weights_and_refusals(trained, tmp_path, capsys):
    run, ckpt = trained
    out = tmp_path / "raw"
    assert convert_main([str(ckpt), "--to", "hub", "--out", str(out), "--weights", "raw"]) == 0
    raw, _ = build_from_checkpoint(ckpt, which="model")
    back, _ = build_from_checkpoint(out)
    for k, v in raw.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert json.loads((out / "config.json").read_text())["meta"]["hub_export"]["weights"] == "raw"
    capsys.readouterr()
    # a non-empty folder is not replaced without --overwrite; with it, a Hub folder is
    assert convert_main([str(ckpt), "--to", "hub", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert convert_main([str(ckpt), "--to", "hub", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["meta"]["hub_export"]["weights"] == "ema"
    # --push-to-hub offline (the tests run with HF_HUB_OFFLINE=1): one line, exit 2, nothing written at all
    capsys.readouterr()
    assert convert_main([str(ckpt), "--to", "hub", "--out", str(tmp_path / "pushed"), "--push-to-hub", "me/m"]) == 2
    err = capsys.readouterr().err.strip()
    assert "offline (HF_HUB_OFFLINE=1), nothing uploaded" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "pushed").exists()
    assert convert_main([str(ckpt), "--to", "hub", "--out", str(tmp_path / "m"), "--metrics-json",
                         str(tmp_path / "none.json")]) == 2
    assert "--metrics-json" in capsys.readouterr().err


def test_hub_id_from_the_cache(trained, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    run, ckpt = trained
    folder = tmp_path / "hub"
    assert convert_main([str(ckpt), "--to", "hub", "--out", str(folder)]) == 0
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--someone--tiny-moe" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (cache / "models--someone--tiny-moe" / "refs").mkdir()
    (cache / "models--someone--tiny-moe" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert load_checkpoint("someone/tiny-moe").path == snapshot
    assert sample_main(["someone/tiny-moe", "--classes", "1", "--num-per-class", "1", "--out",
                        str(tmp_path / "g.png"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert sample_main(["someone/absent", "--out", str(tmp_path / "h.png"), "--device", "cpu"]) == 2
    assert "someone/absent: no such checkpoint or run directory, nor a Hugging Face Hub model in the cache" \
        in capsys.readouterr().err
