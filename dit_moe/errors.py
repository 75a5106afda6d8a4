"""The toolkit's errors: one base, so every entry point can tell a user's mistake from a bug.

Every error a user can cause -- a bad config value, a corrupt checkpoint, an unreadable data folder, a run folder
held by another process -- derives from ``DitMoeError`` and carries a message that names the file, key or value
at fault. Entry points print it as one line and exit with code 2 (``cli_error``); anything else is a bug and keeps
its traceback.

    DitMoeError
      ConfigError (also a ValueError)          dit_moe.config: a config key, value or cross-section rule
      CheckpointError (also a RuntimeError)    dit_moe.weights.checkpoint: missing, corrupt or unfit checkpoint
      DataError (also a ValueError)            a dataset, shard, manifest or image that cannot be used
      InputNotFoundError (also a FileNotFoundError)   a path the user named does not exist
      EvaluationError (also a ValueError)      dit_moe.evaluate: inputs that cannot be compared
      SamplingError (also a ValueError)        dit_moe.sampling: class ids, labels, settings, output paths
      AnalysisError (also a ValueError)        dit_moe.analyze: a dense model, a missing log, bad classes
      InferenceError (also a ValueError)       dit_moe.inference: a checkpoint that cannot become a sampler, a device
      StudyError (also a ValueError)           dit_moe.study: a study config key or value, a failed study step
      ConvertError, LayoutError (ValueErrors)  dit_moe.weights.convert / layouts: a source that cannot be converted
      UpcycleError (also a ValueError)         dit_moe.weights.upcycle: a request that cannot be honoured
      TrainingError (also a RuntimeError)      training cannot continue
        TrainingDivergedError                  the loss became NaN or infinite
        TrainingInterrupted                    SIGTERM/SIGINT; a checkpoint was written (exit 128 + signal)
        RunLockedError                         another live process holds the run folder

The entry points (``dit_moe.cli.dispatch``) also print an ``OSError`` -- a path that cannot be read or written, a
full disk; its message names the file -- as one line with exit code 2.

The second base keeps ``except ValueError`` / ``except FileNotFoundError`` callers working.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


class DitMoeError(Exception):
    """An error the user can fix; the message names the file, key or value at fault."""


class DataError(DitMoeError, ValueError):
    """A dataset, shard, manifest or image cannot be used; the message names it."""


class InputNotFoundError(DitMoeError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class EvaluationError(DitMoeError, ValueError):
    """Evaluation inputs that cannot be compared (resolution, contents, settings)."""


class TrainingError(DitMoeError, RuntimeError):
    """Training cannot continue; the message says why and what to do."""


class TrainingDivergedError(TrainingError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(TrainingError):
    """SIGTERM/SIGINT arrived; a checkpoint was written before stopping."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Optional[Path]):
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint


class RunLockedError(TrainingError):
    """The run folder is locked by another live process (the message names its PID and host)."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    A DataLoader worker re-raises its error in the main process with the worker's traceback folded into the
    message; the last line of that traceback is the original message.
    """
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in text:
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and "Error" in head else last
    return " ".join(lines) or type(error).__name__


def cli_error(prog: str, error: BaseException) -> int:
    """Print ``prog: error: <one line>`` to stderr; returns the exit code of a user error (2)."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return 2
