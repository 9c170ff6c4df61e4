"""Image transforms written with torch, PIL and numpy only (no torchvision).

Conventions
-----------
* An image is a float tensor ``[C, H, W]`` (normally ``C == 3``) with values in ``[0, 1]``.
  The geometric functions (:func:`resize`, :func:`center_crop`, :func:`pad`, :func:`hflip`)
  also accept batches ``[..., C, H, W]``: they act on the last two dimensions.
* Every random choice takes an optional :class:`torch.Generator`; passing a seeded generator
  makes the result reproducible (``None`` uses torch's global RNG).
* Sizes follow torchvision: an ``int`` size means "shorter side" for :func:`resize` and
  "square" for crops; a pair is ``(height, width)``.

The composable pipeline is built by :func:`build_transform`; every :class:`Transform` is
called as ``transform(img, generator)``.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from mage.errors import MageError

Size = Union[int, Sequence[int]]
PathLike = Union[str, os.PathLike]

__all__ = [
    "AUGMENTS",
    "check_augment",
    "Transform",
    "Compose",
    "Identity",
    "Resize",
    "CenterCrop",
    "Pad",
    "FitToSize",
    "MnistPad",
    "RandomResizedCrop",
    "RandomHFlip",
    "build_transform",
    "resize",
    "crop",
    "center_crop",
    "pad",
    "random_resized_crop",
    "random_resized_crop_params",
    "hflip",
    "random_hflip",
    "to_rgb_tensor",
    "tensor_to_pil",
    "load_image",
    "max_pixels",
    "MAX_PIXELS",
    "make_grid",
    "save_image",
]

#: Valid values of the ``augment`` argument of :func:`build_transform`.
AUGMENTS = ("none", "flip", "crop-flip")


def check_augment(augment: str) -> None:
    """MageError unless ``augment`` is one of :data:`AUGMENTS`."""
    if augment not in AUGMENTS:
        raise MageError(f"unknown augmentation {augment!r}; valid: {', '.join(AUGMENTS)}")


_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


# ----------------------------------------------------------------------------------------
# Functional transforms
# ----------------------------------------------------------------------------------------


def _pair(size: Size) -> tuple[int, int]:
    """``int`` -> ``(s, s)``; a length-1 or length-2 sequence -> ``(h, w)``."""
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size}")
    return size  # type: ignore[return-value]


def _as_4d(img: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Reshape ``[..., C, H, W]`` to ``[N, C, H, W]``; returns the tensor and the leading shape."""
    if img.dim() < 3:
        raise ValueError(f"expected an image [C, H, W] or batch [..., C, H, W], got shape {tuple(img.shape)}")
    lead = tuple(img.shape[:-3])
    return img.reshape(-1, *img.shape[-3:]), lead


def _output_size(height: int, width: int, size: Size) -> tuple[int, int]:
    """Target ``(h, w)`` of :func:`resize`: an int is the new shorter side (aspect ratio kept)."""
    if isinstance(size, int):
        if height <= width:
            return size, max(1, int(size * width / height))
        return max(1, int(size * height / width)), size
    return _pair(size)


def resize(img: torch.Tensor, size: Size, mode: str = "bicubic") -> torch.Tensor:
    """Resize an image (or batch) with ``mode`` in ``bicubic | bilinear | nearest``.

    Args:
        img: float tensor ``[..., C, H, W]``.
        size: ``int`` = new length of the shorter side (aspect ratio kept, as torchvision),
            or ``(height, width)``.
        mode: interpolation. Bilinear/bicubic use torch's antialiased (PIL-like) kernels, which
            low-pass filter when downscaling; the result is clamped to ``[0, 1]`` (bicubic overshoots).

    Returns:
        float tensor ``[..., C, h, w]``.
    """
    if mode not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {mode!r}; valid: {', '.join(_INTERPOLATIONS)}")
    height, width = img.shape[-2:]
    out_h, out_w = _output_size(height, width, size)
    if (out_h, out_w) == (height, width):
        return img
    x, lead = _as_4d(img)
    if not x.is_floating_point():
        raise TypeError(f"resize expects a float image, got {x.dtype}")
    if mode == "nearest":
        # "nearest-exact" matches PIL / torchvision's pixel-centre convention.
        y = F.interpolate(x, size=(out_h, out_w), mode="nearest-exact")
    else:
        y = F.interpolate(x, size=(out_h, out_w), mode=mode, align_corners=False, antialias=True)
        y = y.clamp_(0.0, 1.0)
    return y.reshape(*lead, *y.shape[-3:])


