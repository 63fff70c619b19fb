"""The seed scheme: every random draw in correctnet derives from an explicit integer seed.

A *chip seed* identifies one simulated chip. It is derived from a user seed, a *stream* and an index:
``chip_seed(stream, seed, i)`` puts the stream id in the top 4 bits of a 63-bit integer and a hash of
``(seed, stream, i)`` in the lower 59 bits, so chips of different streams are different integers by
construction (evaluation chips are never training chips), whatever the user seeds.

A layer's draw for a chip uses its own generator seeded from ``(chip_seed, crc32(layer name))``, so the
sample of one layer does not depend on which other layers are analog or in which order they run.
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


def layer_generator(seed: int, layer_name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` for the draws of ``layer_name`` under chip/training ``seed``."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, zlib.crc32(layer_name.encode())])
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state.generate_state(1, np.uint64)[0]) >> 1)
    return gen
