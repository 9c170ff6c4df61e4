"""Safe by default: odd inputs either work or are refused in one line (exit 2), as kinds -- numeric flags,
output paths, images, outpaint extents, single-class data, caches keyed by what they were made from."""

import errno
import json
import os
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mage import cli
from mage.checkpoint import save_checkpoint, save_step
from mage.config import mage_preset, tokenizer_preset
from mage.data import check_classes, load_dataset
from mage.errors import MageError
from mage.model import MAGE
from mage.transforms import MAX_PIXELS, load_image
from mage.vqgan import VQTokenizer


def run(*argv: str) -> tuple[int, str]:
    """``mage ARGV`` in this process: (exit code, stderr), parse errors included."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("mage: error: "), err
    assert "Traceback" not in err and "Error:" not in lines[0].split("mage: error: ", 1)[1], err
    for n in needles:
        assert n in lines[0], (n, err)


def tiny_tok(seed: int = 0) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(tokenizer_preset("tiny"))


def png(path, size=(16, 16), color=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder: checkpoints/step-0000001 (tiny MAGE), tokenizer/."""
    d = tmp_path_factory.mktemp("inputs") / "run"
    torch.manual_seed(0)
    m = MAGE(mage_preset("tiny"))
    save_step(str(d), 1, m.state_dict(), m.config)
    tok = tiny_tok()
    save_checkpoint(str(d / "tokenizer"), tok.state_dict(), tok.config)
    return d


def _folder(root, classes: dict[str, int], size=(16, 16)):
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            png(root / c / f"{i}.png", size, (40 * i % 255, 100 if c == "a" else 200, 50))
    return root


# --------------------------------------------------------------------------------------------------
# 1. numeric flags
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--temperature", "nan"], "finite"),
        (["--temperature", "0"], "must be > 0"),
        (["--choice-temperature", "-1"], "must be >= 0"),
        (["--cfg", "inf"], "finite"),
        (["--seed", str(2**64)], "<= 9223372036854775807"),
        (["--seed", "-1"], "must be >= 0"),
        (["--seed", "1.5"], "expected an integer"),
    ],
)
def test_sampler_flags_refuse_non_finite_and_out_of_range(flags, needle, tmp_path):
    one_line_error(*run("generate", "--model", "m", "--out", str(tmp_path / "o.png"), *flags), needle)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["cache-tokens", "--tokenizer", "t", "--data", "synthetic", "--out", "c.safetensors", "--crops", "-1"],
            ">= 0",
        ),
        (["cache-tokens", "--tokenizer", "t", "--data", "synthetic", "--out", "c.st", "--crop-scale", "0"], "> 0"),
        (["cache-tokens", "--tokenizer", "t", "--data", "synthetic", "--out", "c.st", "--crop-scale", "1.5"], "<= 1"),
        (["cache-tokens", "--tokenizer", "t", "--data", "synthetic", "--out", "c.st", "--crop-scale", "nan"], "finite"),
        (["probe", "few-shot", "--model", "pixels", "--data", "synthetic", "--seed", "99999999999999999999"], "<="),
        (["pretrain", "--out", "r", "--max-minutes", "inf"], "finite"),
        (["evaluate", "fid", "--epochs", "nan"], "finite"),
    ],
)
def test_other_numeric_flags(argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(*run(*argv), needle)


def test_seed_edge_is_accepted_and_generates(tiny_run):
    from mage.pipeline import MAGEPipeline
    from mage.sampler import SamplerConfig

    args = cli.build_parser().parse_args(["generate", "--model", "m", "--out", "o.png", "--seed", str(2**63 - 1)])
    assert args.seed == 2**63 - 1
    pipe = MAGEPipeline.from_pretrained(str(tiny_run), device="cpu")
    out = pipe.generate(2, sampler=SamplerConfig(steps=2), seed=args.seed, batch_size=1)  # seed + batch index
    assert out.shape == (2, 3, 16, 16)


# --------------------------------------------------------------------------------------------------
# 2. --out paths
# --------------------------------------------------------------------------------------------------
@pytest.fixture()
def where(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir.png").mkdir()
    (tmp_path / "dir").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--model", "m", "--out", ""], "empty"),
        (["generate", "--model", "m", "--out", "{w}/a_file/x.png"], "a_file is a file, not a folder"),
        (["generate", "--model", "m", "--out", "{w}/a_file"], "it is a file, not a folder"),  # folder of PNGs
        (["generate", "--model", "m", "--out", "{w}/a_dir.png"], "it is a folder, not a file"),
        (["inpaint", "--model", "m", "--image", "i", "--box", "0,0,1,1", "--out", "{w}/dir"], "folder, not a file"),
        (["outpaint", "--model", "m", "--image", "i", "--extend", "left=8", "--out", "{w}/a_file/o/x.png"], "a_file"),
        (["pretrain", "--cache", "c", "--out", "{w}/a_file"], "it is a file, not a folder"),
        (["pretrain", "--cache", "c", "--out", ""], "empty"),
        (["finetune", "--model", "m", "--out", "{w}/a_file/run"], "a_file is a file"),
        (["train-tokenizer", "--data", "synthetic", "--out", "{w}/a_file"], "it is a file"),
        (["cache-tokens", "--tokenizer", "t", "--data", "synthetic", "--out", "{w}/dir"], "folder, not a file"),
        (["cache-tokens", "--tokenizer", "t", "--data", "synthetic", "--out", "{w}/a_file/c.safetensors"], "a_file"),
        (["embed", "--model", "m", "--data", "synthetic", "--out", "{w}/dir"], "folder, not a file"),
        (["probe", "linear", "--model", "m", "--data", "synthetic", "--out", "{w}/a_file"], "it is a file"),
        (["evaluate", "train-judge", "--data", "synthetic", "--out", "{w}/a_file"], "it is a file, not a folder"),
        (["evaluate", "fid", "--model", "m", "--data", "synthetic", "--out", "{w}/dir"], "folder, not a file"),
        (["evaluate", "agreement", "--grid", "{w}/a_file/g.png"], "a_file is a file"),
        (["bench", "--json", "{w}/dir"], "folder, not a file"),
        (["demo", "--out", "{w}/a_file"], "it is a file"),
    ],
)
def test_bad_out_paths_are_one_line(argv, needle, where):
    one_line_error(*run(*[a.format(w=where) for a in argv]), needle)


