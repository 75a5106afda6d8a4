"""Evaluator tests: FID/IS/KID/PRC through torch-fidelity with small registered extractors (no download)."""

import importlib
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from PIL import Image

import dit_moe.features as features
from dit_moe.evaluate import (
    ImageTensorDataset, compute_metrics, feature_statistics, frechet_distance, load_stats, main, make_extractor,
    save_stats,
    write_metrics_json,
)

TINY = dict(feature_extractor="test-tiny", device="cpu", batch_size=32)


def _images(n, size=16, seed=0):
    """Smooth random uint8 images (N, 3, size, size): upsampled 4x4 noise, so features vary across images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 200 + 20).round().to(torch.uint8)


def _write_folder(path, images):
    os.makedirs(path, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(path, f"{i:05d}.png"))
    return str(path)


def _brighter(images, delta):
    return (images.int() + delta).clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    d = 12
    a, b = rng.normal(size=(40, d)), rng.normal(size=(40, d)) * 1.5 + 0.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # and torch-fidelity's own eigenvalue formula agrees
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(tf["frechet_inception_distance"], rel=1e-9)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------- FID behaviour

def test_self_fid_is_zero_and_fid_grows_with_brightness_shift(tmp_path):
    base = _images(96)
    ds = ImageTensorDataset(base)
    stats = save_stats(ds, tmp_path / "s.npz", **TINY)
    self_fid = compute_metrics(ds, ds, **TINY)["metrics"]["fid"]
    assert abs(self_fid) < 1e-6 * np.trace(stats["sigma"])
    fids = [compute_metrics(ImageTensorDataset(_brighter(base, d)), ds, **TINY)["metrics"]["fid"]
            for d in (5, 15, 35)]
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_stats_file_gives_same_fid_as_two_folders(tmp_path):
    gen = _write_folder(tmp_path / "gen", _brighter(_images(40, seed=1), 10))
    ref = _write_folder(tmp_path / "ref", _images(50, seed=2))
    direct = compute_metrics(gen, ref, **TINY)
    stats = save_stats(ref, tmp_path / "ref_stats.npz", **TINY)
    via_stats = compute_metrics(gen, str(tmp_path / "ref_stats.npz"), **TINY)
    assert via_stats["metrics"]["fid"] == pytest.approx(direct["metrics"]["fid"], rel=1e-12)
    assert direct["metrics"]["fid"] > 0
    assert "mu/sigma" in via_stats["settings"]["fid_reference_statistics"]
    # the stats file records what produced it
    loaded = load_stats(tmp_path / "ref_stats.npz")
    assert (loaded["feature_extractor"], loaded["feature_layer"]) == ("test-tiny", "16")
    assert loaded["num_images"] == 50 and loaded["resolution"] == (16, 16)
    np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])


def test_npz_folder_and_dataset_inputs_agree(tmp_path):
    imgs = _images(30, seed=3)
    ref = ImageTensorDataset(_images(30, seed=4))
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=imgs.permute(0, 2, 3, 1).numpy())          # ADM layout, stored: memory-mapped
    npz_c = tmp_path / "samples_c.npz"
    np.savez_compressed(npz_c, arr_0=imgs.permute(0, 2, 3, 1).numpy())  # compressed: read whole
    folder = _write_folder(tmp_path / "png", imgs)
    fids = [compute_metrics(x, ref, **TINY)["metrics"]["fid"]
            for x in (ImageTensorDataset(imgs), str(npz), str(npz_c), folder)]
    assert fids == pytest.approx([fids[0]] * 4, rel=1e-12)


def test_adm_reference_batch_uses_stats_only_for_matching_extractor(tmp_path):
    ref_imgs = _images(40, seed=5)
    mu, sigma = np.zeros(2048, np.float32), np.eye(2048, dtype=np.float32)  # "Inception" statistics, as in ADM's VIRTUAL_*.npz
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, arr_0=ref_imgs.permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma)
    gen = ImageTensorDataset(_images(40, seed=6))
    # test-tiny features differ from ADM's Inception pool_3: FID must come from arr_0, not mu/sigma
    res = compute_metrics(gen, str(adm), **TINY)
    assert res["settings"]["fid_reference_statistics"] == "features of 40 images"
    assert res["metrics"]["fid"] == pytest.approx(
        compute_metrics(gen, ImageTensorDataset(ref_imgs), **TINY)["metrics"]["fid"], rel=1e-12)
    # statistics alone cannot serve another extractor
    stats_only = tmp_path / "adm_stats_only.npz"
    np.savez(stats_only, mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="adm_stats_only.npz.*inception-v3-compat"):
        compute_metrics(gen, str(stats_only), **TINY)


def test_fid_only_against_adm_batch_uses_its_mu_sigma_without_running_inception(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("Inception loaded"))
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 64)), rng.normal(size=(300, 64)) + 0.1
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    adm = tmp_path / "VIRTUAL_ref.npz"  # mu/sigma plus images, as ADM's reference batches
    np.savez(adm, arr_0=_images(12, size=16).permute(0, 2, 3, 1).numpy(), mu=mu2, sigma=s2)
    from dit_moe.evaluate import _write_stats
    _write_stats(tmp_path / "gen_stats.npz", mu1, s1, "inception-v3-compat", "2048", 200, (16, 16))
    res = compute_metrics(str(tmp_path / "gen_stats.npz"), str(adm), device="cpu")
    assert res["metrics"]["fid"] == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-12)
    assert res["settings"]["fid_reference_statistics"].endswith("(ADM)")
    assert res["settings"]["num_generated"] == 200


# ----------------------------------------------------------------------------- IS / KID / PRC

def test_isc_kid_prc_match_torch_fidelity_calculate_metrics():
    a, b = _images(60, seed=7), _brighter(_images(50, seed=8), 20)
    res = compute_metrics(ImageTensorDataset(a), ImageTensorDataset(b), metrics=("fid", "isc", "kid", "prc"),
                          kid_subset_size=25, **TINY)
    ref = torch_fidelity.calculate_metrics(
        input1=ImageTensorDataset(a), input2=ImageTensorDataset(b), cuda=False, batch_size=32, isc=True, fid=True,
        kid=True, prc=True, feature_extractor="test-tiny", kid_subset_size=25, cache=False, verbose=False,
        save_cpu_ram=True)
    m = res["metrics"]
    assert m["isc_mean"] == pytest.approx(ref["inception_score_mean"], rel=1e-6)
    assert m["isc_std"] == pytest.approx(ref["inception_score_std"], rel=1e-5)
    assert m["kid_mean"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-5)
    assert (m["precision"], m["recall"]) == (ref["precision"], ref["recall"])
    assert m["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-5)
    s = res["settings"]
    assert s["prc_features"] == "test-tiny/16" and s["kid_subset_size"] == 25
    assert s["feature_layers"] == {"fid": "16", "isc": "logits", "kid": "16", "prc": "16"}


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_give_clear_errors(tmp_path):
    ds16 = ImageTensorDataset(_images(8, size=16))
    ds8 = ImageTensorDataset(_images(8, size=8))
    with pytest.raises(ValueError, match="resolution mismatch.*16x16.*8x8"):
        compute_metrics(ds16, ds8, **TINY)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty contains no \.png"):
        compute_metrics(str(empty), ds16, **TINY)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        compute_metrics(ds16, str(tmp_path / "nowhere"), **TINY)
    junk = tmp_path / "junk.npz"
    np.savez(junk, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="junk.npz has neither images"):
        compute_metrics(ds16, str(junk), **TINY)
    chw = tmp_path / "chw.npz"
    np.savez(chw, arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="chw.npz.*N, H, W, 3"):
        compute_metrics(ds16, str(chw), **TINY)
    # statistics that record another resolution
    save_stats(ds8, tmp_path / "s8.npz", **TINY)
    with pytest.raises(ValueError, match="resolution mismatch"):
        compute_metrics(ds16, str(tmp_path / "s8.npz"), **TINY)
    # statistics cannot give precision/recall
    save_stats(ds16, tmp_path / "s16.npz", **TINY)
    with pytest.raises(ValueError, match="prc needs reference images.*s16.npz"):
        compute_metrics(ds16, str(tmp_path / "s16.npz"), metrics=("fid", "prc"), **TINY)
    with pytest.raises(ValueError, match="metrics must be"):
        compute_metrics(ds16, ds16, metrics=("fdi",), **TINY)
    with pytest.raises(ValueError, match="unknown feature extractor 'nope'"):
        compute_metrics(ds16, ds16, metrics=("fid",), feature_extractor="nope", device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        compute_metrics(ds16, ds16, inception_weights=str(tmp_path / "missing.pth"), **TINY)
    with pytest.raises(ValueError, match=r"uint8 images \(N, 3, H, W\)"):
        ImageTensorDataset(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="isc needs at least 10 generated images"):
        compute_metrics(ImageTensorDataset(_images(5)), ds16, metrics=("isc",), **TINY)
    mixed = _write_folder(tmp_path / "mixed", _images(3, size=16))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(mixed, "zz_small.png"))
    with pytest.raises(ValueError, match="zz_small.png is 8x8"):
        compute_metrics(mixed, ds16, **TINY)


# ----------------------------------------------------------------------------- results and CLI

def test_write_metrics_json_records_settings_atomically(tmp_path):
    ds = ImageTensorDataset(_images(20))
    settings = {"model": "DiT-S/2-E8K2", "checkpoint_step": np.int64(1000), "cfg_scale": 1.5, "seeds": (0, 1),
                "reference": "latents:/data/val decoded by sd-vae-ft-ema"}
    res = compute_metrics(_write_folder(tmp_path / "g", _images(20, seed=9)), ds, settings=settings, **TINY)
    out = tmp_path / "deep" / "metrics.json"
    write_metrics_json(out, res["metrics"], res["settings"])
    data = json.loads(out.read_text())
    assert data["metrics"]["fid"] == res["metrics"]["fid"]
    s = data["settings"]
    assert s["checkpoint_step"] == 1000 and s["seeds"] == [0, 1] and s["model"] == "DiT-S/2-E8K2"
    assert s["reference"].startswith("latents:") and s["num_reference"] == 20 and s["num_generated"] == 20
    assert s["feature_extractor"] == "test-tiny" and s["resolution"] == [16, 16]
    assert os.listdir(out.parent) == ["metrics.json"]  # no temporary left behind
    clash = compute_metrics(ds, ds, settings={"feature_extractor": "inception-v3-compat"}, **TINY)["settings"]
    assert clash["feature_extractor"] == "test-tiny" and clash["caller_feature_extractor"] == "inception-v3-compat"
    with pytest.raises(TypeError, match="object"):
        write_metrics_json(tmp_path / "bad.json", {"fid": 1.0}, {"x": object()})


def test_cli_writes_json_and_reference_stats(tmp_path, capsys):
    gen = _write_folder(tmp_path / "gen", _images(24, seed=10))
    ref = _write_folder(tmp_path / "ref", _images(24, seed=11))
    sfile = tmp_path / "run.json"
    sfile.write_text(json.dumps({"model": "DiT-S/2", "sampler": "ddpm", "steps": 250}))
    out, st = tmp_path / "m.json", tmp_path / "ref_stats.npz"
    rc = main([gen, ref, "--metrics", "fid,kid", "--extractor", "test-tiny", "--device", "cpu", "--batch-size", "8",
               "--kid-subset-size", "10", "--settings", str(sfile), "--out", str(out), "--save-ref-stats", str(st)])
    assert rc == 0 and "fid:" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data["metrics"]) == {"fid", "kid_mean", "kid_std"}
    assert data["settings"]["sampler"] == "ddpm" and data["settings"]["reference"] == ref
    again = compute_metrics(gen, str(st), **TINY)
    assert again["metrics"]["fid"] == pytest.approx(data["metrics"]["fid"], rel=1e-12)


def test_inception_weights_path_is_loaded(tmp_path, monkeypatch):
    """Stand-in for the offline Inception file: random weights in torch-fidelity's own layout.

    Only construction is checked: an Inception forward pass costs seconds per image on a CPU.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    # build the layout without any weights: no download, no loading
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    state = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    weights = tmp_path / "weights-inception-standin.pth"
    torch.save(state, weights)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    ext = make_extractor("inception-v3-compat", ["2048", "logits_unbiased"], str(weights), device="cpu")
    assert not next(ext.parameters()).is_cuda
    assert ext.get_requested_features_list() == ["2048", "logits_unbiased"]
    torch.testing.assert_close(ext.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])


