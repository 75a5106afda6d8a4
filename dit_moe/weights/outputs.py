"""The output folders that convert, export and upcycle write, and the error they share.

A command that writes a folder refuses to write into an existing non-empty one unless asked to (``--overwrite``),
and even then only over an output of its own kind, never over a user's other files. The folder is written under a
temporary sibling name and renamed into place, so an interrupted write leaves no half-written output.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from ..errors import DitMoeError

__all__ = ["ConvertError", "one_line", "prepare_output", "replace_dir"]


class ConvertError(DitMoeError, ValueError):
    """A source that cannot be converted, or an output that must not be written; the message names it."""


def one_line(e: BaseException) -> str:
    """The first non-empty line of ``e``'s message (library errors span several lines; ours are one)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def prepare_output(out: str | os.PathLike, overwrite: bool, replaceable: Callable[[Path], bool], kind: str) -> Path:
    """Refuse to write into an existing non-empty folder unless ``overwrite``, and even then only over a folder
    that already is a ``kind`` output (never a user's other files). Nothing is written here."""
    out = Path(out)
    if out.is_file():
        raise ConvertError(f"{out}: exists and is a file; --out must be a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConvertError(f"{out}: exists and is not empty; nothing written (pass --overwrite to replace it)")
        if not replaceable(out):
            raise ConvertError(f"{out}: refusing to replace a folder that is not a {kind}")
    return out


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an older ``out`` (checked by ``prepare_output``)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
