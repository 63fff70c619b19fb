"""The default job on an idle and on a busy machine, side by side in one run.

Runs ``python -m correctnet.train`` (default settings, its own run directory in a temporary folder) ``--reps``
times idle and ``--reps`` times while ``--loops`` busy-loop processes (pure Python ``while True``) keep the cores
busy, alternating idle and busy so that a drift of the machine's speed hits both; the busy loops start
``--warmup`` seconds before each busy run. Prints the wall seconds of every run, the medians and their ratio
(busy / idle), and checks that every run printed the same summary table (the numbers do not depend on the load).
The jobs use their default ``threads=auto`` (one torch thread; ``OMP_NUM_THREADS`` is removed from their
environment) and ``evaluation.workers=auto``; this script itself does no torch work and records one thread.

    python experiments/busy_machine.py --reps 2 --out experiments/results/busy_machine_digits.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import os
import time
from pathlib import Path

import torch

from common import REPO, machine_line, record

BUSY = "while True:\n    pass\n"


def run_job(out: Path) -> tuple[float, str]:
    """Wall seconds of one default job and its summary table (the lines from 'stage' to 'compensation')."""
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-m", "correctnet.train", f"hydra.run.dir={out}"], cwd=REPO,
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"the default job failed:\n{r.stderr[-2000:]}")
    lines = r.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("stage"))
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("compensation"))
    return wall, "\n".join(lines[start:end + 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=2, help="runs per condition")
    p.add_argument("--loops", type=int, default=2, help="busy-loop processes in the busy condition")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds the busy loops run before a busy job starts")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    setup = record(args)
    walls: dict[str, list[float]] = {"idle": [], "busy": []}
    tables = set()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for cond in ("idle", "busy"):
                loops = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.loops if cond == "busy" else 0)]
                try:
                    time.sleep(args.warmup if loops else 0)
                    wall, table = run_job(Path(tmp) / f"{cond}{rep}")
                finally:
                    for proc in loops:
                        proc.kill()
                        proc.wait()
                walls[cond].append(wall)
                tables.add(table)
                print(f"{cond} run {rep + 1}: {wall:.1f} s", flush=True)
    idle, busy = statistics.median(walls["idle"]), statistics.median(walls["busy"])
    print(f"median idle {idle:.1f} s, busy ({args.loops} busy loops) {busy:.1f} s: {busy / idle:.2f}x; "
          f"same table in every run: {len(tables) == 1}")
    print(machine_line(setup))
    if args.out:
        args.out.write_text(json.dumps({"setup": setup, "walls": walls, "median_idle": idle, "median_busy": busy,
                                        "ratio": busy / idle, "same_table": len(tables) == 1,
                                        "table": sorted(tables)}, indent=2))


if __name__ == "__main__":
    main()
