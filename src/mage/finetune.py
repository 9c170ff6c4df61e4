"""End-to-end fine-tuning of the MAGE encoder for classification (``mage finetune``, MAGE.md 5.2).

The original's ``VisionTransformerMage``: the pre-trained token embedding and encoder blocks (drop-path
added), the decoder and the final ``norm`` discarded, mean of the image-token outputs -> ``fc_norm``
(LayerNorm eps 1e-6) -> Linear head (trunc-normal std 2e-5). AdamW(0.9, 0.999), weight decay 0.05 except
1-D params and biases, layer-wise lr decay (token_emb = layer 0, blocks.i = i + 1, the rest = depth + 1),
label smoothing 0.1, per-iteration warm-up + cosine to min_lr, no gradient clipping.

Differences, on purpose: inputs are token ids (the tokenizer stays outside the trained model), taken from a
token cache (the image, its mirror and any crops) or tokenized on the fly from ``--data`` with
random-resized-crop + flip; RandAugment, Mixup and CutMix are not applied (they act on pixels before the
tokenizer, which a cache cannot replay). Trained by the engine (engine.py), as pre-training is.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import fastpath
from .checkpoint import load_checkpoint, load_strict, resolve_checkpoint, save_checkpoint
from .compiling import check_mode as check_compile_mode
from .config import FinetuneConfig, MAGEConfig
from .data import check_classes
from .distributed import DistInfo, adamw, init_distributed
from .engine import LoopSettings, Task, batch_count, fit
from .errors import MageError
from .files import atomic_write_json
from .model import Block, TokenEmbedding
from .precision import autocast, bf16_supported
from .tokens import TokenCache, check_cache_tokenizer
from .vocab import Vocab
from .vqgan import VQTokenizer


class MAGEClassifier(nn.Module):
    """tokens [B, L] -> class logits [B, C] through the MAGE encoder (timm names: token_emb, blocks, fc_norm, head)."""

    def __init__(self, config: MAGEConfig, num_classes: int, drop_path: float = 0.0):
        super().__init__()
        self.config = c = config
        self.vocab = Vocab.from_config(c)
        self.token_emb = TokenEmbedding(self.vocab.size, c.num_tokens + 1, c.embed_dim, c.dropout)
        dpr = [drop_path * i / max(1, c.depth - 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList([Block(c.embed_dim, c.num_heads, c.mlp_ratio, 0.0, dpr[i]) for i in range(c.depth)])
        self.fc_norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.head = nn.Linear(c.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([torch.full_like(tokens[:, :1], self.vocab.fake_class_id), tokens], 1)  # [B, 1+L]
        x = self.token_emb(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:].mean(1))  # [B, D]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens))  # [B, C]

    def load_pretrained(self, weights: dict[str, torch.Tensor], where: str) -> None:
        """Take token_emb.* and blocks.* from a pre-trained MAGE state dict (the rest is MAGE-only)."""
        own = self.state_dict()
        take = {k: v for k, v in weights.items() if k.startswith(("token_emb.", "blocks.")) and k in own}
        load_strict(self, take, where, keep_missing=("fc_norm.", "head."))


def layer_decay_groups(model: MAGEClassifier, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Param groups with lr_scale = layer_decay ** (depth + 1 - layer_id) and no decay for 1-D params / biases."""
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = 0 if n.startswith("token_emb.") else int(n.split(".")[1]) + 1 if n.startswith("blocks.") else depth + 1
        no_wd = p.ndim <= 1 or n.endswith(".bias")
        g = groups.setdefault(
            (lid, no_wd),
            {
                "params": [],
                "weight_decay": 0.0 if no_wd else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - lid),
                "layer_id": lid,
            },
        )
        g["params"].append(p)
    return list(groups.values())


def _test_tokens(
    tok: VQTokenizer, data: str, data_dir: str | None, limit: int | None, dev
) -> tuple[torch.Tensor, torch.Tensor]:
    from .data import load_dataset

    ds = load_dataset(data, "test", tok.config.image_size, "none", data_dir, 0, limit)
    out = []
    with torch.no_grad():
        for s in tqdm(range(0, len(ds), 256), desc=f"tokenize {data}:test", leave=False):
            out.append(tok.encode(torch.stack([ds[i][0] for i in range(s, min(len(ds), s + 256))]).to(dev)).cpu())
    return torch.cat(out), ds.labels()


@torch.no_grad()
def evaluate_tokens(
    model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> dict[str, float]:
    model.eval()
    dev = next(model.parameters()).device
    logits = torch.cat(
        [model(tokens[s : s + batch_size].to(dev)).float().cpu() for s in range(0, len(tokens), batch_size)]
    )
    from .recognition import accuracy

    m = {"top1": accuracy(logits, labels, 1)}
    if logits.shape[1] > 5:
        m["top5"] = accuracy(logits, labels, 5)
    return m


class FinetuneTask(Task):
    name = "finetune"
    curve = ("loss", "acc")

    def __init__(self, cfg: FinetuneConfig, info: DistInfo, source, model: MAGEClassifier, tok_path: str):
        self.config, self.info, self.source, self.model, self.tok_path = cfg, info, source, model, tok_path
        self.net = torch.nn.parallel.DistributedDataParallel(model) if info.enabled else model
        self.synced = [self.net] if info.enabled else []
        lr = cfg.blr * cfg.batch_size / 256
        self.optimizers = {
            "model": adamw(
                layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), info.device, lr=lr, betas=cfg.betas
            )
        }
        self.global_batch = cfg.batch_size

    def on_start(self, out: str) -> None:
        if not os.path.isdir(os.path.join(out, "tokenizer")):
            shutil.copytree(
                resolve_checkpoint(self.tok_path),
                os.path.join(out, "tokenizer"),
                ignore=shutil.ignore_patterns("train_state.pt"),
            )

    def batches(self, start, end):
        for step, tokens, labels in self.source(start, end):
            yield step, (tokens[:, 0], labels)  # [b, L], [b]

    def loss(self, net, batch, step):
        tokens, labels = batch
        with autocast(self.info.device, self.config.bf16):
            logits = net(tokens)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)
        return loss, {"loss": loss, "acc": (logits.argmax(1) == labels).float().mean()}


