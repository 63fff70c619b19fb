"""Placement search: the environment, the objective, the cache, the strategies and the pipeline stage."""
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import correctnet as cn
from correctnet.calibration import CompensationConfig
from correctnet.errors import ConfigError
from correctnet.placement import (PlacementEnv, PlacementEvaluator, PPOConfig, SearchConfig, enumerate_placements,
                                  search)

from test_train_cli import FAST, run_cli

SMALL = dict(chips=2, val_images=150, shared_steps=30)


def _evaluator(setup, resume=None, **kw) -> PlacementEvaluator:
    model, data = setup
    cfg = SearchConfig(**{**SMALL, **kw})
    return PlacementEvaluator(model, data.train, data.val.tensors, cfg, comp_cfg=CompensationConfig(lr=0.01),
                              resume=resume)


@pytest.fixture(scope="module")
def evaluator(setup):
    return _evaluator(setup)


def test_env_passes_gymnasium_and_sb3_checkers(evaluator):
    env = PlacementEnv(evaluator)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (12,) and env.observation_space.contains(obs)


def test_objective_is_the_documented_formula(setup, evaluator):
    """objective = 100 * (acc(p) - acc(none)) - price * cost(p), acc measured independently here."""
    model, data = setup
    p = (True, False, True, False, False)
    ev = evaluator.evaluate(p)
    x, y = data.val.tensors[0][:150], data.val.tensors[1][:150]
    for c, on in zip(evaluator.comps.values(), p):
        c.active = on
    accs = []
    for s in evaluator.chip_seeds:
        with cn.chip(evaluator.model, s):
            accs.append(cn.accuracy(evaluator.model, (x, y)))
    for c in evaluator.comps.values():
        c.active = False
    none = []
    for s in evaluator.chip_seeds:
        with cn.chip(evaluator.model, s):
            none.append(cn.accuracy(evaluator.model, (x, y)))
    with cn.chip(model, evaluator.chip_seeds[0]):  # the caller's model is untouched by the search
        assert not cn.compensation.compensators(model)
    cost = evaluator.layer_cost[0] + evaluator.layer_cost[2]
    assert ev.accuracy == pytest.approx(np.mean(accs), abs=1e-12)
    assert evaluator.base_accuracy == pytest.approx(np.mean(none), abs=1e-12)
    assert ev.cost == pytest.approx(cost)
    assert ev.objective == pytest.approx(100 * (np.mean(accs) - np.mean(none)) - 1.0 * cost)
    assert evaluator.evaluate((False,) * 5).objective == 0.0
    assert all(c > 0 for c in evaluator.layer_cost)


@dataclass
class _Cfg:
    price: float = 2.0
    budget: float | None = None


class _HandMade:
    """A hand-made evaluator: three layers, known accuracies and costs."""

    names = ["a", "b", "c"]
    layer_cost = [1.0, 2.0, 3.0]
    sensitivity = [3.0, 1.0, 2.0]
    lipschitz = {"a": 1.0, "b": 2.0, "c": 4.0}
    layer_info = [{"conv": True, "params_share": 0.2, "macs_share": 0.5},
                  {"conv": True, "params_share": 0.3, "macs_share": 0.3},
                  {"conv": False, "params_share": 0.5, "macs_share": 0.2}]

    def __init__(self, budget=None):
        self.cfg = _Cfg(budget=budget)
        self.asked = []

    def cost(self, p, metric=None):
        return sum(c for c, on in zip(self.layer_cost, p) if on)

    def feasible(self, p):
        return self.cfg.budget is None or self.cost(p) <= self.cfg.budget + 1e-9

    def budget_left(self, p):
        return 1.0 if self.cfg.budget is None else max(self.cfg.budget - self.cost(p), 0) / self.cfg.budget

    def evaluate(self, p):
        self.asked.append(p)
        acc = 0.5 + 0.1 * p[0] + 0.05 * p[1] + 0.02 * p[2]
        cost = sum(c for c, on in zip(self.layer_cost, p) if on)
        return type("E", (), dict(placement=p, accuracy=acc, cost=cost,
                                  objective=100 * (acc - 0.5) - self.cfg.price * cost))()


