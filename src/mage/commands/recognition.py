"""``mage embed``, ``mage probe``, ``mage finetune`` and ``mage classify``: MAGE features for recognition."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import MageError
from .common import (
    OUT_DIR,
    OUT_FILE,
    POSITIVE,
    POSITIVE_F,
    SEED,
    Command,
    add_compile_arg,
    add_data_args,
    add_training_args,
    image_files,
    int_list,
    training_config,
    workers,
)

POOL_HELP = (
    "mean (over image tokens, the original's probe; default) | cls (position 0) | "
    "flat (every image token's feature in raster order, L*D dims: keeps the layout)"
)


# --------------------------------------------------------------------------------------------------
# mage embed
# --------------------------------------------------------------------------------------------------
def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="MAGE run directory, or a baseline: 'pixels' | 'codes:TOKENIZER'")
    add_data_args(p)
    p.add_argument("--split", default="train")
    p.add_argument("--pool", default="mean", help=POOL_HELP)
    p.add_argument("--out", type=OUT_FILE, required=True, help=".npz or .safetensors")


def run_embed(args: argparse.Namespace) -> int:
    from ..recognition import embed_dataset, save_features

    if not args.out.endswith((".npz", ".safetensors")):
        raise MageError(f"--out must end in .npz or .safetensors (got {args.out})")
    r = embed_dataset(
        args.model, data=args.data, split=args.split, pool=args.pool, data_dir=args.data_dir, limit=args.limit
    )
    if args.out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(
            {"features": r["features"].contiguous(), "labels": r["labels"]},
            args.out,
            metadata={"classes": json.dumps(r["classes"])},
        )
    else:
        save_features(r, args.out)
    print(f"wrote {r['features'].shape[0]} x {r['features'].shape[1]} features to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------
# mage probe
# --------------------------------------------------------------------------------------------------
def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["linear", "few-shot"])
    p.add_argument(
        "--model",
        required=True,
        help="MAGE run directory, or a baseline without MAGE: 'pixels' (raw "
        "pixels) | 'codes:TOKENIZER' (every token's code vector: what the tokens alone hold)",
    )
    add_data_args(p)
    p.add_argument("--pool", default="mean", help=POOL_HELP)
    p.add_argument(
        "--out", type=OUT_DIR, default=None, help="where to save the classifier (linear) / results (few-shot)"
    )
    p.add_argument("--epochs", type=POSITIVE, default=90)
    p.add_argument("--blr", type=POSITIVE_F, default=0.1)
    p.add_argument("--optimizer", default="sgd", help="sgd (default) | lars (the original's, for batch 4096)")
    p.add_argument("--batch-size", type=POSITIVE, default=256)
    p.add_argument("--shots", type=int_list, default=[1, 2, 5, 10], help="shots per class, e.g. 1,2,5,10")
    p.add_argument("--draws", type=POSITIVE, default=5)
    p.add_argument("--seed", type=SEED, default=0, help="0 <= seed < 2**63 (default 0)")
    p.add_argument("--json", action="store_true")


def run_probe(args: argparse.Namespace) -> int:
    import torch

    from ..data import check_classes
    from ..recognition import accuracy, cached_features, few_shot, is_baseline, save_classifier, train_probe

    tr = cached_features(
        args.model, data=args.data, split="train", pool=args.pool, data_dir=args.data_dir, limit=args.limit
    )
    te = cached_features(
        args.model, data=args.data, split="test", pool=args.pool, data_dir=args.data_dir, limit=args.limit
    )
    check_classes(args.data, tr["labels"], tr["classes"], "a probe")
    C = int(tr["labels"].max()) + 1
    if args.kind == "linear":
        head = train_probe(
            tr["features"],
            train_y=tr["labels"],
            num_classes=C,
            epochs=args.epochs,
            blr=args.blr,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
        )
        with torch.no_grad():
            logits = head(te["features"])
        m = {"top1": accuracy(logits, te["labels"], k=1)}
        if C > 5:
            m["top5"] = accuracy(logits, te["labels"], k=5)
        save = bool(args.out) and not is_baseline(args.model)
        if save:
            from ..vqgan import VQTokenizer

            size = VQTokenizer.from_pretrained(os.path.join(args.model, "tokenizer")).config.image_size
            save_classifier(
                args.out,
                head=head,
                model_dir=args.model,
                pool=args.pool,
                classes=tr["classes"],
                image_size=size,
                metrics=m,
            )
        print(
            json.dumps(m)
            if args.json
            else f"linear probe on {args.data} test: top-1 {m['top1']:.2f}%"
            + (f", top-5 {m['top5']:.2f}%" if "top5" in m else "")
            + (f" (classifier saved to {args.out})" if save else "")
        )
    else:
        r = few_shot(
            tr["features"],
            train_y=tr["labels"],
            test_f=te["features"],
            test_y=te["labels"],
            shots=args.shots,
            draws=args.draws,
            seed=args.seed,
        )
        if args.json:
            print(json.dumps(r))
        else:
            for k, v in r.items():
                print(
                    f"{k}-shot: logistic regression {v['logreg_mean']:.2f} +- {v['logreg_std']:.2f}%, "
                    f"cosine prototypes {v['proto_mean']:.2f} +- {v['proto_std']:.2f}%  ({args.draws} draws)"
                )
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "few_shot.json"), "w") as f:
                json.dump(r, f, indent=2)
    return 0


# --------------------------------------------------------------------------------------------------
# mage finetune
# --------------------------------------------------------------------------------------------------
def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="pre-trained MAGE run directory (required unless resuming)")
    add_data_args(p, required=False)
    add_training_args(p, "fmnist-32")
    p.add_argument(
        "--cache", default=None, help="token cache of the labelled train split (else --data, tokenized on the fly)"
    )
    add_compile_arg(p)


def run_finetune(args: argparse.Namespace) -> int:
    import dataclasses

    from ..config import finetune_preset
    from ..finetune import finetune

    cfg, _ = training_config(args, finetune_preset)
    if args.model is None:
        raise MageError("give --model (a pre-trained MAGE run directory)")
    if args.compile is not None:
        cfg = dataclasses.replace(cfg, compile=args.compile)
    r = finetune(
        cfg,
        model_dir=args.model,
        out=args.out,
        data=args.data,
        cache=args.cache,
        data_dir=args.data_dir,
        limit=args.limit,
        resume=args.resume,
        accum=args.accum,
        workers=workers(args),
    )
    if "top1" in r:
        print(
            f"fine-tuned {r['step']} steps in {r['minutes']:.1f} min: test top-1 {r['top1']:.2f}%"
            + (f", top-5 {r['top5']:.2f}%" if "top5" in r else "")
            + f" (classifier: {args.out})"
        )
    return 0


# --------------------------------------------------------------------------------------------------
# mage classify
# --------------------------------------------------------------------------------------------------
def add_classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", required=True)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--top", type=POSITIVE, default=3)
    p.add_argument("--json", action="store_true")


def run_classify(args: argparse.Namespace) -> int:
    from ..recognition import Classifier
    from ..transforms import build_transform, load_image

    clf = Classifier(args.classifier)
    tf = build_transform(clf.meta["image_size"], train=False, augment="none")
    results = []
    for path in [f for item in args.images for f in (image_files(item) if os.path.isdir(item) else [item])]:
        x = tf(load_image(path))[None]
        p = clf.predict(x)[0]
        top = p.topk(min(args.top, p.numel()))
        results.append(
            {
                "image": path,
                "top": [
                    {"class": clf.classes[i], "prob": float(v)}
                    for v, i in zip(top.values.tolist(), top.indices.tolist())
                ],
            }
        )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["image"] + ": " + ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"]))
    return 0


COMMANDS = (
    Command("embed", "one feature vector per image (mean-pooled encoder output)", add_embed_arguments, run_embed),
    Command("probe", "linear probe or few-shot evaluation on frozen features", add_probe_arguments, run_probe),
    Command("finetune", "fine-tune the whole encoder with a classification head", add_finetune_arguments, run_finetune),
    Command("classify", "top classes of images with a saved classifier", add_classify_arguments, run_classify),
)
