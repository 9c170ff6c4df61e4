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
import torch.nn as nn


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


class _StoredBF16(nn.Module):
    """Parametrization: the weight is stored in bf16 and used in fp32, or as is under bf16 autocast."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w if torch.is_autocast_enabled(w.device.type) else w.float()


def store_weights_bf16(module: nn.Module) -> nn.Module:
    """Inference with half the weight memory: every Linear / Conv2d / Embedding weight is kept in bf16.

    Without bf16 hardware the matmuls still run in fp32 on the rounded weights (each weight is up-cast
    when its layer runs: one layer's fp32 copy at a time, ~5% slower at vit-b sizes); under bf16
    autocast the weights are used as they are (no cast copy before every matmul). Not for training:
    the parameters become bf16 buffers of a parametrization and stop requiring gradients."""
    from torch.nn.utils import parametrize

    for m in module.modules():
        if (
            isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))
            and m.weight.dtype == torch.float32
            and not parametrize.is_parametrized(m, "weight")
        ):
            parametrize.register_parametrization(m, "weight", _StoredBF16(), unsafe=True)
            original = m.parametrizations.weight.original
            original.data = original.data.to(torch.bfloat16)
            original.requires_grad_(False)
    _return_freed_memory()
    return module


def _return_freed_memory() -> None:
    """Hand the heap pages of the freed fp32 weights back to the OS (glibc keeps them otherwise, so
    the process would not shrink: vit-b measured 0.89 GB resident after the conversion instead of ~0.6)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass
