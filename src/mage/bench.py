"""``mage bench``: throughput, memory, FLOPs and MFU of the main workloads, in one run (a benchmark, not a test).

Workloads, for each preset (MAGE preset + its tokenizer: fmnist-32 + fmnist-32, vit-b/vit-l + maskgit-256):
  train      one pre-training step on cached tokens (forward, backward, AdamW)
  train+tok  the same step with the frozen VQGAN encoding the images inside the step (the original's way)
  gen-S      generation from scratch: S decoding steps + VQGAN decode (S from --gen-steps; the VQGAN encoder
             is not held: generation never encodes)
  encode     VQGAN encode;  decode  VQGAN decode
  data       (once, not per preset; only when asked for) the image path: decode + crop-flip of a folder of
             2,000 256x256 JPEGs through :func:`mage.loader.step_batches` with 0 and 2 workers, ``cache_tokens``
             on part of it with a small random-init tokenizer, and a TokenCache's resident memory vs its file
Weights are random (the cost does not depend on them). Each workload runs in a fresh subprocess so its peak
memory (max RSS on CPU; max allocated on CUDA) is its own.

FLOPs are counted from the layer shapes of one real forward pass (forward hooks): 2*in*out per token for
every Linear, 2*Cin*Cout*k*k/groups per output pixel for every Conv2d, 4*N^2*D for attention (QK^T and AV)
and 2*N*D*V for the tied output head; norms, activations, embeddings and the sampler's sorting are not
counted. A training step counts 3x its forward (backward ~ 2x forward). MFU = achieved FLOP/s / the
machine's own matmul peak measured in the same run (large square matmuls, fp32 and bf16).

``--precision w16`` runs the inference workloads with the weights stored in bf16 (half the weight memory;
fp32 math where bf16 has no hardware). ``--baseline`` also runs every workload the way the original code does
(fp32, explicit-softmax attention,
eager) and prints our speed-up as a ratio from the same run. Timings on a shared machine vary run to run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import mage_preset, pretrain_preset, tokenizer_preset
from .errors import MageError

TOKENIZER_FOR = {"tiny": "tiny", "fmnist-32": "fmnist-32", "vit-b": "maskgit-256", "vit-l": "maskgit-256"}


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def count_flops():
    """Counts forward FLOPs of Linear / Conv2d / attention / tied-head layers run inside the block: yields a dict."""
    from . import fastpath
    from .model import Attention, MlmHead

    total = {"flops": 0.0}
    hooks = []

    def linear(m, inp, out):
        total["flops"] += 2.0 * m.in_features * m.out_features * inp[0].numel() / m.in_features

    def conv(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1]
        total["flops"] += 2.0 * m.in_channels // m.groups * k * out.numel()

    def attention(m, inp, out):
        B, N, C = inp[0].shape
        total["flops"] += 4.0 * B * N * N * C

    def head(m, inp, out):
        total["flops"] += 2.0 * out.numel() * m.fc.out_features

    for mod in list(_live_modules):
        for m in mod.modules():
            if isinstance(m, nn.Linear):
                hooks.append(m.register_forward_hook(linear))
            elif isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_hook(conv))
            elif isinstance(m, Attention):
                hooks.append(m.register_forward_hook(attention))
            elif isinstance(m, MlmHead):
                hooks.append(m.register_forward_hook(head))
    fused, fastpath.FUSE_LINEAR_GELU = fastpath.FUSE_LINEAR_GELU, False  # every Linear through its module
    try:
        yield total
    finally:
        fastpath.FUSE_LINEAR_GELU = fused
        for h in hooks:
            h.remove()


_live_modules: list[nn.Module] = []


# --------------------------------------------------------------------------------------------------
# the original's way (baseline)
# --------------------------------------------------------------------------------------------------
def _explicit_attention(self, x: torch.Tensor) -> torch.Tensor:
    """The original's attention: q k^T * scale -> softmax -> dropout -> @ v, materialising the attention matrix."""
    B, N, C = x.shape
    qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q @ k.transpose(-2, -1)) * (C // self.num_heads) ** -0.5
    x = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training) @ v
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


