"""The injector: make the crossbar layers of any ``nn.Module`` analog, without touching its code.

An analog layer computes with ``variation.apply(weight, noise)`` instead of each of its analog weights. It
has three modes:

* ``"off"``: exact nominal behaviour (the default after :func:`analogize`);
* ``"chip"``: a *programmed chip*: one static noise sample per weight, drawn from a chip seed by
  :func:`program_chip`, reused by every forward until the next chip;
* ``"chips"``: a *batch of programmed chips* (:func:`program_chips`, :func:`chips`): K chips at once, each
  with exactly the static draw and read-noise stream it has in ``"chip"`` mode. The model runs on
  ``x.repeat(K, 1, ...)``: the batch dimension holds K groups of N samples, group ``k`` for chip ``k``.
  Every analog layer splits its input into the K groups and computes group ``k`` with chip ``k``'s
  weights; digital layers (BatchNorm in eval mode, pooling, activations, compensators) run once on the
  whole ``[K*N, ...]`` batch, shared by the chips. Eval only: a layer that mixes samples across the batch
  (BatchNorm in train mode) would mix chips;
* ``"noisy"``: noise-aware training: a fresh sample at every forward; gradients flow to the nominal
  weights through the perturbed ones. With ``chips=K`` (:func:`noise_aware`) every forward draws K fresh
  chips and splits the batch into K nearly equal groups, group ``k`` computed with chip ``k`` (the same
  outputs and gradients as K one-chip forwards on the groups, converter noise aside; K >= the batch size:
  every sample on its own chip). Training only needs the batch kept intact up to the last analog layer;
  BatchNorm in training mode normalises over the whole batch, as a digital BatchNorm would.

**Layer kinds** (``SUPPORTED_TYPES``, all in ``DEFAULT_TYPES``) and what becomes analog in each:

=============================== =============================================== ==========================
layer                           analog weights (crossbar MVMs)                  digital
=============================== =============================================== ==========================
``nn.Linear``                   ``weight``                                      ``bias``
``nn.Conv1d/2d/3d`` (any        ``weight``                                      ``bias``
groups, depthwise included)
``nn.MultiheadAttention``       ``in_proj_weight``, or ``q/k/v_proj_weight``    ``in_proj_bias``,
                                when ``kdim``/``vdim`` differ; ``out_proj`` is  ``bias_k``/``bias_v``, the
                                its own analog Linear (``<name>.out_proj``),    attention itself (scores,
                                called as a module, so its variation,           softmax, weighted sum:
                                converters and compensator run                  activation x activation)
``nn.LSTM``/``nn.GRU``/         ``weight_ih_l*``, ``weight_hh_l*`` (``_reverse`` the biases
``nn.RNN``                      included) and ``weight_hr_l*`` (``proj_size``)
``nn.TransformerEncoderLayer``, through their ``nn.MultiheadAttention`` and     norms, activations
``nn.TransformerEncoder``,      ``nn.Linear`` sub-layers; PyTorch's fused
``nn.TransformerDecoderLayer``  inference fast path (which reads the weights
                                directly) is switched off while any analog
                                layer inside is active (not in ``off`` mode)
=============================== =============================================== ==========================

In ``off`` mode ``nn.MultiheadAttention`` runs PyTorch's own forward (bit-exact) and Transformer layers may
take their fast path, unless an analog layer inside is observed (a compensator, forward hooks), where the
module path runs: equal up to float round-off. In the other modes the analog attention runs its own
forward: the q/k/v projections are analog MVMs exactly like a Linear's (static draw, read noise,
converters; a packed ``in_proj_weight`` is one array, drawn as one tensor, read as three MVMs), then
PyTorch's attention (``scaled_dot_product_attention``, or the explicit softmax when ``need_weights``),
then ``self.out_proj(...)``. ``batch_first``, masks (bool/float, 2D/3D), ``key_padding_mask``,
``is_causal``, ``need_weights``/``average_attn_weights``, dropout, ``kdim``/``vdim``, ``bias``,
``add_zero_attn`` and ``bias_k``/``bias_v`` are supported. Switching the fast path off uses
``torch.backends.mha.set_fastpath_enabled`` (a process-wide flag) during the guarded module's forward.

Recurrent layers keep PyTorch's fused kernel: the forward runs with the analog weight tensors substituted
for the nominal ones. Converters (``dac``/``adc``) cannot act inside that kernel: with a converting
variation model the recurrent layers compute with analog weights but exact inputs and outputs, and
:func:`analogize`/:func:`set_variation` warn about it.

Compensators (:mod:`correctnet.compensation`) can only sit on layers whose forward runs them
(``AnalogLayer.can_compensate``): Linear and Conv layers, ``out_proj`` of an attention included; not the
attention or recurrent modules themselves.

**Every reader sees the chip.** Outside ``off`` mode an analog parameter read as an attribute
(``layer.weight``, the way any forward reads it; the technique of ``torch.nn.utils.parametrize``) is the
chip's value, differentiable in the nominal Parameter: a module that computes with another layer's weight
(``F.linear(x, self.qkv.weight, bias)``, timm's BEiT/EVA attention; ``torch.addmm(b, x, fc.weight.t())``)
computes with the chip, and its gradient reaches the nominal weight by the chain rule. Such a read happens
outside the layer's forward, so the layer's converters, tiles and compensator do not act on it
(:mod:`correctnet.reads` reports it when they would), and in the per-chip modes (``"chips"``, noise-aware
with K > 1 chips) it is refused (one chip per pass). :meth:`AnalogLayer.nominal` (or
:func:`nominal_weight`, or the :func:`nominal_reads` context) is the nominal Parameter in every mode; the
state_dict, ``named_parameters()`` and the optimizer hold the nominal Parameters as ever.

**Layers with their own forward**: a Linear/Conv subclass that overrides ``forward`` (timm's ``Linear``,
``Conv2dSame``) and a kind registered without an MVM (:func:`register_layer_kind`) run their own forward
with one read of each analog weight served to it (in per-chip modes once per chip, on that chip's share of
the batch, the first argument); a compensator runs on a Linear subclass's output. Converters and tiles
cannot act inside a forward correctnet does not know: :func:`analogize` names those layers once when the
variation converts. :func:`register_layer_kind` with ``mvm=`` gives the MVM, and the layer then runs
correctnet's own forward (converters, chip batches): transformers' GPT-2 ``Conv1D`` is registered so
(``[in, out]`` storage: ``transposed=True``), as soon as transformers is imported.

**One chip's static weights are computed once**: in ``"chip"`` mode without read noise and without
gradients, each analog weight's chip value is cached per chip (keyed by the nominal tensor's version,
storage, dtype and device), so repeated forwards of one chip cost a clean forward
(``experiments/one_chip_speed.py``).

Per-read noise (``VariationModel.apply_read``, e.g. ``rram`` with ``read_noise``) is drawn at every forward
in ``chip`` and ``noisy`` modes, on top of the static sample: in ``chip`` mode from a generator seeded by
``(chip seed, layer name + ":read")`` when the chip is programmed, so a chip's sequence of reads is
reproducible; in ``noisy`` mode from the training stream. A layer with several analog weights reads them
in a fixed order (``AnalogLayer.analog_parameters``) from that one generator. Converters
(``VariationModel.dac``/``adc``) quantize the layer's input and its analog output (the bias is digital,
added after) in those modes too; ``off`` mode is exact and applies neither.

**Chip batches** (``"chips"`` mode): each layer holds its stacked static draws ``[K, *noise.shape]`` and
one read generator per chip, and reads its K weights at every forward (``analog_weight`` returns
``[K, *weight.shape]``; without read noise and without gradients the K static weights are computed once
and cached while the nominal weight is unchanged). The crossbar MVMs run per chip, on that chip's slice
of the batch, with the same call as one by one (Linear: ``F.linear``; Conv: the layer's own convolution;
attention in-projections: ``F.linear``; recurrent layers: PyTorch's fused kernel with that chip's
weights), so a chip's analog outputs are bit-identical to one-by-one ``"chip"`` mode; converters act per
sample anyway. Measured on CPU (``experiments/results/mc_speed_batched_cpu.md``), the per-chip loop beat
one grouped convolution (``groups = K * groups`` over channel-stacked inputs) and unfold + ``bmm``, which
need two extra copies of the activations (or ``k*k`` times their memory). On CPU a chip batch measured
*slower* per chip than one by one (K times larger activations leave the caches); what it saves is one
pass of the digital layers and the Python overhead over K chips, which is meant for GPUs (kernels K
times larger; not measured yet). Inputs must have a batch dimension divisible by K (unbatched attention/RNN
inputs and ``PackedSequence`` are refused in this mode, with a message).

Seeding of the static draws: :func:`correctnet.seeding.weight_key`. **Tied weights**: a Parameter used by
several analog layers is one set of cells: under a chip every user sees the same static draw (the key of
its first user; per-read noise stays per use). In noise-aware mode each use draws independently.

**Weights left digital** are reported: :func:`analogize` warns once (:class:`DigitalWeightsWarning`) naming
every parameter with two or more dimensions that no analog layer computes with, and why (an
``nn.Embedding`` lookup table, a raw parameter used by a module's own forward, an excluded layer, ...);
biases and norm scales (one dimension) are digital by design and not listed. ``strict=True`` makes the
list an error. Parameters meant to stay digital are declared with ``digital=("pos_embed", "*.cls_token")``
(glob patterns on qualified parameter names) or by a ``digital_parameters`` attribute of any module class
(patterns relative to that module), e.g. ``digital_parameters = ("pos_embed", "cls_token")`` on a ViT.

The nominal parameters are never written. Layers are converted by swapping their class for an analog
subclass (the technique ``torch.nn.utils.parametrize`` uses), so parameter names, and therefore
``state_dict()`` keys, are unchanged: an analog model's state_dict loads into the plain model and back.
Chip samples live in non-persistent buffers and never appear in the state_dict.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .errors import ConfigError
from .seeding import layer_generator, weight_key
from .variation import VariationModel

MODES = ("off", "chip", "chips", "noisy")
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                                nn.MultiheadAttention, nn.RNN, nn.LSTM, nn.GRU)
DEFAULT_TYPES: tuple[type[nn.Module], ...] = SUPPORTED_TYPES
_LOOKUP_TYPES = (nn.Embedding, nn.EmbeddingBag)
_FAST_PATH_TYPES = (nn.TransformerEncoderLayer, nn.TransformerEncoder)


class _Reads(threading.local):
    """Per-thread read state: ``nominal`` > 0 makes analog layers serve their nominal weights (library code
    that needs them, PyTorch internals such as the recurrent layers' flat-weight bookkeeping)."""

    nominal = 0
    #: > 0 inside correctnet's own analog computations (they read nominal weights on purpose)
    internal = 0
    #: the active read probe (:mod:`correctnet.reads`), told about attribute reads of analog weights
    probe: Any = None


READ_STATE = _Reads()


@contextlib.contextmanager
def _internal() -> Iterator[None]:
    READ_STATE.internal += 1
    try:
        yield
    finally:
        READ_STATE.internal -= 1


@contextlib.contextmanager
def nominal_reads() -> Iterator[None]:
    """Inside this context ``layer.weight`` of an analog layer is the nominal Parameter in every mode."""
    READ_STATE.nominal += 1
    try:
        yield
    finally:
        READ_STATE.nominal -= 1


def nominal_weight(module: nn.Module, parameter: str = "weight") -> torch.Tensor:
    """The nominal Parameter ``parameter`` of ``module`` (analog or not), never a chip's value."""
    if isinstance(module, AnalogLayer):
        return module.nominal(parameter)
    return cast(torch.Tensor, getattr(module, parameter))


_METADATA = frozenset({"dtype", "shape", "device", "size", "dim", "ndim", "ndimension", "requires_grad", "layout",
                       "is_floating_point", "is_complex", "numel", "nelement", "is_cuda", "is_sparse", "is_meta",
                       "element_size", "__len__", "is_contiguous", "stride", "names", "is_leaf", "grad_fn"})


class _PerChipRead(torch.Tensor):
    """What an attribute read of an analog weight gets in per-chip modes (K chips, one forward): its metadata
    (dtype, shape, device) is the weight's; any computation with it is refused with a message, since no
    single tensor is K chips' weights."""

    _cn_message: str

    @staticmethod
    def of(weight: torch.Tensor, message: str) -> "_PerChipRead":
        t: Any = torch.Tensor._make_subclass(_PerChipRead, weight.detach(), False)
        t._cn_message = message
        return t

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property (dtype, shape, ...): the descriptor names it
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name not in _METADATA:
            msg = next((a._cn_message for a in args if isinstance(a, _PerChipRead)), "per-chip analog weight")
            raise ConfigError(msg)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class DigitalWeightsWarning(UserWarning):
    """:func:`analogize` left weights digital that were not declared digital (see the module docstring)."""


class AnalogLayer(nn.Module):
    """Mixin for analog layers. Not instantiated directly: see :func:`analogize`."""

    analog_name: str
    variation: VariationModel
    analog_mode: str
    chip_seed: int | None
    _digital_class: type[nn.Module]
    #: whether a ``compensator`` submodule runs in this layer's forward (see :mod:`correctnet.compensation`)
    can_compensate: bool = True

    #: the layer's own forward is not correctnet's: it runs with its analog weights served as attributes
    foreign_forward: bool = False
    #: the crossbar holds the transpose of the stored parameter (GPT-2's ``Conv1D``: ``[in, out]``)
    transposed: bool = False
    #: ``analogize(strict=True)``: weights left digital and reads that bypass the analog path are errors
    strict: bool = False

    def _analog_parameter_names(self) -> tuple[str, ...]:
        return ("weight",)

    def __getattr__(self, name: str) -> Any:
        # Attribute access is how any forward reads a weight (the technique of torch.nn.utils.parametrize):
        # outside "off" mode an analog parameter reads as the chip's value, differentiable in the nominal one.
        d = self.__dict__
        if name in d.get("_served_names", ()) and d.get("analog_mode", "off") != "off" and not READ_STATE.nominal:
            return self._served(name)
        return super().__getattr__(name)

    def nominal(self, parameter: str = "weight") -> torch.Tensor:
        """The nominal Parameter ``parameter`` (what the optimizer trains and the state_dict stores)."""
        return self._parameters[parameter]  # type: ignore[return-value]

    def _crossbar(self, w: torch.Tensor) -> torch.Tensor:
        """A stored weight in crossbar layout ``[out, in, ...]`` (and back: the transpose is its own inverse)."""
        return w.t() if self.transposed else w

    def _served(self, name: str) -> torch.Tensor:
        override = self.__dict__.get("_serve_override")
        if override is not None and name in override:
            return override[name]
        if READ_STATE.probe is not None:
            READ_STATE.probe.outside_read(self, name)
        if self.per_chip:  # metadata (dtype, shape, device) can be read; computing with it is refused
            with _internal():
                    return _PerChipRead.of(self.nominal(name), (
                    f"analog weight {self.analog_name}.{name} is computed with by code outside correctnet's own "
                    f"forward of that layer, which can be given one chip's weight, not {self.n_chips} chips at "
                    f"once: use one chip per pass (evaluation chips_per_pass=1, training chips_per_step=1)"))
        with _internal():
            return self._crossbar(self.analog_weight(name))

    def _init_analog(self, name: str, variation: VariationModel, digital_class: type[nn.Module]) -> None:
        self.analog_name = name
        self.variation = variation
        self.analog_mode = "off"
        self.chip_seed = None
        self._noise_seed: int | None = None
        self._noise_gen: torch.Generator | None = None
        self._read_gen: torch.Generator | None = None
        self.chip_seeds: list[int] | None = None  # "chips" mode: the K chips, in batch-group order
        self.noisy_chips = 1  # "noisy" mode: fresh chips per forward, each on its own group of the batch
        self._uneven_groups = False  # split the batch into K nearly equal groups (training), not K equal ones
        self._read_gens: list[torch.Generator] | None = None
        self._chips_cache: dict[str, tuple[Any, torch.Tensor]] = {}
        self._digital_class = digital_class
        #: fixed DAC range (input units) set by :func:`calibrate_input_ranges`; None = not calibrated. A float,
        #: but for the duration of ``train(..., TrainConfig(learn_input_ranges=True))``: a trainable scalar tensor
        self.input_range: float | torch.Tensor | None = None
        self._input_ranges: list[torch.Tensor] | None = None
        self._input_moments: list[float] | None = None  # calibrate_input_ranges(estimator="std") only
        self.analog_parameters: tuple[str, ...] = self._analog_parameter_names()
        self._served_names = frozenset(self.analog_parameters)
        self._chip_cache: dict[str, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._serve_override: dict[str, torch.Tensor] | None = None
        self._draw_keys = {p: weight_key(name, p) for p in self.analog_parameters}
        for p in self.analog_parameters:
            self.register_buffer(self._noise_attr(p), None, persistent=False)

    @staticmethod
    def _noise_attr(parameter: str) -> str:
        return "_chip_noise" if parameter == "weight" else f"_chip_noise_{parameter}"

    def chip_noise(self, parameter: str = "weight") -> torch.Tensor | None:
        """The static noise sample of ``parameter`` under the programmed chip (None outside chip mode)."""
        return getattr(self, self._noise_attr(parameter))

    def _device(self) -> torch.device:
        return self.nominal(self.analog_parameters[0]).device

    # -- state changes (never touch the nominal weights) ---------------------------------------------
    def program(self, seed: int) -> None:
        """Draw this layer's static noise for chip ``seed`` and switch to chip mode."""
        with torch.no_grad():
            for p in self.analog_parameters:
                w = self._crossbar(self.nominal(p))
                gen = layer_generator(seed, self._draw_keys[p], w.device)
                setattr(self, self._noise_attr(p), self.variation.sample(w, gen))
        self._read_gen = layer_generator(seed, self.analog_name + ":read", self._device())
        self._chip_cache = {}
        self.chip_seed = seed
        self.analog_mode = "chip"

    def program_chips(self, seeds: Sequence[int], *, uneven: bool = False) -> None:
        """Draw this layer's static noise for each chip of ``seeds`` (stacked ``[K, ...]``), "chips" mode.

        Chip ``k`` draws exactly what :meth:`program` draws for ``seeds[k]`` (same generator, same call).
        ``uneven``: the batch is split into K nearly equal groups (``torch.tensor_split``), not K equal ones.
        """
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ConfigError("program_chips needs at least one chip seed")
        with torch.no_grad():
            for p in self.analog_parameters:
                w = self._crossbar(self.nominal(p))
                setattr(self, self._noise_attr(p), torch.stack(
                    [self.variation.sample(w, layer_generator(s, self._draw_keys[p], w.device)) for s in seeds]))
        self._read_gens = [layer_generator(s, self.analog_name + ":read", self._device()) for s in seeds]
        self._read_gen, self.chip_seed, self.chip_seeds = None, None, seeds
        self._chips_cache = {}
        self._uneven_groups = uneven
        self.analog_mode = "chips"

    @property
    def n_chips(self) -> int:
        """K in "chips" mode, chips per forward in "noisy" mode, else 1."""
        if self.analog_mode == "chips":
            return len(self.chip_seeds) if self.chip_seeds else 1
        return self.noisy_chips if self.analog_mode == "noisy" else 1

    @property
    def per_chip(self) -> bool:
        """Whether a forward splits the batch into groups, one per chip ("chips" mode, or "noisy" with K > 1)."""
        return self.analog_mode == "chips" or (self.analog_mode == "noisy" and self.noisy_chips > 1)

    def set_noisy(self, seed: int, chips: int = 1) -> None:
        """Draw fresh noise at every forward from a generator seeded by ``seed``.

        ``chips`` > 1: every forward draws ``chips`` fresh chips and splits the batch into that many
        nearly equal groups (``torch.tensor_split``), group ``k`` computed with chip ``k`` (each sample on
        its own chip when ``chips`` >= the batch size). ``chips=1`` draws exactly what it always did.
        """
        if isinstance(chips, bool) or not isinstance(chips, int) or chips < 1:
            raise ConfigError(f"chips per noise-aware forward must be an integer >= 1, got {chips!r}")
        self._noise_seed, self._noise_gen = seed, None
        self.noisy_chips = chips
        self.analog_mode = "noisy"

    def set_off(self) -> None:
        self.analog_mode, self.chip_seed = "off", None
        for p in self.analog_parameters:
            setattr(self, self._noise_attr(p), None)
        self._noise_seed, self._noise_gen, self._read_gen = None, None, None
        self.chip_seeds, self._read_gens, self._chips_cache = None, None, {}
        self.noisy_chips, self._uneven_groups = 1, False
        self._chip_cache = {}

    def _analog_state(self) -> tuple:
        return (self.analog_mode, self.chip_seed, [self.chip_noise(p) for p in self.analog_parameters],
                self._noise_seed, self._noise_gen, self._read_gen, self.chip_seeds, self._read_gens,
                self._chips_cache, self.noisy_chips, self._uneven_groups, self._chip_cache)

    def _set_analog_state(self, state: tuple) -> None:
        (self.analog_mode, self.chip_seed, noises, self._noise_seed, self._noise_gen, self._read_gen,
         self.chip_seeds, self._read_gens, self._chips_cache, self.noisy_chips, self._uneven_groups,
         self._chip_cache) = state
        for p, n in zip(self.analog_parameters, noises):
            setattr(self, self._noise_attr(p), n)

    def analog_weight(self, parameter: str = "weight") -> torch.Tensor:
        """The weight the hardware computes with in the current mode (differentiable in the nominal one).

        Each call is one read (it advances the read-noise / training generator where there is one). In the
        crossbar layout ``[out, in, ...]`` (the transpose of a ``transposed`` layer's stored parameter).
        In "chip" mode without read noise and without gradients the chip's weight is computed once per chip
        (cached while the nominal weight is unchanged).
        """
        w = self._crossbar(self.nominal(parameter))
        if self.analog_mode == "off":
            return w
        if self.analog_mode == "chips":
            return self._chips_weight(parameter, w)
        if self.analog_mode == "chip":
            noise = self.chip_noise(parameter)
            assert noise is not None  # program() drew it: "chip" mode always has its static noise
            static = not self.variation.reads and not torch.is_grad_enabled()
            key = (w._version, w.data_ptr(), w.dtype, w.device)
            if static:
                hit = self._chip_cache.get(parameter)
                if hit is not None and hit[0] == key and hit[1] is noise:
                    return hit[2]
            if self._read_gen is not None and self._read_gen.device != w.device:
                self._read_gen = layer_generator(self.chip_seed or 0, self.analog_name + ":read", w.device)
            out = self.variation.apply_read(w, noise, self._read_gen)
            if static:
                self._chip_cache[parameter] = (key, noise, out)
            return out
        if self.noisy_chips > 1:
            return self.analog_weights((parameter,))[parameter]
        return self._noisy_draw(w)

    def _noisy_draw(self, w: torch.Tensor) -> torch.Tensor:
        """"noisy" mode: one fresh chip's read of nominal weight ``w`` (static draw + read noise)."""
        if self._noise_gen is None or self._noise_gen.device != w.device:
            self._noise_gen = layer_generator(self._noise_seed or 0, self.analog_name, w.device)
        v, gen = self.variation, self._noise_gen
        return v.apply_read(w, v.sample(w, gen), gen)

    def _chips_weight(self, parameter: str, w: torch.Tensor) -> torch.Tensor:
        """"chips" mode: one read of each chip's weight, stacked ``[K, *w.shape]`` (chip k as in "chip" mode)."""
        v, noise = self.variation, self.chip_noise(parameter)
        assert noise is not None  # program_chips() drew it: "chips" mode always has its static noise
        static = not v.reads and not torch.is_grad_enabled()
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if static:
            hit = self._chips_cache.get(parameter)
            if hit is not None and hit[0] == key:
                return hit[1]
        if self._read_gens is not None and self._read_gens[0].device != w.device:
            self._read_gens = [layer_generator(s, self.analog_name + ":read", w.device) for s in self.chip_seeds or []]
        gens: Sequence[torch.Generator | None] = self._read_gens or [None] * len(noise)
        out = torch.stack([v.apply_read(w, noise[k], gens[k]) for k in range(len(noise))])
        if static:
            self._chips_cache[parameter] = (key, out)
        return out

    def analog_weights(self, parameters: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """One read of every analog weight of the layer (or of ``parameters``), in ``analog_parameters`` order.

        "noisy" mode with K chips per forward: each ``[K, *w.shape]``, drawn chip by chip (chip k draws all
        its weights, then chip k+1), the order in which K one-chip forwards would draw them."""
        names = tuple(parameters) if parameters is not None else self.analog_parameters
        if self.analog_mode == "noisy" and self.noisy_chips > 1:
            draws = [{p: self._noisy_draw(self._crossbar(self.nominal(p))) for p in names}
                     for _ in range(self.noisy_chips)]
            return {p: torch.stack([d[p] for d in draws]) for p in names}
        return {p: self.analog_weight(p) for p in names}

    # -- forward (subclasses give the operation, its bias broadcast and the vector dims) --------------
    def _mvm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def _vector_dims(self) -> tuple[int, ...]:
        """Trailing dimensions of one input/output vector (the converters take their range over them)."""
        return (-1,)

    def _chip_groups(self, x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, ...]:
        """Per-chip modes: ``x`` split along its batch dimension ``dim`` into the K chips' groups.

        Equal groups in "chips" mode (evaluation: the input is K copies of a batch); K nearly equal ones in
        "noisy" mode and for ``uneven`` chips (training: group k is chip k's share of the batch; a batch
        of fewer than K samples uses its first chips only)."""
        k = self.n_chips
        if x.dim() > dim and (self.analog_mode == "noisy" or self._uneven_groups):
            return tuple(g for g in x.tensor_split(k, dim) if g.shape[dim])
        if x.dim() <= dim or x.shape[dim] % k:
            raise ConfigError(
                f"analog layer {self.analog_name!r} runs {k} chips in one pass and needs an input whose batch "
                f"dimension ({dim}) holds K groups of samples (x.repeat(K, ...)); got shape {tuple(x.shape)}. "
                f"Models that reshape or mix the batch cannot run chip batches: use one chip per pass "
                f"(evaluation chips_per_pass=1, training chips_per_step=1)")
        return x.chunk(k, dim)

    def _chips_mvm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """"chips" mode: group ``k`` of ``x`` through chip ``k``'s ``weight[k]`` (the one-by-one call)."""
        ws = weight.unbind(0)  # one autograd node: indexing weight[k] K times costs K full-size gradients
        return torch.cat([self._mvm(xk, ws[k], bias) for k, xk in enumerate(self._chip_groups(x))])

    def _mvm_any(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._chips_mvm(x, weight, bias) if self.per_chip else self._mvm(x, weight, bias)

    def _converted_mvm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       weight_scale: torch.Tensor | None = None) -> torch.Tensor:
        """One crossbar MVM with the layer's converters (in chip/chips/noisy modes); the bias is digital.

        ``weight_scale``: the converters' full-scale weight (``VariationModel.weight_scale`` of the nominal
        array this MVM reads; default: of ``self.weight``), shaped like the weight's first dimension or a scalar.
        """
        v = self.variation
        dims = self._vector_dims()
        ranges = getattr(self, "_input_ranges", None)
        if ranges is not None:  # calibrate_input_ranges: per-vector max|x| of the nominal model
            ranges.append(x.detach().abs().amax(dim=dims).flatten().float().cpu())
            moments = getattr(self, "_input_moments", None)
            if moments is not None:  # estimator "std": count, sum and sum of squares (float64)
                xd = x.detach().double()
                moments[0] += xd.numel()
                moments[1] += float(xd.sum())
                moments[2] += float((xd * xd).sum())
        if self.analog_mode == "off" or not v.converts:
            return self._mvm_any(x, weight, bias)
        if v.needs_input_range and self.input_range is None:
            raise ConfigError(f"analog layer {self.analog_name!r} has no input range for variation.dac_range="
                              f"{getattr(v, 'dac_range', '?')}: run correctnet.analog.calibrate_input_ranges(model, "
                              f"batches) on the nominal model first")
        tiles = v.tiles(weight.shape[1:] if self.per_chip else weight.shape)
        if tiles is not None and not self._can_tile():
            raise ConfigError(f"analog layer {self.analog_name!r} ({type(self).__name__}) cannot be split into tiles "
                              f"(variation.tile_rows / tile_cols): only Linear and ungrouped Conv layers can")
        if weight_scale is None:
            weight_scale = v.weight_scale(self._crossbar(self.nominal(self.analog_parameters[0])))
        if tiles is None and weight_scale is not None and weight_scale.numel() > 1:
            weight_scale = self._bias_view(weight_scale.reshape(-1))
        if self.per_chip:
            gens: Sequence[torch.Generator | None] = (
                (self._read_gens or [None] * self.n_chips) if self.analog_mode == "chips" else [self._noise_gen] * self.n_chips)
            ws = weight.unbind(0)
            y = torch.cat([self._convert(xk, ws[k], weight_scale, tiles, gens[k])
                           for k, xk in enumerate(self._chip_groups(x))])
        else:
            gen = self._read_gen if self.analog_mode == "chip" else self._noise_gen
            y = self._convert(x, weight, weight_scale, tiles, gen)
        return y if bias is None else y + self._bias_view(bias)  # the bias is added after the ADC

    def _can_tile(self) -> bool:
        return getattr(self, "groups", 1) == 1 and not isinstance(self, nn.MultiheadAttention)

    def _convert(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                 tiles: tuple[list[slice], list[slice]] | None, gen: torch.Generator | None) -> torch.Tensor:
        """One chip's converted MVM; tiled: each tile has its own converters, row tiles' outputs summed digitally."""
        v, dims = self.variation, self._vector_dims()
        kw: dict[str, Any] = dict(input_range=self.input_range, generator=gen)
        if tiles is None:
            return v.convert(lambda xx: self._mvm(xx, weight, None), x, dims, weight_scale=scale, **kw)
        d = dims[0]  # the input channel / feature dimension of x, and the output's
        outs: list[torch.Tensor] = []
        for o in tiles[0]:
            acc: torch.Tensor | None = None
            for i in tiles[1]:
                s = None if scale is None else self._bias_view(scale[o, i].flatten(1).amax(1))

                def mvm(xx: torch.Tensor, wt: torch.Tensor = weight[o, i]) -> torch.Tensor:  # this tile's weights
                    return self._mvm(xx, wt, None)

                part = v.convert(mvm, x.narrow(d, i.start, i.stop - i.start), dims, weight_scale=s, **kw)
                acc = part if acc is None else acc + part
            outs.append(cast(torch.Tensor, acc))  # not None: tiles() gives a layer with inputs at least one row tile
        return torch.cat(outs, dim=d)

    def _analog_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compensate(x, self._converted_mvm(x, self.analog_weight(), cast("torch.Tensor | None", self.bias)))

    def extra_repr(self) -> str:
        base = super().extra_repr()
        own = f"analog={self.variation.name}(sigma={self.variation.sigma:g}), mode={self.analog_mode}"
        return f"{base}, {own}" if base else own

    def _compensate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # a digital compensation module (correctnet.compensation) adds its correction to the analog output
        comp = self._modules.get("compensator")
        return y if comp is None else comp(x, y)


class AnalogLinear(AnalogLayer, nn.Linear):
    def _mvm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._analog_forward(x)


class AnalogNonDynamicallyQuantizableLinear(AnalogLinear, NonDynamicallyQuantizableLinear):
    """``out_proj`` of ``nn.MultiheadAttention``."""


class _AnalogConv(AnalogLayer):
    # from nn.Conv1d/2d/3d, the other base of each concrete class (declared for the type checker only)
    kernel_size: tuple[int, ...]
    _conv_forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

    def _mvm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)

    def _bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        return bias.view(-1, *[1] * len(self.kernel_size))

    def _vector_dims(self) -> tuple[int, ...]:  # one sample: channels and spatial dims
        return tuple(range(-1 - len(self.kernel_size), 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._analog_forward(x)


class AnalogConv1d(_AnalogConv, nn.Conv1d):
    pass


class AnalogConv2d(_AnalogConv, nn.Conv2d):
    pass


class AnalogConv3d(_AnalogConv, nn.Conv3d):
    pass


# ----------------------------------------------------------------------------- attention

def _observed(module: nn.Module) -> bool:
    """Whether a module call of ``module`` must really happen (hooks, an active analog layer, a compensator)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return True
    return isinstance(module, AnalogLayer) and (module.analog_mode != "off"
                                                or module._modules.get("compensator") is not None
                                                or getattr(module, "_input_ranges", None) is not None)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True: not allowed) as the additive float mask PyTorch uses; float masks unchanged."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class AnalogMultiheadAttention(AnalogLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with analog in-projections and ``out_proj`` called as a module."""

    can_compensate = False

    def _analog_parameter_names(self) -> tuple[str, ...]:
        if self._qkv_same_embed_dim:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")

    def _mvm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.analog_mode == "off" and not _observed(self.out_proj) and not _observed(self):
            return nn.MultiheadAttention.forward(
                self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        return self._attention(query, key, value, key_padding_mask, need_weights, attn_mask,
                               average_attn_weights, is_causal)

    def analog_weights_nominal(self) -> list[torch.Tensor]:
        return [self.nominal(p) for p in self.analog_parameters]

    def _qkv_scales(self) -> tuple[torch.Tensor | None, ...]:
        """The converters' full-scale weights of the q/k/v MVMs (a packed array has one mapping)."""
        v = self.variation
        if self.analog_mode == "off" or not v.converts:
            return None, None, None
        if any(v.tiles(w.shape) is not None for w in self.analog_weights_nominal()):
            raise ConfigError(f"analog attention {self.analog_name!r} cannot be split into tiles "
                              f"(variation.tile_rows / tile_cols): only Linear and ungrouped Conv layers can")
        if not self._qkv_same_embed_dim:
            return tuple(v.weight_scale(self.nominal(p)) for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
        s = v.weight_scale(self.nominal("in_proj_weight"))
        if s is None or s.numel() == 1:
            return s, s, s
        return s.reshape(-1).chunk(3)

    def _attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                   is_causal):
        if query.is_nested or key.is_nested or value.is_nested:
            raise ConfigError(f"analog attention {self.analog_name!r} got a nested tensor; correctnet switches "
                              f"PyTorch's nested fast path off around analog layers, so this comes from the caller")
        batched = query.dim() == 3
        if not batched:  # internal layout: [N, L, E]
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, e = query.shape
        h = self.num_heads
        d = e // h
        if e != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {e}")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        causal = is_causal and key_padding_mask is None and not need_weights
        kpm = _float_mask(key_padding_mask, query.dtype)
        am = None if causal else _float_mask(attn_mask, query.dtype)

        if self.per_chip and not batched:
            raise ConfigError(f"analog attention {self.analog_name!r} runs {self.n_chips} chips in one pass and "
                              f"needs batched inputs (the chips are groups of the batch); got an unbatched query")
        w = self.analog_weights()
        if self._qkv_same_embed_dim:
            wq, wk, wv = w["in_proj_weight"].chunk(3, dim=-2)
        else:
            wq, wk, wv = w["q_proj_weight"], w["k_proj_weight"], w["v_proj_weight"]
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        sq, sk, sv = self._qkv_scales()
        q = self._converted_mvm(query, wq, bq, sq)
        k = self._converted_mvm(key, wk, bk, sk)
        v = self._converted_mvm(value, wv, bv, sv)
        src = k.shape[1]
        if am is not None:
            if am.dim() == 2:
                if am.shape != (tgt, src):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {am.shape}, but should be {(tgt, src)}.")
                am = am.view(1, 1, tgt, src)
            elif am.dim() == 3:
                if am.shape != (n * h, tgt, src):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {am.shape}, but should be "
                                       f"{(n * h, tgt, src)}.")
                am = am.view(n, h, tgt, src)
            else:
                raise RuntimeError(f"attn_mask's dimension {am.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:  # digital biases appended to the sequence
            k = torch.cat([k, self.bias_k.reshape(1, 1, e).expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, e).expand(n, 1, e)], dim=1)
            am = None if am is None else F.pad(am, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        q = q.reshape(n, tgt, h, d).transpose(1, 2)
        k = k.reshape(n, k.shape[1], h, d).transpose(1, 2)
        v = v.reshape(n, v.shape[1], h, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(n, h, 1, d)], dim=2)
            am = None if am is None else F.pad(am, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        src = k.shape[2]
        mask = am
        if kpm is not None:
            if kpm.shape != (n, src):
                raise AssertionError(f"expecting key_padding_mask shape of {(n, src)}, but got {kpm.shape}")
            kpm = kpm.view(n, 1, 1, src)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / d), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0:  # as PyTorch: the returned weights are the dropped-out ones
                weights = F.dropout(weights, p=p)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, e))  # a module call: out_proj's own forward
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def mvm_macs(self, args: tuple, kwargs: dict, output: Any) -> int:
        """MACs of the analog in-projections of one call (batch included; ``out_proj`` counts its own)."""
        names = ("query", "key", "value")
        q, k, v = (args[i] if i < len(args) else kwargs[names[i]] for i in range(3))
        rows = lambda t: t.numel() // t.shape[-1]  # noqa: E731
        return self.embed_dim * (rows(q) * self.embed_dim + rows(k) * self.kdim + rows(v) * self.vdim)


# ----------------------------------------------------------------------------- recurrent layers

class _AnalogRNN(AnalogLayer):
    """RNN/LSTM/GRU: PyTorch's kernel with the analog weight tensors substituted (see the module docstring)."""

    can_compensate = False
    # from nn.RNNBase, the other base of each concrete class (declared for the type checker only)
    batch_first: bool
    _flat_weights_names: list[str]
    _flat_weights: list[torch.Tensor | None]

    def _analog_parameter_names(self) -> tuple[str, ...]:
        return tuple(n for n in self._flat_weights_names if n.startswith("weight_"))

    # PyTorch's flat-weight bookkeeping compares and stores the nominal Parameters
    def _weights_have_changed(self) -> bool:
        with nominal_reads():
            return bool(super()._weights_have_changed())  # type: ignore[misc]

    def _init_flat_weights(self) -> None:
        with nominal_reads():
            super()._init_flat_weights()  # type: ignore[misc]

    def forward(self, input: Any, hx: Any = None) -> Any:
        if self.analog_mode == "off":
            return super().forward(input, hx)
        update = getattr(self, "_update_flat_weights", None)
        if update is not None:  # rebuild now, so that the forward's own check keeps the substituted list
            update()
        w = self.analog_weights()
        if self.per_chip:
            return self._chips_forward(input, hx, w)
        return self._forward_with(input, hx, w)

    def _forward_with(self, input: Any, hx: Any, w: dict[str, torch.Tensor]) -> Any:
        saved = self._flat_weights
        names = self._flat_weights_names
        self._flat_weights = [w.get(nm, t) for nm, t in zip(names, saved)]
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = saved

    def _chips_forward(self, input: Any, hx: Any, w: dict[str, torch.Tensor]) -> Any:
        """"chips" mode: PyTorch's kernel once per chip on its group of the batch (a loop inside the pass)."""
        if isinstance(input, nn.utils.rnn.PackedSequence) or input.dim() != 3:
            raise ConfigError(f"analog recurrent layer {self.analog_name!r} runs {self.n_chips} chips in one pass "
                              f"and needs a batched, unpacked input [batch, seq, feature] or [seq, batch, feature]"
                              f"; use one chip per pass (chips_per_pass=1, chips_per_step=1) for PackedSequence "
                              f"or unbatched inputs")
        bdim = 0 if self.batch_first else 1
        xs = self._chip_groups(input, bdim)
        if hx is None:
            hs: list[Any] = [None] * len(xs)
        elif isinstance(hx, tuple):
            hs = list(zip(*(self._chip_groups(h, 1) for h in hx)))
        else:
            hs = list(self._chip_groups(hx, 1))
        per_chip = {n: t.unbind(0) for n, t in w.items()}
        outs = [self._forward_with(xk, hk, {n: t[k] for n, t in per_chip.items()}) for k, (xk, hk) in enumerate(zip(xs, hs))]
        out = torch.cat([o[0] for o in outs], bdim)
        if isinstance(outs[0][1], tuple):
            return out, tuple(torch.cat([o[1][i] for o in outs], 1) for i in range(len(outs[0][1])))
        return out, torch.cat([o[1] for o in outs], 1)

    def mvm_macs(self, args: tuple, kwargs: dict, output: Any) -> int:
        """MACs of the analog weights over one call (every time step, layer and direction; batch included)."""
        x = args[0] if args else kwargs["input"]
        steps = int(x.batch_sizes.sum()) if isinstance(x, nn.utils.rnn.PackedSequence) else x.numel() // x.shape[-1]
        total = 0
        for name in self.analog_parameters:
            total += getattr(self, name).numel()
        return steps * total


class AnalogRNN(_AnalogRNN, nn.RNN):
    pass


class AnalogLSTM(_AnalogRNN, nn.LSTM):
    pass


class AnalogGRU(_AnalogRNN, nn.GRU):
    pass


_ANALOG_CLASSES: dict[type[nn.Module], type[AnalogLayer]] = {
    nn.Linear: AnalogLinear, NonDynamicallyQuantizableLinear: AnalogNonDynamicallyQuantizableLinear,
    nn.Conv1d: AnalogConv1d, nn.Conv2d: AnalogConv2d, nn.Conv3d: AnalogConv3d,
    nn.MultiheadAttention: AnalogMultiheadAttention, nn.RNN: AnalogRNN, nn.LSTM: AnalogLSTM, nn.GRU: AnalogGRU,
}


class _ForeignForward(AnalogLayer):
    """A layer whose forward is its own (a Linear/Conv subclass, a registered kind without ``mvm``): that
    forward runs unchanged, reading its analog weights as attributes. One read of every analog weight per
    call (served to every access within the call); in per-chip modes the forward runs once per chip on that
    chip's group of the batch (the first argument). Converters and tiles cannot act inside it."""

    foreign_forward = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        fwd = self._digital_class.forward
        if self.analog_mode == "off":
            y = fwd(self, *args, **kwargs)
        else:
            with _internal():
                w = self.analog_weights()
            if not self.per_chip:
                y = self._with_served({p: self._crossbar(t) for p, t in w.items()}, fwd, args, kwargs)
            else:
                if not args or not isinstance(args[0], torch.Tensor):
                    raise ConfigError(f"analog layer {self.analog_name!r} runs {self.n_chips} chips in one pass and "
                                      f"needs its input tensor as the first positional argument")
                per = {p: t.unbind(0) for p, t in w.items()}
                y = torch.cat([self._with_served({p: self._crossbar(t[k]) for p, t in per.items()}, fwd,
                                                 (xk, *args[1:]), kwargs)
                               for k, xk in enumerate(self._chip_groups(args[0]))])
        if self.can_compensate and args:
            with _internal():
                return self._compensate(args[0], y)
        return y

    def _with_served(self, weights: dict[str, torch.Tensor], fwd: Callable[..., Any], args: tuple,
                     kwargs: dict) -> Any:
        saved = self._serve_override
        self._serve_override = weights
        try:
            return fwd(self, *args, **kwargs)
        finally:
            self._serve_override = saved


class _RegisteredMVM(AnalogLayer):
    """A registered layer kind with a known MVM (:func:`register_layer_kind` with ``mvm``)."""

    _kind: "LayerKind"
    can_compensate = False

    def _analog_parameter_names(self) -> tuple[str, ...]:
        return self._kind.weights

    def _mvm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        assert self._kind.mvm is not None
        return self._kind.mvm(self, x, weight, bias)

    def _can_tile(self) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.analog_mode == "off" and not _observed(self):
            return cast(torch.Tensor, self._digital_class.forward(self, x))
        bias = self._parameters.get(self._kind.bias) if self._kind.bias else None
        return self._compensate(x, self._converted_mvm(x, self.analog_weight(self._kind.weights[0]), bias))

    def mvm_macs(self, args: tuple, kwargs: dict, output: Any) -> int:
        """MACs of one call: every input vector (last dimension) times the crossbar's weights."""
        x = args[0] if args else next(iter(kwargs.values()))
        return x.numel() // x.shape[-1] * self.nominal(self._kind.weights[0]).numel()


@dataclass(frozen=True)
class LayerKind:
    """How correctnet makes a layer class analog (see :func:`register_layer_kind`)."""

    weights: tuple[str, ...] = ("weight",)
    mvm: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    bias: str | None = "bias"
    transposed: bool = False


_KINDS: dict[type[nn.Module], LayerKind] = {}


def _conv1d_mvm(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # transformers' Conv1D computes addmm(bias, x, W[in, out]); weight here is the crossbar's [out, in] = W.T
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    return y.view(*x.shape[:-1], weight.shape[0])


#: kinds known by qualified class name, registered when their module is imported (no import from here)
_LAZY_KINDS: dict[str, LayerKind] = {
    "transformers.pytorch_utils.Conv1D": LayerKind(("weight",), _conv1d_mvm, "bias", transposed=True),
}


def register_layer_kind(cls: type[nn.Module], *, weights: Sequence[str] = ("weight",),
                        mvm: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
                        | None = None, bias: str | None = "bias", transposed: bool = False) -> None:
    """Teach :func:`analogize` a layer class of your own (subclasses included).

    ``weights``: its parameters that are crossbar arrays. ``mvm(layer, x, weight, bias) -> y``: the crossbar
    MVM given one analog ``weight`` in crossbar layout ``[out, in, ...]`` (``bias`` may be None; the
    converters call it without): correctnet then runs its own forward for the layer (converters, chip
    batches). Without ``mvm`` the layer's own forward runs with its analog weights served as attributes
    (any number of weights; no converters or tiles inside it). ``transposed``: the parameter is stored
    ``[in, out]`` (as GPT-2's ``Conv1D``); the crossbar holds its transpose.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"register_layer_kind needs an nn.Module class, got {cls!r}")
    weights = tuple(weights)
    if not weights or not all(isinstance(w, str) and w for w in weights):
        raise ConfigError(f"register_layer_kind({cls.__name__}): weights must be parameter names, got {weights!r}")
    if mvm is not None and len(weights) != 1:
        raise ConfigError(f"register_layer_kind({cls.__name__}): an mvm takes one weight; got weights={weights!r} "
                          f"(leave mvm=None to run the layer's own forward with every weight served)")
    _KINDS[cls] = LayerKind(weights, mvm, bias, bool(transposed))
    for k in [k for k in _ANALOG_CLASSES if issubclass(k, cls)]:
        del _ANALOG_CLASSES[k]


def _registered_kinds() -> dict[type[nn.Module], LayerKind]:
    import sys
    for qual, kind in _LAZY_KINDS.items():
        mod, _, name = qual.rpartition(".")
        cls = getattr(sys.modules.get(mod), name, None)
        if isinstance(cls, type) and cls not in _KINDS:
            _KINDS[cls] = kind
    return _KINDS


def _supported_types() -> tuple[type[nn.Module], ...]:
    return SUPPORTED_TYPES + tuple(_registered_kinds())


def _kind_of(cls: type[nn.Module]) -> LayerKind | None:
    return next((k for c, k in _registered_kinds().items() if issubclass(cls, c)), None)


def _analog_class(cls: type[nn.Module], name: str) -> type[AnalogLayer]:
    if cls in _ANALOG_CLASSES:
        return _ANALOG_CLASSES[cls]
    kind = _kind_of(cls)
    if kind is not None:
        if kind.mvm is not None:
            new = type(f"Analog{cls.__name__}", (_RegisteredMVM, cls), {"_kind": kind, "transposed": kind.transposed})
        else:
            new = type(f"Analog{cls.__name__}", (_ForeignForward, cls), {
                "transposed": kind.transposed, "can_compensate": False,
                "_analog_parameter_names": lambda self, w=kind.weights: w})
        _ANALOG_CLASSES[cls] = new
        return new
    base = next(b for b in SUPPORTED_TYPES if issubclass(cls, b))
    if cls.forward is not base.forward:
        if base not in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
            raise ConfigError(
                f"layer {name!r} ({cls.__name__}) overrides forward(); correctnet cannot inject variations into "
                f"it. Exclude it (exclude=[{name!r}]), use a plain {base.__name__}, or register it "
                f"(correctnet.register_layer_kind)")
        # a Linear/Conv subclass with its own forward (timm's Linear, Conv2dSame): it runs with the chip's weight
        # served; a compensator fits its output only for Linear (conv subclasses may pad their own way)
        new = type(f"Analog{cls.__name__}", (_ForeignForward, cls), {"can_compensate": issubclass(cls, nn.Linear)})
        _ANALOG_CLASSES[cls] = new
        return new
    mixin = _ANALOG_CLASSES[base]
    new = type(f"Analog{cls.__name__}", (mixin, cls), {})
    _ANALOG_CLASSES[cls] = new
    return new


# ----------------------------------------------------------------------------- fused fast paths

@contextlib.contextmanager
def _fastpath_disabled() -> Iterator[None]:
    mha = torch.backends.mha
    prev = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(prev)


class _FastPathGuard(nn.Module):
    """Runs a Transformer module with PyTorch's fused fast path off while an analog layer inside is active."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if any(isinstance(m, AnalogLayer) and _observed(m) for m in self.modules()):
            with _fastpath_disabled():
                return super().forward(*args, **kwargs)
        return super().forward(*args, **kwargs)


class GuardedTransformerEncoderLayer(_FastPathGuard, nn.TransformerEncoderLayer):
    pass


class GuardedTransformerEncoder(_FastPathGuard, nn.TransformerEncoder):
    pass


_GUARDED: dict[type[nn.Module], type[nn.Module]] = {
    nn.TransformerEncoderLayer: GuardedTransformerEncoderLayer, nn.TransformerEncoder: GuardedTransformerEncoder,
}


def _guard_fast_paths(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, _FAST_PATH_TYPES) and not isinstance(m, _FastPathGuard) \
                and any(isinstance(s, AnalogLayer) for s in m.modules()):
            if not hasattr(torch.backends, "mha") or not hasattr(torch.backends.mha, "set_fastpath_enabled"):
                raise ConfigError(f"analog {type(m).__name__} layers need torch.backends.mha.set_fastpath_enabled "
                                  f"(torch >= 2.1); this is torch {torch.__version__}")
            cls = type(m)
            if cls not in _GUARDED:
                _GUARDED[cls] = type(cls.__name__, (_FastPathGuard, cls), {})
            m.__dict__["_cn_unguarded_class"] = cls
            cast(nn.Module, m).__class__ = _GUARDED[cls]  # a subclass of cls, which _GUARDED's type cannot say


# ----------------------------------------------------------------------------- analogize

def _type_matches(module: nn.Module, types: Sequence[type | str]) -> bool:
    return any(isinstance(module, t) if isinstance(t, type) else type(module).__name__ == t for t in types)


def _type_names(types: Sequence[type | str]) -> list[str]:
    return [cast(str, getattr(t, "__name__", t)) for t in types]


def _warn_unconverted(layers: Iterable[AnalogLayer], variation: VariationModel) -> None:
    rnn = [l.analog_name for l in layers if isinstance(l, _AnalogRNN)]
    if rnn and variation.converts:
        warnings.warn(f"recurrent analog layers {rnn} compute with analog weights but without the converters "
                      f"(DAC/ADC) of {variation.name}: they cannot act inside PyTorch's fused recurrent kernel",
                      stacklevel=3)
    foreign = [l.analog_name for l in layers if l.foreign_forward]
    if foreign and variation.converts:
        warnings.warn(f"analog layers {foreign} run their own forward with the chip's weights served as attributes; "
                      f"the converters (DAC/ADC) and tiles of {variation.name} cannot act inside a forward correctnet "
                      f"does not know: these layers compute with analog weights but exact inputs and outputs "
                      f"(register the layer's MVM with correctnet.register_layer_kind(cls, mvm=...) to convert)",
                      stacklevel=3)


def _digital_patterns(model: nn.Module, digital: Iterable[str]) -> tuple[list[str], list[str]]:
    """The user's ``digital=`` patterns and those declared by ``digital_parameters`` class attributes."""
    declared = []
    for prefix, m in model.named_modules():
        for pat in getattr(m, "digital_parameters", ()) or ():
            declared.append(f"{prefix}.{pat}" if prefix else pat)
    return list(digital), declared


def _digital_report(model: nn.Module, reasons: dict[str, str], patterns: list[str]) -> list[str]:
    """``"name (why)"`` for every weight (dim >= 2) used by a module that does not compute with it as analog."""
    analog: dict[int, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, AnalogLayer):
            for p in m.analog_parameters:
                analog.setdefault(id(m.nominal(p)), f"{name}.{p}")
    out = []
    for name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if p.dim() < 2 or any(fnmatch.fnmatchcase(full, pat) for pat in patterns):
                continue
            if isinstance(m, AnalogLayer) and pname in m.analog_parameters:
                continue
            if isinstance(m, AnalogMultiheadAttention) and pname in ("bias_k", "bias_v"):
                continue  # biases appended to the keys/values: digital by design
            if name in reasons:
                why = reasons[name]
            elif isinstance(m, _LOOKUP_TYPES):
                why = f"nn.{type(m).__name__}: a lookup table, not a crossbar MVM"
            elif type(m).__module__.startswith("torch.nn.") and not isinstance(m, _supported_types()):
                why = (f"nn.{type(m).__name__} is not a layer kind correctnet makes analog; supported: "
                       f"{[c.__name__ for c in SUPPORTED_TYPES]}")
            else:
                why = (f"a parameter of {type(m).__name__} used by its own forward; correctnet cannot see how")
            if id(p) in analog:
                why += f"; it is also the analog {analog[id(p)]}, but this use reads the nominal values"
            out.append(f"{full} ({why})")
    return out


def analogize(
    model: nn.Module,
    variation: VariationModel,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    layer_types: Sequence[type | str] = DEFAULT_TYPES,
    inplace: bool = False,
    digital: Iterable[str] = (),
    strict: bool = False,
    per_layer: Mapping[str, VariationModel] | Callable[[str, nn.Module], VariationModel | None] | None = None,
) -> nn.Module:
    """Make the matching layers of ``model`` analog; returns the model (a deep copy unless ``inplace``: a model
    too large to copy is converted where it is, its modules keep their parameters).

    ``per_layer``: other device settings for some layers: ``{glob pattern: VariationModel}`` (the first pattern a
    layer's name matches wins; each must match an analog layer) or ``fn(name, module) -> VariationModel | None``
    (None: ``variation``). Checkpoints record them (``analog.variations``); :func:`set_variation` replaces every
    layer's.

    ``include``/``exclude`` are glob patterns on qualified layer names (``"features.*"``);
    ``layer_types`` are classes or class names (``"Conv2d"``; see ``SUPPORTED_TYPES`` and the module
    docstring for what each kind makes analog). Every include/exclude pattern must match at least one
    candidate layer, so typos are caught. The ``out_proj`` of an ``nn.MultiheadAttention`` that stays
    digital stays digital too (that attention's forward reads ``out_proj.weight`` directly).

    Weights (parameters with two or more dimensions) left digital are reported in one
    :class:`DigitalWeightsWarning` naming each and why, or raise :class:`ConfigError` with ``strict=True``.
    ``digital``: glob patterns on qualified parameter names declared digital on purpose (not reported;
    each must match a parameter); a module class can declare its own with a ``digital_parameters``
    attribute, patterns relative to the module (``digital_parameters = ("pos_embed", "cls_token")``).
    """
    if not isinstance(variation, VariationModel):
        raise ConfigError(f"variation must be a VariationModel, got {type(variation).__name__}")
    if isinstance(digital, str):
        digital = [digital]
    supported_types = _supported_types()
    if layer_types is DEFAULT_TYPES:  # the default: every supported kind, registered ones included
        layer_types = supported_types
    for t in layer_types:
        ok = issubclass(t, supported_types) if isinstance(t, type) else t in {c.__name__ for c in supported_types}
        if not ok:
            raise ConfigError(f"unsupported analog layer type {t!r}; supported: {[c.__name__ for c in supported_types]} "
                              f"(correctnet.register_layer_kind adds your own)")
    if not inplace:
        model = copy.deepcopy(model)
    include, exclude = (list(include) if include is not None else None), list(exclude)
    supported = {n: m for n, m in model.named_modules() if n and isinstance(m, supported_types)}
    candidates = {n: m for n, m in supported.items() if _type_matches(m, layer_types)}
    for pattern in (include or []) + exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in candidates):
            raise ConfigError(f"layer pattern {pattern!r} matches no {'/'.join(map(str, _type_names(layer_types)))} "
                              f"layer; available: {sorted(candidates)}")
    user_patterns, declared = _digital_patterns(model, digital)
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for pattern in user_patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in params):
            raise ConfigError(f"digital pattern {pattern!r} matches no parameter of {type(model).__name__}; "
                              f"parameters: {params}")
    reasons: dict[str, str] = {}
    for n, m in supported.items():
        if n not in candidates:
            reasons[n] = f"its type is not in layer_types={_type_names(layer_types)}"
        elif include is not None and not any(fnmatch.fnmatchcase(n, p) for p in include):
            reasons[n] = f"not matched by include={include}"
        else:
            hit = next((p for p in exclude if fnmatch.fnmatchcase(n, p)), None)
            if hit is not None:
                reasons[n] = f"excluded by exclude=[{hit!r}]"
    chosen = {n: m for n, m in candidates.items() if n not in reasons}
    for n, m in model.named_modules():  # a digital attention's forward bypasses its out_proj module
        if isinstance(m, nn.MultiheadAttention) and n not in chosen:
            out = f"{n}.out_proj" if n else "out_proj"
            if out in chosen:
                del chosen[out]
                reasons[out] = (f"the nn.MultiheadAttention {n or type(model).__name__!r} stays digital "
                                f"({reasons.get(n, 'not selected')}) and its forward reads out_proj.weight directly")
    if not chosen:
        raise ConfigError(f"no layer of {type(model).__name__} was selected to be analog; candidates: {sorted(candidates)}")
    for name, m in chosen.items():
        if isinstance(m, AnalogLayer):
            raise ConfigError(f"layer {name!r} is already analog")
    own = _per_layer_variations(chosen, variation, per_layer)
    for name, m in chosen.items():
        dig = type(m)
        m.__class__ = _analog_class(dig, name)
        cast(AnalogLayer, m)._init_analog(name, own.get(name, variation), dig)
        cast(AnalogLayer, m).strict = strict  # the read check (correctnet.reads) raises instead of warning
    # tied weights: one set of cells, drawn with the key of the first analog user
    first: dict[int, str] = {}
    for layer in analog_layers(model).values():
        for p in layer.analog_parameters:
            layer._draw_keys[p] = first.setdefault(id(layer.nominal(p)), layer._draw_keys[p])
    _guard_fast_paths(model)
    _warn_unconverted(analog_layers(model).values(), variation)
    left = _digital_report(model, reasons, user_patterns + declared)
    if left:
        msg = (f"analogize: {len(left)} weight(s) of {type(model).__name__} stay digital (no variation reaches "
               f"them): {'; '.join(left)}. Declare the intended ones with analogize(..., digital=[...]) or a "
               f"`digital_parameters` class attribute")
        if strict:
            raise ConfigError(msg + " (strict=True)")
        warnings.warn(msg, DigitalWeightsWarning, stacklevel=2)
    return model


def _per_layer_variations(chosen: Mapping[str, nn.Module], variation: VariationModel, per_layer: Any
                          ) -> dict[str, VariationModel]:
    """``analogize``'s ``per_layer`` resolved to ``{layer name: its variation}`` (only layers that differ)."""
    if per_layer is None:
        return {}
    out: dict[str, VariationModel] = {}
    if callable(per_layer):
        for name, m in chosen.items():
            v = per_layer(name, m)
            if v is not None and not isinstance(v, VariationModel):
                raise ConfigError(f"per_layer({name!r}, ...) must return a VariationModel or None, got {type(v).__name__}")
            if v is not None:
                out[name] = v
        return out
    if not isinstance(per_layer, Mapping):
        raise ConfigError(f"per_layer must map glob patterns to VariationModels or be a function, got "
                          f"{type(per_layer).__name__}")
    for pattern, v in per_layer.items():
        if not isinstance(v, VariationModel):
            raise ConfigError(f"per_layer[{pattern!r}] must be a VariationModel, got {type(v).__name__}")
        if not any(fnmatch.fnmatchcase(n, pattern) for n in chosen):
            raise ConfigError(f"per_layer pattern {pattern!r} matches no analog layer; analog layers: {sorted(chosen)}")
    for name in chosen:
        hit = next((p for p in per_layer if fnmatch.fnmatchcase(name, p)), None)
        if hit is not None:
            out[name] = per_layer[hit]
    return out


def digitize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undo :func:`analogize`: analog layers become their original classes again."""
    with_comp = [n for n, l in analog_layers(model).items() if "compensator" in l._modules]
    if with_comp:
        raise ConfigError(f"layers {with_comp} carry compensation modules; detach them first "
                          f"(correctnet.detach_compensation) or keep the model analog")
    if not inplace:
        model = copy.deepcopy(model)
    for layer in analog_layers(model).values():
        layer.set_off()
        for p in layer.analog_parameters:
            layer._buffers.pop(layer._noise_attr(p), None)
            layer._non_persistent_buffers_set.discard(layer._noise_attr(p))
        for attr in ("analog_name", "variation", "analog_mode", "chip_seed", "_noise_seed", "_noise_gen", "_read_gen",
                     "chip_seeds", "_read_gens", "_chips_cache", "analog_parameters", "_draw_keys",
                     "_served_names", "_chip_cache", "_serve_override", "strict"):
            layer.__dict__.pop(attr, None)
        layer.__class__ = layer.__dict__.pop("_digital_class")
    for m in model.modules():
        if isinstance(m, _FastPathGuard) and "_cn_unguarded_class" in m.__dict__:
            m.__class__ = m.__dict__.pop("_cn_unguarded_class")
    return model


def analog_layers(model: nn.Module) -> dict[str, AnalogLayer]:
    """The analog layers of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AnalogLayer)}


