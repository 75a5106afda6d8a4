"""sFID: spatial features (Inception mixed_6/conv, first 7 channels), their statistics, ADM's mu_s/sigma_s, the CLI.

Inception never downloads here: its layout is built with random weights (as in test_evaluate.py), and the
metric's behaviour is checked with the small "test-tiny" extractor and its spatial tap.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit_moe.config import ExperimentConfig, SampleConfig
from dit_moe.data import DataInfo
from dit_moe.weights.checkpoint import save_checkpoint
from dit_moe.evaluate import (ImageTensorDataset, SPATIAL_TAPS, check_reference, compute_metrics, extract_features,
                              feature_statistics, frechet_distance, load_stats, main, make_extractor, save_stats)
from dit_moe.evaluate.sources import NpzImageDataset
from dit_moe.evaluate.statistics import _write_stats
from dit_moe.registry import build_model

TINY = dict(feature_extractor="test-tiny", device="cpu", batch_size=32)


def _images(n, size=16, seed=0, cells=8):
    """uint8 (N, 3, size, size): `cells` x `cells` random blocks (sharp edges, so blurring changes them)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, cells, cells, generator=g)
    return (F.interpolate(low, size=(size, size), mode="nearest") * 200 + 20).round().to(torch.uint8)


def _blur(images, passes):
    x = images.float()
    for _ in range(passes):
        x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return x.round().to(torch.uint8)


