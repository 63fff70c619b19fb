"""Benchmark: chip-agnostic accuracy against digital overhead (the budget front of the default recipe).

Trains two networks from the same initialisation with noise-aware training (``--chips-per-step`` chips per
step): **noise-aware alone**, and the **supernet** of the correctnet presets (a compensator of rank
max(``--ranks``) beside every analog layer, random options switched on at each step:
``correctnet.placement.evaluator.random_options``). On the supernet's trained compensators one
:class:`~correctnet.placement.PlacementEvaluator` (``trained=True``; ``--price`` 0.01 pp per % MACs: the
objective is the accuracy recovered, pp, ties going to the cheaper placement) scores placements; for each MAC budget in ``--budgets`` (descending, so that the first
exhaustive search fills the cache) it runs ``exhaustive`` (the optimum), ``ppo`` (``--ppo-seeds``) and
``greedy`` (``--strategies``: leave ``exhaustive`` out where it is infeasible). Two fixed arms come with them:
**none** (the supernet with every compensator removed) and **all** (every layer at rank max(``--ranks``)).
Each distinct placement is then deployed as the pipeline does (``keep_compensation``, ``--finetune-steps``
chip-agnostic steps distilling the clean network) and measured on the test split over ``--chips`` evaluation
chips (``Stream.EVAL``, never searched), with both overheads: chip-agnostic, and **calibrated** on the first
``--calibrated-chips`` of those chips with the calibration of ``method=correctnet_calibrated`` (BatchNorm
re-estimation, the compensators and the other layers' digital biases fitted per chip; the chip-ensemble
teacher, as there is no reference network here). Noise-aware alone is calibrated the same way (biases only).

    python experiments/budget_front.py --model lenet5 --epochs 3 --threads 1

Several seeds' result files: ``python experiments/budget_front_seeds.py FILE...`` (mean and standard error).

Results: ``experiments/results/budget_front_<dataset>_<model>_s<sigma>.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import correctnet as cn
from correctnet.calibration import (CalibrationConfig, ChipCalibrator, CompensationConfig, calibration_images,
                                    train_compensation)
from correctnet.compensation import attach_compensation, keep_compensation, overhead
from correctnet.placement import PlacementEvaluator, PPOConfig, SearchConfig, search
from correctnet.placement.evaluator import random_options
from correctnet.training import TrainConfig, train

from common import (add_run_args, add_training_args, apply_threads, benchmark_data, machine_line, model_kwargs, portable,
                    record)


def _network(args: argparse.Namespace, data: Any) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    kw: dict[str, Any] = model_kwargs(args.model, args.width)
    if args.hidden:
        kw["hidden"] = tuple(args.hidden)
    model = cn.build_model(args.model, data.input_shape, data.num_classes, **kw)
    return cn.analogize(model, cn.LogNormal(args.sigma), inplace=True)


def _name(args: argparse.Namespace) -> str:
    return f"{args.model}{len(args.hidden) + 1}" if args.hidden else args.model


def preset_calibration(seed: int) -> CalibrationConfig:
    """The per-chip calibration of ``method=correctnet_calibrated``, composed as the train command does, with the
    chip-ensemble teacher (``teacher: auto`` picks between it and a reference network this benchmark has not)."""
    from hydra import compose, initialize_config_dir

    from correctnet.conf import DIR as CONFIG_DIR
    from correctnet.train import _calibration_config
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=correctnet_calibrated", f"seed={seed}"])
    cal = _calibration_config(cfg)
    assert cal is not None
    return dataclasses.replace(cal, teacher="ensemble")


def _measure(m: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace,
             desc: str, images: torch.Tensor | None = None, cal: CalibrationConfig | None = None) -> dict[str, Any]:
    r = cn.monte_carlo(m, test, n_chips=args.chips, seed=args.eval_seed, progress=args.progress, desc=desc)
    out = {"mean": r.mean, "std": r.std, "p5": r.p5, "min": r.min, "n_chips": r.n_chips,
           "clean": cn.clean_accuracy(m, test)}
    if args.calibrated_chips and cal is not None and images is not None:
        # monte_carlo restores the model's parameters and buffers after each calibrated chip
        c = cn.monte_carlo(m, test, n_chips=args.calibrated_chips, seed=args.eval_seed, progress=args.progress,
                           desc=f"{desc} calibrated", calibrate=ChipCalibrator(m, images, cal))
        out["calibrated"] = {"mean": c.mean, "std": c.std, "p5": c.p5, "min": c.min, "n_chips": c.n_chips}
        # the chip-agnostic mean on the same chips: what calibration adds on them
        out["agnostic_first"] = sum(r.accuracies[:c.n_chips]) / c.n_chips
    return out


def _summary(t: dict[str, Any]) -> str:
    c = f", calibrated {100 * t['calibrated']['mean']:.2f}%" if "calibrated" in t else ""
    return f"chip-agnostic {100 * t['mean']:.2f}%{c}"


def _cal(t: dict[str, Any]) -> str:
    return f"{100 * t['calibrated']['mean']:.2f}%" if "calibrated" in t else "-"


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    ncal = s.get("calibrated_chips", 0)
    lines = [f"Budget front, {s['model']} on {s['dataset']}, lognormal sigma={s['sigma']}, seed {s['seed']}, "
             f"{s['epochs']} epochs, {s['chips_per_step']} chips per training step; options per layer: none or rank "
             f"{s['ranks']} (rank 0: scale and shift only); {s['search_chips']} search chips x {s['val_images']} "
             f"validation images; test: {s['chips']} chips x {s['test_samples']} images, calibrated on the first "
             f"{ncal} of them. Machine: {machine_line(s)}",
             "", f"Command: `{s['command']}`", "",
             "| arm | budget (% MACs) | chosen (layer: rank) | + params | + MACs | search objective (pp) | "
             "% of exhaustive | evaluations | test clean | test chip mean | test p5 | calibrated chip mean |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    na = res["noise_aware"]
    lines.append(f"| noise-aware alone | - | - | - | - | - | - | - | {100 * na['clean']:.2f}% | {100 * na['mean']:.2f}% "
                 f"| {100 * na['p5']:.2f}% | {_cal(na)} |")
    for row in res.get("fixed", []) + res["front"]:
        t = res["test"][row["key"]]
        opt = res["front_optimum"].get(str(row.get("budget")))
        share = f"{100 * row['objective'] / opt:.1f}%" if opt and "objective" in row else "-"
        k = len(row["chosen_ranks"])
        chosen = (f"{k} layers: " if k > 4 else "") + (", ".join(f"{n}: {r}" for n, r in row["chosen_ranks"].items()) or "none")
        search = (f"{row['budget']:g} | {chosen} | {t['params_pct']:.2f}% | {t['macs_pct']:.2f}% | "
                  f"{row['objective']:.2f} | {share} | {row['evaluations']} of {row['n_placements']}") if "budget" in row \
            else f"- | {chosen} | {t['params_pct']:.2f}% | {t['macs_pct']:.2f}% | - | - | -"
        lines.append(f"| {row['strategy']} | {search} | {100 * t['clean']:.2f}% | {100 * t['mean']:.2f}% | "
                     f"{100 * t['p5']:.2f}% | {_cal(t)} |")
    lines += ["", f"Supernet without compensators on the search chips: {100 * res['evaluator']['base_accuracy']:.2f}%; "
              f"training: noise-aware {res['seconds']['noise_aware']:.0f} s, supernet {res['seconds']['supernet']:.0f} s; "
              f"total {res['seconds']['total']:.0f} s."]
    return "\n".join(lines) + "\n"


def arms(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """One seed's measured arms by label (``noise-aware alone``, ``none``, ``all``, ``<strategy> @ <budget>``):
    extra MACs and parameters (%), chip-agnostic and calibrated chip means (%), and for searched placements with an
    exhaustive search beside them, the search objective as % of the exhaustive optimum."""
    def pts(t: dict[str, Any]) -> dict[str, float]:
        d = {"macs_pct": t.get("macs_pct", 0.0), "params_pct": t.get("params_pct", 0.0), "agnostic": 100 * t["mean"],
             "p5": 100 * t["p5"]}
        if "calibrated" in t:
            d["calibrated"] = 100 * t["calibrated"]["mean"]
        return d
    out = {"noise-aware alone": pts(res["noise_aware"])}
    for row in res.get("fixed", []):
        out[row["strategy"]] = pts(res["test"][row["key"]])
    for row in res["front"]:
        d = out[f"{row['strategy']} @ {row['budget']:g}"] = pts(res["test"][row["key"]])
        opt = res["front_optimum"].get(str(row["budget"]))
        if opt:
            d["search_pct"] = 100 * row["objective"] / opt  # of the exhaustive optimum's search objective
    return out


def mean_se(vals: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    return float(np.mean(vals)), float(np.std(vals, ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Chip-agnostic and calibrated chip mean against extra digital MACs; with several seeds, means with standard
    errors (each arm's MACs averaged over the seeds' placements)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_seed = [arms(r) for r in results]
    labels = [k for k in per_seed[0] if all(k in a for a in per_seed)]

    def stat(label: str, key: str) -> tuple[float, float, float] | None:
        vals = [a[label].get(key) for a in per_seed]
        if any(v is None for v in vals):
            return None
        x = max(mean_se([a[label]["macs_pct"] for a in per_seed])[0], 1e-3)
        return (x, *mean_se(vals))

    keys = [("agnostic", "chip-agnostic")] + ([("calibrated", "calibrated")]
                                              if "calibrated" in per_seed[0]["noise-aware alone"] else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 4.4), squeeze=False)
    strategies = sorted({k.split(" @ ")[0] for k in labels if " @ " in k})
    for ax, (key, name) in zip(axes[0], keys):
        na = stat("noise-aware alone", key)
        if na:
            ax.axhline(na[1], color="gray", ls="--", label="noise-aware alone")
            ax.axhspan(na[1] - na[2], na[1] + na[2], color="gray", alpha=0.15)
        for i, strategy in enumerate(strategies):
            st = sorted(p for k in labels if k.split(" @ ")[0] == strategy and (p := stat(k, key)))
            if st:
                ax.errorbar([p[0] for p in st], [p[1] for p in st], yerr=[p[2] for p in st], marker="osx^v"[i % 5],
                            capsize=3, ls="-" if strategy != "greedy" else ":", label=strategy)
        for label, marker, text in (("none", "D", "no compensator"), ("all", "*", "every layer, top rank")):
            if label in labels and (p := stat(label, key)):
                ax.errorbar([p[0]], [p[1]], yerr=[p[2]], marker=marker, ms=9, ls="none", capsize=3, label=text)
        ax.set_xscale("log")
        ax.set_xlabel("extra digital MACs (% of the network's; 0 shown at 0.001)")
        ax.set_ylabel(f"{name} test accuracy, chip mean (%)")
        s = results[0]["setup"]
        seeds = ", ".join(str(r["setup"]["seed"]) for r in results)
        ax.set_title(f"{s['model']}, {s['dataset']}, lognormal sigma={s['sigma']}, seed(s) {seeds}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    p.add_argument("--hidden", type=int, nargs="+", default=None,
                   help="MLP hidden widths (e.g. 10 layers: --model mlp --hidden 128 x 9)")
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chips-per-step", type=int, default=8)
    p.add_argument("--ranks", type=int, nargs="+", default=[0, 1, 4])
    p.add_argument("--active-prob", type=float, default=0.5)
    p.add_argument("--budgets", type=float, nargs="+", default=[100.0, 10.0, 3.0, 1.0, 0.3, 0.1],
                   help="MAC budgets in %% (parameters unconstrained)")
    p.add_argument("--price", type=float, default=0.01,
                   help="pp per %% MACs in the search objective (small: accuracy first, ties go to the cheaper)")
    p.add_argument("--search-chips", type=int, default=10)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--strategies", nargs="+", default=["exhaustive", "ppo", "greedy"],
                   choices=["exhaustive", "ppo", "greedy"], help="search strategies per budget")
    p.add_argument("--ppo-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--ppo-episodes", type=int, default=PPOConfig.episodes, help="PPOConfig.episodes")
    p.add_argument("--ppo-max-evaluations", type=int, default=None,
                   help="PPOConfig.max_evaluations (default: the library's cap)")
    p.add_argument("--finetune-steps", type=int, default=300,
                   help="chip-agnostic steps distilling the clean network after deployment (0: as the supernet trained them)")
    p.add_argument("--calibrated-chips", type=int, default=20,
                   help="evaluation chips each arm is also measured on calibrated (0: chip-agnostic only)")
    p.add_argument("--eval-seed", type=int, default=0)
    add_run_args(p, threads=1)
    args = p.parse_args()
    apply_threads(args)
    out = args.out or Path(__file__).parent / "results" / f"budget_front_{args.dataset}_{_name(args)}_s{args.sigma:g}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"setup": {**portable(vars(args)), **record()}, "front": [], "test": {}, "seconds": {}}
    t_all = time.perf_counter()
    data, test = benchmark_data(args)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, noise_aware=True,
                       chips_per_step=args.chips_per_step, seed=args.seed)

    t0 = time.perf_counter()
    plain = _network(args, data)
    train(plain, data.train, data.val, tcfg, progress=args.progress, stage="noise-aware")
    res["seconds"]["noise_aware"] = time.perf_counter() - t0
    cal = preset_calibration(args.seed)
    cal = dataclasses.replace(cal, n_images=min(cal.n_images, len(data.train)))  # small datasets: all the images
    images = calibration_images(data.train, cal.n_images, cal.seed)
    res["calibration"] = dataclasses.asdict(cal)
    res["noise_aware"] = _measure(plain, test, args, "noise-aware", images, cal)
    print(f"noise-aware alone: {_summary(res['noise_aware'])}", flush=True)

    t0 = time.perf_counter()
    supernet = _network(args, data)
    comps = attach_compensation(supernet, "all", rank=max(args.ranks), seed=args.seed)
    train(supernet, data.train, data.val, tcfg, progress=args.progress, stage="supernet",
          on_step=random_options(list(comps.values()), sorted(args.ranks), args.active_prob, args.seed))
    res["seconds"]["supernet"] = time.perf_counter() - t0
    cfg = SearchConfig(price=args.price, cost="macs", ranks=args.ranks, chips=args.search_chips, val_images=args.val_images,
                       seed=args.seed)
    ev = PlacementEvaluator(supernet, data.train, data.val.tensors, cfg, trained=True, progress=args.progress,
                            comp_cfg=CompensationConfig(seed=args.seed))
    res["evaluator"] = ev.summary()
    res["front_optimum"] = {}
    plan = [(f"ppo (seed {s})", "ppo", s) if st == "ppo" else (st, st, 0)
            for st in args.strategies for s in (args.ppo_seeds if st == "ppo" else [0])]
    for budget in sorted(args.budgets, reverse=True):
        ev.cfg.budget = {"macs": budget}
        for name, strategy, seed in plan:
            ppo = PPOConfig(episodes=args.ppo_episodes, max_evaluations=args.ppo_max_evaluations)
            r = search(ev, strategy, seed=seed, ppo=ppo, progress=args.progress)
            key = json.dumps(r.chosen_ranks, sort_keys=True)
            res["front"].append({"strategy": name, "budget": budget, "key": key, "chosen_ranks": r.chosen_ranks,
                                 "objective": r.best.objective, "accuracy": r.best.accuracy,
                                 "costs": r.best.costs, "evaluations": r.evaluations, "n_placements": r.n_placements,
                                 **{k: v for k, v in r.extra.get("ppo", {}).items()
                                    if k in ("agent_best", "agent_evaluations", "polish_rounds")}})
            if strategy == "exhaustive":
                res["front_optimum"][str(budget)] = r.best.objective
            print(f"budget {budget:g}% MACs, {name}: {r.chosen_ranks} objective {r.best.objective:.2f} pp, "
                  f"{r.evaluations} evaluations", flush=True)
        out.write_text(json.dumps(res, indent=1))
    fixed = {"none": {}, "all": {n: max(args.ranks) for n in comps}}
    res["fixed"] = [{"strategy": k, "key": json.dumps(v, sort_keys=True), "chosen_ranks": v} for k, v in fixed.items()]
    for row in res["fixed"] + res["front"]:
        if row["key"] in res["test"]:
            continue
        m = copy.deepcopy(supernet)
        keep_compensation(m, row["chosen_ranks"])
        info: dict[str, Any] = {"chosen_ranks": row["chosen_ranks"]}
        if row["chosen_ranks"] and args.finetune_steps > 0:
            r = train_compensation(m, data.train, CompensationConfig(steps=args.finetune_steps, seed=args.seed),
                                   progress=args.progress, teacher=ev.teacher)
            info["finetune_seconds"] = r.seconds
        o = overhead(m, test[0][:1])["total"]
        info |= {"params_pct": o["params_pct"], "macs_pct": o["macs_pct"]}
        res["test"][row["key"]] = info | _measure(m, test, args, row["key"], images, cal)
        print(f"test {row['chosen_ranks']}: {_summary(res['test'][row['key']])} at +{o['params_pct']:.2f}% "
              f"params, +{o['macs_pct']:.2f}% MACs", flush=True)
        out.write_text(json.dumps(res, indent=1))
    res["seconds"]["total"] = time.perf_counter() - t_all
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(table(res))
    plot([res], out.with_suffix(".png"))
    print(table(res))


if __name__ == "__main__":
    main()
