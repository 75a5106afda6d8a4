"""FID statistics: mean and covariance of features, the Frechet distance, and the statistics file format.

A statistics file (``save_stats``) is an npz with ``format`` = STATS_FORMAT, ``mu``, ``sigma`` (float64), the
extractor and layer they come from, the number of images and their resolution; where the extractor has spatial
features (sFID, see ``extraction.SPATIAL_TAPS``) also ``mu_s``, ``sigma_s`` and ``spatial_layer``. An ADM
reference batch carries ``mu``/``sigma`` of TF Inception pool_3 and ``mu_s``/``sigma_s`` of its ``mixed_6/conv``
spatial features without the rest (``ADM_STATS_EXTRACTOR``, ``ADM_SPATIAL_LAYER``).
"""
import os
import tempfile

import numpy as np

from ..errors import EvaluationError

__all__ = ["STATS_FORMAT", "ADM_STATS_EXTRACTOR", "ADM_SPATIAL_LAYER", "feature_statistics", "frechet_distance"]

# The spatial keys are optional: files without them (written before sFID existed) read as before.
STATS_FORMAT = "dit_moe-fid-stats-v1"
ADM_STATS_EXTRACTOR = ("inception-v3-compat", "2048")  # ADM's mu/sigma are TF Inception pool_3 statistics
ADM_SPATIAL_LAYER = "mixed_6/conv"                       # ... and its mu_s/sigma_s those of mixed_6/conv[..., :7]


def _read_stats(path, npz):
    mu = np.asarray(npz["mu"], dtype=np.float64)
    sigma = np.asarray(npz["sigma"], dtype=np.float64)
    _check_stats_shapes(mu, sigma, path)
    spatial = _read_spatial(path, npz)
    if "format" in npz.files:  # written by save_stats
        if str(npz["format"][()]) != STATS_FORMAT:
            raise EvaluationError(f"{path}: unknown statistics format {str(npz['format'][()])!r}, expected {STATS_FORMAT!r}")
        res = tuple(int(r) for r in npz["resolution"])
        return {
            "mu": mu, "sigma": sigma,
            "feature_extractor": str(npz["feature_extractor"][()]),
            "feature_layer": str(npz["feature_layer"][()]),
            "num_images": int(npz["num_images"][()]),
            "resolution": res if min(res) > 0 else None,
            "origin": "dit_moe",
            **spatial,
        }
    # ADM reference batch: TF Inception pool_3 (and mixed_6/conv), image count and resolution not recorded
    extractor, layer = ADM_STATS_EXTRACTOR
    if spatial["mu_s"] is not None:
        spatial["spatial_layer"] = ADM_SPATIAL_LAYER
    return {"mu": mu, "sigma": sigma, "feature_extractor": extractor, "feature_layer": layer,
            "num_images": None, "resolution": None, "origin": "ADM", **spatial}


def _read_spatial(path, npz):
    """{"mu_s", "sigma_s", "spatial_layer"} of a statistics npz; all None when it holds no spatial statistics."""
    keys = set(npz.files)
    if not {"mu_s", "sigma_s"} & keys:
        return {"mu_s": None, "sigma_s": None, "spatial_layer": None}
    if not {"mu_s", "sigma_s"} <= keys:
        raise EvaluationError(f"{path}: spatial statistics need both mu_s and sigma_s, found only "
                              f"{sorted({'mu_s', 'sigma_s'} & keys)}")
    mu_s = np.asarray(npz["mu_s"], dtype=np.float64)
    sigma_s = np.asarray(npz["sigma_s"], dtype=np.float64)
    _check_stats_shapes(mu_s, sigma_s, f"{path} (mu_s/sigma_s)")
    layer = str(npz["spatial_layer"][()]) if "spatial_layer" in keys else None
    return {"mu_s": mu_s, "sigma_s": sigma_s, "spatial_layer": layer}


def _check_stats_shapes(mu, sigma, where):
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvaluationError(f"{where}: statistics must be mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvaluationError(f"{where}: statistics contain NaN or inf")


def feature_statistics(feats):
    """(N, D) features -> (mu (D,), sigma (D, D)), float64, unbiased covariance as in every FID code."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise EvaluationError(f"FID statistics need at least 2 feature vectors (N, D), got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """
    Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

    tr((sigma1 sigma2)^{1/2}) equals tr((A sigma2 A)^{1/2}) with A = sigma1^{1/2}, and A sigma2 A is symmetric
    positive semi-definite, so symmetric eigendecompositions (eigh) give it stably in float64 without the
    complex round-off that scipy.linalg.sqrtm of the non-symmetric product produces.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_stats_shapes(mu1, sigma1, "frechet_distance (first)")
    _check_stats_shapes(mu2, sigma2, "frechet_distance (second)")
    if mu1.shape != mu2.shape:
        raise EvaluationError(f"frechet_distance: feature dimensions differ, {mu1.shape[0]} vs {mu2.shape[0]}")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    # The distance is a sum of squares, >= 0; for (nearly) identical statistics the traces cancel and float64
    # round-off of order eps * tr(sigma) is left, of either sign. A negative value is that round-off, never a
    # distance (a genuinely wrong result would be far larger than the eigenvalues' rounding), so report 0.
    return max(fid, 0.0)


def _write_npz_atomic(path, **arrays):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_stats(path, mu, sigma, extractor, layer, num_images, resolution, spatial=None):
    """``spatial``: None, or (spatial_layer, mu_s, sigma_s) of the same images and extractor (sFID)."""
    extra = {}
    if spatial is not None:
        spatial_layer, mu_s, sigma_s = spatial
        extra = {"spatial_layer": np.array(spatial_layer), "mu_s": mu_s, "sigma_s": sigma_s}
    _write_npz_atomic(
        path, format=np.array(STATS_FORMAT), mu=mu, sigma=sigma,
        feature_extractor=np.array(extractor), feature_layer=np.array(layer),
        num_images=np.array(num_images), resolution=np.array(resolution if resolution else (-1, -1)), **extra)
