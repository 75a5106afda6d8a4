"""FID, sFID, Inception Score, KID and precision/recall of generated images against a reference.

    dit-moe evaluate GENERATED REFERENCE --metrics fid,sfid,isc,kid,prc --out metrics.json

GENERATED / REFERENCE may each be
  * a folder of images (png/jpg/jpeg),
  * an ADM-style sample batch `.npz` with `arr_0` (uint8, N x H x W x 3), memory-mapped when stored uncompressed,
  * a statistics `.npz` with `mu`/`sigma`: an ADM reference batch (Inception pool_3 statistics, and `mu_s`/
    `sigma_s` of its mixed_6/conv spatial features for sFID; those files also carry 10K images in `arr_0` for
    precision/recall) or a file written by `save_stats` (which also records the extractor, layer, number of
    images and resolution, and the spatial statistics beside the pool ones),
  * in Python, a `torch.utils.data.Dataset` of uint8 (3, H, W) tensors, e.g. `ImageTensorDataset` over decoded
    latents.

Features come from torch-fidelity's extractors (`feature_extractor`, default "inception-v3-compat": the
2015-12-05 TF Inception weights ported to PyTorch with TF1-compatible resizing). Each input goes through the
extractor once; the FID is computed here in float64 from mean/covariance (`frechet_distance`), so precomputed
statistics and image sets use the same code, and IS/KID/PRC are computed by torch-fidelity's own metric
functions on those same features (the functions its `calculate_metrics` calls; `tests/test_evaluate.py` checks
that both routes give the same numbers).

sFID (ADM's spatial FID) is the same Frechet distance on spatial features: for Inception, the first 7 channels of
TF's `mixed_6/conv` (torch-fidelity's Mixed_6d.branch1x1; see `extraction.SPATIAL_TAPS`), 17 x 17 x 7 = 2023
values per image, read by a hook in the same extractor pass as pool_3.

Precision/recall use the same extractor as the other metrics: with the default that is Inception pool_3 (2048)
with k=3, i.e. ADM-style P/R, not torch-fidelity's VGG16 default. The JSON says so in `prc_features`.

Inception weights: torch-fidelity downloads its standard file on first use (internet needed once, then cached
under $TORCH_HOME/hub/checkpoints); offline machines pass `--inception-weights PATH` to a copy of
`weights-inception-2015-12-05-6726825d.pth`.

One file per job: ``sources`` (folders, npz batches, statistics files, Datasets), ``statistics`` (mean/covariance,
the Frechet distance, the statistics file), ``extraction`` (torch-fidelity extractors on a device), ``metrics``
(``compute_metrics``: the plan, one extractor pass per side, IS/KID/PRC, the settings JSON) and ``cli``.
"""
from .cli import main
from .extraction import (DEFAULT_EXTRACTOR, SPATIAL_TAPS, SpatialTap, check_extractor, extract_features,
                         make_extractor, spatial_tap)
from .metrics import (ISC_SPLITS, KID_SUBSET_SIZE, KID_SUBSETS, METRICS, PRC_NEIGHBORHOOD, SHUFFLE_SEED,
                      check_reference, compute_metrics, load_stats, save_stats, write_metrics_json)
from .sources import (IMAGE_EXTENSIONS, ImageFolderDataset, ImageTensorDataset, NpzImageDataset, Source,
                      open_source)
from .statistics import ADM_SPATIAL_LAYER, ADM_STATS_EXTRACTOR, STATS_FORMAT, feature_statistics, frechet_distance

# A private helper that tests/test_evaluate.py imports from here (the single-file module this package replaced).
from .statistics import _write_stats  # noqa: F401,E402

__all__ = [
    "ADM_SPATIAL_LAYER", "ADM_STATS_EXTRACTOR", "DEFAULT_EXTRACTOR", "IMAGE_EXTENSIONS", "ISC_SPLITS", "KID_SUBSETS",
    "KID_SUBSET_SIZE", "METRICS", "PRC_NEIGHBORHOOD", "SHUFFLE_SEED", "SPATIAL_TAPS", "STATS_FORMAT",
    "ImageFolderDataset", "ImageTensorDataset", "NpzImageDataset", "Source", "SpatialTap", "check_extractor",
    "check_reference", "compute_metrics", "extract_features", "feature_statistics", "frechet_distance", "load_stats",
    "main", "make_extractor", "open_source", "save_stats", "spatial_tap", "write_metrics_json",
]
