"""``mage evaluate``: FID / KID / precision-recall, the FID-like judge score, class agreement, judge training."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import MageError
from .common import (
    NONNEG,
    OUT_ANY,
    OUT_FILE,
    POSITIVE,
    POSITIVE_F,
    Command,
    add_data_args,
    add_sampler_args,
    add_weights_arg,
    check_out,
    number,
    sampler_config,
)


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["fid", "agreement", "train-judge"])
    p.add_argument("--model", default=None, help="MAGE run directory whose samples are scored")
    p.add_argument(
        "--images", default=None, help="fid: score a real image set instead of a model (dataset spec; the floor)"
    )
    p.add_argument("--images-split", default="train")
    add_data_args(p, required=False)
    p.add_argument(
        "--num",
        "--num-samples",
        dest="num",
        type=number(int, 2),
        default=5000,
        help="fid: generated (or --images) count (default 5000); under torchrun write --num-samples "
        "(torchrun reads --num as its own --numa-binding)",
    )
    p.add_argument("--class-conditional", action="store_true", help="fid: sample classes in turn (balanced)")
    p.add_argument(
        "--metrics",
        default="fid,kid,pr",
        help="fid: what to compute besides FID: kid, pr (precision/recall); e.g. --metrics fid to skip both",
    )
    p.add_argument("--features", default="inception", help="inception (FID) | judge:DIR (FID-like, labelled so)")
    p.add_argument("--ref-split", default="test", help="fid: reference split of --data (default test)")
    p.add_argument("--ref-num", type=number(int, 2), default=None, help="fid: reference images (default --num)")
    p.add_argument("--ref-stats", default=None, help="fid: precomputed .npz with mu and sigma (e.g. ADM ImageNet 256)")
    p.add_argument("--ref-dir", default=None, help="fid: a folder of reference images (e.g. ImageNet val as PNG)")
    p.add_argument(
        "--image-size",
        type=POSITIVE,
        default=None,
        help="fid with --images: resolution real images are read at (default 32; a model sets its own)",
    )
    p.add_argument("--judge", default=None, help="agreement: judge directory from 'mage evaluate train-judge'")
    p.add_argument("--per-class", type=POSITIVE, default=100, help="agreement: samples per class (default 100)")
    p.add_argument("--grid", type=OUT_FILE, default=None, help="agreement: also save 10 samples per class as this PNG")
    p.add_argument("--epochs", type=POSITIVE_F, default=4, help="train-judge: epochs (default 4)")
    p.add_argument("--width", type=POSITIVE, default=32, help="train-judge: channels of the first stage (default 32)")
    p.add_argument("--max-minutes", type=NONNEG, default=0.0, help="train-judge: wall-clock limit (0 = none)")
    p.add_argument(
        "--through-tokenizer",
        default=None,
        metavar="TOKENIZER",
        help="train-judge: train and test on this tokenizer's reconstructions (the recognition ceiling of its tokens); "
        "fid with --images: score the reconstructions (rFID)",
    )
    add_sampler_args(p)
    add_weights_arg(p)
    p.add_argument("--out", type=OUT_ANY, default=None, help="fid/agreement: JSON file; train-judge: judge directory")
    p.add_argument("--json", action="store_true", help="print the full JSON instead of one line")


def run_evaluate(args: argparse.Namespace) -> int:
    from .. import evaluate as ev

    if args.out:
        check_out(args.out, "dir" if args.kind == "train-judge" else "file")
    if args.kind != "fid" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MageError(f"only 'mage evaluate fid' shares its work over torchrun ranks: run {args.kind} as one process")
    if args.kind == "train-judge":
        if not args.out:
            raise MageError("train-judge needs --out DIR")
        m = ev.train_judge(
            args.data,
            out=args.out,
            epochs=args.epochs,
            width=args.width,
            batch_size=args.batch_size,
            max_minutes=args.max_minutes,
            data_dir=args.data_dir,
            seed=args.seed,
            through_tokenizer=args.through_tokenizer,
            metrics=args.metrics,
        )
        what = f"{args.data} through {args.through_tokenizer}" if args.through_tokenizer else args.data
        print(
            json.dumps(m)
            if args.json
            else f"judge trained on {what}: test accuracy {m['test_accuracy']:.2f}% "
            f"({m['steps']} steps, {m['seconds']:.0f} s) -> {args.out}"
        )
        return 0
    if args.kind == "agreement":
        if not args.model or not args.judge:
            raise MageError("agreement needs --model DIR and --judge DIR")
        sampler = sampler_config(args, args.model)
        r = ev.class_agreement(
            args.model,
            judge=args.judge,
            per_class=args.per_class,
            sampler=sampler,
            seed=args.seed,
            batch_size=args.batch_size,
            grid=args.grid,
            weights=args.weights,
        )
        line = (
            f"class agreement {r['agreement']:.2f}% over {r['num']} samples ({args.per_class} per class, "
            f"cfg {sampler.cfg}, {sampler.steps} steps, temperature {sampler.temperature}) "
            f"| judge test accuracy {r['judge_test_accuracy']:.2f}%"
        )
    else:
        r = ev.evaluate_fid(
            model=args.model,
            data=args.data,
            num=args.num,
            class_conditional=args.class_conditional,
            sampler=sampler_config(args, args.model),
            seed=args.seed,
            features=args.features,
            ref_split=args.ref_split,
            ref_num=args.ref_num,
            ref_stats=args.ref_stats,
            ref_dir=args.ref_dir,
            images=args.images,
            images_split=args.images_split,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            weights=args.weights,
            through_tokenizer=args.through_tokenizer,
            metrics=args.metrics,
        )
        line = ev.fid_line(r)
    from ..distributed import init_distributed, main_first

    info = init_distributed()
    # every rank holds the same result; rank 0 alone writes and prints it, the others wait for it
    with main_first(info):
        if info.is_main:
            if args.out:
                from ..checkpoint import atomic_write_json

                atomic_write_json(args.out, r)
            print(json.dumps(r) if args.json else line)
    return 0


COMMANDS = (
    Command(
        "evaluate",
        "FID / KID / precision-recall, FID-like score, class agreement, judge training",
        add_evaluate_arguments,
        run_evaluate,
    ),
)
