"""Recognition: probe head, few-shot sampling, probe on synthetic shapes, classify round trip."""

import dataclasses
import json

import pytest
import torch

from mage.checkpoint import load_checkpoint
from mage.config import mage_preset, pretrain_preset
from mage.errors import MageError
from mage.pretrain import pretrain
from mage.recognition import ProbeHead, few_shot, pool_features, sample_shots, train_probe
from test_pretrain import tiny_setup  # noqa: F401  (fixture)
from test_tokenizer import run_cli


def test_probe_head_shapes_and_frozen_norm():
    h = ProbeHead(32, 5)
    assert h(torch.randn(7, 32)).shape == (7, 5)
    assert [n for n, p in h.named_parameters() if p.requires_grad] == ["linear.weight", "linear.bias"]


def test_pool_features_mean_cls_flat():
    h = torch.randn(3, 1 + 4, 6)  # [B, 1+L, D]: position 0 is the class token
    assert torch.equal(pool_features(h, "cls"), h[:, 0])
    flat = pool_features(h, "flat")
    assert flat.shape == (3, 4 * 6) and torch.equal(flat[:, 6:12], h[:, 2])  # token 1's feature, in raster order
    assert torch.allclose(pool_features(h, "mean"), flat.view(3, 4, 6).mean(1))
    try:
        pool_features(h, "max")
        raise AssertionError("no error for an unknown pool")
    except MageError as e:
        assert "mean | cls | flat" in str(e)


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
    pretrain(
        mage_preset("tiny"),
        dataclasses.replace(pretrain_preset("tiny"), max_steps=20),
        str(tmp_path / "m"),
        cache=cache,
        progress=False,
    )
    before, _, _ = load_checkpoint(str(tmp_path / "m"))
    r = run_cli(
        "probe",
        "linear",
        "--model",
        str(tmp_path / "m"),
        "--data",
        "synthetic",
        "--limit",
        "200",
        "--epochs",
        "30",
        "--out",
        str(tmp_path / "clf"),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["top1"] > 25  # 4 shape classes: above chance after only 20 steps (the learning itself is
    # checked on separable features in test_probe_and_few_shot_learn_separable_features)
    after, _, _ = load_checkpoint(str(tmp_path / "m"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the encoder is untouched
    r = run_cli(
        "probe",
        "few-shot",
        "--model",
        str(tmp_path / "m"),
        "--data",
        "synthetic",
        "--limit",
        "200",
        "--shots",
        "1,2",
        "--draws",
        "2",
        "--json",
    )
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
    (tmp_path / "imgs").mkdir()  # a folder: every image under it, same answers
    for i in range(3):
        save_image(ds[i][0], str(tmp_path / "imgs" / f"t{i}.png"))
    r = run_cli("classify", "--classifier", str(tmp_path / "clf"), str(tmp_path / "imgs"), "--top", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert [x["top"] for x in json.loads(r.stdout)] == [x["top"] for x in res]
    # a probe on every token's feature (--pool flat) saves a classifier that classify uses the same way
    r = run_cli(
        "probe",
        "linear",
        "--model",
        str(tmp_path / "m"),
        "--data",
        "synthetic",
        "--limit",
        "200",
        "--epochs",
        "5",
        "--pool",
        "flat",
        "--out",
        str(tmp_path / "clf-flat"),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    r = run_cli("classify", "--classifier", str(tmp_path / "clf-flat"), *paths, "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 3, r.stderr
    # the tokens-only baseline: every token's code vector, no MAGE
    from mage.recognition import embed_dataset
    from mage.vqgan import VQTokenizer

    t = VQTokenizer.from_pretrained(tok)
    r = embed_dataset(f"codes:{tok}", "synthetic", "test", limit=8, progress=False)
    assert r["features"].shape == (8, t.config.num_tokens * t.config.code_dim)
    x = torch.stack([load_dataset("synthetic", "test", t.config.image_size, limit=8)[i][0] for i in range(2)])
    assert torch.equal(r["features"][:2], t.quantize.embedding(t.encode(x).long()).flatten(1))
    r = run_cli(
        "probe",
        "few-shot",
        "--model",
        f"codes:{tok}",
        "--data",
        "synthetic",
        "--limit",
        "100",
        "--shots",
        "1",
        "--draws",
        "2",
        "--json",
    )
    assert r.returncode == 0 and set(json.loads(r.stdout.strip().splitlines()[-1])) == {"1"}, r.stderr
    r = run_cli("probe", "linear", "--model", "codes:/no/such/tokenizer", "--data", "synthetic")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("probe", "linear", "--model", str(tmp_path / "m"), "--data", "synthetic", "--pool", "max")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "unknown pool" in r.stderr
    (tmp_path / "bad.png").write_text("nope")
    r = run_cli("classify", "--classifier", str(tmp_path / "clf"), str(tmp_path / "bad.png"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where the device tool lends one)")
def test_features_and_token_cache_on_cuda(tiny_setup, tmp_path):  # noqa: F811
    """On a GPU machine the pipeline loads onto CUDA: images from the CPU must reach it, features come back."""
    from mage.pipeline import MAGEPipeline
    from mage.pretrain import TokenCache, cache_tokens
    from mage.recognition import extract_features

    _, tok, _ = tiny_setup
    pretrain(
        mage_preset("tiny"),
        dataclasses.replace(pretrain_preset("tiny"), max_steps=2),
        str(tmp_path / "m"),
        cache=tiny_setup[2],
        progress=False,
    )
    x = torch.rand(4, 3, 16, 16)
    cpu, gpu = (MAGEPipeline.from_pretrained(str(tmp_path / "m"), device=d) for d in ("cpu", "cuda"))
    f_cpu = extract_features(cpu.model, cpu.tokenizer, x)
    f_gpu = extract_features(gpu.model, gpu.tokenizer, x)
    assert f_gpu.device.type == "cpu" and torch.allclose(f_cpu, f_gpu, atol=2e-2)  # TF32 on the GPU
    a = TokenCache(
        cache_tokens(tok, "synthetic", str(tmp_path / "a.safetensors"), limit=16, progress=False, device="cpu")
    )
    b = TokenCache(
        cache_tokens(tok, "synthetic", str(tmp_path / "b.safetensors"), limit=16, progress=False, device="cuda")
    )
    assert (a.views == b.views).float().mean() > 0.99  # nearest-code ties may break differently
    # the linear probe trains on the GPU there and hands back a CPU head that scores like the CPU one
    from mage.recognition import accuracy, train_probe

    f = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    y = (f[:, 0] > 0).long() + 2 * (f[:, 1] > 0).long()
    heads = [train_probe(f, y, 4, epochs=5, batch_size=32, progress=False, device=d) for d in ("cpu", "cuda")]
    assert all(next(h.parameters()).device.type == "cpu" for h in heads)
    with torch.no_grad():
        acc = [accuracy(h(f), y) for h in heads]
    assert acc[1] > 80 and abs(acc[0] - acc[1]) < 3, acc


# --------------------------------------------------------------------------------------------------
# fine-tuning
# --------------------------------------------------------------------------------------------------
def _pretrained(tiny_setup, tmp_path):  # noqa: F811
    _, _, cache = tiny_setup
    pretrain(
        mage_preset("tiny"),
        dataclasses.replace(pretrain_preset("tiny"), max_steps=4),
        str(tmp_path / "m"),
        cache=cache,
        progress=False,
    )
    return str(tmp_path / "m"), cache


def test_layer_decay_and_pretrained_weights(tiny_setup, tmp_path):  # noqa: F811
    from mage.finetune import MAGEClassifier, layer_decay_groups

    model_dir, _ = _pretrained(tiny_setup, tmp_path)
    w, cfg, _ = load_checkpoint(model_dir)
    m = MAGEClassifier(cfg, 4, drop_path=0.1)
    m.load_pretrained(w, model_dir)
    assert torch.equal(m.blocks[1].mlp.fc2.weight, w["blocks.1.mlp.fc2.weight"])
    assert torch.equal(m.token_emb.word_embeddings.weight, w["token_emb.word_embeddings.weight"])
    groups = layer_decay_groups(m, 0.05, 0.5)
    scale = {n: g["lr_scale"] for g in groups for p in g["params"] for n, q in m.named_parameters() if q is p}
    depth = cfg.depth
    assert scale["token_emb.word_embeddings.weight"] == 0.5 ** (depth + 1)
    assert scale["blocks.0.attn.qkv.weight"] == 0.5**depth and scale["head.weight"] == 1.0
    wd = {n: g["weight_decay"] for g in groups for p in g["params"] for n, q in m.named_parameters() if q is p}
    assert wd["head.bias"] == 0.0 and wd["fc_norm.weight"] == 0.0 and wd["head.weight"] == 0.05


def test_finetune_trains_encoder_resumes_and_classifies(tiny_setup, tmp_path):  # noqa: F811
    from mage.checkpoint import load_weights, step_dirs
    from mage.config import finetune_preset
    from mage.finetune import finetune

    model_dir, cache = _pretrained(tiny_setup, tmp_path)
    cfg = finetune_preset("tiny")
    cfg = dataclasses.replace(cfg, max_steps=6, ckpt_every=3)
    r = finetune(cfg, model_dir, str(tmp_path / "ft"), data="synthetic", cache=cache, progress=False)
    assert r["step"] == 6 and 0 <= r["top1"] <= 100
    pre, _, _ = load_checkpoint(model_dir)
    ft = load_weights(step_dirs(str(tmp_path / "ft"))[-1][1])
    assert not torch.equal(pre["blocks.0.attn.qkv.weight"], ft["blocks.0.attn.qkv.weight"])  # the encoder trains
    # interrupted at step 3, resumed: the same weights as the straight run
    finetune(cfg, model_dir, str(tmp_path / "ft2"), data="synthetic", cache=cache, progress=False, stop_at=3)
    finetune(cfg, model_dir, str(tmp_path / "ft2"), data="synthetic", cache=cache, progress=False, resume=True)
    ft2 = load_weights(step_dirs(str(tmp_path / "ft2"))[-1][1])
    assert all(torch.equal(ft[k], ft2[k]) for k in ft)
    with pytest.raises(MageError, match="already holds a run"):
        finetune(cfg, model_dir, str(tmp_path / "ft2"), data="synthetic", cache=cache, progress=False)
    from mage.data import load_dataset
    from mage.transforms import save_image

    save_image(load_dataset("synthetic", "test", 16, limit=1)[0][0], str(tmp_path / "t.png"))
    res = run_cli("classify", "--classifier", str(tmp_path / "ft"), str(tmp_path / "t.png"), "--json")
    assert res.returncode == 0, res.stderr
    top = json.loads(res.stdout)[0]["top"]
    assert top[0]["class"] in ("circle", "square", "triangle", "cross")


def test_finetune_compile_is_one_graph_and_falls_back(tiny_setup, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--compile for fine-tuning: the classifier's training forward (drop-path on) is one graph; a compiler that
    fails on the first step costs one warning line, and the run ends with the eager run's exact weights."""
    import dataclasses

    from mage.checkpoint import load_weights, step_dirs
    from mage.config import finetune_preset
    from mage.finetune import MAGEClassifier, finetune

    model_dir, cache = _pretrained(tiny_setup, tmp_path)
    _, mcfg, _ = load_checkpoint(model_dir)
    m = MAGEClassifier(dataclasses.replace(mcfg, num_classes=0, contrastive_weight=0.0), 4, drop_path=0.1).train()
    tokens = torch.randint(0, mcfg.codebook_size, (4, mcfg.num_tokens))
    torch.compile(m, fullgraph=True, backend="eager")(tokens).sum().backward()  # raises on a graph break

    def broken(module, **kw):
        def f(*a, **k):
            raise RuntimeError("no compiler here")

        return f

    cfg = finetune_preset("tiny")
    cfg = dataclasses.replace(cfg, max_steps=3, ckpt_every=3)
    finetune(cfg, model_dir, str(tmp_path / "eager"), cache=cache, progress=False)
    monkeypatch.setattr(torch, "compile", broken)
    cfg = dataclasses.replace(cfg, compile="default")
    finetune(cfg, model_dir, str(tmp_path / "fb"), cache=cache, progress=False)
    assert (
        "warning: --compile default failed (RuntimeError: no compiler here); training eagerly"
        in capsys.readouterr().out
    )
    a, b = (load_weights(step_dirs(str(tmp_path / d))[-1][1]) for d in ("eager", "fb"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_cli(tiny_setup, tmp_path):  # noqa: F811
    model_dir, _ = _pretrained(tiny_setup, tmp_path)
    r = run_cli(
        "finetune",
        "--model",
        model_dir,
        "--data",
        "synthetic",
        "--limit",
        "32",
        "--preset",
        "tiny",
        "--set",
        "max_steps=3",
        "--out",
        str(tmp_path / "ft"),
    )
    assert r.returncode == 0, r.stderr
    assert "test top-1" in r.stdout
    r = run_cli("finetune", "--model", str(tmp_path / "nope"), "--data", "synthetic", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_cli(
        "finetune", "--model", model_dir, "--data", "synthetic", "--compile", "fastest", "--out", str(tmp_path / "y")
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "mage: error: bad config: compile: unknown compile mode 'fastest' "
        "(choose from: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs)"
    ]
