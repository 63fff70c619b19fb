"""Placement search strategies behind one function: ``search(evaluator, strategy, ...)``.

* ``ppo`` (default): a PPO agent (stable-baselines3) learns in :class:`PlacementEnv`; training stops after
  ``max_evaluations`` distinct placements or ``episodes`` episodes, then the deterministic policy's
  placement is evaluated too; with ``polish`` (default) a local search from the best placement found spends
  what is left of ``max_evaluations`` on its neighbours (one layer's option changed, then two). The result is
  the best placement evaluated (the cache makes revisits free).
* ``exhaustive``: every feasible placement (``(K + 1)**L`` for ``K`` options per layer); the reference
  optimum for small ``L``.
* ``greedy``: layers by decreasing sensitivity; a layer gets the option that raises the objective most, if
  any does (``<= K L + 1`` evaluations).
* ``all`` / ``none``: every layer at its largest option / no layer (infeasible ``all`` under a budget scores
  ``-inf``).

All are seeded and reproducible: the same evaluator settings and seed give the same search.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, is_int, is_number, require
from ..progress import Pace
from .env import PlacementEnv
from .evaluator import Evaluation, Placement, PlacementEvaluator, enumerate_placements

STRATEGIES = ("ppo", "exhaustive", "greedy", "all", "none")


@dataclass
class PPOConfig:
    """PPO settings for the placement agent (stable-baselines3 names)."""

    max_evaluations: int | None = None  # distinct placements; None: max(16, min(25% of N, 50 L)), at most N
    episodes: int = 4000                # upper bound on training episodes
    episodes_per_update: int = 16       # rollout length n_steps = episodes_per_update * L
    learning_rate: float = 3e-3
    n_epochs: int = 10
    ent_coef: float = 0.2               # high entropy: keeps exploring once a good placement is found
    net_arch: tuple[int, ...] = (64, 64)
    reward_scale: float = 0.1
    surrogate: bool = True              # model-based: after `explore`, unseen placements get a learned estimate
    explore: float = 0.5                # share of max_evaluations spent on real rewards before the surrogate
    per_update: int = 2                 # real evaluations per rollout in the surrogate phase
    polish: bool = True                 # after the agent: local search from its best within max_evaluations

    def __post_init__(self) -> None:
        o = "placement.ppo"
        require(isinstance(self.surrogate, bool), f"{o}.surrogate", "true or false", self.surrogate)
        require(isinstance(self.polish, bool), f"{o}.polish", "true or false", self.polish)
        require(is_number(self.explore) and 0 < self.explore <= 1, f"{o}.explore", "a number in (0, 1]", self.explore)
        require(is_int(self.per_update) and self.per_update >= 1, f"{o}.per_update", "an integer >= 1",
                self.per_update)
        require(self.max_evaluations is None or (is_int(self.max_evaluations) and self.max_evaluations >= 1),
                f"{o}.max_evaluations", "null or an integer >= 1", self.max_evaluations)
        for key in ("episodes", "episodes_per_update", "n_epochs"):
            require(is_int(getattr(self, key)) and getattr(self, key) >= 1, f"{o}.{key}", "an integer >= 1",
                    getattr(self, key))
        self.net_arch = tuple(self.net_arch)


@dataclass
class SearchResult:
    """The chosen placement and what finding it cost."""

    strategy: str
    layers: list[str]             # candidate layers, in order
    best: Evaluation
    evaluations: int              # distinct placements this search asked for (the uncompensated one included)
    n_placements: int             # 2 ** len(layers)
    seconds: float                # search time (the shared compensators' training excluded)
    history: list[dict[str, Any]]  # every distinct placement asked for, in order, with seconds since the start
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def placement(self) -> Placement:
        return self.best.placement

    ranks: list[int] = field(default_factory=lambda: [4])  # rank of option k at index k - 1

    @property
    def chosen(self) -> list[str]:
        return [n for n, on in zip(self.layers, self.best.placement) if on]

    @property
    def chosen_ranks(self) -> dict[str, int]:
        """``{layer: rank}`` of the chosen placement (rank 0: scale and shift only)."""
        return {n: self.ranks[k - 1] for n, k in zip(self.layers, self.best.placement) if k}

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "chosen": self.chosen, "chosen_ranks": self.chosen_ranks,
                "objective": self.best.objective, "accuracy": self.best.accuracy, "cost": self.best.cost,
                **{f"{k}_pct": v for k, v in self.best.costs.items()}, "options": self.ranks,
                "evaluations": self.evaluations, "n_placements": self.n_placements, "seconds": self.seconds,
                "history": self.history, **self.extra}


class _Session:
    """The evaluator as one search sees it: counts the distinct placements *this* search asks for, so a
    strategy's cost does not depend on what an earlier search left in the shared cache."""

    def __init__(self, evaluator: PlacementEvaluator) -> None:
        self.evaluator = evaluator
        self.seen: dict[Placement, tuple[Evaluation, float]] = {}
        self.t0 = time.perf_counter()

    def __getattr__(self, name: str) -> Any:  # names, cfg, layer_cost, sensitivity, ... of the evaluator
        return getattr(self.evaluator, name)

    def evaluate(self, placement: Placement) -> Evaluation:
        ev = self.evaluator.evaluate(placement)
        if math.isfinite(ev.objective) and ev.placement not in self.seen:
            self.seen[ev.placement] = (ev, time.perf_counter() - self.t0)
        return ev

    @property
    def evaluations(self) -> int:
        return len(self.seen)

    def best(self) -> Evaluation:
        # ties: the placement asked for first
        return max(self.seen.values(), key=lambda e: e[0].objective)[0]


