"""Latent extraction: image folder -> shards + manifest, with a tiny random VAE and generated images (offline)."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dit_moe import extract as extract_mod
from dit_moe.data import LatentDataset, build_dataset, load_decoder
from dit_moe.extract import center_crop, extract_latents, load_image, main

SIZE = 16  # image side; the tiny VAE downsamples by 2 -> 8x8 latents
CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="module", autouse=True)
def fresh_accelerate_state():
    """extract_latents creates an Accelerator; leave no global state behind for other test modules."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """3 classes x 3 images of assorted sizes and modes, plus a garbage .png and a truncated .jpg."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [(20, 17), (45, 30), (16, 64)]  # (W, H): upscale, box-halve once, tall
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for k, (W, H) in enumerate(sizes):
            arr = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if k == 2:
                img = img.convert("L")  # grey input must come out RGB
            img.save(root / name / f"img{k}.png")
    (root / "dog" / "broken.png").write_bytes(b"this is not a png")
    buf = root / "fox" / "cut.jpg"
    Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(buf, quality=90)
    buf.write_bytes(buf.read_bytes()[:200])
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    return root


GOOD = sorted(f"{c}/img{k}.png" for c in CLASSES for k in range(3))
BAD = ["dog/broken.png", "fox/cut.jpg"]


def read_all(out):
    """{file: (mean (2,C,h,w), std, label)} over all shards; asserts no file appears twice."""
    rows = {}
    for s in json.loads((out / "manifest.json").read_text())["shards"]:
        with safe_open(str(out / s["file"]), framework="pt") as f:
            files = json.loads(f.metadata()["files"])
            mean, std, label = f.get_tensor("mean"), f.get_tensor("std"), f.get_tensor("label")
        assert len(files) == s["count"] == mean.shape[0]
        for i, name in enumerate(files):
            assert name not in rows, f"{name} extracted twice"
            rows[name] = (mean[i], std[i], int(label[i]))
    return rows


def run(image_root, out, vae_dir, **kw):
    kw = {"image_size": SIZE, "batch_size": 3, "shard_size": 4, "num_workers": 0, "progress": False, **kw}
    return extract_latents(image_root, out, vae=vae_dir, **kw)


