"""``mage cache-tokens`` and ``mage pretrain``: MAGE pre-training by masked token modeling."""

from __future__ import annotations

import argparse

from .common import (
    OUT_FILE,
    POSITIVE,
    Command,
    add_compile_arg,
    add_data_args,
    add_training_args,
    number,
    training_config,
    workers,
)


# --------------------------------------------------------------------------------------------------
# mage cache-tokens
# --------------------------------------------------------------------------------------------------
def add_cache_tokens_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True)
    add_data_args(p)
    p.add_argument("--split", default="train")
    p.add_argument("--out", type=OUT_FILE, required=True, help="cache file (.safetensors)")
    p.add_argument("--no-flip", action="store_true", help="do not add horizontally flipped copies")
    p.add_argument(
        "--crops",
        type=number(int, 0),
        default=0,
        help="also cache K random-resized-crop views per image "
        "(the original's augmentation; pre-training draws one view per step)",
    )
    p.add_argument(
        "--crop-scale",
        type=number(float, 0, strict=True, high=1),
        default=0.2,
        help="smallest crop area fraction (default 0.2, the original's)",
    )
    p.add_argument("--batch-size", type=POSITIVE, default=256)
    p.add_argument(
        "--workers",
        type=number(int, 0),
        default=None,
        help="DataLoader processes decoding images (default min(4, CPU cores))",
    )


def run_cache_tokens(args: argparse.Namespace) -> int:
    from ..tokens import cache_tokens

    path = cache_tokens(
        args.tokenizer,
        data=args.data,
        out=args.out,
        split=args.split,
        data_dir=args.data_dir,
        limit=args.limit,
        flip=not args.no_flip,
        batch_size=args.batch_size,
        crops=args.crops,
        crop_scale=args.crop_scale,
        workers=args.workers,
    )
    print(f"token cache written to {path}")
    return 0


# --------------------------------------------------------------------------------------------------
# mage pretrain
# --------------------------------------------------------------------------------------------------
def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    add_data_args(p, required=False)
    add_training_args(p, "fmnist-32")
    p.add_argument("--tokenizer", default=None, help="tokenizer (needed unless --cache holds everything)")
    p.add_argument("--cache", default=None, help="token cache from 'mage cache-tokens'")
    p.add_argument("--init", default=None, help="start from these MAGE weights (e.g. to fine-tune a generator)")
    p.add_argument("--class-conditional", action="store_true", help="learn a class embedding (label dropout for CFG)")
    p.add_argument("--contrastive", action="store_true", help="MAGE-C: add the InfoNCE loss")
    add_compile_arg(p)


def run_pretrain(args: argparse.Namespace) -> int:
    import dataclasses

    from ..config import mage_preset, pretrain_preset
    from ..pretrain import pretrain

    (cfg, train), _ = training_config(args, lambda name: (mage_preset(name), pretrain_preset(name)))
    if args.contrastive:
        cfg = dataclasses.replace(cfg, contrastive_weight=cfg.contrastive_weight or 0.1)
    if args.compile is not None:
        train = dataclasses.replace(train, compile=args.compile)
    res = pretrain(
        cfg,
        train,
        out=args.out,
        data=args.data,
        tokenizer=args.tokenizer,
        cache=args.cache,
        data_dir=args.data_dir,
        limit=args.limit,
        resume=args.resume,
        init=args.init,
        accum=args.accum,
        workers=workers(args),
        class_conditional=args.class_conditional,
    )
    print(
        f"MAGE saved to {args.out}: step {res['step']}, loss {res['loss']:.4f}, "
        f"masked-token acc {100 * res['acc']:.2f}%"
    )
    return 0


COMMANDS = (
    Command(
        "cache-tokens",
        "pre-tokenize a dataset (with horizontal-flip copies)",
        add_cache_tokens_arguments,
        run_cache_tokens,
    ),
    Command("pretrain", "pre-train MAGE by masked token modeling", add_pretrain_arguments, run_pretrain),
)
