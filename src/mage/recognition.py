"""Recognition with a pre-trained MAGE: features, linear probe, few-shot, classify (MAGE.md 5).

Features: the image is tokenized (0% masking, nothing dropped), the fake class token prepended, and the
encoder output after the final norm is mean-pooled over the image tokens (``pool="mean"``, the original's
``--global_pool``), taken at position 0 (``pool="cls"``), or kept whole: every image token's feature in raster
order (``pool="flat"``, [L * D]; not the original's protocol -- mean-pooling throws away where each token is,
which costs a lot when an image is only 8 x 8 tokens: on Fashion-MNIST +8 points linear, +7 10-shot).

Linear probe (the original protocol): frozen features -> LayerNorm (identity, as the original's untrained
``fc_norm``) -> BatchNorm1d(affine=False) -> Linear, LARS with warm-up + cosine. We train on cached
features of the un-augmented images (the original re-extracts features of random-resized crops every epoch),
which makes a probe take seconds instead of hours.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .engine import Task
from .errors import MageError
from .files import atomic_write, atomic_write_json, read_json

# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------
POOLS = ("mean", "cls", "flat")


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise MageError(f"unknown pool '{pool}' ({' | '.join(POOLS)})")
    return pool


def pool_features(h: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """encoder output [B, 1+L, D] -> mean [B, D] | cls [B, D] | flat [B, L*D]."""
    check_pool(pool)
    if pool == "mean":
        return h[:, 1:].mean(1)
    if pool == "cls":
        return h[:, 0]
    return h[:, 1:].flatten(1)


@torch.no_grad()
def extract_features(model, tokenizer, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """images [B,3,H,W] in [0,1] -> features [B, D] ([B, L*D] for pool="flat"), fp32 on the CPU
    (the model and tokenizer may sit on a GPU)."""
    return pool_features(model.features(tokenizer.encode(images)), pool).float().cpu()


def is_baseline(model: str) -> bool:
    """``pixels`` or ``codes:TOKENIZER``: feature baselines without a MAGE model (nothing cached, no classifier)."""
    return model == "pixels" or model.startswith("codes:")


def embed_dataset(
    model_dir: str,
    data: str,
    split: str = "train",
    pool: str = "mean",
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Features of a dataset split. Baselines without MAGE: ``model_dir='pixels'`` gives raw pixels,
    ``'codes:TOKENIZER'`` each token's code vector in raster order ([L * code_dim]: what the tokens alone hold)."""
    check_pool(pool)
    from .data import load_dataset

    if model_dir.startswith("codes:"):
        from .vqgan import VQTokenizer

        tok = VQTokenizer.from_pretrained(model_dir[len("codes:") :]).eval()
        ds = load_dataset(data, split, tok.config.image_size, "none", data_dir, 0, limit)
        codes = map_batches(
            ds,
            lambda x: tok.quantize.embedding(tok.encode(x).long()).float().flatten(1),  # [b, L * code_dim]
            batch_size,
            f"codes {data}:{split}",
            progress,
        )
        return {"features": codes, "labels": ds.labels(), "classes": ds.classes}
    if model_dir == "pixels":
        ds = load_dataset(data, split, 32, "none", data_dir, 0, limit)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        feats = x.mean(1).flatten(1) if x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 1]) else x.flatten(1)
        return {"features": feats, "labels": ds.labels(), "classes": ds.classes}
    from .pipeline import MAGEPipeline

    pipe = MAGEPipeline.from_pretrained(model_dir)
    ds = load_dataset(data, split, pipe.tokenizer.config.image_size, "none", data_dir, 0, limit)
    feats = map_batches(
        ds,
        lambda x: extract_features(pipe.model, pipe.tokenizer, x, pool),
        batch_size,
        f"embed {data}:{split}",
        progress,
    )
    return {"features": feats, "labels": ds.labels(), "classes": ds.classes or pipe.classes}


@torch.no_grad()
def map_batches(ds, fn, batch_size: int, desc: str, progress: bool) -> torch.Tensor:
    """fn over the dataset's images in batches ([b, 3, S, S] -> [b, ...]), concatenated: [N, ...]."""
    out = []
    for s in tqdm(range(0, len(ds), batch_size), desc=desc, disable=not progress, leave=False):
        out.append(fn(torch.stack([ds[i][0] for i in range(s, min(len(ds), s + batch_size))])))
    return torch.cat(out)