def _default_max_evaluations(n_layers: int, options: int = 1) -> int:
    total = (options + 1) ** n_layers
    return min(total, max(16, min(math.ceil(0.25 * total), 50 * n_layers)))


_ENUMERABLE = 2 ** 20  # the most placements exhaustive search (and the feasibility count) enumerates


def search(evaluator: PlacementEvaluator, strategy: str = "ppo", *, seed: int = 0, ppo: PPOConfig | None = None,
           progress: bool = False) -> SearchResult:
    """Run ``strategy`` on ``evaluator`` and return the best placement it found.

    Several searches may share one evaluator (and its cache); each reports the distinct placements it
    asked for as its own ``evaluations``, as if it had run alone.
    """
    require(strategy in STRATEGIES, "placement.strategy", f"one of {list(STRATEGIES)}", strategy)
    require(is_int(seed) and seed >= 0, "placement.seed", "an integer >= 0", seed)
    session = _Session(evaluator)
    n = len(evaluator.names)
    k_opts = getattr(evaluator, "n_options", 1)
    extra: dict[str, Any] = {}
    none = (False,) * n
    best = session.evaluate(none)  # the reference point (objective 0)
    if strategy == "all":
        best = session.evaluate((k_opts,) * n)
    elif strategy == "exhaustive":
        if (k_opts + 1) ** n > _ENUMERABLE:
            raise ConfigError(f"placement.strategy=exhaustive would evaluate {(k_opts + 1) ** n} placements "
                              f"({k_opts + 1} choices for each of {n} layers); use ppo or greedy")
        todo = [p for p in enumerate_placements(n, k_opts) if evaluator.feasible(p)]
        bar = tqdm(todo, desc="exhaustive search", disable=not progress, leave=False, dynamic_ncols=True)
        pace = Pace("exhaustive search", len(todo), unit="placement", bar=not bar.disable)
        for p in bar:
            session.evaluate(p)
            pace.update()
        best = session.best()
        extra["feasible"] = len(todo)
    elif strategy == "greedy":
        order = sorted(range(n), key=lambda i: -evaluator.sensitivity[i])
        for i in order:
            step_best = best
            for k in range(1, k_opts + 1):
                cand = tuple(k if j == i else v for j, v in enumerate(best.placement))
                if evaluator.feasible(cand):
                    ev = session.evaluate(cand)
                    if ev.objective > step_best.objective:
                        step_best = ev
            best = step_best
        extra["order"] = [evaluator.names[i] for i in order]
    elif strategy == "ppo":
        cfg = ppo or PPOConfig()
        extra["ppo"] = _ppo(session, cfg, seed, progress)
        extra["ppo"]["agent_best"] = session.best().objective
        extra["ppo"]["agent_evaluations"] = session.evaluations
        if cfg.polish:
            extra["ppo"]["polish_rounds"] = _polish(session, extra["ppo"]["max_evaluations"])
        best = session.best()
    names = list(evaluator.names)
    ranks = list(getattr(evaluator, "ranks", [4]))
    history = [{**ev.to_dict(names, ranks), "seconds": t} for ev, t in session.seen.values()]
    return SearchResult(strategy, names, best, session.evaluations, evaluator.n_placements,
                        time.perf_counter() - session.t0, history, extra, ranks)


