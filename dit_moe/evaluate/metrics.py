"""The evaluator: which features each side needs, one extractor pass per side, the metrics, their settings.

``compute_metrics`` plans first (statistics where they fit the extractor, features otherwise; what each metric
needs of each side), so an input that cannot serve fails before any feature is extracted; ``check_reference``
runs the same plan on a reference alone (``sample --fid`` checks its reference before drawing a sample).
"""
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric

from .. import features as _features
from ..errors import EvaluationError, InputNotFoundError
from .extraction import (DEFAULT_EXTRACTOR, SPATIAL_TAPS, _default_workers, _resolve_device, check_extractor,
                         extract_features, make_extractor, spatial_tap)
from .sources import open_source
from .statistics import _write_stats, feature_statistics, frechet_distance

__all__ = ["METRICS", "compute_metrics", "check_reference", "save_stats", "load_stats", "write_metrics_json"]

METRICS = ("fid", "sfid", "isc", "kid", "prc")


# Settings of torch-fidelity's metric functions that change the numbers; recorded in the JSON.
ISC_SPLITS = 10
SHUFFLE_SEED = 2020          # torch-fidelity's rng_seed: IS shuffling and KID subset draws
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PRC_NEIGHBORHOOD = 3


@dataclass
class _Plan:
    """Which side needs which features, and where each side's FID (and sFID) statistics come from."""
    layers: dict = field(default_factory=lambda: {"generated": set(), "reference": set()})
    fid_from_stats: dict = field(default_factory=dict)
    sfid_from_stats: dict = field(default_factory=dict)


def _fid_stats_usable(source, extractor, layer):
    s = source.stats
    return s is not None and (s["feature_extractor"], s["feature_layer"]) == (extractor, layer)


def _sfid_stats_usable(source, extractor, spatial_layer):
    s = source.stats
    return (s is not None and s.get("mu_s") is not None and s["feature_extractor"] == extractor
            and s.get("spatial_layer") == spatial_layer)


def _layers_for(cls, extractor, metrics):
    """{metric: feature layer}: torch-fidelity's default per metric; sFID's the extractor's spatial tap."""
    return {m: spatial_tap(extractor).layer if m == "sfid" else cls.get_default_feature_layer_for_metric(m)
            for m in metrics}


def _check_metrics(metrics) -> tuple:
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise EvaluationError(f"metrics must be a non-empty subset of {METRICS}, got {metrics}")
    return metrics


def _plan_side(plan, role, src, metrics, feature_extractor, layer_for, fid_layer, stats_file=False):
    """Record in ``plan`` what ``src`` (the ``role`` side) must give for ``metrics``: its FID (sFID) statistics where
    they fit the extractor, else features of ``fid_layer`` (the spatial tap); features for IS/KID/PRC.
    EvaluationError when it cannot. ``stats_file``: a statistics file of this side will be written, so FID
    statistics are needed, and spatial ones where they come at no extra pass."""
    if "fid" in metrics or stats_file:
        plan.fid_from_stats[role] = _fid_stats_usable(src, feature_extractor, fid_layer)
        if not plan.fid_from_stats[role]:
            if not src.has_images:
                s = src.stats
                raise EvaluationError(
                    f"{role} {src.name} holds FID statistics of {s['feature_extractor']}/{s['feature_layer']} "
                    f"but no images; cannot evaluate with extractor {feature_extractor}")
            plan.layers[role].add(fid_layer)
    tap = SPATIAL_TAPS.get(feature_extractor)
    if "sfid" in metrics:
        plan.sfid_from_stats[role] = _sfid_stats_usable(src, feature_extractor, tap.layer)
        if not plan.sfid_from_stats[role]:
            if not src.has_images:
                raise EvaluationError(
                    f"sfid needs {role} images or spatial statistics (mu_s/sigma_s) of {feature_extractor}/"
                    f"{tap.layer}; {src.name} holds neither")
            plan.layers[role].add(tap.layer)
    for m in ("isc", "kid", "prc"):
        if m not in metrics or (m == "isc" and role == "reference"):
            continue
        if not src.has_images:
            raise EvaluationError(f"{m} needs {role} images, but {src.name} holds only statistics (mu/sigma); "
                                  f"precision/recall and KID need the reference images, e.g. arr_0 of an ADM "
                                  f"reference batch")
        plan.layers[role].add(layer_for[m])
    if stats_file and tap is not None and role not in plan.sfid_from_stats:
        if _sfid_stats_usable(src, feature_extractor, tap.layer):
            plan.sfid_from_stats[role] = True
        elif plan.layers[role]:             # the extractor runs over these images anyway: the hook is free
            plan.sfid_from_stats[role] = False
            plan.layers[role].add(tap.layer)

    minimum = {"fid": 2, "sfid": 2, "isc": ISC_SPLITS, "kid": 2, "prc": PRC_NEIGHBORHOOD + 1}
    for m in metrics:
        uses_images = {"fid": plan.fid_from_stats.get(role) is False, "sfid": plan.sfid_from_stats.get(role) is False,
                       "isc": role == "generated"}.get(m, True)
        if uses_images and len(src.dataset) < minimum[m]:
            raise EvaluationError(f"{m} needs at least {minimum[m]} {role} images, {src.name} has {len(src.dataset)}")


