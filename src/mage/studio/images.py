"""Images in and out of the studio: uploads checked before they are decoded, PNG data URLs back.

Every image the API returns is a ``data:image/png;base64,...`` URL of 8-bit RGB pixels. Inputs are put on the
same 8-bit grid (:func:`quantize`) before the model sees them, so a returned PNG and the tensor behind it
hold the same values: pixels an edit keeps are byte-for-byte those of the input PNG.
"""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image, UnidentifiedImageError

from ..transforms import build_transform, decode_opened, tensor_to_pil, to_rgb_tensor


class UploadError(Exception):
    """An upload the studio refuses: ``status`` is the HTTP status (400 not an image, 413 too large)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_bytes: int, max_pixels: int, what: str = "upload") -> torch.Tensor:
    """The bytes of an uploaded file -> float [3, H, W] in [0, 1]. The byte and pixel limits are checked
    before decoding (the size comes from the header), so a decompression bomb is never expanded."""
    if len(data) == 0:
        raise UploadError(400, f"the {what} is empty")
    if len(data) > max_bytes:
        # the caller may have read only max_bytes + 1 bytes: the true size is not known
        raise UploadError(413, f"the {what} is larger than the limit of {max_bytes:,} bytes")
    try:
        # PIL's own (process-wide) bomb guard stays as it is: ours below checks the header first
        opened = Image.open(io.BytesIO(data))  # lazy: reads the header only
        with opened as image:
            w, h = image.size
            if w * h > max_pixels:
                raise UploadError(413, f"the {what} is {w}x{h} = {w * h:,} pixels: the limit is {max_pixels:,} pixels")
            if w < 1 or h < 1:
                raise UploadError(400, f"the {what} has no pixels ({w}x{h})")
            return decode_opened(image)
    except UploadError:
        raise
    except Image.DecompressionBombError:
        raise UploadError(413, f"the {what} has too many pixels: the limit is {max_pixels:,} pixels") from None
    except UnidentifiedImageError:
        raise UploadError(400, f"the {what} is not an image (send a PNG, JPEG, WebP, GIF or BMP file)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        reason = " ".join((str(e).strip() or type(e).__name__).split())
        raise UploadError(400, f"the {what} cannot be decoded: {reason}") from None


def quantize(img: torch.Tensor) -> torch.Tensor:
    """[3, H, W] -> the same clamped to [0, 1] and rounded to the 8-bit grid (k / 255): what a PNG stores."""
    return img.clamp(0, 1).mul(255).round().div(255)


def fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """Any [3, H, W] -> [3, size, size] the way the model's data was prepared (pad 28 -> 32, else resize +
    centre crop), on the 8-bit grid."""
    return quantize(build_transform(size, train=False, augment="none")(img))


def data_url(img: torch.Tensor) -> str:
    """[3, H, W] in [0, 1] -> ``data:image/png;base64,...``."""
    buf = io.BytesIO()
    tensor_to_pil(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def from_data_url(url: str) -> torch.Tensor:
    """The inverse of :func:`data_url` (tests, the load script): [3, H, W] in [0, 1]."""
    head, _, payload = url.partition(",")
    if not head.startswith("data:image/png;base64"):
        raise ValueError("not a PNG data URL")
    with Image.open(io.BytesIO(base64.b64decode(payload))) as im:
        return to_rgb_tensor(im)