def pad(img: torch.Tensor, padding: Union[int, Sequence[int]], value: float = 0.0) -> torch.Tensor:
    """Constant padding of the last two dims.

    ``padding`` follows torchvision: ``p`` (all sides), ``(lr, tb)`` or ``(left, top, right, bottom)``.
    For example ``pad(img28, 2)`` turns a 28x28 MNIST digit into 32x32.
    """
    if isinstance(padding, int):
        left = top = right = bottom = padding
    else:
        p = [int(v) for v in padding]
        if len(p) == 1:
            left = top = right = bottom = p[0]
        elif len(p) == 2:
            left = right = p[0]
            top = bottom = p[1]
        elif len(p) == 4:
            left, top, right, bottom = p
        else:
            raise ValueError(f"padding must have 1, 2 or 4 values, got {padding}")
    if left == top == right == bottom == 0:
        return img
    x, lead = _as_4d(img)
    y = F.pad(x, (left, right, top, bottom), mode="constant", value=value)
    return y.reshape(*lead, *y.shape[-3:])


def crop(img: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Crop the box ``[top:top+height, left:left+width]`` of the last two dims (must be inside)."""
    return img[..., top : top + height, left : left + width]


def center_crop(img: torch.Tensor, size: Size) -> torch.Tensor:
    """Central crop to ``size`` (int = square). Zero-pads first where the image is smaller (torchvision)."""
    out_h, out_w = _pair(size)
    height, width = img.shape[-2:]
    if out_h > height or out_w > width:
        pad_lr, pad_tb = max(0, out_w - width), max(0, out_h - height)
        img = pad(img, (pad_lr // 2, pad_tb // 2, (pad_lr + 1) // 2, (pad_tb + 1) // 2))
        height, width = img.shape[-2:]
    top = int(round((height - out_h) / 2.0))
    left = int(round((width - out_w) / 2.0))
    return crop(img, top, left, out_h, out_w)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[0, high)``."""
    return int(torch.randint(0, high, (1,), generator=generator).item())


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Crop box ``(top, left, h, w)`` with torchvision's ``RandomResizedCrop.get_params`` semantics.

    Samples an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; up to 10
    attempts, then falls back to a central crop with the ratio clamped into ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_lo, log_hi, generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(height - h + 1, generator)
            left = _randint(width - w + 1, generator)
            return top, left, h, w
    # Fallback: central crop.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: torch.Tensor,
    size: Size,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Random crop (area fraction ``scale``, aspect ``ratio``) resized to ``size`` (torchvision semantics).

    The defaults are MAGE's: ``scale=(0.2, 1.0)`` and bicubic interpolation.

    Args:
        img: ``[..., C, H, W]`` float; the same box is used for all images of a batch.
        size: output size (int = square).
        generator: seeded generator for reproducible crops.

    Returns:
        ``[..., C, size_h, size_w]``.
    """
    height, width = img.shape[-2:]
    top, left, h, w = random_resized_crop_params(height, width, scale, ratio, generator)
    return resize(crop(img, top, left, h, w), _pair(size), mode=mode)


def hflip(img: torch.Tensor) -> torch.Tensor:
    """Mirror left-right (last dim)."""
    return img.flip(-1)


def random_hflip(img: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror with probability ``p`` (one uniform draw from ``generator``)."""
    if torch.rand(1, generator=generator).item() < p:
        return hflip(img)
    return img


# ----------------------------------------------------------------------------------------
# Composable transforms
# ----------------------------------------------------------------------------------------


class Transform:
    """Base class: ``transform(img [C,H,W], generator=None) -> img``.

    ``random`` tells whether the transform draws random numbers (datasets only build a per-item
    generator when it does).
    """

    random: bool = False

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Identity(Transform):
    """Return the image unchanged."""

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return img


class Compose(Transform):
    """Apply ``steps`` in order, sharing one generator (so the whole chain is reproducible)."""

    def __init__(self, steps: Sequence[Callable[..., torch.Tensor]]):
        self.steps = list(steps)

    @property
    def random(self) -> bool:  # type: ignore[override]
        return any(getattr(s, "random", False) for s in self.steps)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for step in self.steps:
            img = step(img, generator) if isinstance(step, Transform) else step(img)
        return img

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(s) for s in self.steps) + "])"