def _standin_inception(tmp_path, monkeypatch):
    """A weights file in torch-fidelity's Inception layout with random weights; downloads then fail the test."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    # random BatchNorm statistics too, so that the ReLU outputs are not all alike
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = net.state_dict()
    monkeypatch.undo()
    path = tmp_path / "weights-inception-standin.pth"
    torch.save(state, path)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    return str(path)


# ----------------------------------------------------------------------------- the Inception layer

def test_inception_spatial_features_are_mixed_6d_branch1x1_first_7_channels_nhwc(tmp_path, monkeypatch):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    weights = _standin_inception(tmp_path, monkeypatch)
    images = _images(2, size=16)
    tap = SPATIAL_TAPS["inception-v3-compat"]
    # sFID alone: the extractor is asked for its carrier feature so its forward runs through Mixed_6d
    ext = make_extractor("inception-v3-compat", [tap.layer], weights, device="cpu")
    assert ext.get_requested_features_list() == ["768"]
    feats = extract_features(ImageTensorDataset(images), ext, batch_size=2, device="cpu", spatial=True)
    assert feats[tap.layer].shape == (2, 17 * 17 * 7) == (2, 2023)
    # independently: walk the network block by block as TF's graph does, up to mixed_6/conv (Mixed_6d's 1x1 branch)
    with torch.no_grad():
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            x = getattr(ext, name)(x)
        spatial = ext.Mixed_6d.branch1x1(x)                                 # (N, 192, 17, 17), after its ReLU
    assert spatial.shape == (2, 192, 17, 17)
    expected = spatial[:, :7].permute(0, 2, 3, 1).reshape(2, -1)            # ADM's NHWC order: [..., :7] flattened
    torch.testing.assert_close(feats[tap.layer], expected, rtol=1e-5, atol=1e-6)
    assert feats[tap.layer].std() > 0
    # the hook leaves the extractor's own features alone, and is removed after the pass
    ext2 = make_extractor("inception-v3-compat", ["2048", tap.layer], weights, device="cpu")
    both = extract_features(ImageTensorDataset(images), ext2, batch_size=1, device="cpu", spatial=True)
    plain = extract_features(ImageTensorDataset(images), ext2, batch_size=1, device="cpu")
    torch.testing.assert_close(both["2048"], plain["2048"], rtol=0, atol=0)
    torch.testing.assert_close(both[tap.layer], feats[tap.layer], rtol=1e-5, atol=1e-6)
    assert set(plain) == {"2048"} and not ext2.Mixed_6d.branch1x1._forward_hooks


# ----------------------------------------------------------------------------- the metric

def test_sfid_zero_on_itself_and_grows_with_shift_and_blur():
    base = _images(96)
    ds = ImageTensorDataset(base)
    res = compute_metrics(ds, ds, metrics=("fid", "sfid"), **TINY)
    feats = extract_features(ds, make_extractor("test-tiny", ["spatial"], device="cpu"), device="cpu", spatial=True)
    assert feats["spatial"].shape == (96, 3 * 3 * 4)
    mu, sigma = feature_statistics(feats["spatial"].numpy())
    assert abs(res["metrics"]["sfid"]) < 1e-9 * np.trace(sigma)
    shifted = [compute_metrics(ImageTensorDataset((base.int() + d).clamp(0, 255).to(torch.uint8)), ds,
                               metrics=("sfid",), **TINY)["metrics"]["sfid"] for d in (5, 15, 35)]
    assert 0 < shifted[0] < shifted[1] < shifted[2], shifted
    blurred = [compute_metrics(ImageTensorDataset(_blur(base, k)), ds, metrics=("sfid",), **TINY)["metrics"]["sfid"]
               for k in (1, 2, 4)]
    assert 0 < blurred[0] < blurred[1] < blurred[2], blurred
    # sFID is the same Frechet code on the spatial features
    g = extract_features(ImageTensorDataset(_blur(base, 2)), make_extractor("test-tiny", ["spatial"], device="cpu"),
                         device="cpu", spatial=True)["spatial"]
    assert blurred[1] == pytest.approx(frechet_distance(*feature_statistics(g.numpy()), mu, sigma), rel=1e-12)
    s = res["settings"]
    assert s["feature_layers"]["sfid"] == "spatial" and "first 4 channels" in s["sfid_features"]
    assert s["sfid_reference_statistics"] == "spatial features of 96 images"


def test_statistics_file_carries_spatial_statistics(tmp_path):
    gen, ref = ImageTensorDataset(_blur(_images(40, seed=1), 1)), ImageTensorDataset(_images(50, seed=2))
    direct = compute_metrics(gen, ref, metrics=("fid", "sfid"), **TINY)["metrics"]
    saved = save_stats(ref, tmp_path / "ref.npz", **TINY)
    loaded = load_stats(tmp_path / "ref.npz")
    assert loaded["spatial_layer"] == "spatial" and loaded["mu_s"].shape == (36,)
    np.testing.assert_array_equal(loaded["sigma_s"], saved["sigma_s"])
    via = compute_metrics(gen, str(tmp_path / "ref.npz"), metrics=("fid", "sfid"), **TINY)
    assert via["metrics"]["sfid"] == pytest.approx(direct["sfid"], rel=1e-12) and direct["sfid"] > 0
    assert via["metrics"]["fid"] == pytest.approx(direct["fid"], rel=1e-12)
    assert "mu_s/sigma_s from" in via["settings"]["sfid_reference_statistics"]
    # a statistics file without spatial statistics (written before sFID) still serves FID, and names itself for sFID
    _write_stats(tmp_path / "old.npz", loaded["mu"], loaded["sigma"], "test-tiny", "16", 50, (16, 16))
    assert compute_metrics(gen, str(tmp_path / "old.npz"), **TINY)["metrics"]["fid"] == pytest.approx(direct["fid"])
    with pytest.raises(ValueError, match="sfid needs reference images or spatial statistics.*old.npz"):
        compute_metrics(gen, str(tmp_path / "old.npz"), metrics=("sfid",), **TINY)
    with pytest.raises(ValueError, match="--fid: sfid needs reference images"):
        check_reference(str(tmp_path / "old.npz"), metrics=("sfid",), feature_extractor="test-tiny", label="--fid")
    with pytest.raises(ValueError, match="sfid needs spatial features.*'digits-cnn' has none"):
        compute_metrics(gen, ref, metrics=("sfid",), feature_extractor="digits-cnn", device="cpu")
    half = tmp_path / "half.npz"
    np.savez(half, mu=loaded["mu"], sigma=loaded["sigma"], mu_s=loaded["mu_s"])
    with pytest.raises(ValueError, match="half.npz: spatial statistics need both mu_s and sigma_s"):
        compute_metrics(gen, str(half), **TINY)


def test_adm_batch_mu_s_sigma_s_used_without_reading_images(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("Inception loaded"))
    monkeypatch.setattr(NpzImageDataset, "__getitem__", lambda self, i: pytest.fail("reference images read"))
    rng = np.random.default_rng(2)
    # 64-d stand-ins for pool_3 (2048) and mixed_6/conv (2023): the code does not depend on the dimension
    (mu1, s1), (mu2, s2) = (feature_statistics(rng.normal(size=(200, 64)) + k) for k in (0.0, 0.1))
    (m1s, s1s), (m2s, s2s) = (feature_statistics(rng.normal(size=(200, 48)) * k) for k in (1.0, 1.3))
    adm = tmp_path / "VIRTUAL_ref.npz"       # ADM layout: images, pool statistics, spatial statistics
    np.savez(adm, arr_0=_images(12).permute(0, 2, 3, 1).numpy(), mu=mu2, sigma=s2, mu_s=m2s, sigma_s=s2s)
    _write_stats(tmp_path / "gen.npz", mu1, s1, "inception-v3-compat", "2048", 200, (16, 16),
                 ("mixed_6/conv", m1s, s1s))
    res = compute_metrics(str(tmp_path / "gen.npz"), str(adm), metrics=("fid", "sfid"), device="cpu")
    assert res["metrics"]["sfid"] == pytest.approx(frechet_distance(m1s, s1s, m2s, s2s), rel=1e-12)
    assert res["metrics"]["fid"] == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-12)
    assert res["settings"]["sfid_reference_statistics"].endswith("(ADM)")
    assert "Mixed_6d.branch1x1 = TF mixed_6/conv" in res["settings"]["sfid_features"]
    loaded = load_stats(adm)
    assert (loaded["feature_extractor"], loaded["spatial_layer"]) == ("inception-v3-compat", "mixed_6/conv")


# ----------------------------------------------------------------------------- command lines

def test_evaluate_cli_reports_sfid_and_saves_spatial_reference_stats(tmp_path, capsys):
    gen, ref = tmp_path / "gen.npz", tmp_path / "ref.npz"
    np.savez(gen, arr_0=_blur(_images(24, seed=3), 1).permute(0, 2, 3, 1).numpy())
    np.savez(ref, arr_0=_images(24, seed=4).permute(0, 2, 3, 1).numpy())
    out, st = tmp_path / "m.json", tmp_path / "ref_stats.npz"
    assert main([str(gen), str(ref), "--metrics", "fid,sfid", "--extractor", "test-tiny", "--device", "cpu",
                 "--out", str(out), "--save-ref-stats", str(st)]) == 0
    assert "sfid:" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data["metrics"]) == {"fid", "sfid"} and data["metrics"]["sfid"] > 0
    again = compute_metrics(str(gen), str(st), metrics=("sfid",), **TINY)["metrics"]["sfid"]
    assert again == pytest.approx(data["metrics"]["sfid"], rel=1e-12)
    # FID alone with --save-ref-stats: the spatial statistics come free from the same extractor pass
    st2 = tmp_path / "ref_stats_fid_only.npz"
    assert main([str(gen), str(ref), "--extractor", "test-tiny", "--device", "cpu", "--save-ref-stats", str(st2)]) == 0
    np.testing.assert_allclose(load_stats(st2)["mu_s"], load_stats(st)["mu_s"], rtol=1e-12)


def test_bulk_sampling_with_fid_reports_sfid(tmp_path):
    from dit_moe.sampling import main as sample_main

    data_info = DataInfo(num_classes=10, in_channels=1, latent_size=8, image_size=8, class_names=tuple("0123456789"),
                         vae=None, scaling_factor=1.0, source="builtin:digits").to_dict()
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10).eval()
    exp = ExperimentConfig(sample=SampleConfig(sampler="ddim", steps=2, cfg_scale=1.0, batch_size=8))
    save_checkpoint(tmp_path / "ckpt", model, model, step=1, experiment=exp, data_info=data_info)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=_images(12, size=8).permute(0, 2, 3, 1).numpy())
    out = tmp_path / "bulk"
    assert sample_main([str(tmp_path / "ckpt"), "--num-samples", "8", "--out", str(out), "--device", "cpu",
                        "--no-progress", "--fid", str(ref), "--extractor", "test-tiny", "--metrics", "fid,sfid"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"fid", "sfid"} and metrics["sfid"] >= 0
