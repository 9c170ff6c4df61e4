"""MAGE pre-training (``mage pretrain``) and the token cache (``mage cache-tokens``).

Recipe (MAGE.md 6): AdamW(0.9, 0.95), weight decay 0.05 except 1-D params and ``*.bias`` (so
``mlm_layer.bias`` has none), lr = blr * global batch / 256, per-iteration linear warm-up then half-cycle
cosine, gradient clipping 3.0, bf16 autocast, optional EMA and activation checkpointing.

Determinism: every random draw of step s (batch order, views, mask ratio and positions, dropout) comes from
seeds that are a function of (seed, epoch / step, rank) only. A resumed run therefore continues bit-exactly,
and the masks do not depend on the number of ranks: the mask ratio and the per-row noise are drawn for the
whole *global* batch and each rank takes its rows (the original drew one ratio per GPU; here it is one per
global step, the same law).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import (load_checkpoint, load_resume_weights, load_train_state, refuse_overwrite, resolve_checkpoint,
                         save_checkpoint, save_step, step_dirs)
from .compiling import CompiledStep, check_mode as check_compile_mode
from .config import MAGEConfig
from .distributed import DistInfo, TimeBudget, adamw, all_gather_cat, all_reduce_mean, barrier, init_distributed, to_device
from .errors import MageError
from .precision import autocast, bf16_supported
from .model import MAGE
from .tokens import TokenCache, cache_tokens  # noqa: F401  (re-exported: mage.pretrain.cache_tokens)
from .vqgan import VQTokenizer


# --------------------------------------------------------------------------------------------------
# optimisation helpers
# --------------------------------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's add_weight_decay: no decay for 1-D params and names ending in '.bias'."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from 0, then half-cycle cosine to min_lr (per iteration)."""
    if step < warmup:
        return lr * step / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def resume_latest(out: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, dict[str, Any] | None]:
    """Load the newest checkpoint of run ``out`` into model + optimizer: (its step, its train state), or (0, None)."""
    if not step_dirs(out):
        return 0, None
    last = step_dirs(out)[-1][1]
    load_resume_weights(model, last)
    st = load_train_state(last)
    opt.load_state_dict(st["optimizer"])
    return st["step"], st


def info_nce(z: torch.Tensor, temperature: float, info: DistInfo) -> torch.Tensor:
    """SimCLR NT-Xent: z [2b, d] = two views (first b, then b), negatives gathered across ranks."""
    z = F.normalize(z.float(), dim=1)
    b = z.shape[0] // 2
    za, zb = z[:b], z[b:]
    ga, gb = all_gather_cat(za, info), all_gather_cat(zb, info)                   # [world*b, d]
    allz = torch.cat([ga, gb])                                                    # [2*world*b, d]
    n = ga.shape[0]
    off = info.rank * b
    idx = torch.arange(b, device=z.device)
    logits = torch.cat([za, zb]) @ allz.t() / temperature                         # [2b, 2n]
    self_cols = torch.cat([off + idx, n + off + idx])
    logits[torch.arange(2 * b), self_cols] = float("-inf")
    targets = torch.cat([n + off + idx, off + idx])
    return F.cross_entropy(logits, targets)


