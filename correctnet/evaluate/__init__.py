"""Monte-Carlo evaluation: accuracy of a model over N simulated chips.

Seed scheme: chip ``i`` of an evaluation with seed ``s`` is ``seeding.chip_seed(Stream.EVAL, s, i)``; each
analog layer draws its variations from ``(chip seed, layer name)`` (see :mod:`correctnet.seeding`).
Same model, data and seed give the same per-chip accuracies; chips used in training come from other
streams and are never evaluation chips. Evaluation runs in ``eval()`` mode under ``torch.no_grad()``
and restores the model's previous train/eval mode and analog mode afterwards, even on error.

:func:`evaluate_checkpoint` re-runs the evaluation recorded in a checkpoint (same test split, same chips,
optionally other variation models); ``python -m correctnet.evaluate`` is its command line.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..analog import require_analog, chip, chips, digitize, nominal, set_variation
from ..checkpoint import load_checkpoint, read_metadata, trust_needed, versions
from ..data import CONFIG_KEYS as DATASET_KEYS, dataset_from_config
from ..errors import ConfigError, CorrectNetError
from ..models import Trust
from ..seeding import Stream, chip_seed
from ..progress import Pace, bar_disabled
from ..reads import check_reads_once
from ..registry import make_variation
# the ground-floor helpers, also importable from here as before
from ..tensors import Data as Data, eval_mode as eval_mode, first_samples as first_samples  # noqa: F401
from ..tensors import iter_batches as iter_batches, model_device as model_device  # noqa: F401
from ..tensors import OutputFn, forward_precision, logits_of
from ..variation import VariationModel


def _accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
              output: OutputFn | None = None, precision: str = "float32") -> float:
    correct: torch.Tensor | int = 0
    total = 0
    amp = forward_precision(model_device(model), precision, "precision")
    for x, y in batches:  # counts stay on the device: one host transfer per chip, not per batch
        with amp():
            logits = logits_of(model(x), output)
        correct = correct + (logits.argmax(1) == y).sum()
        total += len(y)
    return int(correct) / max(total, 1)


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """The automatic layout choice: channels-last images on CPU for models with 2-D convolutions.

    oneDNN's convolutions and PyTorch's max-pooling are much faster on channels-last inputs on CPU
    (max-pool about 5x); on GPU the gain depends on dtype and cuDNN, so the default leaves it off there.
    """
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``[N, C, H, W]``) with channels-last strides, forced even where ``C == 1`` or ``H == W == 1``
    (``Tensor.contiguous(memory_format=...)`` returns such tensors unchanged, and the convolution then
    keeps the slow layout). Values and shape are unchanged; other ranks are returned as they are."""
    if x.dim() != 4:
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


MAX_CHIPS = 100_000  # evaluation.n_chips above this is refused: days of computing, surely a typo (or an edited file)
MAX_SEED = 2**63 - 1  # evaluation.seed and the split seed: non-negative 64-bit integers

AUTO_BATCH = {"cpu": 250, "cuda": 1000}  # images per evaluation batch for batch_size="auto", by device type


def eval_batch_size(batch_size: int | str, device: torch.device | str) -> int:
    """Images per evaluation batch: an integer >= 1 as given, or ``"auto"``: 250 on CPU (a layer's activations
    stay in the caches; per chip 0.41x/0.42x a clean forward at 1,000 for LeNet-5/VGG11, docs/speed.md), 1,000
    on other devices."""
    if batch_size == "auto":
        return AUTO_BATCH.get(torch.device(device).type, 1000)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"evaluation.batch_size must be 'auto' or an integer >= 1, got {batch_size!r}")
    return batch_size


def resolve_chips_per_pass(value: int | str | None) -> int | None:
    """``evaluation.chips_per_pass``: ``"auto"`` (or None) -> None (:func:`monte_carlo` chooses from memory:
    1 on CPU, as many as a quarter of the free memory holds on CUDA), or an integer >= 1 as given."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"evaluation.chips_per_pass must be 'auto' or an integer >= 1, got {value!r}")
    return value


def eval_batches(data: Data, batch_size: int | str, model: nn.Module,
                 channels_last: bool | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation batches on the model's device, in the faster layout (see :func:`use_channels_last`), of
    ``batch_size`` images (``"auto"``: :func:`eval_batch_size`).

    The layout changes float round-off only (about 1e-7 relative in the logits), not the computation.
    """
    dev = model_device(model)
    cl = use_channels_last(model, dev) if channels_last is None else channels_last
    size = eval_batch_size(batch_size, dev)
    return [(to_channels_last(x) if cl else x, y) for x, y in iter_batches(data, size, dev)]


