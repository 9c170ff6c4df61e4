"""When bf16 autocast actually helps.

bf16 pays off on GPUs and on CPUs with AMX / AVX512-BF16. Without them (e.g. an AVX2-only CPU) PyTorch
emulates bf16 matmuls and convolutions and is 10-400x *slower* than fp32, so ``bf16=True`` in a config
means "use bf16 where the hardware has it". ``MAGE_BF16=1`` / ``0`` forces it on or off.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def bf16_supported(device_type: str = "cpu") -> bool:
    forced = os.environ.get("MAGE_BF16")
    if forced is not None:
        return forced not in ("0", "false", "no", "")
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(amx or avx512_bf16)


def autocast(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on ``device`` when requested *and* supported, else a no-op context."""
    dtype = torch.device(device).type
    if enabled and bf16_supported(dtype):
        return torch.autocast(dtype, dtype=torch.bfloat16)
    return contextlib.nullcontext()
