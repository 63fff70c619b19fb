"""Benchmark: error suppression on Fashion-MNIST (issue 3).

Trains one model per method with the same epochs, optimizer and seed, then measures clean accuracy,
Monte-Carlo accuracy under log-normal variation at several sigmas (the same evaluation chips for every
method), the per-layer Lipschitz constants, and the error-amplification profile (relative error of each
layer's output, and of the logits, under the same chips at sigma 0.5).

    python experiments/suppression.py --model lenet5
    python experiments/suppression.py --model vgg11 --width 0.25 --epochs 3 --batch-size 128 --test-samples 2000

Results are appended per method to ``--out`` (JSON) as they finish, so an interrupted run resumes with
the methods it has not done; the Markdown table is printed and written next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import correctnet as cn
from correctnet.data import load_dataset
from correctnet.lipschitz import LipschitzRegularizer, error_profile, input_shapes, lipschitz_constants
from correctnet.training import TrainConfig, train

from common import add_base_args, add_run_args, apply_threads, build_network, portable, record

METHODS = ("vanilla", "lipschitz", "noise_aware", "lipschitz_noise_aware")


def run_method(method: str, args, data) -> dict:
    torch.manual_seed(args.seed)
    model = build_network(args, data)
    model = cn.analogize(model, cn.LogNormal(args.train_sigma), inplace=True)
    reg = None
    if "lipschitz" in method:
        reg = LipschitzRegularizer(args.lip_kind, args.lip_strength, args.lip_target,
                                   input_shapes=input_shapes(model, data.train.tensors[0][:1]), seed=args.seed,
                                   samples=args.lip_samples, per_channel=not args.lip_per_layer,
                                   centered=args.lip_centered)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      noise_aware="noise_aware" in method)
    t0 = time.perf_counter()
    train(model, data.train, data.val, cfg, regularizer=reg, progress=args.progress, stage=method)
    train_seconds = time.perf_counter() - t0
    rec = {"method": method, "train_seconds": train_seconds, "clean": cn.clean_accuracy(model, data.test),
           "lipschitz": lipschitz_constants(model, data.test.tensors[0][:1]), "mc": {}}
    for sigma in args.sigmas:
        cn.set_variation(model, cn.LogNormal(sigma))
        r = cn.monte_carlo(model, data.test, n_chips=args.chips, seed=args.eval_seed, progress=args.progress,
                           desc=f"{method} sigma={sigma}")
        rec["mc"][str(sigma)] = r.to_dict() | {"sem": r.sem}
        print(f"  {method:<22} sigma={sigma}: {r.summary()}", flush=True)
    cn.set_variation(model, cn.LogNormal(0.5))
    rec["error_profile_sigma0.5"] = error_profile(model, data.test.tensors[0][:args.profile_samples],
                                                  n_chips=args.profile_chips, seed=args.eval_seed)
    return rec


def table(results: dict, sigmas: list[float]) -> str:
    head = "| method | clean | " + " | ".join(f"σ={s} mean ± sem | σ={s} p5" for s in sigmas)
    head += " | logit rel. error σ=0.5 | max layer L | train time |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in METHODS:
        if m not in results:
            continue
        r = results[m]
        cells = [m, f"{100 * r['clean']:.2f}%"]
        for s in sigmas:
            mc = r["mc"][str(s)]
            cells += [f"{100 * mc['mean']:.2f}% ± {100 * mc['sem']:.2f}", f"{100 * mc['p5']:.2f}%"]
        cells += [f"{r['error_profile_sigma0.5']['output']['mean']:.3f}", f"{max(r['lipschitz'].values()):.2f}",
                  f"{r['train_seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_args(p)  # --dataset --model --width --epochs --lr --batch-size --seed --lip-strength
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--sigmas", nargs="+", type=float, default=[0.3, 0.5, 0.8])
    p.add_argument("--train-sigma", type=float, default=0.5, help="sigma of noise-aware training")
    p.add_argument("--chips", type=int, default=100)
    p.add_argument("--test-samples", type=int, default=None,
                   help="evaluate on the first N test images only (to afford large models on CPU)")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--lip-kind", default="relative")
    p.add_argument("--lip-target", type=float, default=None)
    p.add_argument("--lip-samples", type=int, default=8)
    p.add_argument("--lip-per-layer", action="store_true", help="relative form over the whole layer output")
    p.add_argument("--lip-centered", action="store_true",
                   help="relative form divided by each channel's variance (for layers followed by BatchNorm)")
    p.add_argument("--profile-chips", type=int, default=20)
    p.add_argument("--profile-samples", type=int, default=1000)
    add_run_args(p)  # --threads --progress --out
    args = p.parse_args()
    apply_threads(args)
    out = args.out or Path(f"experiments/results/suppression_{args.dataset}_{args.model}.json")
    state = json.loads(out.read_text()) if out.exists() else {"results": {}}
    state["args"] = portable(vars(args))
    state.pop("machine", None)  # (older files: a string naming the host)
    state["setup"] = record()
    data = load_dataset(args.dataset, seed=args.seed)
    if args.test_samples:
        x, y = data.test.tensors
        data = dataclasses.replace(data, test=TensorDataset(x[:args.test_samples], y[:args.test_samples]))
    for m in args.methods:
        if m in state["results"]:
            print(f"{m}: done (in {out})")
            continue
        print(f"{m}: training {args.model} for {args.epochs} epochs", flush=True)
        state["results"][m] = run_method(m, args, data)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(state, indent=1))
    md = table(state["results"], args.sigmas)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    van = state["results"].get("vanilla")
    for m in METHODS[1:]:
        if van and m in state["results"]:
            print(compare(van, state["results"][m], m))


def compare(base: dict, other: dict, name: str, sigma: str = "0.5") -> str:
    """Mean-accuracy difference at ``sigma`` in standard errors: unpaired, and paired over the shared chips
    (every method is evaluated on the same chip seeds, so per-chip differences cancel the chip spread)."""
    a, b = base["mc"][sigma], other["mc"][sigma]
    diff = b["mean"] - a["mean"]
    z = diff / math.hypot(a["sem"], b["sem"])
    d = [y - x for x, y in zip(a["accuracies"], b["accuracies"])]
    sem_d = statistics.stdev(d) / math.sqrt(len(d))
    return (f"{name} vs vanilla at sigma {sigma}: {100 * diff:+.2f} points = {z:+.1f} unpaired / "
            f"{diff / sem_d:+.1f} paired standard errors; clean {100 * (other['clean'] - base['clean']):+.2f} points; "
            f"logit error {other['error_profile_sigma0.5']['output']['mean']:.3f} vs "
            f"{base['error_profile_sigma0.5']['output']['mean']:.3f}; "
            f"training time x{other['train_seconds'] / base['train_seconds']:.2f}")

if __name__ == "__main__":
    main()
