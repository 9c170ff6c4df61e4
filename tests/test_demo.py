"""The main job end to end on a tiny budget (real Fashion-MNIST and the released weights, small evaluation
sizes): every stage runs, the report holds both models, and a re-run reuses the finished stages."""

import json
import os

import pytest

from mage.demo import MANIFEST, run_demo
from mage.released import weights_root

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
RELEASE = os.path.join(weights_root(), "fashion-mnist", "model.safetensors")


@pytest.mark.skipif(not os.path.isfile(FMNIST), reason="Fashion-MNIST not installed")
@pytest.mark.skipif(not os.path.isfile(RELEASE), reason="no released weights")
def test_demo_end_to_end_and_reuse(tmp_path, capsys):
    plan = {
        "cache_images": 256,
        "probe_train_images": 256,
        "classify_images": 200,
        "fid_num": 40,
        "agreement_per_class": 2,
        "steps": 2,
        "min_mage_minutes": 0.05,
    }
    out = tmp_path / "demo"
    report = run_demo(str(out), budget_minutes=0.2, plan_overrides=plan)
    state = json.loads((out / "stages.json").read_text())
    want = {"release-samples", "release-classify", "cache", "release-recognition", "release-agreement", "mage"}
    want |= {"samples", "recognition", "agreement"}
    assert want <= set(state), state.keys()
    assert state["release-classify"]["accuracy"] >= 80, state["release-classify"]
    assert state["release-recognition"]["linear"] > state["release-recognition"]["shot1"] > 10
    assert state["release-agreement"]["agreement"] >= 50  # the released model, 2 per class, 2 steps
    assert 0 <= state["agreement"]["agreement"] <= 100
    html = open(report).read()
    for section in ("released model", "trained here", "Linear probe", "Class agreement", "FID", "Inpainting"):
        assert section in html, section
    for png in ("samples_per_class.png", "inpaint.png", "outpaint.png", "outpaint48.png", "samples_uncond.png"):
        assert (out / png).is_file() and (out / ("release_" + png)).is_file(), png
    # every entry of OUT is recorded as the demo's own (what --fresh may remove; anything else is refused)
    created = json.loads((out / MANIFEST).read_text())["created"]
    assert set(os.listdir(out)) <= {*created, MANIFEST}, set(os.listdir(out)) - set(created)
    capsys.readouterr()
    run_demo(str(out), budget_minutes=0.2, plan_overrides=plan)
    assert "already done" in capsys.readouterr().out
