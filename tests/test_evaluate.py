"""Evaluation: the Frechet distance, KID/PR sanity, the Inception features, the judge, agreement + FID CLIs."""

import dataclasses
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from mage.checkpoint import save_checkpoint
from mage.config import mage_preset, tokenizer_preset
from mage.data import load_dataset
from mage.evaluate import (
    Judge,
    compute_features,
    frechet_distance,
    gaussian_stats,
    kernel_inception_distance,
    precision_recall,
)
from mage.model import MAGE
from mage.vqgan import VQTokenizer
from test_tokenizer import run_cli


def _random_gaussian(rng, d):
    a = rng.standard_normal((d, d))
    return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    for d in (4, 32):
        mu1, s1 = _random_gaussian(rng, d)
        mu2, s2 = _random_gaussian(rng, d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert abs(frechet_distance(mu1, s1, mu2, s2) - direct) < 1e-6 * max(1.0, abs(direct))
        assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8


@pytest.fixture(scope="module")
def shapes():
    ds = load_dataset("synthetic", "test", 16, "none", None, 0, 200)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_fid_zero_on_itself_and_monotonic_in_noise(shapes):
    torch.manual_seed(0)
    net = Judge(4, width=8).eval()  # a fixed random CNN is enough here
    feats = lambda x: compute_features(net.features, [x[s : s + 50] for s in range(0, len(x), 50)], progress=False)
    ref = feats(shapes)
    mu, s = gaussian_stats(ref)
    assert abs(frechet_distance(mu, s, *gaussian_stats(feats(shapes)))) < 1e-6
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(shapes.shape, generator=g)
    scores = [
        frechet_distance(mu, s, *gaussian_stats(feats((shapes + sigma * noise).clamp(0, 1))))
        for sigma in (0.02, 0.05, 0.1, 0.2, 0.4)
    ]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    kid, _ = kernel_inception_distance(ref, ref, subsets=5, subset_size=100)
    kid_noisy, _ = kernel_inception_distance(ref, feats((shapes + 0.4 * noise).clamp(0, 1)), subsets=5, subset_size=100)
    assert abs(kid) < kid_noisy
    p, r = precision_recall(ref, ref)
    assert p == 1.0 and r == 1.0


def test_inception_features_and_quantisation():
    from mage.evaluate import InceptionFeatures, inception_path

    try:
        inception_path()
    except Exception as e:  # noqa: BLE001
        if os.environ.get("MAGE_REQUIRE_FIXTURES"):
            raise
        pytest.skip(str(e))
    net = InceptionFeatures()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    f = net(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    # values within the same uint8 level give the same features (the PNG quantisation is applied first)
    x8 = (x * 255).round() / 255
    assert torch.equal(net(x8 + 0.2 / 255), net(x8))
    assert not torch.allclose(f[0], f[1])


def test_inception_fid_records_protocol(tmp_path):
    from mage.evaluate import INCEPTION_SHA256, evaluate_fid, inception_path

    try:
        inception_path()
    except Exception as e:  # noqa: BLE001
        if os.environ.get("MAGE_REQUIRE_FIXTURES"):
            raise
        pytest.skip(str(e))
    r = evaluate_fid(images="synthetic", data="synthetic", num=4, cache_dir=str(tmp_path), progress=False)
    p = r["protocol"]
    assert r["label"] == "FID" and np.isfinite(r["fid"])
    assert p["resize"] == "tf1-bilinear" and p["quantisation"] == "uint8" and p["num"] == 4
    assert INCEPTION_SHA256[:12] in p["network"] and p["input_size"] == 299
    assert "TF1 bilinear resize (no half-pixel centres)" in r["preprocessing"]


def _tf1_resize_bilinear_numpy(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Reference TF1 resize_bilinear(align_corners=False, half_pixel_centers=False) of [H, W] -> [out_h, out_w].
    Source coordinates as TF computes them (float32 scale in/out, float32 i * scale); the interpolation in float64,
    pixel by pixel."""
    in_h, in_w = img.shape

    def axis(in_size, out_size):
        scale = np.float32(in_size) / np.float32(out_size)
        out = []
        for i in range(out_size):
            src = np.float32(i) * scale
            lo = int(np.floor(src))
            hi = min(int(np.ceil(src)), in_size - 1)
            out.append((lo, hi, float(src) - lo))
        return out

    res = np.empty((out_h, out_w), np.float64)
    for i, (y0, y1, ly) in enumerate(axis(in_h, out_h)):
        for j, (x0, x1, lx) in enumerate(axis(in_w, out_w)):
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
            res[i, j] = top + (bottom - top) * ly
    return res


def test_resize_tf1_bilinear_matches_numpy_reference():
    """Tolerance: max abs error 1e-5 for images in [0, 1]; 1e-3 for uint8 levels 0..255 (float32 round-off is
    ~1e-4 there; a wrong coordinate rule is off by whole levels)."""
    from mage.evaluate import resize_tf1_bilinear

    rng = np.random.default_rng(0)
    cases = [((28, 28), (299, 299)), ((32, 32), (299, 299)), ((299, 299), (64, 64)), ((10, 7), (13, 19)),
             ((9, 16), (4, 5)), ((5, 5), (5, 5))]  # fmt: skip
    for (h, w), (oh, ow) in cases:
        imgs = rng.random((1, 2, h, w))
        for scale, tol in ((1.0, 1e-5), (255.0, 1e-3)):
            x = imgs * scale if scale == 1.0 else np.round(imgs * scale)
            got = resize_tf1_bilinear(torch.from_numpy(x).float(), (oh, ow))
            assert got.shape == (1, 2, oh, ow) and got.dtype == torch.float32
            ref = np.stack([[_tf1_resize_bilinear_numpy(x[b, c].astype(np.float32), oh, ow) for c in range(2)]
                            for b in range(1)])  # fmt: skip
            assert np.abs(got.double().numpy() - ref).max() < tol, ((h, w), (oh, ow), scale)
    # a checkerboard (the worst case for any coordinate error), up and down
    board = (np.indices((8, 8)).sum(0) % 2).astype(np.float32)
    for oh, ow in ((299, 299), (5, 3), (12, 20)):
        got = resize_tf1_bilinear(torch.from_numpy(board)[None, None], (oh, ow))[0, 0].double().numpy()
        assert np.abs(got - _tf1_resize_bilinear_numpy(board, oh, ow)).max() < 1e-5
    # not vacuous: PyTorch's half-pixel bilinear differs on the checkerboard; TF1 keeps the top-left pixel exact
    tb = torch.from_numpy(board)[None, None]
    ours = resize_tf1_bilinear(tb, (12, 12))
    half_pixel = torch.nn.functional.interpolate(tb, size=(12, 12), mode="bilinear", align_corners=False)
    assert (ours - half_pixel).abs().max() > 0.1
    assert ours[0, 0, 0, 0] == board[0, 0]


@pytest.fixture(scope="module")
def judge_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    judge = root / "judge"
    r = run_cli(
        "evaluate",
        "train-judge",
        "--data",
        "synthetic:1000",
        "--epochs",
        "8",
        "--width",
        "16",
        "--batch-size",
        "32",
        "--out",
        str(judge),
    )
    assert r.returncode == 0, r.stderr
    torch.manual_seed(0)
    cfg = mage_preset("tiny")
    cfg = dataclasses.replace(cfg, num_classes=4)
    m = MAGE(cfg)
    d = root / "m"
    save_checkpoint(str(d), m.state_dict(), m.config)
    tok = VQTokenizer(tokenizer_preset("tiny"))
    save_checkpoint(str(d / "tokenizer"), tok.state_dict(), tok.config)
    return judge, d, r.stdout


def test_judge_learns(judge_and_model):
    judge, _, out = judge_and_model
    meta = json.loads((judge / "judge.json").read_text())
    assert meta["test_accuracy"] > 50, meta  # 4 shapes: chance is 25%
    assert "test accuracy" in out


def test_judge_through_tokenizer_sees_only_reconstructions(tmp_path):
    """--through-tokenizer trains and tests on encode -> decode: a tokenizer whose decoder outputs a constant
    image leaves nothing to learn, so the judge falls to chance (on the images themselves it scores > 50%)."""
    torch.manual_seed(0)
    tok = VQTokenizer(tokenizer_preset("tiny"))
    torch.nn.init.zeros_(tok.decoder.conv_out.weight)
    torch.nn.init.zeros_(tok.decoder.conv_out.bias)
    save_checkpoint(str(tmp_path / "tok"), tok.state_dict(), tok.config)
    r = run_cli(
        "evaluate",
        "train-judge",
        "--data",
        "synthetic:1000",
        "--epochs",
        "8",
        "--width",
        "16",
        "--batch-size",
        "32",
        "--through-tokenizer",
        str(tmp_path / "tok"),
        "--out",
        str(tmp_path / "judge"),
    )
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "judge" / "judge.json").read_text())
    assert meta["test_accuracy"] < 35 and meta["through_tokenizer"] == str(tmp_path / "tok"), meta
    assert meta["image_size"] == 16 and "through" in r.stdout
    r = run_cli(
        "evaluate",
        "train-judge",
        "--data",
        "synthetic:100",
        "--through-tokenizer",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "j2"),
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_agreement_and_fid_cli(judge_and_model, tmp_path):
    judge, model, _ = judge_and_model
    out = tmp_path / "agree.json"
    r = run_cli(
        "evaluate",
        "agreement",
        "--model",
        str(model),
        "--judge",
        str(judge),
        "--per-class",
        "3",
        "--steps",
        "2",
        "--out",
        str(out),
        "--grid",
        str(tmp_path / "g.png"),
    )
    assert r.returncode == 0, r.stderr
    a = json.loads(out.read_text())
    assert a["num"] == 12 and 0 <= a["agreement"] <= 100 and sum(map(sum, a["confusion"])) == 12
    assert (tmp_path / "g.png").is_file() and "class agreement" in r.stdout
    r = run_cli(
        "evaluate",
        "fid",
        "--model",
        str(model),
        "--data",
        "synthetic",
        "--num",
        "20",
        "--steps",
        "2",
        "--features",
        f"judge:{judge}",
        "--class-conditional",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "f.json"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("FID-like (judge)") and "20 samples" in r.stdout, r.stdout
    f = json.loads((tmp_path / "f.json").read_text())
    assert f["fid"] > 0 and f["generated"]["num"] == 20 and f["reference"]["num"] == 20
    assert f["protocol"]["num"] == 20 and f["protocol"]["quantisation"] == "uint8"
    # the floor: real images against real images
    r = run_cli(
        "evaluate",
        "fid",
        "--images",
        "synthetic",
        "--data",
        "synthetic",
        "--num",
        "100",
        "--features",
        f"judge:{judge}",
    )
    assert r.returncode == 0 and "real images" in r.stdout, r.stderr


def test_evaluate_bad_inputs(judge_and_model, tmp_path):
    judge, model, _ = judge_and_model
    r = run_cli("evaluate", "agreement", "--model", str(model), "--judge", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no judge" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    r = run_cli(
        "evaluate", "fid", "--model", str(model), "--ref-stats", str(bad), "--num", "4", "--features", f"judge:{judge}"
    )
    assert r.returncode == 2 and "mu" in r.stderr
    r = run_cli("evaluate", "fid", "--model", str(model), "--images", "synthetic", "--features", f"judge:{judge}")
    assert r.returncode == 2 and "exactly one" in r.stderr
    r = run_cli(
        "evaluate",
        "fid",
        "--model",
        str(model),
        "--data",
        "synthetic",
        "--image-size",
        "999",
        "--num",
        "4",
        "--features",
        f"judge:{judge}",
    )
    assert r.returncode == 2 and "differs from the model's resolution" in r.stderr and "Traceback" not in r.stderr


def test_rfid_through_tokenizer_and_features_only_reference(judge_and_model, tmp_path):
    """--through-tokenizer scores the reconstructions of real images (a random tokenizer's are far from them),
    and a reference .npz holding only features (float16, as the release ships it) gives the same FID."""
    from mage.evaluate import evaluate_fid

    judge, model, _ = judge_and_model
    kw = dict(data="synthetic", num=60, images="synthetic", features=f"judge:{judge}", image_size=16, progress=False)
    floor = evaluate_fid(**kw)
    rfid = evaluate_fid(**kw, through_tokenizer=str(model / "tokenizer"))
    assert rfid["generated"]["through_tokenizer"].endswith("tokenizer") and "(rFID)" in _line(rfid)
    assert rfid["fid"] > floor["fid"] + 1.0, (rfid["fid"], floor["fid"])
    from mage.evaluate import feature_network, reference_stats

    feats = reference_stats(feature_network(f"judge:{judge}"), "synthetic", "test", 60, 16)["features"]  # cached
    path = tmp_path / "ref.npz"
    np.savez(path, features=np.asarray(feats, np.float16))
    again = evaluate_fid(**kw, ref_stats=str(path))
    assert abs(again["fid"] - floor["fid"]) < 1e-2 * max(1.0, floor["fid"]), (again["fid"], floor["fid"])
    with pytest.raises(Exception, match="--through-tokenizer goes with --images"):
        evaluate_fid(model=str(model), data="synthetic", num=4, through_tokenizer=str(model / "tokenizer"))


def _line(r):
    from mage.evaluate import fid_line

    return fid_line(r)


def test_metrics_selection_and_no_inception_score():
    from mage.errors import MageError
    from mage.evaluate import check_metrics, compare

    assert check_metrics("kid") == ("fid", "kid") and check_metrics("fid,kid,pr") == ("fid", "kid", "pr")
    with pytest.raises(MageError, match="Inception Score needs the Inception's 1008-way logits"):
        check_metrics("fid,is")
    with pytest.raises(MageError, match="unknown metric foo"):
        check_metrics("foo")
    rng = np.random.default_rng(0)
    ref_f, gen = rng.standard_normal((50, 4)), rng.standard_normal((40, 4))
    mu, sigma = gaussian_stats(ref_f)
    ref = {"mu": mu, "sigma": sigma, "features": ref_f}
    assert set(compare(ref, gen, metrics=("fid",))) == {"fid"}
    assert set(compare(ref, gen)) == {"fid", "kid", "kid_std", "precision", "recall"}