def accuracy(model: nn.Module, data: Data, *, batch_size: int | str = "auto", channels_last: bool | None = None,
             output: OutputFn | None = None, precision: str = "float32") -> float:
    """Accuracy (fraction in [0, 1]) of ``model`` as it is now (its current analog mode); ``precision``
    (``float32`` | ``bfloat16`` | ``float16``): the forward under ``torch.autocast``, see :func:`monte_carlo`.

    The prediction is the argmax of the logits ``[N, C]`` in the model's output: a tensor, a tuple's first
    element, a dict's ``"logits"``, a transformers ``ModelOutput``'s ``.logits``, or what ``output(raw output)``
    returns (:func:`correctnet.tensors.logits_of`).
    """
    with eval_mode(model):
        return _accuracy(model, eval_batches(data, batch_size, model, channels_last), output, precision)


def clean_accuracy(model: nn.Module, data: Data, *, batch_size: int | str = "auto", channels_last: bool | None = None,
                   output: OutputFn | None = None, precision: str = "float32") -> float:
    """Accuracy without any variation (nominal weights); ``output``, ``precision``: see :func:`accuracy`."""
    with nominal(model):
        return accuracy(model, data, batch_size=batch_size, channels_last=channels_last, output=output,
                        precision=precision)


def chip_copy(model: nn.Module, seed: int) -> nn.Module:
    """A plain (digital) copy of ``model`` whose weights are chip ``seed``'s static analog weights.

    The simplest correct way to simulate one chip, and a reference for the fast path of
    :func:`monte_carlo`: same chip seed, same weights. The copy can be exported, or evaluated by any
    other tool. Per-read noise and converters act at every forward and have no static equivalent, so
    variation models with them are refused. ``model`` is not modified. Every analog weight of every
    layer kind is copied (``AnalogLayer.analog_parameters``: attention in-projections and recurrent
    weights included); a tied weight holds its one chip draw.
    """
    layers = require_analog(model)
    for layer in layers.values():
        if layer.variation.reads or layer.variation.converts:
            raise ConfigError(f"chip_copy: layer {layer.analog_name!r} has per-read noise or converters "
                              f"({layer.variation.to_dict()}), which no static copy of the weights represents")
    plain = digitize(model)
    with torch.no_grad(), chip(model, seed):  # the same draw monte_carlo programs
        for name, layer in layers.items():
            target = plain.get_submodule(name)
            for p in layer.analog_parameters:  # every analog weight (attention in-projections, RNN weights)
                getattr(target, p).copy_(getattr(layer, p))  # the chip's value, in the parameter's layout
    return plain


@dataclass
class MCResult:
    """Per-chip accuracies of a Monte-Carlo evaluation and their summary statistics (fractions)."""

    accuracies: list[float]
    seed: int
    chip_seeds: list[int] = field(default_factory=list)

    @property
    def n_chips(self) -> int:
        return len(self.accuracies)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """Sample standard deviation over chips (ddof=1; 0 for one chip)."""
        return float(np.std(self.accuracies, ddof=1)) if self.n_chips > 1 else 0.0

    @property
    def sem(self) -> float:
        """Standard error of the mean accuracy."""
        return self.std / math.sqrt(self.n_chips)

    @property
    def min(self) -> float:
        return float(np.min(self.accuracies))

    @property
    def p5(self) -> float:
        """5th percentile over chips (numpy's linear interpolation)."""
        return float(np.percentile(self.accuracies, 5))

    def to_dict(self) -> dict[str, Any]:
        return {"n_chips": self.n_chips, "mean": self.mean, "std": self.std, "min": self.min, "p5": self.p5,
                "accuracies": list(self.accuracies), "seed": self.seed}

    def summary(self) -> str:
        return (f"mean {100 * self.mean:.2f}% ± {100 * self.std:.2f} (std over {self.n_chips} chips), "
                f"p5 {100 * self.p5:.2f}%, min {100 * self.min:.2f}%")


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2 ** 30


