"""Speed of Monte-Carlo chips spread over forked worker processes (``monte_carlo(workers=N)``), side by side.

Trains the digits default job's CorrectNet network in-process (LeNet-5, noise-aware + jointly trained output
compensators, 15 epochs), then times, in one process and alternating, the per-chip calibration + evaluation
of ``--chips`` chips (the default job's calibrated stage: 60 steps, 1,000 images, chip-ensemble teacher) and
the plain evaluation, with ``workers`` = 1 and each of ``--workers``; checks the per-chip accuracies are
identical. Prints a table; ``--out`` writes JSON with the provenance (command, commit, versions, machine,
threads). Run it on an otherwise idle machine: workers only help where cores are free.

    OMP_NUM_THREADS=1 python experiments/chip_workers.py --threads 1 --out experiments/results/chip_workers_digits.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import correctnet as cn
from common import add_run_args, apply_threads, machine_line, record
from correctnet.calibration import CalibrationConfig, ChipCalibrator, calibration_images
from correctnet.compensation import attach_compensation
from correctnet.data import load_dataset
from correctnet.training import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chips", type=int, default=40)
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--repeats", type=int, default=2)
    add_run_args(p, threads=1)
    args = p.parse_args()
    apply_threads(args)
    data = load_dataset("digits", val_fraction=0.2, seed=0)
    torch.manual_seed(0)
    model = cn.analogize(cn.build_model("lenet5", data.input_shape, data.num_classes), cn.LogNormal(0.5))
    attach_compensation(model, "all", rank=4, seed=0)
    train(model, data.train, data.val, TrainConfig(epochs=15, noise_aware=True, seed=0), progress=False)
    images = calibration_images(data.train, 1000, 0)
    cfg = CalibrationConfig(start="trained", teacher="ensemble")

    def timed(workers: int, calibrated: bool) -> tuple[float, list[float]]:
        cal = ChipCalibrator(model, images, cfg) if calibrated else None
        t0 = time.perf_counter()
        r = cn.monte_carlo(model, data.test, n_chips=args.chips, progress=False, calibrate=cal, workers=workers)
        return time.perf_counter() - t0, r.accuracies

    rows = []
    for calibrated in (True, False):
        times: dict[int, list[float]] = {w: [] for w in [1, *args.workers]}
        accs: dict[int, list[float]] = {}
        for _ in range(args.repeats):
            for w in times:  # alternating: drifts of the machine's load hit every arm alike
                s, a = timed(w, calibrated)
                times[w].append(s)
                accs[w] = a
        base = min(times[1])
        for w, ts in times.items():
            rows.append({"calibrated": calibrated, "workers": w, "seconds": min(ts), "seconds_all": ts,
                         "per_chip_s": min(ts) / args.chips, "speedup": base / min(ts),
                         "identical": accs[w] == accs[1]})
    setup = record(args)
    print(f"chips over worker processes, digits LeNet-5 + compensators, {args.chips} chips "
          f"(best of {args.repeats}); {machine_line(setup)}")
    print("| stage | workers | s | s/chip | speed-up vs 1 | per-chip accuracies identical |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'calibrated + evaluated' if r['calibrated'] else 'evaluated'} | {r['workers']} | {r['seconds']:.2f} "
              f"| {r['per_chip_s']:.3f} | {r['speedup']:.2f}x | {r['identical']} |")
    if args.out:
        args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
