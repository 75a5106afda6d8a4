"""Checks of command-line values that several commands share, run before any work or any folder is created.

Each raises the calling command's own error class (``error``), with a message that names the flag and its value.
No torch import (``dit-moe analyze --run`` stays torch-free).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

__all__ = ["check_at_least", "check_positive", "check_output_file", "check_output_dir"]


def check_at_least(flag: str, value, low, error: type[Exception]) -> None:
    """``value`` (when given) is a number >= ``low``."""
    if value is not None and not value >= low:
        raise error(f"{flag} {value} must be >= {low}")


def check_positive(flag: str, value, error: type[Exception]) -> None:
    """``value`` (when given) is a finite number > 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise error(f"{flag} {value} must be a finite number > 0")


def _nearest_existing_parent(path: Path) -> Optional[Path]:
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent if parent.exists() else None


def check_output_file(flag: str, path, error: type[Exception], suffixes: Optional[dict] = None) -> None:
    """``path`` (when given) can become a file: not a folder, no file where a folder of its path should be, and
    (with ``suffixes``, e.g. PIL's registered image extensions) an extension that names a known format."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise error(f"{flag} {path} is a folder; give a file name")
    parent = _nearest_existing_parent(p)
    if parent is not None and not parent.is_dir():
        raise error(f"{flag} {path}: {parent} is a file, not a folder")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        known = ", ".join(sorted(s for s in suffixes if s in (".png", ".jpg", ".jpeg", ".webp", ".tiff", ".bmp")))
        raise error(f"{flag} {path}: unknown image file extension {p.suffix or '(none)'!r}; use one of {known}")


def check_output_dir(flag: str, path, error: type[Exception]) -> None:
    """``path`` (when given) can be or become a folder: not a file, no file where a folder of its path should be."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise error(f"{flag} {path} is a file; give a folder")
    parent = _nearest_existing_parent(p)
    if parent is not None and not parent.is_dir():
        raise error(f"{flag} {path}: {parent} is a file, not a folder")

