"""The injector: make the Linear/Conv layers of any ``nn.Module`` analog, without touching its code.

An analog layer computes with ``variation.apply(weight, noise)`` instead of ``weight``. It has three modes:

* ``"off"``: exact nominal behaviour (the default after :func:`analogize`);
* ``"chip"``: a *programmed chip*: one static noise sample per weight, drawn from a chip seed by
  :func:`program_chip`, reused by every forward until the next chip;
* ``"noisy"``: noise-aware training: a fresh sample at every forward; gradients flow to the nominal
  weights through the perturbed ones.

Per-read noise (``VariationModel.apply_read``, e.g. ``rram`` with ``read_noise``) is drawn at every forward
in ``chip`` and ``noisy`` modes, on top of the static sample: in ``chip`` mode from a generator seeded by
``(chip seed, layer name + ":read")`` when the chip is programmed, so a chip's sequence of reads is
reproducible; in ``noisy`` mode from the training stream. Converters (``VariationModel.dac``/``adc``) quantize
the layer's input and its analog output (the bias is digital, added after) in those modes too; ``off``
mode is exact and applies neither.

The nominal parameters are never written. Layers are converted by swapping their class for an analog
subclass (the technique ``torch.nn.utils.parametrize`` uses), so parameter names, and therefore
``state_dict()`` keys, are unchanged: an analog model's state_dict loads into the plain model and back.
Chip samples live in non-persistent buffers and never appear in the state_dict.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .seeding import layer_generator
from .variation import VariationModel

MODES = ("off", "chip", "noisy")
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
DEFAULT_TYPES: tuple[type[nn.Module], ...] = SUPPORTED_TYPES


class AnalogLayer(nn.Module):
    """Mixin for analog layers. Not instantiated directly: see :func:`analogize`."""

    analog_name: str
    variation: VariationModel
    analog_mode: str
    chip_seed: int | None
    _digital_class: type[nn.Module]

    def _init_analog(self, name: str, variation: VariationModel, digital_class: type[nn.Module]) -> None:
        self.analog_name = name
        self.variation = variation
        self.analog_mode = "off"
        self.chip_seed = None
        self._noise_seed: int | None = None
        self._noise_gen: torch.Generator | None = None
        self._read_gen: torch.Generator | None = None
        self._digital_class = digital_class
        self.register_buffer("_chip_noise", None, persistent=False)

    # -- state changes (never touch self.weight) -------------------------------------------------
    def program(self, seed: int) -> None:
        """Draw this layer's static noise for chip ``seed`` and switch to chip mode."""
        with torch.no_grad():
            gen = layer_generator(seed, self.analog_name, self.weight.device)
            self._chip_noise = self.variation.sample(self.weight, gen)
        self._read_gen = layer_generator(seed, self.analog_name + ":read", self.weight.device)
        self.chip_seed = seed
        self.analog_mode = "chip"

    def set_noisy(self, seed: int) -> None:
        """Draw fresh noise at every forward from a generator seeded by ``seed``."""
        self._noise_seed, self._noise_gen = seed, None
        self.analog_mode = "noisy"

    def set_off(self) -> None:
        self.analog_mode, self.chip_seed, self._chip_noise = "off", None, None
        self._noise_seed, self._noise_gen, self._read_gen = None, None, None

    def analog_weight(self) -> torch.Tensor:
        """The weight the hardware computes with in the current mode (differentiable in ``weight``)."""
        w = self.weight
        if self.analog_mode == "off":
            return w
        if self.analog_mode == "chip":
            if self._read_gen is not None and self._read_gen.device != w.device:
                self._read_gen = layer_generator(self.chip_seed or 0, self.analog_name + ":read", w.device)
            return self.variation.apply_read(w, self._chip_noise, self._read_gen)
        if self._noise_gen is None or self._noise_gen.device != w.device:
            self._noise_gen = layer_generator(self._noise_seed or 0, self.analog_name, w.device)
        return self.variation.apply_read(w, self.variation.sample(w, self._noise_gen), self._noise_gen)

    # -- forward (subclasses give the operation, its bias broadcast and the vector dims) --------------
    def _mvm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _bias_view(self) -> torch.Tensor:
        return self.bias

    def _vector_dims(self) -> tuple[int, ...]:
        """Trailing dimensions of one input/output vector (the converters take their range over them)."""
        return (-1,)

    def _analog_forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.variation
        if self.analog_mode == "off" or not v.converts:
            return self._compensate(x, self._mvm(x, self.analog_weight(), self.bias))
        dims = self._vector_dims()
        y = v.adc(self._mvm(v.dac(x, dims), self.analog_weight(), None), dims)
        if self.bias is not None:  # the bias is digital: added after the ADC
            y = y + self._bias_view()
        return self._compensate(x, y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, analog={self.variation.name}(sigma={self.variation.sigma:g}), mode={self.analog_mode}"


    def _compensate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # a digital compensation module (correctnet.compensation) adds its correction to the analog output
        comp = self._modules.get("compensator")
        return y if comp is None else comp(x, y)


class AnalogLinear(AnalogLayer, nn.Linear):
    def _mvm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._analog_forward(x)


class _AnalogConv(AnalogLayer):
    def _mvm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]

    def _bias_view(self) -> torch.Tensor:
        return self.bias.view(-1, *[1] * len(self.kernel_size))  # type: ignore[attr-defined]

    def _vector_dims(self) -> tuple[int, ...]:  # one sample: channels and spatial dims
        return tuple(range(-1 - len(self.kernel_size), 0))  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._analog_forward(x)