@pytest.fixture(scope="module")
def full_run(image_root, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    return out, run(image_root, out, vae_dir)


# ----------------------------------------------------------------------------------------------------------


def test_center_crop_sizes_and_centre():
    # 3 vertical stripes; the centre crop of a wide image keeps the middle one only
    arr = np.zeros((40, 120, 3), dtype=np.uint8)
    arr[:, :40, 0] = 255
    arr[:, 40:80, 1] = 255
    arr[:, 80:, 2] = 255
    out = np.asarray(center_crop(Image.fromarray(arr), 16))
    assert out.shape == (16, 16, 3)
    assert (out[2:-2, 2:-2, 1] > 200).all() and (out[2:-2, 2:-2, [0, 2]] < 50).all()
    for W, H in [(17, 300), (1000, 999), (16, 16), (9, 5)]:
        assert center_crop(Image.new("RGB", (W, H)), 16).size == (16, 16)
    # box-halve while the short side is >= 2 * size (60 -> 30), then one bicubic step (30 -> 16)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8))
    halved = img.resize((30, 30), Image.BOX).resize((16, 16), Image.BICUBIC)
    assert np.array_equal(np.asarray(center_crop(img, 16)), np.asarray(halved))


def test_manifest_and_shards(full_run, image_root, vae_dir):
    out, manifest = full_run
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["vae"] == os.path.abspath(vae_dir)
    assert manifest["scaling_factor"] == pytest.approx(0.18215)
    assert manifest["image_size"] == SIZE
    assert manifest["latent_shape"] == [4, SIZE // 2, SIZE // 2]
    assert manifest["class_names"] == list(CLASSES) and manifest["num_classes"] == 3
    assert manifest["num_images"] == len(GOOD) == 9
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 1]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-r00-0000{i}.safetensors" for i in range(3)]
    assert [s["path"] for s in manifest["skipped"]] == BAD
    assert all(s["reason"] for s in manifest["skipped"])
    rows = read_all(out)
    assert sorted(rows) == GOOD
    for name, (mean, std, label) in rows.items():
        assert mean.shape == std.shape == (2, 4, SIZE // 2, SIZE // 2)
        assert mean.dtype == std.dtype == torch.float16
        assert label == CLASSES.index(name.split("/")[0])
        assert (std > 0).all()
    assert not list(out.glob(".*tmp"))


def test_mean_is_the_encoding_and_flip_is_encoded(full_run, image_root, vae_dir):
    from diffusers.models import AutoencoderKL

    out, _ = full_run
    rows = read_all(out)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    name = "fox/img1.png"
    x = load_image(image_root / name, SIZE)[None]  # (1, 3, 16, 16)
    with Image.open(image_root / name) as im:
        mirrored = center_crop(im.convert("RGB"), SIZE).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x_flip = extract_mod.image_to_tensor(mirrored)[None]
    with torch.no_grad():
        post, post_flip = vae.encode(x).latent_dist, vae.encode(x_flip).latent_dist
        recon = vae.decode(post.mean).sample
    assert recon.shape == x.shape  # decode(encode(x)) round trip
    mean, std, _ = rows[name]
    torch.testing.assert_close(mean[0].float(), post.mean[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(std[0].float(), post.std[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(mean[1].float(), post_flip.mean[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(std[1].float(), post_flip.std[0], atol=2e-3, rtol=2e-3)
    # and it is not merely the mirrored latent of the original: the VAE is not flip-equivariant
    assert (mean[1].float() - mean[0].float().flip(-1)).abs().max() > 1e-2


def test_dataset_and_decoder_on_extracted(full_run, vae_dir):
    out, _ = full_run
    ds, info = build_dataset("latents", str(out))
    assert len(ds) == 9 and info.in_channels == 4 and info.latent_size == SIZE // 2 and info.image_size == SIZE
    assert info.vae == os.path.abspath(vae_dir) and info.class_names == CLASSES
    x, y = ds[0]
    assert x.shape == (4, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    images = load_decoder(info)(torch.stack([ds[i][0] for i in range(3)]))
    assert images.shape == (3, 3, SIZE, SIZE) and images.abs().max() <= 1


def test_resume_after_limit_and_crash(full_run, image_root, vae_dir, tmp_path, monkeypatch, caplog):
    reference = read_all(full_run[0])

    # (a) a run stopped by --limit is incomplete; the dataset refuses it; a re-run finishes without duplicates
    out = tmp_path / "limited"
    m = run(image_root, out, vae_dir, limit=6)  # 6 files, one of them broken
    assert m["complete"] is False and m["num_images"] == 5
    with pytest.raises(ValueError, match="incomplete"):
        LatentDataset(out)
    m = run(image_root, out, vae_dir)
    assert m["complete"] is True and m["num_images"] == 9
    assert [s["count"] for s in m["shards"]] == [4, 1, 4]  # first run: 4 + 1; second: the remaining 4
    rows = read_all(out)
    assert sorted(rows) == sorted(reference)
    for k in reference:
        torch.testing.assert_close(rows[k][0], reference[k][0], atol=1e-3, rtol=1e-3)
        assert rows[k][2] == reference[k][2]

    # (b) a crash after the first shard (and a half-written temp file) is resumed the same way
    out = tmp_path / "crashed"
    calls = {"n": 0}
    real = extract_mod.encode_pair

    def dying(vae, images):
        calls["n"] += 1
        if calls["n"] == 3:  # batches 1 and 2 filled shard 0 (4 images), the third batch dies
            (out / ".shard-r00-00001.safetensors.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(vae, images)

    monkeypatch.setattr(extract_mod, "encode_pair", dying)
    with pytest.raises(KeyboardInterrupt):
        run(image_root, out, vae_dir)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-r00-00000.safetensors"]
    monkeypatch.setattr(extract_mod, "encode_pair", real)
    main([str(image_root), str(out), "--vae", vae_dir, "--image-size", str(SIZE), "--batch-size", "2",
          "--shard-size", "4", "--num-workers", "0"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is True and m["num_images"] == 9
    assert [s["path"] for s in m["skipped"]] == BAD
    for bad in BAD:  # each broken file is reported by path
        assert any(bad in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert not list(out.glob(".*tmp"))
    assert sorted(read_all(out)) == sorted(reference)


def test_refuses_other_settings(full_run, image_root, vae_dir, tmp_path):
    out, _ = full_run
    with pytest.raises(ValueError, match="image_size"):
        run(image_root, out, vae_dir, image_size=32)
    other_vae = tmp_path / "other_vae"
    shutil.copytree(vae_dir, other_vae)
    with pytest.raises(ValueError, match="vae="):
        run(image_root, out, str(other_vae))
    (image_root / "emu").mkdir()
    try:
        with pytest.raises(ValueError, match="class_names.*3 classes.*4 classes, #2 = 'emu'"):
            run(image_root, out, vae_dir)
    finally:
        (image_root / "emu").rmdir()
    with pytest.raises(ValueError, match="multiple of 8"):
        run(image_root, tmp_path / "x", vae_dir, image_size=20)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(tmp_path / "nowhere", tmp_path / "y", vae_dir)
