"""Datasets: LatentDataset over hand-written shards, the embedded digits, DataInfo, decoders, uint8 conversion."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from dit_moe.data import DataInfo, DigitsDataset, LatentDataset, build_dataset, load_decoder, to_uint8

C, H = 4, 2
SF = 0.5


def write_latents(root, counts=(3, 2), num_classes=3, complete=True, std=0.0, seed=0):
    """A latent directory by hand: row j of the whole set has mean[:, 0] = j, mean[:, 1] = -j - 100."""
    root.mkdir(parents=True, exist_ok=True)
    shards, j = [], 0
    g = torch.Generator().manual_seed(seed)
    for k, n in enumerate(counts):
        idx = torch.arange(j, j + n, dtype=torch.float32).view(n, 1, 1, 1)
        mean = torch.stack([idx.expand(n, C, H, H), (-idx - 100).expand(n, C, H, H)], 1).half()
        tensors = {
            "mean": mean.contiguous(),
            "std": torch.full((n, 2, C, H, H), std).half(),
            "label": torch.randint(0, num_classes, (n,), generator=g),
        }
        name = f"shard-r00-{k:05d}.safetensors"
        save_file(tensors, str(root / name), metadata={"files": json.dumps([f"c/{i}.png" for i in range(j, j + n)])})
        shards.append({"file": name, "count": n})
        j += n
    manifest = {
        "format": "dit-moe-latents", "version": 1, "complete": complete, "vae": "some/vae",
        "scaling_factor": SF, "shift_factor": 0.0, "image_size": 8 * H, "latent_shape": [C, H, H],
        "class_names": [f"k{i}" for i in range(num_classes)], "num_classes": num_classes, "dtype": "float16",
        "source": "/nowhere", "shards": shards, "num_images": j, "skipped": [],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# ---------------------------------------------------------------------------------------------- LatentDataset


def test_latent_items_flip_and_index(tmp_path):
    ds = LatentDataset(write_latents(tmp_path / "l"))
    assert len(ds) == 5
    torch.manual_seed(0)
    sides = []
    for _ in range(200):
        i = int(torch.randint(0, 5, ()))
        x, y = ds[i]
        assert x.shape == (C, H, H) and x.dtype == torch.float32
        assert y.shape == () and y.dtype == torch.int64 and 0 <= y < 3
        v = x / SF  # std = 0: exactly the stored mean of one side
        assert (v == v[0, 0, 0]).all()
        assert v[0, 0, 0] in (float(i), float(-i - 100))
        sides.append(v[0, 0, 0] < 0)
    assert 60 < sum(sides) < 140  # both sides are drawn, about half each
    ds_noflip = LatentDataset(tmp_path / "l", flip=False)
    assert all(ds_noflip[i][0][0, 0, 0] == i * SF for i in range(5))
    assert ds_noflip[-1][0][0, 0, 0] == 4 * SF
    with pytest.raises(IndexError):
        ds[5]


def test_latent_posterior_sample_and_reproducibility(tmp_path):
    ds = LatentDataset(write_latents(tmp_path / "l", counts=(1,), std=2.0), flip=False)
    torch.manual_seed(1)
    xs = torch.stack([ds[0][0] for _ in range(500)]) / SF  # N(0, 2^2) per element
    assert abs(xs.mean()) < 0.15 and abs(xs.std() - 2.0) < 0.15
    torch.manual_seed(3)
    a = [ds[0][0] for _ in range(3)]
    torch.manual_seed(3)
    b = [ds[0][0] for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[0], a[1])


def test_latent_dataloader_workers(tmp_path):
    ds = LatentDataset(write_latents(tmp_path / "l"), flip=False)
    ds[0]  # opens a shard in the parent: workers must not reuse that handle
    xs, ys = zip(*DataLoader(ds, batch_size=2, num_workers=2))
    x = torch.cat(xs)
    assert torch.equal(x[:, 0, 0, 0], torch.arange(5.0) * SF) and torch.equal(torch.cat(ys), ds.labels)


def test_latent_validation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_root"):
        LatentDataset(tmp_path / "missing_root")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        LatentDataset(tmp_path / "empty")

    root = write_latents(tmp_path / "incomplete", complete=False)
    with pytest.raises(ValueError, match="incomplete"):
        LatentDataset(root)

    root = write_latents(tmp_path / "missing")
    (root / "shard-r00-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-r00-00001"):
        LatentDataset(root)

    root = write_latents(tmp_path / "count")
    m = json.loads((root / "manifest.json").read_text())
    m["shards"][0]["count"], m["num_images"] = 4, 6
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="shard-r00-00000.*'mean'"):
        LatentDataset(root)

    root = write_latents(tmp_path / "shape")
    m = json.loads((root / "manifest.json").read_text())
    m["latent_shape"] = [C, H + 1, H + 1]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="shard-r00-00000"):
        LatentDataset(root)

    root = write_latents(tmp_path / "total")
    m = json.loads((root / "manifest.json").read_text())
    m["num_images"] = 7
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="num_images=7"):
        LatentDataset(root)

    root = write_latents(tmp_path / "label", num_classes=3)
    m = json.loads((root / "manifest.json").read_text())
    m["class_names"], m["num_classes"] = ["a"], 1  # the shards hold labels 0..2
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"shard-r00-0000\d.*label \d outside \[0, 1\)"):
        LatentDataset(root)

    root = write_latents(tmp_path / "corrupt")
    p = root / "shard-r00-00001.safetensors"
    p.write_bytes(p.read_bytes()[:-7])  # truncated
    with pytest.raises(ValueError, match="shard-r00-00001.*not a readable safetensors"):
        LatentDataset(root)

    root = write_latents(tmp_path / "badjson")
    (root / "manifest.json").write_text("{nope")
    with pytest.raises(ValueError, match="manifest.json.*JSON"):
        LatentDataset(root)

    root = write_latents(tmp_path / "nokey")
    m = json.loads((root / "manifest.json").read_text())
    del m["scaling_factor"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="missing key 'scaling_factor'"):
        LatentDataset(root)


# ---------------------------------------------------------------------------------------------- digits


def test_digits_dataset():
    from sklearn.datasets import load_digits

    ds = DigitsDataset()
    raw = load_digits()
    assert len(ds) == 1797 and not ds.flip
    for i in (0, 5, 1796):
        x, y = ds[i]
        assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == ()
        torch.testing.assert_close(x[0], torch.tensor(raw.images[i] / 16 * 2 - 1, dtype=torch.float32))
        assert y == raw.target[i]
    assert ds.images.min() == -1 and ds.images.max() == 1
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    torch.manual_seed(0)
    flipped = DigitsDataset(flip=True)
    outs = [flipped[0][0] for _ in range(40)]
    assert any(torch.equal(o, ds[0][0]) for o in outs) and any(torch.equal(o, ds[0][0].flip(-1)) for o in outs)


# ---------------------------------------------------------------------------------------------- factory & info


def test_build_dataset_and_info(tmp_path):
    ds, info = build_dataset("builtin")
    assert isinstance(ds, DigitsDataset) and not ds.flip
    assert info == DataInfo(10, 1, 8, 8, tuple("0123456789"), None, 1.0, "builtin:digits")
    assert DataInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    assert build_dataset("builtin", "digits", flip=True)[0].flip

    root = write_latents(tmp_path / "l")
    ds, info = build_dataset("latents", str(root))
    assert isinstance(ds, LatentDataset) and ds.flip and len(ds) == 5
    assert (info.num_classes, info.in_channels, info.latent_size, info.image_size) == (3, C, H, 8 * H)
    assert info.vae == "some/vae" and info.scaling_factor == SF and info.source == str(root.resolve())
    assert DataInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    assert not build_dataset("latents", str(root), flip=False)[0].flip

    with pytest.raises(ValueError, match="'mnist'"):
        build_dataset("builtin", "mnist")
    with pytest.raises(ValueError, match="'images'"):
        build_dataset("images", "x")
    with pytest.raises(ValueError, match="data.path must name the extraction folder"):
        build_dataset("latents")
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset("latents", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown key"):
        DataInfo.from_dict({**info.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="missing key.*num_classes"):
        DataInfo.from_dict({k: v for k, v in info.to_dict().items() if k != "num_classes"})


def test_decoders_and_uint8(tmp_path):
    _, info = build_dataset("builtin")
    x = torch.linspace(-1.5, 1.5, 2 * 64).view(2, 1, 8, 8)
    img = load_decoder(info)(x)
    assert img.shape == (2, 3, 8, 8) and torch.equal(img[:, 0], img[:, 2]) and img.abs().max() == 1

    u = to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5))
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 1, 5)
    assert u[0, 0, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match=r"\(N, 1\|3, H, W\)"):
        to_uint8(torch.zeros(2, 8, 8))

    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
    )
    vae.save_pretrained(tmp_path / "vae")
    info = DataInfo(3, 4, 4, 8, ("a", "b", "c"), str(tmp_path / "vae"), 0.18215, "test")
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        expected = vae.decode(z / 0.18215).sample.clamp(-1, 1)
    out = load_decoder(info)(z)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="latent channels"):
        load_decoder(DataInfo(3, 1, 4, 8, ("a", "b", "c"), str(tmp_path / "vae"), 0.18215, "test"))
