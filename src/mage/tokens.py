"""The token cache (``mage cache-tokens``): a dataset split tokenized once, read by pre-training and fine-tuning.

Tokens are stored as int16 when the codebook fits (int32 otherwise): ``views`` [N, V, L] (V = the image,
its mirror, then any random-resized crops) and ``labels`` [N], with the tokenizer (its path and the sha256 of its
weights, checked by pre-training and fine-tuning: :func:`check_cache_tokenizer`) and data in the metadata.
They stay in that dtype in memory too (the file is memory-mapped, never copied): :meth:`TokenCache.rows`
widens only the rows a step uses.

Under ``torchrun`` each rank tokenizes a contiguous run of whole batches and rank 0 joins the parts in order,
so N ranks write the file 1 process writes, bit for bit::

    torchrun --standalone --nproc_per_node=4 -m mage cache-tokens --tokenizer tok --data folder:imgs --out c.safetensors
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .checkpoint import resolve_checkpoint
from .errors import MageError
from .files import atomic_write
from .vqgan import VQTokenizer


class _ImageAndCrops(torch.utils.data.Dataset):
    """Item ``i`` -> (``[1 + crops, 3, S, S]``: the image then its seeded random-resized crops, label); runs in
    DataLoader workers, so the crops are drawn there too."""

    def __init__(self, dataset, crops: int, crop_scale: float, seed: int):
        from .transforms import Compose, RandomHFlip, RandomResizedCrop

        self.dataset, self.crops, self.seed = dataset, crops, seed
        size = dataset.image_size
        self.crop = Compose([RandomResizedCrop(size, scale=(crop_scale, 1.0)), RandomHFlip(0.5)])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from .data import item_generator

        image, label = self.dataset.item(i, 0)  # [3, S, S]; no augmentation
        views = [image] + [self.crop(image, item_generator(self.seed, 1 + v, i)) for v in range(self.crops)]
        return torch.stack(views), label  # [1 + crops, 3, S, S]


def tokenizer_digest(tok: VQTokenizer) -> str:
    """sha256 of a tokenizer's weights: the names, dtypes, shapes and bytes of its state dict, so the same weights
    give the same digest whichever file they were read from (a run's copy, a re-saved original checkpoint)."""
    h = hashlib.sha256()
    for name, t in sorted(tok.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_cache_tokenizer(cache: "TokenCache | None", tok: VQTokenizer, tokenizer: str | None) -> None:
    """A token cache is only valid with the tokenizer that made it: refuse (one line) a ``tok`` whose weights
    differ from those recorded in the cache (caches from before the record: a warning, nothing to compare)."""
    if cache is None:
        return
    recorded = cache.meta.get("tokenizer_sha256")
    if not recorded:
        warnings.warn(
            f"token cache {cache.path} does not record its tokenizer's weights (an older cache): cannot check that "
            f"it was made with {tokenizer}",
            UserWarning,
            stacklevel=2,
        )
        return
    mine = tokenizer_digest(tok)
    if mine != recorded:
        raise MageError(
            f"token cache {cache.path} was made with another tokenizer than {tokenizer} (weights sha256 "
            f"{recorded[:12]}, not {mine[:12]}): make it again with 'mage cache-tokens --tokenizer {tokenizer}'"
        )


def _save(tensors: dict[str, torch.Tensor], out: str, meta: dict[str, str] | None = None) -> None:
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))