def require_analog(model: nn.Module) -> dict[str, AnalogLayer]:
    layers = analog_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no analog layers; call correctnet.analogize(model, variation) first")
    return layers


def program_chip(model: nn.Module, seed: int) -> None:
    """Simulate programming chip ``seed``: every analog layer draws its static variations."""
    for layer in require_analog(model).values():
        layer.program(seed)


def _require_batch_first(model: nn.Module, what: str) -> None:
    """Per-chip modes split dimension 0 of every Linear input into the chips' groups: a sequence-first
    Transformer layer would give its Linear layers [seq, batch, ...] and mix chips across positions."""
    bad = [n for n, m in model.named_modules()
           if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not m.self_attn.batch_first]
    if bad:
        raise ConfigError(f"{what} splits the batch (dimension 0 of every analog layer's input) into the chips' groups; "
                          f"Transformer layers {bad[:3]} are sequence-first (batch_first=False), so their Linear "
                          f"layers see [sequence, batch, ...]: build them with batch_first=True, or use one chip per "
                          f"pass (chips_per_pass=1, chips_per_step=1)")


def program_chips(model: nn.Module, seeds: Sequence[int], *, uneven: bool = False) -> None:
    """Program K chips at once ("chips" mode): every analog layer draws the static variations of each chip
    of ``seeds`` (stacked, memory ``K`` times one chip's). Run the model on ``x.repeat(K, 1, ...)``: the
    outputs of group ``k`` of the batch are chip ``seeds[k]``'s, as ``program_chip(model, seeds[k])`` gives.

    ``uneven=True`` (training on K chips, a different share of the batch on each): the batch is split
    into K nearly equal groups (``torch.tensor_split``) instead of K equal ones."""
    seeds = list(seeds)
    layers = require_analog(model)
    if len(seeds) > 1:
        _require_batch_first(model, f"running {len(seeds)} chips in one pass")
    for layer in layers.values():
        layer.program_chips(seeds, uneven=uneven)


