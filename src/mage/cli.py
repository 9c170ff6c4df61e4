"""The ``mage`` command line. Each subcommand is a thin wrapper over the Python API.

Errors a user can fix print one line (``mage: error: ...``) and exit 2; set MAGE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from .errors import MageError

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str):
    def wrap(fn):
        COMMANDS[name] = fn
        return fn
    return wrap


def _number(kind: type, low: float, strict: bool = False) -> Callable[[str], float]:
    """argparse ``type=``: a number >= low (> low with strict); anything else is a one-line usage error, exit 2."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got '{text}'") from None
        if v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g} (got {text})")
        return v
    return parse


POSITIVE = _number(int, 1)          # counts, batch sizes, epochs
NONNEG = _number(float, 0)          # minutes (0 = no limit), guidance scales, weights
POSITIVE_F = _number(float, 0, strict=True)


def _int_list(text: str) -> list[int]:
    """argparse ``type=``: comma-separated integers >= 1, e.g. '1,2,5,10'."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 such as 1,2,5,10, got '{text}'")
    return vals


def _data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="fashion-mnist | mnist | folder:PATH | synthetic")
    p.add_argument("--data-dir", default=None, help="where the dataset files are (default: the installed location)")
    p.add_argument("--limit", type=POSITIVE, default=None, help="use only the first N images of each split")


def _compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the training step (default mode; or reduce-overhead = + CUDA graphs, "
                        "max-autotune); falls back to eager with a warning if compiling fails")


def _config_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--preset", default=default_preset, help=f"named config (default {default_preset})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set lr=1e-4 (repeatable)")
    p.add_argument("--max-minutes", type=NONNEG, default=None, help="stop (and save) after this wall-clock time")
    p.add_argument("--max-steps", type=POSITIVE, default=None, help="stop after this many optimizer steps")


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if getattr(args, "max_minutes", None) is not None:
        out.append(f"max_minutes={args.max_minutes}")
    if getattr(args, "max_steps", None) is not None:
        out.append(f"max_steps={args.max_steps}")
    return out


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------
@command("train-tokenizer")
def _train_tokenizer(args: argparse.Namespace) -> int:
    from .config import apply_overrides, tokenizer_preset
    from .data import load_dataset
    from .train_tokenizer import train_tokenizer

    cfg = apply_overrides(tokenizer_preset(args.preset), _overrides(args))
    train = load_dataset(args.data, "train", cfg.image_size, cfg.data_augment, args.data_dir, cfg.seed, args.limit)
    val = load_dataset(args.data, "val", cfg.image_size, "none", args.data_dir, cfg.seed,
                       args.limit if args.limit else 2000)
    m = train_tokenizer(cfg, train, args.out, val, resume=args.resume)
    print(f"tokenizer saved to {args.out}: val PSNR {m['psnr']:.2f} dB, codebook usage {m['usage']:.1f}%, "
          f"perplexity {m['perplexity']:.1f}, position entropy {m['position_entropy']:.2f} nats "
          f"({m['step']} steps, {m['train_minutes']:.1f} min)")
    return 0


@command("reconstruct")
def _reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .data import load_dataset
    from .train_tokenizer import reconstruction_metrics
    from .transforms import build_transform, load_image, save_image
    from .vqgan import VQTokenizer

    if args.input is None and args.data is None:
        raise MageError("give --input IMG_OR_DIR and/or --data D")
    tok = VQTokenizer.from_pretrained(args.tokenizer)
    if args.input is not None:
        if args.out is None:
            raise MageError("--out is required with --input")
        tf = build_transform(tok.config.image_size, train=False, augment="none")
        files = _image_files(args.input)
        single = os.path.isfile(args.input)
        for f in files:
            x = tf(load_image(f))[None]
            with torch.no_grad():
                rec = tok.decode(tok.encode(x)).clamp(0, 1)
            dst = args.out if single else os.path.join(args.out, os.path.splitext(os.path.relpath(f, args.input))[0] + ".png")
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            save_image(torch.cat([x, rec]) if args.side_by_side else rec[0], dst)
        print(f"wrote {len(files)} reconstruction(s) to {args.out}")
    if args.data is not None:
        ds = load_dataset(args.data, args.split, tok.config.image_size, "none", args.data_dir, 0, args.limit)
        m = reconstruction_metrics(tok, ds, progress=True)
        m.update(data=args.data, split=args.split)
        print(json.dumps(m) if args.json else
              f"{args.data} {args.split} ({m['images']} images): PSNR {m['psnr']:.2f} dB, codebook usage {m['usage']:.1f}%, "
              f"perplexity {m['perplexity']:.1f}, position entropy {m['position_entropy']:.2f} nats")
    return 0


def _image_files(path: str) -> list[str]:
    """One image file, or every image under a directory (the same scan as folder datasets)."""
    from pathlib import Path

    from .data import _scan_images

    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise MageError(f"input not found: {path}")
    files = [os.path.join(path, rel) for rel in _scan_images(Path(path))]
    if not files:
        raise MageError(f"no images (png/jpg/jpeg/webp/bmp) in {path}")
    return files


# --------------------------------------------------------------------------------------------------
# MAGE pre-training
# --------------------------------------------------------------------------------------------------
@command("cache-tokens")
def _cache_tokens(args: argparse.Namespace) -> int:
    from .tokens import cache_tokens

    path = cache_tokens(args.tokenizer, args.data, args.out, split=args.split, data_dir=args.data_dir,
                        limit=args.limit, flip=not args.no_flip, batch_size=args.batch_size,
                        crops=args.crops, crop_scale=args.crop_scale)
    print(f"token cache written to {path}")
    return 0


@command("pretrain")
def _pretrain(args: argparse.Namespace) -> int:
    from .config import apply_overrides, mage_preset
    from .pretrain import pretrain

    cfg = apply_overrides(mage_preset(args.preset), _overrides(args))
    if args.class_conditional:
        cfg.num_classes = -1  # resolved from the data
    if args.contrastive:
        cfg.contrastive_weight = cfg.contrastive_weight or 0.1
    if args.compile is not None:
        cfg.compile = args.compile
    res = pretrain(cfg, out=args.out, data=args.data, tokenizer=args.tokenizer, cache=args.cache,
                   data_dir=args.data_dir, limit=args.limit, resume=args.resume, init=args.init)
    print(f"MAGE saved to {args.out}: step {res['step']}, loss {res['loss']:.4f}, masked-token acc {100 * res['acc']:.2f}%")
    return 0


def _load_for_model(pipe, path: str):
    """An image file -> [3,S,S] at the model's resolution (same transform as training), plus its original size."""
    from .transforms import build_transform, load_image

    img = load_image(path)
    return build_transform(pipe.tokenizer.config.image_size, train=False, augment="none"), img


