"""Pre-training: token cache, CLI, bit-exact resume, DDP equivalence (2 gloo ranks), official import, errors."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import rel_err
from mage.checkpoint import save_checkpoint
from mage.config import finetune_preset, mage_preset, pretrain_preset, replace_fields, tokenizer_preset
from mage.errors import MageError
from mage.model import MAGE
from mage.pretrain import cache_tokens, pretrain
from mage.vqgan import VQTokenizer
from test_tokenizer import ENV, run_cli


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A (random) tiny tokenizer and a token cache of 64 synthetic images."""
    root = tmp_path_factory.mktemp("pre")
    torch.manual_seed(0)
    tok = VQTokenizer(tokenizer_preset("tiny"))
    save_checkpoint(str(root / "tok"), tok.state_dict(), tok.config)
    cache = cache_tokens(str(root / "tok"), "synthetic", str(root / "cache.safetensors"), limit=64, progress=False)
    return root, str(root / "tok"), cache


def _cfg(**kw):
    """The tiny (architecture, recipe) pair with ``kw`` routed to whichever has the field."""
    kw = {"max_steps": 10, "log_every": 1, "ckpt_every": 5, **kw}
    return replace_fields((mage_preset("tiny"), pretrain_preset("tiny")), **kw)


def test_cache_has_flip_views(tiny_setup):
    from mage.pretrain import TokenCache

    _, _, cache = tiny_setup
    tc = TokenCache(cache)
    assert tc.views.shape == (64, 2, 16) and tc.labels.shape == (64,)
    assert tc.classes and not torch.equal(tc.views[:, 0], tc.views[:, 1])


def test_cache_crop_views(tiny_setup, tmp_path):
    """--crops K adds K seeded random-resized-crop views after the image and its mirror."""
    from mage.errors import MageError
    from mage.pretrain import TokenCache

    _, tok, cache = tiny_setup
    paths = [
        cache_tokens(tok, "synthetic", str(tmp_path / f"c{i}.safetensors"), limit=64, progress=False, crops=2)
        for i in range(2)
    ]
    a, b, base = TokenCache(paths[0]), TokenCache(paths[1]), TokenCache(cache)
    assert a.views.shape == (64, 4, 16) and a.meta["crops"] == "2"
    assert torch.equal(a.views[:, :2], base.views) and torch.equal(a.views, b.views)  # same seed, same crops
    assert not torch.equal(a.views[:, 2], a.views[:, 0]) and not torch.equal(a.views[:, 2], a.views[:, 3])
    with pytest.raises(MageError, match="crop"):
        cache_tokens(tok, "synthetic", str(tmp_path / "bad.safetensors"), limit=64, progress=False, crop_scale=0)


def test_pretrain_runs_and_learns(tiny_setup, tmp_path):
    _, tok, cache = tiny_setup
    cfg = _cfg(max_steps=40, dropout=0.0, blr=4e-3, ckpt_every=40)
    res = pretrain(*cfg, str(tmp_path / "run"), cache=cache, progress=False)
    log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    assert len(log) == 40 and res["step"] == 40
    assert sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    assert (tmp_path / "run" / "curve.png").is_file()
    assert (tmp_path / "run" / "tokenizer" / "model.safetensors").is_file()
    m = MAGE.from_pretrained(str(tmp_path / "run"))
    assert m.config.num_tokens == 16


