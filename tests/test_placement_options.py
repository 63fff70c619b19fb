"""Compensator options (rank per layer), both overheads under a budget, and the joint supernet search."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import correctnet as cn
from correctnet.compensation import Compensator, attach_compensation, compensators, keep_compensation, overhead
from correctnet.errors import ConfigError
from correctnet.placement import PlacementEnv, PlacementEvaluator, PPOConfig, SearchConfig, enumerate_placements, search
from correctnet.placement.evaluator import random_options

from test_train_cli import run_cli

RANKS = [0, 1, 4]


def _randomized(c: Compensator, seed: int = 0) -> Compensator:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in c.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return c


@pytest.mark.parametrize("kind", ["output", "input"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_an_option_computes_what_a_plain_rank_k_branch_computes(kind, k):
    """Option k of a rank-4 compensator = y + gamma*y + beta + (up[:, :k] @ down[:k]) z, written out by hand
    (z = x for input, y for output), outputs and gradients, with and without grad; and its shrunk module too."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    x = torch.randn(3, 2, 6)  # a sequence input: features last
    y = layer(x).detach()
    c = _randomized(Compensator(layer, kind=kind, rank=4))
    c.set_option(k)
    z = x if kind == "input" else y
    down, up = c.down.weight.detach().clone().requires_grad_(), c.up.weight.detach().clone().requires_grad_()
    gamma, beta = c.gamma.detach().clone().requires_grad_(), c.beta.detach().clone().requires_grad_()
    ref = y + gamma * y + beta + F.linear(F.linear(z, down[:k]), up[:, :k])
    out = c(x, y)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(c.gamma.grad, gamma.grad)
    torch.testing.assert_close(c.beta.grad, beta.grad)
    if k == 0:  # scale and shift only: the low-rank branch does not run
        assert c.down.weight.grad is None and c.up.weight.grad is None
    else:
        torch.testing.assert_close(c.down.weight.grad, down.grad)
        torch.testing.assert_close(c.up.weight.grad, up.grad)
        assert c.down.weight.grad[k:].abs().sum() == 0 and c.up.weight.grad[:, k:].abs().sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(c(x, y), ref.detach())  # the folded path (output kind)
    s = c.shrunk(k)
    assert s.rank == k and sum(p.numel() for p in s.parameters()) == 10 + k * ((6 if kind == "input" else 5) + 5)
    torch.testing.assert_close(s(x, y), ref.detach())


def test_conv_options_match_a_plain_copy_and_off_is_the_identity():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    y = layer(x).detach()
    c = _randomized(Compensator(layer, kind="output", rank=4))
    c.set_option(2)
    h = F.conv2d(y, c.down.weight[:2])
    ref = y + c.gamma.view(-1, 1, 1) * y + c.beta.view(-1, 1, 1) + F.conv2d(h, c.up.weight[:, :2])
    torch.testing.assert_close(c(x, y), ref)
    torch.testing.assert_close(c.shrunk(2)(x, y), ref.detach())
    c.set_option(None)
    assert torch.equal(c(x, y), y)
    with pytest.raises(ConfigError, match="rank 5"):
        c.set_option(5)
    with pytest.raises(ConfigError, match="affine"):
        Compensator(layer, rank=4, affine=False).set_option(0)


def _evaluator(setup, **kw) -> PlacementEvaluator:
    model, data = setup
    cfg = SearchConfig(**{"chips": 2, "val_images": 150, "shared_steps": 30, "ranks": RANKS, "cost": "macs", **kw})
    return PlacementEvaluator(model, data.train, data.val.tensors, cfg)


@pytest.fixture(scope="module")
def evaluator(setup):
    return _evaluator(setup)


def test_option_costs_are_the_overhead_of_plain_compensators_at_each_rank(setup, evaluator):
    """Both overheads of every option equal `overhead` of a separately built model holding that compensator; rank 0
    costs 1 parameter per channel (LeNet-5's layers have biases) and one MAC per output element."""
    model, data = setup
    example = data.val.tensors[0][:1]
    net = overhead(model, example)["network"]
    for i, name in enumerate(evaluator.names):
        for k, r in enumerate(RANKS):
            m = cn.analogize(cn.build_model("lenet5", data.input_shape, data.num_classes), cn.make_variation(
                "lognormal", sigma=0.5), inplace=True)
            attach_compensation(m, {name: r})
            o = overhead(m, example)["layers"][name]
            assert evaluator.option_costs["params"][i][k] == pytest.approx(o["params_pct"])
            assert evaluator.option_costs["macs"][i][k] == pytest.approx(o["macs_pct"])
        layer = cn.analog_layers(model)[name]
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        # rank 0: gamma, one parameter per channel (beta joins the layer's bias register)
        assert evaluator.option_costs["params"][i][0] == pytest.approx(100 * channels / net["params"])
    assert evaluator.n_placements == 4 ** 5  # none or one of three options at each of 5 layers


