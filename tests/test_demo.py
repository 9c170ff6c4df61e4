"""The main job end to end on a tiny budget (synthetic shapes, small evaluation sizes): every stage runs,
the report holds every section, and a re-run reuses the finished stages."""

import json
import os

from mage.demo import MANIFEST, run_demo


def test_demo_end_to_end_and_reuse(tmp_path, capsys):
    plan = {
        "cache_images": 256,
        "probe_train_images": 256,
        "fid_num": 40,
        "agreement_per_class": 2,
        "fid_steps": 2,
        "judge_minutes": 0.1,
    }
    out = tmp_path / "demo"
    report = run_demo(str(out), budget_minutes=0.4, data="synthetic", plan_overrides=plan)
    state = json.loads((out / "stages.json").read_text())
    want = {"tokenizer", "cache", "mage", "judge", "recognition", "samples", "agreement"}
    assert want <= set(state), state.keys()
    html = open(report).read()
    for section in (
        "Linear probe",
        "Class agreement",
        "FID",
        "Unconditional samples",
        "Inpainting",
        "Outpainting",
        "Configs",
    ):
        assert section in html, section
    for png in (
        "samples_uncond.png",
        "samples_per_class.png",
        "inpaint.png",
        "outpaint.png",
        "outpaint48.png",
        "reconstructions.png",
    ):
        assert (out / png).is_file(), png
    assert 0 <= state["recognition"]["linear"] <= 100 and 0 <= state["agreement"]["agreement"] <= 100
    # every entry of OUT is recorded as the demo's own (what --fresh may remove; anything else is refused)
    created = json.loads((out / MANIFEST).read_text())["created"]
    assert set(os.listdir(out)) <= {*created, MANIFEST}, set(os.listdir(out)) - set(created)
    capsys.readouterr()
    run_demo(str(out), budget_minutes=0.4, data="synthetic", plan_overrides=plan)
    assert "already done" in capsys.readouterr().out
