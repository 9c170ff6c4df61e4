"""``mage import-official``: released checkpoints -> our checkpoint directories.

OUT/                 the MAGE model (model.safetensors + config.json), loadable by MAGE.from_pretrained
OUT/tokenizer/       the VQGAN (from --vqgan, else from the MAGE file's vqgan.* keys)
OUT/import.json      what was converted, and every legacy key that was dropped
"""

from __future__ import annotations

import json
import os

from .checkpoint import load_strict, save_checkpoint, torch_load_official
from .errors import MageError
from .model import MAGE
from .official import convert_official_mage
from .vqgan import VQTokenizer, config_from_state_dict, official_tokenizer_state_dict


def import_official(
    mage_file: str | None,
    vqgan_file: str | None,
    out: str,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
) -> str:
    """Convert; returns a short human-readable report."""
    if mage_file is None and vqgan_file is None:
        raise MageError("give --mage FILE and/or --vqgan FILE")
    lines, summary = [], {}
    vq_sd = None
    if mage_file is not None:
        cfg, weights, rep = convert_official_mage(
            torch_load_official(mage_file), mage_file, num_heads, decoder_num_heads
        )
        model = MAGE(cfg)
        load_strict(model, weights, mage_file)  # every used key present with the right shape
        save_checkpoint(out, model.state_dict(), cfg)
        vq_sd = rep["vqgan"] or None
        summary.update(
            mage=os.path.abspath(mage_file),
            converted_keys=len(weights),
            unused_legacy_keys=rep["unused_legacy_keys"],
            ignored_extra_keys=sorted(rep["extra"]),
        )
        lines.append(
            f"MAGE: {len(weights)} keys converted ({cfg.depth}x{cfg.embed_dim} encoder, "
            f"{cfg.decoder_depth}x{cfg.decoder_embed_dim} decoder) -> {out}"
        )
        lines.append(f"legacy unused keys dropped: {', '.join(rep['unused_legacy_keys']) or 'none'}")
        if rep["extra"]:
            lines.append(f"extra keys ignored: {', '.join(sorted(rep['extra']))}")
    if vqgan_file is not None:
        vq_sd = official_tokenizer_state_dict(torch_load_official(vqgan_file), vqgan_file)
        summary["vqgan"] = os.path.abspath(vqgan_file)
    if vq_sd is not None:
        tok = VQTokenizer(config_from_state_dict(vq_sd))
        load_strict(tok, vq_sd, vqgan_file or mage_file or "")
        dst = os.path.join(out, "tokenizer") if mage_file is not None else out
        save_checkpoint(dst, tok.state_dict(), tok.config)
        lines.append(f"VQGAN: {len(vq_sd)} keys converted -> {dst}")
    else:
        lines.append("no VQGAN weights found: pass --vqgan vqgan_jax_strongaug.ckpt")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "import.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return "\n".join(lines)
