"""mage bench: the FLOP counter against the known ViT-B / MaskGIT-VQGAN counts, and a CLI smoke run."""

import json

import torch

from mage import bench
from mage.config import mage_preset, tokenizer_preset
from mage.model import MAGE
from mage.vqgan import VQTokenizer
from test_tokenizer import ENV, run_cli


def test_flop_counts_match_the_known_vit_b_numbers():
    # per image at 256 px (Performance issue): transformer forward 78.2 GFLOP over all 257 positions,
    # 54.5 with half the tokens dropped (training), VQGAN encode 128.8, decode 186.5
    with torch.device("meta"):  # shapes only: no memory, no compute
        m, tok = MAGE(mage_preset("vit-b")), VQTokenizer(tokenizer_preset("maskgit-256"))
    bench._live_modules[:] = [m, tok]
    with torch.no_grad(), bench.count_flops() as enc:
        tok.encoder(torch.empty(1, 3, 256, 256, device="meta"))
    with torch.no_grad(), bench.count_flops() as dec:
        tok.decoder(torch.empty(1, 256, 16, 16, device="meta"))
    with torch.no_grad(), bench.count_flops() as full:
        m.logits(torch.zeros(1, 256, dtype=torch.long, device="meta"))
    with torch.no_grad(), bench.count_flops() as train:
        m.encode(torch.zeros(1, 129, dtype=torch.long, device="meta"), None)
        m.decode(torch.empty(1, 257, 768, device="meta"), None, torch.zeros(1, 257, dtype=torch.bool, device="meta"))
    for got, want in ((enc, 128.8), (dec, 186.5), (full, 78.2), (train, 54.5)):
        assert abs(got["flops"] / 1e9 - want) / want < 0.01, (got, want)


def test_weights_stored_in_bf16_halve_memory_and_stay_close():
    from mage.precision import store_weights_bf16

    torch.manual_seed(0)
    m = MAGE(mage_preset("tiny")).eval()
    tokens = torch.randint(0, m.config.codebook_size, (2, m.config.num_tokens))
    ref = m.logits(tokens)
    size = lambda mod: sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))  # noqa: E731
    before = size(m)
    store_weights_bf16(m)
    assert size(m) < 0.6 * before  # the big weights are bf16 now
    assert m.blocks[0].mlp.fc1.weight.dtype == torch.float32  # used in fp32 (no bf16 autocast)
    got = m.logits(tokens)
    assert got.dtype == torch.float32 and not torch.equal(got, ref)  # rounded weights: close, not equal
    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item())


def test_explicit_attention_baseline_matches_sdpa():
    torch.manual_seed(0)
    from mage.model import Attention

    a = Attention(32, 4).eval()
    x = torch.randn(2, 9, 32)
    fast = a(x)
    with bench.original_mode(True):
        slow = a(x)
    assert torch.allclose(fast, slow, atol=1e-5) and Attention.forward is not bench._explicit_attention


def test_measure_counts_every_workload():
    got = {
        w: bench.measure(w, "tiny", 2, False, False, repeats=1)
        for w in ("train", "train+tok", "gen-2", "gen-4", "encode", "decode")
    }
    assert all(r["images_per_s"] > 0 and r["flops_per_image"] > 0 for r in got.values()), got
    assert got["gen-4"]["flops_per_image"] > got["gen-2"]["flops_per_image"] > got["decode"]["flops_per_image"]
    assert got["train+tok"]["flops_per_image"] == got["train"]["flops_per_image"] + got["encode"]["flops_per_image"]


