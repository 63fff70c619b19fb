"""The training loop: optimizer, LR schedule, progress bar, per-epoch metrics, optional noise-aware training.

Noise-aware (hardware-aware) training, the standard defence (Joshi et al., Nat. Commun. 2020): every
forward of every analog layer draws fresh variations, and gradients reach the nominal weights through
the perturbed ones. Validation accuracy is measured on the nominal weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .analog import analog_layers, noise_aware, nominal
from .distributed import broadcast_parameters, reduce_step, shard, sum_over_ranks, sync_buffers, world
from .errors import ConfigError, CorrectNetError, is_int, is_number, require
from .evaluate import clean_accuracy
from .periphery import LearnedInputRanges, clip_weights
from .progress import CONSOLE, Pace, bar_disabled
from .reads import check_reads_once
from .tensors import PRECISIONS, Data, OutputFn, forward_precision, iter_batches, logits_of
from .variation import VariationModel
from .resume import ResumeError, ResumeStore
from .seeding import Stream, chip_seed

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "none")


class TrainingDivergedError(CorrectNetError):
    """The loss, a parameter or an output became NaN or infinite; the message names the stage and step."""


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. ``lr`` is the peak learning rate; ``epochs`` full passes over the data."""

    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    noise_aware: bool = False
    chips_per_step: int = 1    # noise-aware only: fresh chips per step, each on its share of the batch
    distill: float = 0.0       # weight of the KD loss to a teacher's logits (``train(teacher=...)``); 1 - distill: CE
    temperature: float = 1.0   # KD softmax temperature
    noise_sigma: float | None = None  # noise-aware only: the sigma the training chips are drawn at (None: each layer's)
    noise_scale: float = 1.0   # noise-aware only: ... or each layer's sigma times this (noise_sigma, when set, wins)
    weight_clip: float | None = None  # after every step: clip each analog weight to +-weight_clip x its std (None: off)
    weight_clip_per_channel: bool = False  # weight_clip: the std (and the bound) per output channel, not per layer
    learn_input_ranges: bool = False  # noise-aware only: train the calibrated range of each fixed-range DAC (PACT)
    input_range_decay: float = 0.0    # learned ranges: adds input_range_decay x sum of the ranges to the loss
    precision: str = "float32"  # float32 | bfloat16 | float16: autocast of the forward (chip draws stay float32)
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
        need(is_int(self.chips_per_step) and self.chips_per_step >= 1, "chips_per_step", "an integer >= 1")
        need(is_number(self.distill) and 0 <= self.distill <= 1, "distill", "a number in [0, 1]")
        need(is_number(self.temperature) and self.temperature > 0, "temperature", "a number > 0")
        need(self.noise_sigma is None or (is_number(self.noise_sigma) and 0 <= self.noise_sigma < math.inf),
             "noise_sigma", "null or a number >= 0")
        need(is_number(self.noise_scale) and 0 < self.noise_scale < math.inf, "noise_scale", "a number > 0")
        need(self.weight_clip is None or (is_number(self.weight_clip) and self.weight_clip > 0), "weight_clip",
             "null (off) or a number > 0 (the bound in standard deviations of each layer's weight)")
        need(isinstance(self.weight_clip_per_channel, bool), "weight_clip_per_channel", "true or false")
        need(isinstance(self.learn_input_ranges, bool), "learn_input_ranges", "true or false")
        need(not self.learn_input_ranges or self.noise_aware is True, "learn_input_ranges",
             "false unless training.noise_aware=true (the converters act only in noise-aware training)")
        need(is_number(self.input_range_decay) and self.input_range_decay >= 0, "input_range_decay", "a number >= 0")
        need(self.input_range_decay == 0 or self.learn_input_ranges is True, "input_range_decay",
             "0 unless training.learn_input_ranges=true")
        need(self.precision in PRECISIONS, "precision", f"one of {list(PRECISIONS)}")
        need(is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0")


def training_variation(variation: VariationModel, cfg: TrainConfig) -> VariationModel:
    """The variation noise-aware training draws its chips from, for a layer deployed with ``variation``: the same
    model at ``cfg.noise_sigma``, or at ``cfg.noise_scale`` times its sigma (``variation`` itself by default)."""
    if cfg.noise_sigma is None and cfg.noise_scale == 1.0:
        return variation
    sigma = cfg.noise_sigma if cfg.noise_sigma is not None else cfg.noise_scale * variation.sigma
    if not dataclasses.is_dataclass(variation):
        raise ConfigError(f"training.noise_sigma / noise_scale need a variation model that is a dataclass with a sigma "
                          f"field (dataclasses.replace), got {type(variation).__name__}")
    return dataclasses.replace(variation, sigma=float(sigma))


@contextlib.contextmanager
def _training_variations(model: nn.Module, cfg: TrainConfig) -> Iterator[None]:
    """Each analog layer draws its training chips from :func:`training_variation` inside the block."""
    layers = analog_layers(model) if cfg.noise_aware else {}
    saved = {name: layer.variation for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            layer.variation = training_variation(saved[name], cfg)
        yield
    finally:
        for name, layer in layers.items():
            layer.variation = saved[name]


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


def _rng_state(model: nn.Module, shuffle: torch.Generator | None, device: torch.device,
               regularizer: Any) -> dict[str, Any]:
    """Every random state the rest of training depends on (torch, shuffle, noise generators, regularizer)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "shuffle": shuffle.get_state() if shuffle is not None else None,
                             "noise": {n: l._noise_gen.get_state() for n, l in analog_layers(model).items()
                                       if l._noise_gen is not None}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    vectors = getattr(regularizer, "_vectors", None)  # the spectral regularizer's power-iteration vectors
    if isinstance(vectors, dict):
        state["regularizer"] = {k: v.detach().cpu() for k, v in vectors.items()}
    return state


def _set_rng_state(state: dict[str, Any], model: nn.Module, shuffle: torch.Generator | None, device: torch.device,
                   regularizer: Any) -> None:
    torch.set_rng_state(state["torch"])
    if shuffle is not None and state["shuffle"] is not None:
        shuffle.set_state(state["shuffle"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    layers = analog_layers(model)
    for name, gen_state in state["noise"].items():
        layer = layers[name]
        layer._noise_gen = torch.Generator(device=next(layer.parameters()).device)
        layer._noise_gen.set_state(gen_state)
    vectors = getattr(regularizer, "_vectors", None)
    if isinstance(vectors, dict) and "regularizer" in state:
        vectors.clear()
        vectors.update({k: v.to(device) for k, v in state["regularizer"].items()})


def check_finite_parameters(model: nn.Module, stage: str, where: str) -> None:
    """Raise :class:`TrainingDivergedError` naming ``stage`` and ``where`` if a parameter holds NaN or inf."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDivergedError(f"{stage}: parameters became NaN or infinite {where} ({', '.join(bad[:4])}"
                                    f"{' ...' if len(bad) > 4 else ''}); lower the learning rate or check the data")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on softened logits ``[N, classes]``, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                    reduction="batchmean") * (t * t)


def _teacher_logits(out: Any, output: OutputFn | None) -> torch.Tensor:
    """A teacher's logits: a tensor as it is, any other output as the model's (:func:`logits_of`)."""
    return out if isinstance(out, torch.Tensor) else logits_of(out, output)


def train(
    model: nn.Module,
    train_data: Data,
    val_data: Data | None,
    cfg: TrainConfig,
    *,
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
    progress: bool | None = None,
    stage: str = "training",
    resume: ResumeStore | None = None,
    resume_key: str = "training",
    teacher: Callable[[torch.Tensor], Any] | None = None,
    output: OutputFn | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place on its current device; returns one metrics dict per epoch.

    ``regularizer(model)`` (optional) is added to the cross-entropy loss. With ``cfg.noise_aware`` the
    model must have analog layers; each step draws ``cfg.chips_per_step`` fresh chips and splits the batch
    into that many nearly equal groups, one per chip (1: the whole batch on one chip; ``batch_size``: every
    sample on its own chip). The model must then keep the batch dimension intact up to its last analog
    layer (BatchNorm in training mode still normalizes over the whole batch, as digital hardware would).
    Raises :class:`TrainingDivergedError` naming the stage, epoch and step when the loss or a parameter
    becomes NaN or infinite.

    ``resume``: snapshots go to ``resume.path(resume_key)`` after every epoch and, inside an epoch, at most
    every ``resume.interval_s`` seconds; a snapshot found there at the start is continued from, and
    the result is bit-identical to an uninterrupted run (per-epoch ``seconds`` aside). The caller
    makes sure the snapshot belongs to the same model, data and config (:func:`correctnet.resume.open_store`).

    ``teacher(x) -> logits [N, classes]`` (no gradients needed): with ``cfg.distill > 0`` the loss is
    ``(1 - distill) * CE + distill * KD(teacher)`` (knowledge distillation, Hinton et al.; with noise-aware
    training a clean teacher pulls every sampled chip towards the clean function, Zhou et al., "Noisy Machines",
    2020). The pipeline's teacher is the vanilla reference's clean logits.

    The loss and the training accuracy read the logits ``[N, C]`` in the model's output: a tensor, a tuple's
    first element, a dict's ``"logits"``, a transformers ``ModelOutput``'s ``.logits``, or what
    ``output(raw output)`` returns for any other form (:func:`correctnet.tensors.logits_of`); validation
    accuracy too. The teacher's output is read the same way (a tensor as it is: a teacher returning logits
    needs no ``output``).

    ``on_step(i)`` runs before the forward of global step ``i`` (``(epoch - 1) * steps_per_epoch + step``); the
    pipeline's joint supernet training uses it to switch random compensators
    (:func:`correctnet.placement.evaluator.random_options`). It must depend on ``i`` only (resuming calls it
    from the step the run stopped at).

    Periphery (:mod:`correctnet.periphery`): ``cfg.weight_clip`` clips every analog weight to ``±weight_clip·std``
    (per layer, or per output channel with ``cfg.weight_clip_per_channel``) after every optimizer step;
    ``cfg.learn_input_ranges`` (noise-aware only) trains the calibrated input range of every layer with a
    numeric ``dac_range`` (PACT gradient of the DAC clip; Adam/SGD group without weight decay, plus
    ``cfg.input_range_decay·sum(ranges)`` in the loss) and writes the learned ranges back to
    ``layer.input_range`` as floats when training ends (also on an error). Both are off by default.

    ``cfg.precision``: ``bfloat16`` / ``float16`` run the forward and the loss under ``torch.autocast`` on the
    model's device (matmuls and convolutions in that precision; the parameters, the optimizer and every chip draw
    stay float32, since the analog weights are computed from float32 parameters outside autocast's cast list);
    ``float16`` scales the loss (``torch.amp.GradScaler``), which skips a step whose gradients overflow.

    ``progress``: a bar per epoch on stderr (``None``: only when stderr is a terminal); the stage's pace is logged
    either way (:class:`correctnet.progress.Pace`: an estimate when it is long, a line a minute without a bar).

    Data-parallel (:mod:`correctnet.distributed`): inside a ``torch.distributed`` process group of N > 1 ranks every
    rank calls ``train`` with the same arguments; ``cfg.batch_size`` is the global batch, each rank trains on its
    share, gradients are averaged over ranks every step, rank ``r`` draws its noise-aware chips from stream ``r``,
    and every rank returns the same model and metrics. Only rank 0 shows progress and logs.
    """
    if cfg.distill > 0 and teacher is None:
        raise ConfigError(f"training.distill={cfg.distill} needs a teacher: train(..., teacher=...); in the pipeline "
                          "the vanilla reference (reference=true)")
    if cfg.noise_aware and not analog_layers(model):
        raise ConfigError("training.noise_aware=true needs a model with analog layers (correctnet.analogize)")
    if cfg.weight_clip is not None and not analog_layers(model):
        raise ConfigError("training.weight_clip needs a model with analog layers (correctnet.analogize): it clips "
                          "the analog weights")
    learned = LearnedInputRanges(model) if cfg.learn_input_ranges else None
    device = next(model.parameters()).device
    rank, ranks = world()
    parallel = ranks > 1
    if parallel:
        broadcast_parameters(model)
        resume_key = f"{resume_key}.rank{rank}"
    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    if isinstance(train_data, DataLoader):
        steps_per_epoch = len(train_data)
        order_gen = train_data.generator  # the loader's own shuffle generator (None: no shuffling)
    else:
        n = len(train_data.tensors[0] if isinstance(train_data, TensorDataset) else train_data[0])
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        order_gen = shuffle
    params: Any = [p for p in model.parameters() if p.requires_grad]
    if learned is not None:  # their own group, never weight-decayed (input_range_decay is their decay)
        params = [{"params": params}, {"params": learned.parameters(), "weight_decay": 0.0}]
    opt = make_optimizer(params, cfg)
    autocast = forward_precision(device, cfg.precision, "training.precision")
    reduced = [p for g in opt.param_groups for p in g["params"]]  # what the data-parallel all-reduce averages
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "float16")
    sched = make_schedule(opt, cfg, cfg.epochs * steps_per_epoch)
    history: list[dict[str, Any]] = []
    ctx = (noise_aware(model, chip_seed(Stream.TRAIN, cfg.seed, rank), cfg.chips_per_step) if cfg.noise_aware
           else nominal(model))
    attach = getattr(regularizer, "attach", None)
    if attach is not None:
        attach(model)
    with _training_variations(model, cfg), ctx, contextlib.ExitStack() as cleanup:
        if attach is not None:
            cleanup.callback(regularizer.detach)  # type: ignore[union-attr]
        if learned is not None:
            cleanup.enter_context(learned.installed())
        start_epoch, skip, sums = 1, 0, (0.0, 0, 0)
        epoch_rng = order_gen.get_state() if order_gen is not None else None
        saved = resume.load(resume_key) if resume is not None else None
        if saved is not None:
            assert resume is not None  # saved came from it
            if (saved["epochs"], saved["steps_per_epoch"]) != (cfg.epochs, steps_per_epoch):
                raise ResumeError(f"{resume.path(resume_key)} was written for {saved['epochs']} epochs of "
                                  f"{saved['steps_per_epoch']} steps, not {cfg.epochs} of {steps_per_epoch}")
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            history = saved["history"]
            start_epoch, skip, sums = saved["epoch"] + 1, saved["step"], tuple(saved["sums"])
            epoch_rng = saved["epoch_rng"]
            if learned is not None:
                learned.load(saved["input_ranges"])
            _set_rng_state(saved["rng"], model, order_gen, device, regularizer)
            log.info("%s: resuming from %s at epoch %d, step %d", stage, resume.path(resume_key),
                     start_epoch, skip)

        def snapshot(epoch: int, step: int, sums: tuple[float, int, int]) -> None:
            assert resume is not None
            resume.save(resume_key, {
                "epoch": epoch, "step": step, "sums": list(sums), "epochs": cfg.epochs,
                "steps_per_epoch": steps_per_epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "history": history, "epoch_rng": epoch_rng,
                "rng": _rng_state(model, order_gen, device, regularizer),
                **({"input_ranges": learned.values()} if learned is not None else {})})

        pace: Pace | None = None
        for epoch in range(start_epoch, cfg.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            loss_sum, correct, seen = sums
            if skip:  # mid-epoch resume: replay this epoch's batch order from its start, skip the done steps
                rng_now = order_gen.get_state() if order_gen is not None else None
                if order_gen is not None:
                    order_gen.set_state(epoch_rng)
            else:
                epoch_rng = order_gen.get_state() if order_gen is not None else None
            batches = iter_batches(train_data, cfg.batch_size, device, generator=shuffle)
            if skip:
                batches = itertools.islice(batches, skip, None)
                next_batch = next(batches, None)  # draws the order; then put the saved generator state back
                if order_gen is not None:
                    order_gen.set_state(rng_now)
                batches = itertools.chain([] if next_batch is None else [next_batch], batches)
            bar = tqdm(batches, total=steps_per_epoch, initial=skip, desc=f"{stage} {epoch}/{cfg.epochs}",
                       disable=True if rank > 0 else bar_disabled(progress), leave=False, dynamic_ncols=True)
            if pace is None and rank == 0:
                pace = Pace(stage, cfg.epochs * steps_per_epoch, done=(epoch - 1) * steps_per_epoch + skip,
                            bar=not bar.disable)
            for step, (xb, yb) in enumerate(bar, start=skip):
                x, y = shard(xb, yb) if parallel else (xb, yb)
                if cfg.noise_aware and step == skip and len(x):
                    check_reads_once(model, x)  # once per model: does every analog weight reach the output?
                if on_step is not None:
                    on_step((epoch - 1) * steps_per_epoch + step)
                opt.zero_grad(set_to_none=True)
                if len(x):  # a rank's share of a last batch smaller than the ranks can be empty
                    with autocast():
                        out = logits_of(model(x), output)
                        loss = F.cross_entropy(out.float(), y)
                        if teacher is not None and cfg.distill > 0:
                            with torch.no_grad():
                                target = _teacher_logits(teacher(x), output).float()
                            loss = (1 - cfg.distill) * loss + cfg.distill * distillation_loss(out.float(), target,
                                                                                              cfg.temperature)
                        if regularizer is not None:
                            loss = loss + regularizer(model)
                    if learned is not None and cfg.input_range_decay > 0:
                        loss = loss + cfg.input_range_decay * learned.penalty()
                    if parallel or torch.isfinite(loss):
                        scaler.scale(loss).backward()
                else:
                    out, loss = torch.zeros((0, 1), device=device), torch.zeros((), device=device)
                global_loss = (reduce_step(reduced, loss, len(y), len(yb))
                               if parallel else loss)
                if not torch.isfinite(global_loss):
                    raise TrainingDivergedError(
                        f"{stage}: training loss became {global_loss.item()} at epoch {epoch}, step {step} "
                        f"(of {steps_per_epoch}); lower training.lr or check the data")
                scaler.step(opt)
                scaler.update()
                if cfg.weight_clip is not None:
                    clip_weights(model, cfg.weight_clip, cfg.weight_clip_per_channel)
                if learned is not None:
                    learned.constrain()
                sched.step()
                loss_sum += loss.item() * len(y)
                correct += int((out.argmax(1) == y).sum().item()) if len(y) else 0
                seen += len(y)
                if step % 20 == 0 and seen:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
                if pace is not None:
                    pace.update()
                # in parallel only after each epoch: ranks must snapshot at the same step
                if resume is not None and not parallel and step + 1 < steps_per_epoch and resume.due(resume_key):
                    snapshot(epoch - 1, step + 1, (loss_sum, correct, seen))
            skip, sums = 0, (0.0, 0, 0)
            if parallel:  # the epoch's metrics over the global batches; every rank the same buffers
                total = sum_over_ranks(loss_sum, correct, seen)
                loss_sum, correct, seen = total[0], int(total[1]), int(total[2])
                sync_buffers(model)
            check_finite_parameters(model, stage, f"after epoch {epoch}")
            rec: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            if val_data is not None:
                rec["val_accuracy"] = clean_accuracy(model, val_data, output=output)
            history.append(rec)
            if rank == 0:
                log.info("%s epoch %d/%d: loss %.4f, train acc %.2f%%%s (%.1fs)", stage, epoch, cfg.epochs,
                         rec["train_loss"], 100 * rec["train_accuracy"],
                         f", val acc {100 * rec['val_accuracy']:.2f}%" if "val_accuracy" in rec else "", rec["seconds"])
            if resume is not None:
                snapshot(epoch, 0, sums)
    if history and rank == 0:
        last = history[-1]
        val = f", val acc {100 * last['val_accuracy']:.2f}%" if "val_accuracy" in last else ""
        log.info("%s: %d epochs, train acc %.2f%%%s (%.1f s)", stage, cfg.epochs, 100 * last["train_accuracy"], val,
                 sum(h["seconds"] for h in history), extra=CONSOLE)
    model.eval()
    return history


__all__ = ["TrainConfig", "TrainingDivergedError", "check_finite_parameters", "distillation_loss", "train",
           "training_variation"]