def set_noise_aware(model: nn.Module, seed: int, chips: int = 1) -> None:
    """Noise-aware mode: every forward of every analog layer draws fresh variations (seeded stream);
    ``chips`` > 1: ``chips`` fresh chips per forward, each on its share of the batch
    (:meth:`AnalogLayer.set_noisy`)."""
    layers = require_analog(model)
    if not isinstance(chips, bool) and isinstance(chips, int) and chips > 1:
        _require_batch_first(model, f"noise-aware training with {chips} chips per step")
    for layer in layers.values():
        layer.set_noisy(seed, chips)


def set_nominal(model: nn.Module) -> None:
    """Exact nominal behaviour (no variation); drops any programmed chip."""
    for layer in analog_layers(model).values():
        layer.set_off()


def set_variation(model: nn.Module, variation: VariationModel) -> None:
    """Use another variation model on every analog layer (drops any programmed chip)."""
    layers = require_analog(model)
    for layer in layers.values():
        layer.set_off()
        layer.variation = variation
    _warn_unconverted(layers.values(), variation)


@contextlib.contextmanager
def _restoring(model: nn.Module) -> Iterator[None]:
    layers = analog_layers(model)
    saved = {n: l._analog_state() for n, l in layers.items()}
    try:
        yield
    finally:
        for n, l in layers.items():
            l._set_analog_state(saved[n])


