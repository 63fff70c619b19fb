"""Benchmark: networks trained without the periphery against networks trained through it, on chips with 8-bit
fixed-range converters (the ``rram_fixed_range`` preset: Wan 2022 programming noise and 1% read noise, 8-bit DAC
clipping at 1.0 x each layer's input range, 8-bit ADC at 12 x max|W| x the DAC's full scale, output noise 0.005).

Arms (the same initialisation and data order; noise-aware training, ``--chips-per-step`` chips per step):

* ``without``: trained under the device model without converters (the same programming and read noise, ideal
  DAC/ADC), then deployed on the fixed-range chip: input ranges measured on the trained network (``--range-images``
  training images, ``calibrate_input_ranges``), as the pipeline does after training;
* ``with``: trained through the whole periphery (ranges measured before training with BatchNorm on batch statistics, then again after it);
* ``learned``: ``with`` plus learned input ranges (``TrainConfig.learn_input_ranges``, ``input_range_decay``) and
  a 2.5-std weight clip after every step (``weight_clip``);
* ``aihwkit``: IBM aihwkit-lightning 2.1's hardware-aware training, run where installed (``pip install
  aihwkit-lightning``), with its user guide's configuration: 8-bit input quantization with learned input ranges
  (initialised from 100 batches at 3 std), output noise 0.01 per channel, 8-bit ADC at out_bound 12, additive
  per-channel weight noise ``--aihwkit-noise`` (guide: 0.05), 2.5-std per-channel clip after every step, tiles of
  512 inputs; the same optimizer, schedule, batches and epochs as the other arms. The trained weights go back to a
  plain copy of the network and its learned ranges (the largest over a layer's tiles) become the DAC ranges of the
  fixed-range chip; no noise-aware training through correctnet's device model.

Each is measured on the same ``--chips`` evaluation chips (``Stream.EVAL``) of the test split.

    python experiments/periphery_training.py --model lenet5 --epochs 3 --threads 1
    python experiments/periphery_training.py --model lenet5 --epochs 3 --threads 1 --arms aihwkit

Results: ``experiments/results/periphery_training_<dataset>_<model>_s<seed>[_<arms>].{json,md}`` (the suffix when
``--arms`` is not the default three), written after every arm; ``--resume`` keeps the arms that file already holds.
"""
from __future__ import annotations

import argparse
import json
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

import correctnet as cn
from correctnet.devices import RRAM
from correctnet.tensors import first_samples
from correctnet.training import TrainConfig, make_schedule, train

from common import (add_run_args, add_training_args, apply_threads, benchmark_data, build_network, machine_line, portable,
                    record, write_result)

# conf/variation/rram_fixed_range.yaml (rram_wan2022 + rram_periphery + dac_range)
DEPLOY = RRAM(sigma=1.0, read_noise=0.01, dac_bits=8, adc_bits=8, dac_range=1.0, adc_range=12.0, output_noise=0.005)
ARMS = ["without", "with", "learned"]
SETUP_KEYS = ("dataset", "model", "width", "seed", "epochs", "chips", "test_samples", "chips_per_step", "range_images",
              "aihwkit_noise")  # what an arm's number depends on, besides the code
IDEAL = dataclasses.replace(DEPLOY, dac_bits=None, adc_bits=None, dac_range="auto", adc_range="auto", output_noise=0.0)


def _ranges(model: torch.nn.Module, data: Any, n: int, before_training: bool = False) -> None:
    x = first_samples(data.train, n).tensors[0]
    cn.calibrate_input_ranges(model, [x[i:i + 256] for i in range(0, len(x), 256)], batch_statistics=before_training)


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [f"Trained without vs through the periphery, {s['model']} on {s['dataset']}, seed {s['seed']}, {s['epochs']} "
             f"epochs, {s['chips_per_step']} chips per step; deployed on `rram_fixed_range` chips (8-bit fixed-range "
             f"DAC/ADC, output noise 0.005); test: {s['chips']} chips x {s['test_samples']} images. Machine: "
             f"{machine_line(s)}", "", f"Command: `{s['command']}`", "",
             "| arm | clean | chip mean | p5 | min | training s |", "|---|---|---|---|---|---|"]
    for name, r in res["arms"].items():
        lines.append(f"| {name} | {100 * r['clean']:.2f}% | {100 * r['mean']:.2f}% | {100 * r['p5']:.2f}% | "
                     f"{100 * r['min']:.2f}% | {r['seconds']:.0f} |")
    arms = res["arms"]
    if "without" in arms and {"with", "learned"} & set(arms):
        o = arms["without"]["mean"]
        diffs = [f"{label} minus without: {100 * (arms[k]['mean'] - o):+.2f} points of chip mean"
                 for k, label in (("with", "through the periphery"), ("learned", "with learned ranges and the clip"))
                 if k in arms]
        lines += ["", "; ".join(diffs).capitalize() + "."]
    older = {k: v["commit"]["commit"][:10] for k, v in arms.items()
             if "commit" in v and v["commit"]["commit"] != s["git"]["commit"]}
    if older:
        lines += ["", "Resumed arms (measured at an earlier commit): " +
                  ", ".join(f"{k} at {c}" for k, c in older.items()) + "."]
    if "aihwkit" in arms:
        lines += ["", f"aihwkit: aihwkit-lightning {arms['aihwkit']['version']}, guide configuration, weight noise "
                  f"{s['aihwkit_noise']} (ADD_NORMAL_PER_CHANNEL)."]
    return "\n".join(lines) + "\n"


