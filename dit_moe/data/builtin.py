"""The embedded default dataset: real images that ship inside an installed package, no download.

`DigitsDataset` is the UCI handwritten digits set bundled with scikit-learn (`sklearn.datasets.load_digits`):
1797 real 8x8 grey images with 17 intensity levels (0..16), 10 classes. It stands in for a latent dataset
with the identity as "VAE": the diffusion model works directly in pixel space, so the whole
train -> sample -> evaluate path runs on a CPU in minutes. ``reference_digits`` writes the whole set as the FID
reference of the demo and the routing study.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits in [-1, 1].

    Item i: (x, y) with x float32 (1, 8, 8) = value / 16 * 2 - 1 and y an int64 scalar tensor in [0, 10).
    No horizontal flip by default: a mirrored digit is not the same digit (flip=True draws one from torch's
    global RNG, as LatentDataset does).
    """

    num_classes = 10
    image_size = 8
    in_channels = 1
    class_names = tuple(str(d) for d in range(10))

    def __init__(self, flip: bool = False):
        from sklearn.datasets import load_digits  # heavy import, only when the dataset is used

        digits = load_digits()
        images = torch.from_numpy(digits.images).to(torch.float32)  # (1797, 8, 8), values 0..16
        self.images = (images / 16.0 * 2.0 - 1.0).unsqueeze(1)  # (N, 1, 8, 8) in [-1, 1]
        self.labels = torch.from_numpy(digits.target).to(torch.int64)  # (N,)
        self.flip = flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.clone(), self.labels[i].clone()

    def __repr__(self) -> str:
        return f"DigitsDataset(n={len(self)}, flip={self.flip})"


# Names accepted by build_dataset("builtin", name); each class exposes num_classes, image_size, in_channels,
# class_names and takes flip=.
BUILTIN_DATASETS: dict[str, type[Dataset]] = {"digits": DigitsDataset}


def reference_digits(path: Path) -> Path:
    """Write the embedded digits as an ADM-style npz (``arr_0`` uint8 (N, H, W, 3)) to use as the FID reference."""
    from . import to_uint8      # here, not at the top: dit_moe.data imports this module

    dataset = DigitsDataset()
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=arr)
    return path
