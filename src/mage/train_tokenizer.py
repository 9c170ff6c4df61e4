"""Training the VQGAN tokenizer on one's own images (``mage train-tokenizer``).

Losses (generator side): L1 (+ optional L2) reconstruction, codebook + beta * commitment (VQ-VAE), and,
after ``adversarial_start`` steps, a hinge adversarial loss from a PatchGAN discriminator (weight 0.1, as
MaskGIT's generator weight). Codebook collapse is prevented by restarting dead codes: every
``dead_code_restart_every`` steps, codes unused in that window are re-seeded with encoder outputs of the
current batch (plus a little noise), drawn k-means++ style: far from the live codes is likelier.

No perceptual loss by default: LPIPS weights cannot be fetched offline, and the only offline perceptual
network (the FID Inception-v3) needs 299 px inputs, which costs ~50x the whole 32 px generator step on a CPU;
it would also make our FID numbers partly self-referential. ``perceptual_weight`` is kept in the config for
a future network.

Everything is deterministic given the seed (batch order, augmentation and restarts are seeded per step), so
``--resume`` continues with exactly what a straight run would have done. Runs on GPUs and under torchrun
through the training engine (engine.py).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import seeding
from .checkpoint import load_strict
from .config import TokenizerConfig, TokenizerTraining
from .data import ImageDataset
from .distributed import DistInfo, all_gather_cat, init_distributed, to_device
from .engine import LoopSettings, Task, fit
from .files import atomic_write_json
from .precision import autocast
from .transforms import save_image
from .vqgan import VQTokenizer


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs with GroupNorm + LeakyReLU, one logit per patch."""

    def __init__(self, in_ch: int = 3, ch: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ch
        for i in range(1, layers):
            c2 = ch * min(2**i, 8)
            mods += [nn.Conv2d(c, c2, 4, 2, 1, bias=False), nn.GroupNorm(min(32, c2 // 4), c2), nn.LeakyReLU(0.2, True)]
            c = c2
        mods += [nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, 1, h, w]


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0,1] (recon is clamped first). -> [B]"""
    mse = (recon.clamp(0, 1) - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def reconstruction_metrics(
    tok: VQTokenizer,
    dataset: ImageDataset,
    batch_size: int = 256,
    limit: int | None = None,
    bf16: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Test-set PSNR (dB), codebook usage (% of codes used), code perplexity, and the per-position code entropy
    (nats, mean over grid positions of the entropy of the ids seen at that position): how many interchangeable
    ids the generator must choose among where the image content barely varies (e.g. background corners)."""
    tok.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    per_pos = torch.zeros(tok.config.num_tokens, tok.config.codebook_size, dtype=torch.float64)  # [L, K]
    total_psnr, seen = 0.0, 0
    for s in tqdm(range(0, n, batch_size), desc="evaluate", disable=not progress, leave=False):
        x = torch.stack([dataset[i][0] for i in range(s, min(n, s + batch_size))])
        with autocast(tok.quantize.embedding.weight.device, bf16):
            ids = tok.encode(x)
            rec = tok.decode(ids).cpu()
            ids = ids.cpu()
        flat = ids.reshape(ids.shape[0], -1).long()  # [B, L]
        per_pos.view(-1).index_add_(
            0,
            (torch.arange(flat.shape[1]) * per_pos.shape[1] + flat).flatten(),
            torch.ones(flat.numel(), dtype=torch.float64),
        )
        total_psnr += psnr(rec.float(), x).sum().item()
        seen += x.shape[0]
    counts = per_pos.sum(0)  # [K]
    p = counts / counts.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum().item()
    q = per_pos / per_pos.sum(1, keepdim=True).clamp_min(1)
    pos_ent = max(0.0, -(q * q.clamp_min(1e-300).log()).sum(1).mean().item())  # never '-0.00'
    return {
        "psnr": total_psnr / max(seen, 1),
        "usage": 100.0 * (counts > 0).float().mean().item(),
        "perplexity": math.exp(ent),
        "position_entropy": pos_ent,
        "images": seen,
    }


def _restart_dead_codes(tok: VQTokenizer, usage: torch.Tensor, z: torch.Tensor, g: torch.Generator) -> int:
    """Re-seed codes unused since the last restart with encoder outputs of this batch, drawn with probability
    proportional to their squared distance to the nearest live code (k-means++ seeding).

    Uniform draws put about half the new codes on the most common content (on Fashion-MNIST, black
    background), splitting one look into many interchangeable ids. Measured on fmnist-32 (19.5 min each, 2,000
    test images): the always-black corner token took 136 ids / 4.17 nats with uniform draws, 95 / 3.68 nats
    with these; the mean per-position entropy barely moves (5.31 -> 5.26 nats) and PSNR is unchanged."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # [N, C]
    codes = tok.quantize.embedding.weight.detach().float().cpu()
    live = (usage > 0).nonzero().flatten()
    if live.numel() > 0:
        err = torch.cdist(flat, codes[live]).min(dim=1).values.pow(2)  # [N]
    else:
        err = torch.ones(flat.shape[0])
    err = err + 1e-12
    replace = int((err > 1e-9).sum()) < dead.numel()
    pick = torch.multinomial(err, dead.numel(), replacement=replace, generator=g)
    noise = torch.randn(dead.numel(), flat.shape[1], generator=g) * flat.std() * 0.01
    w = tok.quantize.embedding.weight
    w.data[dead.to(w.device)] = (flat[pick] + noise).to(w.device, w.dtype)
    return int(dead.numel())


class _AutoEncoder(nn.Module):
    """The tokenizer's training forward as one module (what DDP wraps): images -> (reconstruction, ids,
    codebook loss, commitment loss, encoder output z)."""

    def __init__(self, tok: VQTokenizer):
        super().__init__()
        self.tok = tok

    def forward(self, x: torch.Tensor):
        z = self.tok.encoder(x)
        zq, ids, cb, commit = self.tok.quantize(z)
        return self.tok.decoder(zq), ids, cb, commit, z


class TokenizerTask(Task):
    """VQGAN training: the generator loss and, once the discriminator has joined, its hinge loss in one backward
    (the discriminator is frozen while it scores the generator's output, so each loss reaches only its side)."""

    name = "train-tokenizer"
    curve = ("loss", "psnr", "usage")

    def __init__(
        self, cfg: TokenizerConfig, t: TokenizerTraining, info: DistInfo, train_set: ImageDataset, workers: int
    ):
        self.config, self.recipe, self.info, self.train_set, self.workers = cfg, t, info, train_set, workers
        torch.manual_seed(t.seed)
        self.model = VQTokenizer(cfg).to(info.device)
        self.disc = PatchDiscriminator(self.config.in_channels, t.disc_channels, t.disc_layers).to(info.device)
        ae = _AutoEncoder(self.model)
        self.net = torch.nn.parallel.DistributedDataParallel(ae) if info.enabled else ae
        self.synced = [self.net] if info.enabled else []
        self.optimizers = {
            "generator": torch.optim.Adam(self.model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay),
            "discriminator": torch.optim.Adam(self.disc.parameters(), lr=t.lr, betas=t.betas),
        }
        self.global_batch = t.batch_size
        self.usage = torch.zeros(self.config.codebook_size, device=info.device)  # code counts since the last restart
        self.fixed = torch.stack([train_set[i][0] for i in range(min(16, len(train_set)))])
        self.out, self.progress, self.last_z = None, 0.0, None

    def on_start(self, out: str) -> None:
        self.out = out
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)

    def batches(self, start, end):
        from .loader import step_batches

        for step, x, _ in step_batches(
            self.train_set,
            self.recipe.batch_size,
            self.recipe.seed,
            start,
            end,
            self.info.rank,
            self.info.world,
            self.workers,
            1,
            self.info.device,
        ):
            yield step, (to_device(x, self.info.device),)

    def loss(self, net, batch, step):
        t, (x,) = self.recipe, batch
        # the discriminator joins after a warm-up (adversarial_start steps, or that share of the time budget)
        use_adv = t.adversarial_weight > 0 and self.progress >= t.adversarial_start / max(1, t.max_steps)
        with autocast(self.info.device, t.bf16):
            rec, ids, cb_loss, commit_loss, z = net(x)
            rec = rec.float()
            rec_loss = t.l1_weight * (rec - x).abs().mean() + t.l2_weight * (rec - x).pow(2).mean()
            loss = rec_loss + t.codebook_weight * cb_loss + t.commitment_weight * commit_loss
            d_loss = torch.zeros((), device=x.device)
            if use_adv:
                self.disc.requires_grad_(False)
                loss = loss - t.adversarial_weight * self.disc(rec).float().mean()
                self.disc.requires_grad_(True)
                d_loss = F.relu(1 - self.disc(x).float()).mean() + F.relu(1 + self.disc(rec.detach()).float()).mean()
        self.usage += torch.bincount(ids.flatten(), minlength=self.config.codebook_size).float()
        self.last_z = z.detach()
        return loss + d_loss, {
            "loss": loss,
            "rec": rec_loss,
            "commit": commit_loss,
            "d_loss": d_loss,
            "psnr": psnr(rec.detach(), x).mean(),
        }

    def reduce_grads(self) -> None:
        """The discriminator is not DDP-wrapped (it runs three times a step): average its gradients here."""
        if self.info.enabled:
            for p in self.disc.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.info.world

    def after_step(self, step: int, progress: float) -> dict[str, float]:
        t, restarted = self.recipe, 0
        if t.dead_code_restart_every and step % t.dead_code_restart_every == 0:
            if self.info.enabled:
                torch.distributed.all_reduce(self.usage)
            used = 100.0 * (self.usage > 0).float().mean().item()
            if progress < 0.9:  # leave the codebook alone at the very end
                z = all_gather_cat(self.last_z, self.info)  # every rank re-seeds the same codes
                restarted = _restart_dead_codes(
                    self.model, self.usage.cpu(), z.cpu(), seeding.generator(t.seed, seeding.CODES, step)
                )
            self.usage.zero_()
        else:
            used = 100.0 * (self.usage > 0).float().mean().item()
        if self.out is not None and step % t.sample_every == 0:
            _write_grid(self.model, self.fixed, os.path.join(self.out, "samples", f"recon-{step:07d}.png"), t.bf16)
        return {"usage": used, "restarted": restarted}

    def state_dict(self):
        return {"disc": self.disc.state_dict(), "usage": self.usage}

    def load_state_dict(self, state):
        load_strict(self.disc, state["disc"], "the run's discriminator")
        self.usage.copy_(state["usage"])

    def on_checkpoint(self, out: str, step: int) -> None:
        _write_grid(self.model, self.fixed, os.path.join(out, "samples", f"recon-{step:07d}.png"), self.recipe.bf16)


def settings(t: TokenizerTraining, accum: int = 1) -> LoopSettings:
    """Warm-up over ``warmup_steps``, then cosine to 10% of the peak at the end of the run."""
    return LoopSettings.from_recipe(t, total_steps=t.max_steps, lr=t.lr, warmup_steps=t.warmup_steps,
                                    min_lr=0.1 * t.lr, accum=accum)  # fmt: skip


def train_tokenizer(
    cfg: TokenizerConfig,
    train: TokenizerTraining,
    train_set: ImageDataset,
    out: str,
    val_set: ImageDataset | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    accum: int = 1,
    workers: int = 0,
    run_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or resume) a tokenizer into ``out``; returns final validation metrics. Works under torchrun.
    ``stop_at`` ends the run early at that step (with a checkpoint), as an interruption would."""
    info = init_distributed()
    task = TokenizerTask(cfg, train, info, train_set, workers)
    task.run_args = run_args or {"data": train_set.name}
    res = fit(task, settings(train, accum), info, out, resume=resume, progress=progress, stop_at=stop_at)
    metrics: dict[str, Any] = {"step": res["step"], "train_minutes": res["minutes"], "skipped": res["skipped"]}
    if val_set is not None and info.is_main:
        metrics.update(reconstruction_metrics(task.model, val_set, bf16=False))
        atomic_write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


@torch.no_grad()
def _write_grid(tok: VQTokenizer, x: torch.Tensor, path: str, bf16: bool) -> None:
    """Originals (top rows) above their reconstructions (bottom rows)."""
    tok.eval()
    with autocast(tok.quantize.embedding.weight.device, bf16):
        rec = tok.decode(tok.encode(x)).float().clamp(0, 1).cpu()
    save_image(torch.cat([x, rec]), path, nrow=min(8, x.shape[0]))
