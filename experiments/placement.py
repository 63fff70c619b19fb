"""Benchmark: placement search strategies on Fashion-MNIST (issue 5).

On one base model (cached with ``experiments/compensation.py``'s cache and settings), it trains the shared
compensators once, then runs every strategy on an *empty* cache (so each one's evaluations and seconds
are its own): ``exhaustive`` (the optimum), ``ppo`` (one run per ``--ppo-seeds``, all reported),
``greedy``, ``all``, ``none``. Objective (pp) = 100 * (acc(p) - acc(none)) - price * overhead(p), on
the validation split and ``Stream.SEARCH`` chips (see ``correctnet.placement.evaluator``).

``--price auto`` sets the price to the break-even rate of compensating every layer, gain(all) / cost(all):
at that price "all" scores 0 and the best placements are the layers whose gain per unit of overhead is
above the average, which makes the trade-off non-trivial for any model.

Then every distinct chosen placement is fine-tuned from its shared compensators (``--finetune-steps``)
and measured on the *test* split over ``--chips`` evaluation chips (``Stream.EVAL``, never searched).

    python experiments/placement.py --model lenet5 --base lipschitz --threads 1
    python experiments/placement.py --model vgg11 --width 0.25 --epochs 3 --batch-size 128 --base noise_aware --threads 1

Results go to ``experiments/results/placement_<dataset>_<model>.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any


import correctnet as cn
from correctnet.calibration import CompensationConfig, train_compensation
from correctnet.compensation import attach_compensation, overhead
from correctnet.data import load_dataset
from correctnet.placement import PlacementEvaluator, PPOConfig, SearchConfig, search

from common import add_base_args, add_run_args, apply_threads, machine_line, portable, record
from compensation import BASES, base_model  # the same cached base models


def final_test(model, evaluator: PlacementEvaluator, layers: list[str], args, train_data, test) -> dict[str, Any]:
    """Fine-tune the shared compensators of ``layers`` and measure on the evaluation chips."""
    m = copy.deepcopy(model)
    p = tuple(n in layers for n in evaluator.names)
    info: dict[str, Any] = {"layers": layers}
    if layers:
        attach_compensation(m, evaluator.to_placement(p), seed=args.seed, **evaluator.attach)
        evaluator.load_shared(m, p)
        res = train_compensation(m, train_data, CompensationConfig(steps=args.finetune_steps, lr=args.comp_lr,
                                                                   seed=args.seed), progress=args.progress,
                                 teacher=evaluator.teacher)
        info["finetune_seconds"] = res.seconds
        info["overhead"] = overhead(m, test[0][:1])["total"]
    r = cn.monte_carlo(m, test, n_chips=args.chips, seed=args.eval_seed, progress=args.progress, desc=str(layers))
    return info | {"mean": r.mean, "std": r.std, "p5": r.p5, "min": r.min, "n_chips": r.n_chips,
                   "clean": cn.clean_accuracy(m, test)}


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    opt = res["runs"]["exhaustive"]["objective"]
    lines = [f"Placement search, {s['model']} on {s['dataset']}, base {s['base']}, lognormal sigma={s['sigma']}, "
             f"{len(res['evaluator']['layers'])} layers ({2 ** len(res['evaluator']['layers'])} placements), "
             f"price {res['price']:.4g} pp per % {s['cost']}, {s['search_chips']} search chips x "
             f"{s['val_images']} validation images; machine: {machine_line(s)}", "",
             "| strategy | chosen layers | objective (pp) | % of optimum | recovered (pp) | overhead % | "
             "evaluations | % of placements | search s | test mean | test p5 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = res["evaluator"]["base_accuracy"]
    for name, r in res["runs"].items():
        t = res["test"].get(",".join(r["chosen"]), {})
        lines.append(f"| {name} | {', '.join(r['chosen']) or '-'} | {r['objective']:.3f} | "
                     f"{100 * r['objective'] / opt:.1f}% | {100 * (r['accuracy'] - base):.2f} | {r['cost']:.3f} | "
                     f"{r['evaluations']} | {100 * r['evaluations'] / r['n_placements']:.1f}% | {r['seconds_cold']:.1f}"
                     f"{'' if r['cold'] else '*'} | "
                     + (f"{100 * t['mean']:.2f}% | {100 * t['p5']:.2f}% |" if t else "- | - |"))
    lines += ["", f"Shared compensators: {res['evaluator']['shared_training']['steps']} steps in "
              f"{res['evaluator']['shared_training']['seconds']:.0f} s; setup (incl. sensitivities) "
              f"{res['evaluator']['setup_seconds']:.0f} s. Test: {s['chips']} evaluation chips, "
              f"{s['test_samples']} test images, each placement fine-tuned {s['finetune_steps']} steps from its "
              f"shared compensators. Uncompensated search accuracy {100 * base:.2f}%.",
              "", f"\\* cold time estimated: the search's own time on the warm cache + its evaluations x "
              f"{res['seconds_per_evaluation']:.3f} s (the exhaustive search's time per evaluation); the "
              f"searches are the same on a cold cache (evaluations are deterministic)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_args(p)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--base", default="lipschitz", choices=BASES)
    p.add_argument("--price", default="auto", help="pp per %% of overhead, or 'auto' (break-even of all layers)")
    p.add_argument("--cost", default="params", choices=["params", "macs"])
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--search-chips", type=int, default=10)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--shared-steps", type=int, default=500)
    p.add_argument("--comp-lr", type=float, default=1e-2)
    p.add_argument("--ppo-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-evaluations", type=int, default=None, help="PPO cap (default: max(16, 25%% of 2^L))")
    p.add_argument("--ppo", default="{}", help='other PPOConfig fields as JSON, e.g. \'{"ent_coef": 0.2}\'')
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--chips", type=int, default=100)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--cold", action="store_true",
                   help="run every strategy on an empty cache (default: after the exhaustive search the cache is "
                        "kept, the other strategies' searches are the same, and their cold time is estimated as "
                        "their measured time + their evaluations x the exhaustive search's seconds per evaluation)")
    add_run_args(p)
    args = p.parse_args()
    apply_threads(args)
    out = args.out or Path(__file__).parent / "results" / f"placement_{args.dataset}_{args.model}.json"
    cache = Path(__file__).parent / "results" / f"compensation_{args.dataset}_{args.model}_models"
    cache.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"setup": {**portable(vars(args)), **record()}, "runs": {}, "test": {}}

    def save() -> None:
        out.write_text(json.dumps(res, indent=1))
        if "exhaustive" in res["runs"]:
            out.with_suffix(".md").write_text(table(res))

    data = load_dataset(args.dataset, None, val_fraction=0.1, seed=args.seed)
    test = (data.test.tensors[0][:args.test_samples], data.test.tensors[1][:args.test_samples])
    model, info = base_model(args.base, args.sigma, args, data, cache)
    cn.set_variation(model, cn.LogNormal(args.sigma))
    res["base"] = info
    t0 = time.perf_counter()
    price = 1.0 if args.price == "auto" else float(args.price)
    cfg = SearchConfig(price=price, cost=args.cost, budget=args.budget, chips=args.search_chips,
                       val_images=args.val_images, shared_steps=args.shared_steps, seed=args.seed)
    ev = PlacementEvaluator(model, data.train, data.val.tensors, cfg, attach={"kind": "output", "rank": 4},
                            comp_cfg=CompensationConfig(lr=args.comp_lr, seed=args.seed), progress=args.progress)
    print(f"shared compensators ready in {time.perf_counter() - t0:.0f} s; uncompensated {100 * ev.base_accuracy:.2f}%",
          flush=True)
    if args.price == "auto":
        full = ev.evaluate((True,) * len(ev.names))
        if full.accuracy <= ev.base_accuracy:
            raise SystemExit(f"--price auto: compensating every layer recovers nothing "
                             f"({100 * (full.accuracy - ev.base_accuracy):.2f} pp); give --price")
        ev.cfg.price = 100 * (full.accuracy - ev.base_accuracy) / full.cost
        ev.clear_cache()
        print(f"price auto: all layers recover {100 * (full.accuracy - ev.base_accuracy):.2f} pp at "
              f"{full.cost:.3f}% {args.cost} -> price {ev.cfg.price:.4g}", flush=True)
    res["price"] = ev.cfg.price
    res["evaluator"] = ev.summary()
    plan = [("exhaustive", "exhaustive", 0)] + [(f"ppo (seed {s})", "ppo", s) for s in args.ppo_seeds] + [
        ("greedy", "greedy", 0), ("all", "all", 0), ("none", "none", 0)]
    per_eval = None
    for name, strategy, seed in plan:
        if args.cold or per_eval is None:
            ev.clear_cache()
        r = search(ev, strategy, seed=seed, ppo=PPOConfig(max_evaluations=args.max_evaluations, **json.loads(args.ppo)),
                   progress=args.progress)
        res["runs"][name] = d = r.to_dict()
        if per_eval is None:
            per_eval = r.seconds / r.evaluations
            res["seconds_per_evaluation"] = per_eval
        d["cold"] = args.cold or strategy == "exhaustive"
        d["seconds_cold"] = r.seconds if d["cold"] else r.seconds + r.evaluations * per_eval
        print(f"{name:<14} {r.chosen} objective {r.best.objective:.3f} pp, {r.evaluations}/{r.n_placements} "
              f"evaluations, {d['seconds_cold']:.1f} s{'' if d['cold'] else ' (estimated cold)'}", flush=True)
        save()
    for r in res["runs"].values():
        key = ",".join(r["chosen"])
        if key not in res["test"]:
            res["test"][key] = final_test(model, ev, r["chosen"], args, data.train, test)
            t = res["test"][key]
            print(f"test {r['chosen']}: {100 * t['mean']:.2f}% (p5 {100 * t['p5']:.2f}%)", flush=True)
            save()
    res["seconds"] = time.perf_counter() - t0
    save()
    print(table(res))


if __name__ == "__main__":
    main()
