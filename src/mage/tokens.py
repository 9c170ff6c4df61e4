"""The token cache (``mage cache-tokens``): a dataset split tokenized once, read by pre-training and fine-tuning.

Tokens are stored as int16 when the codebook fits (int32 otherwise): ``views`` [N, V, L] (V = the image,
its mirror, then any random-resized crops) and ``labels`` [N], with the tokenizer and data in the metadata.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .checkpoint import resolve_checkpoint
from .errors import MageError
from .vqgan import VQTokenizer


# --------------------------------------------------------------------------------------------------
def cache_tokens(tokenizer: str, data: str, out: str, split: str = "train", data_dir: str | None = None,
                 limit: int | None = None, flip: bool = True, batch_size: int = 256, progress: bool = True,
                 crops: int = 0, crop_scale: float = 0.2, seed: int = 0, device: str | None = None) -> str:
    """Tokenize a dataset split once: ``views`` [N, V, L] + ``labels``. View 0 = the image, view 1 = its mirror
    (``flip``), then ``crops`` random-resized crops (area fraction in [crop_scale, 1], the original's
    ``RandomResizedCrop`` + random flip; seeded per image and view) -- pre-training draws a view per step,
    so a cache with crops trains with the original's augmentation, and MAGE-C contrasts two different views.
    The tokenizer runs on ``device`` (default: CUDA when available); crops are drawn on the CPU either way."""
    from .data import item_generator, load_dataset
    from .transforms import Compose, RandomHFlip, RandomResizedCrop, hflip

    if crops < 0 or not 0 < crop_scale <= 1:
        raise MageError(f"--crops must be >= 0 and --crop-scale in (0, 1] (got {crops}, {crop_scale})")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = VQTokenizer.from_pretrained(tokenizer, map_location=dev)
    enc = lambda x: tok.encode(x).cpu()                                            # noqa: E731  [b, L]
    S = tok.config.image_size
    ds = load_dataset(data, split, S, "none", data_dir, 0, limit)
    crop = Compose([RandomResizedCrop(S, scale=(crop_scale, 1.0)), RandomHFlip(0.5)])
    views, labels = [], []
    for s in tqdm(range(0, len(ds), batch_size), desc=f"cache-tokens {data}:{split}", disable=not progress):
        ids = range(s, min(len(ds), s + batch_size))
        items = [ds[i] for i in ids]
        x = torch.stack([im for im, _ in items])                                  # [b, 3, S, S]
        batch = [enc(x)]
        if flip:
            batch.append(enc(hflip(x)))
        for v in range(crops):
            batch.append(enc(torch.stack([crop(im, item_generator(seed, 1 + v, i)) for im, i in zip(x, ids)])))
        views.append(torch.stack(batch, 1))                                       # [b, V, L]
        labels += [y for _, y in items]
    meta = {"data": data, "split": split, "tokenizer": os.path.abspath(resolve_checkpoint(tokenizer)) if os.path.isdir(tokenizer) else os.path.abspath(tokenizer),
            "codebook_size": str(tok.config.codebook_size), "num_tokens": str(tok.config.num_tokens),
            "classes": json.dumps(getattr(ds, "classes", None)), "crops": str(crops), "crop_scale": str(crop_scale)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    dtype = torch.int16 if tok.config.codebook_size < 32768 else torch.int32
    save_file({"views": torch.cat(views).to(dtype), "labels": torch.tensor(labels, dtype=torch.int64)}, tmp, metadata=meta)
    os.replace(tmp, out)
    return out


class TokenCache:
    """Tokens [N, V, L] (int64 in memory), labels [N], metadata (tokenizer path, classes)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise MageError(f"token cache not found: {path}")
        try:
            with safe_open(path, "pt") as f:
                self.meta = f.metadata() or {}
                self.views = f.get_tensor("views").long()
                self.labels = f.get_tensor("labels")
        except Exception as e:
            raise MageError(f"cannot read token cache {path}: {str(e).splitlines()[0]}") from None
        self.classes = json.loads(self.meta.get("classes", "null"))

    def __len__(self) -> int:
        return self.views.shape[0]


