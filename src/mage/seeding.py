"""The one seed mixer: every random stream in training is a pure function of integers.

A step's batch order, augmentation, masks and dropout are seeded by ``mix(seed, STREAM, step, ...)``, so a
resumed run draws exactly what a straight run would, and 1 rank draws what N ranks draw together. Each
stream has its own constant below; two streams never share a seed by accident.
"""

from __future__ import annotations

import torch

_M64 = (1 << 64) - 1

# stream tags: one per kind of draw
PERMUTATION = 7  # batch order of an epoch
VIEWS = 11  # which cached view each row uses
STEP = 13  # torch's global RNG during a step (dropout, drop-path, label dropout)
MASKS = 17  # mask ratio and positions (MAGE-C's second view: MASKS + 1)
CODES = 23  # the tokenizer's dead-code restarts
AUGMENT = 29  # batch-level augmentation of in-memory images (the judge)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """Hash integers (any sign or size, taken mod 2**64) into one well-mixed 64-bit seed."""
    h = 0x6A09E667F3BCC908
    for v in values:
        h = _splitmix64(h ^ (int(v) & _M64))
    return h


def generator(*values: int) -> torch.Generator:
    """A CPU generator seeded by ``mix(*values)``."""
    return torch.Generator().manual_seed(mix(*values))
