"""The training loop: optimizer, LR schedule, progress bar, per-epoch metrics, optional noise-aware training.

Noise-aware (hardware-aware) training, the standard defence (Joshi et al., Nat. Commun. 2020): every
forward of every analog layer draws fresh variations, and gradients reach the nominal weights through
the perturbed ones. Validation accuracy is measured on the nominal weights.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .analog import analog_layers, noise_aware, nominal
from .errors import ConfigError, CorrectNetError, is_int, is_number, require
from .evaluate import Data, clean_accuracy, iter_batches
from .seeding import Stream, chip_seed

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "none")


class TrainingDivergedError(CorrectNetError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. ``lr`` is the peak learning rate; ``epochs`` full passes over the data."""

    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    noise_aware: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, accepted: str) -> None:
            require(ok, f"training.{key}", accepted, getattr(self, key))

        need(is_int(self.epochs) and self.epochs >= 1, "epochs", "an integer >= 1")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {list(OPTIMIZERS)}")
        need(is_number(self.lr) and self.lr > 0, "lr", "a number > 0")
        need(is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(is_number(self.momentum) and 0 <= self.momentum < 1, "momentum", "a number in [0, 1)")
        need(self.schedule in SCHEDULES, "schedule", f"one of {list(SCHEDULES)}")
        need(isinstance(self.noise_aware, bool), "noise_aware", "true or false")
        need(is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0")


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule over ``steps`` optimizer steps: cosine to 0, step (x0.1 at 50% and 75%), or constant."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[steps // 2, 3 * steps // 4], gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def train(
    model: nn.Module,
    train_data: Data,
    val_data: Data | None,
    cfg: TrainConfig,
    *,
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
    progress: bool = True,
    stage: str = "training",
) -> list[dict[str, Any]]:
    """Train ``model`` in place on its current device; returns one metrics dict per epoch.

    ``regularizer(model)`` (optional) is added to the cross-entropy loss. With ``cfg.noise_aware`` the
    model must have analog layers. Raises :class:`TrainingDivergedError` on a non-finite loss.
    """
    if cfg.noise_aware and not analog_layers(model):
        raise ConfigError("training.noise_aware=true needs a model with analog layers (correctnet.analogize)")
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    if isinstance(train_data, DataLoader):
        steps_per_epoch = len(train_data)
    else:
        n = len(train_data.tensors[0] if isinstance(train_data, TensorDataset) else train_data[0])
        steps_per_epoch = math.ceil(n / cfg.batch_size)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    sched = make_schedule(opt, cfg, cfg.epochs * steps_per_epoch)
    history: list[dict[str, Any]] = []
    ctx = noise_aware(model, chip_seed(Stream.TRAIN, cfg.seed, 0)) if cfg.noise_aware else nominal(model)
    attach = getattr(regularizer, "attach", None)
    if attach is not None:
        attach(model)
    with ctx, contextlib.ExitStack() as cleanup:
        if attach is not None:
            cleanup.callback(regularizer.detach)  # type: ignore[union-attr]
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            bar = tqdm(iter_batches(train_data, cfg.batch_size, device, generator=shuffle), total=steps_per_epoch,
                       desc=f"{stage} {epoch}/{cfg.epochs}", disable=not progress, leave=False, dynamic_ncols=True)
            for step, (x, y) in enumerate(bar):
                out = model(x)
                loss = F.cross_entropy(out, y)
                if regularizer is not None:
                    loss = loss + regularizer(model)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"{stage}: loss became {loss.item()} at epoch {epoch}, step {step}; lower training.lr "
                        f"or check the data")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(y)
                correct += (out.argmax(1) == y).sum().item()
                seen += len(y)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
            rec: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            if val_data is not None:
                rec["val_accuracy"] = clean_accuracy(model, val_data)
            history.append(rec)
            log.info("%s epoch %d/%d: loss %.4f, train acc %.2f%%%s (%.1fs)", stage, epoch, cfg.epochs,
                     rec["train_loss"], 100 * rec["train_accuracy"],
                     f", val acc {100 * rec['val_accuracy']:.2f}%" if "val_accuracy" in rec else "", rec["seconds"])
    model.eval()
    return history


__all__ = ["TrainConfig", "TrainingDivergedError", "train"]