def test_an_evaluated_option_is_the_shrunk_compensator_on_the_same_chips(setup, evaluator):
    """The accuracy of a placement with mixed options equals the accuracy of a copy of the network holding the
    shrunk compensators, measured independently on the same search chips."""
    model, data = setup
    p = (2, 0, 1, 3, 0)
    ev = evaluator.evaluate(p)
    m = cn.analogize(cn.build_model("lenet5", data.input_shape, data.num_classes),
                     cn.make_variation("lognormal", sigma=0.5), inplace=True)
    m.load_state_dict({k: v for k, v in model.state_dict().items()})
    ranks = evaluator.to_placement(p)
    assert ranks == {"conv1": 1, "fc1": 0, "fc2": 4}
    attach_compensation(m, ranks)
    evaluator.load_shared(m, p)
    x, y = evaluator.val_x, evaluator.val_y
    accs = []
    for s in evaluator.chip_seeds:
        with cn.chip(m, s):
            accs.append(cn.accuracy(m, (x, y)))
    assert ev.accuracy == pytest.approx(sum(accs) / len(accs), abs=1e-12)
    assert ev.costs["macs"] == pytest.approx(overhead(m, x[:1])["total"]["macs_pct"])
    assert ev.costs["params"] == pytest.approx(overhead(m, x[:1])["total"]["params_pct"])


def test_exhaustive_over_options_is_the_brute_force_optimum_and_greedy_ppo_stay_below(evaluator):
    every = {p: evaluator.evaluate(p).objective for p in enumerate_placements(5, 3)}
    assert len(every) == 4 ** 5
    exh = search(evaluator, "exhaustive")
    assert exh.best.objective == max(every.values())
    greedy = search(evaluator, "greedy")
    assert greedy.evaluations <= 3 * 5 + 1 and 0 <= greedy.best.objective <= exh.best.objective
    ppo = search(evaluator, "ppo", seed=0)
    assert ppo.best.objective <= exh.best.objective and ppo.evaluations <= 250 + 1  # min(25% of 1024, 50 L) + policy
    assert search(evaluator, "all").best.placement == (3,) * 5
    assert set(ppo.to_dict()) >= {"chosen_ranks", "params_pct", "macs_pct", "options"}


def test_a_budget_on_both_overheads_holds_for_every_strategy(setup):
    ev = _evaluator(setup, budget={"macs": 1.0, "params": 0.5})
    feasible = [p for p in enumerate_placements(5, 3) if ev.feasible(p)]
    assert 1 < len(feasible) < 4 ** 5
    for strategy in ("exhaustive", "greedy", "ppo"):
        r = search(ev, strategy, seed=0)
        assert r.best.costs["macs"] <= 1.0 + 1e-9 and r.best.costs["params"] <= 0.5 + 1e-9
        assert all(h["macs_pct"] <= 1.0 + 1e-9 and h["params_pct"] <= 0.5 + 1e-9 for h in r.history)
    best = max(feasible, key=lambda p: ev.evaluate(p).objective)
    assert search(ev, "exhaustive").best.placement == best


def test_env_offers_every_option_and_masks_to_the_largest_that_fits(setup):
    ev = _evaluator(setup, budget={"params": 0.5})
    env = PlacementEnv(ev)
    assert env.action_space.n == 4
    env.reset(seed=0)
    chosen = []
    for t in range(5):
        _, _, done, _, info = env.step(3)  # always ask for rank 4
        chosen = list(env.placement)
        assert ev.feasible(chosen)
        fits = [k for k in range(4) if ev.feasible(chosen[:t] + [k])]
        assert chosen[t] == max(fits) and info["masked"] == (chosen[t] != 3)
    assert done


def test_random_options_are_deterministic_per_step_and_cover_every_option():
    comps = [Compensator(nn.Linear(4, 4), rank=4) for _ in range(3)]
    on_step = random_options(comps, RANKS, 0.5, seed=7)
    seen = []
    for step in range(200):
        on_step(step)
        state = [(c.active, c.effective_rank) for c in comps]
        assert any(a for a, _ in state)
        on_step(step)
        assert state == [(c.active, c.effective_rank) for c in comps]
        seen += [r for a, r in state if a]
    assert set(seen) == set(RANKS)
    share_on = sum(1 for _ in seen) / 600
    assert 0.4 < share_on < 0.65