@command("inpaint")
def _inpaint(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import MAGEPipeline, inpaint
    from .transforms import load_image, save_image

    sampler = _sampler(args)
    pipe = MAGEPipeline.from_pretrained(args.model, weights=args.weights)
    tf, img = _load_for_model(pipe, args.image)
    H, W = img.shape[-2:]
    if (args.mask is None) == (args.box is None):
        raise MageError("give exactly one of --mask PNG or --box x0,y0,x1,y1")
    if args.mask is not None:
        m = load_image(args.mask)
        if tuple(m.shape[-2:]) != (H, W):
            raise MageError(f"mask is {m.shape[-1]}x{m.shape[-2]} but the image is {W}x{H}")
        mask = m.mean(0) > 0.5                                                    # white = regenerate
    else:
        try:
            x0, y0, x1, y1 = (int(v) for v in args.box.split(","))
        except ValueError:
            raise MageError(f"bad --box '{args.box}': expected x0,y0,x1,y1 in pixels") from None
        if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise MageError(f"box {args.box} is not inside the {W}x{H} image")
        mask = torch.zeros(H, W, dtype=torch.bool)
        mask[y0:y1, x0:x1] = True
    x = tf(img)
    mk = tf(mask.float()[None].expand(3, -1, -1))[0] > 0                        # same geometry as the image
    out = inpaint(pipe, x, mk, args.class_label, sampler, args.seed, args.feather)
    save_image(out, args.out)
    print(f"wrote {args.out}")
    return 0


@command("outpaint")
def _outpaint(args: argparse.Namespace) -> int:
    from .pipeline import MAGEPipeline, outpaint
    from .transforms import save_image

    sampler = _sampler(args)
    ext = {"left": 0, "right": 0, "top": 0, "bottom": 0}
    for part in args.extend.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in ext or not v.strip().isdigit():
            raise MageError(f"bad --extend '{args.extend}': expected e.g. left=8,right=8,top=0,bottom=16")
        ext[k.strip()] = int(v)
    pipe = MAGEPipeline.from_pretrained(args.model, weights=args.weights)
    tf, img = _load_for_model(pipe, args.image)
    out = outpaint(pipe, tf(img), class_label=args.class_label, sampler=sampler, seed=args.seed, **ext)
    save_image(out, args.out)
    print(f"wrote {args.out} ({out.shape[-1]}x{out.shape[-2]})")
    return 0


# --------------------------------------------------------------------------------------------------
# recognition
# --------------------------------------------------------------------------------------------------
@command("embed")
def _embed(args: argparse.Namespace) -> int:
    from .recognition import embed_dataset, save_features

    if not args.out.endswith((".npz", ".safetensors")):
        raise MageError(f"--out must end in .npz or .safetensors (got {args.out})")
    r = embed_dataset(args.model, args.data, args.split, args.pool, args.data_dir, args.limit)
    if args.out.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({"features": r["features"].contiguous(), "labels": r["labels"]}, args.out,
                  metadata={"classes": json.dumps(r["classes"])})
    else:
        save_features(r, args.out)
    print(f"wrote {r['features'].shape[0]} x {r['features'].shape[1]} features to {args.out}")
    return 0


@command("probe")
def _probe(args: argparse.Namespace) -> int:
    import torch

    from .recognition import accuracy, cached_features, few_shot, is_baseline, save_classifier, train_probe

    tr = cached_features(args.model, args.data, "train", args.pool, args.data_dir, args.limit)
    te = cached_features(args.model, args.data, "test", args.pool, args.data_dir, args.limit)
    if tr["labels"].min() < 0:
        raise MageError(f"{args.data} has no labels: probing needs a labelled dataset")
    C = int(tr["labels"].max()) + 1
    if args.kind == "linear":
        head = train_probe(tr["features"], tr["labels"], C, epochs=args.epochs, blr=args.blr, batch_size=args.batch_size,
                           optimizer=args.optimizer)
        with torch.no_grad():
            logits = head(te["features"])
        m = {"top1": accuracy(logits, te["labels"], 1)}
        if C > 5:
            m["top5"] = accuracy(logits, te["labels"], 5)
        save = bool(args.out) and not is_baseline(args.model)
        if save:
            from .vqgan import VQTokenizer
            size = VQTokenizer.from_pretrained(os.path.join(args.model, "tokenizer")).config.image_size
            save_classifier(args.out, head, args.model, args.pool, tr["classes"], size, m)
        print(json.dumps(m) if args.json else
              f"linear probe on {args.data} test: top-1 {m['top1']:.2f}%" + (f", top-5 {m['top5']:.2f}%" if "top5" in m else "")
              + (f" (classifier saved to {args.out})" if save else ""))
    else:
        r = few_shot(tr["features"], tr["labels"], te["features"], te["labels"], args.shots, args.draws, args.seed)
        if args.json:
            print(json.dumps(r))
        else:
            for k, v in r.items():
                print(f"{k}-shot: logistic regression {v['logreg_mean']:.2f} +- {v['logreg_std']:.2f}%, "
                      f"cosine prototypes {v['proto_mean']:.2f} +- {v['proto_std']:.2f}%  ({args.draws} draws)")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "few_shot.json"), "w") as f:
                json.dump(r, f, indent=2)
    return 0


