"""CPU speed tricks for the MAGE transformer, switched on explicitly: ``fastpath.apply(model, device, training)``.

``model.py`` is the plain model (``nn.Dropout``, ``F.scaled_dot_product_attention``, fc1 -> GELU -> fc2). On a
CPU three of its pieces have faster variants, which compute the same function (dropout draws other masks):

  ``CPUDropout``         dropout masks from 16-bit uniforms instead of ``bernoulli_`` (eager CPU training)
  ``ExplicitAttention``  attention written out, q k^T -> softmax -> dropout -> @ v (eager CPU training)
  ``FusedMlp``           fc1 + GELU as one oneDNN bf16 call (CPU inference under bf16 autocast)

Each variant checks at every call that it applies (the device of its input, training or not, grad and autocast,
and not inside a graph being compiled: inductor fuses and draws on its own) and otherwise runs the plain
module's code, so a model switched to the fast path can still be compiled, moved or put in eval mode.

    model = MAGE(cfg).to(dev)
    fastpath.apply(model, dev, training=True)      # a training loop (its evaluation and samples included)
    pipe.model                                     # MAGEPipeline applies it with training=False

``apply`` swaps the class of the modules in place for a subclass with the same attributes: parameters,
``state_dict`` keys and the loading of the original's weights do not change, ``isinstance(m, Attention)`` still
holds, and applying twice is applying once. It works on any module built from ``model.py``'s blocks
(``MAGE``, the fine-tuning classifier).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Attention, Mlp

#: off = always the plain Linear + GELU (``mage bench`` counts FLOPs through the Linear modules' hooks)
FUSE_LINEAR_GELU = True


def apply(model: nn.Module, device: str | torch.device, training: bool) -> nn.Module:
    """Switch ``model``'s modules to the fast variants for ``device`` (in place; returns ``model``).

    On a CPU: ``FusedMlp`` always (it acts only in bf16 inference, so a training loop's evaluation and samples
    use it too); with ``training=True`` also ``CPUDropout`` for every ``nn.Dropout`` and ``ExplicitAttention``.
    Elsewhere (a GPU) nothing changes: its SDPA kernels and dropout are the fast ones."""
    if torch.device(device).type != "cpu":
        return model
    swap = {Mlp: FusedMlp}
    if training:
        swap.update({nn.Dropout: CPUDropout, Attention: ExplicitAttention})
    for m in model.modules():
        fast = swap.get(type(m))  # exact class: subclasses stay
        if fast is not None:
            m.__class__ = fast
    return model


# --------------------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------------------
def dropout_drop_mask(shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Bernoulli(p) drop mask [shape] (bool, True = zeroed) from 16-bit uniforms, four per 64-bit random word.

    ``bernoulli_`` draws one Mersenne-Twister number per element: 81 dropout calls took 1.4 s (22%) of a vit-b
    training step at batch 8 on a 2-core CPU. Here NumPy's PCG64DXSM, seeded by one draw of torch's generator
    (so ``torch.manual_seed`` still fixes every mask), fills 64 bits per word at ~1.5 ns (torch's int64
    ``random_`` ~4 ns), read as four uniform int16. p is rounded to a multiple of 1/65536 (0.1 -> 0.1000061);
    :func:`dropout` scales by the rounded keep rate, so E[output] = input exactly."""
    n = math.prod(shape)
    seed = int(torch.randint(2**62, ()))
    words = np.random.PCG64DXSM(seed).random_raw(-(-n // 4)).view(np.int16)  # every bit uniform
    threshold = round(p * 65536) - 32768  # int16 is uniform on [-32768, 32767]
    return (torch.from_numpy(words[:n]) < threshold).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool, inplace: bool = False) -> torch.Tensor:
    """``F.dropout`` with :func:`dropout_drop_mask` on CPUs (eager only: compiled graphs and GPUs draw their own).
    ``inplace`` only where autograd does not need ``x`` (the output of a Linear, GELU or LayerNorm; not a softmax's)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, True, inplace)
    drop = dropout_drop_mask(tuple(x.shape), p)
    y = x.masked_fill_(drop, 0) if inplace else torch.where(drop, 0.0, x)  # no bool -> dtype copy
    return y.mul_(1.0 / (1.0 - round(p * 65536) / 65536))


class CPUDropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (no state: the original's weights load unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.inplace)


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------
class ExplicitAttention(Attention):
    """Training on a CPU spells the attention out (q k^T -> softmax -> :func:`dropout` -> @ v, the original's math;
    under bf16 autocast the softmax of bf16 logits computes in fp32 and rounds its output to bf16 once, as a
    flash kernel does before P @ V). PyTorch's CPU SDPA has no fused kernel with dropout (it falls back to the
    same math, with ``bernoulli_``), and its flash kernel's backward is slow in bf16 (fmnist-32, batch 64, AMX:
    ~95 ms of a ~205 ms step), so the written-out attention trains that preset 1.9x faster in bf16.
    Elsewhere (eval, a GPU, a graph being compiled): SDPA, as :class:`Attention`."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.training or q.device.type != "cpu" or torch.compiler.is_compiling():
            return super().attend(q, k, v)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, heads, N, N]
        return dropout(attn.softmax(dim=-1), self.attn_drop, True) @ v


# --------------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------------
def linear_gelu_cpu(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor | None:
    """GELU(fc(x)) as one oneDNN bf16 matmul with bias and GELU fused (the op inductor uses), for CPU inference
    under bf16 autocast; None where that does not apply (training, fp32, GPU, a torch without the op, a graph
    being compiled: inductor fuses on its own). Eager PyTorch otherwise writes fc1's output, copies the bias into
    it first and runs GELU as a third pass."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if (
        op is None
        or not FUSE_LINEAR_GELU
        or torch.is_grad_enabled()
        or x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or not torch.is_autocast_enabled("cpu")
        or torch.get_autocast_dtype("cpu") != torch.bfloat16
    ):
        return None
    b16 = torch.bfloat16
    return op(x.to(b16), fc.weight.to(b16), fc.bias.to(b16), "gelu", [], "none")


class FusedMlp(Mlp):
    """:class:`Mlp` with fc1 + GELU through :func:`linear_gelu_cpu` where it applies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = linear_gelu_cpu(x, self.fc1)
        if h is None:
            return super().forward(x)
        return self.drop(self.fc2(self.drop(h)))