def test_bench_cli_tiny(tmp_path, monkeypatch):
    out = tmp_path / "b.json"
    # --compile's rows without the compiler's minute: real compiling is tested in test_pretrain
    monkeypatch.setitem(ENV, "TORCH_COMPILE_DISABLE", "1")
    r = run_cli(
        "bench",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--precision",
        "fp32,w16",
        "--workloads",
        "train+tok,gen-2",
        "--baseline",
        "--compile",
        "--repeats",
        "1",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    w16 = [x for x in res["rows"] if x["precision"] == "w16"]
    assert [(x["workload"], x["mode"]) for x in w16] == [
        ("gen-2", "mage"),
        ("gen-2", "compiled"),
    ]  # inference only, no original way
    assert w16[0]["speedup_vs_original"] > 0
    rows = {(x["workload"], x["mode"]): x for x in res["rows"] if x["precision"] == "fp32"}
    # --compile adds a torch.compile row for the training and the generation workloads
    assert set(rows) == {(w, m) for w in ("train+tok", "gen-2") for m in ("mage", "original", "compiled")}
    for (_w, mode), x in rows.items():
        assert "error" not in x, x
        assert x["images_per_s"] > 0 and x["flops_per_image"] > 0 and x["peak_memory_gb"] > 0
        if mode != "original":
            assert x["speedup_vs_original"] > 0
    assert res["matmul_peak"]["fp32"]["gflops"] > 0 and "MFU" in r.stdout
    r = run_cli("bench", "--preset", "nope")
    assert r.returncode == 2 and "unknown bench preset" in r.stderr


def test_pipeline_bf16_computes_in_bf16_where_the_hardware_has_it():
    """MAGEPipeline(bf16=True): bf16 autocast + a channels-last VQGAN on bf16 hardware, plain fp32 elsewhere;
    the images come out fp32 in [0, 1] either way."""
    from mage.pipeline import MAGEPipeline
    from mage.precision import bf16_supported

    torch.manual_seed(0)
    model, tok = MAGE(mage_preset("tiny")), VQTokenizer(tokenizer_preset("tiny"))
    pipe = MAGEPipeline(model, tok, bf16=True)
    assert pipe.bf16 == bf16_supported("cpu")
    assert tok.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == pipe.bf16
    with pipe.math():
        assert torch.is_autocast_enabled("cpu") == pipe.bf16
    img = pipe.generate(3, seed=1)
    assert img.dtype == torch.float32 and img.shape == (3, 3, 16, 16) and 0 <= img.min() and img.max() <= 1
    assert torch.equal(pipe.generate(3, seed=1), img)  # still deterministic
    assert not MAGEPipeline(MAGE(mage_preset("tiny")), VQTokenizer(tokenizer_preset("tiny"))).bf16


def test_adamw_is_fused_on_cpu():
    from mage.distributed import adamw

    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = adamw([{"params": [p]}], torch.device("cpu"), lr=1e-2)
    assert opt.defaults["fused"] and not opt.defaults["foreach"]
    p.sum().backward()
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p.detach(), before)


def test_bench_agreement_cli(tmp_path):
    """mage bench --agreement MODEL: fp32 and fast-path token ids of the same seeds, one line."""
    from mage.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = MAGE(mage_preset("tiny"))
    save_checkpoint(str(tmp_path / "m"), m.state_dict(), m.config)
    tok = VQTokenizer(tokenizer_preset("tiny"))
    save_checkpoint(str(tmp_path / "m" / "tokenizer"), tok.state_dict(), tok.config)
    r = run_cli(
        "bench",
        "--agreement",
        str(tmp_path / "m"),
        "--num",
        "4",
        "--gen-steps",
        "2",
        "--json",
        str(tmp_path / "a.json"),
    )
    assert r.returncode == 0, r.stderr
    assert "token ids equal" in r.stdout
    got = json.loads((tmp_path / "a.json").read_text())
    assert got["num"] == 4 and 0 <= got["token_agreement"] <= 100
    r = run_cli("bench", "--agreement", str(tmp_path / "nothing"))
    assert r.returncode == 2 and r.stderr.startswith("mage: error:"), r.stderr
    for bad, needle in ((["--num", "0"], "--num: must be >= 1"), (["--gen-steps", "x"], "--gen-steps: expected")):
        r = run_cli("bench", "--agreement", str(tmp_path / "m"), *bad)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)


def test_data_workload_tiny(tmp_path, monkeypatch, capsys):
    """--workloads data: its own table (decode + crop-flip with 0 and 2 workers, cache-tokens, TokenCache RSS)."""
    import functools

    from mage.loader import default_workers

    monkeypatch.setenv("MAGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(
        bench,
        "measure_data",
        functools.partial(bench.measure_data, size=32, batch=4, tokenize_images=40, rss_rows=2000, root=str(tmp_path)),
    )
    res = bench.run_bench(["tiny"], 2, ["fp32"], [2], workloads=["data"], data_images=48)
    stages = [(r["stage"], r.get("workers")) for r in res["rows"]]
    tok_workers = min(default_workers(), 2)  # 40 images in batches of 32: 2 batches
    assert stages == [
        ("decode+crop-flip", 0),
        ("decode+crop-flip", 2),
        ("cache-tokens", tok_workers),
        ("token-cache-rss", None),
    ]
    assert all(r["workload"] == "data" for r in res["rows"]) and res["matmul_peak"] == {}
    assert all(r["images_per_s"] > 0 and r["images"] == 48 for r in res["rows"][:2])
    assert 0.5 < res["rows"][3]["rss_over_file"] < 1.2
    out = capsys.readouterr().out
    assert "decode+crop-flip" in out and "random-init tokenizer" in out and "MFU" not in out
    assert len(list((tmp_path / "mage-bench-data" / "48x32").rglob("*.jpg"))) == 48