@command("finetune")
def _finetune(args: argparse.Namespace) -> int:
    from .config import apply_overrides, finetune_preset
    from .finetune import finetune

    cfg = apply_overrides(finetune_preset(args.preset), _overrides(args))
    if args.compile is not None:
        cfg.compile = args.compile
    r = finetune(cfg, args.model, args.out, args.data, args.cache, args.data_dir, args.limit, args.resume)
    if "top1" in r:
        print(f"fine-tuned {r['step']} steps in {r['minutes']:.1f} min: test top-1 {r['top1']:.2f}%"
              + (f", top-5 {r['top5']:.2f}%" if "top5" in r else "") + f" (classifier: {args.out})")
    return 0


@command("classify")
def _classify(args: argparse.Namespace) -> int:
    from .recognition import Classifier
    from .transforms import build_transform, load_image

    clf = Classifier(args.classifier)
    tf = build_transform(clf.meta["image_size"], train=False, augment="none")
    results = []
    for path in [f for item in args.images for f in (_image_files(item) if os.path.isdir(item) else [item])]:
        x = tf(load_image(path))[None]
        p = clf.predict(x)[0]
        top = p.topk(min(args.top, p.numel()))
        results.append({"image": path, "top": [{"class": clf.classes[i], "prob": float(v)} for v, i in zip(top.values.tolist(), top.indices.tolist())]})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["image"] + ": " + ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"]))
    return 0


