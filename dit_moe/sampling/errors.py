"""The sampling package's errors (no torch import here: the analysis CLI's training-curve path stays torch-free)."""
from ..errors import DitMoeError

__all__ = ["SamplingError", "AnalysisError"]


class SamplingError(DitMoeError, ValueError):
    """Bad sampling inputs (class ids, labels, settings, output folder); the message names the value at fault."""


class AnalysisError(DitMoeError, ValueError):
    """Bad analysis inputs (dense model, missing logs, bad class ids); the message names the file or value."""
