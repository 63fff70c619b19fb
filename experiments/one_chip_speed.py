"""Benchmark: one programmed chip's forward against a clean forward, with and without the static-weight cache.

In "chip" mode without read noise and without gradients, a layer's chip weights (``w * exp(sigma * eps)``) are
computed once per chip and reused while the nominal weight is unchanged. This measures what that buys on two
real-client sizes, side by side in one process, at each batch size:

* ``clean``: the plain model, ``eval()`` + ``no_grad``: the reference of every ratio;
* ``chip``: the analog model under one programmed chip (``correctnet.chip``), same inputs: repeated forwards
  of one chip, the cache warm after the first;
* ``chip_nocache``: the same with the cache emptied before every layer's forward (each forward recomputes
  the chip weights: the behaviour before the cache);
* ``mc``: ``monte_carlo`` over ``--chips`` chips (one by one) of ``--samples`` inputs in batches of B, seconds
  per chip, against a clean pass over the same inputs (programming each chip included).

Models: a ResNet-18 (torchvision's layout: BasicBlocks [2, 2, 2, 2], widths 64-512, 11.2M parameters) on
3x32x32 images, and a BERT-small classifier (transformers ``BertForSequenceClassification``: 4 layers, hidden 512,
8 heads, intermediate 2048) on sequences of ``--seq-len`` tokens. Random initialisation: the time of a forward
does not depend on the weights' values. Log-normal sigma 0.5, no read noise.

    python experiments/one_chip_speed.py --threads 2

Results: ``experiments/results/one_chip_speed_cpu.{json,md}``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import correctnet as cn
from correctnet.reads import check_reads_once
from common import add_run_args, apply_threads, machine_line, record, write_result


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def bert_small() -> nn.Module:
    import transformers
    cfg = transformers.BertConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                  intermediate_size=2048, num_labels=10)
    return transformers.BertForSequenceClassification(cfg)


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Seconds per call: the median of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(name: str, plain: nn.Module, make_input: Callable[[int], torch.Tensor], args: argparse.Namespace,
            ) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    plain.eval()
    model = cn.analogize(plain, cn.LogNormal(0.5)).eval()
    layers = cn.analog_layers(model).values()
    check_reads_once(model, make_input(2))  # monte_carlo's one-time read check, outside the timings
    rows = []
    for b in args.batch_sizes:
        x = make_input(b)
        reps = max(3, args.reps * 8 // b) if b < 64 else args.reps
        with torch.no_grad():
            clean = timed(lambda: plain(x), reps)
            with cn.chip(model, 1):
                chip = timed(lambda: model(x), reps)
                hooks = [l.register_forward_pre_hook(lambda m, a: m._chip_cache.clear()) for l in layers]
                nocache = timed(lambda: model(x), reps)
                for h in hooks:
                    h.remove()
        xs = make_input(args.samples)
        data = (xs, torch.zeros(len(xs), dtype=torch.long))

        def clean_pass() -> None:
            with torch.no_grad():
                for i in range(0, len(xs), b):
                    plain(xs[i:i + b])

        clean_all = timed(clean_pass, 1)
        t0 = time.perf_counter()
        cn.monte_carlo(model, data, n_chips=args.chips, batch_size=b, progress=False, chips_per_pass=1)
        mc = (time.perf_counter() - t0) / args.chips
        rows.append({"model": name, "batch": b, "clean_s": clean, "chip_s": chip, "chip_nocache_s": nocache,
                     "chip_ratio": chip / clean, "chip_nocache_ratio": nocache / clean, "mc_per_chip_s": mc,
                     "clean_pass_s": clean_all, "mc_ratio": mc / clean_all, "samples": args.samples,
                     "chips": args.chips})
        print(f"{name:10s} B={b:4d}: clean {1e3 * clean:8.2f} ms, chip {chip / clean:.2f}x, "
              f"chip without cache {nocache / clean:.2f}x; monte_carlo {mc / clean_all:.2f}x a clean pass "
              f"per chip ({args.samples} inputs)", flush=True)
    return rows


def render(result: dict[str, Any]) -> str:
    lines = ["# One programmed chip vs a clean forward\n", f"{machine_line(result['setup'])}\n",
             f"Command: `{result['setup']['command']}`\n",
             "| model | batch | clean (ms) | chip / clean | chip without cache / clean | monte_carlo per chip / clean pass |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['batch']} | {1e3 * r['clean_s']:.2f} | {r['chip_ratio']:.2f} | "
                     f"{r['chip_nocache_ratio']:.2f} | {r['mc_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "bert_small"], choices=["resnet18", "bert_small"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 250])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chips", type=int, default=5)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--seq-len", type=int, default=32)
    add_run_args(p, threads=2)
    args = p.parse_args()
    apply_threads(args)
    rows: list[dict[str, Any]] = []
    if "resnet18" in args.models:
        rows += measure("resnet18", ResNet18(), lambda b: torch.randn(b, 3, 32, 32), args)
    if "bert_small" in args.models:
        rows += measure("bert_small", bert_small(), lambda b: torch.randint(0, 30000, (b, args.seq_len)), args)
    out = args.out or Path(__file__).parent / "results" / "one_chip_speed_cpu.json"
    write_result(out, {"setup": record(args), "rows": rows}, render)


if __name__ == "__main__":
    main()
