"""Placement search: which analog layers get a compensation module.

* :mod:`.evaluator`: the objective of a placement (accuracy recovered minus a price per % of overhead),
  estimated cheaply with shared compensators on search chips and the validation split, cached;
* :mod:`.env`: the Gymnasium environment an agent learns in;
* :mod:`.search`: the strategies (``ppo``, ``exhaustive``, ``greedy``, ``all``, ``none``) behind ``search()``.
"""
from .env import PlacementEnv
from .evaluator import Evaluation, Placement, PlacementEvaluator, SearchConfig, enumerate_placements
from .search import STRATEGIES, PPOConfig, SearchResult, search

__all__ = ["Evaluation", "PPOConfig", "Placement", "PlacementEnv", "PlacementEvaluator", "STRATEGIES",
           "SearchConfig", "SearchResult", "enumerate_placements", "search"]