@command("bench")
def _bench(args: argparse.Namespace) -> int:
    from .bench import fast_path_agreement, run_bench

    if args.agreement:
        steps = args.gen_steps[0]
        r = fast_path_agreement(args.agreement, num=args.num, steps=steps, judge=args.judge)
        line = f"fast path ({r['fast_path']}) vs fp32, {r['num']} samples, {steps} steps: token ids equal {r['token_agreement']:.2f}%"
        if args.judge:
            line += (f"; FID-like (judge) fp32 {r['fid_like_fp32']:.2f}, fast {r['fid_like_fast']:.2f}, "
                     f"fp32 with other seeds {r['fid_like_fp32_other_seeds']:.2f}")
        print(line)
        if args.json:
            from .checkpoint import atomic_write_json
            atomic_write_json(args.json, r)
        return 0
    res = run_bench(args.preset.split(","), args.batch_size, args.precision.split(","),
                    args.gen_steps, args.baseline,
                    args.workloads.split(",") if args.workloads else None, args.repeats, args.compile)
    if args.json:
        from .checkpoint import atomic_write_json
        atomic_write_json(args.json, res)
    return 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.out, budget_minutes=args.budget, fresh=args.fresh, data_dir=args.data_dir)
    print(f"report: {report}")
    return 0


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    from . import evaluate as ev

    if args.kind == "train-judge":
        if not args.out:
            raise MageError("train-judge needs --out DIR")
        m = ev.train_judge(args.data, args.out, epochs=args.epochs, width=args.width, batch_size=args.batch_size,
                           max_minutes=args.max_minutes, data_dir=args.data_dir, seed=args.seed,
                           through_tokenizer=args.through_tokenizer)
        what = f"{args.data} through {args.through_tokenizer}" if args.through_tokenizer else args.data
        print(json.dumps(m) if args.json else
              f"judge trained on {what}: test accuracy {m['test_accuracy']:.2f}% ({m['steps']} steps, {m['seconds']:.0f} s) -> {args.out}")
        return 0
    if args.kind == "agreement":
        if not args.model or not args.judge:
            raise MageError("agreement needs --model DIR and --judge DIR")
        r = ev.class_agreement(args.model, args.judge, args.per_class, _sampler(args), args.seed, args.batch_size, args.grid,
                               weights=args.weights)
        line = (f"class agreement {r['agreement']:.2f}% over {r['num']} samples ({args.per_class} per class, "
                f"cfg {args.cfg}, {args.steps} steps) | judge test accuracy {r['judge_test_accuracy']:.2f}%")
    else:
        r = ev.evaluate_fid(args.model, args.data, args.num, args.class_conditional, _sampler(args), args.seed, args.features,
                            args.ref_split, args.ref_num, args.ref_stats, args.ref_dir, args.images, args.images_split,
                            args.data_dir, args.batch_size, image_size=args.image_size, weights=args.weights)
        line = ev.fid_line(r)
    if args.out:
        from .checkpoint import atomic_write_json
        atomic_write_json(args.out, r)
    print(json.dumps(r) if args.json else line)
    return 0