class AnalogConv1d(_AnalogConv, nn.Conv1d):
    pass


class AnalogConv2d(_AnalogConv, nn.Conv2d):
    pass


class AnalogConv3d(_AnalogConv, nn.Conv3d):
    pass


_ANALOG_CLASSES: dict[type[nn.Module], type[AnalogLayer]] = {
    nn.Linear: AnalogLinear, nn.Conv1d: AnalogConv1d, nn.Conv2d: AnalogConv2d, nn.Conv3d: AnalogConv3d,
}


def _analog_class(cls: type[nn.Module], name: str) -> type[AnalogLayer]:
    if cls in _ANALOG_CLASSES:
        return _ANALOG_CLASSES[cls]
    base = next(b for b in SUPPORTED_TYPES if issubclass(cls, b))
    if cls.forward is not base.forward:
        raise ConfigError(
            f"layer {name!r} ({cls.__name__}) overrides forward(); correctnet cannot inject variations into "
            f"it. Exclude it (exclude=[{name!r}]) or use a plain {base.__name__}.")
    mixin = _ANALOG_CLASSES[base]
    new = type(f"Analog{cls.__name__}", (mixin, cls), {})
    _ANALOG_CLASSES[cls] = new
    return new


def _type_matches(module: nn.Module, types: Sequence[type | str]) -> bool:
    return any(isinstance(module, t) if isinstance(t, type) else type(module).__name__ == t for t in types)