def test_resume_is_bit_exact(tiny_setup, tmp_path):
    _, tok, cache = tiny_setup
    cfg = _cfg()  # dropout 0.1 on: its RNG must be restored too
    pretrain(*cfg, str(tmp_path / "a"), cache=cache, progress=False)
    pretrain(*_cfg(), str(tmp_path / "b"), cache=cache, progress=False, stop_at=3)
    pretrain(*_cfg(), str(tmp_path / "b"), cache=cache, progress=False, resume=True)
    a = MAGE.from_pretrained(str(tmp_path / "a")).state_dict()
    b = MAGE.from_pretrained(str(tmp_path / "b")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(l)["loss"] for l in open(tmp_path / "a" / "log.jsonl")]
    lb = [json.loads(l)["loss"] for l in open(tmp_path / "b" / "log.jsonl")]
    assert la == lb
    # starting afresh over run b would lose it (its newer checkpoints would even outlive the new run's): refused
    before = sorted(os.listdir(tmp_path / "b" / "checkpoints"))
    with pytest.raises(MageError, match="already holds a run.*--resume"):
        pretrain(*_cfg(), str(tmp_path / "b"), cache=cache, progress=False)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == before
    with pytest.raises(MageError, match="other settings.*embed_dim 32 -> 64"):  # resuming with other widths
        pretrain(*_cfg(embed_dim=64), str(tmp_path / "b"), cache=cache, progress=False, resume=True)
    r = run_cli("pretrain", "--cache", cache, "--preset", "tiny", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and r.stderr.startswith("mage: error:") and "--resume" in r.stderr, r.stderr


def test_a_run_cut_short_logs_its_last_step(tiny_setup, tmp_path):
    """Stopped between log steps (time budget, interruption), the run still reports a loss, not nan."""
    _, _, cache = tiny_setup
    res = pretrain(*_cfg(log_every=5), str(tmp_path / "s"), cache=cache, progress=False, stop_at=3)
    assert res["step"] == 3 and math.isfinite(res["loss"])
    assert [json.loads(l)["step"] for l in open(tmp_path / "s" / "log.jsonl")] == [3]


def test_ddp_two_ranks_match_one(tiny_setup, tmp_path):
    """torchrun with 2 gloo ranks and the same global batch gives the losses of a 1-rank run."""
    _, tok, cache = tiny_setup
    common = [
        "pretrain",
        "--cache",
        cache,
        "--preset",
        "tiny",
        "--max-steps",
        "4",
        "--set",
        "dropout=0.0",
        "--set",
        "log_every=1",
        "--set",
        "batch_size=8",
    ]
    r1 = run_cli(*common, "--out", str(tmp_path / "one"))
    assert r1.returncode == 0, r1.stderr
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    port = str(29500 + os.getpid() % 1000)
    r2 = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port",
            port,
            "-m",
            "mage",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r2.returncode == 0, r2.stderr[-2000:]
    l1 = [json.loads(l)["loss"] for l in open(tmp_path / "one" / "log.jsonl")]
    l2 = [json.loads(l)["loss"] for l in open(tmp_path / "two" / "log.jsonl")]
    assert len(l1) == len(l2) == 4
    assert all(abs(a - b) < 1e-4 * abs(a) for a, b in zip(l1, l2)), (l1, l2)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler")
@pytest.mark.parametrize(
    "mode",
    [
        "default",
        pytest.param(
            "reduce-overhead",
            marks=pytest.mark.skipif(
                not CUDA, reason="CUDA graphs need a CUDA GPU (run where the device tool lends one)"
            ),
        ),
    ],
)
def test_compile_trains_like_eager(tiny_setup, tmp_path, capsys, mode):
    """--compile (inductor) gives the eager run's losses (no dropout, so no RNG difference), without falling back.
    On a GPU (where pretrain runs by itself) also with CUDA graphs; bf16 autocast there, hence the looser bound."""
    _, _, cache = tiny_setup
    kw = dict(max_steps=4, dropout=0.0, contrastive_weight=0.1, ckpt_every=4)
    pretrain(*_cfg(**kw), str(tmp_path / "eager"), cache=cache, progress=False)
    pretrain(*_cfg(**kw, compile=mode), str(tmp_path / "compiled"), cache=cache, progress=False)
    assert "warning" not in capsys.readouterr().out
    le = [json.loads(l)["loss"] for l in open(tmp_path / "eager" / "log.jsonl")]
    lc = [json.loads(l)["loss"] for l in open(tmp_path / "compiled" / "log.jsonl")]
    tol = 2e-2 if CUDA else 1e-4
    assert len(le) == 4 and all(abs(a - b) < tol * abs(a) for a, b in zip(le, lc)), (le, lc)


def test_compile_failure_falls_back_to_eager(tiny_setup, tmp_path, capsys, monkeypatch):
    """A compiler that fails on the first step costs a warning, not the run: the eager run's exact losses."""
    _, _, cache = tiny_setup

    def broken(module, **kw):
        def f(*a, **k):
            raise RuntimeError("no compiler here\nsecond line")

        return f

    pretrain(*_cfg(max_steps=3), str(tmp_path / "eager"), cache=cache, progress=False)
    monkeypatch.setattr(torch, "compile", broken)
    pretrain(*_cfg(max_steps=3, compile="reduce-overhead"), str(tmp_path / "fb"), cache=cache, progress=False)
    out = capsys.readouterr().out
    assert "warning: --compile reduce-overhead failed (RuntimeError: no compiler here); training eagerly" in out
    le = [json.loads(l)["loss"] for l in open(tmp_path / "eager" / "log.jsonl")]
    assert le == [json.loads(l)["loss"] for l in open(tmp_path / "fb" / "log.jsonl")]


def test_import_official_cli(official_a, expected, tmp_path):
    r = run_cli(
        "import-official",
        "--mage",
        str(official_a / "mage_official.pth"),
        "--out",
        str(tmp_path / "imp"),
        "--num-heads",
        "4",
        "--decoder-num-heads",
        "4",
    )
    assert r.returncode == 0, r.stderr
    assert "decoder_pred.weight" in r.stdout  # legacy keys are listed
    m = MAGE.from_pretrained(str(tmp_path / "imp"))
    with torch.no_grad():
        assert rel_err(m.logits(expected["tokens_in"]), expected["logits"]) < 1e-4
    tok = VQTokenizer.from_pretrained(str(tmp_path / "imp" / "tokenizer"))
    assert torch.equal(tok.encode(expected["images"]), expected["vq_indices"])


def test_bad_inputs(tiny_setup, tmp_path):
    root, tok, cache = tiny_setup
    (tmp_path / "bad.pth").write_bytes(b"\x00garbage")
    bad_dir = tmp_path / "badckpt"
    bad_dir.mkdir()
    (bad_dir / "model.safetensors").write_bytes(b"garbage")
    (bad_dir / "config.json").write_text(json.dumps({"type": "MAGEConfig"}))
    cases = [
        ("import-official", "--mage", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "o1")),
        ("pretrain", "--cache", cache, "--preset", "fmnist-32", "--out", str(tmp_path / "o2")),  # codebook mismatch
        ("pretrain", "--cache", cache, "--preset", "nope", "--out", str(tmp_path / "o3")),
        ("pretrain", "--cache", cache, "--preset", "tiny", "--init", str(bad_dir), "--out", str(tmp_path / "o4")),
        (
            "pretrain",
            "--data",
            "synthetic",
            "--tokenizer",
            str(tmp_path / "missing"),
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "o5"),
        ),
        ("pretrain", "--cache", cache, "--preset", "tiny", "--compile", "fastest", "--out", str(tmp_path / "o6")),
    ]
    for args in cases:
        r = run_cli(*args)
        lines = [l for l in r.stderr.strip().splitlines() if l.strip() and "%|" not in l]
        assert r.returncode == 2, (args, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("mage: error:"), (args, r.stderr)


def test_mage_c_loss_finite_and_decreasing(tiny_setup, tmp_path):
    _, _, cache = tiny_setup
    cfg = _cfg(contrastive_weight=0.1, max_steps=30, blr=3e-3)
    pretrain(*cfg, str(tmp_path / "c"), cache=cache, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "c" / "log.jsonl")]
    c = [r["contrastive"] for r in rows]
    assert all(map(math.isfinite, c)) and all(math.isfinite(r["loss"]) for r in rows)
    assert sum(c[-5:]) / 5 < sum(c[:5]) / 5, c  # InfoNCE goes down
    m = MAGE.from_pretrained(str(tmp_path / "c"))
    assert m.contrastive_head is not None  # the same checkpoints, with the head


