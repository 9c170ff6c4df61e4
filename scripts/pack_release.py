"""Pack a trained release run (scripts/release_fmnist.sh) into a self-contained weights folder.

    .venv/bin/python scripts/pack_release.py --run runs/release-fmnist --out weights/fashion-mnist

Copies the weights and configs only (safetensors + JSON; no train states), rewrites the classifier's paths to
point inside the folder, writes the Inception features of the demo's FID reference (500 test images) and of its
floor (500 train images) in float16, collects every evaluation JSON of RUN/eval into metrics.json, and lists the
sha256 of every file in SHA256SUMS, and the recommended sampler as sampler.json. The model card (README.md) is kept
as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

import numpy as np

from mage.checkpoint import resolve_checkpoint
from mage.files import atomic_write, atomic_write_json, read_json

CHECKPOINT_FILES = ("config.json", "model.safetensors", "train.json")


def copy_checkpoint(src_run: str, dst: str) -> str:
    """The newest checkpoint of a run (or a checkpoint folder) -> dst/{config.json, model.safetensors, train.json}."""
    ckpt = resolve_checkpoint(src_run)
    os.makedirs(dst, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if os.path.isfile(os.path.join(ckpt, name)):
            shutil.copyfile(os.path.join(ckpt, name), os.path.join(dst, name))
    return ckpt


def reference_features(out: str, num: int) -> None:
    """Inception features of the demo's FID reference (test split) and floor (train split), float16."""
    from mage import evaluate as ev

    net = ev.feature_network("inception", "cpu")
    os.makedirs(out, exist_ok=True)
    for split in ("test", "train"):
        ref = ev.reference_stats(net, "fashion-mnist", split, num, 32)
        proto = dict(ref["protocol"], stored="float16 features; mu and sigma are computed from them")

        def write(tmp: str, feats=ref["features"], proto=proto) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, features=np.asarray(feats, np.float16), protocol=json.dumps(proto))

        atomic_write(os.path.join(out, f"{split}-{num}.npz"), write)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/release-fmnist")
    ap.add_argument("--out", default="weights/fashion-mnist")
    ap.add_argument("--ref-num", type=int, default=500)
    ap.add_argument(
        "--sampler",
        default='{"steps": 8, "choice_temperature": 3.0}',
        help="the recommended sampler (sampler.json: SamplerConfig fields as JSON)",
    )
    args = ap.parse_args()
    run, out = args.run, args.out
    os.makedirs(out, exist_ok=True)
    sources = {
        "mage": copy_checkpoint(os.path.join(run, "mage"), out),
        "tokenizer": copy_checkpoint(os.path.join(run, "tokenizer"), os.path.join(out, "tokenizer")),
    }
    shutil.copyfile(os.path.join(run, "mage", "classes.json"), os.path.join(out, "classes.json"))
    atomic_write_json(os.path.join(out, "sampler.json"), json.loads(args.sampler))
    # the classifier: its fine-tuned encoder + head; the tokenizer is the release's own (one copy)
    sources["classifier"] = copy_checkpoint(
        os.path.join(run, "classifier", "model"), os.path.join(out, "classifier", "model")
    )
    meta = read_json(os.path.join(run, "classifier", "classifier.json"), "classifier")
    meta |= {"model": "model", "tokenizer": "../tokenizer", "pretrained": "..", "pretrained_checkpoint": ".."}
    atomic_write_json(os.path.join(out, "classifier", "classifier.json"), meta)
    os.makedirs(os.path.join(out, "judge"), exist_ok=True)
    for name in ("judge.json", "judge.safetensors"):
        shutil.copyfile(os.path.join(run, "judge", name), os.path.join(out, "judge", name))
    reference_features(os.path.join(out, "reference"), args.ref_num)
    metrics = {"sources": {k: os.path.relpath(v, run) for k, v in sources.items()}}
    eval_dir = os.path.join(run, "eval")
    for name in sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else []:
        if name.endswith(".json"):
            metrics[name[: -len(".json")]] = read_json(os.path.join(eval_dir, name), name)
    atomic_write_json(os.path.join(out, "metrics.json"), metrics)
    files = sorted(
        os.path.relpath(os.path.join(d, f), out)
        for d, _, fs in os.walk(out)
        for f in fs
        if f not in ("SHA256SUMS", "README.md")
    )
    lines = [f"{sha256(os.path.join(out, f))}  {f}" for f in files]
    with open(os.path.join(out, "SHA256SUMS"), "w") as f:
        f.write("\n".join(lines) + "\n")
    total = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    print(f"packed {len(files)} files, {total / 2**20:.1f} MiB, into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
