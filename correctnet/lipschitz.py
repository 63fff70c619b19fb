"""Error suppression: per-layer Lipschitz constants, the error-amplification profile, and the regularizer.

**Measurement.** The Lipschitz constant of a layer with respect to its input (bias excluded) is the
spectral norm of its linear operator: ``||W||_2`` for ``Linear`` (exact, by SVD), and for ``Conv`` the
norm of the convolution *operator* on the layer's actual input shape, stride, padding, dilation and
groups included, by power iteration with the conv and its adjoint (autograd). Power iteration stops
when the estimate changes by less than ``tol`` (relative, default 1e-6) between iterations, or after
``max_iter``; it approaches the largest singular value from below (tests: within 1e-3 of the explicit
operator matrix's largest singular value).

**Error amplification profile.** Under sampled chips, the relative error
``||y_chip - y_nominal|| / ||y_nominal||`` of every analog layer's output (and of the model output),
averaged over a batch and over chips: where the curve rises, a layer amplifies the errors it receives.

**Regularizer** (``LipschitzRegularizer``, three forms; ``strength`` weighs the penalty).

* ``kind="relative"`` (default), the *modified* Lipschitz constant. Under multiplicative variations
  ``w' = w * exp(theta)`` the error a layer adds is ``dy = (W o (e^theta - 1)) x``, and
  ``E||dy||^2 = s^2 * sum_ij W_ij^2 x_j^2`` (``s^2`` the variance of ``e^theta``): the squared Frobenius
  Lipschitz constant of the map from log-weights ``theta`` to the output, ``||dy/dtheta||_F^2``.
  Relative to the signal it becomes ``r_l = sum_ij W_ij^2 x_j^2 / ||W x + b||^2``, which is also the gain
  of the layer on random (error) directions relative to its gain on the data. We penalize
  ``strength * sum_l mean_batch relu(r_l - target)`` on the training batches (one extra forward of
  each layer with squared weights and inputs, through hooks). Why not the plain constant: in a ReLU
  network, scaling one layer down and the next up leaves the function and every *relative* error
  unchanged while the spectral norms move freely; what accuracy sees is the error relative to the signal.
* ``kind="orthogonal"``: ``strength * sum_l ||G_l - target * I||_F^2 / n_l``, ``G_l`` the *smaller* Gram
  matrix of the weight reshaped to ``[out, in * prod(kernel)]`` (Parseval networks, Cisse et al. 2017):
  all singular values pushed towards ``sqrt(target)``.
* ``kind="spectral"``: ``strength * sum_l relu(sigma_l - target)^2``, ``sigma_l`` from one power-iteration
  step per call on persistent vectors, conv-operator aware (Yoshida & Miyato 2017).

Measurements and regularizer cover the analog Linear and Conv layers (attention ``out_proj`` included);
attention in-projections and recurrent weights are analog but neither measured nor regularized here;
:func:`error_profile` covers every analog layer (the first output of attention and recurrent layers).

The README's suppression results compare the three; the classic two do lower the measured constants
but not the error at the logits, the relative form lowers the error at every layer.
"""
from __future__ import annotations

from typing import Any, Callable, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .analog import AnalogLayer, analog_layers, chip, nominal, nominal_weight
from .errors import ConfigError
from .tensors import OutputFn, eval_mode, logits_of
from .seeding import Stream, chip_seed

KINDS = ("relative", "orthogonal", "spectral")
DEFAULT_TARGETS = {"relative": 0.0, "orthogonal": 1.0, "spectral": 1.0}


_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d  # the Conv layers analogize converts (each has _conv_forward)


def _is_conv(layer: nn.Module) -> bool:
    # transposed convolutions are _ConvNd too, but neither analog nor a plain _conv_forward
    return isinstance(layer, _Conv)


def _mvm_layers(model: nn.Module) -> dict[str, AnalogLayer]:
    """The analog Linear/Conv layers (attention ``out_proj`` included): the ones measured and regularized.

    Attention in-projections and recurrent weights are analog too but not covered by the measurements
    and the regularizer (their operator is not one fixed linear map of the layer's input).
    """
    return {n: l for n, l in analog_layers(model).items() if isinstance(l, nn.Linear) or _is_conv(l)}


def input_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Input shape (without batch) of every analog layer, recorded from one forward of ``example``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape[1:]))
        return hook

    hooks = [layer.register_forward_hook(record(name)) for name, layer in _mvm_layers(model).items()]
    try:
        with eval_mode(model), nominal(model):
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return shapes


