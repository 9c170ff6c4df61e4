"""``mage evaluate fid`` under torchrun: 2 gloo ranks give the samples and the scores of 1 rank, and only rank 0
writes (the reference statistics cache, the --out JSON) and prints."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from mage.checkpoint import save_checkpoint
from mage.config import mage_preset, tokenizer_preset
from mage.evaluate import Judge
from mage.model import MAGE
from mage.vqgan import VQTokenizer
from test_tokenizer import ENV

# Runs `mage` with an audit hook that records every file this process opens for writing (or renames onto) under
# the watched folder, one log per rank: which rank wrote what, whatever code path did the writing. It also keeps the
# features each rank scores (the images themselves, in order, seen through the feature network).
LAUNCHER = r"""
import json, os, sys

import numpy as np

watch = os.path.realpath(os.environ["MAGE_TEST_WATCH"])
log = os.path.join(os.environ["MAGE_TEST_LOG"], os.environ.get("RANK", "0"))
writes = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        written = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
    elif event == "os.rename":
        path, written = args[1], True
    else:
        return
    if written and isinstance(path, (str, bytes, os.PathLike)):
        full = os.path.realpath(os.fsdecode(path))
        if full.startswith(watch + os.sep):
            writes.append(os.path.relpath(full, watch))


sys.addaudithook(hook)
import mage.evaluate as ev
from mage.cli import main

compare = ev.compare


def keep_features(ref, feats, *args, **kwargs):
    np.save(log + ".features.npy", feats)
    return compare(ref, feats, *args, **kwargs)


ev.compare = keep_features
code = main(sys.argv[1:])
with open(log + ".writes.json", "w") as f:
    json.dump(writes, f)
sys.exit(code)
"""


def _tiny_run(root):
    """A tiny random class-conditional MAGE + tokenizer, and a random judge CNN as the (cheap) feature network."""
    torch.manual_seed(0)
    m = MAGE(dataclasses.replace(mage_preset("tiny"), num_classes=4))
    save_checkpoint(str(root / "m"), m.state_dict(), m.config)
    tok = VQTokenizer(tokenizer_preset("tiny"))
    save_checkpoint(str(root / "m" / "tokenizer"), tok.state_dict(), tok.config)
    judge = Judge(4, width=8)
    with torch.no_grad():  # spread the features, so that the FID is far above the 1e-6 it is compared to
        judge.body[-4].weight.mul_(1000)
        judge.body[-4].bias.mul_(1000)
    (root / "judge").mkdir()
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(root / "judge" / "judge.safetensors"))
    meta = {"data": "synthetic", "classes": ["a", "b", "c", "d"], "image_size": 16, "width": 8, "test_accuracy": 0.0}
    (root / "judge" / "judge.json").write_text(json.dumps(meta))
    return root / "m", root / "judge"


def test_fid_two_ranks_match_one_and_only_rank0_writes(tmp_path):
    model, judge = _tiny_run(tmp_path)
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    # --num-samples: torchrun takes --num for its own --numa-binding
    # 37 = 5 chunks of 8 (the last one short): 3 on rank 0, 2 on rank 1, for the samples and the reference alike
    common = ["evaluate", "fid", "--model", str(model), "--data", "synthetic", "--num-samples", "37",
              "--batch-size", "8", "--steps", "2", "--class-conditional", "--features", f"judge:{judge}"]  # fmt: skip

    runs = tmp_path / "runs"  # every file a run may write is under here (the logs are not)

    def run(ranks: int, name: str, cache: str | None = None):
        out, logs = runs / name, tmp_path / "logs" / name
        out.mkdir(parents=True)
        logs.mkdir(parents=True)
        env = {**ENV, "OMP_NUM_THREADS": "1", "MAGE_CACHE_DIR": cache or str(out / "cache")}
        env |= {"MAGE_TEST_WATCH": str(runs), "MAGE_TEST_LOG": str(logs)}
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        cmd = [*(torchrun if ranks > 1 else [sys.executable]), str(launcher), *common, "--out", str(out / "fid.json")]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        writes = [json.loads((logs / f"{rank}.writes.json").read_text()) for rank in range(ranks)]
        feats = [np.load(logs / f"{rank}.features.npy") for rank in range(ranks)]
        return r.stdout, json.loads((out / "fid.json").read_text()), writes, feats

    out1, r1, (w1,), (f1,) = run(1, "one")
    out2, r2, (w2, w2b), (f2, f2b) = run(2, "two")
    print(f"FID-like, 1 rank: {r1['fid']!r}; 2 ranks: {r2['fid']!r}; difference {abs(r1['fid'] - r2['fid']):.3g}")
    assert abs(r1["fid"] - r2["fid"]) < 1e-6 and r1["fid"] > 1, (r1["fid"], r2["fid"])
    for k in ("kid", "precision", "recall"):
        assert abs(r1[k] - r2[k]) < 1e-6, (k, r1[k], r2[k])
    # the same samples, in the same order, on both ranks of the 2-rank run as on the 1-rank run
    assert f1.shape == (37, 32) and np.array_equal(f2, f2b) and np.allclose(f1, f2, atol=1e-6, rtol=0)
    # the same reference statistics, whether computed on 1 rank or shared over 2
    (c1,) = (runs / "one" / "cache" / "fid-stats").iterdir()
    (c2,) = (runs / "two" / "cache" / "fid-stats").iterdir()
    z1, z2 = np.load(c1), np.load(c2)
    assert z1["features"].shape == (37, 32) and np.allclose(z1["features"], z2["features"], atol=1e-6, rtol=0)
    # the protocol names the sharding; the rest of the record is the same
    p1, p2 = r1["protocol"], r2["protocol"]
    assert p1["world_size"] == 1 and p2["world_size"] == 2 and p1["batch_size"] == 8 and p1["seeds"].startswith("0..4")
    drop = ("world_size",)
    assert {k: v for k, v in p1.items() if k not in drop} == {k: v for k, v in p2.items() if k not in drop}
    assert r1["generated"] == r2["generated"] and r1["reference"] == r2["reference"]
    # rank 0 alone wrote the cache and the result, and printed the line; rank 1 wrote nothing
    lines = [line for line in out2.splitlines() if line.startswith("FID-like (judge)")]
    assert len(lines) == 1 and "world size 2" in lines[0] and "seeds 0..4" in lines[0], out2
    assert w2b == [], w2b

    def final(writes):  # the files written, less the temporary files they are written through
        return sorted({p for p in writes if not os.path.basename(p).startswith(".tmp-")})

    assert final(w1) == ["one/cache/fid-stats/" + c1.name, "one/fid.json"], w1
    assert final(w2) == ["two/cache/fid-stats/" + c2.name, "two/fid.json"], w2
    # again on 2 ranks with the cache in place: both read it, nobody rewrites it, and the score is the same
    _, r3, (w3, w3b), _ = run(2, "three", cache=str(runs / "two" / "cache"))
    assert abs(r3["fid"] - r2["fid"]) < 1e-9 and w3b == [] and final(w3) == ["three/fid.json"], (r3["fid"], w3, w3b)