def test_reward_is_zero_until_the_last_layer_then_the_scaled_objective():
    env = PlacementEnv(_HandMade(), reward_scale=0.1)
    env.reset(seed=0)
    rewards = [env.step(a)[1] for a in (1, 1, 0)]
    assert rewards[:2] == [0.0, 0.0]
    # 100 * (0.1 + 0.05) - 2.0 * (1 + 2) = 9.0, times 0.1
    assert rewards[2] == pytest.approx(0.9)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


def test_budget_masks_actions_that_would_exceed_it():
    ev = _HandMade(budget=3.5)
    env = PlacementEnv(ev)
    obs, _ = env.reset()
    assert obs[9] == 1.0  # layer a fits
    _, _, _, _, info = env.step(1)
    _, _, _, _, info = env.step(1)  # 1 + 2 <= 3.5
    obs, r, done, _, info = env.step(1)  # + 3 would exceed: taken as 0
    assert done and info["masked"] and ev.asked[-1] == (True, True, False)


def test_cache_never_evaluates_a_placement_twice(setup):
    ev = _evaluator(setup)
    calls = []
    real = ev._accuracy
    ev._accuracy = lambda *a, **k: calls.append(1) or real(*a, **k)
    p = (False, True, False, True, False)
    first, again = ev.evaluate(p), ev.evaluate(list(p))
    assert first is again and len(calls) == 1
    search(ev, "exhaustive")
    assert len(calls) == 32 and ev.evaluations == 32  # the 31 others, once each
    r = search(ev, "ppo", seed=0, ppo=PPOConfig(max_evaluations=8))
    assert len(calls) == 32  # all cached
    assert r.evaluations >= 8  # but the PPO search reports what it asked for, as if alone


def test_strategies_agree_with_brute_force_and_respect_the_budget(evaluator):
    exh = search(evaluator, "exhaustive")
    every = {p: evaluator.evaluate(p).objective for p in enumerate_placements(5)}
    assert exh.best.objective == max(every.values()) and exh.evaluations == 32
    assert search(evaluator, "none").best.objective == 0.0 and search(evaluator, "none").chosen == []
    assert search(evaluator, "all").chosen == evaluator.names
    greedy = search(evaluator, "greedy")
    assert greedy.evaluations <= 6 and greedy.best.objective <= exh.best.objective
    assert greedy.best.objective >= 0.0  # it starts from "none" and only accepts improvements
    ppo = search(evaluator, "ppo", seed=1)
    assert ppo.best.objective <= exh.best.objective and ppo.evaluations <= 17
    assert ppo.to_dict()["history"][0]["layers"] == []


def test_budget_limits_every_strategy(setup):
    ev = _evaluator(setup, budget=1.0)
    for strategy in ("exhaustive", "greedy", "ppo"):
        r = search(ev, strategy, seed=0)
        assert r.best.cost <= 1.0 and all(h["cost"] <= 1.0 for h in r.history)
    assert search(ev, "all").best.objective == -math.inf  # all layers do not fit


def test_same_seed_same_search(setup):
    a = search(_evaluator(setup), "ppo", seed=3, ppo=PPOConfig(max_evaluations=12))
    b = search(_evaluator(setup), "ppo", seed=3, ppo=PPOConfig(max_evaluations=12))
    strip = lambda r: [{k: v for k, v in h.items() if k != "seconds"} for h in r.history]  # noqa: E731
    assert strip(a) == strip(b) and a.chosen == b.chosen and a.extra["ppo"]["timesteps"] == b.extra["ppo"]["timesteps"]


def test_surrogate_learns_an_additive_objective_from_few_placements():
    from correctnet.placement.evaluator import Evaluation
    from correctnet.placement.search import _Surrogate
    w = np.array([3.0, -1.0, 0.5, 2.0, -0.2])
    f = lambda p: 1.0 + float(w @ np.asarray(p, float))  # noqa: E731
    seen = enumerate_placements(5)[::3]  # 11 of 32 placements
    sur = _Surrogate(5)
    sur.fit([Evaluation(p, 0.0, 0.0, f(p)) for p in seen])
    for p in enumerate_placements(5):  # unseen ones included
        assert sur.predict(p) == pytest.approx(f(p), abs=0.05)