@contextlib.contextmanager
def original_mode(enabled: bool):
    """The original's way: explicit-softmax attention, NCHW convolutions (and the plain model: nn.Dropout,
    no :mod:`mage.fastpath`, which :func:`measure` applies only outside this mode)."""
    from .model import Attention
    from .vqgan import VQTokenizer

    if not enabled:
        yield
        return
    fast = Attention.forward, VQTokenizer.CHANNELS_LAST
    Attention.forward, VQTokenizer.CHANNELS_LAST = _explicit_attention, False
    try:
        yield
    finally:
        Attention.forward, VQTokenizer.CHANNELS_LAST = fast


# --------------------------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------------------------
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / repeats


def measure(
    workload: str,
    preset: str,
    batch: int,
    bf16: bool,
    baseline: bool,
    repeats: int = 2,
    weights16: bool = False,
    compiled: bool = False,
) -> dict[str, Any]:
    """Seconds per call and forward FLOPs per image of one workload (in this process).
    ``weights16``: inference with the weights stored in bf16 (:func:`mage.precision.store_weights_bf16`).
    ``compiled``: training through ``torch.compile`` (as ``mage pretrain --compile``), generation's forward with
    inductor's freezing (prepacked weights, bias + GELU fused into the matmuls); compiling is in the warm-up."""
    from . import fastpath
    from .distributed import adamw
    from .model import MAGE
    from .sampler import SamplerConfig, decode_tokens
    from .vqgan import VQTokenizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mcfg, tcfg = mage_preset(preset), tokenizer_preset(TOKENIZER_FOR[preset])
    mcfg = dataclasses.replace(mcfg, codebook_size=tcfg.codebook_size, num_tokens=tcfg.num_tokens)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, tcfg.image_size, tcfg.image_size, generator=g).to(dev)
    ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    tok = VQTokenizer(tcfg).to(dev).eval()
    if bf16 and not baseline:
        tok.channels_last()  # as MAGEPipeline does for bf16
    _live_modules[:] = [tok]
    if weights16:
        from .precision import store_weights_bf16

        store_weights_bf16(tok)
    flops_per_image = 0.0
    with original_mode(baseline):
        if workload in ("encode", "decode"):
            with torch.no_grad(), ac:
                ids = tok.encode(images)
            fn = (lambda: tok.encode(images)) if workload == "encode" else (lambda: tok.decode(ids))
            with torch.no_grad(), ac, count_flops() as c:
                fn()
            flops_per_image = c["flops"] / batch

            def run():
                with torch.no_grad(), ac:
                    fn()
        else:
            if workload.startswith("gen-"):
                del tok.encoder  # generation never encodes
            model = MAGE(mcfg).to(dev)
            if not baseline:  # the CPU tricks, as pipeline / training use them
                fastpath.apply(model, dev, training=not workload.startswith("gen-"))
            _live_modules[:] = [tok, model]
            if workload.startswith("gen-"):
                steps = int(workload[4:])
                model.eval()
                if weights16:
                    store_weights_bf16(model)
                sampler = SamplerConfig(steps=steps)
                start = torch.full((batch, mcfg.num_tokens), model.vocab.mask_id, device=dev)
                with torch.no_grad(), ac, count_flops() as c:
                    model.logits(start)
                fwd = c["flops"]
                with torch.no_grad(), ac, count_flops() as c:
                    tok.decode(torch.zeros(batch, mcfg.num_tokens, dtype=torch.long, device=dev))
                flops_per_image = (steps * fwd + c["flops"]) / batch

                forward = (
                    torch.compile(model.logits, options={"freezing": True}) if compiled else None
                )  # see compiling.py

                def run():
                    with torch.no_grad(), ac:
                        ids = decode_tokens(
                            model, start, sampler, None, torch.Generator().manual_seed(0), forward=forward
                        )
                        tok.decode(ids)
            else:
                model.train()
                opt = (
                    torch.optim.AdamW(model.parameters(), lr=1e-4, betas=pretrain_preset(preset).betas)
                    if baseline  # PyTorch's default
                    else adamw(list(model.parameters()), dev, lr=1e-4, betas=pretrain_preset(preset).betas)
                )  # as pretrain
                tokens = torch.randint(0, mcfg.codebook_size, (batch, mcfg.num_tokens), generator=g).to(dev)
                drop, mask, _ = model.sample_masks(batch, g, dev)
                with torch.no_grad(), ac, count_flops() as c:
                    model(tokens, drop, mask)
                flops_per_image = 3 * c["flops"] / batch
                if workload == "train+tok":
                    with torch.no_grad(), ac, count_flops() as c:
                        tok.encode(images)
                    flops_per_image += c["flops"] / batch

                fwd = torch.compile(model) if compiled else model

                def run():
                    t = tokens
                    if workload == "train+tok":
                        with torch.no_grad(), ac:
                            t = tok.encode(images)
                    with ac:
                        loss = fwd(t, drop, mask)["loss"]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

        seconds = _timed(run, dev, repeats, warmup=3 if compiled and workload.startswith("train") else 1)
    return {"seconds": seconds, "images_per_s": batch / seconds, "flops_per_image": flops_per_image}


