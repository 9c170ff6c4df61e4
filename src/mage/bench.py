"""``mage bench``: pre-training step throughput (images/s) of a preset, fp32 vs bf16, in one run.

Tokens are random (a cached-token step: the tokenizer is not in the loop). Timings on a shared machine vary
run to run: compare the rows of one run, not numbers across runs.
"""

from __future__ import annotations

import time

import torch

from .config import mage_preset
from .model import MAGE


def train_step_throughput(preset: str, batch_size: int, steps: int = 3, bf16: bool = False, warmup: int = 1) -> float:
    """Images/s of full training steps (forward, backward, AdamW) on random tokens."""
    cfg = mage_preset(preset)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = MAGE(cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=cfg.betas, foreach=True)
    tokens = torch.randint(0, cfg.codebook_size, (batch_size, cfg.num_tokens), device=dev)
    g = torch.Generator().manual_seed(0)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        drop, mask, _ = model.sample_masks(batch_size, g, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(tokens, drop, mask)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - t0)


def run_bench(presets: list[str], batch_size: int, steps: int, precisions: list[str]) -> list[dict]:
    from .precision import bf16_supported

    rows = []
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for p in presets:
        for prec in precisions:
            if prec == "bf16" and not bf16_supported(dev):
                print(f"{p:>10}  bf16: skipped, this {dev} has no bf16 matrix hardware (PyTorch would emulate it, "
                      f"10-400x slower than fp32; MAGE_BF16=1 forces it)", flush=True)
                rows.append({"preset": p, "precision": prec, "batch": batch_size, "train_images_per_s": None})
                continue
            ips = train_step_throughput(p, batch_size, steps, bf16=(prec == "bf16"))
            rows.append({"preset": p, "precision": prec, "batch": batch_size, "train_images_per_s": ips})
            print(f"{p:>10} {prec:>5} batch {batch_size}: {ips:8.2f} images/s (training step, cached tokens)", flush=True)
    return rows