class Resize(Transform):
    """:func:`resize` as a transform."""

    def __init__(self, size: Size, mode: str = "bicubic"):
        self.size, self.mode = size, mode

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return resize(img, self.size, self.mode)


class CenterCrop(Transform):
    """:func:`center_crop` as a transform."""

    def __init__(self, size: Size):
        self.size = size

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return center_crop(img, self.size)


class Pad(Transform):
    """:func:`pad` as a transform."""

    def __init__(self, padding: Union[int, Sequence[int]], value: float = 0.0):
        self.padding, self.value = padding, value

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return pad(img, self.padding, self.value)


def _is_mnist_pad_case(img: torch.Tensor, image_size: int) -> bool:
    """28x28 input and 32x32 output: pad 2 pixels on each side instead of resampling."""
    return image_size == 32 and tuple(img.shape[-2:]) == (28, 28)


class MnistPad(Transform):
    """Pad a 28x28 (MNIST-like) image by 2 to 32x32 when ``image_size == 32``; identity otherwise."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return pad(img, 2) if _is_mnist_pad_case(img, self.image_size) else img


class FitToSize(Transform):
    """Deterministic ``[C,H,W] -> [C,S,S]``.

    * already ``S x S``: unchanged;
    * 28x28 with ``S == 32``: zero-pad 2 pixels per side (the MNISTs);
    * otherwise: resize the shorter side to ``S`` (``mode``) then center crop ``S x S``.
    """

    def __init__(self, image_size: int, mode: str = "bicubic"):
        self.image_size, self.mode = image_size, mode

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        s = self.image_size
        if tuple(img.shape[-2:]) == (s, s):
            return img
        if _is_mnist_pad_case(img, s):
            return pad(img, 2)
        return center_crop(resize(img, s, self.mode), s)


class RandomResizedCrop(Transform):
    """:func:`random_resized_crop` as a transform."""

    random = True

    def __init__(
        self,
        size: Size,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        mode: str = "bicubic",
    ):
        self.size, self.scale, self.ratio, self.mode = size, tuple(scale), tuple(ratio), mode

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_resized_crop(img, self.size, self.scale, self.ratio, generator, self.mode)


class RandomHFlip(Transform):
    """:func:`random_hflip` as a transform."""

    random = True

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_hflip(img, self.p, generator)


def build_transform(image_size: int, train: bool, augment: str = "none") -> Transform:
    """The per-item pipeline ``[3,H,W] -> [3,S,S]`` for ``S = image_size``.

    Args:
        image_size: output side ``S``.
        train: augmentation is only applied when ``True``; with ``False`` the result is always
            the deterministic :class:`FitToSize` path.
        augment: ``"none"`` (deterministic :class:`FitToSize`), ``"flip"`` (deterministic path +
            random horizontal flip) or ``"crop-flip"`` (MAGE's ``RandomResizedCrop(S, scale=(0.2, 1))``
            + random horizontal flip; a 28x28 input for ``S == 32`` is padded to 32 first so crops
            keep the eval-time framing).

    Raises:
        MageError: unknown ``augment`` or non-positive ``image_size``.
    """
    check_augment(augment)
    if not isinstance(image_size, int) or image_size < 1:
        raise MageError(f"image size must be a positive integer, got {image_size!r}")
    if not train or augment == "none":
        return FitToSize(image_size)
    if augment == "flip":
        return Compose([FitToSize(image_size), RandomHFlip(0.5)])
    return Compose([MnistPad(image_size), RandomResizedCrop(image_size, scale=(0.2, 1.0)), RandomHFlip(0.5)])


# ----------------------------------------------------------------------------------------
# PIL conversion, image files, grids
# ----------------------------------------------------------------------------------------


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def decode_opened(image: Image.Image) -> torch.Tensor:
    """An opened image (header read, size already checked) -> ``[3, H, W]`` in ``[0, 1]``: the first frame of an
    animation, turned by its EXIF orientation, converted by :func:`to_rgb_tensor`."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image.load()
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not make a good image unreadable
        pass
    return to_rgb_tensor(image)