@contextlib.contextmanager
def chip(model: nn.Module, seed: int) -> Iterator[nn.Module]:
    """``with chip(model, seed):`` runs the model as chip ``seed``; the previous mode is restored on exit."""
    with _restoring(model):
        program_chip(model, seed)
        yield model


@contextlib.contextmanager
def chips(model: nn.Module, seeds: Sequence[int], *, uneven: bool = False) -> Iterator[nn.Module]:
    """``with chips(model, seeds):`` runs the model as K chips at once (see :func:`program_chips`); the
    previous mode is restored on exit. Eval only (``model.eval()``): layers that mix samples across the
    batch would mix chips."""
    with _restoring(model):
        program_chips(model, seeds, uneven=uneven)
        yield model


@contextlib.contextmanager
def noise_aware(model: nn.Module, seed: int, chips: int = 1) -> Iterator[nn.Module]:
    """``with noise_aware(model, seed):`` fresh variations at every forward, previous mode restored on exit;
    ``chips`` > 1: that many fresh chips per forward, each on its share of the batch."""
    with _restoring(model):
        set_noise_aware(model, seed, chips)
        yield model


@contextlib.contextmanager
def nominal(model: nn.Module) -> Iterator[nn.Module]:
    """``with nominal(model):`` exact nominal behaviour, previous mode restored on exit."""
    with _restoring(model):
        set_nominal(model)
        yield model


