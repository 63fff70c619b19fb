"""Reference models (LeNet-5, a configurable VGG, an MLP, a CIFAR-style ResNet-20, a small ViT) and models
built from a user's class by import path (Hydra's ``_target_`` convention). Plain ``nn.Module``s, nothing
analog here.

Image models take ``[N, C, H, W]`` float tensors; the MLP takes any ``[N, *features]``; outputs are
``[N, num_classes]`` logits.

User models (:func:`build_target`, used by ``python -m correctnet.train model=custom model._target_=...``):
the target is ``"pkg.module.Class"`` or ``"pkg.module:Outer.Inner"``, importable from ``sys.path``
(``PYTHONPATH`` or an installed package). It is called with the configured keyword arguments plus, for each
of ``num_classes``, ``in_channels``, ``image_size``, ``input_shape`` and ``in_features`` that its signature
names explicitly and that the configuration does not set, the value the dataset implies (``in_channels`` and
``image_size`` only for ``[C, H, W]`` inputs, ``image_size`` only when square). A keyword argument that is a
mapping with a ``_target_`` is built the same way first (a sub-module, e.g. a backbone).
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError

VGG_CONFIGS: dict[str, list[int | str]] = {  # numbers: conv output channels at width 1; "M": 2x2 max-pool
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class LeNet5(nn.Module):
    """LeNet-5 (ReLU, max-pool). For 28x28/32x32 inputs the classic 5x5 convs; for 8x8 inputs (digits)
    3x3 convs with padding. 5 weight layers: conv1, conv2, fc1, fc2, fc3."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        if image_size >= 28:
            k, pad1 = 5, 2 if image_size == 28 else 0
            self.conv1 = nn.Conv2d(in_channels, 6, k, padding=pad1)
            self.conv2 = nn.Conv2d(6, 16, k)
            side = ((image_size + 2 * pad1 - 4) // 2 - 4) // 2
        elif image_size >= 8:
            self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
            self.conv2 = nn.Conv2d(6, 16, 3, padding=1)
            side = image_size // 4
        else:
            raise ConfigError(f"LeNet5 needs image_size >= 8, got {image_size}")
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = x.flatten(1)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)