def analogize(
    model: nn.Module,
    variation: VariationModel,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    layer_types: Sequence[type | str] = DEFAULT_TYPES,
    inplace: bool = False,
) -> nn.Module:
    """Make the matching layers of ``model`` analog; returns the model (a deep copy unless ``inplace``).

    ``include``/``exclude`` are glob patterns on qualified layer names (``"features.*"``);
    ``layer_types`` are classes or class names (``"Conv2d"``). Every include/exclude pattern must
    match at least one candidate layer, so typos are caught.
    """
    if not isinstance(variation, VariationModel):
        raise ConfigError(f"variation must be a VariationModel, got {type(variation).__name__}")
    for t in layer_types:
        ok = issubclass(t, SUPPORTED_TYPES) if isinstance(t, type) else t in {c.__name__ for c in SUPPORTED_TYPES}
        if not ok:
            raise ConfigError(f"unsupported analog layer type {t!r}; supported: {[c.__name__ for c in SUPPORTED_TYPES]}")
    if not inplace:
        model = copy.deepcopy(model)
    include, exclude = (list(include) if include is not None else None), list(exclude)
    candidates = {n: m for n, m in model.named_modules()
                  if n and isinstance(m, SUPPORTED_TYPES) and _type_matches(m, layer_types)}
    for pattern in (include or []) + exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in candidates):
            raise ConfigError(f"layer pattern {pattern!r} matches no {'/'.join(map(str, [getattr(t, '__name__', t) for t in layer_types]))} "
                              f"layer; available: {sorted(candidates)}")
    chosen = {n: m for n, m in candidates.items()
              if (include is None or any(fnmatch.fnmatchcase(n, p) for p in include))
              and not any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    if not chosen:
        raise ConfigError(f"no layer of {type(model).__name__} was selected to be analog; candidates: {sorted(candidates)}")
    for name, m in chosen.items():
        if isinstance(m, AnalogLayer):
            raise ConfigError(f"layer {name!r} is already analog")
        digital = type(m)
        m.__class__ = _analog_class(digital, name)
        m._init_analog(name, variation, digital)  # type: ignore[attr-defined]
    return model


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
        for attr in ("analog_name", "variation", "analog_mode", "chip_seed", "_noise_seed", "_noise_gen", "_read_gen"):
            layer.__dict__.pop(attr, None)
        layer._buffers.pop("_chip_noise", None)
        layer._non_persistent_buffers_set.discard("_chip_noise")
        layer.__class__ = layer.__dict__.pop("_digital_class")
    return model


def analog_layers(model: nn.Module) -> dict[str, AnalogLayer]:
    """The analog layers of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AnalogLayer)}


def _require_analog(model: nn.Module) -> dict[str, AnalogLayer]:
    layers = analog_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no analog layers; call correctnet.analogize(model, variation) first")
    return layers


def program_chip(model: nn.Module, seed: int) -> None:
    """Simulate programming chip ``seed``: every analog layer draws its static variations."""
    for layer in _require_analog(model).values():
        layer.program(seed)


def set_noise_aware(model: nn.Module, seed: int) -> None:
    """Noise-aware mode: every forward of every analog layer draws fresh variations (seeded stream)."""
    for layer in _require_analog(model).values():
        layer.set_noisy(seed)


def set_nominal(model: nn.Module) -> None:
    """Exact nominal behaviour (no variation); drops any programmed chip."""
    for layer in analog_layers(model).values():
        layer.set_off()


def set_variation(model: nn.Module, variation: VariationModel) -> None:
    """Use another variation model on every analog layer (drops any programmed chip)."""
    for layer in _require_analog(model).values():
        layer.set_off()
        layer.variation = variation


@contextlib.contextmanager
def _restoring(model: nn.Module) -> Iterator[None]:
    layers = analog_layers(model)
    saved = {n: (l.analog_mode, l.chip_seed, l._chip_noise, l._noise_seed, l._noise_gen, l._read_gen)
             for n, l in layers.items()}
    try:
        yield
    finally:
        for n, l in layers.items():
            l.analog_mode, l.chip_seed, l._chip_noise, l._noise_seed, l._noise_gen, l._read_gen = saved[n]


@contextlib.contextmanager
def chip(model: nn.Module, seed: int) -> Iterator[nn.Module]:
    """``with chip(model, seed):`` runs the model as chip ``seed``; the previous mode is restored on exit."""
    with _restoring(model):
        program_chip(model, seed)
        yield model


@contextlib.contextmanager
def noise_aware(model: nn.Module, seed: int) -> Iterator[nn.Module]:
    """``with noise_aware(model, seed):`` fresh variations at every forward, previous mode restored on exit."""
    with _restoring(model):
        set_noise_aware(model, seed)
        yield model


@contextlib.contextmanager
def nominal(model: nn.Module) -> Iterator[nn.Module]:
    """``with nominal(model):`` exact nominal behaviour, previous mode restored on exit."""
    with _restoring(model):
        set_nominal(model)
        yield model
