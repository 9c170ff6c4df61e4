"""Safe by default: no loader runs code from a file (a real exec payload is refused, naming its global); import
never guesses head counts; every state dict loads strictly and corrupt files give one line; nothing is deleted or
replaced that the command did not create (import-official --out, demo --fresh)."""

import argparse
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rel_err
from mage.checkpoint import save_checkpoint, step_dirs, torch_load_official
from mage.cli import main as cli_main
from mage.config import mage_preset, pretrain_preset, replace_fields, tokenizer_preset, tokenizer_training_preset
from mage.errors import MageError, UnsafeFileError
from mage.model import MAGE
from mage.official import resolve_heads
from mage.vqgan import VQTokenizer
from test_pretrain import tiny_setup  # noqa: F401  (fixture)
from test_tokenizer import run_cli


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
class SystemPayload:
    """Unpickling this runs ``os.system('touch MARKER')``: the classic pickle exploit."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecPayload:
    """Unpickling this runs ``exec(...)``, which writes MARKER."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


PAYLOADS = [(SystemPayload, "system"), (ExecPayload, "builtins.exec")]


def cli(capsys, *args) -> tuple[int, str]:
    """``mage ARGS`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mage: error: "), err
    assert "Traceback" not in err
    return lines[0]


def official_parts(official_a) -> dict:
    return torch.load(official_a / "mage_official.pth", map_location="cpu", weights_only=True)


def training_checkpoint(sd: dict, **args) -> dict:
    """What the original's ``util/misc.py save_model`` writes every epoch."""
    first = next(iter(sd.values()))
    return {
        "model": sd,
        "optimizer": {
            "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(first)}},
            "param_groups": [{"lr": 2.4e-3, "betas": (0.9, 0.95), "weight_decay": 0.05, "params": [0]}],
        },
        "epoch": 1599,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
        "args": argparse.Namespace(batch_size=64, epochs=1600, mask_ratio_min=0.5, blr=1.5e-4, **args),
    }


def import_cli(capsys, mage_file, out, *flags) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(["import-official", "--mage", str(mage_file), "--out", str(out), *map(str, flags)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# --------------------------------------------------------------------------------------------------
# 1. no loader runs code
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload,name", PAYLOADS)
def test_import_official_refuses_an_exec_payload(tmp_path, payload, name):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "mage-vitb.pth"
    torch.save({"model": {"token_emb.word_embeddings.weight": torch.zeros(2, 2)}, "args": payload(marker)}, evil)
    r = run_cli("import-official", "--mage", str(evil), "--out", str(tmp_path / "imp"))
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr)
    assert name in line and "could run code" in line and "argparse.Namespace" in line, line
    assert not marker.exists() and not (tmp_path / "imp").exists()
    for load in (MAGE.from_pretrained, VQTokenizer.from_pretrained, torch_load_official):  # the Python API too
        with pytest.raises(UnsafeFileError, match=name):
            load(str(evil))
    assert not marker.exists()


def _plant(run_dir, marker, payload=SystemPayload):
    """Replace the train state of every checkpoint of a run by an exec payload."""
    for _, path in step_dirs(str(run_dir)):
        torch.save({"step": 1, "optimizers": {}, "task": payload(marker)}, os.path.join(path, "train_state.pt"))


def test_pretrain_resume_refuses_a_planted_train_state(tiny_setup, tmp_path):  # noqa: F811
    from mage.pretrain import pretrain

    _, _, cache = tiny_setup
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    arch, recipe = replace_fields((mage_preset("tiny"), pretrain_preset("tiny")), max_steps=1, ckpt_every=1)
    pretrain(arch, recipe, str(run), cache=cache, progress=False)
    _plant(run, marker)
    before = sorted(os.listdir(run / "checkpoints"))
    r = run_cli("pretrain", "--out", str(run), "--resume", "--max-steps", "3")
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr)
    assert "train_state.pt" in line and "system" in line and "could run code" in line, line
    assert not marker.exists()
    assert sorted(os.listdir(run / "checkpoints")) == before  # the run was neither continued nor restarted