def train_aihwkit(model: torch.nn.Module, data: Any, cfg: TrainConfig, noise: float) -> tuple[dict[str, Any], str]:
    """Train a copy of plain ``model`` with aihwkit-lightning's guide configuration; returns (plain state dict,
    ``{layer name: learned input range}`` under the key ``"ranges"``) and the package version."""
    import aihwkit_lightning
    from aihwkit_lightning.nn.conversion import convert_to_analog
    from aihwkit_lightning.optim import AnalogOptimizer
    from aihwkit_lightning.simulator.configs import TorchInferenceRPUConfig, WeightClipType, WeightNoiseInjectionType

    rpu = TorchInferenceRPUConfig()
    rpu.forward.inp_res = 2 ** 8 - 2
    rpu.forward.out_noise = 0.01
    rpu.forward.out_noise_per_channel = True
    rpu.forward.out_bound = 12.0
    rpu.forward.out_res = 2 ** 8 - 2
    rpu.clip.type = WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL
    rpu.clip.sigma = 2.5
    rpu.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL  # 2.x name of the guide's modifier.type
    rpu.modifier.std_dev = noise
    rpu.mapping.max_input_size = 512
    rpu.pre_post.input_range.enable = True
    rpu.pre_post.input_range.init_std_alpha = 3.0
    rpu.pre_post.input_range.init_from_data = 100
    analog = convert_to_analog(copy.deepcopy(model), rpu)
    opt_cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[cfg.optimizer]
    opt = AnalogOptimizer(opt_cls, analog.analog_layers, analog.parameters(), lr=cfg.lr)
    loader = torch.utils.data.DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    sched = make_schedule(opt, cfg, cfg.epochs * len(loader))
    analog.train()
    for _ in range(cfg.epochs):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(analog(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    plain = set(model.state_dict())
    state = {k: v for k, v in analog.state_dict().items() if k in plain}
    ranges = {name: float(layer.input_range.detach().abs().max()) for name, layer in analog.named_analog_layers()}
    return {"state": state, "ranges": ranges}, aihwkit_lightning.__version__


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    p.add_argument("--chips-per-step", type=int, default=8)
    p.add_argument("--range-images", type=int, default=1024)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {ARMS + ['aihwkit']}")
    p.add_argument("--aihwkit-noise", type=float, default=0.05, help="aihwkit arm: per-channel weight noise std")
    p.add_argument("--resume", action="store_true",
                   help="keep the arms the result file already holds for the same setup (each arm records its commit)")
    add_run_args(p, threads=1)
    args = p.parse_args()
    apply_threads(args)
    chosen = args.arms.split(",")
    unknown = sorted(set(chosen) - set(ARMS) - {"aihwkit"})
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {ARMS + ['aihwkit']}")
    suffix = "" if chosen == ARMS else "_" + "_".join(chosen)
    out = args.out or (Path(__file__).parent / "results" /
                       f"periphery_training_{args.dataset}_{args.model}_s{args.seed}{suffix}.json")
    res: dict[str, Any] = {"setup": {**portable(vars(args)), **record()}, "arms": {}}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        differs = sorted(k for k in SETUP_KEYS if old["setup"].get(k) != res["setup"].get(k))
        if differs:
            p.error(f"--resume: {out} was measured with other settings ({', '.join(differs)})")
        res["arms"] = {k: v for k, v in old["arms"].items() if k in chosen}
        print(f"resumed {sorted(res['arms'])} from {portable(out)}", flush=True)
    data, test = benchmark_data(args)
    base = TrainConfig(epochs=args.epochs, noise_aware=True, chips_per_step=args.chips_per_step, seed=args.seed)
    arms = {"without": (IDEAL, base), "with": (DEPLOY, base),
            "learned": (DEPLOY, dataclasses.replace(base, learn_input_ranges=True, input_range_decay=1e-4,
                                                     weight_clip=2.5)),
            "aihwkit": (DEPLOY, base)}
    for name in chosen:
        if name in res["arms"]:
            continue
        variation, cfg = arms[name]
        torch.manual_seed(args.seed)
        net = build_network(args, data)
        extra: dict[str, Any] = {}
        t0 = time.perf_counter()
        if name == "aihwkit":
            trained, extra["version"] = train_aihwkit(net, data, base, args.aihwkit_noise)
            seconds = time.perf_counter() - t0
            net.load_state_dict(trained["state"])
            model = cn.analogize(net, DEPLOY, inplace=True)
            for layer_name, layer in cn.analog_layers(model).items():
                layer.input_range = trained["ranges"][layer_name]
        else:
            model = cn.analogize(net, variation, inplace=True)
            if variation.needs_input_range:
                _ranges(model, data, args.range_images, before_training=True)
            train(model, data.train, data.val, cfg, progress=args.progress, stage=name)
            seconds = time.perf_counter() - t0
            cn.set_variation(model, DEPLOY)
            if not cfg.learn_input_ranges:  # post-training calibration of the trained network's ranges
                _ranges(model, data, args.range_images)
        r = cn.monte_carlo(model, test, n_chips=args.chips, seed=0, progress=args.progress, desc=name)
        res["arms"][name] = {"mean": r.mean, "std": r.std, "p5": r.p5, "min": r.min, "seconds": seconds,
                             "clean": cn.clean_accuracy(model, test), "accuracies": r.accuracies,
                             "commit": res["setup"]["git"], **extra}
        print(f"{name}: {100 * r.mean:.2f}% (p5 {100 * r.p5:.2f}%)", flush=True)
        out.write_text(json.dumps(res, indent=1))
    write_result(out, res, table)


if __name__ == "__main__":
    main()
