"""``mage train-tokenizer`` and ``mage reconstruct``: the VQGAN tokenizer."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import MageError
from .common import (
    OUT_ANY,
    Command,
    add_data_args,
    add_training_args,
    check_out,
    image_files,
    training_config,
    workers,
)


# --------------------------------------------------------------------------------------------------
# mage train-tokenizer
# --------------------------------------------------------------------------------------------------
def add_train_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    add_data_args(p, required=False)
    add_training_args(p, "fmnist-32")


def run_train_tokenizer(args: argparse.Namespace) -> int:
    from ..config import tokenizer_preset, tokenizer_training_preset
    from ..data import load_dataset
    from ..train_tokenizer import train_tokenizer

    (cfg, recipe), _ = training_config(args, lambda name: (tokenizer_preset(name), tokenizer_training_preset(name)))
    if args.data is None:
        raise MageError("give --data (fashion-mnist | mnist | folder:PATH | synthetic)")
    train = load_dataset(
        args.data,
        split="train",
        image_size=cfg.image_size,
        augment=recipe.data_augment,
        data_dir=args.data_dir,
        seed=recipe.seed,
        limit=args.limit,
    )
    val = load_dataset(
        args.data,
        split="val",
        image_size=cfg.image_size,
        augment="none",
        data_dir=args.data_dir,
        seed=recipe.seed,
        limit=args.limit if args.limit else 2000,
    )
    m = train_tokenizer(
        cfg,
        recipe,
        train_set=train,
        out=args.out,
        val_set=val,
        resume=args.resume,
        accum=args.accum,
        workers=workers(args),
        run_args={"data": args.data, "data_dir": args.data_dir, "limit": args.limit},
    )
    if "psnr" not in m:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(
        f"tokenizer saved to {args.out}: val PSNR {m['psnr']:.2f} dB, codebook usage {m['usage']:.1f}%, "
        f"perplexity {m['perplexity']:.1f}, position entropy {m['position_entropy']:.2f} nats "
        f"({m['step']} steps, {m['train_minutes']:.1f} min)"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# mage reconstruct
# --------------------------------------------------------------------------------------------------
def add_reconstruct_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or original .ckpt/.pth")
    p.add_argument("--input", default=None, help="an image or a directory of images")
    p.add_argument("--out", type=OUT_ANY, default=None, help="output image (single input) or directory")
    p.add_argument("--side-by-side", action="store_true", help="write input and reconstruction together")
    add_data_args(p, required=False)
    p.add_argument("--split", default="test")
    p.add_argument("--json", action="store_true")


def run_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_dataset
    from ..train_tokenizer import reconstruction_metrics
    from ..transforms import build_transform, load_image, save_image
    from ..vqgan import VQTokenizer

    if args.input is None and args.data is None:
        raise MageError("give --input IMG_OR_DIR and/or --data D")
    tok = VQTokenizer.from_pretrained(args.tokenizer)
    if args.input is not None:
        if args.out is None:
            raise MageError("--out is required with --input")
        tf = build_transform(tok.config.image_size, train=False, augment="none")
        files = image_files(args.input)
        single = os.path.isfile(args.input)
        check_out(args.out, "file" if single else "dir")
        for f in files:
            x = tf(load_image(f))[None]
            with torch.no_grad():
                rec = tok.decode(tok.encode(x)).clamp(0, 1)
            dst = (
                args.out
                if single
                else os.path.join(args.out, os.path.splitext(os.path.relpath(f, args.input))[0] + ".png")
            )
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            save_image(torch.cat([x, rec]) if args.side_by_side else rec[0], dst)
        print(f"wrote {len(files)} reconstruction(s) to {args.out}")
    if args.data is not None:
        ds = load_dataset(
            args.data,
            split=args.split,
            image_size=tok.config.image_size,
            augment="none",
            data_dir=args.data_dir,
            seed=0,
            limit=args.limit,
        )
        m = reconstruction_metrics(tok, ds, progress=True)
        m.update(data=args.data, split=args.split)
        print(
            json.dumps(m)
            if args.json
            else f"{args.data} {args.split} ({m['images']} images): PSNR {m['psnr']:.2f} dB, "
            f"codebook usage {m['usage']:.1f}%, "
            f"perplexity {m['perplexity']:.1f}, position entropy {m['position_entropy']:.2f} nats"
        )
    return 0


COMMANDS = (
    Command(
        "train-tokenizer", "train a VQGAN tokenizer on a dataset", add_train_tokenizer_arguments, run_train_tokenizer
    ),
    Command(
        "reconstruct",
        "encode + decode images with a tokenizer; --data reports PSNR/usage",
        add_reconstruct_arguments,
        run_reconstruct,
    ),
)
