"""The MaskGIT/MAGE VQGAN tokenizer (MAGE.md 2.2), weight-compatible with ``vqgan_jax_strongaug.ckpt``.

Differences from the taming VQGAN, all on purpose (they are the original's):
- no attention layers, no quant_conv / post_quant_conv;
- encoder downsampling is 2x2 average pooling; decoder upsampling is nearest x2 + 3x3 conv (with bias);
- every ResBlock conv (and the 1x1 shortcut) is bias-free; encoder ``conv_out`` is 1x1 with bias;
- the ResBlock shortcut is applied to the *residual branch output*: ``out = h + nin_shortcut(h)`` when the
  width changes (MaskGIT JAX overwrote ``x`` before its 1x1 conv), ``out = x + h`` otherwise;
- nearest code by squared L2 ``|z|^2 + |e|^2 - 2 z.e`` with a straight-through gradient.
Images are float [0,1]; the decoder output is *not* squashed (clamp when saving).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TokenizerConfig, tokenizer_preset
from .errors import MageError


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place without autograd (x is always a fresh GroupNorm output here): one tensor fewer per call."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> dropout -> conv3x3, MaskGIT shortcut."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            return h + self.nin_shortcut(h)  # the original's quirk: shortcut of h, not of x
        return x + h


class _Level(nn.Module):
    """One resolution level: ``block`` (ResBlocks) and, in the decoder, ``upsample``."""

    def __init__(self, blocks: list[nn.Module], upsample: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if upsample is not None:
            self.upsample = upsample


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int, dropout: float):
        super().__init__()
        self.block_1 = ResBlock(ch, ch, groups, dropout)
        self.block_2 = ResBlock(ch, ch, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult, g = cfg.base_channels, cfg.channel_mult, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1, bias=False)
        widths_in = (1,) + tuple(mult)
        self.down = nn.ModuleList()
        for lvl, m in enumerate(mult):
            cin, cout = ch * widths_in[lvl], ch * m
            blocks = [ResBlock(cin if i == 0 else cout, cout, g, cfg.dropout) for i in range(cfg.num_res_blocks)]
            self.down.append(_Level(blocks))
        top = ch * mult[-1]
        self.mid = _Mid(top, g, cfg.dropout)
        self.norm_out = _norm(top, g)
        self.conv_out = nn.Conv2d(top, cfg.code_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, ch, H, W]
        for lvl, level in enumerate(self.down):
            for blk in level.block:
                h = blk(h)
            if lvl != len(self.down) - 1:
                h = F.avg_pool2d(h, 2)  # [B, c, H/2, W/2]
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))  # [B, code_dim, h, w]


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult, g = cfg.base_channels, cfg.channel_mult, cfg.norm_groups
        top = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.code_dim, top, 3, padding=1)
        self.mid = _Mid(top, g, cfg.dropout)
        levels: list[nn.Module] = [nn.Identity()] * len(mult)
        cin = top
        for lvl in reversed(range(len(mult))):  # built top-down, stored by level index
            cout = ch * mult[lvl]
            blocks = [ResBlock(cin if i == 0 else cout, cout, g, cfg.dropout) for i in range(cfg.num_res_blocks)]
            levels[lvl] = _Level(blocks, Upsample(cout) if lvl != 0 else None)
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch * mult[0], g)
        self.conv_out = nn.Conv2d(ch * mult[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, top, h, w]
        for lvl in reversed(range(len(self.up))):  # up.4 runs first
            level = self.up[lvl]
            for blk in level.block:
                h = blk(h)
            if lvl != 0:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))  # [B, 3, H, W]


class VectorQuantizer(nn.Module):
    """Nearest codeword by squared L2 (no l2-normalisation), straight-through gradient."""

    def __init__(self, codebook_size: int, code_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> ids [B, h*w] (row-major over the grid)."""
        B, C, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, C)  # [B*h*w, C]
        e = self.embedding.weight.float()
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(1).view(B, h * w)

    def lookup(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """ids [B, h*w] -> code vectors [B, C, h, w]."""
        B = ids.shape[0]
        return self.embedding(ids).view(B, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (straight-through z_q, ids [B, L], codebook loss, commitment loss)."""
        ids = self.nearest(z)
        zq = self.lookup(ids, z.shape[-2:]).to(z.dtype)
        codebook_loss = F.mse_loss(zq.float(), z.detach().float())
        commit_loss = F.mse_loss(z.float(), zq.detach().float())
        return z + (zq - z).detach(), ids, codebook_loss, commit_loss


class VQTokenizer(nn.Module):
    """Image <-> token ids. ``encode`` [B,3,H,W] in [0,1] -> LongTensor [B, h*w]; ``decode`` the inverse."""

    #: On a CPU, ``decode`` runs at most this many output pixels per decoder call. The decoder's activations
    #: grow with the batch (maskgit-256: ~0.18 GB per 256 px image; batch 4 peaked at 1.18 GB, one at a time
    #: 0.66 GB) while a CPU is compute-bound from the first image on (same speed measured either way).
    CPU_DECODE_PIXELS = 256 * 256
    #: ``mage bench --baseline`` turns :meth:`channels_last` off to run the original's way
    CHANNELS_LAST = True

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.code_dim)
        self._channels_last = False

    # ---- the public API --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] float in [0,1] (any device: moved to the tokenizer's) -> ids [B, (H/f)*(W/f)]
        (row-major token grid) on the tokenizer's device."""
        self._check_images(images)
        w = self.encoder.conv_in.weight
        return self.quantize.nearest(self.encoder(self._layout(images.to(w.device, self._dtype()))))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """ids [B, L] -> images [B,3,H,W] (float32, not clamped). The grid defaults to square."""
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
            raise MageError(f"decode expects a LongTensor [B, L], got {ids.dtype} {tuple(ids.shape)}")
        if grid is None:
            side = int(round(ids.shape[1] ** 0.5))
            if side * side != ids.shape[1]:
                raise MageError(f"{ids.shape[1]} tokens do not form a square grid: pass grid=(h, w)")
            grid = (side, side)
        if ids.min() < 0 or ids.max() >= self.config.codebook_size:
            raise MageError(f"token ids must lie in [0, {self.config.codebook_size})")
        zq = self._layout(self.quantize.lookup(ids.long(), grid))  # [B, C, h, w]
        if zq.device.type != "cpu":
            return self.decoder(zq).float().contiguous()
        f = self.config.downsample
        chunk = max(1, self.CPU_DECODE_PIXELS // (grid[0] * grid[1] * f * f))
        return torch.cat([self.decoder(zq[i : i + chunk]).float() for i in range(0, zq.shape[0], chunk)]).contiguous()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward: (reconstruction, ids, codebook loss, commitment loss)."""
        zq, ids, cb, commit = self.quantize(self.encoder(images))
        return self.decoder(zq), ids, cb, commit

    def channels_last(self) -> "VQTokenizer":
        """For bf16 inference: store the 4-D conv weights channels-last (NHWC) and give ``encode`` / ``decode``
        NHWC inputs, so oneDNN (CPU) and cuDNN run every convolution without a layout reorder around it.
        maskgit-256, batch 4, 2-core AMX CPU, bf16 autocast: encode 2.07 -> 5.14 img/s, decode 2.31 -> 4.27.
        Not the fp32 default: PyTorch's NHWC GroupNorm reduces less precisely (relative error 3e-5 per norm,
        1.2e-4 at the encoder output against 9e-7 in NCHW, over the parity fixture's tolerance), while fp32
        gains only 1.1-1.2x. ``MAGEPipeline`` (``weights="bf16"`` on bf16 hardware) and ``mage bench`` use it."""
        for p in self.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        self._channels_last = True
        return self

    # ---- helpers ---------------------------------------------------------------------------------
    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last and self.CHANNELS_LAST else x

    def _dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype  # the dtype it computes in (bf16-stored weights are used in fp32)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise MageError(f"expected images [B,{self.config.in_channels},H,W], got {tuple(images.shape)}")
        f = self.config.downsample
        if images.shape[-1] % f or images.shape[-2] % f:
            raise MageError(f"image size {tuple(images.shape[-2:])} is not a multiple of the downsample factor {f}")

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @classmethod
    def from_pretrained(cls, path: str, map_location: str | torch.device = "cpu") -> "VQTokenizer":
        """Load our checkpoint (a run or step directory) or an original tokenizer file
        (``{'state_dict': ...}`` / bare state dict / a MAGE ``{'model': ...}`` file with ``vqgan.*`` keys)."""
        from .checkpoint import load_checkpoint, load_strict, torch_load_official
        from .released import resolve

        path = resolve(path, "tokenizer")
        if os.path.isdir(path):
            weights, cfg, where = load_checkpoint(path)
            if not isinstance(cfg, TokenizerConfig):
                raise MageError(f"{where} holds a {type(cfg).__name__}, not a tokenizer")
            model = cls(cfg)
            load_strict(model, weights, where)
            return model.to(map_location).eval()
        sd = official_tokenizer_state_dict(torch_load_official(path), path)
        model = cls(config_from_state_dict(sd))
        load_strict(model, sd, path)
        return model.to(map_location).eval()


def official_tokenizer_state_dict(obj: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Extract the VQGAN tensors from any of the original layouts (MAGE.md 7.2/7.4)."""
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if any(k.startswith("vqgan.") for k in obj):
        obj = {k[len("vqgan.") :]: v for k, v in obj.items() if k.startswith("vqgan.")}
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if "encoder.conv_in.weight" not in sd or "quantize.embedding.weight" not in sd:
        raise MageError(f"{where} is not a VQGAN tokenizer checkpoint (no encoder.conv_in / quantize.embedding keys)")
    return sd


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> TokenizerConfig:
    """Infer the architecture of an original-layout VQGAN from its tensor shapes."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    mult = tuple(sd[f"encoder.down.{lvl}.block.0.conv2.weight"].shape[0] // ch for lvl in levels)
    nblocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    n, dim = sd["quantize.embedding.weight"].shape
    groups = 32 if ch % 32 == 0 else max(g for g in (16, 8, 4, 2, 1) if ch % g == 0)
    return dataclasses.replace(
        tokenizer_preset("maskgit-256"),
        base_channels=ch,
        channel_mult=mult,
        num_res_blocks=nblocks,
        codebook_size=n,
        code_dim=dim,
        norm_groups=groups,
        in_channels=sd["encoder.conv_in.weight"].shape[1],
    )
