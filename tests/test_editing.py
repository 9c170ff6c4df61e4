"""Inpainting and outpainting on a tiny model: untouched pixels stay exact, CLI, bad inputs."""

import dataclasses

import pytest
import torch
from PIL import Image

from mage.checkpoint import save_checkpoint
from mage.config import mage_preset, tokenizer_preset
from mage.errors import MageError
from mage.model import MAGE
from mage.pipeline import MAGEPipeline, inpaint, outpaint, token_mask
from mage.sampler import SamplerConfig
from mage.vqgan import VQTokenizer
from test_tokenizer import run_cli


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("edit") / "m"
    torch.manual_seed(0)
    cfg = mage_preset("tiny")
    cfg = dataclasses.replace(cfg, num_classes=2)
    m = MAGE(cfg)
    save_checkpoint(str(d), m.state_dict(), m.config)
    tok = VQTokenizer(tokenizer_preset("tiny"))
    save_checkpoint(str(d / "tokenizer"), tok.state_dict(), tok.config)
    (d / "classes.json").write_text('["a", "b"]')
    return d


def test_top_level_api_names():
    import mage

    assert (mage.MAGEPipeline, mage.inpaint, mage.outpaint) == (MAGEPipeline, inpaint, outpaint)


def test_token_mask_any_overlap():
    m = torch.zeros(16, 16, dtype=torch.bool)
    m[5, 5] = True  # one pixel -> its 4x4 token
    tm = token_mask(m, 4)
    assert tm.sum() == 1 and tm.view(4, 4)[1, 1]


def test_inpaint_keeps_pixels_outside_the_mask(tiny_dir):
    pipe = MAGEPipeline.from_pretrained(str(tiny_dir))
    img = torch.rand(3, 16, 16)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:10, 2:9] = True
    for feather in (0, 2):
        out = inpaint(pipe, img, mask, sampler=SamplerConfig(steps=3), seed=0, feather=feather)
        assert torch.equal(out[:, ~mask], img[:, ~mask])
        assert not torch.equal(out[:, mask], img[:, mask])
    a = inpaint(pipe, img, mask, class_label="b", sampler=SamplerConfig(steps=3), seed=1)
    b = inpaint(pipe, img, mask, class_label="b", sampler=SamplerConfig(steps=3), seed=1)
    assert torch.equal(a, b)
    with pytest.raises(MageError):
        inpaint(pipe, img, torch.zeros(8, 8, dtype=torch.bool))


def test_outpaint_extends_and_keeps_the_original(tiny_dir):
    pipe = MAGEPipeline.from_pretrained(str(tiny_dir))
    img = torch.rand(3, 16, 16)
    out = outpaint(pipe, img, left=4, right=4, top=0, bottom=8, sampler=SamplerConfig(steps=2))
    assert out.shape == (3, 24, 24)
    assert torch.equal(out[:, 0:16, 4:20], img)
    assert (out[:, 16:, :] != 0).any()  # the new strip was generated


def test_editing_cli(tiny_dir, tmp_path):
    Image.new("RGB", (16, 16), (120, 30, 200)).save(tmp_path / "img.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "bad_mask.png")
    mk = Image.new("L", (16, 16), 0)
    mk.paste(255, (4, 4, 12, 12))
    mk.save(tmp_path / "mask.png")
    Image.new("L", (20, 20), 0).save(tmp_path / "wrong_size.png")
    ok = [
        ("inpaint", "--box", "0,0,8,8"),
        ("inpaint", "--mask", str(tmp_path / "mask.png"), "--class", "a"),
        ("inpaint", "--box", "0,0,8,8", "--weights", "bf16"),  # encodes with bf16-stored weights
        ("outpaint", "--extend", "left=8,right=0,top=4,bottom=4"),
    ]
    for cmd, *rest in ok:
        r = run_cli(
            cmd,
            "--model",
            str(tiny_dir),
            "--image",
            str(tmp_path / "img.png"),
            *rest,
            "--steps",
            "2",
            "--out",
            str(tmp_path / f"{cmd}.png"),
        )
        assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "outpaint.png").size == (24, 24)
    (tmp_path / "notimg.png").write_text("hello")
    bad = [
        ("inpaint", "--image", str(tmp_path / "img.png"), "--mask", str(tmp_path / "wrong_size.png")),
        ("inpaint", "--image", str(tmp_path / "img.png"), "--box", "0,0,40,8"),
        ("inpaint", "--image", str(tmp_path / "img.png"), "--box", "0,0,8,8", "--class", "zebra"),
        ("inpaint", "--image", str(tmp_path / "notimg.png"), "--box", "0,0,8,8"),
        ("inpaint", "--image", str(tmp_path / "img.png"), "--box", "0,0,8,8", "--steps", "0"),
        ("outpaint", "--image", str(tmp_path / "img.png"), "--extend", "left=x"),
    ]
    for cmd, *rest in bad:
        r = run_cli(cmd, "--model", str(tiny_dir), *rest, "--out", str(tmp_path / "x.png"))
        assert r.returncode == 2 and r.stderr.startswith("mage: error:") and len(r.stderr.strip().splitlines()) == 1, (
            rest,
            r.stderr,
        )