def test_reconstruct_out_kind_follows_the_input(where, tmp_path):
    img = png(tmp_path / "in.png")
    save_checkpoint(str(tmp_path / "tok"), tiny_tok().state_dict(), tiny_tok().config)
    one_line_error(
        *run("reconstruct", "--tokenizer", str(tmp_path / "tok"), "--input", img, "--out", str(where / "dir"))
    )
    code, err = run(
        "reconstruct", "--tokenizer", str(tmp_path / "tok"), "--input", img, "--out", str(tmp_path / "o.png")
    )
    assert code == 0 and (tmp_path / "o.png").is_file(), err


@pytest.mark.parametrize(
    "exc, line",
    [
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "runs/x"), "cannot write runs/x: Not a directory"),
        (FileExistsError(errno.EEXIST, "File exists", "runs/x"), "cannot write runs/x: File exists"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "runs/.tmp-1", None, "runs/x"), "cannot write runs/x:"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ],
)
def test_os_errors_while_running_are_one_line(exc, line, monkeypatch):
    def boom(args):
        raise exc

    monkeypatch.delenv("MAGE_DEBUG", raising=False)
    monkeypatch.setitem(cli.RUN, "generate", boom)
    code, err = run("generate", "--model", "m", "--out", "x.png")
    one_line_error(code, err, line)


def test_a_real_os_error_inside_a_command(tmp_path, monkeypatch):
    """The path was fine when parsed, then a file took its place: the write fails in one line, exit 2."""
    (tmp_path / "blocker").write_text("x")

    def write(args):
        os.makedirs(os.path.join(str(tmp_path / "blocker"), "sub"))

    monkeypatch.setitem(cli.RUN, "generate", write)
    code, err = run("generate", "--model", "m", "--out", str(tmp_path / "ok.png"))
    one_line_error(code, err, "cannot write", "blocker")


