"""Routers behind one interface (``Router`` -> ``RouterOutput``): top-k, fixed top-p and DTop-p."""
from .base import Router, RouterOutput, load_balance_loss, mean_entropy, top_p_mask
from .dtopp import DTopPRouter, ThresholdController
from .topk import TopKRouter
from .topp import TopPRouter

__all__ = ["Router", "RouterOutput", "TopKRouter", "TopPRouter", "DTopPRouter", "ThresholdController",
           "load_balance_loss", "mean_entropy", "top_p_mask"]