def _polish(session: _Session, cap: int) -> int:
    """Best-improvement local search from the session's best placement until ``cap`` distinct placements were
    asked for: each round evaluates the feasible neighbours with one layer's option changed, and when none of
    them is better, those with two layers changed (under a budget a swap is often the only feasible move), the
    ones a surrogate fitted to everything seen rates highest first; it moves to the best neighbour if that
    improves the objective, else stops. Returns the rounds that improved."""
    n, k = len(session.names), getattr(session, "n_options", 1)
    best, rounds = session.best(), 0

    def neighbours(p: Placement, layers: int) -> list[Placement]:
        out: list[Placement] = []
        for i in range(n):
            for a in range(k + 1):
                if a == p[i]:
                    continue
                q = p[:i] + (a,) + p[i + 1:]
                if layers == 1:
                    out.append(q)
                    continue
                for j in range(i + 1, n):
                    out.extend(q[:j] + (b,) + q[j + 1:] for b in range(k + 1) if b != p[j])
        return [q for q in out if session.feasible(q)]

    while session.evaluations < cap:
        improved = None
        for layers in (1, 2):
            cands = [q for q in neighbours(best.placement, layers) if q not in session.seen]
            if layers == 2 and cands:
                surrogate = _Surrogate(n, options=k)
                surrogate.fit([e for e, _ in session.seen.values()])
                cands.sort(key=lambda q: -surrogate.predict(q))
            for q in cands[:max(0, cap - session.evaluations)]:
                ev = session.evaluate(q)
                if ev.objective > (improved or best).objective:
                    improved = ev
            if improved is not None or session.evaluations >= cap:
                break
        if improved is None:
            break
        best, rounds = improved, rounds + 1
    return rounds


class _Surrogate:
    """Ridge regression of the objective on a placement's one-hot options and the pairwise products of its
    on/off bits (a learned reward model): ``objective ~ b + sum_{i,k} w_ik [p_i = k] + sum_{i<j} v_ij
    [p_i > 0][p_j > 0]``, the pairwise terms penalised more, so that few evaluations give a nearly additive
    model. With one option per layer the one-hot terms are the bits themselves."""

    def __init__(self, n: int, l2_linear: float = 1e-2, l2_pair: float = 1.0, options: int = 1) -> None:
        self.options = options
        self.pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        self.penalty = np.diag([0.0] + [l2_linear] * (n * options) + [l2_pair] * len(self.pairs))
        self.w = np.zeros(1 + n * options + len(self.pairs))

    def _features(self, p: Placement) -> np.ndarray:
        v = np.asarray(p, dtype=np.int64)
        onehot = (v[:, None] == np.arange(1, self.options + 1)[None, :]).astype(np.float64).ravel()
        x = (v > 0).astype(np.float64)
        return np.concatenate([[1.0], onehot, [x[i] * x[j] for i, j in self.pairs]])

    def fit(self, evaluations: list[Evaluation]) -> None:
        X = np.stack([self._features(e.placement) for e in evaluations])
        y = np.asarray([e.objective for e in evaluations])
        self.w = np.linalg.solve(X.T @ X + self.penalty, X.T @ y)

    def predict(self, p: Placement) -> float:
        return float(self._features(p) @ self.w)


