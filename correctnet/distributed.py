"""Data-parallel training over ``torch.distributed`` (gloo on CPU, NCCL on CUDA), launched with ``torchrun``.

:func:`correctnet.train` is data-parallel whenever a process group is initialized with more than one rank:

* ``TrainConfig.batch_size`` stays the *global* batch: every rank walks the same shuffled order (same seed) and
  takes its share of each global batch (``tensor_split``: nearly equal parts), so a run means the same thing on
  1 or N processes; plain training on N ranks matches one process up to float summation order.
* gradients: one flat ``all_reduce`` per step of every rank's gradient weighted by its share of the batch,
  divided by the batch (parameters a step does not use, e.g. compensators switched off in supernet training,
  count as zero gradient; ``DistributedDataParallel``'s reducer would need ``find_unused_parameters`` for them).
  The loss is reduced in the same call, so a non-finite loss stops every rank at the same step.
* noise-aware chips: rank ``r`` draws its ``chips_per_step`` chips per step from its own stream
  (``chip_seed(Stream.TRAIN, seed, r)``; rank 0 is the one-process stream), so a run depends on the seed and the
  number of ranks, never on scheduling.
* buffers (BatchNorm running statistics): averaged over ranks after every epoch, so every rank holds the same model.
* epoch metrics (loss, training accuracy) are over the global batch on every rank; resume snapshots are per rank.

Launch (one node, 2 CPU processes)::

    torchrun --nproc-per-node 2 experiments/ddp_train.py --epochs 3

A process group is the caller's: :func:`init_from_env` opens one from torchrun's environment.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_parallel() -> bool:
    """True when training runs on more than one rank."""
    return world()[1] > 1


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Open the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    ``backend``: ``"gloo"`` or ``"nccl"`` (default: NCCL when CUDA is available, else gloo). Without
    ``WORLD_SIZE`` in the environment (a plain ``python`` run) nothing is opened. Returns ``(rank, world_size)``.
    """
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return world()
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return world()


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a global batch ``x [N, ...]``, ``y [N, ...]`` (``tensor_split`` over ranks)."""
    rank, size = world()
    if size == 1:
        return x, y
    return x.tensor_split(size)[rank], y.tensor_split(size)[rank]


def reduce_step(params: Iterable[nn.Parameter], loss: torch.Tensor, n: int, total: int) -> torch.Tensor:
    """Average the gradients of ``params`` over ranks, each rank weighted by its ``n`` of the ``total`` samples of
    the global batch; returns the global loss (a 0-dim tensor). One ``all_reduce`` of one flat buffer. A rank
    with an empty share passes ``n=0`` (and any finite ``loss``) without a backward: it adds nothing."""
    params = [p for p in params if p.requires_grad]
    device = loss.device
    parts = [(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device, dtype=p.dtype))
             for p in params]
    # a NaN or inf loss (or gradient) of one rank reaches every rank through the sum
    flat = torch.cat([*(g.to(torch.float32) for g in parts), loss.detach().reshape(1).to(torch.float32)]) * n
    dist.all_reduce(flat)
    flat /= total
    offset = 0
    for p in params:
        k = p.numel()
        g = flat[offset:offset + k].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += k
    return flat[-1]


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over ranks (float64; the values themselves when not parallel)."""
    if not is_parallel():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def sync_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over ranks; other buffers from rank 0."""
    if not is_parallel():
        return
    size = world()[1]
    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b /= size
        else:
            dist.broadcast(b, 0)


def broadcast_parameters(model: nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers."""
    if not is_parallel():
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, 0)


__all__ = ["broadcast_parameters", "init_from_env", "is_parallel", "reduce_step", "shard", "sum_over_ranks",
           "sync_buffers", "world"]