@command("import-official")
def _import_official(args: argparse.Namespace) -> int:
    from .importer import import_official

    rep = import_official(args.mage, args.vqgan, args.out, args.num_heads, args.decoder_num_heads)
    print(rep)
    return 0


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------
def _sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=POSITIVE, default=20, help="decoding iterations (default 20, as the original)")
    p.add_argument("--temperature", type=float, default=1.0, help="token sampling temperature (default 1)")
    p.add_argument("--choice-temperature", type=float, default=6.0, help="Gumbel noise on confidences, annealed to 0 (default 6.0)")
    p.add_argument("--schedule", default="cosine", help="cosine | linear | arccos")
    p.add_argument("--cfg", type=NONNEG, default=0.0, help="classifier-free guidance scale (0 = off)")
    p.add_argument("--cfg-schedule", default="constant", help="constant | linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=POSITIVE, default=64)


def _weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="fp32", help="fp32 | bf16 (stored in bf16: half the memory; bf16 math on bf16 "
                   "hardware, fp32 math elsewhere)")


def _sampler(args: argparse.Namespace):
    from .sampler import SamplerConfig

    s = SamplerConfig(args.steps, args.temperature, args.choice_temperature, args.schedule, args.cfg, args.cfg_schedule)
    s.check()
    return s


def _write_images(images, out: str, nrow: int | None = None) -> None:
    from .transforms import save_image

    if out.lower().endswith(".png"):
        save_image(images, out, nrow=nrow)
    else:
        os.makedirs(out, exist_ok=True)
        for i, im in enumerate(images):
            save_image(im, os.path.join(out, f"{i:05d}.png"))


