"""The sampling package's error (no torch import here: argument parsing stays torch-free)."""
from ..errors import DitMoeError

__all__ = ["SamplingError"]


class SamplingError(DitMoeError, ValueError):
    """Bad sampling inputs (class ids, labels, settings, output folder); the message names the value at fault."""