def test_train_tokenizer_resume_refuses_a_planted_train_state(tmp_path):
    from mage.data import load_dataset
    from mage.train_tokenizer import train_tokenizer

    run, marker = tmp_path / "tok", tmp_path / "MARKER"
    recipe = dataclasses.replace(tokenizer_training_preset("tiny"), max_steps=1, ckpt_every=1, batch_size=4)
    train = load_dataset("synthetic", "train", 16, "none", None, 0, 16)
    train_tokenizer(tokenizer_preset("tiny"), recipe, train, str(run), progress=False)
    _plant(run, marker, ExecPayload)
    r = run_cli("train-tokenizer", "--data", "synthetic", "--limit", "16", "--out", str(run), "--resume")
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr)
    assert "builtins.exec" in line and "train_state.pt" in line, line
    assert not marker.exists()


def test_original_training_checkpoint_imports(official_a, expected, tmp_path, capsys):
    """{'model', 'optimizer', 'epoch', 'scaler', 'args': Namespace} loads (Namespace is allow-listed)."""
    f = tmp_path / "checkpoint-1599.pth"
    torch.save(training_checkpoint(official_parts(official_a)["model"], model="mage_vit_base_patch16"), f)
    code, out, err = import_cli(capsys, f, tmp_path / "imp", "--num-heads", 4, "--decoder-num-heads", 4)
    assert code == 0, err
    assert "4/4 heads from the flags" in out
    with torch.no_grad():
        m = MAGE.from_pretrained(str(tmp_path / "imp"))
        assert rel_err(m.logits(expected["tokens_in"]), expected["logits"]) < 1e-4


# --------------------------------------------------------------------------------------------------
# 2. import never guesses head counts
# --------------------------------------------------------------------------------------------------
def test_import_without_head_counts_asks_for_the_flags(official_a, tmp_path, capsys):
    code, _, err = import_cli(capsys, official_a / "mage_official.pth", tmp_path / "imp")
    line = one_line_error(err)
    assert code == 2 and "--num-heads" in line and "--decoder-num-heads" in line and "64/64" in line, line
    assert not (tmp_path / "imp").exists()
    # args.model naming a released model whose widths are not the weights': no guess either
    f = tmp_path / "named.pth"
    torch.save(training_checkpoint(official_parts(official_a)["model"], model="mage_vit_base_patch16"), f)
    code, _, err = import_cli(capsys, f, tmp_path / "imp")
    line = one_line_error(err)
    assert code == 2 and "mage_vit_base_patch16" in line and "--num-heads" in line, line


def test_import_takes_head_counts_from_the_checkpoint_args(official_a, expected, tmp_path, capsys):
    f = tmp_path / "checkpoint-last.pth"
    sd = official_parts(official_a)["model"]
    torch.save(training_checkpoint(sd, model="mage_vit_tiny", num_heads=4, decoder_num_heads=4), f)
    code, out, err = import_cli(capsys, f, tmp_path / "imp")
    assert code == 0, err
    assert "4/4 heads from its args" in out
    assert json.loads((tmp_path / "imp" / "import.json").read_text())["heads"]["from"] == "its args"
    with torch.no_grad():
        m = MAGE.from_pretrained(str(tmp_path / "imp"))
        assert rel_err(m.logits(expected["tokens_in"]), expected["logits"]) < 1e-4