def chip_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Estimated memory one more chip adds to a chip batch on input batch ``x``: its stacked static draws,
    its cached weights and about three times the largest activation of one forward on ``x``.

    The activations are measured by one nominal forward of the first two samples of ``x`` (hooks on the
    leaf modules), scaled to ``len(x)``.
    """
    weights = 0
    for layer in require_analog(model).values():
        for p in layer.analog_parameters:  # noise: up to 4 draws per cell (RRAM with faults) + the weight read
            weights += 5 * layer.nominal(p).numel() * layer.nominal(p).element_size()
    largest = [0]

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())
        elif isinstance(out, tuple):
            largest[0] = max([largest[0]] + [o.numel() * o.element_size() for o in out if isinstance(o, torch.Tensor)])

    probe = x[:2]
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with eval_mode(model), nominal(model):
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return weights + 3 * largest[0] * max(1, len(x) // max(1, len(probe)))


def auto_chips_per_pass(model: nn.Module, x: torch.Tensor, n_chips: int, budget: int | None = None) -> int:
    """K for :func:`monte_carlo` ``chips_per_pass=None``: as many chips as fit ``budget`` bytes, by
    :func:`chip_bytes` on the batch ``x``; at least 1, at most ``n_chips``.

    Without ``budget``: on CUDA a quarter of the free memory; on CPU 1 (one by one), because there chip
    batches measured no faster than one chip at a time (``experiments/results/mc_speed_batched_cpu.md``:
    the CPU kernels are already saturated by one chip's batch, and K times larger activations leave the
    caches and glibc's reusable heap).
    """
    dev = x.device
    if budget is None:
        if dev.type != "cuda":
            return 1
        budget = _available_bytes(dev) // 4
    return max(1, min(n_chips, int(budget // max(1, chip_bytes(model, x)))))


def repeat_batch(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` repeated ``k`` times along the batch (K groups of ``len(x)``), in ``x``'s memory layout."""
    cl = x.dim() == 4 and x.stride(1) == 1 and x.stride(-1) == x.shape[1]  # channels-last (forced too)
    n = len(x)
    out = torch.empty((k * n, *x.shape[1:]), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if cl else torch.contiguous_format)
    for i in range(k):
        out[i * n:(i + 1) * n].copy_(x)
    return out


def _chip_batch_correct(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        k: int, output: OutputFn | None = None, precision: str = "float32") -> list[int]:
    """Correct predictions per chip of the programmed chip batch (K = ``k``), one host transfer at the end."""
    correct = None
    amp = forward_precision(model_device(model), precision, "precision")
    for x, y in batches:  # logits [K * N, C]: group k is chip k's
        with amp():
            logits = logits_of(model(repeat_batch(x, k)), output)
        pred = logits.argmax(1).view(k, len(y))
        c = (pred == y).sum(1)
        correct = c if correct is None else correct + c
    return [0] * k if correct is None else [int(c) for c in correct.tolist()]


_WORK: dict[str, Any] = {}  # what forked chip workers read (inherited at fork, never pickled)


def _work_chip(i: int) -> tuple[int, float, Any]:
    """A forked worker: chip ``i`` of the evaluation in ``_WORK`` (calibrated first, then restored)."""
    model, batches, seeds, calibrate, snapshot, output, precision = _WORK["args"]
    with chip(model, seeds[i]):
        if calibrate is not None:
            calibrate(model, seeds[i])
        acc = _accuracy(model, batches, output, precision)
    if snapshot is not None:
        model.load_state_dict(snapshot)
    record = getattr(calibrate, "last_record", None)
    return i, acc, record() if record is not None else None


def _init_worker() -> None:
    """Forked workers take the default SIGTERM (and leave Ctrl-C to the parent).

    A parent's own SIGTERM handler is inherited at fork: under submitit (which ignores SIGTERM) the pool
    could then never stop its workers and the job hung.
    """
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def can_fork_workers(model: nn.Module) -> bool:
    """Whether chips can be evaluated in forked worker processes: a CPU model on a platform with ``fork``."""
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods() and all(
        t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def monte_carlo(model: nn.Module, data: Data, *, n_chips: int, seed: int = 0, batch_size: int | str = "auto",
                stream: Stream = Stream.EVAL, progress: bool | None = None, desc: str = "chips",
                calibrate: Callable[[nn.Module, int], None] | None = None,
                channels_last: bool | None = None, chips_per_pass: int | None = None,
                memory_budget: int | None = None, workers: int = 1, output: OutputFn | None = None,
                first_chip: int = 0, precision: str = "float32") -> MCResult:
    """Accuracy of ``model`` on ``data`` over ``n_chips`` simulated chips: chips ``first_chip`` to
    ``first_chip + n_chips - 1`` of the stream (a shard of a larger evaluation computes exactly its chips).

    The model must have analog layers (:func:`correctnet.analogize`). Data is moved to the model's
    device once (in channels-last layout where that is faster: ``channels_last=None`` decides, see
    :func:`use_channels_last`).

    ``chips_per_pass=K`` evaluates K chips in one pass (:func:`correctnet.analog.chips`): each batch of
    ``data`` is repeated K times along the batch dimension, every analog layer computes group ``k`` with
    chip ``k``, digital layers run once over all groups, and the per-chip correct counts come back to the
    host once per K chips. Chip ``i`` is the same chip (same seed, same static draw, same read-noise
    stream, same batches) as one by one, so per-chip accuracies are the same (the analog MVMs are the
    same calls; digital layers on the larger batch may differ in float round-off only). Memory grows
    with K (K chips' weights and K times the activations of one batch), never with ``n_chips``.
    ``chips_per_pass=None`` (the default) picks K (:func:`auto_chips_per_pass`): from ``memory_budget``
    bytes if given, else on CUDA from a quarter of the free memory and on CPU 1 (measured faster there);
    ``1`` is the one-by-one path: one chip's weights at a time. The model must
    not mix samples across its batch (it runs in eval mode) nor assume a fixed batch size.

    ``calibrate(model, chip_seed)``, if given, runs on each programmed chip before it is measured (e.g.
    :class:`correctnet.calibration.ChipCalibrator`); it never receives ``data``, and the model's state
    (parameters and buffers) is restored after each chip, so every chip is calibrated from the same
    starting point. A calibrator with a ``chips(model, seeds)`` context (as
    :class:`~correctnet.calibration.ChipCalibrator` has) calibrates K chips at once, each with its own copy
    of the digital modules it trains, and they are measured in the same pass; any other ``calibrate``
    runs chips one by one (``chips_per_pass`` is then ignored).

    ``workers=N`` (> 1) spreads the one-by-one chips over N forked processes, each with the current torch
    thread count (CPU models only, where ``fork`` exists; otherwise chips run here). Each chip computes the
    same thing as in this process, so the per-chip accuracies are identical; a calibrator's per-chip records
    (``last_record``/``add_record``, as :class:`~correctnet.calibration.ChipCalibrator` has) come back to it.

    Predictions are the argmax of the logits ``[N, C]`` in the model's output (``[K * N, C]`` for a chip
    batch): a tensor, a tuple's first element, a dict's ``"logits"``, a transformers ``ModelOutput``'s
    ``.logits``, or, for any other form, what ``output(raw output)`` returns
    (:func:`correctnet.tensors.logits_of`). A calibrator reads the outputs its own way: give
    :class:`~correctnet.calibration.ChipCalibrator` the same ``output=``.

    ``precision="bfloat16"`` / ``"float16"`` runs each measuring forward under ``torch.autocast`` on the model's
    device (matmuls and convolutions in that dtype, for speed on GPUs); the chips are the same chips: programming,
    read noise and every other draw stay float32. A calibrator trains in float32 either way.
    """
    forward_precision(model_device(model), precision, "precision")  # a bad value fails before any chip
    if n_chips < 1:
        raise ValueError(f"n_chips must be >= 1, got {n_chips}")
    if isinstance(first_chip, bool) or not isinstance(first_chip, int) or first_chip < 0:
        raise ConfigError(f"first_chip must be an integer >= 0, got {first_chip!r}")
    if chips_per_pass is not None and (isinstance(chips_per_pass, bool) or not isinstance(chips_per_pass, int)
                                       or chips_per_pass < 1):
        raise ConfigError(f"chips_per_pass must be null (chosen from memory) or an integer >= 1, got {chips_per_pass!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    batches = eval_batches(data, batch_size, model, channels_last)
    if batches:
        check_reads_once(model, batches[0][0])  # once per model: does every analog weight reach the output?
    seeds = [chip_seed(stream, seed, first_chip + i) for i in range(n_chips)]
    accs: list[float] = []
    snapshot = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                if calibrate is not None else None)
    calibrate_chips = getattr(calibrate, "chips", None)
    if (calibrate is not None and calibrate_chips is None) or n_chips == 1 or not batches:
        k = 1
    elif chips_per_pass is None:
        k = auto_chips_per_pass(model, batches[0][0], n_chips, memory_budget)
    else:
        k = min(chips_per_pass, n_chips)
    bar = tqdm(total=n_chips, desc=desc, disable=bar_disabled(progress), leave=False, dynamic_ncols=True)
    pace = Pace(desc, n_chips, unit="chip", bar=not bar.disable)
    with eval_mode(model):
        try:
            if k == 1 and workers > 1 and n_chips > 1 and can_fork_workers(model):
                import multiprocessing

                _WORK["args"] = (model, batches, seeds, calibrate, snapshot, output, precision)
                try:
                    with multiprocessing.get_context("fork").Pool(min(workers, n_chips),
                                                                  initializer=_init_worker) as pool:
                        for _, acc, record in pool.imap(_work_chip, range(n_chips)):
                            accs.append(acc)
                            if record is not None:
                                calibrate.add_record(record)  # type: ignore[union-attr]
                            bar.update(1)
                            pace.update()
                            bar.set_postfix(mean=f"{100 * np.mean(accs):.2f}%")
                        # let the workers exit on their own; leaving the block would SIGTERM them
                        pool.close()
                        pool.join()
                finally:
                    _WORK.clear()
            elif k == 1:
                for s in seeds:
                    with chip(model, s):
                        if calibrate is not None:
                            calibrate(model, s)
                        accs.append(_accuracy(model, batches, output, precision))
                    if snapshot is not None:
                        model.load_state_dict(snapshot)
                    bar.update(1)
                    pace.update()
                    bar.set_postfix(mean=f"{100 * np.mean(accs):.2f}%")
            else:
                total = sum(len(y) for _, y in batches)
                for i in range(0, n_chips, k):
                    group = seeds[i:i + k]
                    with chips(model, group) if calibrate_chips is None else calibrate_chips(model, group):
                        accs.extend(c / max(total, 1) for c in _chip_batch_correct(model, batches, len(group), output,
                                                                                      precision))
                    bar.update(len(group))
                    pace.update(len(group))
                    bar.set_postfix(mean=f"{100 * np.mean(accs):.2f}%")
        finally:
            bar.close()
            if snapshot is not None:
                model.load_state_dict(snapshot)
    return MCResult(accuracies=accs, seed=seed, chip_seeds=seeds)


# ----------------------------------------------------------------------------- reporting

def format_summary(model: str, dataset: str, variation: Mapping[str, Any] | None,
                   rows: Sequence[tuple[str, float, Mapping[str, Any]]], *, label: str = "stage",
                   original: float | None = None) -> str:
    """The summary table printed by train and evaluate, accuracies in percent.

    One row per ``(name, clean accuracy, MCResult.to_dict())``. ``variation`` (``VariationModel.to_dict()``)
    goes in the title; pass None when the rows are different variation models. ``original`` (the vanilla
    network's clean accuracy, a fraction) adds a first row with it and, per row, mean and p5 as % of it.
    """
    title = f"correctnet: {model} on {dataset}"
    if variation is not None:
        title += f", {variation['name']} variation sigma={variation['sigma']:g}"
    w = max([14] + [len(name) + 2 for name, _, _ in rows] + ([34] if original else []))
    head = f"  {label:<{w}}{'clean':>8}{'mean':>9}{'std':>7}{'p5':>8}{'min':>8}  chips"
    lines = [title, head + ("   mean/orig  p5/orig" if original else "")]
    if original:
        lines.append(f"  {'original (vanilla, no variation)':<{w}}{100 * original:>7.2f}%")
    for name, clean, mc in rows:
        line = (f"  {name:<{w}}{100 * clean:>7.2f}%{100 * mc['mean']:>8.2f}%{100 * mc['std']:>7.2f}"
                f"{100 * mc['p5']:>7.2f}%{100 * mc['min']:>7.2f}%  {mc['n_chips']:>5}")
        if original:
            line += f"   {100 * mc['mean'] / original:>8.1f}%{100 * mc['p5'] / original:>8.1f}%"
        lines.append(line)
    return "\n".join(lines)


def python_command(module: str) -> str:
    """``<this interpreter> -m <module>``, shell-quoted: a printed command that works when pasted as it is, in a
    shell where the virtual environment is not activated too."""
    return f"{shlex.quote(sys.executable or 'python')} -m {module}"


def evaluate_command(checkpoint_path: str | os.PathLike, trust: Sequence[str] | None = None, *,
                     calibrated: bool = False) -> str:
    """The shell command that re-runs the Monte-Carlo evaluation of ``checkpoint_path`` (absolute path) with this
    interpreter. ``trust``: the modules the checkpoint's model needs trusted (``trust=a,b``); by default those
    :func:`~correctnet.checkpoint.trust_needed` finds in the file (none when it cannot be read). ``calibrated``:
    replay the run's per-chip calibration too (``calibration=per_chip``: its "calibrated" stage)."""
    if trust is None:
        try:
            trust = trust_needed(read_metadata(checkpoint_path))
        except CorrectNetError:
            trust = []
    cmd = f"{python_command('correctnet.evaluate')} {shlex.quote(f'checkpoint={os.path.abspath(checkpoint_path)}')}"
    return cmd + (" calibration=per_chip" if calibrated else "") + (
        f" {shlex.quote('trust=' + ','.join(trust))}" if trust else "")


# ----------------------------------------------------------------------------- checkpoints

def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else must name an available device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but CUDA is not available here; use device=auto or cpu")
    return dev


def _section(d: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``d[key]`` if it is a dict, else ``{}`` (metadata read from a file may be malformed)."""
    v = d.get(key)
    return v if isinstance(v, dict) else {}


def _exported(meta: Mapping[str, Any], stage: str) -> dict[str, Any] | None:
    """The exported metrics of ``stage`` (``meta["metrics"]["stages"][stage]``) if well-formed, else None."""
    s = _section(_section(meta, "metrics"), "stages").get(stage)
    return s if isinstance(s, dict) and isinstance(s.get("mc"), dict) else None


def _reproduces(exported: Mapping[str, Any] | None, clean: float, mc: MCResult, first: int = 0,
                shard: bool = False) -> bool | None:
    """Whether ``clean`` and ``mc``'s per-chip accuracies are the exported stage's, exactly; None when the settings
    differ (another chip seed or count). ``shard``: ``mc`` holds chips ``first`` on, compared with the exported
    chips at those indices (None when the export has fewer)."""
    if not exported:
        return None
    e = exported["mc"]
    accs = e.get("accuracies")
    if e.get("seed") != mc.seed or not isinstance(accs, list):
        return None
    if (first + mc.n_chips > len(accs)) if shard else (e.get("n_chips") != mc.n_chips):
        return None
    return clean == exported.get("clean_accuracy") and mc.accuracies == accs[first:first + mc.n_chips]


def check_chip_range(chips: Any, key: str = "evaluation.chips") -> tuple[int, int]:
    """``(a, b)`` or ``"a:b"``: evaluation chips ``a`` to ``b - 1``, ``0 <= a < b <= MAX_CHIPS``."""
    given = chips
    if isinstance(chips, str):
        a, sep, b = chips.partition(":")
        try:
            chips = (int(a), int(b)) if sep else None
        except ValueError:
            chips = None
    ok = isinstance(chips, (tuple, list)) and len(chips) == 2 and all(
        isinstance(c, int) and not isinstance(c, bool) for c in chips) and 0 <= chips[0] < chips[1] <= MAX_CHIPS
    if not ok:
        raise ConfigError(f"{key} must be A:B, chips A to B-1 with 0 <= A < B <= {MAX_CHIPS}, got {given!r}")
    return int(chips[0]), int(chips[1])


def merge_shards(shards: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Join the results of :func:`evaluate_checkpoint` over disjoint chip ranges (``chips=(a, b)``, e.g. one job
    each) of one checkpoint and settings into the result one evaluation of all their chips gives: per-chip
    accuracies and seeds in chip order, statistics recomputed, ``reproduces_export`` against the checkpoint's
    exported stage. The ranges must tile ``[first, last)`` without gaps or overlaps; ``names`` (the files) are
    named in errors."""
    names = list(names) if names is not None else [f"shard {i}" for i in range(len(shards))]
    if len(shards) < 1:
        raise ConfigError("merge needs at least one shard")
    same = ("checkpoint", "stage", "clean_accuracy", "dataset_settings")
    key0 = {k: shards[0].get(k) for k in same}
    ev0 = {k: v for k, v in (shards[0].get("evaluation") or {}).items() if k not in ("n_chips", "chips")}
    variations0 = [r.get("variation") for r in shards[0].get("results", [])]
    for s, name in zip(shards, names):
        ev = {k: v for k, v in (s.get("evaluation") or {}).items() if k not in ("n_chips", "chips")}
        if {k: s.get(k) for k in same} != key0 or ev != ev0 or [r.get("variation") for r in s.get("results", [])] \
                != variations0:
            raise ConfigError(f"{name} is not a shard of the same evaluation as {names[0]} (checkpoint, stage, "
                              f"variations, evaluation seed, batch size, test images and data must be the same)")
        if any(not isinstance(r.get("chips"), list) for r in s["results"]):
            raise ConfigError(f"{name} records no chip range (results[].chips): not a result of correctnet.evaluate")
    order = sorted(range(len(shards)), key=lambda i: shards[i]["results"][0]["chips"][0])
    for prev, nxt in zip(order, order[1:]):
        end, start = shards[prev]["results"][0]["chips"][1], shards[nxt]["results"][0]["chips"][0]
        if end != start:
            raise ConfigError(f"{names[prev]} ends at chip {end} and {names[nxt]} starts at chip {start}: the shards "
                              f"must tile one range of chips, without gaps or overlaps")
    first = shards[order[0]]["results"][0]["chips"][0]
    try:
        exported = _exported(read_metadata(str(key0["checkpoint"])), str(key0["stage"]))
    except CorrectNetError:
        exported = None  # the checkpoint moved: the merge stands, the comparison with the export cannot be made
    results = []
    for j, base in enumerate(shards[0]["results"]):
        rows = [shards[i]["results"][j] for i in order]
        accs = [a for r in rows for a in r["mc"]["accuracies"]]
        seeds = [c for r in rows for c in r["chip_seeds"]]
        mc = MCResult(accs, base["mc"]["seed"], seeds)
        reproduces = None
        if exported is not None and all(r.get("reproduces_export") is not None for r in rows):
            reproduces = _reproduces(exported, shards[0]["clean_accuracy"], mc, first, shard=True)
        results.append({**base, "mc": mc.to_dict(), "chip_seeds": seeds, "chips": [first, first + len(accs)],
                        "reproduces_export": reproduces})
    n = len(results[0]["mc"]["accuracies"]) if results else 0
    return {**shards[order[0]], "results": results,
            "evaluation": {**shards[order[0]]["evaluation"], "n_chips": n, "chips": [first, first + n]},
            "seconds": sum(float(s.get("seconds", 0.0)) for s in shards), "shards": [names[i] for i in order]}


def evaluate_checkpoint(path: str | os.PathLike, *,
                        variations: Sequence[VariationModel | Mapping[str, Any]] | None = None,
                        n_chips: int | None = None, seed: int | None = None, batch_size: int | str | None = None,
                        test_samples: int | None = None,
                        dataset: Mapping[str, Any] | None = None, device: str | torch.device = "auto",
                        progress: bool = False,
                        calibrate: Callable[[nn.Module, Any, dict[str, Any]], Callable[[nn.Module, int], None]]
                        | None = None, workers: int = 1, chips_per_pass: int | str | None = "auto",
                        trust: Trust = None, chips: tuple[int, int] | None = None,
                        precision: str = "float32") -> dict[str, Any]:
    """Clean and Monte-Carlo accuracy of the checkpoint at ``path`` on its test split; a JSON-ready dict.

    Defaults come from the checkpoint: its variation model, its ``config.evaluation`` (n_chips, seed,
    batch_size) and its ``config.dataset`` + ``config.seed`` (so the split and normalisation are the
    training run's). ``variations`` evaluates other variation models instead, one result each: models,
    or dicts merged onto the stored ``VariationModel.to_dict()`` (a sigma sweep: ``[{"sigma": 0.3},
    {"sigma": 0.5}]``). ``dataset`` overrides ``name``, ``root``, ``val_fraction`` or ``seed`` (the split seed).
    A result whose settings equal the exported ones has ``reproduces_export``: whether clean and
    per-chip accuracies are identical to ``meta["metrics"]``; otherwise it is None.

    ``calibrate(model, data, meta)``, if given, returns the per-chip calibrator to pass to
    :func:`monte_carlo` (``data``: the run's splits; see
    :func:`correctnet.calibration.evaluate_calibrated`); the results are then compared with the exported
    ``calibrated`` stage. ``workers``: processes the chips are spread over; ``chips_per_pass``: chips per
    pass, ``"auto"`` or an integer (:func:`monte_carlo`; the per-chip accuracies do not depend on it, up to
    float round-off of calibrated chips). ``trust``: the modules the checkpoint may import
    (:func:`~correctnet.checkpoint.load_checkpoint`). ``chips=(a, b)``: only evaluation chips ``a`` to ``b - 1``
    (a shard; its ``reproduces_export`` compares them with the exported chips ``a:b``); :func:`merge_shards`
    joins shards into exactly the result of one evaluation of all their chips. ``precision``: the forward's
    autocast dtype (:func:`monte_carlo`); a result measured at another than float32 has ``reproduces_export`` None.

    The settings read back from the checkpoint are checked like the arguments (``n_chips`` in [1,
    :data:`MAX_CHIPS`], seeds non-negative 64-bit integers, ``batch_size`` auto or >= 1): a bad recorded value
    is one :class:`ConfigError` naming it, the file and the argument that overrides it.
    """
    cpp = resolve_chips_per_pass(chips_per_pass)
    if chips is not None:
        chips = check_chip_range(chips)
        if n_chips is not None:
            raise ConfigError("evaluation.chips=A:B and evaluation.n_chips=N: give one (a range sets the count)")
        n_chips = chips[1] - chips[0]
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model, meta = load_checkpoint(path, device=dev, trust=trust)
    cfg = _section(meta, "config")
    ev: dict[str, Any] = {"n_chips": 100, "seed": 0, "batch_size": 1000, "test_samples": None}
    recorded = {k: v for k, v in _section(cfg, "evaluation").items() if k in ev}
    given = {k: v for k, v in (("n_chips", n_chips), ("seed", seed), ("batch_size", batch_size),
                               ("test_samples", test_samples)) if v is not None}
    ev.update(recorded)
    ev.update(given)
    if chips is not None:
        ev["chips"] = list(chips)

    def origin(key: str, cli: str) -> str:
        """Where a bad value came from, when it is the checkpoint's."""
        return (f" (recorded in {path}, config.{key}; pass {cli}=... to override it)"
                if key.rpartition(".")[2] not in given and key.rpartition(".")[2] in recorded else "")

    for key, low, high in (("n_chips", 1, MAX_CHIPS), ("seed", 0, MAX_SEED)):
        v = ev[key]
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ConfigError(f"evaluation.{key} must be an integer in [{low}, {high}], got {v!r}"
                              f"{origin('evaluation.' + key, 'evaluation.' + key)}")
    try:
        ev["batch_size"] = eval_batch_size(ev["batch_size"], dev)
    except ConfigError as e:
        raise ConfigError(f"{e}{origin('evaluation.batch_size', 'evaluation.batch_size')}") from None
    split_seed = cfg.get("seed")
    if split_seed is not None and (dataset or {}).get("seed") is None and (
            isinstance(split_seed, bool) or not isinstance(split_seed, int) or not 0 <= split_seed <= MAX_SEED):
        raise ConfigError(f"seed (the split seed) must be an integer in [0, {MAX_SEED}], got {split_seed!r} "
                          f"(recorded in {path}, config.seed; pass seed=... to override it)")
    ds: dict[str, Any] = {"name": meta.get("dataset"), "root": None, "val_fraction": None, "seed": split_seed}
    ds.update({k: v for k, v in _section(cfg, "dataset").items() if k in DATASET_KEYS})
    source = meta.get("dataset_source")
    if isinstance(source, dict) and source.get("path"):
        ds["path"] = source["path"]  # a data file's absolute path: the training run's working directory is irrelevant
    over = dict(dataset or {})
    if "root" in over and "path" not in over and ds.get("path") is not None:
        over["path"] = over.pop("root")  # dataset=file: dataset.root=FILE points at a moved data file
    ds.update(over)
    unknown = set(over) - {"name", "root", "path", "val_fraction", "seed"}
    if unknown:
        raise ConfigError(f"unknown dataset settings {sorted(unknown)}; accepted: name, root, path, val_fraction, seed")
    lacking = [k for k in ("name", "val_fraction", "seed") if ds[k] is None]
    if lacking:  # guessing would silently give another split or normalisation
        raise ConfigError(f"{path} does not record its dataset settings {lacking}; pass "
                          + " ".join(f"{'seed' if k == 'seed' else 'dataset.' + k}=..." for k in lacking))
    stored_var = meta["variation"]
    def _merged(v: Mapping[str, Any]) -> VariationModel:
        # another model keeps only the stored sigma: the stored model's own keys (e.g. g_max) do not apply
        same = v.get("name", stored_var.get("name")) == stored_var.get("name")
        return make_variation(**{**(stored_var if same else {"sigma": stored_var.get("sigma")}), **v})

    models = [v if isinstance(v, VariationModel) else _merged(v)
              for v in (variations if variations is not None else [{}])]
    data = dataset_from_config({k: v for k, v in ds.items() if k != "seed"}, seed=ds["seed"])
    spec = meta["model"]
    if list(data.input_shape) != list(spec.get("input_shape") or data.input_shape) \
            or data.num_classes != spec.get("num_classes", data.num_classes):
        raise ConfigError(f"dataset {data.name!r} has inputs {list(data.input_shape)} and {data.num_classes} classes; "
                          f"the checkpoint's model expects {spec['input_shape']} and {spec['num_classes']}")

    try:
        data = dataclasses.replace(data, test=first_samples(data.test, ev["test_samples"]))
    except ConfigError as e:
        raise ConfigError(f"{e}{origin('evaluation.test_samples', 'evaluation.test_samples')}") from None
    stage = meta.get("stage", "model")
    calibrator = None
    if calibrate is not None:
        stage = "calibrated"
    exported = _exported(meta, stage)
    forward_precision(model_device(model), precision, "evaluation.precision")
    clean = clean_accuracy(model, data.test, batch_size=ev["batch_size"], precision=precision)
    results = []
    for v in models:
        set_variation(model, v)
        if calibrate is not None:  # built per variation model: its teacher and images are the same for all
            calibrator = calibrate(model, data, meta)
        first = chips[0] if chips is not None else 0
        mc = monte_carlo(model, data.test, n_chips=ev["n_chips"], seed=ev["seed"], batch_size=ev["batch_size"],
                         first_chip=first,
                         progress=progress, desc=f"{stage} {v.name} {v.sigma:g}", calibrate=calibrator,
                         workers=workers, chips_per_pass=cpp, precision=precision)
        same = (_reproduces(exported, clean, mc, first, shard=chips is not None)
                if v.to_dict() == stored_var and precision == "float32" else None)
        results.append({"variation": v.to_dict(), "mc": mc.to_dict(), "chip_seeds": mc.chip_seeds,
                        "chips": [first, first + mc.n_chips], "reproduces_export": same})
    return {"checkpoint": os.path.abspath(path), "model": spec["name"], "dataset": data.name, "stage": stage,
            "clean_accuracy": clean, "results": results, "dataset_settings": ds,
            # recorded when not float32, so shards measured at different precisions do not merge
            "evaluation": {**ev, **({"precision": precision} if precision != "float32" else {})},
            "device": str(dev), "exported_device": _section(meta, "metrics").get("device"),
            "versions": {"exported": _section(meta, "versions"), "evaluated": versions()},
            "seconds": time.perf_counter() - t0}