def check_reference(reference, *, metrics=("fid",), feature_extractor=DEFAULT_EXTRACTOR, inception_weights=None,
                    recursive=False, label="reference"):
    """Check, without extracting a feature, that ``reference`` can serve as the reference of ``compute_metrics``
    with these settings: the metrics and extractor are known, the weights file exists, the reference opens (folder,
    npz, statistics) and holds what the metrics need. Returns its ``Source``; raises the error compute_metrics
    would raise, a problem of the reference itself prefixed with ``label`` (``--fid``: the flag that named it).
    Callers that produce the generated side first (bulk sampling) run it before producing anything."""
    metrics = _check_metrics(metrics)
    cls = check_extractor(feature_extractor)
    if inception_weights is not None and not os.path.isfile(inception_weights):
        raise InputNotFoundError(f"feature extractor weights {inception_weights} do not exist")
    try:
        layer_for = _layers_for(cls, feature_extractor, metrics)
        ref = open_source(reference, recursive=recursive)
        _plan_side(_Plan(), "reference", ref, metrics, feature_extractor, layer_for,
                   cls.get_default_feature_layer_for_metric("fid"))
    except (EvaluationError, InputNotFoundError) as e:
        raise type(e)(f"{label}: {e}") from None
    return ref


def _gaussian_statistics(from_stats: dict, sources: dict, feats: dict, layer, keys: tuple[str, str], features: str,
                         own: dict, metric: str) -> dict:
    """role -> (mu, sigma) of FID or sFID: read from the role's statistics file (``keys``) where ``from_stats[role]``,
    else computed from its extracted features of ``layer``; records where each came from in ``own``."""
    stats = {}
    for role, src in sources.items():
        if role not in from_stats:
            continue
        if from_stats[role]:
            stats[role] = (src.stats[keys[0]], src.stats[keys[1]])
            own[f"{metric}_{role}_statistics"] = f"{'/'.join(keys)} from {src.name} ({src.stats['origin']})"
        else:
            stats[role] = feature_statistics(feats[role][layer].numpy())
            own[f"{metric}_{role}_statistics"] = f"{features} of {len(src.dataset)} images"
    return stats