def test_resolve_heads_sources():
    ns = argparse.Namespace
    assert resolve_heads({"model": {}}, "f", 768, 768, None, None) == (12, 16, "the released widths")
    assert resolve_heads({"model": {}}, "f", 1024, 1024, None, None)[:2] == (16, 16)
    large = {"model": {}, "args": ns(model="mage_vit_large_patch16")}
    assert resolve_heads(large, "f", 1024, 1024, None, None) == (16, 16, "args.model mage_vit_large_patch16")
    assert resolve_heads(large, "f", 1024, 1024, 8, None) == (8, 16, "the flags + args.model mage_vit_large_patch16")
    assert resolve_heads({"model": {}, "args": {"num_heads": 6}}, "f", 768, 768, None, None)[:2] == (6, 16)
    assert resolve_heads({"model": {}}, "f", 96, 96, 3, 2) == (3, 2, "the flags")
    with pytest.raises(MageError, match="pass --decoder-num-heads"):  # one flag given, the other unknown
        resolve_heads({"model": {}}, "f", 96, 96, 3, None)
    with pytest.raises(MageError, match="pass --num-heads and --decoder-num-heads"):  # 96 // 64 is no answer
        resolve_heads({"model": {}}, "f", 96, 96, None, None)
    with pytest.raises(MageError, match="args.num_heads is 'x'"):
        resolve_heads({"model": {}, "args": ns(num_heads="x")}, "f", 96, 96, None, None)


# --------------------------------------------------------------------------------------------------
# 3. every state dict loads strictly; corrupt files give one line
# --------------------------------------------------------------------------------------------------
def _probe_classifier(folder, head_sd=None, meta=None):
    """A linear-probe classifier folder (the model it names need not exist: the head is read first)."""
    os.makedirs(folder, exist_ok=True)
    head_sd = head_sd or {
        "fc_norm.weight": torch.ones(8),
        "fc_norm.bias": torch.zeros(8),
        "bn.running_mean": torch.zeros(8),
        "bn.running_var": torch.ones(8),
        "bn.num_batches_tracked": torch.tensor(0),
        "linear.weight": torch.zeros(3, 8),
        "linear.bias": torch.zeros(3),
    }
    save_file(head_sd, os.path.join(folder, "head.safetensors"))
    meta = meta or {"kind": "linear-probe", "model": str(folder), "pool": "mean", "image_size": 16}
    (folder / "classifier.json").write_text(json.dumps({"classes": ["a", "b", "c"], **meta}))