def features_key(
    model_dir: str, data: str, split: str, pool: str, data_dir: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    """What cached features depend on: the checkpoint the run resolves to now (its step folder, the size and
    mtime of its weights and of the tokenizer's), the data (spec, split, limit, ``data_dir``; for ``folder:``
    data the list of files) and the pooling. Training on, or adding images, changes the key."""
    from .checkpoint import WEIGHTS, resolve_checkpoint

    def weights_stamp(path: str) -> list[Any] | None:
        try:
            ckpt = resolve_checkpoint(path)
            st = os.stat(os.path.join(ckpt, WEIGHTS))
        except (MageError, OSError):
            return None
        return [os.path.relpath(os.path.abspath(ckpt), os.path.abspath(model_dir)), st.st_size, st.st_mtime_ns]

    key: dict[str, Any] = {
        "checkpoint": weights_stamp(model_dir),
        "tokenizer": weights_stamp(os.path.join(model_dir, "tokenizer")),
        "data": data,
        "split": split,
        "pool": pool,
        "limit": limit,
        "data_dir": os.path.abspath(data_dir) if data_dir else None,
    }
    if data.strip().lower().startswith("folder:"):
        import hashlib
        import warnings

        from .data import load_dataset

        with warnings.catch_warnings():  # the embedding below reads it again and warns there
            warnings.simplefilter("ignore")
            ds = load_dataset(data, split, 32, "none", data_dir, 0, limit)  # files are not opened
        key["folder"] = os.path.abspath(ds.root)
        key["files"] = hashlib.sha256("\n".join(ds.files).encode("utf-8", "surrogateescape")).hexdigest()
    return key


def cached_features(
    model_dir: str, data: str, split: str, pool: str = "mean", data_dir: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    """``embed_dataset`` cached under MODEL_DIR/features/ (so repeated probes are cheap; released weights: under
    the user's cache folder), keyed by
    :func:`features_key`: features of an older checkpoint or another file list are never reused (and are
    removed when the new ones are written)."""
    if is_baseline(model_dir):
        return embed_dataset(model_dir, data, split, pool, data_dir, limit)
    import glob
    import hashlib

    tag = "".join(c if c.isalnum() else "_" for c in f"{data}-{split}-{pool}-{limit}")
    key = features_key(model_dir, data, split, pool, data_dir, limit)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = _features_folder(model_dir)
    path = os.path.join(folder, f"{tag}-{digest}.npz")
    if os.path.isfile(path):
        z = np.load(path, allow_pickle=False)
        classes = json.loads(str(z["classes"])) if "classes" in z else None
        return {
            "features": torch.from_numpy(z["features"]),
            "labels": torch.from_numpy(z["labels"]),
            "classes": classes,
        }
    r = embed_dataset(model_dir, data, split, pool, data_dir, limit)
    save_features(r, path)
    stale = glob.glob(os.path.join(glob.escape(folder), glob.escape(tag) + "-" + "[0-9a-f]" * 16 + ".npz"))
    for old in [*stale, os.path.join(folder, tag + ".npz")]:  # other keys of the same data: older checkpoints
        if old != path and os.path.isfile(old):
            os.remove(old)
    return r


def _features_folder(model_dir: str) -> str:
    """MODEL_DIR/features, except for released weights, which stay as shipped (their sha256 are checked): those
    cache under the user's cache folder."""
    from .evaluate import default_cache_dir
    from .released import weights_root

    root = os.path.abspath(weights_root())
    model = os.path.abspath(model_dir)
    if os.path.commonpath([root, model]) == root:
        return os.path.join(default_cache_dir(), "features", os.path.relpath(model, root).replace(os.sep, "_"))
    return os.path.join(model_dir, "features")


def save_features(r: dict[str, Any], path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, features=r["features"].numpy(), labels=r["labels"].numpy(), classes=json.dumps(r["classes"]))

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------------------
class ProbeHead(nn.Module):
    """LayerNorm (frozen identity) -> BatchNorm1d(affine=False, eps 1e-6) -> Linear (trunc-normal std 0.01)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc_norm.requires_grad_(False)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(self.fc_norm(f)))  # [B, C]


class LARS(torch.optim.Optimizer):
    """LARS (MAE's util/lars.py semantics): no weight decay or trust scaling for params with ndim <= 1."""

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(dp)
                    q = torch.where(
                        pn > 0,
                        torch.where(un > 0, g["trust_coefficient"] * pn / un, torch.ones_like(pn)),
                        torch.ones_like(pn),
                    )
                    dp = dp.mul(q)
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p)
                mu = st["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


class ProbeTask(Task):
    """The linear probe as an in-memory task of the training engine: fixed features, one head."""

    name = "linear probe"

    def __init__(
        self,
        head: ProbeHead,
        opt: torch.optim.Optimizer,
        feats: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
    ):
        self.model = self.net = head
        self.optimizers = {"head": opt}
        self.feats, self.labels, self.batch_size, self.seed = feats, labels, batch_size, seed
        self.global_batch = batch_size

    def batches(self, start, end):
        from .loader import step_rows

        for step in range(start, end):
            idx = step_rows(len(self.feats), self.batch_size, self.seed, step).to(self.feats.device)
            yield step, (self.feats[idx], self.labels[idx])

    def loss(self, net, batch, step):
        f, y = batch
        loss = F.cross_entropy(net(f), y)
        return loss, {"loss": loss}


def train_probe(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    epochs: int = 90,
    batch_size: int = 256,
    blr: float = 0.1,
    warmup_epochs: int = 10,
    seed: int = 0,
    progress: bool = True,
    optimizer: str = "sgd",
    device: str | None = None,
) -> ProbeHead:
    """The original's linear-probe head and schedule on fixed features (lr = blr * batch / 256).

    ``optimizer="lars"`` is the original's (tuned for batch 4096: at small batches its trust ratio of 1e-3
    barely moves the weights); the default is SGD with momentum 0.9. Trains on ``device`` (default: CUDA when
    available; 90 epochs over flat 16 x 16-token features are minutes on a CPU), returns the head on the CPU."""
    from .distributed import DistInfo
    from .engine import LoopSettings, fit

    if epochs < 1 or batch_size < 1 or blr <= 0:
        raise MageError(f"a probe needs epochs >= 1, batch_size >= 1 and blr > 0 (got {epochs}, {batch_size}, {blr})")
    if optimizer not in ("sgd", "lars"):
        raise MageError(f"unknown optimizer '{optimizer}' (sgd | lars)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = min(batch_size, train_f.shape[0])
    torch.manual_seed(seed)
    head = ProbeHead(train_f.shape[1], num_classes).to(dev)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = LARS(params, lr=0.0) if optimizer == "lars" else torch.optim.SGD(params, lr=0.0, momentum=0.9)
    per_epoch = max(1, train_f.shape[0] // batch_size)
    loop = LoopSettings(
        total_steps=epochs * per_epoch,
        lr=blr * batch_size / 256,
        warmup_steps=warmup_epochs * per_epoch,
        log_every=per_epoch,
        seed=seed,
    )
    task = ProbeTask(head, opt, train_f.to(dev), train_y.to(dev), batch_size, seed)
    fit(task, loop, DistInfo(device=dev), progress=progress)
    return head.cpu().eval()


@torch.no_grad()
def accuracy(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return 100.0 * (top == y[:, None]).any(1).float().mean().item()


# --------------------------------------------------------------------------------------------------
# few-shot
# --------------------------------------------------------------------------------------------------
def sample_shots(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of exactly k examples per class (seeded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < k:
            raise MageError(f"class {c} has only {idx.numel()} examples, fewer than {k} shots")
        out.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    return torch.cat(out)


def logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-2, iters: int = 200
) -> nn.Linear:
    """Multinomial logistic regression (L-BFGS, L2 penalty) on standardized features."""
    torch.manual_seed(0)
    lin = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + weight_decay * lin.weight.pow(2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def few_shot(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    shots: list[int],
    draws: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """For each k: mean/std test accuracy over draws, for logistic regression and cosine prototypes."""
    if not shots or min(shots) < 1 or draws < 1:
        raise MageError(f"few-shot needs shots >= 1 and draws >= 1 (got shots {list(shots)}, draws {draws})")
    C = int(train_y.max()) + 1
    res: dict[str, Any] = {}
    for k in shots:
        lr_accs, proto_accs = [], []
        for d in range(draws):
            idx = sample_shots(train_y, k, seed * 1000 + d)
            xs, ys = train_f[idx].float(), train_y[idx]
            mu, sd = xs.mean(0), xs.std(0, unbiased=False) + 1e-6
            lin = logistic_regression((xs - mu) / sd, ys, C)
            with torch.no_grad():
                lr_accs.append(accuracy(lin((test_f.float() - mu) / sd), test_y))
                protos = F.normalize(
                    torch.stack([F.normalize(xs[ys == c] - mu, dim=1).mean(0) for c in range(C)]), dim=1
                )
                proto_accs.append(accuracy(F.normalize(test_f.float() - mu, dim=1) @ protos.t(), test_y))
        res[str(k)] = {
            "logreg_mean": float(np.mean(lr_accs)),
            "logreg_std": float(np.std(lr_accs)),
            "proto_mean": float(np.mean(proto_accs)),
            "proto_std": float(np.std(proto_accs)),
        }
    return res


# --------------------------------------------------------------------------------------------------
# saved classifiers (for `mage classify`)
# --------------------------------------------------------------------------------------------------
def save_classifier(
    out: str,
    head: ProbeHead,
    model_dir: str,
    pool: str,
    classes: list[str] | None,
    image_size: int,
    metrics: dict[str, Any],
) -> None:
    from safetensors.torch import save_file

    from .checkpoint import resolve_checkpoint

    os.makedirs(out, exist_ok=True)
    weights = {k: v.contiguous() for k, v in head.state_dict().items()}
    atomic_write(os.path.join(out, "head.safetensors"), lambda tmp: save_file(weights, tmp))
    meta = {
        "kind": "linear-probe",
        "model": os.path.abspath(model_dir),
        "checkpoint": os.path.abspath(resolve_checkpoint(model_dir)),  # the step it was trained on
        "pool": pool,
        "image_size": image_size,
        "classes": classes or [str(i) for i in range(head.linear.out_features)],
        "metrics": metrics,
    }
    atomic_write_json(os.path.join(out, "classifier.json"), meta)


class Classifier:
    """A saved classifier (linear probe or fine-tuned encoder): image -> class probabilities."""

    def __init__(self, path: str):
        from .checkpoint import load_strict, read_safetensors
        from .pipeline import MAGEPipeline
        from .released import resolve

        path = resolve(path, "classifier")
        meta_path = os.path.join(path, "classifier.json")
        if not os.path.isfile(meta_path):
            raise MageError(
                f"no classifier at {path} (expected classifier.json from 'mage probe linear' or 'mage finetune')"
            )
        self.meta = read_json(meta_path, "classifier")
        finetuned = self.meta.get("kind") == "finetune"
        need = ("classes", "image_size", "model") + (("tokenizer",) if finetuned else ("pool",))
        bad = [k for k in need if not self.meta.get(k)]
        if bad or not isinstance(self.meta["classes"], list) or type(self.meta["image_size"]) is not int:
            raise MageError(
                f"cannot read classifier {meta_path}: {', '.join(bad) or 'classes or image_size'} missing or invalid"
            )
        self.classes = self.meta["classes"]
        self._finetuned = None
        if finetuned:
            from .finetune import FinetunedClassifier

            self._finetuned = FinetunedClassifier(path, self.meta)
            return
        head_path = os.path.join(path, "head.safetensors")
        sd = read_safetensors(head_path, "classifier head")
        w = sd.get("linear.weight")
        if w is None or w.dim() != 2 or w.shape[0] != len(self.classes):
            raise MageError(
                f"{head_path} is not a linear-probe head for the {len(self.classes)} classes of {meta_path} "
                f"(linear.weight: {None if w is None else tuple(w.shape)})"
            )
        self.head = ProbeHead(w.shape[1], w.shape[0])
        load_strict(self.head, sd, head_path)
        self.head.eval()
        self.pipe = MAGEPipeline.from_pretrained(
            self._checkpoint(), tokenizer=os.path.join(self.meta["model"], "tokenizer")
        )
        self.classes = self.meta["classes"]

    def _checkpoint(self) -> str:
        """The checkpoint the head was trained on (recorded since the run may have trained on); when it is gone
        (pruned), the run's newest, with a warning."""
        ckpt = self.meta.get("checkpoint")
        if ckpt is None or os.path.isdir(ckpt):
            return ckpt or self.meta["model"]
        import warnings

        warnings.warn(
            f"the classifier was trained on {ckpt}, which is gone: using the newest checkpoint of "
            f"{self.meta['model']} (run 'mage probe linear' again for a head that matches it)",
            UserWarning,
            stacklevel=3,
        )
        return self.meta["model"]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,S,S] (already at the training resolution) -> probabilities [B, C]."""
        if self._finetuned is not None:
            return self._finetuned.predict(images)
        f = extract_features(self.pipe.model, self.pipe.tokenizer, images, self.meta["pool"])
        return self.head(f).softmax(-1)