def test_keep_compensation_cuts_a_supernet_to_the_chosen_layers_and_ranks(setup):
    model, data = setup
    m = cn.analogize(cn.build_model("lenet5", data.input_shape, data.num_classes),
                     cn.make_variation("lognormal", sigma=0.5), inplace=True)
    full = attach_compensation(m, "all", rank=4)
    for c in full.values():
        _randomized(c)
    before = {n: c.state_dict() for n, c in full.items()}
    keep_compensation(m, {"conv2": 0, "fc2": 1})
    comps = compensators(m)
    assert {n: c.rank for n, c in comps.items()} == {"conv2": 0, "fc2": 1}
    assert torch.equal(comps["conv2"].gamma, before["conv2"]["gamma"])
    assert torch.equal(comps["fc2"].down.weight, before["fc2"]["down.weight"][:1])
    assert torch.equal(comps["fc2"].up.weight, before["fc2"]["up.weight"][:, :1])
    with pytest.raises(ConfigError, match="no compensator"):
        keep_compensation(m, {"fc1": 0})


@pytest.mark.parametrize("budget", [{"energy": 1}, {"macs": -1}, {}, "1%"])
def test_bad_budgets_and_ranks_are_refused_naming_the_key(budget):
    with pytest.raises(ConfigError, match="placement.budget"):
        SearchConfig(budget=budget)
    with pytest.raises(ConfigError, match="placement.ranks"):
        SearchConfig(ranks=[1, 1])
    with pytest.raises(ConfigError, match="placement.ranks"):
        SearchConfig(ranks=[-1])


@pytest.mark.slow
def test_the_default_recipe_searches_the_joint_supernet_and_deploys_within_the_budget(tmp_path):
    """method=correctnet: joint supernet training, PPO under 1% MACs and 1% parameters, the chosen compensators
    deployed, both overheads recorded and within the budget, the checkpoint re-evaluated exactly."""
    r = run_cli("method=correctnet", "training.epochs=2", "evaluation.n_chips=4", "progress=false",
                "compensation.steps=20", "placement.chips=2", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    rec = m["placement"]
    assert rec["strategy"] == "ppo" and rec["options"] == RANKS and rec["n_placements"] == 4 ** 5
    assert rec["evaluator"]["shared_training"] == {"trained": "with the network"}
    assert rec["macs_pct"] <= 1.0 + 1e-9 and rec["params_pct"] <= 1.0 + 1e-9
    if rec["chosen"]:
        stage = m["stages"]["compensated"]
        assert {n: s["rank"] for n, s in stage["placement"].items()} == rec["chosen_ranks"]
        assert stage["overhead"]["total"]["macs_pct"] == pytest.approx(rec["macs_pct"])
        assert stage["overhead"]["total"]["params_pct"] == pytest.approx(rec["params_pct"])
        assert "MACs" in r.stdout and "budget 1% macs, 1% params" in r.stdout
    else:
        assert "noise_aware" in m["stages"]
    import subprocess
    import sys
    ev = subprocess.run([sys.executable, "-m", "correctnet.evaluate", f"checkpoint={tmp_path / 'model.safetensors'}",
                         "evaluation.n_chips=4"], capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert "reproduces" in ev.stdout.lower() or "identical" in ev.stdout.lower(), ev.stdout


def test_search_over_options_with_joint_training_needs_no_fixed_placement(tmp_path):
    """compensation=all placement=ppo with the default preset (joint training) is a valid config (it was refused)."""
    r = run_cli("method=correctnet", "placement=greedy", "placement.chips=2", "compensation.steps=5", "progress=false",
                "training.epochs=1", "evaluation.n_chips=2", "evaluation.profile_chips=2", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["placement"]["strategy"] == "greedy" and not math.isinf(m["placement"]["objective"])


def test_ppo_polish_ends_at_a_local_optimum_within_the_cap(evaluator):
    plain = search(evaluator, "ppo", seed=0, ppo=PPOConfig(max_evaluations=60, polish=False))
    r = search(evaluator, "ppo", seed=0, ppo=PPOConfig(max_evaluations=60))
    info = r.extra["ppo"]
    assert info["agent_best"] == plain.best.objective  # the same agent, then the polish
    assert r.best.objective >= plain.best.objective and r.evaluations <= 60 + 1
    if r.evaluations < 60:  # it stopped on its own: no placement one layer away is better
        for i in range(5):
            for a in range(4):
                q = r.best.placement[:i] + (a,) + r.best.placement[i + 1:]
                assert evaluator.evaluate(q).objective <= r.best.objective
    assert info["polish_rounds"] >= 0 and "polish_rounds" not in plain.extra["ppo"]
