"""``mage import-official``: released checkpoints -> our checkpoint directories.

OUT/                 the MAGE model (model.safetensors + config.json), loadable by MAGE.from_pretrained
OUT/tokenizer/       the VQGAN (from --vqgan, else from the MAGE file's vqgan.* keys)
OUT/import.json      what was converted, and every legacy key that was dropped; it marks OUT as made by this command

The whole import is written in a temporary folder beside OUT and renamed into place at the end, so a failed or
killed import changes nothing. An existing OUT is replaced only when it is this command's own earlier output
(its import.json says so, and it holds nothing else): a folder holding anything the import did not write is
refused, never moved aside or deleted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from .checkpoint import CONFIG, WEIGHTS, load_strict, save_checkpoint, torch_load_official
from .errors import MageError
from .files import atomic_write_json, foreign_entries, fsync_dir, read_json
from .model import MAGE
from .official import convert_official_mage
from .vqgan import VQTokenizer, config_from_state_dict, official_tokenizer_state_dict

MARKER = "import.json"
MADE_BY = "mage import-official"
ENTRIES = (WEIGHTS, CONFIG, "tokenizer", MARKER)  # everything an import writes in OUT
# the keys of an import.json written before it carried "made_by" (such a folder is still this command's own)
_OLD_MARKER_KEYS = {"mage", "converted_keys", "unused_legacy_keys", "ignored_extra_keys", "vqgan"}


def is_own_import(out: str) -> bool:
    """Whether ``out`` holds an import made by this command (its import.json says so)."""
    path = os.path.join(out, MARKER)
    if not os.path.isfile(path):
        return False
    try:
        meta = read_json(path, "import record")
    except MageError:
        return False
    return meta.get("made_by") == MADE_BY or (bool(meta) and set(meta) <= _OLD_MARKER_KEYS)


def check_out(out: str) -> None:
    """Refuse an ``out`` that the import would have to replace although it did not write it (one line)."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise MageError(f"--out {out} exists and is not a folder: choose another --out")
    names = os.listdir(out)
    if not names:
        return
    if not is_own_import(out):
        raise MageError(
            f"--out {out} is not empty and is not an earlier import (no {MARKER} from '{MADE_BY}'): "
            f"choose another --out (nothing was changed)"
        )
    foreign = foreign_entries(out, ENTRIES)
    if foreign:
        more = f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
        raise MageError(
            f"--out {out} holds {', '.join(foreign[:3])}{more}, which an import does not write: move it away "
            f"or choose another --out (nothing was changed)"
        )


def _swap_in(staged: str, out: str) -> None:
    """Rename ``staged`` to ``out``; an existing ``out`` (checked to be an earlier import) is renamed aside first
    and deleted once the new one is in place."""
    parent = os.path.dirname(os.path.abspath(out))
    aside = None
    if os.path.lexists(out):
        aside = tempfile.mkdtemp(prefix=".tmp-replaced-" + os.path.basename(out) + "-", dir=parent)
        os.rmdir(aside)  # a fresh unused name: never someone else's folder
        os.replace(out, aside)
    try:
        os.replace(staged, out)
    except BaseException:
        if aside is not None:
            os.replace(aside, out)
        raise
    fsync_dir(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


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
    check_out(out)
    lines: list[str] = []
    summary: dict[str, Any] = {"made_by": MADE_BY}
    mage_parts = vq_sd = None
    if mage_file is not None:  # everything is read and checked before anything is written
        cfg, weights, rep = convert_official_mage(
            torch_load_official(mage_file), mage_file, num_heads, decoder_num_heads
        )
        model = MAGE(cfg)
        load_strict(model, weights, mage_file)  # every used key present with the right shape
        mage_parts = (cfg, model)
        vq_sd = rep["vqgan"] or None
        summary.update(
            mage=os.path.abspath(mage_file),
            converted_keys=len(weights),
            heads=rep["heads"],
            unused_legacy_keys=rep["unused_legacy_keys"],
            ignored_extra_keys=sorted(rep["extra"]),
        )
        h = rep["heads"]
        lines.append(
            f"MAGE: {len(weights)} keys converted ({cfg.depth}x{cfg.embed_dim} encoder, "
            f"{cfg.decoder_depth}x{cfg.decoder_embed_dim} decoder, {h['num_heads']}/{h['decoder_num_heads']} heads "
            f"from {h['from']}) -> {out}"
        )
        lines.append(f"legacy unused keys dropped: {', '.join(rep['unused_legacy_keys']) or 'none'}")
        if rep["extra"]:
            lines.append(f"extra keys ignored: {', '.join(sorted(rep['extra']))}")
    if vqgan_file is not None:
        vq_sd = official_tokenizer_state_dict(torch_load_official(vqgan_file), vqgan_file)
        summary["vqgan"] = os.path.abspath(vqgan_file)
    tok = None
    if vq_sd is not None:
        tok = VQTokenizer(config_from_state_dict(vq_sd))
        load_strict(tok, vq_sd, vqgan_file or mage_file or "")

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".tmp-import-" + os.path.basename(out) + "-", dir=parent)
    try:
        staged = os.path.join(stage, "out")
        if mage_parts is not None:
            save_checkpoint(staged, mage_parts[1].state_dict(), mage_parts[0])
        if tok is not None:
            sub = "tokenizer" if mage_parts is not None else ""
            save_checkpoint(os.path.join(staged, sub) if sub else staged, tok.state_dict(), tok.config)
            lines.append(f"VQGAN: {len(vq_sd)} keys converted -> {os.path.join(out, sub) if sub else out}")
        else:
            lines.append("no VQGAN weights found: pass --vqgan vqgan_jax_strongaug.ckpt")
        atomic_write_json(os.path.join(staged, MARKER), summary)
        _swap_in(staged, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return "\n".join(lines)