def test_model_based_ppo_stays_within_its_evaluation_budget(evaluator, tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where SB3's default logger would make SB3-<date>
    r = search(evaluator, "ppo", seed=0, ppo=PPOConfig(surrogate=True, max_evaluations=12))
    assert list(tmp_path.iterdir()) == []  # the search leaves no directory behind
    assert r.extra["ppo"]["surrogate"] and r.extra["ppo"]["explore"] == 7
    assert r.evaluations <= 13  # the cap, plus the final policy's own placement
    every = max(evaluator.evaluate(p).objective for p in enumerate_placements(5))
    assert r.best.objective <= every


def test_an_interrupted_search_resumes_bit_identically_without_repeating_evaluations(setup, tmp_path, monkeypatch):
    import correctnet.placement.evaluator as pe
    from correctnet.resume import ResumeStore
    store = ResumeStore(tmp_path, interval_s=0)  # a snapshot at every chance
    real = pe.train_compensation

    def killed_at_step_12(*a, on_step, **k):
        def hook(step):
            if step == 12:
                raise KeyboardInterrupt
            on_step(step)
        return real(*a, on_step=hook, **k)

    monkeypatch.setattr(pe, "train_compensation", killed_at_step_12)
    with pytest.raises(KeyboardInterrupt):
        _evaluator(setup, resume=store)
    monkeypatch.undo()
    first = _evaluator(setup, resume=store)  # shared training continues at step 12
    for p in enumerate_placements(5)[:10]:
        first.evaluate(p)
    # killed again during the search: a new evaluator repeats none of the 10 evaluations
    again = _evaluator(setup, resume=store)
    calls = []
    measure = again._accuracy
    again._accuracy = lambda *a, **k: calls.append(1) or measure(*a, **k)
    resumed = search(again, "exhaustive")
    assert len(calls) == 22
    ref = _evaluator(setup)
    for n in ref.names:
        for k, v in ref.comps[n].state_dict().items():
            assert torch.equal(v, again.comps[n].state_dict()[k])
    assert [h["objective"] for h in resumed.history] == [h["objective"] for h in search(ref, "exhaustive").history]


@pytest.mark.parametrize("kw, key", [(dict(price=-1), "placement.price"), (dict(cost="energy"), "placement.cost"),
                                     (dict(budget=-2), "placement.budget"), (dict(chips=0), "placement.chips"),
                                     (dict(active_prob=0), "placement.active_prob")])
def test_bad_search_settings_are_refused_naming_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        SearchConfig(**kw)


def test_bad_strategy_and_placement_shapes_are_refused(evaluator):
    with pytest.raises(ConfigError, match="placement.strategy"):
        search(evaluator, "random")
    with pytest.raises(ConfigError, match="one entry per layer"):
        evaluator.evaluate((True, False))
    with pytest.raises(ConfigError, match="placement.ppo.episodes"):
        PPOConfig(episodes=0)
    with pytest.raises(ConfigError, match="placement.ppo.explore"):
        PPOConfig(explore=0)


@pytest.mark.slow
def test_pipeline_runs_the_search_and_fine_tunes_the_chosen_placement(tmp_path):
    r = run_cli(*FAST, "compensation=all", "compensation.steps=30", "placement=greedy", "placement.chips=2",
                "placement.val_images=100", "placement.shared_steps=30", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "placement search (greedy, budget" in r.stdout
    m = json.loads((tmp_path / "metrics.json").read_text())
    rec = m["placement"]
    assert rec["strategy"] == "greedy" and rec["n_placements"] == 32 and rec["evaluations"] <= 6
    assert {"history", "objective", "chosen", "seconds", "evaluator"} <= set(rec)
    if rec["chosen"]:
        assert list(m["stages"]["compensated"]["placement"]) == rec["chosen"]
    else:
        assert "compensated" not in m["stages"]


def test_pipeline_search_without_compensation_settings_is_refused(tmp_path):
    r = run_cli(*FAST, "placement=ppo", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "placement.strategy=ppo" in r.stderr and "compensation=all" in r.stderr
    r = run_cli(*FAST, "compensation=all", "placement=ppo", "placement.price=-1", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "placement.price" in r.stderr