class _ModelBased:
    """What the environment evaluates through in the surrogate phase: seen placements score their real
    objective, unseen ones the surrogate's estimate (and are queued for real evaluation)."""

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.surrogate = _Surrogate(len(session.names), options=getattr(session, "n_options", 1))
        self.active = False
        self.queued: Counter[Placement] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def evaluate(self, placement: Placement) -> Evaluation:
        p = tuple(int(v) for v in placement)
        if not self.active or p in self.session.seen or not self.session.feasible(p):
            return self.session.evaluate(p)
        self.queued[p] += 1
        return Evaluation(p, float("nan"), self.session.cost(p), self.surrogate.predict(p))  # an estimate

    def start(self) -> None:
        self.active = True
        self.refit()

    def refit(self) -> None:
        self.surrogate.fit([e for e, _ in self.session.seen.values()])

    def evaluate_queued(self, k: int) -> None:
        """Evaluate for real the ``k`` queued placements the surrogate rates highest, then refit."""
        best = sorted(self.queued, key=lambda p: (-self.surrogate.predict(p), -self.queued[p]))[:k]
        for p in best:
            self.session.evaluate(p)
        self.queued.clear()
        if best:
            self.refit()


def _ppo(evaluator: _Session, cfg: PPOConfig, seed: int, progress: bool) -> dict[str, Any]:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger

    n = len(evaluator.names)
    k_opts = getattr(evaluator, "n_options", 1)
    cap = cfg.max_evaluations or _default_max_evaluations(n, k_opts)
    if (k_opts + 1) ** n <= 2 ** 16:  # under a budget fewer placements may exist than the cap: stop when all were seen
        cap = min(cap, sum(evaluator.feasible(p) for p in enumerate_placements(n, k_opts)))
    explore = max(n + 2, math.ceil(cfg.explore * cap)) if cfg.surrogate else cap
    model = _ModelBased(evaluator)
    env = PlacementEnv(model, reward_scale=cfg.reward_scale)  # type: ignore[arg-type]
    n_steps = cfg.episodes_per_update * n
    bar = tqdm(total=cap, desc="PPO placement search", disable=not progress, leave=False, dynamic_ncols=True)
    pace = Pace("PPO placement search", cap, unit="placement", bar=not bar.disable)

    class Stop(BaseCallback):
        def _on_step(self) -> bool:
            if not model.active and evaluator.evaluations >= explore and explore < cap:
                model.start()
            if evaluator.evaluations > pace.count:
                bar.update(evaluator.evaluations - bar.n)
                pace.update(evaluator.evaluations - pace.count)
            if self.locals.get("dones") is not None and self.locals["dones"][0]:
                bar.set_postfix(best=f"{evaluator.best().objective:.2f}")
            return evaluator.evaluations < cap

        def _on_rollout_end(self) -> None:
            if model.active:
                model.evaluate_queued(min(cfg.per_update, cap - evaluator.evaluations))

    rng_state = torch.get_rng_state()  # SB3 seeds torch's global generator; leave the caller's untouched
    try:
        agent = PPO("MlpPolicy", env, n_steps=n_steps, batch_size=n_steps, n_epochs=cfg.n_epochs,
                    learning_rate=cfg.learning_rate, gamma=1.0, gae_lambda=1.0, ent_coef=cfg.ent_coef,
                    policy_kwargs={"net_arch": list(cfg.net_arch)}, seed=seed, device="cpu", verbose=0)
        agent.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes an empty /tmp/SB3-* per search
        agent.learn(total_timesteps=cfg.episodes * n, callback=Stop())
        steps = agent.num_timesteps
        model.active = False  # the policy's own choice is evaluated for real
        obs, _ = env.reset()
        for _ in range(n):
            action, _ = agent.predict(obs, deterministic=True)
            obs, _, _, _, info = env.step(int(action))
        policy = info["placement"]
    finally:
        torch.set_rng_state(rng_state)
        bar.close()
    return {"timesteps": steps, "episodes": steps // n, "max_evaluations": cap, "n_steps": n_steps,
            "surrogate": cfg.surrogate, "explore": explore if cfg.surrogate else None,
            "policy_placement": [name for name, on in zip(evaluator.names, policy) if on],
            "policy_objective": evaluator.evaluate(policy).objective}


__all__ = ["PPOConfig", "STRATEGIES", "SearchResult", "search"]
