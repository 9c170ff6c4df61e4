"""What several commands share: number types for argparse, the --data / --preset / sampler flag groups, image lists."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable, NamedTuple

from ..errors import MageError


class Command(NamedTuple):
    """One ``mage`` subcommand: its name and one-line help, its flags and what it runs (returns the exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


# --------------------------------------------------------------------------------------------------
# argparse types
# --------------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def number(kind: type, low: float, strict: bool = False, high: float | None = None) -> Callable[[str], float]:
    """argparse ``type=``: a finite number >= low (> low with strict) and <= high (when given); anything else
    (text, ``nan``, ``inf``, out of range) is a one-line usage error, exit 2."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got '{text}'"
            ) from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
        if v < low or (strict and v == low) or (high is not None and v > high):
            if high is not None:
                raise argparse.ArgumentTypeError(
                    f"must be {'>' if strict else '>='} {_fmt(low)} and <= {_fmt(high)} (got {text})"
                )
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {_fmt(low)} (got {text})")
        return v

    return parse


POSITIVE = number(int, 1)  # counts, batch sizes, epochs
NONNEG = number(float, 0)  # minutes (0 = no limit), guidance scales, weights
POSITIVE_F = number(float, 0, strict=True)
SEED = number(int, 0, high=2**63 - 1)  # every --seed: fits torch's and numpy's generators wherever it is mixed in


OUT_KINDS = ("file", "dir", "png-or-dir", "any")


def out_problem(path: str, kind: str) -> str | None:
    """Why ``path`` cannot be written as a ``kind`` (file | dir | png-or-dir: a .png file, else a folder |
    any), or None: an empty path, a path under a regular file, a file where a folder goes (or the reverse),
    a folder we may not write in. Checked before any work, so a long run never fails at its first save."""
    if kind not in OUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    if not path or not path.strip():
        return "the path is empty"
    if kind == "png-or-dir":
        kind = "file" if path.lower().endswith(".png") else "dir"
    full = os.path.abspath(path)
    if os.path.isdir(full):
        if kind == "file":
            return f"cannot write {path}: it is a folder, not a file"
        where = full
    elif os.path.exists(full):
        if kind == "dir":
            return f"cannot write {path}: it is a file, not a folder"
        where = os.path.dirname(full)
    else:
        where = os.path.dirname(full)
        while not os.path.exists(where) and os.path.dirname(where) != where:
            where = os.path.dirname(where)
        if not os.path.isdir(where):
            return f"cannot write {path}: {where} is a file, not a folder"
    if not os.access(where, os.W_OK | os.X_OK):
        return f"cannot write {path}: no permission to write in {where}"
    return None


def check_out(path: str, kind: str) -> str:
    """``path`` if it can be written as a ``kind`` (see :func:`out_problem`), else a one-line MageError."""
    problem = out_problem(path, kind)
    if problem:
        raise MageError(f"--out: {problem}" if problem == "the path is empty" else problem)
    return path


def out_path(kind: str) -> Callable[[str], str]:
    """argparse ``type=`` of an output path (see :func:`out_problem`): a bad one is a one-line usage error."""

    def parse(text: str) -> str:
        problem = out_problem(text, kind)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return text

    return parse


OUT_FILE, OUT_DIR, OUT_ANY = out_path("file"), out_path("dir"), out_path("any")


def int_list(text: str) -> list[int]:
    """argparse ``type=``: comma-separated integers >= 1, e.g. '1,2,5,10'."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 such as 1,2,5,10, got '{text}'")
    return vals


# --------------------------------------------------------------------------------------------------
# flag groups
# --------------------------------------------------------------------------------------------------
def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="fashion-mnist | mnist | folder:PATH | synthetic")
    p.add_argument("--data-dir", default=None, help="where the dataset files are (default: the installed location)")
    p.add_argument("--limit", type=POSITIVE, default=None, help="use only the first N images of each split")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        help="torch.compile the training step (default mode; or reduce-overhead = + CUDA graphs, "
        "max-autotune); falls back to eager with a warning if compiling fails",
    )


def add_config_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    """--preset NAME, --set KEY=VALUE (repeatable), and --max-minutes / --max-steps as shorthands for two of them."""
    p.add_argument("--preset", default=None, help=f"named config (default {default_preset}; a resumed run: its own)")
    p.set_defaults(default_preset=default_preset)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set lr=1e-4 (repeatable)",
    )
    p.add_argument("--max-minutes", type=NONNEG, default=None, help="stop (and save) after this wall-clock time")
    p.add_argument("--max-steps", type=POSITIVE, default=None, help="stop after this many optimizer steps")


