"""Recognition: probe head, few-shot sampling, probe on synthetic shapes, classify round trip."""

import json

import torch

from mage.checkpoint import load_checkpoint
from mage.config import mage_preset
from mage.pretrain import pretrain
from mage.recognition import ProbeHead, few_shot, sample_shots, train_probe

from test_pretrain import tiny_setup  # noqa: F401  (fixture)
from test_tokenizer import run_cli


def test_probe_head_shapes_and_frozen_norm():
    h = ProbeHead(32, 5)
    assert h(torch.randn(7, 32)).shape == (7, 5)
    assert [n for n, p in h.named_parameters() if p.requires_grad] == ["linear.weight", "linear.bias"]


def test_sample_shots_exact_and_seeded():
    y = torch.arange(10).repeat(20)
    idx = sample_shots(y, 3, seed=1)
    assert torch.bincount(y[idx]).tolist() == [3] * 10
    assert torch.equal(idx, sample_shots(y, 3, seed=1)) and not torch.equal(idx, sample_shots(y, 3, seed=2))


def test_probe_and_few_shot_learn_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(4).repeat(100)
    x = centers[y] + torch.randn(400, 16, generator=g)
    head = train_probe(x[:300], y[:300], 4, epochs=20, batch_size=32, progress=False)
    acc = (head(x[300:]).argmax(1) == y[300:]).float().mean().item()
    assert acc > 0.9
    r = few_shot(x[:300], y[:300], x[300:], y[300:], [1, 5], draws=2)
    assert r["5"]["logreg_mean"] > 80 and r["1"]["proto_mean"] > 50


def test_probe_cli_classify_round_trip(tiny_setup, tmp_path):  # noqa: F811
    _, tok, cache = tiny_setup
    cfg = mage_preset("tiny")
    cfg.max_steps = 20
    pretrain(cfg, str(tmp_path / "m"), cache=cache, progress=False)
    before, _, _ = load_checkpoint(str(tmp_path / "m"))
    r = run_cli("probe", "linear", "--model", str(tmp_path / "m"), "--data", "synthetic", "--limit", "200",
                "--epochs", "30", "--out", str(tmp_path / "clf"), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["top1"] > 25          # 4 shape classes: above chance after only 20 steps (the learning itself is
                                   # checked on separable features in test_probe_and_few_shot_learn_separable_features)
    after, _, _ = load_checkpoint(str(tmp_path / "m"))
    assert all(torch.equal(before[k], after[k]) for k in before)   # the encoder is untouched
    r = run_cli("probe", "few-shot", "--model", str(tmp_path / "m"), "--data", "synthetic", "--limit", "200",
                "--shots", "1,2", "--draws", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout.strip().splitlines()[-1])) == {"1", "2"}
    from mage.data import load_dataset
    from mage.transforms import save_image
    ds = load_dataset("synthetic", "test", 16, limit=3)
    paths = []
    for i in range(3):
        save_image(ds[i][0], str(tmp_path / f"t{i}.png"))
        paths.append(str(tmp_path / f"t{i}.png"))
    r = run_cli("classify", "--classifier", str(tmp_path / "clf"), *paths, "--top", "2", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res) == 3 and len(res[0]["top"]) == 2 and abs(sum(t["prob"] for t in res[0]["top"])) <= 1.0 + 1e-6
    (tmp_path / "bad.png").write_text("nope")
    r = run_cli("classify", "--classifier", str(tmp_path / "clf"), str(tmp_path / "bad.png"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