ESTIMATORS = ("max", "std", "moving_max")


def check_range_settings(percentile: Any = 100.0, estimator: Any = "max", std_factor: Any = 3.0,
                         momentum: Any = 0.9) -> None:
    """The checks :func:`calibrate_input_ranges` makes of its settings, without a model: bad values raise
    :class:`ConfigError` in one line."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise ConfigError(f"percentile must be a number in (0, 100], got {percentile!r}")
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
    if estimator == "std":
        if percentile != 100:
            raise ConfigError(f"percentile applies to estimator 'max' and 'moving_max' only; estimator 'std' needs "
                              f"percentile=100, got {percentile!r}")
        if isinstance(std_factor, bool) or not isinstance(std_factor, (int, float)) or not 0 < std_factor < math.inf:
            raise ConfigError(f"std_factor must be a number > 0, got {std_factor!r}")
    if estimator == "moving_max" and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                      or not 0 <= momentum < 1):
        raise ConfigError(f"momentum must be a number in [0, 1), got {momentum!r}")


def _untrained_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Running statistics never updated: the initial mean 0 / variance 1, which describe no activation."""
    if bn.running_mean is None or bn.running_var is None:
        return False  # track_running_stats=False: it normalizes with batch statistics anyway
    tracked = bn.num_batches_tracked
    return ((tracked is None or int(tracked) == 0) and not bool(bn.running_mean.any())
            and bool((bn.running_var == 1).all()))


