"""VQGAN tokenizer: shapes, invariants, gradients, save/load, training loop, CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from mage.checkpoint import save_checkpoint
from mage.config import tokenizer_preset, tokenizer_training_preset
from mage.data import load_dataset
from mage.errors import MageError
from mage.train_tokenizer import train_tokenizer
from mage.vqgan import VQTokenizer

ENV = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mage", *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600
    )


def tiny_tok(seed=0):
    torch.manual_seed(seed)
    return VQTokenizer(tokenizer_preset("tiny"))


def test_shapes_and_dtypes():
    tok = tiny_tok().eval()
    cfg = tok.config
    x = torch.rand(3, 3, cfg.image_size, cfg.image_size)
    ids = tok.encode(x)
    assert ids.dtype == torch.int64 and ids.shape == (3, cfg.num_tokens)
    assert 0 <= ids.min() and ids.max() < cfg.codebook_size
    y = tok.decode(ids)
    assert y.dtype == torch.float32 and y.shape == x.shape


def test_cpu_decode_in_chunks_equals_one_batch(monkeypatch):
    """decode() on a CPU splits big batches by CPU_DECODE_PIXELS (memory); the images are the same."""
    tok = tiny_tok().eval()
    ids = torch.randint(0, tok.config.codebook_size, (5, tok.config.num_tokens))
    whole = tok.decoder(tok.quantize.lookup(ids, (tok.grid_size, tok.grid_size)))
    calls = []
    monkeypatch.setattr(tok.decoder, "forward", lambda z, f=tok.decoder.forward: calls.append(len(z)) or f(z))
    monkeypatch.setattr(VQTokenizer, "CPU_DECODE_PIXELS", 2 * tok.config.image_size**2)
    assert torch.allclose(tok.decode(ids), whole, atol=1e-5) and calls == [2, 2, 1]


def test_encode_decode_round_trip_is_a_fixed_point():
    """Decoding the codes and re-encoding with the exact codebook vectors gives the same ids."""
    tok = tiny_tok().eval()
    x = torch.rand(2, 3, 16, 16)
    ids = tok.encode(x)
    zq = tok.quantize.lookup(ids, (tok.grid_size, tok.grid_size))
    assert torch.equal(tok.quantize.nearest(zq), ids)
    # same input, same ids; straight-through output equals the code vectors
    assert torch.equal(tok.encode(x), ids)
    st, ids2, _, _ = tok.quantize(tok.encoder(x))
    assert torch.allclose(st, zq, atol=1e-6) and torch.equal(ids2, ids)


def test_every_parameter_gets_a_gradient():
    tok = tiny_tok().train()
    x = torch.rand(4, 3, 16, 16)
    rec, ids, cb, commit = tok(x)
    ((rec - x).abs().mean() + cb + 0.25 * commit).backward()
    for n, p in tok.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_save_load_round_trip(tmp_path):
    tok = tiny_tok().eval()
    save_checkpoint(str(tmp_path / "tok"), tok.state_dict(), tok.config)
    tok2 = VQTokenizer.from_pretrained(str(tmp_path / "tok"))
    x = torch.rand(2, 3, 16, 16)
    assert tok2.config == tok.config
    assert torch.equal(tok2.encode(x), tok.encode(x))
    # the original file layout round-trips too (it has no config: GroupNorm groups are inferred as
    # 32, or the largest of 16/8/4/2 dividing the width, so build one that follows that rule)
    cfg = tokenizer_preset("tiny")
    cfg = dataclasses.replace(cfg, norm_groups=8)
    tok = VQTokenizer(cfg).eval()
    torch.save({"state_dict": tok.state_dict()}, tmp_path / "orig.ckpt")
    tok3 = VQTokenizer.from_pretrained(str(tmp_path / "orig.ckpt"))
    assert torch.equal(tok3.encode(x), tok.encode(x))


def test_training_improves_and_resumes_exactly(tmp_path):
    cfg = tokenizer_preset("tiny")
    recipe = dataclasses.replace(
        tokenizer_training_preset("tiny"), max_steps=16, ckpt_every=8, sample_every=8, adversarial_start=4
    )
    train = load_dataset("synthetic", "train", cfg.image_size, "flip", limit=64)
    val = load_dataset("synthetic", "val", cfg.image_size, limit=32)
    m = train_tokenizer(cfg, recipe, train, str(tmp_path / "a"), val, progress=False)
    log = [json.loads(l) for l in open(tmp_path / "a" / "log.jsonl")]
    assert log[-1]["rec"] < log[0]["rec"]
    assert 0 < m["usage"] <= 100 and m["perplexity"] >= 1
    assert (tmp_path / "a" / "samples" / "recon-0000016.png").is_file()
    # k steps, then resume to N == N straight
    train_tokenizer(cfg, recipe, train, str(tmp_path / "b"), progress=False, stop_at=6)
    train_tokenizer(cfg, recipe, train, str(tmp_path / "b"), resume=True, progress=False)
    a = VQTokenizer.from_pretrained(str(tmp_path / "a")).state_dict()
    b = VQTokenizer.from_pretrained(str(tmp_path / "b")).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(MageError, match="already holds a run"):  # not over a finished run without --resume
        train_tokenizer(cfg, recipe, train, str(tmp_path / "b"), progress=False)


def test_bad_inputs():
    tok = tiny_tok()
    with pytest.raises(MageError):
        tok.encode(torch.rand(1, 3, 15, 15))
    with pytest.raises(MageError):
        tok.decode(torch.full((1, 16), 10_000))


def test_cli_train_reconstruct_and_errors(tmp_path):
    r = run_cli(
        "train-tokenizer",
        "--data",
        "synthetic",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "tok"),
        "--limit",
        "64",
        "--set",
        "max_steps=6",
    )
    assert r.returncode == 0, r.stderr
    assert "val PSNR" in r.stdout
    r = run_cli("reconstruct", "--tokenizer", str(tmp_path / "tok"), "--data", "synthetic", "--limit", "32", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"psnr", "usage", "perplexity"} <= set(m)
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "in.png")
    r = run_cli(
        "reconstruct",
        "--tokenizer",
        str(tmp_path / "tok"),
        "--input",
        str(tmp_path / "in.png"),
        "--out",
        str(tmp_path / "rec.png"),
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "rec.png").size == (16, 16)
    # bad inputs: one line, exit 2
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    (tmp_path / "bogus.ckpt").write_bytes(b"garbage")
    cases = [
        ("train-tokenizer", "--data", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x")),
        (
            "reconstruct",
            "--tokenizer",
            str(tmp_path / "tok"),
            "--input",
            str(tmp_path / "corrupt.png"),
            "--out",
            str(tmp_path / "y.png"),
        ),
        ("reconstruct", "--tokenizer", str(tmp_path / "bogus.ckpt"), "--data", "synthetic"),
        ("train-tokenizer", "--data", "synthetic", "--preset", "nope", "--out", str(tmp_path / "z")),
    ]
    for args in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("mage: error:"), r.stderr
        assert "Traceback" not in r.stderr


def test_dead_code_restart_seeds_where_quantization_is_worst():
    # 90% of the encoder outputs sit on one live code (think black background), 10% are far from every code:
    # k-means++ seeding puts the restarted codes on the far ones, uniform seeding would put ~90% on the crowd
    from mage.train_tokenizer import _restart_dead_codes

    tok = VQTokenizer(tokenizer_preset("tiny"))
    K, C = tok.config.codebook_size, tok.config.code_dim
    with torch.no_grad():
        tok.quantize.embedding.weight.zero_()
    usage = torch.zeros(K)
    usage[0] = 1.0  # only code 0 (at the origin) is live
    flat = torch.zeros(200, C)
    flat[:20] = torch.randn(20, C) * 5 + 10  # 20 of 200 outputs are far away
    z = flat.reshape(2, 10, 10, C).permute(0, 3, 1, 2)  # [B, C, H, W]
    n = _restart_dead_codes(tok, usage, z, torch.Generator().manual_seed(0))
    assert n == K - 1
    new = tok.quantize.embedding.weight[1:].detach()
    on_crowd = (new.norm(dim=1) < 1.0).float().mean().item()
    assert on_crowd < 0.05, f"{on_crowd:.0%} of restarted codes landed on the crowded point"
    assert torch.equal(tok.quantize.embedding.weight[0], torch.zeros(C))  # live codes stay


def test_reconstruction_metrics_position_entropy():
    from mage.train_tokenizer import reconstruction_metrics

    tok = VQTokenizer(tokenizer_preset("tiny"))
    ds = load_dataset("synthetic", "test", 16, "none", limit=8)
    m = reconstruction_metrics(tok, ds)
    assert (
        0.0 <= m["position_entropy"] <= torch.log(torch.tensor(float(min(8, tok.config.codebook_size)))).item() + 1e-6
    )


def test_channels_last_is_a_layout_not_a_change():
    """channels_last() (bf16 inference) stores the conv weights NHWC; fp32 results stay within rounding."""
    tok = tiny_tok().eval()
    x = torch.rand(3, 3, tok.config.image_size, tok.config.image_size)
    ids = tok.encode(x)
    img = tok.decode(ids)
    tok.channels_last()
    w = tok.encoder.conv_in.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert torch.equal(tok.encode(x), ids)
    out = tok.decode(ids)
    assert out.is_contiguous() and torch.allclose(out, img, atol=1e-4)
    assert tok.state_dict()["encoder.conv_in.weight"].shape == w.shape


def test_tokenizer_ddp_two_ranks_match_one(tmp_path):
    """train-tokenizer under torchrun (2 gloo ranks, the discriminator and dead-code restarts included) gives the
    losses of a 1-rank run with the same global batch."""
    import os
    import subprocess
    import sys

    common = ["train-tokenizer", "--data", "synthetic", "--preset", "tiny", "--limit", "64", "--max-steps", "8",
              "--workers", "0", "--set", "log_every=1", "--set", "adversarial_start=2",
              "--set", "dead_code_restart_every=3"]  # fmt: skip
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    r1 = subprocess.run([sys.executable, "-m", "mage", *common, "--out", str(tmp_path / "one")], env=env,
                        capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r1.returncode == 0, r1.stderr[-2000:]
    port = str(29700 + os.getpid() % 1000)
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", port,
                         "-m", "mage", *common, "--out", str(tmp_path / "two")],
                        capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert r2.returncode == 0, r2.stderr[-2000:]
    l1 = [json.loads(line) for line in open(tmp_path / "one" / "log.jsonl")]
    l2 = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert len(l1) == len(l2) == 8 and any(r["d_loss"] > 0 for r in l1)
    for a, b in zip(l1, l2):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(a["loss"]) and a["restarted"] == b["restarted"], (a, b)
