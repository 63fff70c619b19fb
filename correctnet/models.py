"""Reference models: LeNet-5, a configurable VGG and an MLP. Plain ``nn.Module``s, nothing analog here.

Inputs are ``[N, C, H, W]`` float tensors; outputs are ``[N, num_classes]`` logits.
"""
from __future__ import annotations

from typing import Any, Sequence

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


MODELS = ("lenet5", "mlp", *VGG_CONFIGS)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build reference model ``name`` for inputs of shape ``(C, H, W)``; extra kwargs go to the model."""
    c, h, w = input_shape
    if h != w and name != "mlp":
        raise ConfigError(f"model {name!r} needs square inputs, got {h}x{w}")
    try:
        if name == "lenet5":
            return LeNet5(c, h, num_classes, **kwargs)
        if name == "mlp":
            return MLP(c * h * w, num_classes, **kwargs)
        if name in VGG_CONFIGS:
            return VGG(name, c, h, num_classes, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad parameters for model {name!r}: {e}") from None
    raise ConfigError(f"model.name must be one of {list(MODELS)}, got {name!r}")