def settings(cfg: FinetuneConfig, n: int, accum: int = 1) -> LoopSettings:
    """The loop's settings from the recipe: warm-up in epochs, at most 10% of the run."""
    per_epoch, total = batch_count(n, cfg.batch_size, cfg.epochs, cfg.max_steps)
    warmup = min(int(cfg.warmup_epochs * per_epoch), max(1, total // 10))
    return LoopSettings.from_recipe(cfg, total_steps=total, lr=cfg.blr * cfg.batch_size / 256, warmup_steps=warmup,
                                    accum=accum)  # fmt: skip


def finetune(
    cfg: FinetuneConfig,
    model_dir: str,
    out: str,
    data: str | None = None,
    cache: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    accum: int = 1,
    workers: int = 0,
) -> dict[str, Any]:
    """Fine-tune ``model_dir``'s encoder on labelled data; writes OUT/{checkpoints, model, tokenizer,
    classifier.json}."""
    from .pretrain import TokenSource

    check_compile_mode(cfg.compile)  # bad mode: before any work
    info = init_distributed()
    dev = info.device
    weights, mcfg, where = load_checkpoint(model_dir)
    if not isinstance(mcfg, MAGEConfig):
        raise MageError(f"{where} is not a MAGE model")
    tok_path = os.path.join(model_dir, "tokenizer")
    if not os.path.exists(tok_path):
        raise MageError(f"no tokenizer next to the model ({tok_path})")
    tok = VQTokenizer.from_pretrained(tok_path).to(dev)
    if cfg.bf16 and bf16_supported(dev.type):
        tok.channels_last()  # on-the-fly tokenizing runs in bf16
    tc = TokenCache(cache) if cache else None
    check_cache_tokenizer(tc, tok, tok_path)  # a cache is only valid with the tokenizer that made it
    dataset = None
    if tc is not None:
        classes, labels_all = tc.classes, tc.labels
        if int(tc.meta.get("codebook_size", mcfg.codebook_size)) != mcfg.codebook_size:
            raise MageError(f"token cache {cache} was made with another codebook size")
        data = data or tc.meta.get("data")
    else:
        if data is None:
            raise MageError("give --data or --cache")
        from .data import load_dataset

        dataset = load_dataset(data, "train", tok.config.image_size, cfg.data_augment, data_dir, cfg.seed, limit)
        classes, labels_all = dataset.classes, dataset.labels()
    check_classes(data or cache, labels_all, classes, "fine-tuning")
    source = TokenSource(info, cfg.batch_size, cfg.seed, 1, tok, tc, dataset, workers, cfg.bf16)
    loop = settings(cfg, source.n, accum)

    torch.manual_seed(cfg.seed)
    arch = dataclasses.replace(mcfg, num_classes=0, contrastive_weight=0.0)
    model = MAGEClassifier(arch, len(classes), cfg.drop_path).to(dev)
    model.load_pretrained(weights, where)
    fastpath.apply(model, dev, training=True)  # CPU dropout and attention (graphs being compiled keep their own)
    task = FinetuneTask(cfg, info, source, model, tok_path)
    task.run_args = {
        "model": os.path.abspath(model_dir),
        "data": data,
        "data_dir": data_dir,
        "limit": limit,
        "cache": os.path.abspath(cache) if cache else None,
    }
    result = fit(task, loop, info, out, resume=resume, progress=progress, stop_at=stop_at)
    if info.is_main:
        xt, yt = _test_tokens(tok, data, data_dir, None, dev)
        metrics = evaluate_tokens(model, xt, yt)
        result.update(metrics)
        save_checkpoint(os.path.join(out, "model"), model.state_dict(), arch)
        atomic_write_json(
            os.path.join(out, "classifier.json"),
            {
                "kind": "finetune",
                "model": "model",
                "tokenizer": "tokenizer",
                "pretrained": os.path.abspath(model_dir),
                "pretrained_checkpoint": os.path.abspath(where),  # the step it started from (the run may go on)
                "image_size": tok.config.image_size,
                "classes": classes,
                "pool": "mean",
                "data": data,
                "metrics": metrics,
                "steps": result["step"],
                "recipe": dataclasses.asdict(cfg),
            },
        )
    return result


class FinetunedClassifier:
    """A ``mage finetune`` output directory: image -> class probabilities."""

    def __init__(self, path: str, meta: dict[str, Any]):
        self.meta = meta
        weights, arch, where = load_checkpoint(os.path.join(path, meta["model"]))
        if not isinstance(arch, MAGEConfig):
            raise MageError(f"{where} holds a {type(arch).__name__}, not a fine-tuned MAGE classifier")
        self.model = MAGEClassifier(arch, len(meta["classes"]))
        load_strict(self.model, weights, where)
        self.model.eval()
        self.tokenizer = VQTokenizer.from_pretrained(os.path.join(path, meta["tokenizer"])).eval()
        self.classes = meta["classes"]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.tokenizer.encode(images)).softmax(-1)
