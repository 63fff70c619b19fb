"""Benchmark: the cost of a noise-aware training step through the whole periphery model, against plain training.

One process, the arms interleaved (round r runs ``--steps`` steps of every arm in turn, after ``--warmup``
steps each), ``--model`` (default LeNet-5: ``cn.build_model("lenet5", (1, 28, 28), 10)``) on random 28x28 inputs, batch
``--batch-size``, Adam, cross-entropy; a step is forward + backward + optimizer step (+ the periphery
constraints where the arm has them):

* ``plain``: the plain PyTorch model: the reference of every ratio;
* ``noise_aware_lognormal``: noise-aware training with CorrectNet's log-normal model (sigma 0.5), no converters;
* ``device_only``: the periphery arm's device model without converters (programming noise and levels);
* ``converters_only``: its converters and output noise alone (``sigma=0``, continuous levels: only the mapping);
* ``periphery``: noise-aware training under ``RRAM(sigma=1, levels=16, dac_bits=8, dac_range=1.0, adc_bits=8,
  adc_range=12, output_noise=0.005)`` (input ranges calibrated on random data): programming noise (Wan 2022),
  16 levels, fixed-range DAC and ADC with clipping and rounding, output noise, a fresh chip every step;
* ``periphery_read``: the same plus read noise (``read_noise=0.01``, one more weight-sized draw per layer and step);
* ``periphery_learned``: the same plus learned input ranges (``correctnet.periphery.LearnedInputRanges``,
  decay term) and the weight clip (``clip_weights``, 2.5 std per layer) after every step.

Seconds per step: the median over rounds of (round time / steps). Random weights and labels: the time of a
step does not depend on their values.

    python experiments/periphery_speed.py --threads 1
    python experiments/periphery_speed.py --threads 1 --model vgg11 --steps 10

Results: ``experiments/results/periphery_speed_cpu.{json,md}`` (other models: ``periphery_speed_cpu_<model>``).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import correctnet as cn
from correctnet.devices import RRAM
from correctnet.periphery import LearnedInputRanges, clip_weights
from common import add_run_args, apply_threads, machine_line, record, write_result

PERIPHERY = dict(sigma=1.0, levels=16, dac_bits=8, dac_range=1.0, adc_bits=8, adc_range=12.0, output_noise=0.005)
READ_NOISE = 0.01
MODEL_KWARGS: dict[str, dict[str, Any]] = {"vgg11": {"width": 0.25}}  # as conf/model/vgg11.yaml


def make_arm(name: str, batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int,
             model_name: str = "lenet5") -> Callable[[int], None]:
    """``step(i)``: one training step of arm ``name`` on batch ``i`` (modulo the batches); contexts stay open."""
    torch.manual_seed(seed)
    model = cn.build_model(model_name, (1, 28, 28), 10, **MODEL_KWARGS.get(model_name, {}))
    learned: LearnedInputRanges | None = None
    stack = contextlib.ExitStack()
    if name != "plain":
        variation = VARIATIONS[name]()
        model = cn.analogize(model, variation)
        if variation.needs_input_range:
            cn.calibrate_input_ranges(model, [x for x, _ in batches[:4]], batch_statistics=True)  # as before training
        if name == "periphery_learned":
            learned = LearnedInputRanges(model)
            stack.enter_context(learned.installed())
        stack.enter_context(cn.noise_aware(model, seed))
    params: Any = list(model.parameters())
    if learned is not None:
        params = [{"params": params}, {"params": learned.parameters(), "weight_decay": 0.0}]
    opt = torch.optim.Adam(params, lr=1e-3)
    model.train()

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(model(x), y)
        if learned is not None:
            loss = loss + 1e-4 * learned.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if learned is not None:
            clip_weights(model, 2.5)
            learned.constrain()

    step.close = stack.close  # type: ignore[attr-defined]
    return step


CONVERTERS = ("dac_bits", "dac_range", "adc_bits", "adc_range", "output_noise")
VARIATIONS: dict[str, Callable[[], Any]] = {
    "noise_aware_lognormal": lambda: cn.make_variation("lognormal", sigma=0.5),
    "device_only": lambda: RRAM(**{k: v for k, v in PERIPHERY.items() if k not in CONVERTERS}),  # type: ignore[arg-type]
    "converters_only": lambda: RRAM(sigma=0.0, **{k: PERIPHERY[k] for k in CONVERTERS}),  # type: ignore[arg-type]
    "periphery": lambda: RRAM(**PERIPHERY),  # type: ignore[arg-type]
    "periphery_read": lambda: RRAM(**PERIPHERY, read_noise=READ_NOISE),  # type: ignore[arg-type]
    "periphery_learned": lambda: RRAM(**PERIPHERY),  # type: ignore[arg-type]
}
ARMS = ("plain", *VARIATIONS)


def render(result: dict[str, Any]) -> str:
    s = result["setup"]
    a = s["args"]
    lines = [f"Noise-aware training through the periphery vs plain training, {a.get('model', 'lenet5')} on random 1x28x28 inputs, "
             f"batch {a['batch_size']}, Adam; {machine_line(s)}", "",
             f"Command: `{s['command']}`", "",
             f"Seconds per training step (forward + backward + optimizer step), median over {a['rounds']} "
             f"interleaved rounds of {a['steps']} steps per arm after {a['warmup']} warm-up steps:", "",
             "| arm | s per step | x plain |", "|---|---|---|"]
    base = result["rows"]["plain"]["s_per_step"]
    for arm, row in result["rows"].items():
        lines.append(f"| {arm} | {row['s_per_step']:.4f} | {row['s_per_step'] / base:.2f} |")
    lines += ["", f"periphery: `RRAM({', '.join(f'{k}={v}' for k, v in PERIPHERY.items())})`; device_only: without "
              f"the converters ({', '.join(CONVERTERS)}); converters_only: sigma=0 and those alone; "
              f"periphery_read adds read_noise={READ_NOISE}; periphery_learned adds learned input ranges (decay 1e-4) and a 2.5-std weight clip per step. "
              "Ratios are side by side in one process; absolute seconds depend on the load of the machine.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="steps per arm per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="lenet5", help="a reference model (cn.build_model) on 1x28x28 inputs")
    add_run_args(p, threads=1)
    args = p.parse_args()
    apply_threads(args)
    g = torch.Generator().manual_seed(args.seed)
    batches = [(torch.randn(args.batch_size, 1, 28, 28, generator=g), torch.randint(0, 10, (args.batch_size,), generator=g))
               for _ in range(8)]
    arms = {name: make_arm(name, batches, args.seed, args.model) for name in ARMS}
    for step in arms.values():
        for i in range(args.warmup):
            step(i)
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    for r in range(args.rounds):
        for name, step in arms.items():
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(i)
            times[name].append((time.perf_counter() - t0) / args.steps)
    for step in arms.values():
        step.close()  # type: ignore[attr-defined]
    rows = {name: {"s_per_step": statistics.median(t), "rounds": t} for name, t in times.items()}
    suffix = "" if args.model == "lenet5" else f"_{args.model}"
    out = args.out or Path(__file__).parent / "results" / f"periphery_speed_cpu{suffix}.json"
    write_result(out, {"setup": record(args), "rows": rows}, render)


if __name__ == "__main__":
    main()