def compute_metrics(generated, reference, *, metrics=("fid",), feature_extractor=DEFAULT_EXTRACTOR,
                    inception_weights=None, batch_size=64, device=None, settings=None, verbose=False,
                    kid_subset_size=None, num_workers=None, recursive=False, save_reference_stats=None):
    """
    Metrics of `generated` against `reference`; returns {"metrics": {...}, "settings": {...}}.

    generated, reference: folder path, npz path (images `arr_0` and/or statistics `mu`/`sigma`), or a Dataset
        of uint8 (3, H, W) tensors (see module docstring).
    metrics: subset of ("fid", "sfid", "isc", "kid", "prc"). Keys in the result: fid; sfid; isc_mean, isc_std;
        kid_mean, kid_std; precision, recall, f_score. sFID is the Frechet distance (same code as FID) of the
        extractor's spatial features (``SPATIAL_TAPS``: Inception's mixed_6/conv, first 7 channels, 2023 values),
        from a side's mu_s/sigma_s where it holds them (ADM reference batches, our statistics files).
    feature_extractor: a torch-fidelity extractor name ("inception-v3-compat", "digits-cnn", "test-tiny", ...);
        all metrics use it (so P/R are on Inception pool_3 by default, as ADM).
    inception_weights: local weights file for the extractor (torch-fidelity's feature_extractor_weights_path);
        None = torch-fidelity's standard download.
    settings: the caller's settings that change the number (model, checkpoint step, sampler, steps, CFG, ...);
        merged with the evaluator's own (reference, extractor, counts, resolution, metric parameters). Where a
        caller key names something the evaluator determined and the values differ, the evaluator's value is
        kept and the caller's moves to "caller_<key>". A Dataset input is described by the caller's
        settings["generated"] / settings["reference"] when given.
    kid_subset_size: default min(1000, N_generated, N_reference).
    save_reference_stats: write the reference's FID statistics (save_stats format) to this path, with its sFID
        statistics where they are known or come from the same extractor pass.
    """
    metrics = _check_metrics(metrics)
    cls = check_extractor(feature_extractor)
    layer_for = _layers_for(cls, feature_extractor, metrics)
    device = _resolve_device(device)

    gen = open_source(generated, recursive=recursive)
    ref = open_source(reference, recursive=recursive)
    if gen.resolution and ref.resolution and tuple(gen.resolution) != tuple(ref.resolution):
        raise EvaluationError(f"resolution mismatch: generated {gen.name} is {gen.resolution[0]}x{gen.resolution[1]}, "
                         f"reference {ref.name} is {ref.resolution[0]}x{ref.resolution[1]}")

    # ---- plan: statistics where they fit the extractor, features otherwise
    plan = _Plan()
    fid_layer = cls.get_default_feature_layer_for_metric("fid")
    need_ref_stats_file = save_reference_stats is not None
    for role, src in (("generated", gen), ("reference", ref)):
        _plan_side(plan, role, src, metrics, feature_extractor, layer_for, fid_layer,
                   stats_file=role == "reference" and need_ref_stats_file)

    if "kid" in metrics and kid_subset_size is not None:
        # torch-fidelity would fail only after the (long) feature extraction, with a traceback.
        for role, src in (("generated", gen), ("reference", ref)):
            n = len(src.dataset) if src.dataset is not None else None
            if n is not None and kid_subset_size > n:
                raise EvaluationError(f"--kid-subset-size {kid_subset_size} is larger than the {n} images of the "
                                      f"{role} set {src.name}; use at most {n}")

    # ---- one pass of the extractor per side
    feats = {}
    if plan.layers["generated"] or plan.layers["reference"]:
        extractor = make_extractor(feature_extractor, plan.layers["generated"] | plan.layers["reference"],
                                   inception_weights, device, verbose)
        for role, src in (("generated", gen), ("reference", ref)):
            if plan.layers[role]:
                if verbose:
                    print(f"extracting {feature_extractor} features of {role} {src.name}", file=sys.stderr)
                workers = _default_workers(src, device) if num_workers is None else num_workers
                feats[role] = extract_features(src.dataset, extractor, batch_size, device, workers, verbose,
                                               spatial=plan.sfid_from_stats.get(role) is False)

    # ---- metrics
    out = {}
    own = {**_source_settings("generated", gen), **_source_settings("reference", ref)}
    own.update(
        resolution=list(gen.resolution or ref.resolution or []) or None,
        feature_extractor=feature_extractor,
        feature_layers={m: layer_for[m] for m in metrics},
        extractor_weights=_weights_description(feature_extractor, inception_weights),
        metrics_code=f"torch-fidelity {torch_fidelity.__version__} (IS/KID/PRC); FID, sFID: dit_moe.evaluate "
                     f"frechet_distance (float64)",
        eval_device=str(device),
    )
    sources = {"generated": gen, "reference": ref}
    fid_stats = _gaussian_statistics(plan.fid_from_stats, sources, feats, fid_layer, ("mu", "sigma"), "features", own,
                                     "fid")
    if "fid" in metrics:
        out["fid"] = frechet_distance(*fid_stats["generated"], *fid_stats["reference"])
    tap = SPATIAL_TAPS.get(feature_extractor)
    sfid_stats = _gaussian_statistics(plan.sfid_from_stats, sources, feats, tap.layer if tap else None,
                                      ("mu_s", "sigma_s"), "spatial features", own, "sfid")
    if "sfid" in metrics:
        out["sfid"] = frechet_distance(*sfid_stats["generated"], *sfid_stats["reference"])
        own["sfid_features"] = _spatial_description(feature_extractor, tap)
    tf_kwargs = {"verbose": verbose, "rng_seed": SHUFFLE_SEED, "samples_shuffle": True}
    if "isc" in metrics:
        r = isc_featuresdict_to_metric(feats["generated"], layer_for["isc"], isc_splits=ISC_SPLITS, **tf_kwargs)
        out["isc_mean"], out["isc_std"] = r["inception_score_mean"], r["inception_score_std"]
        own.update(isc_splits=ISC_SPLITS, isc_shuffle_seed=SHUFFLE_SEED)
    if "kid" in metrics:
        n1, n2 = len(gen.dataset), len(ref.dataset)
        size = min(KID_SUBSET_SIZE, n1, n2) if kid_subset_size is None else kid_subset_size
        r = kid_featuresdict_to_metric(feats["generated"], feats["reference"], layer_for["kid"],
                                       kid_subsets=KID_SUBSETS, kid_subset_size=size, **tf_kwargs)
        out["kid_mean"], out["kid_std"] = r["kernel_inception_distance_mean"], r["kernel_inception_distance_std"]
        own.update(kid_subsets=KID_SUBSETS, kid_subset_size=size, kid_kernel="poly3", kid_seed=SHUFFLE_SEED)
    if "prc" in metrics:
        r = prc_featuresdict_to_metric(feats["generated"], feats["reference"], layer_for["prc"],
                                       prc_neighborhood=PRC_NEIGHBORHOOD, **tf_kwargs)
        out.update(precision=r["precision"], recall=r["recall"], f_score=r["f_score"])
        adm = " (Inception pool_3, ADM-style)" if feature_extractor == DEFAULT_EXTRACTOR else ""
        own.update(prc_features=f"{feature_extractor}/{layer_for['prc']}{adm}", prc_neighborhood=PRC_NEIGHBORHOOD)

    if need_ref_stats_file:
        mu, sigma = fid_stats["reference"]
        spatial = (tap.layer, *sfid_stats["reference"]) if "reference" in sfid_stats else None
        _write_stats(save_reference_stats, mu, sigma, feature_extractor, fid_layer, ref.num_images or -1,
                     ref.resolution, spatial)

    return {"metrics": out, "settings": _merge_settings(settings, own, gen, ref)}