def add_training_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    """What every trainer takes: the config flags, --out, --resume, --accum and --workers."""
    add_config_args(p, default_preset)
    p.add_argument("--out", type=OUT_DIR, required=True, help="run directory (checkpoints, log.jsonl, curve.png)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint, with its own settings and data "
        "(only --max-steps, --max-minutes and the logging cadence may change)",
    )
    p.add_argument(
        "--accum",
        type=POSITIVE,
        default=1,
        help="gradient accumulation: split each rank's share of the global batch into N micro-batches",
    )
    p.add_argument(
        "--workers",
        type=number(int, 0),
        default=None,
        help="DataLoader processes decoding images (default min(4, CPU cores); 0 = in the main process)",
    )


def training_config(args: argparse.Namespace, preset: Callable[[str], Any]) -> tuple[Any, dict]:
    """The config(s) of a trainer's run -- ``preset(name)`` gives a recipe or an (architecture, recipe) pair --
    and the run's saved data flags (run.json). A new run: --preset + --set. ``--resume`` of a run: its saved
    configs + --set (or --preset + --set, when given), checked against the saved ones by the engine; data flags
    left out are taken from the run, one that contradicts it is an error."""
    from ..config import apply_overrides
    from ..engine import saved_run

    saved = saved_run(args.out) if args.resume else None
    if saved is None:
        return apply_overrides(preset(args.preset or args.default_preset), overrides(args)), {}
    arch, recipe, run_args = saved
    for name, theirs in run_args.items():
        mine = getattr(args, name, None)
        if mine is None:
            setattr(args, name, theirs)
        elif theirs is not None and _same(mine) != _same(theirs):
            raise MageError(
                f"cannot resume {args.out}: it was trained with --{name.replace('_', '-')} {theirs}, "
                f"not {mine} (leave it out to use the run's own)"
            )
    if args.preset:
        base = preset(args.preset)
    else:
        base = preset(args.default_preset)
        base = (arch, recipe or base[1]) if isinstance(base, tuple) else arch
    return apply_overrides(base, overrides(args)), run_args


def _same(value):
    return os.path.abspath(value) if isinstance(value, str) and os.path.exists(value) else value


def workers(args: argparse.Namespace) -> int:
    from ..loader import default_workers

    return default_workers() if args.workers is None else args.workers


def overrides(args: argparse.Namespace) -> list[str]:
    """The KEY=VALUE overrides of :func:`add_config_args`' flags, --max-minutes / --max-steps last."""
    out = list(args.overrides)
    if getattr(args, "max_minutes", None) is not None:
        out.append(f"max_minutes={args.max_minutes}")
    if getattr(args, "max_steps", None) is not None:
        out.append(f"max_steps={args.max_steps}")
    return out


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """Sampler flags. Each one left out takes the model's recommended value (its ``sampler.json``, e.g. the
    released fashion-mnist model's), else the original's (20 steps, choice temperature 6.0, ...)."""
    p.add_argument("--steps", type=POSITIVE, default=None, help="decoding iterations (default: the model's, else 20)")
    p.add_argument("--temperature", type=POSITIVE_F, default=None, help="token sampling temperature (default 1)")
    p.add_argument(
        "--choice-temperature",
        type=NONNEG,
        default=None,
        help="Gumbel noise on confidences, annealed to 0 (default: the model's, else 6.0)",
    )
    p.add_argument("--schedule", default=None, help="cosine | linear | arccos")
    p.add_argument("--cfg", type=NONNEG, default=None, help="classifier-free guidance scale (default 0 = off)")
    p.add_argument("--cfg-schedule", default=None, help="constant | linear")
    p.add_argument("--seed", type=SEED, default=0, help="0 <= seed < 2**63 (default 0)")
    p.add_argument("--batch-size", type=POSITIVE, default=64)


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        default="fp32",
        help="fp32 | bf16 (stored in bf16: half the memory; bf16 math on bf16 hardware, fp32 math elsewhere)",
    )


def sampler_config(args: argparse.Namespace, model_dir: str | None = None):
    """The checked :class:`mage.sampler.SamplerConfig` of :func:`add_sampler_args`' flags; flags left out take
    the value of ``model_dir``'s recommended sampler (:func:`mage.sampler.model_sampler`)."""
    import dataclasses

    from ..sampler import model_sampler

    base = model_sampler(model_dir)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(base) if getattr(args, f.name, None) is not None}
    s = dataclasses.replace(base, **given)
    s.check()
    return s


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def image_files(path: str) -> list[str]:
    """One image file, or every image under a directory (the same scan as folder datasets)."""
    from pathlib import Path

    from ..data import _scan_images

    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise MageError(f"input not found: {path}")
    files = [os.path.join(path, rel) for rel in _scan_images(Path(path))]
    if not files:
        raise MageError(f"no images (png/jpg/jpeg/webp/bmp) in {path}")
    return files
