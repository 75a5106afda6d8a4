"""
Feature extractors registered with torch-fidelity, beside its own Inception-v3.

* ``"digits-cnn"``: a small CNN classifier of sklearn's 8x8 handwritten digits (1797 images, 10 classes),
  trained deterministically on CPU in a few seconds and cached. Its penultimate layer (64-d) is the feature
  space of the builtin demo's FID ("digits FID"), its logits give the demo's Inception-Score analogue, and
  `digits_classifier()` exposes the classifier itself so tests can check that class-conditional samples show
  the requested digit.
* ``"test-tiny"``: a fixed-seed random convolution + global pooling (16-d features), for fast offline tests.

Both take what every torch-fidelity extractor takes: a uint8 batch (N, 3, H, W) of any size.
Importing this module registers them; importing it twice (or reloading it) is harmless.
"""

import math
import os
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from .errors import EvaluationError


#################################################################################
#                     Preprocessing shared with the demo                         #
#################################################################################

DIGITS_SIZE = 8          # sklearn digits are 8x8
DIGITS_MAX = 16.0        # ... with integer intensities 0..16
NUM_DIGITS = 10


def digits_preprocess(images):
    """
    uint8 images (N, 3, H, W) in [0, 255] -> (N, 1, 8, 8) float in [-1, 1], the classifier's input space.

    Grey is the mean of the channels (the demo's images are grey, so R = G = B). Area interpolation down to
    8x8 averages the pixels that came from one digit cell, which inverts a nearest/area upscale exactly.
    [0, 255] maps linearly to [-1, 1], the same map the data gets from [0, 16] (x / 16 * 2 - 1).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"digits_preprocess expects images (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"digits_preprocess expects dtype uint8, got {images.dtype}")
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-2:] != (DIGITS_SIZE, DIGITS_SIZE):
        x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="area")
    return x / 127.5 - 1.0


#################################################################################
#                              Digits classifier                                 #
#################################################################################

class DigitsCNN(nn.Module):
    """
    A three-conv classifier for 8x8 grey digits in [-1, 1].

    (N, 1, 8, 8) -> conv 32, pool -> (4x4) conv 64, pool -> (2x2) conv 64 -> fc 64 (features) -> fc 10.
    Pooling early keeps training at a few seconds on one CPU core.
    """

    FEATURE_DIM = 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, self.FEATURE_DIM)
        self.head = nn.Linear(self.FEATURE_DIM, NUM_DIGITS)

    def features(self, x):
        """(N, 1, 8, 8) in [-1, 1] -> (N, 64) penultimate activations."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)   # (N, 32, 4, 4)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)   # (N, 64, 2, 2)
        x = F.relu(self.conv3(x))                    # (N, 64, 2, 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        """(N, 1, 8, 8) in [-1, 1] -> (N, 10) logits."""
        return self.head(self.features(x))


def load_digits_arrays():
    """sklearn's digits as (images (N, 1, 8, 8) float32 in [-1, 1], labels (N,) int64). Ships with sklearn."""
    from sklearn.datasets import load_digits   # not at the top: scikit-learn takes most of a second to import

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX * 2.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return x, y


def digits_split(num, seed=0, holdout_fraction=0.2):
    """Deterministic (train_idx, heldout_idx) permutation split of `num` items."""
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    num_heldout = int(round(num * holdout_fraction))
    return perm[num_heldout:], perm[:num_heldout]


