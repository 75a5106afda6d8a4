"""Routers behind one interface (``Router`` -> ``RouterOutput``): top-k, fixed top-p, DTop-p and expert choice."""
from .base import Router, RouterOutput, load_balance_loss, mean_entropy, top_p_mask
from .dtopp import DTopPRouter, ThresholdController
from .expert_choice import ExpertChoiceRouter, expert_capacity
from .topk import TopKRouter
from .topp import TopPRouter

__all__ = ["Router", "RouterOutput", "TopKRouter", "TopPRouter", "DTopPRouter", "ThresholdController",
           "ExpertChoiceRouter", "expert_capacity", "load_balance_loss", "mean_entropy", "top_p_mask"]
