"""The seed scheme: every random draw in correctnet derives from an explicit integer seed.

A *chip seed* identifies one simulated chip. It is derived from a user seed, a *stream* and an index:
``chip_seed(stream, seed, i)`` puts the stream id in the top 4 bits of a 63-bit integer and a hash of
``(seed, stream, i)`` in the lower 59 bits, so chips of different streams are different integers by
construction (evaluation chips are never training chips), whatever the user seeds.

A weight's draw for a chip uses its own generator seeded from ``(chip_seed, crc32(key))``, so the
sample of one weight does not depend on which other layers are analog or in which order they run. The key
is :func:`weight_key`: the layer name for the ``weight`` of a Linear/Conv layer (``"features.0"``), and
``"<layer>.<parameter>"`` for the weights of the other analog layers (``"attn.in_proj_weight"``,
``"rnn.weight_hh_l0_reverse"``). A Parameter shared by several analog layers (tied weights) is one set of
cells: every user draws it with the key of its first analog user in module order. Per-read noise of a
layer comes from ``(chip_seed, crc32(layer name + ":read"))``, and noise-aware training draws of a layer
from ``(training seed, crc32(layer name))``.
"""
from __future__ import annotations

import enum
import zlib

import numpy as np
import torch

_LOW_BITS = 59


class Stream(enum.IntEnum):
    """Disjoint seed streams; a chip seed records which one it came from."""

    EVAL = 0          # Monte-Carlo evaluation chips (reported accuracies)
    TRAIN = 1         # chips drawn during (noise-aware / compensation) training
    SEARCH = 2        # chips used by the placement search
    CALIBRATION = 3   # per-chip calibration randomness (calibration images, batch order)
    COMPENSATION = 4  # chips drawn while training compensation modules (one per batch)
    CHECK = 5         # chips of the compensation check and of the calibration-teacher choice
    TEACHER = 6       # chips whose mean prediction is the calibration teacher (calibration.teacher=ensemble)


def chip_seed(stream: Stream | int, seed: int, index: int) -> int:
    """Seed of chip ``index`` of ``stream`` for user ``seed``; a non-negative int < 2**63."""
    stream = int(stream)
    if not 0 <= stream < 16:
        raise ValueError(f"stream must be in [0, 16), got {stream}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    low = int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0])
    return (stream << _LOW_BITS) | (low & ((1 << _LOW_BITS) - 1))


def stream_of(seed: int) -> int:
    """The stream a chip seed was drawn from."""
    return seed >> _LOW_BITS


def weight_key(layer_name: str, parameter: str = "weight") -> str:
    """The key of the static draw of ``parameter`` of analog layer ``layer_name`` (see the module docstring)."""
    return layer_name if parameter == "weight" else f"{layer_name}.{parameter}" if layer_name else parameter


def layer_generator(seed: int, layer_name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` for the draws of ``layer_name`` under chip/training ``seed``."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, zlib.crc32(layer_name.encode())])
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state.generate_state(1, np.uint64)[0]) >> 1)
    return gen