def cache_tokens(
    tokenizer: str,
    data: str,
    out: str,
    split: str = "train",
    data_dir: str | None = None,
    limit: int | None = None,
    flip: bool = True,
    batch_size: int = 256,
    progress: bool = True,
    crops: int = 0,
    crop_scale: float = 0.2,
    seed: int = 0,
    device: str | None = None,
    workers: int | None = None,
) -> str:
    """Tokenize a dataset split once: ``views`` [N, V, L] + ``labels``. View 0 = the image, view 1 = its mirror
    (``flip``), then ``crops`` random-resized crops (area fraction in [crop_scale, 1], the original's
    ``RandomResizedCrop`` + random flip; seeded per image and view) -- pre-training draws a view per step,
    so a cache with crops trains with the original's augmentation, and MAGE-C contrasts two different views.
    Images are decoded (and cropped) by ``workers`` DataLoader processes (default: :func:`mage.loader.default_workers`,
    shared among the ranks); the tokenizer runs on ``device`` (default: CUDA when available, this rank's GPU
    under torchrun)."""
    from .data import load_dataset
    from .distributed import barrier, init_distributed
    from .loader import data_loader, default_workers
    from .transforms import hflip

    if crops < 0 or not 0 < crop_scale <= 1:
        raise MageError(f"--crops must be >= 0 and --crop-scale in (0, 1] (got {crops}, {crop_scale})")
    if workers is not None and workers < 0:
        raise MageError(f"workers must be >= 0, got {workers}")
    info = init_distributed()
    dev = torch.device(device) if device else info.device
    tok = VQTokenizer.from_pretrained(tokenizer, map_location=dev)
    enc = lambda x: tok.encode(x.to(dev)).cpu()  # noqa: E731  [b, L]
    dtype = torch.int16 if tok.config.codebook_size < 32768 else torch.int32
    ds = load_dataset(data, split, tok.config.image_size, "none", data_dir, 0, limit)

    # this rank's batches: a contiguous run of the 1-process run's batches (same boundaries, same numbers)
    starts = list(range(0, len(ds), batch_size))
    mine = starts[len(starts) * info.rank // info.world : len(starts) * (info.rank + 1) // info.world]
    if workers is None:
        workers = min(default_workers(), max(1, (os.cpu_count() or 1) // info.world))
    workers = min(workers, len(mine)) if len(mine) > 1 else 0  # one batch: nothing to overlap
    loader = data_loader(
        _ImageAndCrops(ds, crops, crop_scale, seed),
        [list(range(s, min(len(ds), s + batch_size))) for s in mine],
        workers,
        pin_memory=dev.type == "cuda",
    )
    views, labels = [], []
    for images, y in tqdm(loader, desc=f"cache-tokens {data}:{split}", disable=not (progress and info.is_main)):
        x = images[:, 0]  # [b, 3, S, S]
        batch = [enc(x)] + ([enc(hflip(x))] if flip else []) + [enc(images[:, 1 + v]) for v in range(crops)]
        views.append(torch.stack(batch, 1).to(dtype))  # [b, V, L]
        labels.append(y)
    L, V = tok.config.num_tokens, 1 + int(flip) + crops
    views = torch.cat(views) if views else torch.empty(0, V, L, dtype=dtype)  # [n_rank, V, L]
    labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)

    meta = {
        "data": data,
        "split": split,
        "tokenizer": os.path.abspath(resolve_checkpoint(tokenizer))
        if os.path.isdir(tokenizer)
        else os.path.abspath(tokenizer),
        "codebook_size": str(tok.config.codebook_size),
        "num_tokens": str(tok.config.num_tokens),
        "classes": json.dumps(getattr(ds, "classes", None)),
        "crops": str(crops),
        "crop_scale": str(crop_scale),
        "tokenizer_sha256": tokenizer_digest(tok),
    }
    if info.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    barrier(info)  # the folder exists for every rank
    if info.enabled:
        part = lambda r: f"{out}.part{r}-of-{info.world}"  # noqa: E731
        _save({"views": views, "labels": labels}, part(info.rank))
        barrier(info)
        if info.is_main:
            views, labels = [], []
            for r in range(info.world):
                with safe_open(part(r), "pt") as f:
                    views.append(f.get_tensor("views"))
                    labels.append(f.get_tensor("labels"))
            views, labels = torch.cat(views), torch.cat(labels)
    if info.is_main:
        _save({"views": views, "labels": labels}, out, meta)
        if info.enabled:
            for r in range(info.world):
                os.remove(part(r))
    barrier(info)  # every rank returns once the file is there
    return out


class TokenCache:
    """A token cache file: ``views`` [N, V, L] in the file's dtype (int16, or int32 for codebooks past 32767),
    ``labels`` [N] int64, ``meta`` (tokenizer path, classes...), ``classes``.

    The file is memory-mapped: resident memory is at most the file's size (pages are read as rows are used,
    and ranks on one machine share them); :meth:`rows` gives the int64 ids a step needs."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise MageError(f"token cache not found: {path}")
        self.path = path
        try:
            with safe_open(path, "pt") as f:
                self.meta = f.metadata() or {}
                self.views = f.get_tensor("views")  # [N, V, L] int16 | int32, mapped
                self.labels = f.get_tensor("labels")  # [N] int64
        except Exception as e:
            raise MageError(f"cannot read token cache {path}: {str(e).splitlines()[0]}") from None
        self.classes = json.loads(self.meta.get("classes", "null"))

    def __len__(self) -> int:
        return self.views.shape[0]

    def rows(self, idx: torch.Tensor, view: torch.Tensor | int) -> torch.Tensor:
        """Token ids of rows ``idx`` [b], row ``idx[k]`` in view ``view[k]`` (or one view for all): int64 [b, L]."""
        return self.views[idx, view].long()
