"""Cheap, honest evaluation of compensation placements: shared compensators, search chips, a cache.

A *placement* is a tuple of booleans, one per candidate analog layer in module order (``True``: the layer
gets a compensator). Its **objective**, in percentage points (pp), is

    objective(p) = 100 * (acc(p) - acc(none)) - price * cost(p)

* ``acc(p)``: mean accuracy over ``chips`` search chips (``Stream.SEARCH``, never evaluation chips) on
  ``val_images`` images of the *validation* split, with the compensators of ``p`` switched on;
* ``cost(p)``: the compensators' overhead in % of the network's parameters (``cost="params"``) or MACs
  (``cost="macs"``), the sum of the per-layer overheads of :func:`correctnet.compensation.overhead`;
* ``price``: pp of accuracy one % of overhead is worth. With ``budget`` (in % as well), placements
  costing more are infeasible: their objective is ``-inf`` and they are never evaluated.

``objective(none) = 0`` by construction. **Weight sharing**: every candidate layer gets a compensator once,
and they are trained together on sampled chips (``Stream.COMPENSATION``) while a random subset is
switched on at each step (each layer with probability ``active_prob``), so that any subset works without
retraining (the "one-shot" supernet idea of neural architecture search, Bender et al. 2018). Evaluating
a placement is then forwards only: ``chips`` forwards over the validation images. Results are cached by
placement: a placement is never evaluated twice, and :attr:`PlacementEvaluator.evaluations` counts the
distinct ones.

The estimate is chip-agnostic. A run that deploys per-chip calibration is searched with this estimate
too (calibrating every search chip for every placement would cost ``chips x calibration`` per
placement); ``experiments/placement.py --check-estimates`` measures it against the real values.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..analog import AnalogLayer, analog_layers, chip
from ..calibration import CompensationConfig, data_tensors, teacher_logits, train_compensation
from ..compensation import layer_macs, attach_compensation, compensators, overhead
from ..errors import ConfigError, is_int, is_number, require
from ..evaluate import accuracy, clean_accuracy
from ..tensors import OutputFn, eval_mode, model_device
from ..lipschitz import lipschitz_constants
from ..resume import ResumeStore
from ..seeding import Stream, chip_seed

Placement = tuple[bool, ...]
COSTS = ("params", "macs")


@dataclass
class SearchConfig:
    """How placements are scored (see the module docstring for the objective)."""

    price: float = 1.0          # pp of accuracy per 1% of overhead
    cost: str = "params"        # params | macs: the overhead the price applies to
    budget: float | None = None  # hard overhead limit in %, or None
    chips: int = 10             # search chips (Stream.SEARCH)
    val_images: int = 1000      # validation images per chip
    shared_steps: int = 500     # training steps of the shared compensators
    active_prob: float = 0.5    # probability that a compensator is on at a shared training step
    batch_size: int = 1000      # evaluation batch
    seed: int = 0

    def __post_init__(self) -> None:
        o = "placement"
        require(is_number(self.price) and self.price >= 0, f"{o}.price", "a number >= 0", self.price)
        require(self.cost in COSTS, f"{o}.cost", f"one of {list(COSTS)}", self.cost)
        require(self.budget is None or (is_number(self.budget) and self.budget >= 0), f"{o}.budget",
                "null or a number >= 0 (% of the network)", self.budget)
        for key in ("chips", "val_images", "shared_steps", "batch_size"):
            v = getattr(self, key)
            require(is_int(v) and v >= 1, f"{o}.{key}", "an integer >= 1", v)
        require(is_number(self.active_prob) and 0 < self.active_prob <= 1, f"{o}.active_prob",
                "a number in (0, 1]", self.active_prob)
        require(is_int(self.seed) and self.seed >= 0, f"{o}.seed", "an integer >= 0", self.seed)


@dataclass
class Evaluation:
    """One evaluated placement: accuracies in [0, 1], cost in %, objective in pp."""

    placement: Placement
    accuracy: float
    cost: float
    objective: float

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        return {"layers": [n for n, on in zip(names, self.placement) if on], "accuracy": self.accuracy,
                "cost": self.cost, "objective": self.objective}


class PlacementEvaluator:
    """Scores placements over the analog layers of ``model`` with shared compensators (module docstring).

    Works on a deep copy of ``model`` (which is left untouched). ``train_data``: the training split (x, y)
    the shared compensators learn on (distillation from the clean network); ``val``: ``(x [N, ...], y [N])``
    validation images, of which the first ``cfg.val_images`` are used. ``attach``: ``kind``, ``rank``,
    ``affine`` of the compensators; ``comp_cfg``: their training (``steps`` is replaced by
    ``cfg.shared_steps``). ``layers``: candidate layer names (default: every analog layer).
    ``resume``: the shared training and the evaluated accuracies are saved there (``placement_shared``,
    ``placement_cache``) and continued from, so an interrupted search repeats no evaluation; the search
    itself is deterministic, so it ends as an uninterrupted one would. ``output``: how the model's outputs
    hold the logits ``[N, C]`` (:func:`correctnet.tensors.logits_of`; None: a tensor, tuple, dict or
    transformers ``ModelOutput``).
    """

    def __init__(self, model: nn.Module, train_data: Any, val: tuple[torch.Tensor, torch.Tensor],
                 cfg: SearchConfig, *, attach: dict[str, Any] | None = None,
                 comp_cfg: CompensationConfig | None = None, layers: Sequence[str] | None = None,
                 progress: bool = False, resume: ResumeStore | None = None, output: OutputFn | None = None) -> None:
        t0 = time.perf_counter()
        self.cfg = cfg
        self.output = output
        self.model = copy.deepcopy(model)
        if compensators(self.model):
            raise ConfigError("the placement search needs a model without compensation modules; detach them first")
        analog = analog_layers(self.model)
        compensable = [n for n, l in analog.items() if l.can_compensate]
        self.names: list[str] = list(layers) if layers is not None else compensable
        unknown = [n for n in self.names if n not in compensable]
        if unknown or not self.names:
            raise ConfigError(f"placement layers {unknown or '[]'} are not analog layers that can carry a "
                              f"compensator; those are: {compensable}")
        dev = model_device(self.model)
        self.val_x = val[0][:cfg.val_images].to(dev)
        self.val_y = val[1][:cfg.val_images].to(dev)
        self.chip_seeds = [chip_seed(Stream.SEARCH, cfg.seed, i) for i in range(cfg.chips)]
        self.attach = {"kind": "output", "rank": 4, "affine": True, **(attach or {})}
        example = self.val_x[:1]

        self.lipschitz = {n: c for n, c in lipschitz_constants(self.model, example).items() if n in self.names}
        self.layer_info = layer_info(self.model, self.names, example)
        self.clean_accuracy = clean_accuracy(self.model, (self.val_x, self.val_y), batch_size=cfg.batch_size,
                                             output=output)
        self.base_accuracy = self._accuracy()  # no compensator exists yet: the uncompensated network
        self.sensitivity = self._sensitivities()

        self.comps = attach_compensation(self.model, self.names, seed=cfg.seed, **self.attach)
        cost = overhead(self.model, example)
        self.layer_cost = [cost["layers"][n][f"{cfg.cost}_pct"] for n in self.names]
        self.overhead = cost
        gen = torch.Generator().manual_seed(cfg.seed)
        comps = list(self.comps.values())
        drawn = [0]  # steps drawn so far: a resumed training fast-forwards the generator to its step

        def draw() -> torch.Tensor:
            on = torch.rand(len(comps), generator=gen) < cfg.active_prob
            if not on.any():  # a step with nothing to train: switch one on
                on[torch.randint(len(comps), (1,), generator=gen)] = True
            drawn[0] += 1
            return on

        def random_subset(step: int) -> None:
            while drawn[0] < step:
                draw()
            for c, a in zip(comps, draw().tolist()):
                c.active = a

        tcfg = comp_cfg or CompensationConfig(seed=cfg.seed)
        tcfg = CompensationConfig(**{**asdict(tcfg), "steps": cfg.shared_steps})
        # the clean network's logits on the training images: also the teacher of the final fine-tuning
        self.teacher = (teacher_logits(self.model, data_tensors(train_data)[0], output=output) if tcfg.distill > 0
                        else None)
        self.training = train_compensation(self.model, train_data, tcfg, progress=progress,
                                           stage="shared compensators", on_step=random_subset, resume=resume,
                                           resume_key="placement_shared", teacher=self.teacher,
                                           output=output).to_dict()
        self.cache: dict[Placement, Evaluation] = {}  # in evaluation order
        self.resume = resume
        self._saved: dict[Placement, float] = {}
        if resume is not None:
            state = resume.load("placement_cache") or {}
            self._saved = {tuple(bool(b) for b in p): a for p, a in zip(state.get("placements", []),
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

    # ------------------------------------------------------------------ scoring
    def _accuracy(self, nominal_layers: Sequence[AnalogLayer] = ()) -> float:
        """Mean accuracy over the search chips as the model is now; ``nominal_layers`` get no variation."""
        accs = []
        for s in self.chip_seeds:
            with chip(self.model, s):
                for layer in nominal_layers:
                    layer.set_off()
                accs.append(accuracy(self.model, (self.val_x, self.val_y), batch_size=self.cfg.batch_size,
                                     output=self.output))
        return float(np.mean(accs))

    def cost(self, placement: Placement) -> float:
        """Overhead of ``placement`` in % (``cfg.cost``)."""
        return float(sum(c for c, on in zip(self.layer_cost, placement) if on))

    def feasible(self, placement: Placement) -> bool:
        return self.cfg.budget is None or self.cost(placement) <= self.cfg.budget + 1e-9

    def check(self, placement: Sequence[bool]) -> Placement:
        p = tuple(bool(v) for v in placement)
        if len(p) != len(self.names):
            raise ConfigError(f"a placement has one entry per layer {self.names}, got {len(p)} entries")
        return p

    def evaluate(self, placement: Sequence[bool]) -> Evaluation:
        """Score ``placement`` (cached); an infeasible one scores ``-inf`` without being evaluated."""
        p = self.check(placement)
        if p in self.cache:
            return self.cache[p]
        cost = self.cost(p)
        if not self.feasible(p):
            return Evaluation(p, float("nan"), cost, -math.inf)
        if p in self._saved:  # evaluated before an interruption
            acc = self._saved[p]
        else:
            for c, on in zip(self.comps.values(), p):
                c.active = on
            acc = self._accuracy()
            self._saved[p] = acc
            if self.resume is not None and self.resume.due("placement_cache"):
                self.save_cache()
        ev = Evaluation(p, acc, cost, 100 * (acc - self.base_accuracy) - self.cfg.price * cost)
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
        return 2 ** len(self.names)

    def to_placement(self, placement: Sequence[bool]) -> dict[str, int]:
        """``{layer: rank}`` for :func:`correctnet.compensation.attach_compensation`."""
        return {n: self.attach["rank"] for n, on in zip(self.names, self.check(placement)) if on}

    def load_shared(self, model: nn.Module, placement: Sequence[bool]) -> None:
        """Copy the shared compensators' weights of ``placement``'s layers into ``model``'s compensators
        (attached with :meth:`to_placement` and ``self.attach``), to fine-tune from them."""
        comps = compensators(model)
        for n, on in zip(self.names, self.check(placement)):
            if on:
                comps[n].load_state_dict(self.comps[n].state_dict())

    def summary(self) -> dict[str, Any]:
        return {"layers": self.names, "config": asdict(self.cfg), "attach": self.attach,
                "base_accuracy": self.base_accuracy, "clean_accuracy": self.clean_accuracy,
                "layer_cost": dict(zip(self.names, self.layer_cost)), "layer_info": self.layer_info,
                "sensitivity": dict(zip(self.names, self.sensitivity)), "lipschitz": self.lipschitz,
                "chip_seeds": self.chip_seeds, "setup_seconds": self.setup_seconds,
                "shared_training": {k: v for k, v in self.training.items() if k != "history"}}


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


def enumerate_placements(n: int) -> list[Placement]:
    """All ``2**n`` placements over ``n`` layers, ``none`` first, in binary counting order."""
    return [tuple(bool(i >> (n - 1 - j) & 1) for j in range(n)) for i in range(2 ** n)]

__all__ = ["COSTS", "Evaluation", "Placement", "PlacementEvaluator", "SearchConfig", "enumerate_placements",
           "layer_info"]