def test_schedule_by_steps_and_by_wall_time():
    from mage.engine import Schedule

    s = Schedule(lr=1.0, total=100, warmup=10, min_lr=0.1)
    assert s(0) == 0 and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0) and s(100) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 100))  # cosine: never back up
    timed = Schedule(lr=1.0, total=100, warmup=10, max_minutes=1.0)  # the clock may run ahead of the steps
    assert timed(20, elapsed_s=0) == pytest.approx(s.__class__(1.0, 100, 10)(20))
    assert timed(20, elapsed_s=30) == pytest.approx(Schedule(1.0, 100, 10)(50)) and timed(20, elapsed_s=60) == 0
    assert timed.progress(20, 30) == 0.5 and timed.progress(70, 30) == 0.7


def test_gpu_presets_keep_the_fmnist_model():
    """fmnist-32-gpu changes the recipe only: its checkpoints load wherever fmnist-32's do."""
    cpu, gpu = mage_preset("fmnist-32"), mage_preset("fmnist-32-gpu")
    arch = (
        "num_tokens",
        "codebook_size",
        "embed_dim",
        "depth",
        "num_heads",
        "decoder_embed_dim",
        "decoder_depth",
        "decoder_num_heads",
        "mlp_ratio",
    )
    assert [getattr(cpu, k) for k in arch] == [getattr(gpu, k) for k in arch]
    train = pretrain_preset("fmnist-32-gpu")
    assert train.blr * train.batch_size / 256 == pytest.approx(2e-3) and gpu.dropout == 0.1 and train.max_minutes == 0
    ft = finetune_preset("fmnist-32-gpu")
    assert ft.bf16 and ft.batch_size == 1024 and ft.layer_decay == finetune_preset("fmnist-32").layer_decay
