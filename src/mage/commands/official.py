"""``mage import-official``: the released MAGE / VQGAN checkpoints as our model directories."""

from __future__ import annotations

import argparse

from .common import POSITIVE, Command


def add_import_official_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mage", default=None, help="original MAGE .pth ({'model': ...}, a training checkpoint too)")
    p.add_argument("--vqgan", default=None, help="original vqgan_jax_strongaug.ckpt (else taken from the MAGE file)")
    p.add_argument(
        "--out", required=True, help="a new or empty folder, or an earlier import (replaced); nothing else is touched"
    )
    heads = "else from the file's args (num_heads / args.model) or the released widths; never guessed"
    p.add_argument("--num-heads", type=POSITIVE, default=None, help=f"encoder attention heads ({heads})")
    p.add_argument("--decoder-num-heads", type=POSITIVE, default=None, help=f"decoder attention heads ({heads})")


def run_import_official(args: argparse.Namespace) -> int:
    from ..importer import import_official

    rep = import_official(
        mage_file=args.mage,
        vqgan_file=args.vqgan,
        out=args.out,
        num_heads=args.num_heads,
        decoder_num_heads=args.decoder_num_heads,
    )
    print(rep)
    return 0


COMMANDS = (
    Command(
        "import-official",
        "convert the released MAGE / VQGAN checkpoints",
        add_import_official_arguments,
        run_import_official,
    ),
)
