"""Model + tokenizer together: images in, images out.

    pipe = MAGEPipeline.from_pretrained("runs/mage")      # finds runs/mage/tokenizer
    images = pipe.generate(16, seed=0)                    # [16, 3, H, W] in [0, 1]
"""

from __future__ import annotations

import json
import os

import torch

from .errors import MageError
from .model import MAGE
from .sampler import SamplerConfig, decode_tokens
from .vqgan import VQTokenizer


class MAGEPipeline:
    def __init__(self, model: MAGE, tokenizer: VQTokenizer, classes: list[str] | None = None):
        if tokenizer.config.codebook_size != model.config.codebook_size or tokenizer.config.num_tokens != model.config.num_tokens:
            raise MageError("tokenizer and model do not fit (codebook size or token count differ)")
        self.model, self.tokenizer, self.classes = model.eval(), tokenizer.eval(), classes

    @classmethod
    def from_pretrained(cls, path: str, tokenizer: str | None = None) -> "MAGEPipeline":
        model = MAGE.from_pretrained(path)
        tok_path = tokenizer or os.path.join(path, "tokenizer")
        if not os.path.exists(tok_path):
            raise MageError(f"no tokenizer at {tok_path}: pass one explicitly")
        classes = None
        cpath = os.path.join(path, "classes.json")
        if os.path.isfile(cpath):
            classes = json.load(open(cpath))
        return cls(model, VQTokenizer.from_pretrained(tok_path), classes)

    # ---- classes ---------------------------------------------------------------------------------
    def class_index(self, name_or_id: str | int) -> int:
        """A class id from a number or a class name (case-insensitive)."""
        n = self.model.config.num_classes
        if n == 0:
            raise MageError("this model is not class-conditional: train it with 'mage pretrain --class-conditional'")
        s = str(name_or_id).strip()
        if s.lstrip("-").isdigit():
            i = int(s)
        else:
            names = [c.lower() for c in (self.classes or [])]
            if s.lower() not in names:
                raise MageError(f"unknown class '{s}' (known: {', '.join(self.classes or []) or 'none'})")
            i = names.index(s.lower())
        if not 0 <= i < n:
            raise MageError(f"class id {i} out of range [0, {n})")
        return i

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(self, num: int, labels: torch.Tensor | None = None, sampler: SamplerConfig | None = None,
                        seed: int = 0, batch_size: int = 64) -> torch.Tensor:
        """num token grids [num, L], sampled from scratch (100% masked). Batch b uses seed + b."""
        sampler = sampler or SamplerConfig()
        out = []
        for b, s in enumerate(range(0, num, batch_size)):
            n = min(batch_size, num - s)
            g = torch.Generator().manual_seed(seed + b)
            start = torch.full((n, self.model.config.num_tokens), self.model.vocab.mask_id)
            lab = None if labels is None else labels[s:s + n]
            out.append(decode_tokens(self.model, start, sampler, lab, g))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        return torch.cat([self.tokenizer.decode(tokens[s:s + batch_size]).clamp(0, 1)
                          for s in range(0, tokens.shape[0], batch_size)])

    def generate(self, num: int, class_label: str | int | None = None, sampler: SamplerConfig | None = None,
                 seed: int = 0, batch_size: int = 64) -> torch.Tensor:
        """num images [num, 3, H, W] in [0, 1]; ``class_label`` (id or name) needs a class-conditional model."""
        labels = None
        if class_label is not None:
            labels = torch.full((num,), self.class_index(class_label))
        return self.decode(self.generate_tokens(num, labels, sampler, seed, batch_size))

    def generate_per_class(self, per_class: int, sampler: SamplerConfig | None = None, seed: int = 0,
                           batch_size: int = 64) -> torch.Tensor:
        """per_class images of every class, class-major: [num_classes * per_class, 3, H, W]."""
        n = self.model.config.num_classes
        if n == 0:
            raise MageError("this model is not class-conditional: train it with 'mage pretrain --class-conditional'")
        labels = torch.arange(n).repeat_interleave(per_class)
        return self.decode(self.generate_tokens(len(labels), labels, sampler, seed, batch_size))
