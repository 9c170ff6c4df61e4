"""mage.loader: step -> rows (ranks, epochs), and batches that do not depend on workers, ranks or resuming."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from PIL import Image

from mage import seeding
from mage.data import load_dataset
from mage.errors import MageError
from mage.loader import VIEW_KEY, StepSampler, default_workers, step_batches, step_rows


def test_step_rows_split_the_global_batch_across_ranks():
    for step in (0, 1, 5, 17):
        whole = step_rows(50, 8, seed=3, step=step)
        parts = [step_rows(50, 8, seed=3, step=step, rank=r, world=2) for r in range(2)]
        assert whole.dtype == torch.int64 and whole.shape == (8,)
        assert torch.equal(torch.cat(parts), whole)
        assert torch.equal(torch.cat([step_rows(50, 8, 3, step, r, 4) for r in range(4)]), whole)


def test_step_rows_epochs():
    n, B, seed = 10, 4, 1  # 2 steps per epoch, 2 items dropped each
    epoch0 = torch.cat([step_rows(n, B, seed, s) for s in (0, 1)])
    assert len(set(epoch0.tolist())) == 8  # no repeats inside an epoch
    for epoch in (0, 1, 2):
        perm = torch.randperm(n, generator=seeding.generator(seed, seeding.PERMUTATION, epoch))
        for i in (0, 1):
            assert torch.equal(step_rows(n, B, seed, 2 * epoch + i), perm[i * B : (i + 1) * B])
    assert not torch.equal(step_rows(n, B, seed, 0), step_rows(n, B, seed, 2))  # a new order each epoch
    assert not torch.equal(step_rows(n, B, seed, 0), step_rows(n, B, seed + 1, 0))
    step_rows(n, B, seed, 0)[:] = -1  # callers get a copy
    assert step_rows(n, B, seed, 0).min() >= 0
    for bad in (
        {"n": 3, "global_batch": 4},
        {"n": 10, "global_batch": 4, "world": 3},
        {"n": 10, "global_batch": 4, "rank": 2, "world": 2},
    ):
        with pytest.raises(MageError):
            step_rows(seed=0, step=0, **bad)


def test_sampler_keys_each_view():
    s = StepSampler(12, 4, 0, start_step=5, end_step=7, views=2)
    batches = list(s)
    assert len(s) == len(batches) == 2
    rows = step_rows(12, 4, 0, 5).tolist()
    assert batches[0] == [(5, i) for i in rows] + [(5 + VIEW_KEY, i) for i in rows]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(a, b)
    )


def test_workers_ranks_and_resuming_do_not_change_the_batches():
    ds = load_dataset("synthetic", "train", image_size=16, augment="crop-flip", limit=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zero = list(step_batches(ds, 8, seed=0, start_step=0, end_step=6, views=2))
        two = list(step_batches(ds, 8, seed=0, start_step=0, end_step=6, views=2, workers=2))
    assert _same(zero, two)  # bit-equal, whichever process decoded
    step, images, labels = zero[0]
    assert (
        step == 0 and images.shape == (16, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    )
    assert torch.equal(labels[:8], ds.labels()[step_rows(40, 8, 0, 0)]) and torch.equal(labels[:8], labels[8:])
    assert not torch.equal(images[:8], images[8:])  # the two views are augmented differently
    assert not torch.equal(zero[0][1], zero[5][1])
    assert _same(list(step_batches(ds, 8, 0, 3, 6, views=2)), zero[3:])  # a resumed range
    ranks = [list(step_batches(ds, 8, 0, 0, 2, rank=r, world=2)) for r in range(2)]
    for s in range(2):
        assert torch.equal(torch.cat([ranks[0][s][1], ranks[1][s][1]]), zero[s][1][:8])  # view 0 of 1 rank


def test_folder_dataset_batches_with_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGE_CACHE_DIR", str(tmp_path / "cache"))
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            g = torch.Generator().manual_seed(20 * c + i)
            pixels = torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(tmp_path / "imgs" / f"c{c}" / f"{i}.jpg", quality=90)
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}", "all", image_size=16, augment="crop-flip")
    zero = list(step_batches(ds, 6, seed=1, start_step=0, end_step=4))
    two = list(step_batches(ds, 6, seed=1, start_step=0, end_step=4, workers=2))
    assert _same(zero, two) and zero[0][1].shape == (6, 3, 16, 16)
    assert torch.equal(zero[3][2], ds.labels()[step_rows(20, 6, 1, 3)])


def test_breaking_out_early_stops_the_workers():
    ds = load_dataset("synthetic", "train", image_size=16, augment="crop-flip", limit=40)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step, _, _ in step_batches(ds, 8, seed=0, start_step=0, end_step=10_000, workers=2):
            if step == 1:
                break
        batches = step_batches(ds, 8, seed=0, start_step=0, end_step=10_000, workers=2)
        next(batches)
        batches.close()  # held, not looped over: close() stops it
    deadline = time.time() + 10
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children() and time.time() - t0 < 30
    assert 1 <= default_workers() <= 4


# ---------------------------------------------------------------------------- token cache


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_token_cache_keeps_the_file_dtype_and_is_resident_once(tmp_path):
    from safetensors.torch import save_file

    from mage.tokens import TokenCache

    g = torch.Generator().manual_seed(0)
    views = torch.randint(0, 1024, (4096, 2, 256), dtype=torch.int16, generator=g)  # 4 MiB
    labels = torch.randint(0, 10, (4096,), generator=g)
    save_file({"views": views, "labels": labels}, str(tmp_path / "c.safetensors"), metadata={"classes": "null"})
    save_file(
        {"views": views[:8], "labels": labels[:8]}, str(tmp_path / "warm.safetensors"), metadata={"classes": "null"}
    )
    TokenCache(str(tmp_path / "warm.safetensors")).views.max()  # first-use costs out of the way
    size = os.path.getsize(tmp_path / "c.safetensors")
    before = _rss()
    tc = TokenCache(str(tmp_path / "c.safetensors"))
    assert int(tc.views.max()) == int(views.max())  # every page read
    grown = _rss() - before
    assert grown <= 1.2 * size, f"TokenCache holds {grown / size:.2f}x the file size"
    assert tc.views.dtype == torch.int16 and tc.views.shape == (4096, 2, 256) and len(tc) == 4096
    idx, view = torch.tensor([5, 0, 4095]), torch.tensor([1, 0, 1])
    rows = tc.rows(idx, view)
    assert rows.dtype == torch.int64 and rows.shape == (3, 256) and torch.equal(rows, views[idx, view].long())
    assert torch.equal(tc.rows(idx, 0), views[idx, 0].long()) and torch.equal(tc.labels, labels)


def test_cache_tokens_with_workers_and_two_ranks_writes_the_one_process_file(tmp_path):
    """Decoding in workers, or tokenizing on 2 torchrun ranks (gloo), changes no token and no metadata."""
    from safetensors import safe_open

    from mage.checkpoint import save_checkpoint
    from mage.config import tokenizer_preset
    from mage.tokens import cache_tokens
    from mage.vqgan import VQTokenizer
    from test_tokenizer import ENV

    torch.manual_seed(0)
    tok = VQTokenizer(tokenizer_preset("tiny"))
    save_checkpoint(str(tmp_path / "tok"), tok.state_dict(), tok.config)
    args = {"limit": 40, "batch_size": 8, "crops": 1, "progress": False}  # 5 batches: 2 on rank 0, 3 on rank 1

    def read(path):
        with safe_open(str(path), "pt") as f:
            return f.metadata(), f.get_tensor("views"), f.get_tensor("labels")

    one = read(cache_tokens(str(tmp_path / "tok"), "synthetic", str(tmp_path / "one.safetensors"), workers=0, **args))
    assert one[1].shape == (40, 3, 16) and one[1].dtype == torch.int16
    got = read(cache_tokens(str(tmp_path / "tok"), "synthetic", str(tmp_path / "w2.safetensors"), workers=2, **args))
    assert got[0] == one[0] and torch.equal(got[1], one[1]) and torch.equal(got[2], one[2])
    port = str(29600 + os.getpid() % 1000)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port",
            port,
            "-m",
            "mage",
            "cache-tokens",
            "--tokenizer",
            str(tmp_path / "tok"),
            "--data",
            "synthetic",
            "--limit",
            "40",
            "--batch-size",
            "8",
            "--crops",
            "1",
            "--out",
            str(tmp_path / "two.safetensors"),
        ],
        capture_output=True,
        text=True,
        env={**ENV, "OMP_NUM_THREADS": "1"},
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    two = read(tmp_path / "two.safetensors")
    assert two[0] == one[0] and torch.equal(two[1], one[1]) and torch.equal(two[2], one[2])
    assert sorted(p.name for p in tmp_path.iterdir() if "two" in p.name) == ["two.safetensors"]  # parts removed