def operator_norm(layer: nn.Module, input_shape: tuple[int, ...] | None = None, *, tol: float = 1e-6,
                  max_iter: int = 2000, seed: int = 0) -> float:
    """Spectral norm of ``layer``'s linear map (nominal weight, bias excluded) on inputs of ``input_shape``."""
    if not isinstance(layer, nn.Linear) and not _is_conv(layer):
        raise ConfigError(f"operator_norm supports Linear and Conv1d/2d/3d layers, got {type(layer).__name__}")
    w = nominal_weight(layer).detach()
    if isinstance(layer, nn.Linear):
        return float(torch.linalg.matrix_norm(w.double(), 2))
    if input_shape is None:
        raise ConfigError("operator_norm of a Conv layer needs its input_shape (C, *spatial)")
    wd = w.double()
    op = lambda v: cast(_Conv, layer)._conv_forward(v, wd, None)  # noqa: E731
    gen = torch.Generator(device=w.device).manual_seed(seed)
    v = torch.randn((1, *input_shape), generator=gen, device=w.device, dtype=torch.float64)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(max_iter):
        v.requires_grad_(True)
        u = op(v)
        new = u.norm()
        (g,) = torch.autograd.grad(new, v)  # A^T u / ||u||
        v = (g / g.norm()).detach()
        if abs(new.item() - sigma) <= tol * new.item():
            return new.item()
        sigma = new.item()
    return sigma


def lipschitz_constants(model: nn.Module, example: torch.Tensor, **kwargs: Any) -> dict[str, float]:
    """Spectral norm of every analog Linear/Conv layer, conv layers on the input shapes seen for ``example``."""
    shapes = input_shapes(model, example)
    return {name: operator_norm(layer, shapes.get(name), **kwargs) for name, layer in _mvm_layers(model).items()}


def error_profile(model: nn.Module, x: torch.Tensor, *, n_chips: int = 20, seed: int = 0,
                  stream: Stream = Stream.EVAL, output: OutputFn | None = None) -> dict[str, dict[str, float]]:
    """Relative output error of every analog layer and of the model output under ``n_chips`` chips.

    ``x``: a batch of inputs ``[N, ...]``. Returns ``{layer: {"mean", "std"}}`` over chips, where each
    chip's value is ``||y_chip - y_nom||_F / ||y_nom||_F`` over the batch. Layers in forward order,
    the model output last under the key ``"output"``: its logits (:func:`correctnet.tensors.logits_of`,
    ``output`` mapping any other form of output to them).
    """
    layers = analog_layers(model)
    outs: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if isinstance(output, tuple):  # attention: (output, weights); recurrent: (output, state)
                output = output[0]
            if isinstance(output, nn.utils.rnn.PackedSequence):
                output = output.data
            outs[name] = output.detach()
        return hook

    hooks = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    rel: dict[str, list[float]] = {}
    try:
        with eval_mode(model):
            x = x.to(next(model.parameters()).device)
            with nominal(model):
                ref_out = logits_of(model(x), output)
            ref = dict(outs)
            order = list(ref)  # forward order
            for i in range(n_chips):
                with chip(model, chip_seed(stream, seed, i)):
                    out = logits_of(model(x), output)
                for name in order:
                    rel.setdefault(name, []).append(((outs[name] - ref[name]).norm() / ref[name].norm()).item())
                rel.setdefault("output", []).append(((out - ref_out).norm() / ref_out.norm()).item())
    finally:
        for h in hooks:
            h.remove()
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in rel.items()}


