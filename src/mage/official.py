"""Reading the original release's checkpoints (MAGE.md 7): pre-trained MAGE, MAGE-C, fine-tuned classifiers.

Our module names equal the original's for every tensor that is used, so converting is mostly *sorting keys*:
- used keys are kept as they are;
- ``vqgan.*`` go to the tokenizer;
- the original's dead weights (MAGE.md 3.2: ``cls_token``, ``pos_embed``, ``mask_token``, ``decoder_pos_embed``,
  ``decoder_pred.*``, ``patch_embed.*``) are listed and dropped;
- anything else is an error, as are missing or mis-shaped keys.

Head counts are not visible in the shapes and are never guessed: ``--num-heads`` / ``--decoder-num-heads``, else
the checkpoint's own ``args`` (explicit ``num_heads`` / ``decoder_num_heads``, or the original's model name
``args.model``), else the released widths; otherwise a one-line error asks for the two flags.
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
# the original's model functions (models_mage.py), as its training checkpoints name them in ``args.model``:
# name -> (embed_dim, decoder_embed_dim, num_heads, decoder_num_heads)
RELEASED = {
    "mage_vit_base_patch16": (768, 768, 12, 16),
    "mage_vit_large_patch16": (1024, 1024, 16, 16),
}
# number of heads is not visible in the shapes: the released sizes, by (encoder, decoder) width
KNOWN_HEADS = {(d, dd): (h, dh) for d, dd, h, dh in RELEASED.values()}
HEADS_FLAGS = "--num-heads N and --decoder-num-heads N"


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


def _arg(args: Any, name: str) -> Any:
    """``args.name`` of an argparse.Namespace or a dict (``vars(args)``); None if absent."""
    if isinstance(args, dict):
        return args.get(name)
    return getattr(args, name, None)


def _count_arg(args: Any, name: str, where: str) -> int | None:
    v = _arg(args, name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise MageError(f"{where}: its args.{name} is {v!r}, not a positive number: pass {HEADS_FLAGS}")
    return v


def resolve_heads(
    obj: dict[str, Any], where: str, D: int, Dd: int, num_heads: int | None, decoder_num_heads: int | None
) -> tuple[int, int, str]:
    """(encoder heads, decoder heads, where they came from). Each count: the flag, else the checkpoint's
    ``args.num_heads`` / ``args.decoder_num_heads``, else ``args.model``'s released sizes (its widths must be
    the weights'), else the released widths; never a guess."""
    nh, dnh, said = num_heads, decoder_num_heads, []
    if nh is not None or dnh is not None:
        said.append("the flags")
    args = obj.get("args") if isinstance(obj, dict) and "model" in obj else None
    if args is not None and (nh is None or dnh is None):
        a_nh, a_dnh = _count_arg(args, "num_heads", where), _count_arg(args, "decoder_num_heads", where)
        if (nh is None and a_nh) or (dnh is None and a_dnh):
            said.append("its args")
        nh, dnh = nh or a_nh, dnh or a_dnh
        name = _arg(args, "model")
        if (nh is None or dnh is None) and isinstance(name, str) and name in RELEASED:
            d, dd, r_nh, r_dnh = RELEASED[name]
            if (d, dd) != (D, Dd):
                raise MageError(
                    f"{where}: its args.model is {name} ({d}/{dd} wide) but its weights are {D}/{Dd} wide: "
                    f"pass {HEADS_FLAGS}"
                )
            said.append(f"args.model {name}")
            nh, dnh = nh or r_nh, dnh or r_dnh
    if (nh is None or dnh is None) and (D, Dd) in KNOWN_HEADS:
        said.append("the released widths")
        nh, dnh = nh or KNOWN_HEADS[D, Dd][0], dnh or KNOWN_HEADS[D, Dd][1]
    if nh is None or dnh is None:
        missing = " and ".join(f for f, v in (("--num-heads", nh), ("--decoder-num-heads", dnh)) if v is None)
        raise MageError(
            f"{where}: its number of attention heads is not in the file and {D}/{Dd} (encoder/decoder width) is "
            f"not a released size: pass {missing} (python: num_heads= / decoder_num_heads=)"
        )
    return nh, dnh, " + ".join(said)


def convert_official_mage(
    obj: dict[str, Any], where: str, num_heads: int | None = None, decoder_num_heads: int | None = None
) -> tuple[MAGEConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Original ``{'model': sd, ...}`` -> (config, our weights, report). The report lists unused legacy keys,
    the ``vqgan.*`` tensors (prefix removed), any classifier-head keys (``head.*``, ``fc_norm.*``) and the head
    counts with their source (:func:`resolve_heads`)."""
    sd = split_official(obj, where)
    vocab, D = sd["token_emb.word_embeddings.weight"].shape
    if "decoder_embed.weight" not in sd:
        raise MageError(f"{where} has no decoder (a fine-tuned classifier?): import it as a classifier instead")
    Dd = sd["decoder_embed.weight"].shape[0]
    nh, dnh, heads_from = resolve_heads(obj, where, D, Dd, num_heads, decoder_num_heads)
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
    report: dict[str, Any] = {
        "unused_legacy_keys": [],
        "vqgan": {},
        "extra": {},
        "heads": {"num_heads": nh, "decoder_num_heads": dnh, "from": heads_from},
    }
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