class VGG(nn.Module):
    """VGG with the classic layer configurations, scaled by ``width`` (channels = round(c * width)).

    Max-pools are skipped once the feature map is 1 pixel wide, so small inputs (28x28) work.
    The classifier has ``fc_layers`` Linear layers (3 as in the original: vgg16 = 13 conv + 3 fc).
    """

    def __init__(self, config: str = "vgg11", in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
                 width: float = 1.0, batch_norm: bool = True, fc_layers: int = 3, fc_width: int = 512):
        super().__init__()
        if config not in VGG_CONFIGS:
            raise ConfigError(f"model.config must be one of {sorted(VGG_CONFIGS)}, got {config!r}")
        if not width > 0:
            raise ConfigError(f"model.width must be > 0, got {width!r}")
        if fc_layers < 1:
            raise ConfigError(f"model.fc_layers must be >= 1, got {fc_layers!r}")
        layers: list[nn.Module] = []
        c, side = in_channels, image_size
        for v in VGG_CONFIGS[config]:
            if v == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            out = max(1, round(int(v) * width))
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        self.features = nn.Sequential(*layers)
        hidden = max(1, round(fc_width * width))
        dims = [c * side * side] + [hidden] * (fc_layers - 1) + [num_classes]
        fc: list[nn.Module] = []
        for i in range(fc_layers):
            fc.append(nn.Linear(dims[i], dims[i + 1]))
            if i < fc_layers - 1:
                fc.append(nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(*fc)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Fully connected network: flatten, then Linear+ReLU per hidden size, then a Linear to the classes."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden: Sequence[int] = (256, 128)):
        super().__init__()
        dims = [in_features, *hidden, num_classes]
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm; the skip is the identity, option A (subsample + zero channels) or B (1x1 conv)."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=True)
        self.stride, self.pad = stride, c_out - c_in
        self.shortcut: nn.Module | None = None
        if (stride != 1 or c_in != c_out) and shortcut == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def _skip(self, x):
        if self.shortcut is not None:
            return self.shortcut(x)
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad:
            x = nn.functional.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self._skip(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): a 3x3 stem, 3 stages of ``blocks`` basic blocks with
    16/32/64 channels (times ``width``), stride 2 at the start of stages 2 and 3, global average pooling,
    one Linear. ``blocks=3`` is ResNet-20 (19 conv + 1 fc). ``shortcut="A"``: parameter-free skips
    (subsample, zero-padded channels); ``"B"``: 1x1 conv + BatchNorm projections where the shape changes.
    Any input size works (28x28, 32x32, 8x8 digits)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, blocks: int = 3, width: float = 1.0,
                 shortcut: str = "A"):
        super().__init__()
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ConfigError(f"model.blocks must be an integer >= 1, got {blocks!r}")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ConfigError(f"model.width must be > 0, got {width!r}")
        if shortcut not in ("A", "B"):
            raise ConfigError(f"model.shortcut must be 'A' (identity, zero-padded) or 'B' (1x1 projection), got {shortcut!r}")
        chans = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, chans[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.act = nn.ReLU(inplace=True)
        stages, c = [], chans[0]
        for i, out in enumerate(chans):
            layer = []
            for j in range(blocks):
                layer.append(_BasicBlock(c, out, 2 if (i > 0 and j == 0) else 1, shortcut))
                c = out
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def ResNet20(in_channels: int = 3, num_classes: int = 10, width: float = 1.0, shortcut: str = "A") -> ResNet:
    """ResNet-20: :class:`ResNet` with 3 blocks per stage."""
    return ResNet(in_channels, num_classes, blocks=3, width=width, shortcut=shortcut)


class ViT(nn.Module):
    """A small Vision Transformer: non-overlapping ``patch_size`` patches embedded by a Conv2d (stride = kernel),
    a learned position embedding, ``depth`` pre-norm ``nn.TransformerEncoderLayer``s (``batch_first=True``,
    ``heads`` heads, MLP of ``mlp_ratio * dim``, GELU), a final LayerNorm, mean-pooled tokens (``pool="mean"``)
    or a class token (``pool="cls"``), and a Linear head. ``image_size`` must be a multiple of ``patch_size``
    (28 with 4 or 7; 8x8 digits with 2 or 4).

    ``pos_embed`` and ``cls_token`` are added, not multiplied: they stay digital on purpose
    (:attr:`digital_parameters`)."""

    digital_parameters = ("pos_embed", "cls_token")

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, patch_size: int = 4,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0,
                 pool: str = "mean"):
        super().__init__()
        for key, v in (("patch_size", patch_size), ("dim", dim), ("depth", depth), ("heads", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.{key} must be an integer >= 1, got {v!r}")
        if image_size % patch_size:
            raise ConfigError(f"model.patch_size={patch_size} does not divide the image size {image_size}")
        if dim % heads:
            raise ConfigError(f"model.dim={dim} must be a multiple of model.heads={heads}")
        if pool not in ("mean", "cls"):
            raise ConfigError(f"model.pool must be 'mean' or 'cls', got {pool!r}")
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
            raise ConfigError(f"model.mlp_ratio must be > 0, got {mlp_ratio!r}")
        n = (image_size // patch_size) ** 2
        self.pool = pool
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, n + (pool == "cls"), dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, max(1, round(dim * mlp_ratio)), dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, patches, dim]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = self.norm(self.encoder(x + self.pos_embed))
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


MODELS = ("lenet5", "mlp", *VGG_CONFIGS, "resnet20", "vit")
INJECTED = ("num_classes", "in_channels", "image_size", "input_shape", "in_features")


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build reference model ``name`` for inputs of shape ``(C, H, W)`` (the MLP: any shape); extra kwargs go
    to the model."""
    if name not in MODELS:
        raise ConfigError(f"model.name must be one of {list(MODELS)}, got {name!r} (your own class: model=custom "
                          f"model._target_=package.module.Class)")
    shape = tuple(int(d) for d in input_shape)
    try:
        if name == "mlp":
            return MLP(math.prod(shape), num_classes, **kwargs)
        if len(shape) != 3:
            raise ConfigError(f"model {name!r} needs image inputs [C, H, W], got shape {list(shape)}; "
                              f"model=mlp takes any shape")
        c, h, w = shape
        if h != w:
            raise ConfigError(f"model {name!r} needs square inputs, got {h}x{w}")
        if name == "lenet5":
            return LeNet5(c, h, num_classes, **kwargs)
        if name == "resnet20":
            return ResNet20(c, num_classes, **kwargs)
        if name == "vit":
            return ViT(c, h, num_classes, **kwargs)
        return VGG(name, c, h, num_classes, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad parameters for model {name!r}: {e}") from None


# ----------------------------------------------------------------------------- user models by import path

def locate(target: str, key: str = "model._target_") -> Any:
    """The object named by ``target`` (``"pkg.mod.Name"`` or ``"pkg.mod:Qual.Name"``), imported from sys.path.

    A :class:`ConfigError` naming ``key`` says what could not be imported and why (module not found, an
    error inside the module, no such attribute).
    """
    if not isinstance(target, str) or not target.strip() or target.startswith((".", ":")):
        raise ConfigError(f"{key} must be an import path 'package.module.Name', got {target!r}")
    target = target.strip()
    if ":" in target:
        module_name, _, qual = target.partition(":")
        candidates = [(module_name, qual.split("."))]
    else:
        parts = target.split(".")
        if len(parts) < 2:
            raise ConfigError(f"{key}={target!r} names no module: expected 'package.module.Name' "
                              f"(the module importable via PYTHONPATH or installed)")
        candidates = [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
    first_error: str | None = None
    for module_name, attrs in candidates:
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and not (module_name == e.name or module_name.startswith(e.name + ".")):
                raise ConfigError(f"{key}={target!r}: importing module {module_name!r} failed: it needs module "
                                  f"{e.name!r}, which is not installed") from None
            first_error = f"no module named {e.name or module_name!r}"
            continue
        except Exception as e:  # noqa: BLE001 - any error raised by the user's module while importing
            raise ConfigError(f"{key}={target!r}: importing module {module_name!r} raised "
                              f"{type(e).__name__}: {e}") from None
        try:
            for a in attrs:
                obj = getattr(obj, a)
        except AttributeError:
            raise ConfigError(f"{key}={target!r} cannot be found: module {module_name!r} has no attribute "
                              f"{'.'.join(attrs)!r}") from None
        return obj
    raise ConfigError(f"{key}={target!r} cannot be imported: {first_error}. Is its package on PYTHONPATH "
                      f"(PYTHONPATH=/dir/containing/the/package python -m ...) or installed?")


def target_name(obj: Any) -> str:
    """``"module:qualname"`` of a class or function (what :func:`locate` reads back)."""
    return f"{obj.__module__}:{obj.__qualname__}"


def importable(obj: Any) -> str | None:
    """None when ``obj`` (a class or function) can be imported back by :func:`target_name`; else why not."""
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module is None:
        return f"{obj!r} has no module"
    if module == "__main__":
        return f"{qual} is defined in the script being run (__main__), which another process cannot import"
    if "<locals>" in qual:
        return f"{qual} is defined inside a function (a local scope), which cannot be imported"
    try:
        found = locate(f"{module}:{qual}", key="target")
    except ConfigError as e:
        return str(e)
    return None if found is obj else f"{module}:{qual} names another object than {qual}"


def _is_module_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, nn.Module)


def build_target(target: str, kwargs: Mapping[str, Any] | None = None, *, input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, key: str = "model", classes_only: bool = False
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """Build the user's model ``target`` with ``kwargs``; returns ``(module, the keyword arguments used)``.

    The dataset's ``input_shape``/``num_classes`` are added for the parameters the constructor names (see the
    module docstring); the returned arguments rebuild the same module with ``build_target(target, args)``.
    ``classes_only`` (used when the target comes from a checkpoint) calls nothing but ``nn.Module`` subclasses.
    """
    obj = locate(target, f"{key}._target_")
    if classes_only and not _is_module_class(obj):
        raise ConfigError(f"{key}._target_={target!r} is not an nn.Module class; only nn.Module classes are called "
                          f"when a model is rebuilt from a file")
    if not callable(obj):
        raise ConfigError(f"{key}._target_={target!r} is a {type(obj).__name__}, not an nn.Module class or a function "
                          f"returning one")
    if inspect.isclass(obj) and not issubclass(obj, nn.Module):
        raise ConfigError(f"{key}._target_={target!r} is the class {obj.__qualname__}, which is not an nn.Module "
                          f"subclass")
    args = dict(kwargs or {})
    if input_shape is not None or num_classes is not None:
        args = {**_implied_args(obj, input_shape, num_classes, set(args)), **args}
    built = {k: _build_nested(v, f"{key}.{k}", classes_only) for k, v in args.items()}
    try:
        inspect.signature(obj).bind(**built)
    except TypeError as e:
        raise ConfigError(f"{key}._target_={target!r} does not accept the arguments {sorted(args)}: {e}"
                          f"{_accepted(obj)}") from None
    except ValueError:  # no signature (builtin): let the call decide
        pass
    try:
        module = obj(**built)
    except ConfigError as e:
        raise ConfigError(f"{key}._target_={target!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's constructor rejects its arguments
        raise ConfigError(f"{key}._target_={target!r} raised {type(e).__name__} when called with "
                          f"{_short(args)}: {e}{_accepted(obj)}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{key}._target_={target!r} returned a {type(module).__name__}, not an nn.Module")
    return module, args


def _accepted(obj: Callable) -> str:
    try:
        params = [p for p in inspect.signature(obj).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return ""
    return f" (its parameters: {', '.join(p.name for p in params) or 'none'})"


def _short(args: Mapping[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in args.items()) or "no arguments"
    return text if len(text) < 300 else text[:300] + " ..."


def _implied_args(obj: Callable, input_shape: Sequence[int] | None, num_classes: int | None,
                  given: set[str]) -> dict[str, Any]:
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return {}
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    implied: dict[str, Any] = {}
    if num_classes is not None:
        implied["num_classes"] = int(num_classes)
    if input_shape is not None:
        shape = [int(d) for d in input_shape]
        implied["input_shape"] = shape
        implied["in_features"] = math.prod(shape)
        if len(shape) == 3:
            implied["in_channels"] = shape[0]
            if shape[1] == shape[2]:
                implied["image_size"] = shape[1]
    return {k: v for k, v in implied.items() if k in named and k not in given}


def _build_nested(value: Any, key: str, classes_only: bool) -> Any:
    if isinstance(value, Mapping) and "_target_" in value:
        sub = {k: v for k, v in value.items() if k != "_target_"}
        return build_target(value["_target_"], sub, key=key, classes_only=classes_only)[0]
    return value


def model_from_config(params: Mapping[str, Any], input_shape: Sequence[int], num_classes: int
                      ) -> tuple[nn.Module, dict[str, Any]]:
    """The model a ``model`` config section describes; returns ``(module, spec for the checkpoint)``.

    ``{"name": <built-in>, **kwargs}`` builds a reference model (:data:`MODELS`); ``{"_target_": path,
    **kwargs}`` the user's class (:func:`build_target`), ``name`` then being an optional display name.
    The spec is ``{"name", "input_shape", "num_classes", "kwargs"}``, plus ``"target"`` for user models
    (``kwargs`` are then the complete constructor arguments, dataset-implied ones included).
    """
    kwargs = dict(params)
    name, target = kwargs.pop("name", None), kwargs.pop("_target_", None)
    spec: dict[str, Any] = {"input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes)}
    if target is None:
        if name is None:
            raise ConfigError("the model config needs model.name (one of " + ", ".join(MODELS) + ") or "
                              "model._target_ (your own class: model=custom model._target_=package.module.Class)")
        return build_model(name, input_shape, num_classes, **kwargs), {"name": name, **spec, "kwargs": kwargs}
    if name in MODELS:
        raise ConfigError(f"model.name={name!r} is a built-in model but model._target_={target!r} is set too; "
                          f"use model=custom for your own class (or drop model._target_)")
    module, args = build_target(target, kwargs, input_shape=input_shape, num_classes=num_classes)
    obj = locate(target)
    return module, {"name": name or getattr(obj, "__name__", str(target)), "target": target, **spec, "kwargs": args}
