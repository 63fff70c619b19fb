"""Data-parallel noise-aware training and a chip-sharded Monte-Carlo evaluation on torch.distributed.

Every rank trains the same network on its share of each global batch (:mod:`correctnet.distributed`), then
evaluates its contiguous range of the ``--chips`` evaluation chips (``monte_carlo(first_chip=...)``); rank 0
gathers the per-chip accuracies, which are exactly those of one process evaluating all the chips, and writes them
with the training history to ``--out`` (JSON). Launch with torchrun (gloo on CPU, NCCL on CUDA)::

    torchrun --nproc-per-node 2 experiments/ddp_train.py --dataset digits --epochs 3 --out /tmp/ddp.json

Without torchrun it runs as one process. On Slurm, one task per node::

    srun torchrun --nnodes $SLURM_NNODES --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint $(scontrol show hostnames $SLURM_NODELIST | head -1):29500 experiments/ddp_train.py ...
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import correctnet as cn
from correctnet.data import load_dataset
from correctnet.distributed import init_from_env
from correctnet.training import TrainConfig, train
from common import portable, record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch (split over ranks)")
    p.add_argument("--chips-per-step", type=int, default=1, help="per rank")
    p.add_argument("--chips", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rank, ranks = init_from_env()
    data = load_dataset(args.dataset, None, val_fraction=0.1, seed=args.seed)
    torch.manual_seed(args.seed)
    model = cn.analogize(cn.build_model(args.model, data.input_shape, data.num_classes),
                         cn.make_variation("lognormal", sigma=args.sigma), inplace=True)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, noise_aware=True,
                      chips_per_step=args.chips_per_step, seed=args.seed)
    t0 = time.perf_counter()
    history = train(model, data.train, data.val, cfg, progress=False)
    seconds = time.perf_counter() - t0
    first, stop = rank * args.chips // ranks, (rank + 1) * args.chips // ranks  # this rank's chips
    mine = cn.monte_carlo(model, data.test, n_chips=stop - first, first_chip=first, seed=0, progress=False)
    shards: list[Any] = [None] * ranks
    if ranks > 1:
        dist.all_gather_object(shards, mine.accuracies)
    else:
        shards = [mine.accuracies]
    if rank == 0:
        accuracies = [a for s in shards for a in s]
        mean = sum(accuracies) / len(accuracies)
        print(f"{ranks} rank(s): training {seconds:.1f} s, val acc {100 * history[-1]['val_accuracy']:.2f}%, "
              f"chip mean {100 * mean:.2f}% over {len(accuracies)} chips", flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps({"setup": {**portable(vars(args)), **record(), "ranks": ranks},
                                            "history": history, "accuracies": accuracies, "mean": mean}, indent=1))
    if ranks > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