def test_classify_corrupt_classifier_folders(tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    cases = {}
    d = tmp_path / "empty-json"
    _probe_classifier(d)
    (d / "classifier.json").write_bytes(b"")
    cases[d] = "classifier.json: the file is empty"
    d = tmp_path / "bad-json"
    _probe_classifier(d)
    (d / "classifier.json").write_text('{"classes": [')
    cases[d] = "cannot read classifier"
    d = tmp_path / "no-classes"
    _probe_classifier(d)
    (d / "classifier.json").write_text(json.dumps({"kind": "linear-probe", "model": "m"}))
    cases[d] = "classes, image_size, pool missing or invalid"
    d = tmp_path / "empty-head"
    _probe_classifier(d)
    (d / "head.safetensors").write_bytes(b"")
    cases[d] = "head.safetensors: the file is empty"
    d = tmp_path / "garbage-head"
    _probe_classifier(d)
    (d / "head.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    cases[d] = "cannot read classifier head"
    d = tmp_path / "extra-key"
    _probe_classifier(d)
    sd = {"linear.weight": torch.zeros(3, 8), "linear.bias": torch.zeros(3), "rogue": torch.zeros(1)}
    save_file(sd, str(d / "head.safetensors"))
    cases[d] = "weights do not fit the model (missing ['bn.num_batches_tracked'"
    d = tmp_path / "bad-shape"
    _probe_classifier(d)
    sd = load_file(str(d / "head.safetensors"))
    sd["bn.running_var"] = torch.ones(9)
    save_file(sd, str(d / "head.safetensors"))
    cases[d] = "shape mismatch for bn.running_var"
    for folder, want in cases.items():
        code, err = cli(capsys, "classify", "--classifier", folder, image)
        line = one_line_error(err)
        assert code == 2 and want in line, (folder.name, line)


def test_finetuned_classifier_and_pretrained_encoder_load_strictly(tmp_path, capsys):
    from mage.finetune import MAGEClassifier

    cfg = mage_preset("tiny")
    clf = MAGEClassifier(cfg, 3)
    sd = clf.state_dict()
    sd["head.weight"] = torch.zeros(4, cfg.embed_dim)  # a head for 4 classes, 3 named
    d = tmp_path / "ft"
    save_checkpoint(str(d / "model"), sd, cfg)
    (d / "classifier.json").write_text(
        json.dumps(
            {"kind": "finetune", "model": "model", "tokenizer": "tokenizer", "classes": list("abc"), "image_size": 16}
        )
    )
    code, err = cli(capsys, "classify", "--classifier", d, tmp_path / "x.png")
    assert code == 2 and "shape mismatch for head.weight" in one_line_error(err)
    (d / "model" / "model.safetensors").write_bytes(b"")
    code, err = cli(capsys, "classify", "--classifier", d, tmp_path / "x.png")
    assert code == 2 and "model.safetensors: the file is empty" in one_line_error(err)
    # fine-tuning starts from pre-trained blocks: a mis-shaped one is one line, the head may be missing
    w = MAGE(cfg).state_dict()
    MAGEClassifier(cfg, 3).load_pretrained(w, "pre")
    w["blocks.0.attn.qkv.weight"] = w["blocks.0.attn.qkv.weight"][:-1]
    with pytest.raises(MageError, match="pre: shape mismatch for blocks.0.attn.qkv.weight"):
        MAGEClassifier(cfg, 3).load_pretrained(w, "pre")


def test_pretrain_init_loads_strictly(tiny_setup, tmp_path):  # noqa: F811
    from mage.pretrain import pretrain

    _, _, cache = tiny_setup
    arch, recipe = replace_fields((mage_preset("tiny"), pretrain_preset("tiny")), max_steps=1)
    w = MAGE(arch).state_dict()
    w["norm.weight"] = torch.ones(arch.embed_dim + 1)
    save_checkpoint(str(tmp_path / "init"), w, arch)
    with pytest.raises(MageError, match=r"--init .*init: shape mismatch for norm.weight"):
        pretrain(arch, recipe, str(tmp_path / "run"), cache=cache, progress=False, init=str(tmp_path / "init"))


def test_agreement_with_a_corrupt_judge(tmp_path, capsys):
    from mage.evaluate import Judge

    model = tmp_path / "mage"
    cfg = mage_preset("tiny")
    save_checkpoint(str(model), MAGE(cfg).state_dict(), cfg)
    tok = VQTokenizer(tokenizer_preset("tiny"))
    save_checkpoint(str(model / "tokenizer"), tok.state_dict(), tok.config)
    meta = {"classes": list("abc"), "width": 4, "image_size": 16, "test_accuracy": 90.0}
    good = {k: v.contiguous() for k, v in Judge(3, 4).state_dict().items()}
    cases = []
    for name, json_text, weights, want in [
        ("empty-json", "", good, "judge.json: the file is empty"),
        ("bad-json", "{", good, "cannot read judge"),
        ("no-width", json.dumps({**meta, "width": None}), good, "classes, width, image_size"),
        ("empty-weights", json.dumps(meta), None, "judge.safetensors: the file is empty"),
        ("wider", json.dumps({**meta, "width": 8}), good, "shape mismatch for body.0.weight"),
        ("extra", json.dumps(meta), {**good, "rogue": torch.zeros(1)}, "unexpected ['rogue']"),
    ]:
        d = tmp_path / name
        d.mkdir()
        (d / "judge.json").write_text(json_text)
        if weights is None:
            (d / "judge.safetensors").write_bytes(b"")
        else:
            save_file(weights, str(d / "judge.safetensors"))
        cases.append((d, want))
    for d, want in cases:
        code, err = cli(capsys, "evaluate", "agreement", "--model", model, "--judge", d, "--per-class", 1)
        line = one_line_error(err)
        assert code == 2 and want in line, (d.name, line)


# --------------------------------------------------------------------------------------------------
# 4. nothing deleted or replaced that the command did not create
# --------------------------------------------------------------------------------------------------
def test_import_official_out_is_never_someone_elses(official_a, tmp_path, capsys):
    from mage.importer import import_official

    src = official_a / "mage_official.pth"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = import_cli(capsys, src, mine, "--num-heads", 4, "--decoder-num-heads", 4)
    line = one_line_error(err)
    assert code == 2 and "not an earlier import" in line, line
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = import_cli(capsys, src, afile, "--num-heads", 4, "--decoder-num-heads", 4)
    assert code == 2 and "not a folder" in one_line_error(err) and afile.read_text() == "x"

    out = tmp_path / "imp"
    import_official(str(src), None, str(out), 4, 4)
    assert sorted(os.listdir(out)) == ["config.json", "import.json", "model.safetensors", "tokenizer"]
    first = (out / "model.safetensors").stat().st_mtime_ns
    import_official(str(src), None, str(out), 4, 4)  # over its own earlier output: fine
    assert sorted(os.listdir(out)) == ["config.json", "import.json", "model.safetensors", "tokenizer"]
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]  # no staging folder left behind
    (out / "features").mkdir()  # something another command (or the user) put in the import
    code, _, err = import_cli(capsys, src, out, "--num-heads", 4, "--decoder-num-heads", 4)
    line = one_line_error(err)
    assert code == 2 and "holds features" in line, line
    assert (out / "features").is_dir() and (out / "tokenizer").is_dir()


def test_demo_fresh_removes_only_what_the_demo_wrote(tmp_path, capsys):
    from mage.demo import MANIFEST, claim, prepare_out

    out = tmp_path / "demo"
    assert prepare_out(str(out), fresh=True) == [] and out.is_dir()  # a new folder
    claim(str(out), ["stages.json", "mage", "tokens-train.safetensors"])
    (out / "stages.json").write_text("{}")
    (out / "mage" / "checkpoints").mkdir(parents=True)
    (out / ".tmp-stages.json-abc123").write_text("half")  # leftovers of writes the demo made
    (out / "tokens-train.safetensors.tmp").write_text("half")
    assert prepare_out(str(out), fresh=False) == []  # resuming its own folder: nothing removed
    assert sorted(prepare_out(str(out), fresh=True)) == sorted(
        ["stages.json", "mage", ".tmp-stages.json-abc123", "tokens-train.safetensors.tmp"]
    )
    assert os.listdir(out) == []

    # a file the demo did not write: refused, with or without --fresh, and nothing is removed
    claim(str(out), ["stages.json"])
    (out / "stages.json").write_text("{}")
    (out / "my-notes.txt").write_text("keep me")
    for fresh in (True, False):
        with pytest.raises(MageError, match="holds my-notes.txt, which the demo did not write"):
            prepare_out(str(out), fresh)
    assert sorted(os.listdir(out)) == sorted([MANIFEST, "stages.json", "my-notes.txt"])

    # a folder the demo never wrote (no manifest): refused, through the CLI too
    user = tmp_path / "results"
    user.mkdir()
    (user / "report.html").write_text("mine")
    code, err = cli(capsys, "demo", "--fresh", "--out", user)
    line = one_line_error(err)
    assert code == 2 and "was not made by 'mage demo'" in line, line
    assert (user / "report.html").read_text() == "mine"
    (out / MANIFEST).write_text("")  # a corrupt manifest: one line, nothing removed
    with pytest.raises(MageError, match="cannot read demo manifest"):
        prepare_out(str(out), True)
    assert (out / "my-notes.txt").is_file()