def _fit(x, y, seed, epochs, batch_size=64, lr=2e-3):
    """Train a fresh DigitsCNN on (x, y) with Adam; everything random comes from `seed`."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(len(x) / batch_size))
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    threads = torch.get_num_threads()
    # one thread: this net is too small to gain from more, and intra-op threading on a busy machine costs ~10x
    torch.set_num_threads(1)
    try:
        _fit_epochs(model, opt, sched, x, y, gen, epochs, batch_size)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def _fit_epochs(model, opt, sched, x, y, gen, epochs, batch_size):
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def classifier_accuracy(model, x, y, batch_size=512):
    """Fraction of (x, y) that `model` classifies correctly."""
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]).sum().item()
    return correct / len(x)


DIGITS_TRAIN_DEFAULTS = {"seed": 0, "epochs": 10}


def train_digits_cnn(seed=DIGITS_TRAIN_DEFAULTS["seed"], epochs=DIGITS_TRAIN_DEFAULTS["epochs"], train_on_all=True):
    """
    Train the digits classifier deterministically on CPU.

    First fits on a fixed 80% split and measures accuracy on the held-out 20%; then, if `train_on_all`, fits a
    fresh model with the same recipe on all 1797 images (the held-out number describes that recipe).
    Returns (model, info) with info = {"heldout_accuracy", "num_heldout", "trained_on", "seed", "epochs"}.
    """
    x, y = load_digits_arrays()
    train_idx, heldout_idx = digits_split(len(x), seed=seed)
    model = _fit(x[train_idx], y[train_idx], seed, epochs)
    info = {
        "heldout_accuracy": classifier_accuracy(model, x[heldout_idx], y[heldout_idx]),
        "num_heldout": len(heldout_idx),
        "trained_on": "train-80%",
        "seed": seed,
        "epochs": epochs,
    }
    if train_on_all:
        model = _fit(x, y, seed, epochs)
        info["trained_on"] = "all"
    return model, info


CACHE_FORMAT = "dit_moe-digits-cnn-v1"


def cache_dir():
    """Where dit_moe caches small derived artefacts: $DIT_MOE_CACHE, else ~/.cache/dit_moe."""
    return os.environ.get("DIT_MOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dit_moe")


def digits_cnn_path():
    return os.path.join(cache_dir(), "digits_cnn.pt")


def _atomic_torch_save(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_digits_cnn(model, info, path=None):
    """Cache `model` (a DigitsCNN) with its training `info` at `path` (default `digits_cnn_path()`)."""
    blob = {"format": CACHE_FORMAT, "state_dict": model.state_dict(), "info": dict(info)}
    _atomic_torch_save(blob, path or digits_cnn_path())
    return blob


def load_digits_cnn(path=None):
    """
    The cached digits classifier (eval mode, frozen), training and caching it on first use.

    `path` defaults to `digits_cnn_path()`. A cache file written by another recipe version is retrained; an
    unreadable one is an error (delete it to retrain). Returns (model, info) as `train_digits_cnn`.
    """
    path = path or digits_cnn_path()
    if os.path.exists(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EvaluationError(f"digits-cnn cache {path} is unreadable ({e}); delete it to retrain") from e
        if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
            blob = None  # an older recipe: retrain below
    else:
        blob = None
    if blob is None:
        print(f"training the digits-cnn classifier (first use, a few seconds); caching it at {path}", file=sys.stderr)
        model, info = train_digits_cnn()
        blob = save_digits_cnn(model, info, path)
    model = DigitsCNN()
    model.load_state_dict(blob["state_dict"])
    model.eval().requires_grad_(False)
    return model, dict(blob["info"])


def digits_classifier(path=None):
    """The digits classifier: (N, 1, 8, 8) images in [-1, 1] -> (N, 10) logits. Eval mode, frozen."""
    return load_digits_cnn(path)[0]


#################################################################################
#                     torch-fidelity feature extractors                          #
#################################################################################

class DigitsCNNFeatureExtractor(FeatureExtractorBase):
    """
    torch-fidelity extractor "digits-cnn": uint8 (N, 3, H, W) -> "64" penultimate features (FID/KID/PRC) and
    "logits" (IS). `feature_extractor_weights_path` may point at a digits_cnn.pt written by `load_digits_cnn`.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net, self.info = load_digits_cnn(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return ("64", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "64", "kid": "64", "prc": "64"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, DIGITS_SIZE, DIGITS_SIZE, dtype=torch.uint8)

    def forward(self, x):
        feats = self.net.features(digits_preprocess(x))
        out = {"64": feats, "logits": self.net.head(feats)}
        return tuple(out[name] for name in self.features_list)


class TinyRandomFeatureExtractor(FeatureExtractorBase):
    """
    torch-fidelity extractor "test-tiny" for tests: a fixed-seed random 3x3 conv (3 -> 16) + tanh + global
    mean pooling, so any image size works. "16" features (FID/KID/PRC) and "logits" = fixed random 16 -> 10
    projection (IS). Needs no download and no training. ``spatial_tap`` (an identity) exposes the tanh map
    (N, 16, H, W) to a forward hook: the evaluator's sFID stand-in for Inception's mixed_6/conv.
    """

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        gen = torch.Generator().manual_seed(1234)
        self.register_buffer("conv_w", torch.randn(16, 3, 3, 3, generator=gen) / math.sqrt(27))
        self.register_buffer("conv_b", torch.randn(16, generator=gen) * 0.1)
        self.register_buffer("proj", torch.randn(16, NUM_DIGITS, generator=gen))
        self.spatial_tap = nn.Identity()

    @staticmethod
    def get_provided_features_list():
        return ("16", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "16", "kid": "16", "prc": "16"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)

    def forward(self, x):
        x = x.float() / 127.5 - 1.0
        h = self.spatial_tap(torch.tanh(F.conv2d(x, self.conv_w, self.conv_b, padding=1)))  # (N, 16, H, W)
        feats = h.mean(dim=(2, 3))                                          # (N, 16)
        out = {"16": feats, "logits": feats @ self.proj}
        return tuple(out[name] for name in self.features_list)


def _register(name, cls):
    """Register `cls` under `name` once; a reload of this module replaces its own earlier class."""
    current = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if current is None:
        register_feature_extractor(name, cls)
    elif current is not cls:
        if current.__module__ != cls.__module__ or current.__qualname__ != cls.__qualname__:
            raise ValueError(f'torch-fidelity feature extractor "{name}" is already registered by {current!r}')
        FEATURE_EXTRACTORS_REGISTRY[name] = cls


_register("digits-cnn", DigitsCNNFeatureExtractor)
_register("test-tiny", TinyRandomFeatureExtractor)