def plot_curve(log_path: str, png: str) -> None:
    """Loss and masked-token accuracy against step, from the JSONL log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(log_path) if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, [r["loss"] for r in rows])
    ax[0].set(xlabel="step", ylabel="loss", title="masked-token loss (label-smoothed CE)")
    ax[1].plot(steps, [100 * r["acc"] for r in rows], color="C1")
    ax[1].set(xlabel="step", ylabel="%", title="masked-token accuracy")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(png + ".tmp.png", png)


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2 ** 62)
    return h


# --------------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------------
class _Batches:
    """Global batch b of step s -> this rank's rows: (tokens [b_r, V?, L], labels [b_r]) from a cache, or images."""

    def __init__(self, cfg: MAGEConfig, info: DistInfo, cache: TokenCache | None, dataset=None):
        self.cfg, self.info, self.cache, self.dataset = cfg, info, cache, dataset
        self.n = len(cache) if cache is not None else len(dataset)
        if cfg.batch_size % info.world:
            raise MageError(f"global batch {cfg.batch_size} is not divisible by {info.world} ranks")
        if self.n < cfg.batch_size:
            raise MageError(f"dataset has {self.n} items, fewer than the global batch {cfg.batch_size}")
        self.per_epoch = self.n // cfg.batch_size
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(_seed(self.cfg.seed, 7, epoch)))
            self._perm_epoch = epoch
        B, r = self.cfg.batch_size, self.info.rank
        b = B // self.info.world
        return self._perm[i * B + r * b: i * B + (r + 1) * b]

    def get(self, step: int, two_views: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(tokens [b, L] or None, images [b,3,H,W] or None, labels); with two_views the batch is doubled."""
        idx = self.indices(step)
        # view choices are drawn for the whole global batch, then sliced: 1 rank == N ranks
        g = torch.Generator().manual_seed(_seed(self.cfg.seed, 11, step))
        B, b = self.cfg.batch_size, len(idx)
        rows = slice(self.info.rank * b, (self.info.rank + 1) * b)
        if self.cache is not None:
            V = self.cache.views.shape[1]
            va = torch.randint(0, V, (B,), generator=g)[rows]
            tok = self.cache.views[idx, va]
            labels = self.cache.labels[idx]
            if two_views:
                vb = (va + torch.randint(1, max(V, 2), (B,), generator=g)[rows]) % V if V > 1 else va
                tok = torch.cat([tok, self.cache.views[idx, vb]])
                labels = torch.cat([labels, labels])
            return tok, None, labels
        ds = self.dataset
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(step)
        items = [ds[int(i)] for i in idx]
        if two_views:
            ds.set_epoch(step + 10_000_000)
            items += [ds[int(i)] for i in idx]
        return None, torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def pretrain(cfg: MAGEConfig, out: str, data: str | None = None, tokenizer: str | None = None, cache: str | None = None,
             data_dir: str | None = None, limit: int | None = None, resume: bool = False, init: str | None = None,
             progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
    """Pre-train MAGE into ``out`` (checkpoints, log.jsonl, curve.png, tokenizer/). Works under torchrun.
    ``stop_at`` ends the run early at that step (with a checkpoint), as an interruption would."""
    check_compile_mode(cfg.compile)                                                # bad mode: before any work
    refuse_overwrite(out, resume)
    info = init_distributed()
    dev = info.device
    tc = TokenCache(cache) if cache else None
    if tokenizer is None and tc is not None:
        tokenizer = tc.meta.get("tokenizer")
    if tokenizer is None:
        raise MageError("give --tokenizer (or a --cache made by 'mage cache-tokens')")
    tok = VQTokenizer.from_pretrained(tokenizer).to(dev)
    for p in tok.parameters():
        p.requires_grad_(False)
    if cfg.bf16 and bf16_supported(dev.type):
        tok.channels_last()                                                        # on-the-fly tokenizing runs in bf16
    if tok.config.codebook_size != cfg.codebook_size or tok.config.num_tokens != cfg.num_tokens:
        raise MageError(f"tokenizer ({tok.config.codebook_size} codes, {tok.config.num_tokens} tokens per image) does not fit "
                        f"the model (codebook_size={cfg.codebook_size}, num_tokens={cfg.num_tokens}): "
                        f"use a matching preset or --set codebook_size=... --set num_tokens=...")
    dataset, classes = None, None
    if tc is not None:
        classes = tc.classes
        if int(tc.meta.get("codebook_size", cfg.codebook_size)) != cfg.codebook_size:
            raise MageError(f"token cache {cache} was made with another codebook size")
    else:
        if data is None:
            raise MageError("give --data or --cache")
        from .data import load_dataset
        dataset = load_dataset(data, "train", tok.config.image_size, cfg.data_augment, data_dir, cfg.seed, limit)
        classes = dataset.classes
    if cfg.num_classes < 0:  # --class-conditional: take the number of classes from the data
        if not classes:
            raise MageError("--class-conditional needs a labelled dataset")
        cfg.num_classes = len(classes)
    batches = _Batches(cfg, info, tc, dataset)
    total = cfg.max_steps if cfg.max_steps > 0 else int(cfg.epochs * batches.per_epoch)
    warmup = int(cfg.warmup_epochs * batches.per_epoch) if cfg.max_steps <= 0 else min(int(cfg.warmup_epochs * batches.per_epoch), total // 10)

    torch.manual_seed(cfg.seed)
    model = MAGE(cfg).to(dev)
    if init:
        w, _, where = load_checkpoint(init)
        missing, unexpected = model.load_state_dict(w, strict=False)
        bad = [k for k in missing if not k.startswith(("class_emb", "contrastive_head"))]
        if bad or unexpected:
            raise MageError(f"--init {where} does not fit this model (missing {bad[:3]}, unexpected {unexpected[:3]})")
    lr = cfg.blr * cfg.batch_size / 256
    opt = adamw(param_groups(model, cfg.weight_decay), dev, lr=lr, betas=cfg.betas)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if cfg.ema_decay > 0 else None
    start = 0
    if resume:
        start, st = resume_latest(out, model, opt)
        ema = st.get("ema") if st else ema
    # DDP without find_unused_parameters: every parameter gets a gradient each step (class embedding and MAGE-C
    # head included, checked on 2 ranks), so no extra traversal of the autograd graph
    ddp = torch.nn.parallel.DistributedDataParallel(model) if info.enabled else model
    if info.is_main:
        os.makedirs(out, exist_ok=True)
        if not os.path.isdir(os.path.join(out, "tokenizer")):
            src = resolve_checkpoint(tokenizer) if os.path.isdir(tokenizer) else None
            if src:
                shutil.copytree(src, os.path.join(out, "tokenizer"), ignore=shutil.ignore_patterns("train_state.pt"))
            else:
                save_checkpoint(os.path.join(out, "tokenizer"), tok.state_dict(), tok.config)
        if classes:
            with open(os.path.join(out, "classes.json"), "w") as f:
                json.dump(classes, f)
    log = open(os.path.join(out, "log.jsonl"), "a") if info.is_main else None
    bar = tqdm(total=total, initial=start, desc="pretrain", disable=not (progress and info.is_main), dynamic_ncols=True)
    budget, seen, last = TimeBudget(cfg.max_minutes, info), 0, {"loss": float("nan"), "acc": float("nan")}
    step = start
    two_views = cfg.contrastive_weight > 0
    run_step = CompiledStep(ddp, cfg.compile, info.is_main)                        # --compile (eager by default)

    def seed_step() -> None:                                                        # dropout / label drop of this step
        torch.manual_seed(_seed(cfg.seed, 13, step, info.rank))

    def forward_backward(f):
        with autocast(dev, cfg.bf16):
            res = f(tokens, drop, mask, labels if cfg.num_classes > 0 else None)
            loss, c_loss = res["loss"], None
            if two_views:
                c_loss = info_nce(res["proj"], cfg.contrastive_temperature, info)
                loss = loss + cfg.contrastive_weight * c_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return res, c_loss

    while step < total:
        sched_step = budget.schedule_step(step, total)
        cur_lr = lr_at(step if step < warmup else sched_step, total, warmup, lr, cfg.min_lr)
        for pg in opt.param_groups:
            pg["lr"] = cur_lr
        tokens, images, labels = batches.get(step, two_views)
        if tokens is None:
            with torch.no_grad(), autocast(dev, cfg.bf16):
                tokens = tok.encode(images.to(dev))
        tokens, labels = to_device(tokens, dev), to_device(labels, dev)
        drop, mask = _global_masks(model, step, info, tokens.shape[0] // (2 if two_views else 1))
        if two_views:  # MAGE-C: the second view gets its own masks (another draw of the same law)
            drop_b, mask_b = _global_masks(model, step, info, tokens.shape[0] // 2, stream=1)
            drop, mask = torch.cat([drop, drop_b]), torch.cat([mask, mask_b])
        drop, mask = to_device(drop, dev), to_device(mask, dev)
        seed_step()
        model.train()
        res, c_loss = run_step(forward_backward, reset=seed_step)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(cfg.ema_decay).add_(v.float(), alpha=1 - cfg.ema_decay)
        step += 1
        seen += cfg.batch_size
        if seen == cfg.batch_size:  # throughput is counted after this process's first step (compiling, warm-up)
            first_s = budget.elapsed_s
        out_of_time = budget.out_of_time(step == stop_at)
        if step % cfg.log_every == 0 or step == total or out_of_time:                 # the last step is always logged
            l, a = all_reduce_mean(res["loss"].detach().float(), info).item(), all_reduce_mean(res["acc"].float(), info).item()
            last = {"loss": l, "acc": a}
            if info.is_main:
                elapsed = budget.elapsed_s
                rec = {"step": step, "loss": l, "acc": a, "lr": cur_lr, "elapsed_s": elapsed,
                       "images_per_s": (seen - cfg.batch_size) / (elapsed - first_s) if seen > cfg.batch_size else seen / elapsed}
                if two_views:
                    rec["contrastive"] = c_loss.item()
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{l:.3f}", acc=f"{100 * a:.1f}%", lr=f"{cur_lr:.2e}", img_s=f"{rec['images_per_s']:.0f}")
        bar.update(1)
        if info.is_main and (step % cfg.ckpt_every == 0 or step == total or out_of_time):
            weights = model.state_dict()
            save_step(out, step, weights, cfg, {"step": step, "optimizer": opt.state_dict(), "ema": ema, "scaler": None})
            if ema is not None:
                save_checkpoint(os.path.join(out, "ema"), {k: v.to(weights[k].dtype) for k, v in ema.items()}, cfg)
            plot_curve(os.path.join(out, "log.jsonl"), os.path.join(out, "curve.png"))
        if out_of_time:
            break
    bar.close()
    barrier(info)
    if log is not None:
        log.close()
    return {"step": step, **last, "minutes": budget.elapsed_s / 60}


def _global_masks(model: MAGE, step: int, info: DistInfo, b_local: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the ratio and noise for the whole global batch from (seed, step, stream); return this rank's rows."""
    g = torch.Generator().manual_seed(_seed(model.config.seed, 17, step) if stream == 0 else _seed(model.config.seed, 17 + stream, step))
    drop, mask, _ = model.sample_masks(model.config.batch_size, g)
    rows = slice(info.rank * b_local, (info.rank + 1) * b_local)
    return drop[rows], mask[rows]
