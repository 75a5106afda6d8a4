"""Study records: one small JSON file per finished (arm, seed), kept inside the repository so a study outlives its
run folders.

A run folder (checkpoints, samples) stays under the study's output and out of git; its record
(``<records>/<arm>/seed-<n>.json``) holds every number the report needs -- losses and the loss curve, FID and
accuracy, routing statistics in training, in the probe and in sampling (mean, per layer, per timestep bucket), the
DTop-p state per layer, the compute/quality sweep, CPU and wall seconds per stage -- together with what produced
them: the evaluation settings, the run's full experiment config, the toolkit's version and git commit, and the
command that regenerates it. Beside the records, ``calibration.json`` and ``timing.json`` keep the calibrated Top-p
thresholds and the timing pass, so a study in a fresh clone with no ``runs/`` folder needs nothing else.

A record is trusted only when it matches the study now: the same arm and seed, the same evaluation settings and the
same experiment config (the run folder's location aside). Anything else -- invalid JSON, a missing field, another
setting -- is a one-line ``StudyError`` naming the file and the field, never a silently mixed table.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

from .config import StudyError

__all__ = ["RECORD_VERSION", "REQUIRED_FIELDS", "record_path", "read_record", "write_record", "toolkit_info",
           "read_cache", "write_cache", "config_difference"]

RECORD_VERSION = 1
ROOT = Path(__file__).resolve().parents[2]        # the checkout whose git commit a record names (if it is one)

# What the report reads from every record (anything else is optional: older records, dense arms).
REQUIRED_FIELDS = ("arm", "seed", "steps", "model", "objective", "routing", "default_moe", "curve", "final_loss",
                   "fid", "classifier_accuracy", "sec_per_step", "timings", "evaluation", "config")

# Config keys that say where a run lived, not what it computed.
_LOCATION_KEYS = ("train.run_dir",)


def record_path(records: Path, arm: str, seed: int) -> Path:
    return Path(records) / arm / f"seed-{seed}.json"


def toolkit_info() -> dict:
    """The toolkit's version and, in a git checkout, its commit and whether tracked files differ from it."""
    try:
        version = importlib.metadata.version("dit-moe")
    except importlib.metadata.PackageNotFoundError:
        version = None                 # run from a source tree that was never installed
    info: dict[str, Any] = {"version": version, "commit": None, "dirty": None}
    if not (ROOT / ".git").exists():
        return info
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=30,
                                        check=True).stdout.strip()
        info["commit"] = run("rev-parse", "HEAD")
        info["dirty"] = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass          # no git on this machine: the version alone identifies the toolkit
    return info


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_difference(saved: dict, now: dict, defaults: Optional[dict] = None) -> Optional[str]:
    """The first config key where ``saved`` and ``now`` differ ('key: saved in the record, now now'), or None.

    A key the record lacks (added to the toolkit after the record was written) counts as equal when its value now is
    the toolkit's default: the default is what the older toolkit did."""
    a, b = _flatten(saved), _flatten(now)
    d = _flatten(defaults or {})
    for key in sorted(set(a) | set(b)):
        if key in _LOCATION_KEYS:
            continue
        if key not in a:
            if key in d and d[key] == b[key]:
                continue
            return f"{key}: absent in the record, {b[key]!r} now"
        if key not in b:
            return f"{key}: {a[key]!r} in the record, unknown to this toolkit"
        if a[key] != b[key]:
            return f"{key}: {a[key]!r} in the record, {b[key]!r} now"
    return None


def read_record(path: Path, arm: str, seed: int, evaluation: dict, config: dict,
                defaults: Optional[dict] = None) -> dict:
    """A record checked against the study now: same arm, seed, evaluation settings and experiment config."""
    hint = f"delete it to run {arm} seed {seed} again"
    try:
        rec = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise StudyError(f"{path}: not a valid record (invalid JSON at line {e.lineno}); {hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: cannot read the record ({e})") from None
    if not isinstance(rec, dict):
        raise StudyError(f"{path}: not a valid record (a JSON object expected); {hint}")
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        raise StudyError(f"{path}: not a valid record (missing field {missing[0]!r}); {hint}")
    for key, want in (("arm", arm), ("seed", seed)):
        if rec[key] != want:
            raise StudyError(f"{path}: field {key!r} is {rec[key]!r}, expected {want!r} for this file name")
    saved = rec["evaluation"]
    if not isinstance(saved, dict):
        raise StudyError(f"{path}: field 'evaluation' must be a mapping; {hint}")
    for k in sorted(set(saved) | set(evaluation)):
        if saved.get(k) != evaluation.get(k):
            raise StudyError(f"{path}: recorded under other evaluation settings (evaluation.{k}: {saved.get(k)!r} in "
                             f"the record, {evaluation.get(k)!r} now); use another records folder, or {hint}")
    if not isinstance(rec["config"], dict):
        raise StudyError(f"{path}: field 'config' must be a mapping; {hint}")
    diff = config_difference(rec["config"], config, defaults)
    if diff is not None:
        raise StudyError(f"{path}: recorded with another experiment config (config.{diff}); use another records "
                         f"folder, or {hint}")
    return rec


def _atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader or a later study never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StudyError(f"{path}: cannot write ({e.strerror or e})") from None


def write_record(path: Path, result: dict) -> None:
    rec = {"record_version": RECORD_VERSION, **{k: v for k, v in result.items() if k != "skipped"}}
    _atomic_write(Path(path), json.dumps(rec, indent=1) + "\n")


def read_cache(path: Optional[Path]) -> dict:
    """calibration.json / timing.json (a folder's cache of one kind); {} when absent. A broken file is an error:
    losing a calibrated threshold silently would retrain an arm with another one."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise StudyError(f"{path}: invalid JSON at line {e.lineno}; fix or delete it") from None
    if not isinstance(d, dict):
        raise StudyError(f"{path}: a JSON object expected; fix or delete it")
    return d


def write_cache(path: Path, data: dict) -> None:
    _atomic_write(Path(path), json.dumps(data, indent=1) + "\n")
