"""The analysis' error (no torch import here: the analysis CLI's training-curve path stays torch-free)."""
from ..errors import DitMoeError

__all__ = ["AnalysisError"]


class AnalysisError(DitMoeError, ValueError):
    """Bad analysis inputs (dense model, missing logs, bad class ids); the message names the file or value."""