def _child(q, args: tuple, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        dev_cuda = torch.cuda.is_available()
        if dev_cuda:
            torch.cuda.reset_peak_memory_stats()
        r = measure(*args)
        r["peak_memory_gb"] = (
            torch.cuda.max_memory_allocated() if dev_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ) / 1e9
        q.put(r)
    except Exception as e:  # noqa: BLE001 - reported as a row, the run goes on
        q.put({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


def measure_isolated(
    workload: str,
    preset: str,
    batch: int,
    bf16: bool,
    baseline: bool,
    repeats: int = 2,
    weights16: bool = False,
    compiled: bool = False,
) -> dict[str, Any]:
    """``measure`` in a fresh process (so peak memory is this workload's own)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(
        target=_child,
        args=(q, (workload, preset, batch, bf16, baseline, repeats, weights16, compiled), torch.get_num_threads()),
    )
    p.start()
    r = q.get()
    p.join()
    return r


# --------------------------------------------------------------------------------------------------
# the data path
# --------------------------------------------------------------------------------------------------
#: the ``data`` workload's tokenizer: random init, widths 4-32, f=16 (256 tokens at 256 px); ~20 images/s on 2
#: cores (the maskgit-256 tokenizer would take minutes): it times the cache's plumbing, not a real VQGAN
DATA_TOKENIZER = {
    "base_channels": 4,
    "channel_mult": (1, 2, 4, 8, 8),
    "num_res_blocks": 1,
    "code_dim": 16,
    "norm_groups": 4,
}


def bench_folder(num_images: int = 2000, size: int = 256, root: str | None = None) -> str:
    """A folder of ``num_images`` ``size`` x ``size`` JPEGs (noisy rendered shapes in 4 class subfolders), made
    once, deterministically, under ``root`` (default: the temp dir) and reused by later runs."""
    import numpy as np
    from PIL import Image

    from .data import SYNTHETIC_CLASSES, render_shape

    folder = Path(root or tempfile.gettempdir()) / "mage-bench-data" / f"{num_images}x{size}"
    done = folder / ".complete"  # hidden: not an image of the set
    if done.is_file():
        return str(folder)
    for kind in SYNTHETIC_CLASSES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        rng = np.random.default_rng([i, size, 0xDA7A])
        kind = SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)]
        pixels = render_shape(kind, size, rng).astype(np.float32)  # [S, S, 3]
        pixels += rng.normal(0.0, 10.0, pixels.shape)  # noise: JPEG sizes nearer a photo's
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / kind / f"{i:05d}.jpg", quality=90)
    done.write_text(f"{num_images} images\n")
    return str(folder)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def token_cache_rss(rows: int = 50_000, views: int = 2, tokens: int = 256) -> dict[str, Any]:
    """Resident memory a :class:`mage.tokens.TokenCache` adds once every page is read, vs its file size
    (a cache of random int16 ids written for the purpose)."""
    from safetensors.torch import save_file

    from .tokens import TokenCache

    with tempfile.TemporaryDirectory() as tmp:
        ids = torch.randint(
            0, 1024, (rows, views, tokens), dtype=torch.int16, generator=torch.Generator().manual_seed(0)
        )
        labels = torch.zeros(rows, dtype=torch.int64)
        save_file({"views": ids, "labels": labels}, os.path.join(tmp, "c.safetensors"), metadata={"classes": "null"})
        save_file(
            {"views": ids[:8], "labels": labels[:8]}, os.path.join(tmp, "w.safetensors"), metadata={"classes": "null"}
        )
        del ids
        TokenCache(os.path.join(tmp, "w.safetensors")).views.max()  # first-use costs out of the way
        size = os.path.getsize(os.path.join(tmp, "c.safetensors"))
        before = _rss_bytes()
        tc = TokenCache(os.path.join(tmp, "c.safetensors"))
        tc.views.max()  # touches every page
        grown = _rss_bytes() - before
        del tc
    return {
        "workload": "data",
        "stage": "token-cache-rss",
        "rows": rows,
        "file_mb": size / 1e6,
        "rss_mb": grown / 1e6,
        "rss_over_file": grown / size,
    }


def measure_data(
    num_images: int = 2000,
    size: int = 256,
    batch: int = 64,
    workers: tuple[int, ...] = (0, 2),
    tokenize_images: int = 128,
    rss_rows: int = 50_000,
    root: str | None = None,
    show: bool = True,
) -> list[dict[str, Any]]:
    """The ``data`` workload: rows of images/s of decode + crop-flip (``step_batches``, one epoch, per worker
    count), of ``cache_tokens`` (the first ``tokenize_images`` images, image + mirror, :data:`DATA_TOKENIZER`),
    and the TokenCache's resident memory over its file size. Prints a table when ``show``."""
    from dataclasses import replace

    from .checkpoint import save_checkpoint
    from .data import load_dataset
    from .loader import default_workers, step_batches
    from .tokens import cache_tokens
    from .vqgan import VQTokenizer

    say = (lambda *a: print(*a, flush=True)) if show else (lambda *a: None)  # noqa: E731
    t0 = time.perf_counter()
    folder = bench_folder(num_images, size, root)
    made = time.perf_counter() - t0
    ds = load_dataset(f"folder:{folder}", "all", size, "crop-flip")
    say(f"data: {len(ds)} {size}x{size} JPEGs in {folder} (ready in {made:.1f} s; made once, then reused)")
    say(f"{'stage':>16} {'workers':>7} {'batch':>5} {'images':>6} {'seconds':>8} {'img/s':>9}")
    rows = []
    steps = len(ds) // batch
    for w in workers:
        t0 = time.perf_counter()
        n = sum(len(labels) for _, _, labels in step_batches(ds, batch, 0, 0, steps, workers=w))
        s = time.perf_counter() - t0  # worker start-up included
        rows.append(
            {
                "workload": "data",
                "stage": "decode+crop-flip",
                "workers": w,
                "batch": batch,
                "images": n,
                "seconds": s,
                "images_per_s": n / s,
            }
        )
        say(f"{'decode+crop-flip':>16} {w:>7} {batch:>5} {n:>6} {s:>8.2f} {n / s:>9.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(tokenizer_preset("tiny"), image_size=size, **DATA_TOKENIZER)
        torch.manual_seed(0)
        tok = VQTokenizer(cfg)
        save_checkpoint(os.path.join(tmp, "tok"), tok.state_dict(), cfg)
        n, tb = min(tokenize_images, len(ds)), 32
        w = min(default_workers(), -(-n // tb)) if n > tb else 0  # as cache_tokens caps them
        t0 = time.perf_counter()
        cache_tokens(
            os.path.join(tmp, "tok"),
            f"folder:{folder}",
            os.path.join(tmp, "c.safetensors"),
            split="all",
            limit=n,
            batch_size=tb,
            progress=False,
            workers=w,
        )
        s = time.perf_counter() - t0  # tokenizer load and file write included
    what = (
        f"random-init tokenizer, widths {cfg.base_channels}-{cfg.base_channels * cfg.channel_mult[-1]}, "
        f"{cfg.num_tokens} tokens at {size} px; 2 views (image + mirror)"
    )
    rows.append(
        {
            "workload": "data",
            "stage": "cache-tokens",
            "workers": w,
            "batch": tb,
            "images": n,
            "seconds": s,
            "images_per_s": n / s,
            "tokenizer": what,
        }
    )
    say(f"{'cache-tokens':>16} {w:>7} {tb:>5} {n:>6} {s:>8.2f} {n / s:>9.1f}   ({what})")
    r = token_cache_rss(rss_rows)
    rows.append(r)
    say(
        f"TokenCache of {rss_rows:,} x 2 x 256 int16 tokens: file {r['file_mb']:.1f} MB, resident {r['rss_mb']:.1f} MB "
        f"({r['rss_over_file']:.2f}x the file)"
    )
    return rows


# --------------------------------------------------------------------------------------------------
# the machine's peak
# --------------------------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> dict[str, Any]:
    """GFLOP/s of an n x n @ n x n matmul (n = 4096 on GPU or with bf16 hardware; smaller where it is emulated)."""
    from .precision import bf16_supported

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if n is None:
        n = 8192 if dev.type == "cuda" else (2048 if dtype == torch.float32 or bf16_supported("cpu") else 512)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    s = _timed(lambda: a @ b, dev, repeats)
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "gflops": 2 * n**3 / s / 1e9}


# --------------------------------------------------------------------------------------------------
#: fp32; bf16 = autocast (fp32 master weights); w16 = inference with the weights stored in bf16 (fp32 math
#: on hardware without bf16, autocast with it): the low-memory way to generate
PRECISIONS = ("fp32", "bf16", "w16")


def run_bench(
    presets: list[str],
    batch_size: int,
    precisions: list[str],
    gen_steps: list[int],
    baseline: bool = False,
    workloads: list[str] | None = None,
    repeats: int = 2,
    compile: bool = False,
    data_images: int = 2000,
) -> dict[str, Any]:
    """Everything in one run; prints a table as it goes and returns it as a dict (for --json).
    ``compile``: the training and generation workloads also run through ``torch.compile`` (mode "compiled").
    ``data_images``: size of the JPEG folder of the ``data`` workload."""
    from .precision import bf16_supported

    if batch_size < 1 or repeats < 1 or not gen_steps or min(gen_steps) < 1:
        raise MageError(
            f"bench needs batch_size >= 1, repeats >= 1 and gen_steps >= 1 (got {batch_size}, {repeats}, {gen_steps})"
        )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for p in presets:
        if p not in TOKENIZER_FOR:
            raise MageError(f"unknown bench preset '{p}' (choose from: {', '.join(TOKENIZER_FOR)})")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise MageError(f"unknown precision {bad[0]} ({' | '.join(PRECISIONS)})")
    names = workloads or ["train", "train+tok"] + [f"gen-{s}" for s in gen_steps] + ["encode", "decode"]
    device = torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    data = "data" in names  # the image path: its own table, once
    names = [w for w in names if w != "data"]
    peaks = {"fp32": matmul_peak(torch.float32)} if names else {}
    if names and ("bf16" in precisions or ("w16" in precisions and bf16_supported(dev))):
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    print(
        f"device: {device}"
        + (
            " | matmul peak: " + ", ".join(f"{k} {v['gflops']:.1f} GFLOP/s (n={v['n']})" for k, v in peaks.items())
            if peaks
            else ""
        ),
        flush=True,
    )
    if names:
        print(
            f"{'preset':>9} {'workload':>9} {'prec':>5} {'mode':>8} {'batch':>5} {'img/s':>9} {'GFLOP/img':>10} "
            f"{'GFLOP/s':>9} {'MFU':>6} {'peak GB':>8} {'speed-up':>8}",
            flush=True,
        )
    rows = []
    for p in presets:
        for prec in precisions:
            if prec == "bf16" and not bf16_supported(dev):
                print(
                    f"{p:>9} {'all':>9} {'bf16':>5}  skipped: this {dev} has no bf16 matrix hardware "
                    f"(PyTorch emulates it, 10-400x slower than fp32; MAGE_BF16=1 forces it)",
                    flush=True,
                )
                continue
            for w in names:
                if prec == "w16" and w.startswith("train"):
                    continue  # bf16-stored weights are for inference (training keeps fp32 master weights)
                modes = (
                    ["mage"]
                    + (["compiled"] if compile and w.startswith(("train", "gen-")) else [])
                    + (["original"] if baseline else [])
                )
                got = {}
                for mode in modes:
                    if mode == "original" and prec != "fp32":
                        continue  # the original runs fp32 (bf16 autocast around it is not its code)
                    fast = prec == "bf16" or (prec == "w16" and bf16_supported(dev))
                    r = measure_isolated(
                        w, p, batch_size, fast, mode == "original", repeats, prec == "w16", mode == "compiled"
                    )
                    row = {"preset": p, "workload": w, "precision": prec, "mode": mode, "batch": batch_size, **r}
                    if "error" not in r:
                        row["gflops_per_s"] = r["flops_per_image"] * r["images_per_s"] / 1e9
                        row["mfu"] = row["gflops_per_s"] / peaks["bf16" if fast else "fp32"]["gflops"]
                    got[mode] = row
                    rows.append(row)
                base = got.get("original") or next(
                    (x for x in rows if x["preset"] == p and x["workload"] == w and x["mode"] == "original"), None
                )
                for mode, row in got.items():
                    if "error" in row:
                        print(f"{p:>9} {w:>9} {prec:>5} {mode:>8} {batch_size:>5}  error: {row['error']}", flush=True)
                        continue
                    if mode != "original" and base is not None and "error" not in base:
                        row["speedup_vs_original"] = row["images_per_s"] / base["images_per_s"]
                    su = f"{row['speedup_vs_original']:.2f}x" if "speedup_vs_original" in row else ""
                    print(
                        f"{p:>9} {w:>9} {prec:>5} {mode:>8} {batch_size:>5} {row['images_per_s']:>9.3f} "
                        f"{row['flops_per_image'] / 1e9:>10.2f} {row['gflops_per_s']:>9.1f} {100 * row['mfu']:>5.1f}% "
                        f"{row['peak_memory_gb']:>8.2f} {su:>8}",
                        flush=True,
                    )
    if data:
        rows += measure_data(num_images=data_images)
    return {"device": device, "torch": torch.__version__, "matmul_peak": peaks, "rows": rows}


def fast_path_agreement(
    model_dir: str,
    num: int = 200,
    steps: int = 20,
    seed: int = 0,
    judge: str | None = None,
    data: str = "fashion-mnist",
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Generate the same seeds with the fp32 path and the fast path (bf16 autocast where the hardware has it):
    the share of equal token ids, and (with a judge) the FID-like score of each against the test split."""
    from .pipeline import MAGEPipeline
    from .precision import autocast, bf16_supported
    from .sampler import SamplerConfig

    pipe = MAGEPipeline.from_pretrained(model_dir)
    dev = pipe.device
    s = SamplerConfig(steps=steps)
    fp32 = pipe.generate_tokens(num, None, s, seed)
    with autocast(dev, True):
        fast = pipe.generate_tokens(num, None, s, seed)
    out: dict[str, Any] = {
        "num": num,
        "steps": steps,
        "fast_path": "bf16 autocast" if bf16_supported(dev.type) else "fp32 (no bf16 hardware)",
        "token_agreement": 100.0 * (fp32 == fast).float().mean().item(),
    }
    if judge:
        from . import evaluate as ev

        net = ev.JudgeFeatures(judge, dev)
        ref = ev.reference_stats(net, data, "test", num, pipe.tokenizer.config.image_size, data_dir)
        out["fid_like_fp32"] = ev.compare(ref, ev.compute_features(net, [pipe.decode(fp32)], progress=False))["fid"]
        out["fid_like_fast"] = ev.compare(ref, ev.compute_features(net, [pipe.decode(fast)], progress=False))["fid"]
        other = pipe.generate_tokens(num, None, s, seed + 1000)  # seed noise: fp32, other seeds
        out["fid_like_fp32_other_seeds"] = ev.compare(
            ref, ev.compute_features(net, [pipe.decode(other)], progress=False)
        )["fid"]
    return out