def to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image of any common mode -> float tensor ``[3, H, W]`` in ``[0, 1]``.

    * ``RGB``: as is; ``L``/``1``: grey replicated to 3 channels; ``CMYK``/``YCbCr``/``LAB``/``HSV``:
      PIL's conversion to RGB; ``P`` (palette): palette colours.
    * Transparency (``RGBA``, ``LA``, ``PA``, palette or RGB with a transparency key) is
      **composited on a white background** (transparent pixels often hold arbitrary colours,
      so simply dropping alpha can show garbage).
    * 16/32-bit integer modes (``I;16*``, ``I``) are scaled by 1/65535 (16-bit PNG range);
      float mode ``F`` is taken as ``[0, 1]`` if its maximum is <= 1, else as ``[0, 255]``.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        if mode == "F":
            arr = arr if arr.size == 0 or arr.max() <= 1.0 else arr / 255.0
        else:
            arr = arr / 65535.0
        grey = torch.from_numpy(np.clip(arr, 0.0, 1.0).astype(np.float32))
        return grey.unsqueeze(0).repeat(3, 1, 1)  # [3, H, W]
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    elif mode == "LAB":
        from PIL import ImageCms  # PIL cannot convert LAB -> RGB directly

        image = ImageCms.applyTransform(
            image,
            ImageCms.buildTransformFromOpenProfiles(
                ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
            ),
        )
    elif mode != "RGB":
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0).contiguous()


def tensor_to_pil(img: torch.Tensor) -> Image.Image:
    """Float ``[3, H, W]`` (or ``[1, H, W]``) in ``[0, 1]`` -> RGB (or L) PIL image, rounded to uint8."""
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected an image [3, H, W] or [1, H, W], got shape {tuple(img.shape)}")
    arr = img.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).add_(0.5).to(torch.uint8)
    arr = arr.permute(1, 2, 0).numpy()  # [H, W, C]
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(arr, mode="RGB")