def calibrate_input_ranges(model: nn.Module, batches: Iterable[Any], percentile: float = 100.0, *,
                           estimator: str = "max", std_factor: float = 3.0, momentum: float = 0.9,
                           batch_statistics: bool | None = None) -> dict[str, float]:
    """Set each analog layer's fixed DAC range from calibration data; returns ``{layer name: range}``.

    ``batch_statistics=True``: BatchNorm layers normalize with each batch's own statistics, as in a training
    step, instead of their running statistics (which are left unchanged). Use it before training: an untrained
    network's running statistics (mean 0, variance 1) describe no activation, so eval-mode ranges of a deep
    BatchNorm network shrink layer by layer (VGG11: the last conv's range 300x below what a training step feeds
    it) and a fixed-range DAC then clips nearly every input, which stops training. ``False``: running statistics
    everywhere (as the chip deploys). ``None`` (default): batch statistics exactly for the BatchNorm layers whose
    running statistics were never updated (``num_batches_tracked`` 0, mean all 0, variance all 1), running
    statistics for the rest.

    Runs ``model`` nominally (eval mode, no gradients; its modes and training flag are restored) on every
    batch (a tensor, or a tuple/list whose first item is the input, as a DataLoader yields) and records, per
    analog layer, the inputs its converters see (input vectors: the last dimension for Linear, one sample's
    whole input map for conv; attention: its query, key and value). The range, in the layer's input units
    (``variation.dac_range=r`` then clips at ``r`` times it), comes from ``estimator``:

    * ``"max"`` (default): the nearest-rank ``percentile`` of the per-vector ``max|x|`` over all batches
      (100 = the largest ``|x|`` seen);
    * ``"std"``: ``std_factor`` times the standard deviation of every input element the layer saw over all
      batches (one population, ``torch.std``'s unbiased estimate; aihwkit's ``init_std_alpha * x.std()``
      averages it per batch instead); ``percentile`` must stay 100;
    * ``"moving_max"``: an exponential moving average over batches of each batch's range (the nearest-rank
      ``percentile`` of that batch's per-vector ``max|x|``): the first batch's value, then
      ``R = momentum * R + (1 - momentum) * R_batch`` (PyTorch's ``MovingAverageMinMaxObserver`` rule with
      ``averaging_constant = 1 - momentum``).

    Layers that saw no input keep their range (None if never calibrated). Bad values raise
    :class:`ConfigError` in one line.
    """
    require_analog(model)
    check_range_settings(percentile, estimator, std_factor, momentum)
    if batch_statistics is not None and not isinstance(batch_statistics, bool):
        raise ConfigError(f"batch_statistics must be true, false or None (auto), got {batch_statistics!r}")
    layers = analog_layers(model)
    training = {m: m.training for m in model.modules()}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and (batch_statistics or (batch_statistics is None and _untrained_batchnorm(m)))]
    buffers = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    for layer in layers.values():
        layer._input_ranges = []
        if estimator == "std":
            layer._input_moments = [0, 0.0, 0.0]
    ema: dict[str, float] = {}

    def rank(values: list[torch.Tensor]) -> float:
        v = torch.cat(values).sort().values
        return float(v[max(0, math.ceil(percentile / 100 * v.numel()) - 1)])

    try:
        model.eval()
        for bn in norms:
            bn.train()
        with _restoring(model), torch.no_grad():
            set_nominal(model)
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                if estimator == "moving_max":
                    for name, layer in layers.items():
                        if layer._input_ranges:
                            r = rank(layer._input_ranges)
                            ema[name] = r if name not in ema else momentum * ema[name] + (1 - momentum) * r
                            layer._input_ranges = []
        out = {}
        for name, layer in layers.items():
            seen = layer._input_ranges or []
            if estimator == "max" and seen:
                layer.input_range = rank(seen)
            elif estimator == "moving_max" and name in ema:
                layer.input_range = ema[name]
            elif estimator == "std" and layer._input_moments is not None and layer._input_moments[0] > 1:
                n, s1, s2 = layer._input_moments
                layer.input_range = std_factor * math.sqrt(max(0.0, (s2 - s1 * s1 / n) / (n - 1)))
            else:
                continue
            out[name] = layer.input_range
        return out
    finally:
        for layer in layers.values():
            layer._input_ranges = None
            layer._input_moments = None
        for bn, saved in zip(norms, buffers):
            for k, v in saved.items():
                getattr(bn, k).copy_(v)
        for m, flag in training.items():
            m.training = flag