# ----------------------------------------------------------------------------- extractors

def test_digits_cnn_heldout_accuracy_and_digits_fid(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_MOE_CACHE", str(tmp_path / "cache"))
    model, info = features.train_digits_cnn(train_on_all=False)
    assert info["heldout_accuracy"] >= 0.95 and info["num_heldout"] == 359
    features.save_digits_cnn(model, info)  # seed the cache so the extractor does not train again
    assert os.path.exists(tmp_path / "cache" / "digits_cnn.pt")
    # the classifier reads digits rendered as 16x16 RGB uint8 (the demo's format) through digits_preprocess
    x, y = features.load_digits_arrays()
    _, held = features.digits_split(len(x))
    img = ((x[held] + 1) * 127.5).round().to(torch.uint8)
    img = torch.nn.functional.interpolate(img.float(), scale_factor=2, mode="nearest").to(torch.uint8)
    img = img.expand(-1, 3, -1, -1).contiguous()
    clf = features.digits_classifier()
    acc = (clf(features.digits_preprocess(img)).argmax(1) == y[held]).float().mean().item()
    assert acc == pytest.approx(info["heldout_accuracy"])
    # digits FID: two halves of real digits are closer than real vs. blurred digits
    half = len(held) // 2
    real_a, real_b = ImageTensorDataset(img[:half]), ImageTensorDataset(img[half:])
    blurred = torch.nn.functional.avg_pool2d(img.float(), 3, 1, 1).to(torch.uint8)[:half]
    kw = dict(feature_extractor="digits-cnn", device="cpu")
    fid_real = compute_metrics(real_a, real_b, **kw)["metrics"]["fid"]
    res_blur = compute_metrics(ImageTensorDataset(blurred), real_b, metrics=("fid", "isc"), **kw)
    assert fid_real < res_blur["metrics"]["fid"] / 3
    assert 1.0 < res_blur["metrics"]["isc_mean"] <= 10.0


def test_registration_is_idempotent():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    importlib.import_module("dit_moe.features")
    reloaded = importlib.reload(features)
    assert FEATURE_EXTRACTORS_REGISTRY["test-tiny"] is reloaded.TinyRandomFeatureExtractor
    assert FEATURE_EXTRACTORS_REGISTRY["digits-cnn"] is reloaded.DigitsCNNFeatureExtractor

    class Foreign(torch_fidelity.FeatureExtractorBase):
        pass

    with pytest.raises(ValueError, match="already registered"):  # a foreign class may not take over the name
        reloaded._register("test-tiny", Foreign)