def _spatial_description(extractor, tap):
    where = "Inception Mixed_6d.branch1x1 = TF mixed_6/conv, as ADM's sFID" if extractor == DEFAULT_EXTRACTOR \
        else tap.module
    pool = f" pooled to {tap.pool[0]}x{tap.pool[1]}" if tap.pool else ""
    return f"{extractor}/{tap.layer} ({where}): first {tap.channels} channels{pool}, flattened H, W, C"


def _source_settings(role, src):
    out = {f"{role}_kind": src.kind}
    if src.kind != "dataset":  # a Dataset's description comes from the caller's settings when given
        out[role] = os.path.abspath(src.name)
    if src.num_images is not None:
        out[f"num_{role}"] = src.num_images
    return out


def _weights_description(extractor, weights):
    if weights is not None:
        return os.path.abspath(weights)
    if extractor == DEFAULT_EXTRACTOR:
        return "torch-fidelity default download (weights-inception-2015-12-05-6726825d.pth)"
    if extractor == "digits-cnn":
        return f"{_features.digits_cnn_path()} (recipe {_features.DIGITS_TRAIN_DEFAULTS})"
    return "built into the extractor"


def _merge_settings(caller, own, gen, ref):
    merged = dict(caller or {})
    for role, src in (("generated", gen), ("reference", ref)):
        if src.kind == "dataset" and role not in merged:
            merged[role] = src.name
    for key, value in own.items():
        # what the evaluator measured stays at the plain key; a differing caller value is kept beside it
        if key in merged and _jsonable(merged[key]) != _jsonable(value):
            merged[f"caller_{key}"] = merged[key]
        merged[key] = value
    return merged


