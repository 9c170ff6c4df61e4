"""The token vocabulary, derived in one place from the model config.

Ids ``[0, codebook_size)`` are the tokenizer's codes. After them:

- ``legacy_vocab=True`` (the original release, MAGE.md 3.1): 1000 legacy "class" ids then one mask id:
  size = K + 1000 + 1, fake class id = K + 76 (= 1100 for K = 1024), mask id = size - 1 (= 2024).
- ``legacy_vocab=False`` (everything we train): size = K + 2, fake class id = K, mask id = K + 1.
  The legacy ids were never used for anything but the fake class token (issue #53), so nothing is lost.

Only the first K logits ever enter the loss or the sampler; the extra ids are inputs only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import MAGEConfig

LEGACY_EXTRA_IDS = 1000
LEGACY_FAKE_CLASS_OFFSET = 76  # 1100 - 1024


@dataclass(frozen=True)
class Vocab:
    codebook_size: int
    size: int
    fake_class_id: int
    mask_id: int

    @classmethod
    def from_config(cls, cfg: MAGEConfig) -> "Vocab":
        K = cfg.codebook_size
        if cfg.legacy_vocab:
            size = K + LEGACY_EXTRA_IDS + 1
            return cls(K, size, K + LEGACY_FAKE_CLASS_OFFSET, size - 1)
        return cls(K, K + 2, K, K + 1)