# --------------------------------------------------------------------------------------------------
# 3. images
# --------------------------------------------------------------------------------------------------
def _odd_images(d):
    """name -> (path, expected [3] mean colour or None, expected (H, W))."""
    out = {}
    im = Image.new("RGB", (30, 20), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    im.save(d / "exif.jpg", exif=exif)
    out["exif"] = (d / "exif.jpg", None, (30, 20))
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(d / "g16.png")
    assert Image.open(d / "g16.png").mode == "I;16"
    out["I;16"] = (d / "g16.png", (1.0, 1.0, 1.0), (20, 30))
    Image.fromarray(np.full((20, 30), 32768, np.int32)).save(d / "i32.tiff")
    assert Image.open(d / "i32.tiff").mode == "I"
    out["I"] = (d / "i32.tiff", (0.5, 0.5, 0.5), (20, 30))
    Image.new("CMYK", (30, 20), (0, 255, 0, 0)).save(d / "cmyk.jpg")
    out["CMYK"] = (d / "cmyk.jpg", (1.0, 0.0, 1.0), (20, 30))
    p = Image.new("P", (30, 20), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.save(d / "pal.png", transparency=0)
    out["P"] = (d / "pal.png", (0.0, 1.0, 0.0), (20, 30))
    p = Image.new("P", (30, 20), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.save(d / "pal_clear.png", transparency=0)
    out["P transparent"] = (d / "pal_clear.png", (1.0, 1.0, 1.0), (20, 30))  # on white
    Image.new("L", (30, 20), 51).save(d / "grey.png")
    out["L"] = (d / "grey.png", (0.2, 0.2, 0.2), (20, 30))
    Image.new("1", (30, 20), 1).save(d / "bw.png")
    out["1"] = (d / "bw.png", (1.0, 1.0, 1.0), (20, 30))
    Image.new("LA", (30, 20), (0, 0)).save(d / "la.png")
    out["LA"] = (d / "la.png", (1.0, 1.0, 1.0), (20, 30))
    Image.new("RGBA", (30, 20), (0, 0, 255, 255)).save(d / "rgba.png")
    out["RGBA opaque"] = (d / "rgba.png", (0.0, 0.0, 1.0), (20, 30))
    Image.new("RGBA", (30, 20), (0, 0, 255, 0)).save(d / "rgba_clear.webp", lossless=True)
    out["RGBA clear"] = (d / "rgba_clear.webp", (1.0, 1.0, 1.0), (20, 30))
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    out["GIF"] = (d / "anim.gif", (1.0, 0.0, 0.0), (20, 30))
    frames[0].save(d / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    out["WebP"] = (d / "anim.webp", (1.0, 0.0, 0.0), (20, 30))
    return out


def test_odd_but_valid_images_load(tmp_path):
    for name, (path, colour, hw) in _odd_images(tmp_path).items():
        x = load_image(path)
        assert x.dtype == torch.float32 and tuple(x.shape) == (3, *hw), name
        assert 0 <= x.min() and x.max() <= 1, name
        if colour is not None:
            assert torch.allclose(x.mean((1, 2)), torch.tensor(colour), atol=0.02), (name, x.mean((1, 2)))


def _forged_png(path, w, h):
    """A PNG whose header claims w x h (RGB, 8 bit) followed by a few bytes of data: decoding it would fail."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def test_oversized_image_refused_from_its_header(tmp_path, monkeypatch):
    monkeypatch.delenv("MAGE_MAX_PIXELS", raising=False)
    assert 20000 * 20000 > MAX_PIXELS
    big = _forged_png(tmp_path / "huge.png", 20000, 20000)
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    with pytest.raises(MageError, match=r"huge.png is too large \(400,000,000 pixels\): the limit is 67,108,864") as e:
        load_image(big)
    assert not loads and "\n" not in str(e.value)  # refused before any decoding (PIL's own check, our words)
    _forged_png(tmp_path / "big.png", 9000, 9000)  # over the limit, under PIL's twice-the-limit refusal
    with pytest.raises(MageError, match=r"big.png is too large \(9000x9000 = 81,000,000 pixels\)"):
        load_image(tmp_path / "big.png")
    assert not loads


@pytest.mark.parametrize("side", [12, 30])  # PIL's warning range (limit..2x) and its error range (> 2x)
def test_the_limit_is_configurable_and_pil_says_it_in_our_words(side, tmp_path, monkeypatch):
    path = png(tmp_path / "x.png", (side, side))
    monkeypatch.setenv("MAGE_MAX_PIXELS", "100")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning leaks out either
        with pytest.raises(MageError, match="too large.*MAGE_MAX_PIXELS"):
            load_image(path)
    assert Image.MAX_IMAGE_PIXELS == 100
    monkeypatch.setenv("MAGE_MAX_PIXELS", "0")  # no limit
    assert load_image(path).shape == (3, side, side)
    monkeypatch.setenv("MAGE_MAX_PIXELS", "lots")
    with pytest.raises(MageError, match="MAGE_MAX_PIXELS must be"):
        load_image(path)


def test_oversized_file_in_a_folder_is_skipped_with_its_name_and_labels_stay(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data", {"a": 2, "b": 2})
    png(root / "a" / "1.png", (40, 40), (0, 0, 0))  # a/1.png is the big one
    monkeypatch.setenv("MAGE_MAX_PIXELS", "1000")
    ds = load_dataset(f"folder:{root}", "all", 16)
    assert ds.files == ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]
    with pytest.warns(RuntimeWarning, match=r"a/1.png is too large"):
        image, label = ds.item(1, 0)
    assert label == 1 and torch.equal(image, ds.item(2, 0)[0])  # b/0.png, with b's label
    assert [ds.item(i, 0)[1] for i in (0, 3)] == [0, 1]
    assert ds.skipped == [str(root / "a" / "1.png")]
    monkeypatch.setenv("MAGE_MAX_PIXELS", "-5")
    with pytest.raises(MageError, match="MAGE_MAX_PIXELS must be"):
        load_dataset(f"folder:{root}", "all", 16)


def test_one_oversized_input_is_one_line(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MAGE_MAX_PIXELS", "1000")
    big = png(tmp_path / "big.png", (40, 40))
    code, err = run(
        "inpaint", "--model", str(tiny_run), "--image", big, "--box", "0,0,4,4", "--out", str(tmp_path / "o.png")
    )
    one_line_error(code, err, "big.png is too large (40x40")
    code, err = run(
        "reconstruct", "--tokenizer", str(tiny_run / "tokenizer"), "--input", big, "--out", str(tmp_path / "r.png")
    )
    one_line_error(code, err, "too large")


# --------------------------------------------------------------------------------------------------
# 4. outpaint extents
# --------------------------------------------------------------------------------------------------
def test_absurd_outpaint_is_refused_at_once(tiny_run, tmp_path):
    import time

    from mage.pipeline import MAX_EXTEND, MAGEPipeline, outpaint

    pipe = MAGEPipeline.from_pretrained(str(tiny_run), device="cpu")
    with pytest.raises(MageError, match=f"at most {MAX_EXTEND * 16} per side"):
        outpaint(pipe, torch.rand(3, 16, 16), left=100000)
    img = png(tmp_path / "i.png")
    t0 = time.time()
    code, err = run(
        "outpaint",
        "--model",
        str(tiny_run),
        "--image",
        img,
        "--extend",
        "left=100000",
        "--out",
        str(tmp_path / "o.png"),
    )
    one_line_error(code, err, "cannot extend left by 100000 pixels")
    assert time.time() - t0 < 10
    code, err = run(
        "outpaint", "--model", str(tiny_run), "--image", img, "--extend", f"right={MAX_EXTEND * 16}", "--steps", "1",
        "--out", str(tmp_path / "o.png"),
    )  # fmt: skip
    assert code == 0, err
    assert Image.open(tmp_path / "o.png").size == (16 + MAX_EXTEND * 16, 16)


# --------------------------------------------------------------------------------------------------
# 5. one class
# --------------------------------------------------------------------------------------------------
def test_check_classes():
    check_classes("d", torch.tensor([0, 1, 1]), ["a", "b"], "x")
    with pytest.raises(MageError, match=r"d has only 1 class \(b\): x needs images of at least 2 classes"):
        check_classes("d", torch.tensor([1, 1]), ["a", "b"], "x")  # e.g. --limit kept one class
    with pytest.raises(MageError, match="no labels"):
        check_classes("d", torch.tensor([-1, -1]), None, "x")


def test_one_class_is_refused_by_probe_finetune_and_judge(tiny_run, tmp_path):
    root = _folder(tmp_path / "one", {"only": 6})
    data = f"folder:{root}"
    for kind in ("linear", "few-shot"):
        one_line_error(*run("probe", kind, "--model", "pixels", "--data", data), "only 1 class (only)", "at least 2")
    one_line_error(
        *run("evaluate", "train-judge", "--data", data, "--out", str(tmp_path / "j")), "the judge needs", "at least 2"
    )
    one_line_error(
        *run("finetune", "--model", str(tiny_run), "--data", data, "--preset", "tiny", "--out", str(tmp_path / "f")),
        "fine-tuning needs images of at least 2 classes",
    )


# --------------------------------------------------------------------------------------------------
# 6. caches keyed by what made them
# --------------------------------------------------------------------------------------------------
def test_feature_cache_follows_the_checkpoint_and_the_files(tiny_run, tmp_path, monkeypatch):
    from mage import recognition

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    root = _folder(tmp_path / "data", {"a": 3, "b": 3})
    calls = []

    def fake_embed(model_dir, data, split, pool, data_dir, limit):
        calls.append(1)
        n = len(load_dataset(data, split, 16, "none", data_dir, 0, limit))
        return {"features": torch.full((n, 4), float(len(calls))), "labels": torch.zeros(n, dtype=torch.long),
                "classes": ["a", "b"]}  # fmt: skip

    monkeypatch.setattr(recognition, "embed_dataset", fake_embed)
    get = lambda: recognition.cached_features(str(run_dir), f"folder:{root}", "all")  # noqa: E731
    first = get()
    assert len(calls) == 1 and torch.equal(get()["features"], first["features"]) and len(calls) == 1  # reused
    files = os.listdir(run_dir / "features")
    assert len(files) == 1

    m = MAGE(mage_preset("tiny"))  # training went on: a newer checkpoint
    save_step(str(run_dir), 2, m.state_dict(), m.config)
    assert get()["features"][0, 0] == 2 and len(calls) == 2
    assert len(os.listdir(run_dir / "features")) == 1 and os.listdir(run_dir / "features") != files  # old one gone

    png(root / "b" / "new.png")  # more images: another file list
    assert len(get()["labels"]) == 7 and len(calls) == 3
    get()
    assert len(calls) == 3


def test_classifier_records_its_checkpoint(tiny_run, tmp_path):
    from mage.recognition import Classifier, ProbeHead, save_classifier

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    save_classifier(str(tmp_path / "clf"), ProbeHead(32, 2), str(run_dir), "mean", ["a", "b"], 16, {"top1": 50.0})
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    step = run_dir / "checkpoints" / "step-0000001"
    assert meta["model"] == str(run_dir) and meta["checkpoint"] == str(step)
    m = MAGE(mage_preset("tiny"))
    save_step(str(run_dir), 2, m.state_dict(), m.config, keep_last=1)  # trained on; step 1 pruned
    with pytest.warns(UserWarning, match="step-0000001, which is gone"):
        clf = Classifier(str(tmp_path / "clf"))
    assert clf.predict(torch.rand(1, 3, 16, 16)).shape == (1, 2)


def test_token_cache_records_its_tokenizer_and_a_different_one_is_refused(tiny_run, tmp_path, monkeypatch):
    from mage.tokens import TokenCache, cache_tokens, check_cache_tokenizer, tokenizer_digest

    monkeypatch.chdir(tmp_path)
    tok_dir = str(tiny_run / "tokenizer")
    cache = cache_tokens(tok_dir, "synthetic", str(tmp_path / "c.safetensors"), limit=8, progress=False, workers=0)
    tc = TokenCache(cache)
    tok = VQTokenizer.from_pretrained(tok_dir)
    assert tc.meta["tokenizer_sha256"] == tokenizer_digest(tok)
    copy = tmp_path / "tok_copy"
    save_checkpoint(str(copy), tok.state_dict(), tok.config)  # the same weights, another file: accepted
    check_cache_tokenizer(tc, VQTokenizer.from_pretrained(str(copy)), str(copy))

    other = tiny_tok(seed=1)
    save_checkpoint(str(tmp_path / "tok_other"), other.state_dict(), other.config)
    one_line_error(
        *run("pretrain", "--cache", cache, "--tokenizer", "tok_other", "--preset", "tiny", "--out", "p"),
        "was made with another tokenizer than tok_other",
    )
    # fine-tuning a model whose tokenizer is not the cache's
    model = tmp_path / "model"
    shutil.copytree(tiny_run, model)
    shutil.rmtree(model / "tokenizer")
    save_checkpoint(str(model / "tokenizer"), other.state_dict(), other.config)
    one_line_error(
        *run("finetune", "--model", str(model), "--cache", cache, "--preset", "tiny", "--out", "f"),
        "another tokenizer",
    )
    assert not os.path.exists("p") and not os.path.exists("f")
