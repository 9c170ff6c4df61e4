"""Iterative (MaskGIT) decoding, exactly the original's loop (MAGE.md 4.1), separate from the model.

Per step s = 0..T-1, with r = (s+1)/T:
  1. logits for every position (one full forward, nothing dropped); optional classifier-free guidance;
  2. sample every unknown token (token temperature; known tokens are kept as they are): inverse CDF with one
     uniform per position, drawn from the (CPU) generator -- a few numbers per step instead of a Gumbel draw
     per vocabulary entry, which cost more than the forward on a GPU (B x L x K doubles made on the host);
  3. confidence = log p(sampled) for unknown tokens, +inf for known ones, plus Gumbel noise scaled by the
     choice temperature * (1 - r) (linear anneal to 0);
  4. re-mask the n_s = floor(U * schedule(r)) least confident, clamped to [1, unknown - 1], where U is the
     number of tokens unknown at the start (so partial masks for editing follow the same schedule);
the result is the last step's *sampled* ids (all filled). Known tokens never change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import MageError
from .model import MAGE
from .precision import autocast

SCHEDULES = {
    "cosine": lambda r: math.cos(math.pi / 2 * r),
    "linear": lambda r: 1.0 - r,
    "arccos": lambda r: math.acos(r) / (math.pi / 2),
}


@dataclass
class SamplerConfig:
    steps: int = 20  # README of the original: 20 iterations
    temperature: float = 1.0  # token temperature (the original: 1)
    choice_temperature: float = 6.0  # README of the original: 6.0 (argparse default 4.5)
    schedule: str = "cosine"
    cfg: float = 0.0  # classifier-free guidance scale (0 = off)
    cfg_schedule: str = "constant"  # constant | linear (w * (s+1)/T, as RCG)

    def check(self) -> None:
        if self.steps < 1:
            raise MageError(f"steps must be >= 1 (got {self.steps})")
        if self.schedule not in SCHEDULES:
            raise MageError(f"unknown schedule '{self.schedule}' (choose from {', '.join(SCHEDULES)})")
        if self.cfg_schedule not in ("constant", "linear"):
            raise MageError(f"unknown guidance schedule '{self.cfg_schedule}' (constant | linear)")
        if self.temperature <= 0 or self.choice_temperature < 0:
            raise MageError("temperature must be > 0 and choice temperature >= 0")


#: a model folder may hold the sampler its card recommends (``sampler.json``: SamplerConfig fields); commands use
#: it for every sampler flag not given, instead of the original's ImageNet settings above
SAMPLER_FILE = "sampler.json"


def model_sampler(model_dir: str | None) -> SamplerConfig:
    """The recommended sampler of a model folder (its ``sampler.json``), else the defaults."""
    import json
    import os

    from .released import resolve

    path = os.path.join(resolve(model_dir), SAMPLER_FILE) if model_dir else ""
    if not path or not os.path.isfile(path):
        return SamplerConfig()
    try:
        with open(path) as f:
            fields = json.load(f)
        s = SamplerConfig(**fields)
    except (ValueError, TypeError) as e:
        raise MageError(f"cannot read {path}: {e}") from None
    s.check()
    return s


def _gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_(1e-20, 1.0)
    return (-torch.log(-torch.log(u))).to(device)


@torch.no_grad()
def decode_tokens(
    model: MAGE,
    tokens: torch.Tensor,
    cfg: SamplerConfig,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    bf16: bool = False,
    trace: list | None = None,
    forward: Callable[..., torch.Tensor] | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """tokens [B, L] with the mask id at unknown positions -> fully sampled ids [B, L].

    ``forward`` replaces ``model.logits`` (same arguments), e.g. a compiled one (``mage bench --compile``).
    ``labels`` [B] (class ids, -1 = unconditional) need a class-conditional model. With ``cfg > 0`` the
    logits are ``cond + w * (cond - uncond)``. ``trace`` (a list) receives the ids after every step.

    ``on_step(step, ids, fixed, guess)`` watches the decoding (it gets copies, draws nothing from the
    generator, so the result is the same with or without it): after step ``step`` (0-based), ``ids`` [B, L]
    holds the mask id where tokens are still unknown (after the last step: the result), ``fixed`` [B, L] bool
    marks the tokens decided at this step, ``guess`` [B, L] is this step's sample of every position."""
    cfg.check()
    model.eval()
    mask_id, K = model.vocab.mask_id, model.vocab.codebook_size
    dev = tokens.device
    if labels is not None and model.class_emb is None and bool((labels >= 0).any()):
        raise MageError("this model is not class-conditional: train it with --class-conditional")
    forward = forward or model.logits
    ids = tokens.clone()
    unknown0 = (ids == mask_id).sum(1, keepdim=True).float()  # [B, 1]
    sampled = ids
    for s in range(cfg.steps):
        r = (s + 1) / cfg.steps
        with autocast(dev, bf16):
            if cfg.cfg > 0 and labels is not None:  # conditional and unconditional rows in one forward
                both = forward(torch.cat([ids, ids]), torch.cat([labels, torch.full_like(labels, -1)]))
                logits, uncond = both[:, 1:, :K].float().chunk(2)  # [B, L, K] each
                w = cfg.cfg * (r if cfg.cfg_schedule == "linear" else 1.0)
                logits = logits + w * (logits - uncond)
            else:
                logits = forward(ids, labels)[:, 1:, :K].float()  # [B, L, K]
        unknown = ids == mask_id  # [B, L]
        logp = torch.log_softmax(logits / cfg.temperature, dim=-1)
        B, L, _ = logp.shape
        # sample every position from Categorical(p) by inverse CDF, keep the known ones
        cdf = logp.double().exp().cumsum(-1)  # [B, L, K]
        u = torch.rand((B, L, 1), generator=generator, dtype=torch.float64).to(dev)
        draw = (cdf < u * cdf[..., -1:]).sum(-1).clamp_(max=K - 1)  # [B, L]
        sampled = torch.where(unknown, draw, ids)
        # how many stay masked after this step
        n_mask = torch.floor(unknown0 * SCHEDULES[cfg.schedule](r))  # [B, 1] (on dev)
        n_unknown = unknown.sum(1, keepdim=True).float()
        n_mask = torch.maximum(torch.ones_like(n_mask), torch.minimum(n_unknown - 1, n_mask)).long()  # [B, 1]
        conf = torch.gather(logp, -1, sampled.unsqueeze(-1)).squeeze(-1).double()  # [B, L]
        conf = torch.where(unknown, conf, torch.full_like(conf, math.inf))
        conf = conf + cfg.choice_temperature * (1 - r) * _gumbel((B, L), generator, dev).double()
        cutoff = torch.gather(conf.sort(dim=1).values, 1, (n_mask - 1).to(dev))  # [B, 1]
        remask = (conf <= cutoff) & unknown & (n_unknown > 0)
        ids = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
        if trace is not None:
            trace.append(ids.clone())
        if on_step is not None:
            # the last step returns every sample: the positions it re-masked are decided too
            last = s == cfg.steps - 1
            fixed = unknown if last else unknown & ~remask
            on_step(s, (sampled if last else ids).clone(), fixed.clone(), sampled.clone())
    return sampled