@command("generate")
def _generate(args: argparse.Namespace) -> int:
    from .pipeline import MAGEPipeline

    sampler = _sampler(args)
    pipe = MAGEPipeline.from_pretrained(args.model, weights=args.weights)
    if args.classes == "all":
        images = pipe.generate_per_class(args.num, sampler, args.seed, args.batch_size)
        nrow = args.num
    elif args.classes is not None:
        raise MageError("--classes takes 'all' (use --class C for one class)")
    else:
        images = pipe.generate(args.num, args.class_label, sampler, args.seed, args.batch_size)
        nrow = None
    _write_images(images, args.out, nrow)
    print(f"wrote {images.shape[0]} image(s) to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------
POOL_HELP = ("mean (over image tokens, the original's probe; default) | cls (position 0) | "
             "flat (every image token's feature in raster order, L*D dims: keeps the layout)")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line too (``mage: error: ... (see 'mage CMD --help')``), exit 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"mage: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mage", description="MAGE: masked generative encoder (generation + recognition)")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("train-tokenizer", help="train a VQGAN tokenizer on a dataset")
    _data_args(p)
    _config_args(p, "fmnist-32")
    p.add_argument("--out", required=True, help="run directory (checkpoints, grids, log)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")

    p = sub.add_parser("reconstruct", help="encode + decode images with a tokenizer; --data reports PSNR/usage")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or original .ckpt/.pth")
    p.add_argument("--input", default=None, help="an image or a directory of images")
    p.add_argument("--out", default=None, help="output image (single input) or directory")
    p.add_argument("--side-by-side", action="store_true", help="write input and reconstruction together")
    _data_args(p, required=False)
    p.add_argument("--split", default="test")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cache-tokens", help="pre-tokenize a dataset (with horizontal-flip copies)")
    p.add_argument("--tokenizer", required=True)
    _data_args(p)
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="cache file (.safetensors)")
    p.add_argument("--no-flip", action="store_true", help="do not add horizontally flipped copies")
    p.add_argument("--crops", type=int, default=0, help="also cache K random-resized-crop views per image "
                   "(the original's augmentation; pre-training draws one view per step)")
    p.add_argument("--crop-scale", type=float, default=0.2, help="smallest crop area fraction (default 0.2, the original's)")
    p.add_argument("--batch-size", type=POSITIVE, default=256)

    p = sub.add_parser("pretrain", help="pre-train MAGE by masked token modeling")
    _data_args(p, required=False)
    _config_args(p, "fmnist-32")
    p.add_argument("--tokenizer", default=None, help="tokenizer (needed unless --cache holds everything)")
    p.add_argument("--cache", default=None, help="token cache from 'mage cache-tokens'")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init", default=None, help="start from these MAGE weights (e.g. to fine-tune a generator)")
    p.add_argument("--class-conditional", action="store_true", help="learn a class embedding (label dropout for CFG)")
    p.add_argument("--contrastive", action="store_true", help="MAGE-C: add the InfoNCE loss")
    _compile_arg(p)

    p = sub.add_parser("import-official", help="convert the released MAGE / VQGAN checkpoints")
    p.add_argument("--mage", default=None, help="original MAGE .pth ({'model': ...})")
    p.add_argument("--vqgan", default=None, help="original vqgan_jax_strongaug.ckpt (else taken from the MAGE file)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-heads", type=POSITIVE, default=None, help="encoder heads (known for the released widths)")
    p.add_argument("--decoder-num-heads", type=POSITIVE, default=None)

    p = sub.add_parser("generate", help="sample images from scratch (optionally of a class)")
    p.add_argument("--model", required=True, help="MAGE run or checkpoint directory")
    p.add_argument("--num", type=POSITIVE, default=16, help="images (per class with --classes all)")
    p.add_argument("--class", dest="class_label", default=None, help="class id or name (class-conditional models)")
    p.add_argument("--classes", default=None, help="'all': --num images of every class, one row per class")
    _sampler_args(p)
    _weights_arg(p)
    p.add_argument("--out", required=True, help="a .png grid, or a folder of PNGs")

    p = sub.add_parser("inpaint", help="regenerate a region of an image (remove, or replace with --class)")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--mask", default=None, help="PNG of the image's size, white = regenerate")
    p.add_argument("--box", default=None, help="x0,y0,x1,y1 in the image's pixels")
    p.add_argument("--class", dest="class_label", default=None, help="fill with this class (replace)")
    p.add_argument("--feather", type=_number(int, 0), default=0, help="soften the paste-back edge inside the mask (pixels)")
    _sampler_args(p)
    _weights_arg(p)
    p.add_argument("--out", required=True)

    p = sub.add_parser("outpaint", help="extend the canvas (uncrop) on any side")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--extend", required=True, help="left=N,right=N,top=N,bottom=N (pixels at the model's resolution)")
    p.add_argument("--class", dest="class_label", default=None)
    _sampler_args(p)
    _weights_arg(p)
    p.add_argument("--out", required=True)

    p = sub.add_parser("embed", help="one feature vector per image (mean-pooled encoder output)")
    p.add_argument("--model", required=True, help="MAGE run directory, or a baseline: 'pixels' | 'codes:TOKENIZER'")
    _data_args(p)
    p.add_argument("--split", default="train")
    p.add_argument("--pool", default="mean", help=POOL_HELP)
    p.add_argument("--out", required=True, help=".npz or .safetensors")

    p = sub.add_parser("probe", help="linear probe or few-shot evaluation on frozen features")
    p.add_argument("kind", choices=["linear", "few-shot"])
    p.add_argument("--model", required=True, help="MAGE run directory, or a baseline without MAGE: 'pixels' (raw "
                   "pixels) | 'codes:TOKENIZER' (every token's code vector: what the tokens alone hold)")
    _data_args(p)
    p.add_argument("--pool", default="mean", help=POOL_HELP)
    p.add_argument("--out", default=None, help="where to save the classifier (linear) / results (few-shot)")
    p.add_argument("--epochs", type=POSITIVE, default=90)
    p.add_argument("--blr", type=POSITIVE_F, default=0.1)
    p.add_argument("--optimizer", default="sgd", help="sgd (default) | lars (the original's, for batch 4096)")
    p.add_argument("--batch-size", type=POSITIVE, default=256)
    p.add_argument("--shots", type=_int_list, default=[1, 2, 5, 10], help="shots per class, e.g. 1,2,5,10")
    p.add_argument("--draws", type=POSITIVE, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("finetune", help="fine-tune the whole encoder with a classification head")
    p.add_argument("--model", required=True, help="pre-trained MAGE run directory")
    _data_args(p, required=False)
    _config_args(p, "fmnist-32")
    p.add_argument("--cache", default=None, help="token cache of the labelled train split (else --data, tokenized on the fly)")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    _compile_arg(p)

    p = sub.add_parser("classify", help="top classes of images with a saved classifier")
    p.add_argument("--classifier", required=True)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--top", type=POSITIVE, default=3)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="throughput, memory and MFU of training, generation, tokenizer (a benchmark, not a test)")
    p.add_argument("--preset", default="fmnist-32,vit-b", help="MAGE presets (each with its tokenizer), comma-separated")
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--precision", default="fp32,bf16", help="any of fp32, bf16 (autocast; skipped where it is emulated), "
                   "w16 (inference with weights stored in bf16: half the weight memory)")
    p.add_argument("--gen-steps", type=_int_list, default=[20], help="decoding steps of the generation workloads, e.g. 8,20")
    p.add_argument("--workloads", default=None, help="subset of: train,train+tok,gen-S,encode,decode (default all)")
    p.add_argument("--baseline", action="store_true", help="also run the original's way (fp32, explicit softmax) for ratios")
    p.add_argument("--repeats", type=POSITIVE, default=2, help="timed calls per workload (after one warm-up)")
    p.add_argument("--compile", action="store_true", help="also time training and generation through torch.compile "
                   "(mode 'compiled'; training as pretrain --compile, generation's forward with freezing)")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("--agreement", default=None, metavar="MODEL", help="instead: generate the same seeds with a trained "
                   "model in fp32 and on the fast path (bf16 autocast) and report the share of equal token ids")
    p.add_argument("--judge", default=None, help="with --agreement: also the FID-like score (judge features) of both")
    p.add_argument("--num", type=POSITIVE, default=200, help="with --agreement: samples")

    p = sub.add_parser("evaluate", help="FID / KID / precision-recall, FID-like score, class agreement, judge training")
    p.add_argument("kind", choices=["fid", "agreement", "train-judge"])
    p.add_argument("--model", default=None, help="MAGE run directory whose samples are scored")
    p.add_argument("--images", default=None, help="fid: score a real image set instead of a model (dataset spec; the floor)")
    p.add_argument("--images-split", default="train")
    _data_args(p, required=False)
    p.add_argument("--num", type=_number(int, 2), default=5000, help="fid: generated (or --images) count (default 5000)")
    p.add_argument("--class-conditional", action="store_true", help="fid: sample classes in turn (balanced)")
    p.add_argument("--features", default="inception", help="inception (FID) | judge:DIR (FID-like, labelled so)")
    p.add_argument("--ref-split", default="test", help="fid: reference split of --data (default test)")
    p.add_argument("--ref-num", type=_number(int, 2), default=None, help="fid: reference images (default --num)")
    p.add_argument("--ref-stats", default=None, help="fid: precomputed .npz with mu and sigma (e.g. ADM ImageNet 256)")
    p.add_argument("--ref-dir", default=None, help="fid: a folder of reference images (e.g. ImageNet val as PNG)")
    p.add_argument("--image-size", type=POSITIVE, default=None,
                   help="fid with --images: resolution real images are read at (default 32; a model sets its own)")
    p.add_argument("--judge", default=None, help="agreement: judge directory from 'mage evaluate train-judge'")
    p.add_argument("--per-class", type=POSITIVE, default=100, help="agreement: samples per class (default 100)")
    p.add_argument("--grid", default=None, help="agreement: also save 10 samples per class as this PNG")
    p.add_argument("--epochs", type=POSITIVE_F, default=4, help="train-judge: epochs (default 4)")
    p.add_argument("--width", type=POSITIVE, default=32, help="train-judge: channels of the first stage (default 32)")
    p.add_argument("--max-minutes", type=NONNEG, default=0.0, help="train-judge: wall-clock limit (0 = none)")
    p.add_argument("--through-tokenizer", default=None, metavar="TOKENIZER",
                   help="train-judge: train and test on this tokenizer's reconstructions (the recognition ceiling of its tokens)")
    _sampler_args(p)
    _weights_arg(p)
    p.add_argument("--out", default=None, help="fid/agreement: JSON file; train-judge: judge directory")
    p.add_argument("--json", action="store_true", help="print the full JSON instead of one line")

    p = sub.add_parser("demo", help="the main job: train + evaluate on Fashion-MNIST, write a report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--budget", type=POSITIVE_F, default=15.0, help="wall-clock minutes for everything (default 15)")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
    p.add_argument("--data-dir", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.cmd](args) or 0
    except MageError as e:
        print(f"mage: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mage: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for users; MAGE_DEBUG=1 shows it
        if os.environ.get("MAGE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"mage: error: {type(e).__name__}: {msg} (set MAGE_DEBUG=1 for details)", file=sys.stderr)
        return 1
