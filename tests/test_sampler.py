"""Iterative decoding: schedule invariants, determinism, editing masks, guidance, CLI."""

import dataclasses
import math

import pytest
import torch

from mage.checkpoint import save_checkpoint
from mage.config import mage_preset, tokenizer_preset
from mage.errors import MageError
from mage.model import MAGE
from mage.sampler import SCHEDULES, SamplerConfig, decode_tokens
from mage.vqgan import VQTokenizer
from test_tokenizer import run_cli


def tiny_model(num_classes=0):
    cfg = mage_preset("tiny")
    cfg = dataclasses.replace(cfg, num_classes=num_classes)
    torch.manual_seed(0)
    return MAGE(cfg).eval()


def test_unknown_count_follows_the_schedule():
    m = tiny_model()
    L, T = m.config.num_tokens, 8
    start = torch.full((3, L), m.vocab.mask_id)
    trace = []
    out = decode_tokens(
        m,
        start,
        SamplerConfig(steps=T, choice_temperature=4.5),
        generator=torch.Generator().manual_seed(0),
        trace=trace,
    )
    for s, ids in enumerate(trace[:-1]):
        expect = max(1, min(L - 1, math.floor(L * SCHEDULES["cosine"]((s + 1) / T))))
        n_unknown_before = L if s == 0 else int((trace[s - 1] == m.vocab.mask_id).sum(1)[0])
        expect = max(1, min(n_unknown_before - 1, math.floor(L * SCHEDULES["cosine"]((s + 1) / T))))
        assert ((ids == m.vocab.mask_id).sum(1) == expect).all(), (s, ids)
    assert (out != m.vocab.mask_id).all() and out.max() < m.vocab.codebook_size


def test_original_schedule_for_256_tokens_20_steps():
    """Tokens decided per step for T=20, L=256 as computed from the original code (MAGE.md 4.1)."""
    L, T, unknown, decided = 256, 20, 256, []
    for s in range(T):
        n = max(1, min(unknown - 1, math.floor(L * SCHEDULES["cosine"]((s + 1) / T))))
        decided.append(unknown - n if s < T - 1 else unknown)
        unknown = n
    assert decided[:10] == [1, 3, 4, 5, 7, 8, 10, 11, 13, 13]


def test_known_tokens_never_change_and_partial_schedule():
    m = tiny_model()
    L = m.config.num_tokens
    g = torch.Generator().manual_seed(1)
    known = torch.randint(0, m.vocab.codebook_size, (2, L), generator=g)
    start = known.clone()
    start[:, :6] = m.vocab.mask_id  # 6 unknown tokens
    trace = []
    out = decode_tokens(m, start, SamplerConfig(steps=4), generator=g, trace=trace)
    assert torch.equal(out[:, 6:], known[:, 6:])
    assert (out[:, :6] != m.vocab.mask_id).all()
    assert all(((t == m.vocab.mask_id).sum(1) <= 6).all() for t in trace)
    assert int((trace[0] == m.vocab.mask_id).sum(1)[0]) == math.floor(6 * SCHEDULES["cosine"](0.25))


def test_tokens_are_drawn_from_the_model_distribution():
    """One step from an all-[MASK] input: every row sees the same logits, so the sampled ids at a position must
    follow softmax(logits / temperature) -- an off-by-one in the inverse CDF would shift mass between codes."""
    m = tiny_model()
    with torch.no_grad():
        m.mlm_layer.bias[..., :32] = torch.linspace(-3, 3, 32)  # a clearly non-uniform distribution
    B, T = 6000, 0.7
    start = torch.full((B, 16), m.vocab.mask_id)
    out = decode_tokens(m, start, SamplerConfig(steps=1, temperature=T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.softmax(m.logits(start[:1])[0, 1:, :32].float() / T, -1)  # [16, 32]
    for j in (0, 7, 15):
        freq = torch.bincount(out[:, j], minlength=32).double() / B
        assert (freq - p[j]).abs().max() < 0.025, (j, freq, p[j])
    assert p.max() > 0.1


def test_determinism():
    m = tiny_model()
    start = torch.full((2, 16), m.vocab.mask_id)
    run = lambda seed: decode_tokens(m, start, SamplerConfig(steps=5), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_guidance_zero_equals_plain_conditional():
    m = tiny_model(num_classes=3)
    start = torch.full((2, 16), m.vocab.mask_id)
    labels = torch.tensor([0, 2])
    a = decode_tokens(m, start, SamplerConfig(steps=4, cfg=0.0), labels, torch.Generator().manual_seed(0))
    b = decode_tokens(m, start, SamplerConfig(steps=4), labels, torch.Generator().manual_seed(0))
    c = decode_tokens(m, start, SamplerConfig(steps=4, cfg=3.0), labels, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_sampler_settings():
    with pytest.raises(MageError):
        SamplerConfig(steps=0).check()
    with pytest.raises(MageError):
        SamplerConfig(schedule="nope").check()
    with pytest.raises(MageError):
        decode_tokens(tiny_model(), torch.full((1, 16), 33), SamplerConfig(steps=2), torch.tensor([1]))


def test_generate_cli(tmp_path):
    m = tiny_model(num_classes=4)
    save_checkpoint(str(tmp_path / "m"), m.state_dict(), m.config)
    tok = VQTokenizer(tokenizer_preset("tiny"))
    save_checkpoint(str(tmp_path / "m" / "tokenizer"), tok.state_dict(), tok.config)
    (tmp_path / "m" / "classes.json").write_text('["circle", "square", "triangle", "cross"]')
    r = run_cli(
        "generate", "--model", str(tmp_path / "m"), "--num", "4", "--steps", "3", "--out", str(tmp_path / "g.png")
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--num",
        "2",
        "--class",
        "square",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "d"),
    )
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "d").glob("*.png"))) == 2
    r = run_cli(
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--num",
        "2",
        "--classes",
        "all",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "all.png"),
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--num",
        "2",
        "--steps",
        "2",
        "--weights",
        "bf16",
        "--out",
        str(tmp_path / "w16.png"),
    )
    assert r.returncode == 0 and (tmp_path / "w16.png").is_file(), r.stderr
    for bad in (["--class", "dragon"], ["--steps", "0"], ["--class", "9"], ["--weights", "fp16"]):
        r = run_cli("generate", "--model", str(tmp_path / "m"), "--num", "2", *bad, "--out", str(tmp_path / "x.png"))
        assert r.returncode == 2 and r.stderr.startswith("mage: error:"), (bad, r.stderr)


def test_model_sampler_fills_flags_left_out(tmp_path):
    """A model folder's sampler.json is the default of every sampler flag not given; a bad one is one line."""
    import argparse
    import json

    from mage.commands.common import add_sampler_args, sampler_config

    p = argparse.ArgumentParser()
    add_sampler_args(p)
    (tmp_path / "sampler.json").write_text(json.dumps({"steps": 8, "choice_temperature": 3.0, "cfg": 4.0}))
    s = sampler_config(p.parse_args(["--cfg", "1"]), str(tmp_path))
    assert (s.steps, s.choice_temperature, s.cfg, s.temperature) == (8, 3.0, 1.0, 1.0)
    assert sampler_config(p.parse_args([]), None).steps == 20  # no model: the original's settings
    (tmp_path / "sampler.json").write_text(json.dumps({"stepz": 8}))
    with pytest.raises(MageError, match="cannot read .*sampler.json"):
        sampler_config(p.parse_args([]), str(tmp_path))
