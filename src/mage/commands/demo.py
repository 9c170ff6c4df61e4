"""``mage demo``: the main job, train + evaluate on Fashion-MNIST in a time budget and write a report."""

from __future__ import annotations

import argparse

from .common import OUT_DIR, POSITIVE_F, Command


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=OUT_DIR, default="runs/demo")
    p.add_argument("--budget", type=POSITIVE_F, default=15.0, help="wall-clock minutes for everything (default 15)")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
    p.add_argument("--data-dir", default=None)


def run_demo(args: argparse.Namespace) -> int:
    from .. import demo

    report = demo.run_demo(args.out, budget_minutes=args.budget, fresh=args.fresh, data_dir=args.data_dir)
    print(f"report: {report}")
    return 0


COMMANDS = (
    Command("demo", "the main job: train + evaluate on Fashion-MNIST, write a report", add_demo_arguments, run_demo),
)
