"""``mage generate``, ``mage inpaint`` and ``mage outpaint``: images from a trained MAGE."""

from __future__ import annotations

import argparse
import os

from ..errors import MageError
from .common import OUT_FILE, POSITIVE, Command, add_sampler_args, add_weights_arg, number, out_path, sampler_config


def _write_images(images, out: str, nrow: int | None = None) -> None:
    """A .png grid, or one PNG per image in the folder ``out``."""
    from ..transforms import save_image

    if out.lower().endswith(".png"):
        save_image(images, out, nrow=nrow)
    else:
        os.makedirs(out, exist_ok=True)
        for i, im in enumerate(images):
            save_image(im, os.path.join(out, f"{i:05d}.png"))


def _load_for_model(pipe, path: str):
    """An image file -> [3,S,S] at the model's resolution (same transform as training), plus its original size."""
    from ..transforms import build_transform, load_image

    img = load_image(path)
    return build_transform(pipe.tokenizer.config.image_size, train=False, augment="none"), img


# --------------------------------------------------------------------------------------------------
# mage generate
# --------------------------------------------------------------------------------------------------
def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="MAGE run or checkpoint directory")
    p.add_argument("--num", type=POSITIVE, default=16, help="images (per class with --classes all)")
    p.add_argument("--class", dest="class_label", default=None, help="class id or name (class-conditional models)")
    p.add_argument("--classes", default=None, help="'all': --num images of every class, one row per class")
    add_sampler_args(p)
    add_weights_arg(p)
    p.add_argument("--out", type=out_path("png-or-dir"), required=True, help="a .png grid, or a folder of PNGs")


def run_generate(args: argparse.Namespace) -> int:
    from ..pipeline import MAGEPipeline

    sampler = sampler_config(args, args.model)
    pipe = MAGEPipeline.from_pretrained(args.model, weights=args.weights)
    if args.classes == "all":
        images = pipe.generate_per_class(args.num, sampler=sampler, seed=args.seed, batch_size=args.batch_size)
        nrow = args.num
    elif args.classes is not None:
        raise MageError("--classes takes 'all' (use --class C for one class)")
    else:
        images = pipe.generate(
            args.num, class_label=args.class_label, sampler=sampler, seed=args.seed, batch_size=args.batch_size
        )
        nrow = None
    _write_images(images, args.out, nrow)
    print(f"wrote {images.shape[0]} image(s) to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------
# mage inpaint
# --------------------------------------------------------------------------------------------------
def add_inpaint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--mask", default=None, help="PNG of the image's size, white = regenerate")
    p.add_argument("--box", default=None, help="x0,y0,x1,y1 in the image's pixels")
    p.add_argument("--class", dest="class_label", default=None, help="fill with this class (replace)")
    p.add_argument(
        "--feather", type=number(int, 0), default=0, help="soften the paste-back edge inside the mask (pixels)"
    )
    add_sampler_args(p)
    add_weights_arg(p)
    p.add_argument("--out", type=OUT_FILE, required=True, help="output PNG")


def run_inpaint(args: argparse.Namespace) -> int:
    import torch

    from ..pipeline import MAGEPipeline, inpaint
    from ..transforms import load_image, save_image

    sampler = sampler_config(args, args.model)
    pipe = MAGEPipeline.from_pretrained(args.model, weights=args.weights)
    tf, img = _load_for_model(pipe, args.image)
    H, W = img.shape[-2:]
    if (args.mask is None) == (args.box is None):
        raise MageError("give exactly one of --mask PNG or --box x0,y0,x1,y1")
    if args.mask is not None:
        m = load_image(args.mask)
        if tuple(m.shape[-2:]) != (H, W):
            raise MageError(f"mask is {m.shape[-1]}x{m.shape[-2]} but the image is {W}x{H}")
        mask = m.mean(0) > 0.5  # white = regenerate
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
    mk = tf(mask.float()[None].expand(3, -1, -1))[0] > 0  # same geometry as the image
    out = inpaint(
        pipe, image=x, mask=mk, class_label=args.class_label, sampler=sampler, seed=args.seed, feather=args.feather
    )
    save_image(out, args.out)
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------
# mage outpaint
# --------------------------------------------------------------------------------------------------
def add_outpaint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--extend", required=True, help="left=N,right=N,top=N,bottom=N (pixels at the model's resolution)")
    p.add_argument("--class", dest="class_label", default=None)
    add_sampler_args(p)
    add_weights_arg(p)
    p.add_argument("--out", type=OUT_FILE, required=True, help="output PNG")


def run_outpaint(args: argparse.Namespace) -> int:
    from ..pipeline import MAGEPipeline, outpaint
    from ..transforms import save_image

    sampler = sampler_config(args, args.model)
    ext = {"left": 0, "right": 0, "top": 0, "bottom": 0}
    for part in args.extend.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in ext or not v.strip().isdigit():
            raise MageError(f"bad --extend '{args.extend}': expected e.g. left=8,right=8,top=0,bottom=16")
        ext[k.strip()] = int(v)
    pipe = MAGEPipeline.from_pretrained(args.model, weights=args.weights)
    tf, img = _load_for_model(pipe, args.image)
    out = outpaint(pipe, image=tf(img), class_label=args.class_label, sampler=sampler, seed=args.seed, **ext)
    save_image(out, args.out)
    print(f"wrote {args.out} ({out.shape[-1]}x{out.shape[-2]})")
    return 0


COMMANDS = (
    Command("generate", "sample images from scratch (optionally of a class)", add_generate_arguments, run_generate),
    Command(
        "inpaint",
        "regenerate a region of an image (remove, or replace with --class)",
        add_inpaint_arguments,
        run_inpaint,
    ),
    Command("outpaint", "extend the canvas (uncrop) on any side", add_outpaint_arguments, run_outpaint),
)
