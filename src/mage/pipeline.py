"""Model + tokenizer together: images in, images out.

pipe = MAGEPipeline.from_pretrained("runs/mage")      # finds runs/mage/tokenizer
images = pipe.generate(16, seed=0)                    # [16, 3, H, W] in [0, 1]
"""

from __future__ import annotations

import json
import os

import torch

from . import fastpath
from .errors import MageError
from .model import MAGE
from .precision import autocast, bf16_supported
from .sampler import SamplerConfig, decode_tokens, model_sampler
from .vqgan import VQTokenizer


class MAGEPipeline:
    def __init__(self, model: MAGE, tokenizer: VQTokenizer, classes: list[str] | None = None, bf16: bool = False):
        """``bf16``: run the transformer and the VQGAN under bf16 autocast where the device has bf16 matrix
        hardware (fp32 elsewhere), with the VQGAN channels-last (:meth:`VQTokenizer.channels_last`).
        The model is switched to the inference fast path (:func:`mage.fastpath.apply`, in place)."""
        if (
            tokenizer.config.codebook_size != model.config.codebook_size
            or tokenizer.config.num_tokens != model.config.num_tokens
        ):
            raise MageError("tokenizer and model do not fit (codebook size or token count differ)")
        self.model, self.tokenizer, self.classes = model.eval(), tokenizer.eval(), classes
        self.sampler = SamplerConfig()  # what sampling uses when no sampler is given (from_pretrained: the model's)
        fastpath.apply(model, self.device, training=False)
        self.bf16 = bf16 and bf16_supported(self.device.type)
        if self.bf16:
            tokenizer.channels_last()

    def math(self):
        """The context the VQGAN runs in: bf16 autocast when ``self.bf16`` (the sampler takes ``bf16=self.bf16``)."""
        return autocast(self.device, self.bf16)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls, path: str, tokenizer: str | None = None, device: str | torch.device | None = None, weights: str = "fp32"
    ) -> "MAGEPipeline":
        """Load model + tokenizer (default device: CUDA when available). ``weights="bf16"`` keeps the weights
        in bf16 (half the memory; see :func:`mage.precision.store_weights_bf16`) and, on bf16 hardware (a GPU,
        a CPU with AMX / AVX512-BF16), computes in bf16 too."""
        if weights not in ("fp32", "bf16"):
            raise MageError(f"unknown weights dtype '{weights}' (fp32 | bf16)")
        from .precision import store_weights_bf16
        from .released import resolve

        path, tokenizer = resolve(path, "mage"), tokenizer and resolve(tokenizer, "tokenizer")

        stored = store_weights_bf16 if weights == "bf16" else (lambda m: m)  # per model: fp32 copies never coexist
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = stored(MAGE.from_pretrained(path, map_location=device))
        tok_path = tokenizer or os.path.join(path, "tokenizer")
        if not os.path.exists(tok_path):
            raise MageError(f"no tokenizer at {tok_path}: pass one explicitly")
        classes = None
        cpath = os.path.join(path, "classes.json")
        if os.path.isfile(cpath):
            classes = _read_classes(cpath)
        pipe = cls(
            model, stored(VQTokenizer.from_pretrained(tok_path, map_location=device)), classes, bf16=weights == "bf16"
        )
        pipe.sampler = model_sampler(path)
        return pipe

    # ---- classes ---------------------------------------------------------------------------------
    def class_index(self, name_or_id: str | int) -> int:
        """A class id from a number or a class name (case-insensitive)."""
        n = self.model.config.num_classes
        if n == 0:
            raise MageError("this model is not class-conditional: train it with 'mage pretrain --class-conditional'")
        s = str(name_or_id).strip()
        if s.lstrip("-").isdigit():
            i = int(s)
        else:
            names = [c.lower() for c in (self.classes or [])]
            if s.lower() not in names:
                raise MageError(f"unknown class '{s}' (known: {', '.join(self.classes or []) or 'none'})")
            i = names.index(s.lower())
        if not 0 <= i < n:
            raise MageError(f"class id {i} out of range [0, {n})")
        return i

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(
        self,
        num: int,
        labels: torch.Tensor | None = None,
        sampler: SamplerConfig | None = None,
        seed: int = 0,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """num token grids [num, L], sampled from scratch (100% masked). Batch b uses seed + b."""
        if num < 1 or batch_size < 1:
            raise MageError(f"generation needs num >= 1 and batch_size >= 1 (got {num}, {batch_size})")
        sampler = sampler or self.sampler
        out = []
        for b, s in enumerate(range(0, num, batch_size)):
            n = min(batch_size, num - s)
            g = torch.Generator().manual_seed(seed + b)
            start = torch.full((n, self.model.config.num_tokens), self.model.vocab.mask_id, device=self.device)
            lab = None if labels is None else labels[s : s + n].to(self.device)
            out.append(decode_tokens(self.model, start, sampler, lab, g, bf16=self.bf16))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        with self.math():
            return torch.cat(
                [
                    self.tokenizer.decode(tokens[s : s + batch_size]).clamp(0, 1).cpu()
                    for s in range(0, tokens.shape[0], batch_size)
                ]
            )

    def generate(
        self,
        num: int,
        class_label: str | int | None = None,
        sampler: SamplerConfig | None = None,
        seed: int = 0,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """num images [num, 3, H, W] in [0, 1]; ``class_label`` (id or name) needs a class-conditional model."""
        labels = None
        if class_label is not None:
            labels = torch.full((num,), self.class_index(class_label))
        return self.decode(self.generate_tokens(num, labels, sampler, seed, batch_size))

    def generate_per_class(
        self, per_class: int, sampler: SamplerConfig | None = None, seed: int = 0, batch_size: int = 64
    ) -> torch.Tensor:
        """per_class images of every class, class-major: [num_classes * per_class, 3, H, W]."""
        n = self.model.config.num_classes
        if n == 0:
            raise MageError("this model is not class-conditional: train it with 'mage pretrain --class-conditional'")
        labels = torch.arange(n).repeat_interleave(per_class)
        return self.decode(self.generate_tokens(len(labels), labels, sampler, seed, batch_size))


# --------------------------------------------------------------------------------------------------
# editing: inpaint / outpaint
# --------------------------------------------------------------------------------------------------
def token_mask(pixel_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """pixel mask [H, W] (True = regenerate) -> token mask [(H/f)*(W/f)]: any overlap masks the token."""
    m = pixel_mask.float()[None, None]
    return (torch.nn.functional.max_pool2d(m, factor) > 0).flatten()


def _feathered(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Soft version of a {0,1} mask [H, W] that stays exactly 0 outside the mask (so untouched pixels are kept)."""
    m = mask.float()
    if radius <= 0:
        return m
    k = 2 * radius + 1
    soft = torch.nn.functional.avg_pool2d(m[None, None], k, stride=1, padding=radius, count_include_pad=False)[0, 0]
    return soft * m  # inside: ramps up from the edge; outside: 0


def _inpaint_tokens(
    pipe: MAGEPipeline,
    image: torch.Tensor,
    pixel_mask: torch.Tensor,
    label: torch.Tensor | None,
    sampler: SamplerConfig,
    g: torch.Generator,
) -> torch.Tensor:
    """image [3,S,S], pixel_mask [S,S] -> generated image [3,S,S] (not composited)."""
    f = pipe.tokenizer.config.downsample
    with pipe.math():
        tokens = pipe.tokenizer.encode(image[None].to(pipe.device))  # [1, L]
    tm = token_mask(pixel_mask, f).to(pipe.device)
    tokens[0, tm] = pipe.model.vocab.mask_id
    out = decode_tokens(
        pipe.model, tokens, sampler, None if label is None else label.to(pipe.device), g, bf16=pipe.bf16
    )
    return pipe.decode(out)[0]


def _check_image(pipe: MAGEPipeline, image: torch.Tensor) -> int:
    S = pipe.tokenizer.config.image_size
    if image.dim() != 3 or image.shape[0] != 3:
        raise MageError(f"expected an image [3, H, W], got {tuple(image.shape)}")
    return S


@torch.no_grad()
def inpaint(
    pipe: MAGEPipeline,
    image: torch.Tensor,
    mask: torch.Tensor,
    class_label: str | int | None = None,
    sampler: SamplerConfig | None = None,
    seed: int = 0,
    feather: int = 0,
) -> torch.Tensor:
    """Regenerate the masked region of an image at the model's resolution.

    image [3,S,S] in [0,1]; mask [S,S] bool (True = regenerate). Tokens overlapping the mask are masked and
    re-sampled (optionally conditioned on a class); pixels outside the mask are copied back exactly."""
    S = _check_image(pipe, image)
    if tuple(image.shape[-2:]) != (S, S):
        raise MageError(f"image is {tuple(image.shape[-2:])}, the model works at {S}x{S}: resize it first")
    if tuple(mask.shape) != (S, S):
        raise MageError(f"mask is {tuple(mask.shape)}, expected {(S, S)} (the image's size)")
    if not mask.any():
        return image.clone()
    sampler = sampler or pipe.sampler
    label = None if class_label is None else torch.tensor([pipe.class_index(class_label)])
    gen = _inpaint_tokens(pipe, image, mask.bool(), label, sampler, torch.Generator().manual_seed(seed))
    w = _feathered(mask.bool(), feather)
    return image * (1 - w) + gen * w


#: Outpainting extends each side by at most this many times the model's resolution (the work grows with the
#: square of the canvas: a canvas of 9 x 9 tiles is already hundreds of decodes).
MAX_EXTEND = 4


@torch.no_grad()
def outpaint(
    pipe: MAGEPipeline,
    image: torch.Tensor,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    class_label: str | int | None = None,
    sampler: SamplerConfig | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Extend the canvas on any side, each by at most :data:`MAX_EXTEND` x the model's resolution S. Canvases
    larger than S are filled tile by tile (S x S windows with 50% overlap, nearest to the original first); the
    original pixels are kept exactly."""
    S = _check_image(pipe, image)
    if min(left, right, top, bottom) < 0:
        raise MageError("extensions must be >= 0")
    most = MAX_EXTEND * S
    for side, n in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        if n > most:
            raise MageError(
                f"cannot extend {side} by {n} pixels: at most {most} per side ({MAX_EXTEND} x the model's "
                f"{S}-pixel tiles); outpaint in several passes for more"
            )
    _, H, W = image.shape
    CH, CW = H + top + bottom, W + left + right
    if CH < S or CW < S:
        raise MageError(f"the extended canvas {CH}x{CW} is smaller than the model's {S}x{S} tiles")
    canvas = torch.zeros(3, CH, CW)
    canvas[:, top : top + H, left : left + W] = image
    known = torch.zeros(CH, CW, dtype=torch.bool)
    known[top : top + H, left : left + W] = True
    f = pipe.tokenizer.config.downsample
    stride = max(f, (S // 2) // f * f)
    ys = sorted(set(list(range(0, CH - S + 1, stride)) + [CH - S]))
    xs = sorted(set(list(range(0, CW - S + 1, stride)) + [CW - S]))
    cy, cx = top + H / 2, left + W / 2
    windows = sorted(
        ((y, x) for y in ys for x in xs), key=lambda p: (p[0] + S / 2 - cy) ** 2 + (p[1] + S / 2 - cx) ** 2
    )
    sampler = sampler or pipe.sampler
    label = None if class_label is None else torch.tensor([pipe.class_index(class_label)])
    for i, (y, x) in enumerate(windows):
        unk = ~known[y : y + S, x : x + S]
        if not unk.any():
            continue
        gen = _inpaint_tokens(
            pipe, canvas[:, y : y + S, x : x + S], unk, label, sampler, torch.Generator().manual_seed(seed + i)
        )
        canvas[:, y : y + S, x : x + S] = torch.where(unk[None], gen, canvas[:, y : y + S, x : x + S])
        known[y : y + S, x : x + S] = True
    return canvas


def _read_classes(path: str) -> list[str]:
    """A run's classes.json: a list of class names, or a one-line MageError."""
    try:
        with open(path, encoding="utf-8") as f:
            classes = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MageError(f"cannot read class names {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise MageError(f"cannot read class names {path}: expected a JSON list of names")
    return classes
