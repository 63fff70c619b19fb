"""A Gymnasium environment in which an agent decides, layer after layer, where compensation goes.

An episode walks the candidate analog layers in module order; step ``t`` decides for layer ``t``:
action 0 = no compensator, ``k`` = option ``k`` (a compensator of rank ``evaluator.ranks[k - 1]``; with one
option, 1 = compensator). With an overhead budget, an action that would exceed it is taken as the largest
smaller option that fits, or 0 (``info["masked"]``), so every finished placement is feasible.

**Reward**: 0 at every step but the last; at the last, ``reward_scale * objective(placement)``, the
objective of :mod:`correctnet.placement.evaluator` in pp:
``100 * (acc(p) - acc(none)) - price * cost(p)``.

**Observation** (``float32[12]``, each in ``[-1, 1]``), describing the layer to decide and the episode so far:

==  ==========================================================================================
 0  position ``t / (L - 1)``
 1  1 for a convolution, 0 for a linear layer
 2  the layer's share of the analog weights
 3  its share of the analog MACs
 4  its sensitivity (accuracy lost when only it has variations) / the largest one, clipped to [-1, 1]
 5  its Lipschitz constant, ``log(1 + L_t) / log(1 + max L)``
 6  its largest compensator's overhead / the overhead of compensating every layer so
 7  overhead spent so far / the overhead of compensating every layer at its largest option
 8  share of the tightest budget limit left (1 without a budget)
 9  1 if its cheapest option fits in the budget left, else 0
10  its price ``price * cost_t`` relative to ``max(price * cost_t, largest sensitivity)``
11  the previous action (0 at the first layer)
==  ==========================================================================================
"""
from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .evaluator import Placement, PlacementEvaluator

N_FEATURES = 12


class PlacementEnv(gym.Env):
    """Episodes of ``L`` binary decisions over ``evaluator.names``; the reward is the placement's objective."""

    metadata = {"render_modes": []}

    def __init__(self, evaluator: PlacementEvaluator, *, reward_scale: float = 0.1) -> None:
        super().__init__()
        self.evaluator = evaluator
        self.reward_scale = float(reward_scale)
        self.n_layers = len(evaluator.names)
        self.n_options = int(getattr(evaluator, "n_options", 1))
        self.action_space = spaces.Discrete(self.n_options + 1)
        self.observation_space = spaces.Box(-1.0, 1.0, (N_FEATURES,), np.float32)
        self._static = self._layer_features()
        self._t = 0
        self._chosen: list[int] = []

    def _layer_features(self) -> np.ndarray:
        ev = self.evaluator
        n = self.n_layers
        sens = np.asarray(ev.sensitivity, dtype=np.float64)
        s_max = max(float(np.abs(sens).max()), 1e-9)
        lip = np.asarray([ev.lipschitz.get(name, 0.0) for name in ev.names], dtype=np.float64)
        lip_max = max(float(np.log1p(lip.max())), 1e-9)
        cost = np.asarray(ev.layer_cost, dtype=np.float64)
        self._total_cost = max(float(cost.sum()), 1e-12)
        price = ev.cfg.price * cost
        rows = []
        for t, info in enumerate(ev.layer_info):
            rows.append([t / max(n - 1, 1), float(info["conv"]), info["params_share"], info["macs_share"],
                         np.clip(sens[t] / s_max, -1, 1), np.log1p(lip[t]) / lip_max, cost[t] / self._total_cost,
                         price[t] / max(price[t], s_max, 1e-9)])
        return np.asarray(rows, dtype=np.float64)

    def _obs(self) -> np.ndarray:
        t = min(self._t, self.n_layers - 1)
        pos, conv, ps, ms, sens, lip, own, price = self._static[t]
        ev = self.evaluator
        spent = ev.cost(self._chosen)
        left = ev.budget_left(self._chosen)
        fits = 1.0 if ev.feasible([*self._chosen[:t], 1]) else 0.0
        prev = self._chosen[-1] / self.n_options if self._chosen else 0.0
        obs = [pos, conv, ps, ms, sens, lip, own, spent / self._total_cost, left, fits, price, prev]
        return np.clip(np.asarray(obs, dtype=np.float32), -1.0, 1.0)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t, self._chosen = 0, []
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._t >= self.n_layers:
            raise RuntimeError("the episode is over; call reset()")
        a = int(action)
        if not 0 <= a <= self.n_options:
            raise ValueError(f"action must be in 0..{self.n_options}, got {action!r}")
        taken = a
        while taken > 0 and not self.evaluator.feasible([*self._chosen, taken]):
            taken -= 1
        masked = taken != a
        self._chosen.append(taken)
        self._t += 1
        info: dict[str, Any] = {"masked": masked}
        reward = 0.0
        done = self._t == self.n_layers
        if done:
            ev = self.evaluator.evaluate(tuple(self._chosen))
            reward = self.reward_scale * ev.objective
            info.update(placement=ev.placement, objective=ev.objective, accuracy=ev.accuracy, cost=ev.cost)
            assert math.isfinite(reward), "a masked episode is always feasible"
        return self._obs(), float(reward), done, False, info

    @property
    def placement(self) -> Placement:
        """The decisions taken so far in this episode."""
        return tuple(self._chosen)


__all__ = ["N_FEATURES", "PlacementEnv"]
