"""Replay PPO settings on a recorded exhaustive placement benchmark (``experiments/placement.py`` output).

Every accuracy of the 2**L placements is in the benchmark's JSON (its exhaustive history), and evaluations
are deterministic, so a PPO search replayed on them is the same search as on a warm cache of the real
evaluator, without the model. It prints, per seed, the fraction of the exhaustive optimum reached and the
distinct placements evaluated, and writes them to ``--out``. A tuning tool: settings chosen on a
benchmark's own replay are not an independent test of that benchmark.

    python experiments/placement_replay.py experiments/results/placement_fashion_mnist_vgg11.json \
        --seeds 0 1 2 --ppo '{"ent_coef": 0.2, "episodes": 4000}'
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import common

from correctnet.placement.evaluator import Evaluation, Placement, layer_info
from correctnet.placement.search import PPOConfig, search


@dataclass
class _Cfg:
    price: float
    budget: float | None = None


class RecordedEvaluator:
    """The evaluator interface of ``correctnet.placement`` over recorded accuracies."""

    def __init__(self, record: dict[str, Any]) -> None:
        e = record["evaluator"]
        self.names: list[str] = e["layers"]
        self.layer_cost = [e["layer_cost"][n] for n in self.names]
        self.sensitivity = [e["sensitivity"][n] for n in self.names]
        self.lipschitz = e["lipschitz"]
        self.layer_info = e.get("layer_info") or _layer_info(record["setup"], self.names)
        self.cfg = _Cfg(record["price"], e["config"].get("budget"))
        self.base = e["base_accuracy"]
        self.acc = {tuple(n in h["layers"] for n in self.names): h["accuracy"]
                    for h in record["runs"]["exhaustive"]["history"]}
        self.n_placements = 2 ** len(self.names)
        self.cache: dict[Placement, Evaluation] = {}

    def cost(self, p: Placement) -> float:
        return float(sum(c for c, on in zip(self.layer_cost, p) if on))

    def feasible(self, p: Placement) -> bool:
        return self.cfg.budget is None or self.cost(p) <= self.cfg.budget + 1e-9

    def evaluate(self, p: Placement) -> Evaluation:
        p = tuple(bool(v) for v in p)
        if p not in self.cache:
            c = self.cost(p)
            self.cache[p] = Evaluation(p, self.acc[p], c, 100 * (self.acc[p] - self.base) - self.cfg.price * c)
        return self.cache[p]

    @property
    def evaluations(self) -> int:
        return len(self.cache)


def _layer_info(setup: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    """Weight and MAC shares of the layers, from the model (for JSONs written before they were recorded)."""
    import correctnet as cn
    kw = {"width": setup["width"]} if setup["model"].startswith("vgg") else {}
    model = cn.analogize(cn.build_model(setup["model"], (1, 28, 28), 10, **kw), cn.LogNormal(0.5))
    return layer_info(model, names, torch.zeros(1, 1, 28, 28))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a placement benchmark JSON with an exhaustive run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ppo", default="{}", help="PPOConfig fields as JSON")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    ev = RecordedEvaluator(json.loads(args.results.read_text()))
    opt = max(ev.evaluate(q).objective for q in ev.acc)
    kw = json.loads(args.ppo)
    rows = []
    for seed in args.seeds:
        ev.cache.clear()
        t0 = time.perf_counter()
        r = search(ev, "ppo", seed=seed, ppo=PPOConfig(**kw))  # type: ignore[arg-type]
        rows.append({"seed": seed, "of_optimum": r.best.objective / opt, "evaluations": r.evaluations,
                     "chosen": r.chosen, "episodes": r.extra["ppo"]["episodes"],
                     "seconds_ppo": time.perf_counter() - t0})
        print(f"seed {seed}: {100 * rows[-1]['of_optimum']:.1f}% of the optimum, {r.evaluations}/{ev.n_placements} "
              f"evaluations, {rows[-1]['episodes']} episodes", flush=True)
    ratios = np.array([r["of_optimum"] for r in rows])
    print(f"{kw}: mean {100 * ratios.mean():.1f}%, min {100 * ratios.min():.1f}%, "
          f"{int((ratios >= 0.98).sum())}/{len(ratios)} seeds >= 98%")
    if args.out:
        args.out.write_text(json.dumps({"results": common.portable(args.results), "ppo": kw, "optimum": opt, "rows": rows,
                                        **common.record(args)}, indent=1))


if __name__ == "__main__":
    main()
