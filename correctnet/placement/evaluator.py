"""Cheap, honest evaluation of compensation placements: shared compensators, search chips, a cache.

A *placement* is a tuple of option indices, one per candidate analog layer in module order: 0 = no
compensator, ``k >= 1`` = a compensator of rank ``ranks[k - 1]`` (``SearchConfig.ranks``; rank 0 = the
per-channel scale and shift only, about one operation per output). With one option (the default,
``ranks=None``: the compensation rank) a placement is a tuple of booleans. Its **objective**, in
percentage points (pp), is

    objective(p) = 100 * (acc(p) - acc(none)) - price * cost(p)

* ``acc(p)``: mean accuracy over ``chips`` search chips (``Stream.SEARCH``, never evaluation chips) on
  ``val_images`` images of the *validation* split, with the compensators of ``p`` switched on;
* ``cost(p)``: the compensators' overhead in % of the network's parameters (``cost="params"``) or MACs
  (``cost="macs"``), the sum of the per-layer overheads of :func:`correctnet.compensation.overhead`
  (both are recorded for every placement);
* ``price``: pp of accuracy one % of overhead is worth. With ``budget`` (in %: a number, for ``cost``, or
  ``{"macs": m, "params": p}``, each a limit), placements costing more are infeasible: their objective is
  ``-inf`` and they are never evaluated.

``objective(none) = 0`` by construction. **Weight sharing**: every candidate layer gets a compensator once
(of the largest rank; option ``k`` uses its first ``ranks[k - 1]`` components), and they are trained
together on sampled chips (``Stream.COMPENSATION``) while a random subset is switched on at each step
(each layer with probability ``active_prob``, at an option drawn uniformly), so that any placement works
without retraining (the "one-shot" supernet idea of neural architecture search, Bender et al. 2018).
Compensators already trained that way with the network (``trained=True``: the pipeline's joint
training, :func:`random_options`) are used as they are. Evaluating
a placement is then forwards only: ``chips`` forwards over the validation images. Results are cached by
placement: a placement is never evaluated twice, and :attr:`PlacementEvaluator.evaluations` counts the
distinct ones.

The estimate is chip-agnostic. A run that deploys per-chip calibration is searched with this estimate
too (calibrating every search chip for every placement would cost ``chips x calibration`` per
placement); ``experiments/placement.py --check-estimates`` measures it against the real values.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..analog import AnalogLayer, analog_layers, chip
from ..calibration import (CalibrationConfig, ChipCalibrator, CompensationConfig, calibration_images, data_tensors,
                           reestimate_batchnorm, teacher_logits, train_compensation)
from ..compensation import (Compensator, attach_compensation, bypass, compensation_spec, compensators,
                            detach_compensation, layer_macs, overhead)
from ..errors import ConfigError, is_int, is_number, require
from ..evaluate import accuracy, clean_accuracy
from ..tensors import OutputFn, eval_mode, model_device
from ..lipschitz import lipschitz_constants
from ..resume import ResumeStore
from ..seeding import Stream, chip_seed

Placement = tuple[int, ...]  # one option index per layer (0: none); booleans for one option
COSTS = ("params", "macs")


@dataclass
class SearchConfig:
    """How placements are scored (see the module docstring for the objective)."""

    price: float = 1.0          # pp of accuracy per 1% of overhead
    cost: str = "params"        # params | macs: the overhead the price applies to
    budget: float | dict[str, float] | None = None  # hard limit in % of `cost`, or {macs: %, params: %}, or None
    ranks: list[int] | None = None  # options per layer (ranks; 0: scale and shift only); None: the compensation rank
    chips: int = 10             # search chips (Stream.SEARCH)
    val_images: int = 1000      # validation images per chip
    shared_steps: int = 500     # training steps of the shared compensators
    active_prob: float = 0.5    # probability that a compensator is on at a shared training step
    batch_size: int = 1000      # evaluation batch
    score: str = "chip_agnostic"  # chip_agnostic | calibrated: each search chip calibrated before it is scored
    calibration_steps: int = 30   # score=calibrated: per-chip calibration steps on each search chip
    seed: int = 0

    def __post_init__(self) -> None:
        o = "placement"
        require(is_number(self.price) and self.price >= 0, f"{o}.price", "a number >= 0", self.price)
        require(self.cost in COSTS, f"{o}.cost", f"one of {list(COSTS)}", self.cost)
        b = self.budget
        ok_budget = b is None or (is_number(b) and not isinstance(b, Mapping) and b >= 0) or (
            isinstance(self.budget, Mapping) and bool(self.budget) and set(self.budget) <= set(COSTS)
            and all(is_number(v) and v >= 0 for v in self.budget.values()))
        require(ok_budget, f"{o}.budget", "null, a number >= 0 (% of the network's `cost`) or a mapping "
                "{macs: %, params: %} of numbers >= 0", self.budget)
        if isinstance(self.budget, Mapping):
            self.budget = {k: float(v) for k, v in self.budget.items()}
        if self.ranks is not None:
            r = list(self.ranks)
            require(bool(r) and all(is_int(k) and k >= 0 for k in r) and len(set(r)) == len(r), f"{o}.ranks",
                    "null or a list of distinct integers >= 0 (0: scale and shift only)", self.ranks)
            self.ranks = sorted(r)
        for key in ("chips", "val_images", "shared_steps", "batch_size"):
            v = getattr(self, key)
            require(is_int(v) and v >= 1, f"{o}.{key}", "an integer >= 1", v)
        require(is_number(self.active_prob) and 0 < self.active_prob <= 1, f"{o}.active_prob",
                "a number in (0, 1]", self.active_prob)
        require(is_int(self.seed) and self.seed >= 0, f"{o}.seed", "an integer >= 0", self.seed)
        require(self.score in SCORES, f"{o}.score", f"one of {list(SCORES)}", self.score)
        require(is_int(self.calibration_steps) and self.calibration_steps >= 1, f"{o}.calibration_steps",
                "an integer >= 1", self.calibration_steps)


SCORES = ("chip_agnostic", "calibrated")


@dataclass
class Evaluation:
    """One evaluated placement: accuracies in [0, 1], cost in %, objective in pp."""

    placement: Placement
    accuracy: float
    cost: float
    objective: float
    costs: dict[str, float] = field(default_factory=dict)  # {"params": %, "macs": %}

    def to_dict(self, names: Sequence[str], ranks: Sequence[int] | None = None) -> dict[str, Any]:
        d = {"layers": [n for n, on in zip(names, self.placement) if on], "accuracy": self.accuracy,
             "cost": self.cost, "objective": self.objective, **{f"{k}_pct": v for k, v in self.costs.items()}}
        if ranks is not None:
            d["ranks"] = {n: ranks[k - 1] for n, k in zip(names, self.placement) if k}
        return d


class PlacementEvaluator:
    """Scores placements over the analog layers of ``model`` with shared compensators (module docstring).

    Works on a deep copy of ``model`` (which is left untouched). ``train_data``: the training split (x, y)
    the shared compensators learn on (distillation from the clean network); ``val``: ``(x [N, ...], y [N])``
    validation images, of which the first ``cfg.val_images`` are used. ``attach``: ``kind``, ``rank``,
    ``affine`` of the compensators (the rank is replaced by the largest of ``cfg.ranks``); ``comp_cfg``: their
    training (``steps`` is replaced by ``cfg.shared_steps``). ``layers``: candidate layer names (default:
    every analog layer). ``trained``: ``model`` carries compensators at exactly ``layers``, already trained
    as a supernet (e.g. jointly with the network, switched by :func:`random_options`): they are the shared
    ones, no shared training runs. ``resume``: the shared training and the evaluated accuracies are saved
    there (``placement_shared``, ``placement_cache``) and continued from, so an interrupted search repeats no
    evaluation; the search itself is deterministic, so it ends as an uninterrupted one would. ``output``: how
    the model's outputs hold the logits ``[N, C]`` (:func:`correctnet.tensors.logits_of`; None: a tensor,
    tuple, dict or transformers ``ModelOutput``).

    ``calibration`` (with ``cfg.score="calibrated"``): before a placement is scored on a search chip, the chip is
    calibrated as a deployment would (:class:`~correctnet.calibration.ChipCalibrator` with these settings, on
    unlabeled training images; ``calibration_teacher``: its reference network), so the search scores the
    calibrated accuracy; the uncompensated baseline is calibrated too (BatchNorm statistics only). It costs
    ``chips x calibration.steps`` optimizer steps per placement.
    """

    def __init__(self, model: nn.Module, train_data: Any, val: tuple[torch.Tensor, torch.Tensor],
                 cfg: SearchConfig, *, attach: dict[str, Any] | None = None,
                 comp_cfg: CompensationConfig | None = None, layers: Sequence[str] | None = None,
                 progress: bool = False, resume: ResumeStore | None = None, output: OutputFn | None = None,
                 trained: bool = False, calibration: CalibrationConfig | None = None,
                 calibration_teacher: nn.Module | None = None) -> None:
        t0 = time.perf_counter()
        self.cfg = cfg
        self.output = output
        self.calibrator: ChipCalibrator | None = None  # set below with cfg.score="calibrated"
        self.model = copy.deepcopy(model)
        given = compensators(self.model)
        if given and not trained:
            raise ConfigError("the placement search needs a model without compensation modules; detach them first "
                              "(or pass trained=True when they were trained as a supernet)")
        analog = analog_layers(self.model)
        compensable = [n for n, l in analog.items() if l.can_compensate]
        if layers is None:
            layers = list(given) if trained else compensable
        self.names: list[str] = list(layers)
        unknown = [n for n in self.names if n not in compensable]
        if unknown or not self.names:
            raise ConfigError(f"placement layers {unknown or '[]'} are not analog layers that can carry a "
                              f"compensator; those are: {compensable}")
        self.attach = {"kind": "output", "rank": 4, "affine": True, **(attach or {})}
        self.ranks: list[int] = search_ranks(cfg, self.attach["rank"])
        if 0 in self.ranks and not self.attach["affine"]:
            raise ConfigError("placement.ranks has 0 (scale and shift only), which needs compensation.affine=true")
        self.attach["rank"] = max(self.ranks)
        if trained:
            bad = {n: c.spec() for n, c in given.items() if n not in self.names or c.rank < self.attach["rank"]
                   or (c.kind, c.affine) != (self.attach["kind"], self.attach["affine"])}
            if bad or set(given) != set(self.names):
                raise ConfigError(f"trained=True needs compensators of kind {self.attach['kind']}, rank >= "
                                  f"{self.attach['rank']}, affine={self.attach['affine']} at exactly {self.names}; "
                                  f"the model has {compensation_spec(self.model)}")
        dev = model_device(self.model)
        self.val_x = val[0][:cfg.val_images].to(dev)
        self.val_y = val[1][:cfg.val_images].to(dev)
        self.chip_seeds = [chip_seed(Stream.SEARCH, cfg.seed, i) for i in range(cfg.chips)]
        example = self.val_x[:1]

        self.option_costs = option_costs(self.model, self.names, self.ranks, example, self.attach)
        # the largest option's cost per layer, in cfg.cost (the observation's scale)
        self.layer_cost = [self.option_costs[cfg.cost][i][-1] for i in range(len(self.names))]
        with bypass(self.model):
            self.lipschitz = {n: c for n, c in lipschitz_constants(self.model, example).items() if n in self.names}
            self.layer_info = layer_info(self.model, self.names, example)
            self.clean_accuracy = clean_accuracy(self.model, (self.val_x, self.val_y), batch_size=cfg.batch_size,
                                                 output=output)
            # the uncompensated network (calibrated further below with cfg.score="calibrated")
            self.base_accuracy = self._accuracy() if cfg.score == "chip_agnostic" else math.nan
            self.sensitivity = self._sensitivities()

        if trained:
            self.comps = {n: given[n] for n in self.names}
        else:
            self.comps = attach_compensation(self.model, self.names, seed=cfg.seed, **self.attach)
        self.overhead = overhead(self.model, example)
        comps = list(self.comps.values())

        tcfg = comp_cfg or CompensationConfig(seed=cfg.seed)
        tcfg = CompensationConfig(**{**asdict(tcfg), "steps": cfg.shared_steps})
        # the clean network's logits on the training images: also the teacher of the final fine-tuning
        with bypass(self.model):
            self.teacher = (teacher_logits(self.model, data_tensors(train_data)[0], output=output)
                            if tcfg.distill > 0 else None)
        if cfg.score == "calibrated":
            if calibration is None:
                raise ConfigError("placement.score=calibrated scores calibrated search chips: give the calibration "
                                  "settings (calibration=per_chip in the pipeline)")
            images = calibration_images(train_data, calibration.n_images, calibration.seed).to(dev)
            with bypass(self.model):
                self.calibrator = ChipCalibrator(self.model, images, calibration, teacher=calibration_teacher,
                                                 output=output)
                self.base_accuracy = self._accuracy()  # the uncompensated network, calibrated (BatchNorm only)
        if trained:
            self.training: dict[str, Any] = {"trained": "with the network"}
        else:
            self.training = train_compensation(self.model, train_data, tcfg, progress=progress,
                                               stage="shared compensators",
                                               on_step=random_options(comps, self.ranks, cfg.active_prob, cfg.seed),
                                               resume=resume, resume_key="placement_shared", teacher=self.teacher,
                                               output=output).to_dict()
        self.cache: dict[Placement, Evaluation] = {}  # in evaluation order
        self.resume = resume
        self._saved: dict[Placement, float] = {}
        if resume is not None:
            state = resume.load("placement_cache") or {}
            self._saved = {tuple(int(b) for b in p): a for p, a in zip(state.get("placements", []),
                                                                      state.get("accuracies", []))}
        self.setup_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ layer facts
    def _sensitivities(self) -> list[float]:
        """Accuracy lost (pp) on the search chips when only this layer has variations, uncompensated."""
        layers = analog_layers(self.model)
        out = []
        for n in self.names:
            others = [l for m, l in layers.items() if m != n]
            out.append(100 * (self.clean_accuracy - self._accuracy(nominal_layers=others)))
        return out

    @property
    def limits(self) -> dict[str, float]:
        """``{metric: limit in %}`` of ``cfg.budget`` (read at each call: a caller may change the budget; cached
        accuracies stay valid, as they do not depend on it)."""
        return budget_limits(self.cfg)

    @property
    def n_options(self) -> int:
        """Options per layer besides "none"."""
        return len(self.ranks)

    # ------------------------------------------------------------------ scoring
    def _accuracy(self, nominal_layers: Sequence[AnalogLayer] = ()) -> float:
        """Mean accuracy over the search chips as the model is now; ``nominal_layers`` get no variation. With a
        calibrator (and no ``nominal_layers``) each chip is calibrated first and the model restored after."""
        calibrate = self.calibrator if not nominal_layers else None
        saved = {k: v.clone() for k, v in self.model.state_dict().items()} if calibrate is not None else None
        accs = []
        for s in self.chip_seeds:
            with chip(self.model, s):
                for layer in nominal_layers:
                    layer.set_off()
                if calibrate is not None and any(c.active for c in compensators(self.model).values()):
                    calibrate(self.model, s)
                elif calibrate is not None and calibrate.cfg.batchnorm:  # nothing to fit: BatchNorm statistics only
                    reestimate_batchnorm(self.model, calibrate.images, calibrate.cfg.batch_size)
                accs.append(accuracy(self.model, (self.val_x, self.val_y), batch_size=self.cfg.batch_size,
                                     output=self.output))
            if saved is not None:
                self.model.load_state_dict(saved)
        return float(np.mean(accs))

    def cost(self, placement: Sequence[int], metric: str | None = None) -> float:
        """Overhead of ``placement`` in % (``metric``: params | macs; default ``cfg.cost``). A shorter tuple
        (an episode so far) costs what its layers cost."""
        table = self.option_costs[metric or self.cfg.cost]
        return float(sum(table[i][k - 1] for i, k in enumerate(placement) if k))

    def costs(self, placement: Sequence[int]) -> dict[str, float]:
        return {m: self.cost(placement, m) for m in COSTS}

    def feasible(self, placement: Sequence[int]) -> bool:
        """Within every budget limit (a shorter tuple: its layers so far)."""
        return all(self.cost(placement, m) <= lim + 1e-9 for m, lim in self.limits.items())

    def budget_left(self, placement: Sequence[int]) -> float:
        """Share of the tightest budget limit not yet spent by ``placement``, in [0, 1] (1 without a budget)."""
        left = [max(lim - self.cost(placement, m), 0.0) / lim if lim > 0 else 0.0 for m, lim in self.limits.items()]
        return min(left, default=1.0)

    def check(self, placement: Sequence[int]) -> Placement:
        p = tuple(int(v) for v in placement)
        if len(p) != len(self.names):
            raise ConfigError(f"a placement has one entry per layer {self.names}, got {len(p)} entries")
        if any(not 0 <= k <= self.n_options for k in p):
            raise ConfigError(f"a placement's entries are options 0..{self.n_options} (0: none, k: rank "
                              f"{self.ranks}[k-1]), got {list(p)}")
        return p

    def set_placement(self, placement: Sequence[int]) -> None:
        """Switch the shared compensators to ``placement``."""
        for c, k in zip(self.comps.values(), self.check(placement)):
            c.set_option(self.ranks[k - 1] if k else None)

    def evaluate(self, placement: Sequence[int]) -> Evaluation:
        """Score ``placement`` (cached); an infeasible one scores ``-inf`` without being evaluated."""
        p = self.check(placement)
        if p in self.cache:
            return self.cache[p]
        cost, costs = self.cost(p), self.costs(p)
        if not self.feasible(p):
            return Evaluation(p, float("nan"), cost, -math.inf, costs)
        if p in self._saved:  # evaluated before an interruption
            acc = self._saved[p]
        else:
            self.set_placement(p)
            acc = self._accuracy()
            self._saved[p] = acc
            if self.resume is not None and self.resume.due("placement_cache"):
                self.save_cache()
        ev = Evaluation(p, acc, cost, 100 * (acc - self.base_accuracy) - self.cfg.price * cost, costs)
        self.cache[p] = ev
        return ev

    def save_cache(self) -> None:
        """Write every accuracy measured so far to the resume store (if any)."""
        if self.resume is not None:
            self.resume.save("placement_cache", {"placements": [list(p) for p in self._saved],
                                                 "accuracies": list(self._saved.values())})

    def clear_cache(self) -> None:
        """Forget every evaluation (e.g. to time strategies independently, or after changing ``cfg.price``)."""
        self.cache.clear()
        self._saved.clear()

    @property
    def history(self) -> list[Evaluation]:
        """The distinct placements evaluated so far, in order."""
        return list(self.cache.values())

    @property
    def evaluations(self) -> int:
        """Distinct placements evaluated so far."""
        return len(self.cache)

    @property
    def n_placements(self) -> int:
        return (self.n_options + 1) ** len(self.names)

    def to_placement(self, placement: Sequence[int]) -> dict[str, int]:
        """``{layer: rank}`` for :func:`correctnet.compensation.attach_compensation`."""
        return {n: self.ranks[k - 1] for n, k in zip(self.names, self.check(placement)) if k}

    def load_shared(self, model: nn.Module, placement: Sequence[int]) -> None:
        """Copy the shared compensators' weights of ``placement``'s layers into ``model``'s compensators
        (attached with :meth:`to_placement` and ``self.attach``), to fine-tune from them."""
        comps = compensators(model)
        for n, k in zip(self.names, self.check(placement)):
            if k:
                comps[n].load_state_dict(self.comps[n].shrunk(self.ranks[k - 1]).state_dict())

    def summary(self) -> dict[str, Any]:
        return {"layers": self.names, "config": asdict(self.cfg), "attach": self.attach, "ranks": self.ranks,
                "base_accuracy": self.base_accuracy, "clean_accuracy": self.clean_accuracy,
                "layer_cost": dict(zip(self.names, self.layer_cost)),
                "option_costs": {m: dict(zip(self.names, t)) for m, t in self.option_costs.items()},
                "budget": self.limits, "layer_info": self.layer_info,
                "sensitivity": dict(zip(self.names, self.sensitivity)), "lipschitz": self.lipschitz,
                "chip_seeds": self.chip_seeds, "setup_seconds": self.setup_seconds,
                "shared_training": {k: v for k, v in self.training.items() if k != "history"}}


def random_options(comps: Sequence[Compensator], ranks: Sequence[int], active_prob: float,
                   seed: int) -> Callable[[int], None]:
    """``on_step(step)`` for supernet training: before step ``step`` each compensator is switched on with
    probability ``active_prob`` (at least one is on), at an option of ``ranks`` drawn uniformly (with one
    option, just on). Deterministic in ``(seed, step)``, so a resumed training switches as an uninterrupted one."""
    def on_step(step: int) -> None:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        on = torch.rand(len(comps), generator=gen) < active_prob
        if not on.any():  # a step with nothing to train: switch one on
            on[torch.randint(len(comps), (1,), generator=gen)] = True
        pick = (torch.randint(len(ranks), (len(comps),), generator=gen) if len(ranks) > 1
                else torch.zeros(len(comps), dtype=torch.long))
        for c, a, k in zip(comps, on.tolist(), pick.tolist()):
            c.set_option(ranks[k] if a else None)
    return on_step


def search_ranks(cfg: SearchConfig, rank: int) -> list[int]:
    """The options of a search: ``cfg.ranks``, or the compensation ``rank`` alone."""
    return list(cfg.ranks) if cfg.ranks is not None else [rank]


def budget_limits(cfg: SearchConfig) -> dict[str, float]:
    """``{metric: limit in %}`` of ``cfg.budget`` (a number limits ``cfg.cost``; None: no limit)."""
    if cfg.budget is None:
        return {}
    if isinstance(cfg.budget, Mapping):
        return {m: float(v) for m, v in cfg.budget.items()}
    return {cfg.cost: float(cfg.budget)}


def option_costs(model: nn.Module, names: Sequence[str], ranks: Sequence[int], example: torch.Tensor,
                 attach: Mapping[str, Any]) -> dict[str, list[list[float]]]:
    """``{metric: [[% per option] per layer]}``: the overhead (:func:`correctnet.compensation.overhead`, in % of
    the network's parameters / MACs) of a compensator of each rank of ``ranks`` at each layer of ``names``."""
    table: dict[str, list[list[float]]] = {m: [[0.0] * len(ranks) for _ in names] for m in COSTS}
    bare = copy.deepcopy(model)
    if compensators(bare):
        detach_compensation(bare)
    for k, r in enumerate(ranks):
        m = copy.deepcopy(bare)
        attach_compensation(m, {n: r for n in names}, kind=attach["kind"], affine=attach["affine"])
        layers = overhead(m, example)["layers"]
        for i, n in enumerate(names):
            for metric in COSTS:
                table[metric][i][k] = layers[n][f"{metric}_pct"]
    return table


def layer_info(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> list[dict[str, Any]]:
    """Position, type, share of the analog weights and of the analog MACs of the analog layers ``names``.

    ``example``: one input ``[1, ...]`` (MACs per sample, as :func:`correctnet.compensation.overhead`).
    ``names`` are Linear/Conv analog layers (attention ``out_proj`` included); a layer that does not run
    in the forward of ``example`` has 0 MACs.
    """
    layers = analog_layers(model)
    macs: dict[str, int] = {}
    macs = {n: 0 for n in names}
    hooks = [layers[n].register_forward_hook(lambda m, a, out, n=n: macs.__setitem__(n, macs[n] + layer_macs(m, out)))
             for n in names]
    try:
        with eval_mode(model):
            model(example)
    finally:
        for h in hooks:
            h.remove()
    params = {n: layers[n].nominal().numel() for n in names}
    tp, tm = sum(params.values()), max(sum(macs.values()), 1)
    return [{"name": n, "position": i, "conv": not isinstance(layers[n], nn.Linear),
             "params_share": params[n] / tp, "macs_share": macs[n] / tm} for i, n in enumerate(names)]


def enumerate_placements(n: int, options: int = 1) -> list[Placement]:
    """All ``(options + 1)**n`` placements over ``n`` layers, ``none`` first, in counting order (booleans for
    one option)."""
    if options == 1:
        return [tuple(bool(i >> (n - 1 - j) & 1) for j in range(n)) for i in range(2 ** n)]
    return [tuple(p) for p in itertools.product(range(options + 1), repeat=n)]

__all__ = ["COSTS", "SCORES", "Evaluation", "Placement", "PlacementEvaluator", "SearchConfig", "budget_limits",
           "enumerate_placements", "layer_info", "option_costs", "random_options", "search_ranks"]
