"""Training compensation modules: chip-agnostic (many sampled chips) and per chip (calibration).

* :func:`train_compensation` trains only the compensators, a freshly programmed chip per batch. The chips
  come from ``Stream.COMPENSATION``, disjoint from evaluation chips by construction. Every other
  parameter is frozen (bit-identical afterwards) and the model stays in ``eval()`` mode, so BatchNorm
  running statistics are not disturbed. The clean network (nominal weights, compensators bypassed) is
  the teacher: ``loss = distill * KD(logits, teacher) + (1 - distill) * CE(logits, labels)``.
* :func:`check_compensation` resets the trained compensators to a no-op if they lower validation accuracy on
  a few search-stream chips (chip-agnostic training can hurt).
* :class:`ChipCalibrator` calibrates one programmed chip, as a real chip allows: run a small unlabeled
  set of training images through it, re-estimate BatchNorm statistics, fine-tune the compensators to
  match the clean network's logits. Pass it to ``monte_carlo(calibrate=...)``: each evaluation chip is
  calibrated independently from the same starting state, and calibration never sees test data.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, cast

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .analog import AnalogLayer, chip, chips, nominal
from .checkpoint import tensor_digest
from .io import atomic_write
from .compensation import bypass, compensation_parameters, compensators
from .distributed import broadcast_parameters, reduce_step, sum_over_ranks, world
from .errors import CheckpointError, ConfigError, is_int, is_number, require
from .evaluate import repeat_batch, evaluate_checkpoint, monte_carlo
from .progress import Pace, bar_disabled
from .resume import ResumeError, ResumeStore
from .seeding import Stream, chip_seed, layer_generator
from .tensors import Data, OutputFn, eval_mode, logits_of, model_device
from .training import TrainingDivergedError, distillation_loss


@dataclass
class CompensationConfig:
    """Chip-agnostic training of the compensators: ``steps`` Adam steps (cosine schedule), ``chips_per_step``
    fresh chips per step, each on its share of the batch (nearly equal groups); the training split is
    reshuffled at each pass over it."""

    steps: int = 500
    batch_size: int = 128
    chips_per_step: int = 1
    lr: float = 1e-2
    distill: float = 1.0       # weight of the clean-teacher KD loss; 1 - distill goes to cross-entropy on labels
    temperature: float = 1.0   # KD softmax temperature
    check_chips: int = 8       # after training: reset the compensators if they hurt on these chips (0: off)
    joint: bool = False        # pipeline: train the compensators with the network (noise-aware), not after it
    seed: int = 0

    def __post_init__(self) -> None:
        o = "compensation"
        require(is_int(self.steps) and self.steps >= 0, f"{o}.steps", "an integer >= 0", self.steps)
        require(is_int(self.batch_size) and self.batch_size >= 1, f"{o}.batch_size", "an integer >= 1", self.batch_size)
        require(is_int(self.chips_per_step) and self.chips_per_step >= 1, f"{o}.chips_per_step", "an integer >= 1",
                self.chips_per_step)
        require(is_number(self.lr) and self.lr > 0, f"{o}.lr", "a number > 0", self.lr)
        require(isinstance(self.joint, bool), f"{o}.joint", "true or false", self.joint)
        require(is_number(self.distill) and 0 <= self.distill <= 1, f"{o}.distill", "a number in [0, 1]", self.distill)
        require(is_number(self.temperature) and self.temperature > 0, f"{o}.temperature", "a number > 0", self.temperature)
        require(is_int(self.check_chips) and self.check_chips >= 0, f"{o}.check_chips", "an integer >= 0",
                self.check_chips)
        require(is_int(self.seed) and self.seed >= 0, f"{o}.seed", "an integer >= 0", self.seed)


@dataclass
class CalibrationConfig:
    """Per-chip calibration: ``steps`` Adam steps on ``n_images`` unlabeled training images.

    ``start``: the compensators' state each chip's steps start from: ``"trained"`` (the chip-agnostic
    state), ``"zero"`` (no-op: every last map zeroed), or ``"best"`` (whichever of the two is closer to
    the teacher on this chip's calibration images, after the BatchNorm re-estimation). A chip-agnostic
    state learned under the nominal BatchNorm statistics can be a poor start once they are re-estimated.
    """

    steps: int = 60
    n_images: int = 1000
    batch_size: int = 128
    lr: float = 1e-2
    temperature: float = 1.0
    batchnorm: bool = True     # re-estimate BatchNorm running statistics on the chip first
    biases: bool = False       # also fit the digital biases of the analog layers without a compensator (no overhead)
    start: str = "best"        # trained | zero | best (see the class docstring)
    teacher: str = "ensemble"  # what calibration matches (see TEACHERS); auto: the pipeline picks on validation chips
    teacher_chips: int = 32    # ensemble: chips of Stream.TEACHER whose mean prediction is the teacher
    select_chips: int = 8      # auto: validation chips (Stream.CHECK) each candidate teacher is scored on
    seed: int = 0

    def __post_init__(self) -> None:
        o = "calibration"
        require(is_int(self.steps) and self.steps >= 0, f"{o}.steps", "an integer >= 0", self.steps)
        require(is_int(self.n_images) and self.n_images >= 1, f"{o}.n_images", "an integer >= 1", self.n_images)
        require(is_int(self.batch_size) and self.batch_size >= 1, f"{o}.batch_size", "an integer >= 1", self.batch_size)
        require(is_number(self.lr) and self.lr > 0, f"{o}.lr", "a number > 0", self.lr)
        require(is_number(self.temperature) and self.temperature > 0, f"{o}.temperature", "a number > 0", self.temperature)
        require(isinstance(self.batchnorm, bool), f"{o}.batchnorm", "true or false", self.batchnorm)
        require(isinstance(self.biases, bool), f"{o}.biases", "true or false", self.biases)
        require(self.start in START, f"{o}.start", f"one of {list(START)}", self.start)
        require(self.teacher in TEACHERS, f"{o}.teacher", f"one of {list(TEACHERS)}", self.teacher)
        require(is_int(self.teacher_chips) and self.teacher_chips >= 1, f"{o}.teacher_chips", "an integer >= 1",
                self.teacher_chips)
        require(is_int(self.select_chips) and self.select_chips >= 1, f"{o}.select_chips", "an integer >= 1",
                self.select_chips)
        require(is_int(self.seed) and self.seed >= 0, f"{o}.seed", "an integer >= 0", self.seed)


START = ("trained", "zero", "best")
# ensemble: the model's mean prediction over ``teacher_chips`` sampled chips (what the trained network does on
# an average chip; its nominal logits are no good target after strong noise-aware training); self: the model's
# clean logits; reference: the vanilla reference network's clean logits; auto (pipeline only): the better of
# ensemble and reference on ``select_chips`` validation chips.
TEACHERS = ("ensemble", "self", "reference", "auto")


def teacher_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000,
                   batchnorm_images: int = 10_000, *, bypass_compensators: bool = True,
                   output: OutputFn | None = None) -> torch.Tensor:
    """Logits ``[N, classes]`` of the clean network: nominal weights, compensators bypassed (unless
    ``bypass_compensators=False``), eval mode. ``output``: how the model's outputs hold the logits
    (:func:`correctnet.tensors.logits_of`; None: a tensor, tuple, dict or transformers ``ModelOutput``).

    A model with BatchNorm is distilled from a copy whose BatchNorm statistics are re-estimated on the
    first ``batchnorm_images`` of ``x`` with nominal weights: after noise-aware training the running
    statistics describe noisy chips, and the nominal network with them is no clean teacher (VGG11 on
    Fashion-MNIST: 63.9% clean accuracy instead of about 90%).
    """
    dev = model_device(model)
    skip = bypass if bypass_compensators else lambda m: contextlib.nullcontext(m)
    teacher = model
    if _batchnorms(model):
        teacher = copy.deepcopy(model)
        with nominal(teacher), skip(teacher):
            reestimate_batchnorm(teacher, x[:batchnorm_images], batch_size)
    with torch.no_grad(), nominal(teacher), skip(teacher), eval_mode(teacher):
        return torch.cat([logits_of(teacher(x[i:i + batch_size].to(dev)), output)
                          for i in range(0, len(x), batch_size)])


def ensemble_logits(model: nn.Module, x: torch.Tensor, chips: int, seed: int = 0, batch_size: int = 1000, *,
                    output: OutputFn | None = None) -> torch.Tensor:
    """Log of the mean softmax ``[N, classes]`` of ``model`` (eval mode, compensators on) over ``chips`` chips
    of ``Stream.TEACHER``: the network's prediction on an average chip, a teacher for per-chip calibration that
    needs no other network. The model's analog mode is restored afterwards. ``output``: as in
    :func:`teacher_logits`."""
    dev = model_device(model)
    probs: torch.Tensor | None = None
    with torch.no_grad(), eval_mode(model):
        for i in range(chips):
            with chip(model, chip_seed(Stream.TEACHER, seed, i)):
                p = torch.cat([F.softmax(logits_of(model(x[j:j + batch_size].to(dev)), output), 1)
                               for j in range(0, len(x), batch_size)])
            probs = p if probs is None else probs + p
    assert probs is not None
    return torch.log(probs / chips)


@contextlib.contextmanager
def only_compensators_trainable(model: nn.Module, extra: Sequence[nn.Parameter] = ()
                                ) -> Iterator[list[nn.Parameter]]:
    """Freeze every parameter but the compensators' (``requires_grad`` restored on exit); yields them, then
    ``extra`` (tensors outside the model that are trained with them, e.g. per-chip biases)."""
    params = [*compensation_parameters(model), *extra]
    if not params:
        raise ConfigError("the model has no compensation modules; attach_compensation(model, placement) first")
    keep = {id(p) for p in params}
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        yield params
    finally:
        for p, r in saved.items():
            p.requires_grad_(r)


@dataclass
class CompensationResult:
    history: list[dict[str, Any]]
    steps: int
    seconds: float
    chip_seeds: list[int] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"history": self.history, "steps": self.steps, "seconds": self.seconds,
                "chips": len(self.chip_seeds), "chip_stream": Stream.COMPENSATION.name}


def data_tensors(data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, TensorDataset):
        return data.tensors[0], data.tensors[1]
    if isinstance(data, tuple):
        return data
    raise ConfigError("compensation training needs a TensorDataset or an (x, y) tuple")


def train_compensation(model: nn.Module, train_data: Data, cfg: CompensationConfig, *, progress: bool | None = None,
                       stage: str = "compensation", on_step: Callable[[int], None] | None = None,
                       teacher: torch.Tensor | None = None, resume: ResumeStore | None = None,
                       resume_key: str = "compensation", output: OutputFn | None = None) -> CompensationResult:
    """Train the compensators of ``model`` in place on sampled chips; returns the history and chip seeds.

    ``on_step(step)`` runs before each step's forward (the placement search uses it to switch random
    subsets of compensators on and off). ``teacher``: precomputed :func:`teacher_logits` of the training
    images, ``[N, classes]`` (computed here when None). Raises :class:`TrainingDivergedError` naming the
    stage and step when the loss or a compensator parameter becomes NaN or infinite.

    ``resume``: a snapshot goes to ``resume.path(resume_key)`` at most every ``resume.interval_s``
    seconds and at the end; one found there at the start is continued from, bit-identically (the
    caller makes sure it belongs to the same model, data and config; ``on_step`` must be a function of
    the step index, or fast-forward its own state to it, as the placement search's does).

    ``output``: how the model's outputs hold the logits ``[N, C]`` the loss reads
    (:func:`correctnet.tensors.logits_of`; None: a tensor, a tuple's first element, a dict's ``"logits"`` or a
    transformers ``ModelOutput``'s ``.logits``); the teacher computed here reads them the same way.

    Data-parallel (:mod:`correctnet.distributed`) inside a process group of N > 1 ranks, every rank calling it
    with the same arguments: ``cfg.batch_size`` is the global batch, rank ``r`` trains on its share with its own
    ``chips_per_step`` chips (chip ``j`` of step ``i`` is index ``r * 2**40 + i * k + j`` of the stream: rank 0
    draws the one-process chips), the gradients are averaged over ranks every step (each weighted by its
    share), and every rank ends with the same compensators and history. Snapshots are per rank, at the end only.
    """
    x, y = data_tensors(train_data)
    dev = model_device(model)
    t_start = time.perf_counter()
    rank, ranks = world()
    parallel = ranks > 1
    if parallel:
        broadcast_parameters(model)
        resume_key = f"{resume_key}.rank{rank}"
        progress = False if rank > 0 else progress
    if teacher is None:
        teacher = teacher_logits(model, x, output=output) if cfg.distill > 0 else torch.zeros(len(x), 0)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    steps_per_pass = math.ceil(len(x) / cfg.batch_size)
    seeds: list[int] = []
    history: list[dict[str, Any]] = []
    flags = {m: m.training for m in model.modules()}
    with only_compensators_trainable(model) as params:
        names = {id(p): n for n, p in model.named_parameters()}
        opt = torch.optim.Adam(params, lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
        model.eval()  # BatchNorm uses (and keeps) its running statistics; dropout off
        try:
            t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            start, order = 0, torch.arange(0)
            saved = resume.load(resume_key) if resume is not None else None
            if saved is not None:
                assert resume is not None  # saved came from it
                if (saved["steps"], saved["n"], sorted(saved["params"])) != (cfg.steps, len(x),
                                                                              sorted(names[id(p)] for p in params)):
                    raise ResumeError(f"{resume.path(resume_key)} was written for another compensation "
                                      f"stage ({saved['steps']} steps on {saved['n']} images, compensators "
                                      f"{sorted(saved['params'])[:4]} ...)")
                with torch.no_grad():
                    for p in params:
                        p.copy_(saved["params"][names[id(p)]])
                opt.load_state_dict(saved["optimizer"])
                sched.load_state_dict(saved["scheduler"])
                start, order, seeds, history = saved["step"], saved["order"], saved["seeds"], saved["history"]
                loss_sum, correct, seen = saved["sums"]
                shuffle.set_state(saved["shuffle"])
                torch.set_rng_state(saved["torch_rng"])

            def snapshot(done: int) -> None:
                assert resume is not None
                resume.save(resume_key, {
                    "step": done, "steps": cfg.steps, "n": len(x), "order": order, "seeds": seeds,
                    "history": history, "sums": [loss_sum, correct, seen], "shuffle": shuffle.get_state(),
                    "torch_rng": torch.get_rng_state(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "params": {names[id(p)]: p.detach() for p in params}})

            bar = tqdm(range(start, cfg.steps), total=cfg.steps, initial=start, desc=stage,
                       disable=bar_disabled(progress), leave=False, dynamic_ncols=True)
            pace = Pace(stage, cfg.steps, done=start, bar=not bar.disable)
            for step in bar:
                pos = step % steps_per_pass
                if pos == 0:
                    order = torch.randperm(len(x), generator=shuffle)
                batch = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
                idx = batch.tensor_split(ranks)[rank] if parallel else batch  # this rank's share
                xb, yb = x[idx].to(dev), y[idx].to(dev)
                k = cfg.chips_per_step  # chip j of step i is the (i * k + j)-th of the stream; the batch split among them
                ks = [chip_seed(Stream.COMPENSATION, cfg.seed, (rank << 40) + step * k + j)
                      for j in range(min(k, len(idx)))]
                seeds.extend(ks)
                if on_step is not None:
                    on_step(step)
                opt.zero_grad(set_to_none=True)
                loss = torch.zeros((), device=dev)
                out = torch.zeros((0, 1), device=dev)
                if len(idx):  # a rank's share of a batch smaller than the ranks can be empty
                    with chip(model, ks[0]) if k == 1 else chips(model, ks, uneven=True):
                        out = logits_of(model(xb), output)
                    if cfg.distill > 0:
                        loss = loss + cfg.distill * distillation_loss(out, teacher[idx].to(dev), cfg.temperature)
                    if cfg.distill < 1:
                        loss = loss + (1 - cfg.distill) * F.cross_entropy(out, yb)
                    if parallel or torch.isfinite(loss):
                        loss.backward()
                global_loss = reduce_step(params, loss, len(idx), len(batch)) if parallel else loss
                if not torch.isfinite(global_loss):
                    raise TrainingDivergedError(f"{stage}: compensation training loss became {global_loss.item()} "
                                                f"at step {step} (of {cfg.steps}); lower compensation.lr")
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(yb)
                correct += int((out.argmax(1) == yb).sum().item()) if len(yb) else 0
                seen += len(yb)
                if step % 20 == 0 and seen:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
                pace.update()
                if pos == steps_per_pass - 1 or step == cfg.steps - 1:  # one record per pass over the data
                    if parallel:  # the pass's metrics over the global batches, the same on every rank
                        total = sum_over_ranks(loss_sum, correct, seen)
                        loss_sum, correct, seen = total[0], int(total[1]), int(total[2])
                    history.append({"step": step + 1, "loss": loss_sum / seen, "chip_accuracy": correct / seen,
                                    "seconds": time.perf_counter() - t0})
                    t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
                # in parallel only at the end: ranks must snapshot at the same step
                if resume is not None and (step == cfg.steps - 1 or (not parallel and resume.due(resume_key))):
                    snapshot(step + 1)
            bad = [names[id(p)] for p in params if not torch.isfinite(p).all()]
            if bad:
                raise TrainingDivergedError(f"{stage}: compensator parameters became NaN or infinite after step "
                                            f"{cfg.steps} ({', '.join(bad[:4])}); lower compensation.lr")
        finally:
            for m, t in flags.items():
                m.training = t
    return CompensationResult(history, cfg.steps, time.perf_counter() - t_start, seeds)


def check_compensation(model: nn.Module, val: Data, *, chips: int = 8, seed: int = 0,
                       batch_size: int = 1000, output: OutputFn | None = None) -> dict[str, Any]:
    """Keep the trained compensators unless they hurt: mean accuracy on validation data ``val`` over
    ``chips`` chips of ``Stream.CHECK`` (chips that neither the placement search, compensation training nor
    the evaluation draw), with the compensators and bypassed, on the same chips. If they lower it, they
    are zeroed (an exact no-op again, and per-chip calibration then starts from zero): the chip-agnostic
    deployment then carries no compensation hardware. Returns both accuracies and ``kept``. The caller
    passes validation images the placement search did not score on. ``output``: as in :func:`monte_carlo`."""
    def acc() -> float:
        return monte_carlo(model, val, n_chips=chips, seed=seed, stream=Stream.CHECK, batch_size=batch_size,
                           progress=False, output=output).mean

    with_comp = acc()
    with bypass(model):
        without = acc()
    kept = with_comp >= without
    if not kept:
        _zero(model)
    return {"chips": chips, "chip_stream": Stream.CHECK.name, "images": len(data_tensors(val)[0]), "with": with_comp,
            "without": without, "kept": kept}


def _zero(model: nn.Module) -> None:
    for comp in compensators(model).values():
        comp.zero_()


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256, *, repeat: int = 1) -> int:
    """Recompute BatchNorm running statistics as exact averages over ``x`` under the model's current
    analog mode (e.g. a programmed chip). Returns the number of BatchNorm layers updated.

    ``repeat=K``: each batch runs as K copies (K chips programmed at once, :func:`correctnet.analog.chips`,
    with per-chip BatchNorm copies, as :meth:`ChipCalibrator.chips` installs)."""
    bns = _batchnorms(model)
    if not bns:
        return 0
    dev = model_device(model)
    flags = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches below
            bn.train()
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size].to(dev)
                model(repeat_batch(xb, repeat) if repeat > 1 else xb)  # in xb's memory layout: same BN sums
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        for m, t in flags.items():
            m.training = t
    return len(bns)


def calibration_images(train_data: Data, n_images: int, seed: int) -> torch.Tensor:
    """``n_images`` images drawn without replacement from the training split (``Stream.CALIBRATION``)."""
    x, _ = data_tensors(train_data)
    if n_images > len(x):
        raise ConfigError(f"calibration.n_images={n_images} exceeds the {len(x)} training images")
    gen = torch.Generator().manual_seed(chip_seed(Stream.CALIBRATION, seed, 0) >> 1)
    return x[torch.randperm(len(x), generator=gen)[:n_images]]


class _PerChip(nn.Module):
    """K copies of a digital module (a compensator or a BatchNorm), for K chips calibrated in one pass: copy
    ``k`` computes group ``k`` of the batch (equal groups, as in "chips" mode), so each chip has its own state."""

    def __init__(self, module: nn.Module, k: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(k))

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        groups = [a.chunk(len(self.copies)) for a in args]
        return torch.cat([c(*(g[i] for g in groups)) for i, c in enumerate(self.copies)])

    # what correctnet.compensation does to compensators, done to every copy
    @property
    def active(self) -> bool:
        return all(getattr(c, "active", True) for c in self.copies)

    @active.setter
    def active(self, value: bool) -> None:
        for c in self.copies:
            cast(Any, c).active = value

    def zero_(self) -> "_PerChip":
        for c in self.copies:
            cast(Any, c).zero_()
        return self


@contextlib.contextmanager
def _per_chip_copies(model: nn.Module, k: int, *, compensators_too: bool, batchnorm: bool
                     ) -> Iterator[list[_PerChip]]:
    """Replace each compensator (and each BatchNorm) of ``model`` by K copies of it (:class:`_PerChip`) inside
    the block; the originals are put back untouched on exit. Yields the compensators' wrappers."""
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    comps: list[_PerChip] = []
    norms = set(_batchnorms(model)) if batchnorm else set()
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            is_comp = compensators_too and isinstance(parent, AnalogLayer) and name == "compensator" and child is not None
            if child is not None and (is_comp or child in norms):
                wrapper = _PerChip(child, k)
                swaps.append((parent, name, child))
                parent._modules[name] = wrapper
                if is_comp:
                    comps.append(wrapper)
    try:
        yield comps
    finally:
        for parent, name, child in swaps:
            parent._modules[name] = child


def _bias_layers(model: nn.Module) -> list[AnalogLayer]:
    """The analog layers whose bias per-chip calibration fits (``CalibrationConfig.biases``): Linear and Conv layers
    with a bias and no active compensator, in module order."""
    out: list[AnalogLayer] = []
    for m in model.modules():
        comp = m._modules.get("compensator") if isinstance(m, AnalogLayer) else None
        if (isinstance(m, AnalogLayer) and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
                and isinstance(m.bias, nn.Parameter) and (comp is None or not getattr(comp, "active", True))):
            out.append(m)
    return out


@contextlib.contextmanager
def _chip_biases(model: nn.Module, k: int) -> Iterator[list[tuple[AnalogLayer, nn.Parameter]]]:
    """Inside the block the layers of :func:`_bias_layers` add bias ``B[j]`` (``[k, out]``, a leaf that
    requires grad, starting at the nominal bias) to chip ``j``'s group of their output instead of their own bias,
    so each of the ``k`` chips programmed at once has its own; yields ``(layer, B)`` pairs. On exit the layers get
    their own bias back, unchanged (:meth:`ChipCalibrator.__call__` copies a single chip's ``B[0]`` into it)."""
    layers = _bias_layers(model)
    saved = [cast(nn.Parameter, layer.bias) for layer in layers]
    tables = [nn.Parameter(b.detach().clone().unsqueeze(0).repeat(k, 1)) for b in saved]
    handles = []

    def hook(layer: AnalogLayer, table: torch.Tensor) -> Callable[..., torch.Tensor]:
        def add(_m: nn.Module, _args: Any, y: torch.Tensor) -> torch.Tensor:
            if k == 1:
                return y + layer._bias_view(table[0])
            return torch.cat([g + layer._bias_view(table[j]) for j, g in enumerate(layer._chip_groups(y))])
        return add

    try:
        for layer, table in zip(layers, tables):
            setattr(layer, "bias", None)  # its _converted_mvm adds no bias; the hook adds the chip's
            handles.append(layer.register_forward_hook(hook(layer, table)))
        yield list(zip(layers, tables))
    finally:
        for h in handles:
            h.remove()
        for layer, b in zip(layers, saved):
            layer.bias = b


def _fits_anything(model: nn.Module, cfg: CalibrationConfig) -> bool:
    """Whether the calibration steps have parameters to fit: compensators, or biases with ``cfg.biases``."""
    return cfg.steps > 0 and (bool(compensators(model)) or (cfg.biases and bool(_bias_layers(model))))


def calibrates_anything(model: nn.Module, cfg: CalibrationConfig) -> bool:
    """Whether per-chip calibration with ``cfg`` has something to adjust on ``model``: compensators or (with
    ``cfg.biases``) biases to fit in its steps, or BatchNorm statistics to re-estimate."""
    return _fits_anything(model, cfg) or (cfg.batchnorm and bool(_batchnorms(model)))


class ChipCalibrator:
    """Calibrates the chip a model is programmed as: ``calibrator(model, chip_seed)``.

    Built once per model from unlabeled calibration images ``[n, C, H, W]``; the teacher's logits are
    computed then (``cfg.teacher``: ``ensemble``, the model's mean prediction over ``cfg.teacher_chips`` chips;
    ``self``, the clean model, compensators bypassed unless ``teacher`` is given; ``reference``, the clean
    ``teacher`` network, e.g. the vanilla reference). Each call re-estimates BatchNorm statistics (if enabled
    and present), puts the compensators in their start state (``cfg.start``), then runs ``cfg.steps`` Adam
    steps on them with a KD loss to the teacher. The caller restores the model's state between chips
    (``monte_carlo`` does). ``seconds`` lists the time spent per chip.

    ``output``: how the model's outputs (and the ``teacher`` network's) hold the logits ``[N, C]``
    (:func:`correctnet.tensors.logits_of`; None: a tensor, a tuple's first element, a dict's ``"logits"`` or a
    transformers ``ModelOutput``'s ``.logits``). Give :func:`~correctnet.evaluate.monte_carlo` the same one.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, cfg: CalibrationConfig, *,
                 teacher: nn.Module | None = None, output: OutputFn | None = None) -> None:
        self.cfg = cfg
        self.images = images
        self.output = output
        self.has_compensators = bool(compensators(model))
        self.has_batchnorm = bool(_batchnorms(model))
        if not calibrates_anything(model, cfg):
            raise ConfigError("per-chip calibration has nothing to adjust: the model has no compensation modules "
                              "(nor biases to fit with calibration.biases=true, or calibration.steps=0) and no "
                              "BatchNorm to re-estimate")
        if cfg.teacher == "auto":
            raise ConfigError("calibration.teacher=auto is chosen by the training pipeline; pass the chosen teacher "
                              f"(one of {list(TEACHERS[:3])}) to ChipCalibrator")
        if cfg.teacher == "reference" and teacher is None:
            raise ConfigError("calibration.teacher=reference needs the reference network: ChipCalibrator(..., teacher=net)")
        self.teacher = None
        if _fits_anything(model, cfg):
            if cfg.teacher == "ensemble":
                self.teacher = ensemble_logits(model, images, cfg.teacher_chips, cfg.seed, output=output)
            elif teacher is None:  # self: the clean network
                self.teacher = teacher_logits(model, images, output=output)
            else:  # a given network is used as it is, with its own compensators (jointly trained ones are part of it)
                self.teacher = teacher_logits(teacher, images, bypass_compensators=False, output=output)
        self.seconds: list[float] = []
        self.starts: list[str] = []
        self.bias_layers = 0  # layers whose biases the last chip fitted (calibration.biases)

    def _start(self, model: nn.Module, comps: Sequence[_PerChip] | None, k: int) -> list[str]:
        """Put the compensators of each of the ``k`` chips in the configured start state; returns the states.

        ``comps``: the per-chip compensator copies when ``k`` chips are calibrated at once (None: one chip)."""
        start = self.cfg.start
        starts = [start] * k
        if start == "best":
            assert self.teacher is not None  # calibration starts the compensators only when it has a teacher
            m = min(len(self.images), 1024)  # enough to rank two states, a fraction of the steps' cost
            dev = model_device(model)
            with eval_mode(model):
                x, t = self.images[:m].to(dev), self.teacher[:m].to(dev)
                x = repeat_batch(x, k) if k > 1 else x
                logits = logits_of(model(x), self.output)  # [K * m, C]: group k is chip k's
                trained = [distillation_loss(o, t, self.cfg.temperature).item() for o in logits.chunk(k)]
                with bypass(model):
                    logits = logits_of(model(x), self.output)
                    zero = [distillation_loss(o, t, self.cfg.temperature).item() for o in logits.chunk(k)]
            starts = ["zero" if z < tr else "trained" for z, tr in zip(zero, trained)]
        for i, st in enumerate(starts):
            if st != "zero":
                continue
            if comps is None:
                _zero(model)
            else:
                for w in comps:
                    cast(Any, w.copies[i]).zero_()
        return starts

    def _fit(self, model: nn.Module, seeds: Sequence[int], biases: Sequence[nn.Parameter] = ()) -> None:
        """``cfg.steps`` Adam steps on the compensators of the chips ``seeds`` (one chip, or K programmed at
        once with per-chip copies) and on their ``biases`` (:func:`_chip_biases`): chip k's batch order comes
        from its own seed, its loss from its group."""
        cfg, dev, k = self.cfg, model_device(model), len(seeds)
        assert self.teacher is not None
        gens = [layer_generator(s, "calibration", "cpu") for s in seeds]  # batch order: a function of the chip only
        flags = {m: m.training for m in model.modules()}
        try:
            with torch.enable_grad(), only_compensators_trainable(model, biases) as params:
                model.eval()
                opt = torch.optim.Adam(params, lr=cfg.lr)  # per-element updates: K chips' copies stay independent
                images, teacher = self.images.to(dev), self.teacher.to(dev)  # once, not per step
                n = len(images)
                for _ in range(cfg.steps):
                    idx = torch.cat([torch.randint(n, (min(cfg.batch_size, n),), generator=g) for g in gens]).to(dev)
                    out, target = logits_of(model(images[idx]), self.output), teacher[idx]
                    loss = sum(distillation_loss(o, t, cfg.temperature) for o, t in zip(out.chunk(k), target.chunk(k)))
                    opt.zero_grad(set_to_none=True)
                    cast(torch.Tensor, loss).backward()
                    opt.step()
        finally:
            for m, t in flags.items():
                m.training = t

    @contextlib.contextmanager
    def _biases(self, model: nn.Module, k: int) -> Iterator[list[tuple[AnalogLayer, nn.Parameter]]]:
        """:func:`_chip_biases` when this calibration fits biases (else no pairs); records how many layers."""
        fitting: contextlib.AbstractContextManager[list[tuple[AnalogLayer, nn.Parameter]]] = (
            _chip_biases(model, k) if self.cfg.biases and self.teacher is not None else contextlib.nullcontext([]))
        with fitting as pairs:
            self.bias_layers = len(pairs)
            yield pairs

    def __call__(self, model: nn.Module, seed: int) -> None:
        t0 = time.perf_counter()
        if self.cfg.batchnorm:
            reestimate_batchnorm(model, self.images, self.cfg.batch_size)
        if self.teacher is not None:
            if self.has_compensators:
                self.starts.extend(self._start(model, None, 1))
            with self._biases(model, 1) as pairs:
                self._fit(model, [seed], [table for _, table in pairs])
            with torch.no_grad():  # the chip's fitted biases become the layers' own
                for layer, table in pairs:
                    cast(torch.Tensor, layer.bias).copy_(table[0])
        self.seconds.append(time.perf_counter() - t0)

    @contextlib.contextmanager
    def chips(self, model: nn.Module, seeds: Sequence[int]) -> Iterator[nn.Module]:
        """``with calibrator.chips(model, seeds):`` K chips programmed at once (:func:`correctnet.analog.chips`),
        each calibrated as ``calibrator(model, seed)`` calibrates it alone: its own copy of every
        compensator and BatchNorm (copy k computes group k of the batch), its own batch order, the same
        steps. Inside the block run the model on K copies of a batch (:func:`correctnet.evaluate.repeat_batch`,
        which keeps the batch's memory layout: BatchNorm sums in the same order). The model's own modules are
        never changed; the copies go on exit. ``seconds`` gets the time per chip (the block's calibration / K)."""
        k = len(seeds)
        with chips(model, seeds), _per_chip_copies(model, k, compensators_too=self.teacher is not None,
                                                   batchnorm=self.cfg.batchnorm) as comps, \
                self._biases(model, k) as pairs:
            t0 = time.perf_counter()
            if self.cfg.batchnorm:
                reestimate_batchnorm(model, self.images, self.cfg.batch_size, repeat=k)
            if self.teacher is not None:
                if self.has_compensators:
                    self.starts.extend(self._start(model, comps, k))
                self._fit(model, seeds, [table for _, table in pairs])
            self.seconds.extend([(time.perf_counter() - t0) / k] * k)
            yield model

    def last_record(self) -> dict[str, Any]:
        """What the last call recorded (seconds, start state): sent back by forked Monte-Carlo workers."""
        return {"seconds": self.seconds[-1], "start": self.starts[-1] if self.teacher is not None
                and self.has_compensators else None, "bias_layers": self.bias_layers}

    def add_record(self, record: dict[str, Any]) -> None:
        """Add a chip's record made by another process (see :meth:`last_record`)."""
        self.seconds.append(record["seconds"])
        self.bias_layers = record.get("bias_layers", self.bias_layers)
        if record["start"] is not None:
            self.starts.append(record["start"])

    def stats(self) -> dict[str, Any]:
        """What calibration cost: steps, images, seconds per chip (mean over calibrated chips)."""
        mean = sum(self.seconds) / len(self.seconds) if self.seconds else 0.0
        return {**asdict(self.cfg), "compensators": self.has_compensators, "batchnorm_layers": self.has_batchnorm,
                "bias_layers": self.bias_layers,
                "chips": len(self.seconds), "seconds_per_chip": mean,
                "started_from_zero": self.starts.count("zero")}


def calibration_state(model: nn.Module, *, biases: bool = False) -> dict[str, torch.Tensor]:
    """What per-chip calibration changes, by ``state_dict`` name: compensator parameters and BatchNorm
    running statistics (copies, on the model's device); with ``biases`` (``CalibrationConfig.biases``) also the
    biases it fits."""
    comp = {n for n, _ in model.named_parameters() if ".compensator." in f".{n}" or n.startswith("compensator.")}
    norms = set(_batchnorms(model))
    bn = {f"{name}.{b}" if name else b for name, m in model.named_modules() if m in norms
          for b in ("running_mean", "running_var", "num_batches_tracked")}
    fitted = set(_bias_layers(model)) if biases else set()
    bias = {f"{name}.bias" if name else "bias" for name, m in model.named_modules() if m in fitted}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in comp or k in bn or k in bias}


def calibrate_chip(model: nn.Module, seed: int, calibrator: "ChipCalibrator") -> dict[str, torch.Tensor]:
    """Program chip ``seed``, calibrate it as ``monte_carlo(calibrate=calibrator)`` does, and return its
    :func:`calibration_state`; the model is left as it was."""
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        with eval_mode(model), chip(model, seed):
            calibrator(model, seed)
            return calibration_state(model, biases=calibrator.bias_layers > 0)
    finally:
        model.load_state_dict(snapshot)


CHIP_FORMAT = "1"


def save_calibrated_chip(path: str | os.PathLike, model: nn.Module, seed: int, calibrator: "ChipCalibrator", *,
                         overwrite: bool = False) -> Path:
    """Calibrate chip ``seed`` and write its state (compensators, BatchNorm statistics, fitted biases) to a
    safetensors file.

    What a deployed chip stores digitally after programming: load it with :func:`load_calibrated_chip` into
    the same model (e.g. from ``load_checkpoint``) and run ``with chip(model, seed):``. Per-read noise, where
    the variation model has it, restarts from the chip's first read, so such chips match their Monte-Carlo
    accuracy only in distribution; static variation models reproduce it exactly.
    """
    if not is_int(seed) or seed < 0:
        raise ConfigError(f"chip seed must be an integer >= 0, got {seed!r}")
    state = {k: v.cpu().contiguous() for k, v in calibrate_chip(model, seed, calibrator).items()}
    meta = {"correctnet_chip": CHIP_FORMAT, "chip_seed": str(seed), "correctnet_sha256": tensor_digest(state),
            "calibration": json.dumps(asdict(calibrator.cfg))}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta), overwrite=overwrite)


def load_calibrated_chip(model: nn.Module, path: str | os.PathLike) -> int:
    """Load a chip written by :func:`save_calibrated_chip` into ``model`` (in place); returns its chip seed.

    The names and shapes must be the model's (a :class:`~correctnet.checkpoint.CheckpointError` says which
    differ). Then ``with chip(model, seed):`` runs the calibrated chip.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"cannot read calibrated chip {path}: {e}") from None
    if meta.get("correctnet_chip") != CHIP_FORMAT or not str(meta.get("chip_seed", "")).isdigit():
        raise CheckpointError(f"{path} is not a calibrated chip written by correctnet.save_calibrated_chip")
    if meta.get("correctnet_sha256") != tensor_digest(tensors):
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the digest recorded at export")
    own = model.state_dict()
    bad = [k for k in tensors if k not in own or own[k].shape != tensors[k].shape]
    missing = [k for k in calibration_state(model) if k not in tensors]
    if bad or missing:
        raise CheckpointError(f"{path} does not fit this model: unknown or mis-shaped {bad[:4]}, missing {missing[:4]}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
    return int(meta["chip_seed"])


def teacher_network(cfg: CalibrationConfig, model: nn.Module, reference: nn.Module | None,
                    joint: bool) -> nn.Module | None:
    """The network whose clean logits ``cfg.teacher`` calibrates towards, for :class:`ChipCalibrator`'s ``teacher``:
    the vanilla ``reference``, or the model itself with its compensators when they were trained jointly (without
    them it is not the trained network); None for the chip ensemble and the bypassed model (the calibrator
    computes those from the model)."""
    if cfg.teacher == "reference":
        return reference
    return model if joint and cfg.teacher == "self" else None


def load_reference(path: str | os.PathLike, meta: dict[str, Any], *, device: str | torch.device = "cpu",
                   trust: Any = None) -> nn.Module:
    """The vanilla reference network exported beside the checkpoint at ``path`` (``meta["reference"]``: its file
    name in the same directory and the digest recorded in it), as :func:`~correctnet.checkpoint.load_checkpoint`
    builds it (``trust``: the modules it may import). Raises :class:`CheckpointError` when the run kept none, or the file is missing or is another one."""
    from .checkpoint import checkpoint_digest, load_checkpoint

    ref = meta.get("reference") if isinstance(meta, dict) else None
    if not isinstance(ref, dict) or not ref.get("file"):
        raise CheckpointError(f"{path} has no vanilla reference beside it (the run had reference=false); calibrate "
                              f"with calibration.teacher=ensemble or self (other numbers than the exported ones)")
    file = Path(path).parent / ref["file"]
    if not file.is_file():
        raise CheckpointError(f"the vanilla reference of {path} is missing: expected {file} (copy it with the "
                              f"checkpoint)")
    if checkpoint_digest(file) != ref.get("sha256"):
        raise CheckpointError(f"{file} is not the vanilla reference exported with {path} (its digest differs)")
    return load_checkpoint(file, device=device, trust=trust)[0]


def checkpoint_calibration(meta: dict[str, Any], overrides: dict[str, Any] | None = None) -> CalibrationConfig:
    """The calibration settings of the run that exported a checkpoint (``meta["config"]["calibration"]``), with
    ``overrides``; the library defaults where the run recorded none. ``teacher=auto`` becomes the teacher the
    run chose (recorded in its ``calibrated`` stage)."""
    stored = ((meta.get("config") or {}).get("calibration") or {}) if isinstance(meta, dict) else {}
    params = {k: v for k, v in stored.items() if k in CalibrationConfig.__dataclass_fields__}
    if params.get("teacher") == "auto":
        cal = (((meta.get("metrics") or {}).get("stages") or {}).get("calibrated") or {}).get("calibration") or {}
        if cal.get("teacher") not in TEACHERS[:3]:
            raise CheckpointError("the checkpoint's run chose its calibration teacher automatically but did not record "
                                  "the choice; pass calibration={'teacher': 'ensemble'} (or self, reference)")
        params["teacher"] = cal["teacher"]
    if "seed" not in params and isinstance((meta.get("config") or {}).get("seed"), int):
        params["seed"] = meta["config"]["seed"]
    unknown = set(overrides or {}) - set(CalibrationConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown calibration keys {sorted(unknown)}; accepted: {sorted(CalibrationConfig.__dataclass_fields__)}")
    return CalibrationConfig(**{**params, **(overrides or {})})


def evaluate_calibrated(path: str | os.PathLike, *, calibration: dict[str, Any] | None = None,
                        export_chip: int | None = None, chip_path: str | os.PathLike | None = None,
                        overwrite: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Re-run per-chip calibration of every evaluation chip from an exported checkpoint, as the training run did.

    Calibration images come from the run's training split (same dataset settings and seed), its settings from
    the checkpoint (``calibration`` overrides keys, e.g. ``{"steps": 100}``), and each chip is calibrated and
    measured by :func:`~correctnet.evaluate.monte_carlo`. With the exported settings the per-chip accuracies
    reproduce the ``calibrated`` stage of ``metrics.json`` exactly (``results[i]["reproduces_export"]``).
    ``export_chip=i`` with ``chip_path``: also write evaluation chip ``i``'s calibrated state there
    (:func:`save_calibrated_chip`; ``result["exported_chip"]``). Other keyword arguments:
    :func:`~correctnet.evaluate.evaluate_checkpoint`.
    """
    if (export_chip is None) != (chip_path is None):
        raise ConfigError("export_chip and chip_path go together")
    if export_chip is not None and kwargs.get("chips") is not None:
        raise ConfigError("export_chip exports a chip of a whole evaluation, not of a shard (evaluation.chips)")
    if chip_path is not None and Path(chip_path).exists() and not overwrite:
        raise ConfigError(f"{chip_path} already exists; pass overwrite=true to replace it")
    built: list[tuple[nn.Module, ChipCalibrator, dict[str, Any]]] = []
    references: dict[str, nn.Module] = {}

    def factory(model: nn.Module, data: Any, meta: dict[str, Any]) -> ChipCalibrator:
        cfg = checkpoint_calibration(meta, calibration)
        joint = bool(((meta.get("config") or {}).get("compensation") or {}).get("joint"))
        if cfg.teacher == "reference" and "net" not in references:
            references["net"] = load_reference(path, meta, device=model_device(model), trust=kwargs.get("trust"))
        teacher = teacher_network(cfg, model, references.get("net"), joint)
        images = calibration_images(data.train, cfg.n_images, cfg.seed).to(model_device(model))
        built.append((model, ChipCalibrator(model, images, cfg, teacher=teacher), meta))
        return built[-1][1]

    res = evaluate_checkpoint(path, calibrate=factory, **kwargs)
    if built and checkpoint_calibration(built[0][2]) != built[0][1].cfg:  # other settings: nothing to compare with
        for r in res["results"]:
            r["reproduces_export"] = None
    if export_chip is not None:
        seeds = res["results"][0]["chip_seeds"]
        if isinstance(export_chip, bool) or not isinstance(export_chip, int) or not 0 <= export_chip < len(seeds):
            raise ConfigError(f"export_chip must be an evaluation chip index in [0, {len(seeds)}), got {export_chip!r}")
        model, calibrator, _ = built[0]
        if len(res["results"]) > 1:
            raise ConfigError("export_chip needs a single variation model (no sweep)")
        assert chip_path is not None  # it goes with export_chip (checked above)
        file = save_calibrated_chip(chip_path, model, seeds[export_chip], calibrator, overwrite=overwrite)
        res["exported_chip"] = {"index": export_chip, "chip_seed": seeds[export_chip], "file": str(file),
                                "accuracy": res["results"][0]["mc"]["accuracies"][export_chip]}
    return res


__all__ = ["CalibrationConfig", "ChipCalibrator", "CompensationConfig", "CompensationResult", "calibrates_anything",
           "calibration_images",
           "calibrate_chip", "calibration_state", "check_compensation", "checkpoint_calibration",
           "evaluate_calibrated", "distillation_loss", "ensemble_logits", "load_reference", "teacher_network",
           "load_calibrated_chip", "save_calibrated_chip", "reestimate_batchnorm", "teacher_logits", "train_compensation"]