def _one_line(exc: BaseException) -> str:
    """An exception as a short single-line reason."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return " ".join(text.split())


#: Default limit on an input image's pixels (width x height), 64 Mi = 8192 x 8192: checked from the file's header
#: before anything is decoded, so a huge (or forged) image cannot take the memory. The environment variable
#: ``MAGE_MAX_PIXELS`` overrides it (0 = no limit).
MAX_PIXELS = 64 * 1024 * 1024


def max_pixels() -> int:
    """The pixel limit of :func:`load_image`: ``MAGE_MAX_PIXELS`` when set, else :data:`MAX_PIXELS`; 0 = none."""
    text = os.environ.get("MAGE_MAX_PIXELS", "").strip()
    if not text:
        return int(MAX_PIXELS)
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise MageError(f"MAGE_MAX_PIXELS must be a whole number of pixels >= 0 (0 = no limit), got '{text}'")
    return value


def _too_large(path: PathLike, pixels: int | None, limit: int, size: tuple[int, int] | None = None) -> MageError:
    what = f"{size[0]}x{size[1]} = " if size else ""
    got = f" ({what}{pixels:,} pixels)" if pixels else ""
    return MageError(
        f"image {path} is too large{got}: the limit is {limit:,} pixels (set MAGE_MAX_PIXELS to change it)"
    )


def load_image(path: PathLike) -> torch.Tensor:
    """Read an image file -> float ``[3, H, W]`` in ``[0, 1]``.

    Odd but valid files work: the EXIF orientation is applied; 16-bit grey (``I;16``, ``I``), CMYK, palette,
    grey and 1-bit images are converted (see :func:`to_rgb_tensor`); transparency is composited on **white**;
    of an animated GIF / WebP the first frame is read. An image of more than :func:`max_pixels` pixels is
    refused from its header, before it is decoded (PIL's own decompression-bomb limit is kept at the same
    value, so its error reads the same).

    Raises:
        MageError: one line ``cannot read image PATH: REASON`` for a missing, unreadable, corrupt, truncated or
            non-image file; ``image PATH is too large ...`` for one over the pixel limit.
    """
    limit = max_pixels()
    Image.MAX_IMAGE_PIXELS = limit or None  # PIL warns past this and refuses past twice this
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, in our words
            opened = Image.open(path)  # lazy: reads the header only
        with opened as image:
            w, h = image.size
            if limit and w * h > limit:
                raise _too_large(path, w * h, limit, (w, h))
            return decode_opened(image)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, int(found.group(1)) if found else None, limit) from None
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, EOFError) as exc:
        raise MageError(f"cannot read image {path}: {_one_line(exc)}") from exc


def make_grid(
    batch: Union[torch.Tensor, Sequence[torch.Tensor]],
    nrow: int | None = None,
    padding: int = 2,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Tile images into one image.

    Args:
        batch: ``[B, C, H, W]`` tensor or a list of ``[C, H, W]`` tensors of equal shape.
        nrow: images per row (torchvision meaning); default ``ceil(sqrt(B))``.
        padding: pixels between images and around the border.
        pad_value: colour of the padding.

    Returns:
        ``[C, rows * (H + padding) + padding, nrow * (W + padding) + padding]`` with
        ``rows = ceil(B / nrow)``; cells beyond ``B`` are ``pad_value``.
    """
    if not torch.is_tensor(batch):
        batch = torch.stack(list(batch))
    if batch.dim() == 3:
        batch = batch.unsqueeze(0)
    if batch.dim() != 4:
        raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(batch.shape)}")
    b, c, h, w = batch.shape
    if b == 0:
        raise ValueError("cannot make a grid of zero images")
    ncol = max(1, min(nrow if nrow else math.ceil(math.sqrt(b)), b))
    rows = math.ceil(b / ncol)
    grid = batch.new_full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for k in range(b):
        r, q = divmod(k, ncol)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top : top + h, left : left + w] = batch[k]
    return grid


def save_image(
    tensor: torch.Tensor,
    path: PathLike,
    nrow: int | None = None,
    padding: int = 2,
    pad_value: float = 0.0,
) -> None:
    """Write ``[3, H, W]`` (or a batch ``[B, 3, H, W]`` as a :func:`make_grid` grid) to a PNG.

    Values are clamped to ``[0, 1]`` and rounded to uint8; parent folders are created.

    Raises:
        MageError: the file cannot be written.
    """
    tensor = tensor.detach().to("cpu", torch.float32)
    if tensor.dim() == 4:
        tensor = make_grid(tensor, nrow=nrow, padding=padding, pad_value=pad_value)
    image = tensor_to_pil(tensor)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
    except (OSError, ValueError) as exc:
        raise MageError(f"cannot write image {path}: {_one_line(exc)}") from exc