def save_stats(source, path, *, feature_extractor=DEFAULT_EXTRACTOR, inception_weights=None, batch_size=64,
               device=None, verbose=False, recursive=False, num_workers=None):
    """
    Write FID statistics of `source` (folder, npz with arr_0, or Dataset) to the .npz `path`:
    mu, sigma (float64), feature_extractor, feature_layer, num_images, resolution (H, W), and where the extractor
    has a spatial tap (sFID) mu_s, sigma_s, spatial_layer from the same pass. Returns them as a dict (mu_s,
    sigma_s, spatial_layer None without a tap).
    """
    cls = check_extractor(feature_extractor)
    layer = cls.get_default_feature_layer_for_metric("fid")
    tap = SPATIAL_TAPS.get(feature_extractor)
    src = open_source(source, recursive=recursive)
    if not src.has_images:
        raise EvaluationError(f"{src.name} holds statistics, not images; nothing to compute")
    device = _resolve_device(device)
    extractor = make_extractor(feature_extractor, [layer], inception_weights, device, verbose)
    workers = _default_workers(src, device) if num_workers is None else num_workers
    feats = extract_features(src.dataset, extractor, batch_size, device, workers, verbose, spatial=tap is not None)
    mu, sigma = feature_statistics(feats[layer].numpy())
    spatial = (tap.layer, *feature_statistics(feats[tap.layer].numpy())) if tap is not None else None
    _write_stats(path, mu, sigma, feature_extractor, layer, len(src.dataset), src.resolution, spatial)
    return {"mu": mu, "sigma": sigma, "feature_extractor": feature_extractor, "feature_layer": layer,
            "num_images": len(src.dataset), "resolution": src.resolution,
            "mu_s": spatial[1] if spatial else None, "sigma_s": spatial[2] if spatial else None,
            "spatial_layer": spatial[0] if spatial else None}


def load_stats(path):
    """Statistics of a save_stats file or an ADM reference batch, as the dict save_stats returns."""
    src = open_source(path)
    if src.stats is None:
        raise EvaluationError(f"{path} holds no statistics (mu and sigma)")
    return src.stats


def _jsonable(value):
    """Plain-JSON copy of `value` (numpy/torch scalars, tuples, paths); TypeError naming what does not fit."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool, int, type(None))):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0:
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to JSON")


def write_metrics_json(path, metrics, settings):
    """Atomically write {"metrics": ..., "settings": ...} to `path` as JSON."""
    try:
        payload = {"metrics": _jsonable(metrics), "settings": _jsonable(settings)}
    except TypeError as e:
        raise TypeError(f"{path}: {e}") from e
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return payload
