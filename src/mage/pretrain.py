"""MAGE pre-training (``mage pretrain``): a task for the training engine (engine.py).

Recipe (MAGE.md 6): AdamW(0.9, 0.95), weight decay 0.05 except 1-D params and ``*.bias`` (so
``mlm_layer.bias`` has none), lr = blr * global batch / 256, per-iteration linear warm-up then half-cycle
cosine, gradient clipping 3.0, bf16 autocast, optional EMA and activation checkpointing.

Determinism: every random draw of step s (batch order, views, mask ratio and positions, dropout) comes from
seeds that are a function of (seed, epoch / step, rank) only (seeding.mix). A resumed run therefore continues
bit-exactly,
and the masks do not depend on the number of ranks: the mask ratio and the per-row noise are drawn for the
whole *global* batch and each rank takes its rows (the original drew one ratio per GPU; here it is one per
global step, the same law).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from . import fastpath, seeding
from .checkpoint import load_checkpoint, load_strict, resolve_checkpoint, save_checkpoint
from .compiling import check_mode as check_compile_mode
from .config import MAGEConfig, PretrainConfig
from .distributed import DistInfo, adamw, all_gather_cat, init_distributed, to_device
from .engine import LoopSettings, Task, batch_count, fit
from .errors import MageError
from .files import atomic_write_json
from .model import MAGE
from .precision import autocast, bf16_supported
from .tokens import TokenCache, cache_tokens, check_cache_tokenizer  # noqa: F401  (cache_tokens: re-exported)
from .vqgan import VQTokenizer


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's add_weight_decay: no decay for 1-D params and names ending in '.bias'."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def info_nce(z: torch.Tensor, temperature: float, info: DistInfo) -> torch.Tensor:
    """SimCLR NT-Xent: z [2b, d] = two views (first b, then b), negatives gathered across ranks."""
    z = F.normalize(z.float(), dim=1)
    b = z.shape[0] // 2
    za, zb = z[:b], z[b:]
    ga, gb = all_gather_cat(za, info), all_gather_cat(zb, info)  # [world*b, d]
    allz = torch.cat([ga, gb])  # [2*world*b, d]
    n = ga.shape[0]
    off = info.rank * b
    idx = torch.arange(b, device=z.device)
    logits = torch.cat([za, zb]) @ allz.t() / temperature  # [2b, 2n]
    self_cols = torch.cat([off + idx, n + off + idx])
    logits[torch.arange(2 * b), self_cols] = float("-inf")
    targets = torch.cat([n + off + idx, off + idx])
    return F.cross_entropy(logits, targets)


# --------------------------------------------------------------------------------------------------
# batches of tokens: from a token cache, or images tokenized on the fly
# --------------------------------------------------------------------------------------------------
class TokenSource:
    """Global step -> this rank's (tokens [b, V, L] int64, labels [b]) with V views per image (1, or 2 for MAGE-C):
    rows from a token cache (each row's view drawn per step), or images decoded by DataLoader workers,
    augmented and tokenized on the device. Used by pre-training and fine-tuning alike."""

    def __init__(
        self,
        info: DistInfo,
        global_batch: int,
        seed: int,
        views: int,
        tok: VQTokenizer,
        cache: TokenCache | None = None,
        dataset=None,
        workers: int = 0,
        bf16: bool = False,
    ):
        if global_batch % info.world:
            raise MageError(f"global batch {global_batch} is not divisible by {info.world} ranks")
        self.info, self.B, self.seed, self.views, self.tok = info, global_batch, seed, views, tok
        self.cache, self.dataset, self.workers, self.bf16 = cache, dataset, workers, bf16
        self.n = len(cache) if cache is not None else len(dataset)

    def __call__(self, start: int, end: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        from .loader import step_batches, step_rows

        dev, b, rows = self.info.device, self.B // self.info.world, self.info.rows(self.B)
        if self.cache is not None:
            V = self.cache.views.shape[1]
            for step in range(start, end):
                idx = step_rows(self.n, self.B, self.seed, step, self.info.rank, self.info.world)
                g = seeding.generator(self.seed, seeding.VIEWS, step)  # drawn for the global batch: 1 rank == N
                va = torch.randint(0, V, (self.B,), generator=g)[rows]
                picks = [va]
                if self.views == 2:  # MAGE-C: a second, different view when the cache has one
                    picks.append((va + torch.randint(1, max(V, 2), (self.B,), generator=g)[rows]) % V if V > 1 else va)
                tokens = torch.stack([self.cache.rows(idx, v) for v in picks], 1)  # [b, V, L]
                yield step, to_device(tokens, dev), to_device(self.cache.labels[idx], dev)
            return
        for step, images, labels in step_batches(
            self.dataset, self.B, self.seed, start, end, self.info.rank, self.info.world, self.workers, self.views, dev
        ):
            with torch.no_grad(), autocast(dev, self.bf16):
                tokens = self.tok.encode(to_device(images, dev))  # [V*b, L]
            yield step, tokens.view(self.views, b, -1).transpose(0, 1).long(), to_device(labels[:b], dev)


# --------------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------------
class PretrainTask(Task):
    name = "pretrain"
    curve = ("loss", "acc", "contrastive")

    def __init__(
        self,
        cfg: MAGEConfig,
        train: PretrainConfig,
        info: DistInfo,
        source: TokenSource,
        model: MAGE,
        tokenizer: str,
        classes: list[str] | None,
    ):
        self.config, self.recipe, self.info, self.source, self.model = cfg, train, info, source, model
        self.tokenizer, self.classes = tokenizer, classes
        self.net = torch.nn.parallel.DistributedDataParallel(model) if info.enabled else model
        # DDP without find_unused_parameters: every parameter gets a gradient each step (class embedding and
        # MAGE-C head included, checked on 2 ranks), so no extra traversal of the autograd graph
        self.synced = [self.net] if info.enabled else []
        lr = train.blr * train.batch_size / 256
        groups = param_groups(model, train.weight_decay)
        self.optimizers = {"model": adamw(groups, info.device, lr=lr, betas=train.betas)}
        self.global_batch = train.batch_size

    def on_start(self, out: str) -> None:
        """The run's tokenizer (copied: the run decodes its own samples) and class names."""
        if not os.path.isdir(os.path.join(out, "tokenizer")):
            src = resolve_checkpoint(self.tokenizer) if os.path.isdir(self.tokenizer) else None
            if src:
                shutil.copytree(src, os.path.join(out, "tokenizer"), ignore=shutil.ignore_patterns("train_state.pt"))
            else:
                save_checkpoint(os.path.join(out, "tokenizer"), self.source.tok.state_dict(), self.source.tok.config)
        if self.classes:
            atomic_write_json(os.path.join(out, "classes.json"), self.classes)

    def batches(self, start: int, end: int) -> Iterator[tuple[int, Any]]:
        views = self.source.views
        for step, tokens, labels in self.source(start, end):
            masks = [self._masks(step, v) for v in range(views)]  # view v's (drop, mask), each [b, L]
            drop = torch.stack([d for d, _ in masks], 1)  # [b, V, L]
            mask = torch.stack([m for _, m in masks], 1)
            yield step, (tokens, labels, to_device(drop, self.info.device), to_device(mask, self.info.device))

    def _masks(self, step: int, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ratio and noise drawn for the whole global batch from (seed, step, view); this rank's rows."""
        B = self.recipe.batch_size
        drop, mask, _ = self.model.sample_masks(B, seeding.generator(self.recipe.seed, seeding.MASKS + view, step))
        rows = self.info.rows(B)
        return drop[rows], mask[rows]

    def loss(self, net, batch, step):
        tokens, labels, drop, mask = batch  # [b, V, L] x3, [b]
        V = tokens.shape[1]
        flat = lambda t: t.transpose(0, 1).reshape(-1, t.shape[-1])  # [V*b, L]: view 0's rows, then view 1's  # noqa: E731
        cfg = self.config
        with autocast(self.info.device, self.recipe.bf16):
            res = net(flat(tokens), flat(drop), flat(mask), labels.repeat(V) if cfg.num_classes > 0 else None)
            loss, metrics = res["loss"], {"loss": res["loss"], "acc": res["acc"]}
            if V == 2:  # MAGE-C: InfoNCE between the two views
                c = info_nce(res["proj"], cfg.contrastive_temperature, self.info)
                loss = loss + cfg.contrastive_weight * c
                metrics["contrastive"] = c
        return loss, metrics


def settings(cfg: PretrainConfig, n: int, accum: int = 1) -> LoopSettings:
    """The loop's settings from the recipe: warm-up in epochs (capped at 10% of a step-limited run)."""
    per_epoch, total = batch_count(n, cfg.batch_size, cfg.epochs, cfg.max_steps)
    warmup = int(cfg.warmup_epochs * per_epoch)
    if cfg.max_steps > 0:
        warmup = min(warmup, total // 10)
    return LoopSettings.from_recipe(cfg, total_steps=total, lr=cfg.blr * cfg.batch_size / 256, warmup_steps=warmup,
                                    accum=accum)  # fmt: skip


def pretrain(
    cfg: MAGEConfig,
    train: PretrainConfig,
    out: str,
    data: str | None = None,
    tokenizer: str | None = None,
    cache: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    resume: bool = False,
    init: str | None = None,
    progress: bool = True,
    stop_at: int | None = None,
    accum: int = 1,
    workers: int = 0,
    class_conditional: bool = False,
) -> dict[str, Any]:
    """Pre-train MAGE ``cfg`` with the recipe ``train`` into ``out`` (checkpoints, log.jsonl, curve.png, tokenizer/).
    Works under torchrun. ``class_conditional``: take the number of classes from the data. ``stop_at`` ends the
    run early at that step (with a checkpoint), as an interruption would."""
    check_compile_mode(train.compile)  # bad mode: before any work
    info = init_distributed()
    dev = info.device
    tc = TokenCache(cache) if cache else None
    if tokenizer is None and tc is not None:
        tokenizer = tc.meta.get("tokenizer")
    if tokenizer is None:
        raise MageError("give --tokenizer (or a --cache made by 'mage cache-tokens')")
    tok = VQTokenizer.from_pretrained(tokenizer).to(dev)
    check_cache_tokenizer(tc, tok, tokenizer)  # a cache is only valid with the tokenizer that made it
    for p in tok.parameters():
        p.requires_grad_(False)
    if train.bf16 and bf16_supported(dev.type):
        tok.channels_last()  # on-the-fly tokenizing runs in bf16
    if tok.config.codebook_size != cfg.codebook_size or tok.config.num_tokens != cfg.num_tokens:
        raise MageError(
            f"tokenizer ({tok.config.codebook_size} codes, {tok.config.num_tokens} tokens per image) does not fit "
            f"the model (codebook_size={cfg.codebook_size}, num_tokens={cfg.num_tokens}): "
            f"use a matching preset or --set codebook_size=... --set num_tokens=..."
        )
    dataset, classes = None, None
    if tc is not None:
        classes = tc.classes
        if int(tc.meta.get("codebook_size", cfg.codebook_size)) != cfg.codebook_size:
            raise MageError(f"token cache {cache} was made with another codebook size")
    else:
        if data is None:
            raise MageError("give --data or --cache")
        from .data import load_dataset

        dataset = load_dataset(data, "train", tok.config.image_size, train.data_augment, data_dir, train.seed, limit)
        classes = dataset.classes
    if class_conditional:
        if not classes:
            raise MageError("--class-conditional needs a labelled dataset")
        cfg = dataclasses.replace(cfg, num_classes=len(classes))
    views = 2 if cfg.contrastive_weight > 0 else 1
    source = TokenSource(info, train.batch_size, train.seed, views, tok, tc, dataset, workers, train.bf16)
    loop = settings(train, source.n, accum)

    torch.manual_seed(train.seed)
    model = MAGE(cfg).to(dev)
    fastpath.apply(model, dev, training=True)  # CPU dropout and attention (graphs being compiled keep their own)
    if init:
        w, _, where = load_checkpoint(init)
        load_strict(model, w, f"--init {where}", keep_missing=("class_emb", "contrastive_head"))
    task = PretrainTask(cfg, train, info, source, model, tokenizer, classes)
    task.run_args = {
        "data": data,
        "data_dir": data_dir,
        "limit": limit,
        "init": _abs(init),
        "cache": _abs(cache),
        "tokenizer": _abs(tokenizer),
    }
    res = fit(task, loop, info, out, resume=resume, progress=progress, stop_at=stop_at)
    return {"loss": float("nan"), "acc": float("nan"), **res}


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path and os.path.exists(path) else path
