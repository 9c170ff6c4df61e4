"""``mage demo``: the main job: show the released Fashion-MNIST model, train one here with the time left, report."""

from __future__ import annotations

import argparse

from .common import OUT_DIR, POSITIVE_F, Command


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=OUT_DIR, default="runs/demo")
    p.add_argument("--budget", type=POSITIVE_F, default=15.0, help="wall-clock minutes for everything (default 15)")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--model",
        default="fashion-mnist",
        help="the released model shown first, whose tokenizer and judge the trained part uses (default fashion-mnist)",
    )
    p.add_argument(
        "--train-tokenizer",
        action="store_true",
        help="also train the tokenizer here (part of the budget) instead of using the released one",
    )


def run_demo(args: argparse.Namespace) -> int:
    from .. import demo

    report = demo.run_demo(
        args.out,
        budget_minutes=args.budget,
        fresh=args.fresh,
        data_dir=args.data_dir,
        train_tokenizer=args.train_tokenizer,
        release=args.model,
    )
    print(f"report: {report}")
    return 0


COMMANDS = (
    Command(
        "demo",
        "the main job: the released Fashion-MNIST model, then one trained here, in one report",
        add_demo_arguments,
        run_demo,
    ),
)
