"""Reading the original release's checkpoints (MAGE.md 7): pre-trained MAGE, MAGE-C, fine-tuned classifiers.

Our module names equal the original's for every tensor that is used, so converting is mostly *sorting keys*:
- used keys are kept as they are;
- ``vqgan.*`` go to the tokenizer;
- the original's dead weights (MAGE.md 3.2: ``cls_token``, ``pos_embed``, ``mask_token``, ``decoder_pos_embed``,
  ``decoder_pred.*``, ``patch_embed.*``) are listed and dropped;
- anything else is an error, as are missing or mis-shaped keys.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from .config import MAGEConfig, mage_preset
from .errors import MageError

LEGACY_UNUSED = (
    "cls_token",
    "pos_embed",
    "mask_token",
    "decoder_pos_embed",
    "decoder_pred.weight",
    "decoder_pred.bias",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
)
# number of heads is not visible in the shapes: the released sizes, by width
KNOWN_HEADS = {768: (12, 16), 1024: (16, 16)}


def _count(sd: dict[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({int(m.group(1)) for k in sd if (m := pat.match(k))})


def split_official(obj: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    if "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if "token_emb.word_embeddings.weight" not in sd:
        raise MageError(f"{where} is not a MAGE checkpoint (no token_emb.word_embeddings.weight)")
    return sd


def convert_official_mage(
    obj: dict[str, Any], where: str, num_heads: int | None = None, decoder_num_heads: int | None = None
) -> tuple[MAGEConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Original ``{'model': sd}`` -> (config, our weights, report). The report lists unused legacy keys,
    the ``vqgan.*`` tensors (prefix removed) and any classifier-head keys (``head.*``, ``fc_norm.*``)."""
    sd = split_official(obj, where)
    vocab, D = sd["token_emb.word_embeddings.weight"].shape
    if "decoder_embed.weight" not in sd:
        raise MageError(f"{where} has no decoder (a fine-tuned classifier?): import it as a classifier instead")
    Dd = sd["decoder_embed.weight"].shape[0]
    heads = KNOWN_HEADS.get(D, (max(1, D // 64), max(1, Dd // 64)))
    nh, dnh = num_heads or heads[0], decoder_num_heads or heads[1]
    if D % nh or Dd % dnh:
        raise MageError(f"{where}: width {D}/{Dd} is not divisible by {nh}/{dnh} heads")
    cfg = dataclasses.replace(
        mage_preset("vit-b"),
        embed_dim=D,
        decoder_embed_dim=Dd,
        depth=_count(sd, "blocks"),
        decoder_depth=_count(sd, "decoder_blocks"),
        num_heads=nh,
        decoder_num_heads=dnh,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
        num_tokens=sd["token_emb.position_embeddings.weight"].shape[0] - 1,
        codebook_size=vocab - 1001,
        legacy_vocab=True,
        grad_checkpointing=D >= 1024,
    )
    report: dict[str, Any] = {"unused_legacy_keys": [], "vqgan": {}, "extra": {}}
    weights: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("vqgan."):
            report["vqgan"][k[len("vqgan.") :]] = v
        elif k in LEGACY_UNUSED:
            report["unused_legacy_keys"].append(k)
        elif k.startswith(("head.", "fc_norm.", "projector.", "projection")):
            report["extra"][k] = v
        else:
            weights[k] = v
    if weights["mlm_layer.bias"].dim() != 3:
        raise MageError(f"{where}: mlm_layer.bias has shape {tuple(weights['mlm_layer.bias'].shape)}, expected [1,1,V]")
    return cfg, weights, report
