"""``mage bench``: throughput, memory and MFU of the main workloads (a benchmark, not a test)."""

from __future__ import annotations

import argparse

from .common import OUT_FILE, POSITIVE, Command, int_list


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", default="fmnist-32,vit-b", help="MAGE presets (each with its tokenizer), comma-separated"
    )
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument(
        "--precision",
        default="fp32,bf16",
        help="any of fp32, bf16 (autocast; skipped where it is emulated), "
        "w16 (inference with weights stored in bf16: half the weight memory)",
    )
    p.add_argument(
        "--gen-steps", type=int_list, default=[20], help="decoding steps of the generation workloads, e.g. 8,20"
    )
    p.add_argument("--workloads", default=None, help="subset of: train,train+tok,gen-S,encode,decode (default all)")
    p.add_argument(
        "--baseline", action="store_true", help="also run the original's way (fp32, explicit softmax) for ratios"
    )
    p.add_argument("--repeats", type=POSITIVE, default=2, help="timed calls per workload (after one warm-up)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time training and generation through torch.compile "
        "(mode 'compiled'; training as pretrain --compile, generation's forward with freezing)",
    )
    p.add_argument("--json", type=OUT_FILE, default=None, help="also write the rows as JSON")
    p.add_argument(
        "--agreement",
        default=None,
        metavar="MODEL",
        help="instead: generate the same seeds with a trained "
        "model in fp32 and on the fast path (bf16 autocast) and report the share of equal token ids",
    )
    p.add_argument("--judge", default=None, help="with --agreement: also the FID-like score (judge features) of both")
    p.add_argument("--num", type=POSITIVE, default=200, help="with --agreement: samples")


def run_bench(args: argparse.Namespace) -> int:
    from .. import bench

    if args.agreement:
        steps = args.gen_steps[0]
        r = bench.fast_path_agreement(args.agreement, num=args.num, steps=steps, judge=args.judge)
        line = (
            f"fast path ({r['fast_path']}) vs fp32, {r['num']} samples, {steps} steps: "
            f"token ids equal {r['token_agreement']:.2f}%"
        )
        if args.judge:
            line += (
                f"; FID-like (judge) fp32 {r['fid_like_fp32']:.2f}, fast {r['fid_like_fast']:.2f}, "
                f"fp32 with other seeds {r['fid_like_fp32_other_seeds']:.2f}"
            )
        print(line)
        if args.json:
            from ..checkpoint import atomic_write_json

            atomic_write_json(args.json, r)
        return 0
    res = bench.run_bench(
        args.preset.split(","),
        batch_size=args.batch_size,
        precisions=args.precision.split(","),
        gen_steps=args.gen_steps,
        baseline=args.baseline,
        workloads=args.workloads.split(",") if args.workloads else None,
        repeats=args.repeats,
        compile=args.compile,
    )
    if args.json:
        from ..checkpoint import atomic_write_json

        atomic_write_json(args.json, res)
    return 0


COMMANDS = (
    Command(
        "bench",
        "throughput, memory and MFU of training, generation, tokenizer (a benchmark, not a test)",
        add_bench_arguments,
        run_bench,
    ),
)