class LipschitzRegularizer:
    """``reg(model) -> scalar tensor`` to add to the task loss (see the module docstring for the forms).

    ``strength``: the weight of the penalty (>= 0); ``target``: ``beta`` of the orthogonality penalty
    (the targeted squared singular value) or the largest allowed spectral norm for ``"spectral"``.
    ``input_shapes`` (from :func:`input_shapes`) is needed by ``"spectral"`` for conv layers;
    ``samples``: images of each batch the ``"relative"`` form is measured on; ``per_channel``: the
    relative form's ratio per output channel (mean over channels) instead of over the whole output,
    which is what a following BatchNorm, normalizing each channel, sees; ``centered``: divide by each
    channel's variance (over samples and positions) instead of its second moment, which is the signal
    left after a following BatchNorm subtracts the channel mean (needs ``per_channel``).
    """

    def __init__(self, kind: str = "relative", strength: float = 0.02, target: float | None = None,
                 input_shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0, samples: int = 8,
                 per_channel: bool = True, centered: bool = False):
        if kind not in KINDS:
            raise ConfigError(f"training.lipschitz.kind must be one of {list(KINDS)}, got {kind!r}")
        if target is None:
            target = DEFAULT_TARGETS[kind]
        for key, v in (("strength", strength), ("target", target)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ConfigError(f"training.lipschitz.{key} must be a finite number >= 0, got {v!r}")
        if kind == "spectral" and target <= 0:
            raise ConfigError(f"training.lipschitz.target must be > 0 for kind=spectral, got {target!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"training.lipschitz.samples must be an integer >= 1, got {samples!r}")
        self.kind, self.strength, self.target, self.samples = kind, float(strength), float(target), samples
        if not isinstance(per_channel, bool):
            raise ConfigError(f"training.lipschitz.per_channel must be true or false, got {per_channel!r}")
        if not isinstance(centered, bool):
            raise ConfigError(f"training.lipschitz.centered must be true or false, got {centered!r}")
        if centered and not per_channel:
            raise ConfigError("training.lipschitz.centered=true needs per_channel=true (it centres each channel)")
        self.per_channel, self.centered = per_channel, centered
        self.shapes = input_shapes or {}
        self.seed = seed
        self._vectors: dict[str, torch.Tensor] = {}
        self._terms: list[torch.Tensor] = []
        self._hooks: list[Any] = []

    # -- "relative": measured on the training forward through hooks -----------------------------------
    def attach(self, model: nn.Module) -> None:
        """Start recording the relative form's terms on ``model``'s training forwards (no-op for the others)."""
        self.detach()
        if self.kind == "relative":
            self._hooks = [layer.register_forward_hook(self._record) for layer in _mvm_layers(model).values()]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._terms = [], []

    def _record(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (layer.training and torch.is_grad_enabled()):
            return
        k = self.samples  # a fixed slice of the batch estimates the batch mean at a fraction of the cost
        x, w2 = inputs[0][:k].square(), nominal_weight(layer).square()
        spread = F.linear(x, w2) if isinstance(layer, nn.Linear) else cast(_Conv, layer)._conv_forward(x, w2, None)
        out = output[:k].clone()  # the next op may be an in-place ReLU that would overwrite the saved output
        if self.per_channel:  # channels (dim 1 of conv maps, last dim of Linear outputs), pooled over samples
            if isinstance(layer, nn.Linear):  # rows: samples (and positions), columns: channels
                spread, out = spread.reshape(-1, spread.shape[-1]), out.reshape(-1, out.shape[-1])
            else:
                spread, out = spread.transpose(0, 1).flatten(1).T, out.transpose(0, 1).flatten(1).T
            if self.centered:
                out = out - out.mean(0)
            num, den = spread.sum(0), out.square().sum(0)
            ratio = num / (den + 1e-2 * den.mean().detach() + 1e-12)  # a near-silent channel cannot dominate
        else:
            ratio = spread.flatten(1).sum(1) / (out.flatten(1).square().sum(1) + 1e-12)
        self._terms.append(F.relu(ratio - self.target).mean())

    def penalty(self, name: str, layer: AnalogLayer) -> torch.Tensor:
        w = nominal_weight(layer)
        if self.kind == "orthogonal":
            m = w.reshape(w.shape[0], -1)
            g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
            eye = torch.eye(g.shape[0], device=w.device, dtype=w.dtype)
            return (g - self.target * eye).square().sum() / g.shape[0]  # mean squared eigenvalue deviation
        return F.relu(self.sigma_estimate(name, layer) - self.target).square()

    def sigma_estimate(self, name: str, layer: AnalogLayer) -> torch.Tensor:
        """One power-iteration step on persistent vectors; differentiable in the weight."""
        w = nominal_weight(layer)
        op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        shape: tuple[int, ...]
        if isinstance(layer, nn.Linear):
            op, shape = (lambda v, weight: F.linear(v, weight)), (w.shape[1],)
        elif name in self.shapes:
            op, shape = (lambda v, weight: cast(_Conv, layer)._conv_forward(v, weight, None)), self.shapes[name]
        else:
            raise ConfigError(f"spectral Lipschitz regularizer needs the input shape of conv layer {name!r}")
        v = self._vectors.get(name)
        if v is None or v.device != w.device:
            gen = torch.Generator(device=w.device).manual_seed(self.seed)
            v = torch.randn((1, *shape), generator=gen, device=w.device)
        with torch.enable_grad():
            vv = v.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(op(vv, w.detach()).norm(), vv)  # A^T A v / ||A v||
        v = (g / (g.norm() + 1e-12)).detach()
        self._vectors[name] = v
        return op(v, w).norm()

    def __call__(self, model: nn.Module) -> torch.Tensor:
        if self.kind == "relative":
            if not self._terms:
                raise RuntimeError("the relative Lipschitz regularizer records its terms during the forward: "
                                   "call reg.attach(model) before training (correctnet.training.train does)")
            terms, self._terms = self._terms, []
        else:
            terms = [self.penalty(n, l) for n, l in _mvm_layers(model).items()]
        return self.strength * torch.stack(terms).sum()
