"""mage studio in a real browser: headless Chromium (the OS package, never a download) driven by Playwright
against the real server (uvicorn on a free port) with a tiny model: generate, watch the decoding, paint a mask
with the mouse and inpaint, outpaint, upload an image and classify it.

Skipped when Playwright or Chromium is missing, unless MAGE_REQUIRE_BROWSER=1 (CI), where that fails.
MAGE_STUDIO_SCREENSHOTS=1 also writes the screenshots of docs/img/studio_*.png with a trained model
(weights/fashion-mnist when released, else runs/demo-engine/mage)."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from test_studio_api import CLASSES, png, rand_image, tiny_studio  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = bool(os.environ.get("MAGE_REQUIRE_BROWSER"))


def _missing(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason}, but MAGE_REQUIRE_BROWSER is set")
    pytest.skip(reason)


def chromium_path() -> str:
    """The system Chromium: $MAGE_CHROMIUM, else chromium / chromium-browser on the PATH."""
    for p in (os.environ.get("MAGE_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    _missing("no Chromium found (apt-get install chromium, or set MAGE_CHROMIUM)")


@pytest.fixture(scope="module")
def browser():
    try:
        import uvicorn  # noqa: F401
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        _missing(f"{e.name} is not installed (pip install -r requirements.txt)")
    exe = chromium_path()
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


class Served:
    """A uvicorn server in a thread on a free local port."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(300):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("the studio server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def studio_app(model: str, classifier: str | None, samples: str):
    from mage.pipeline import MAGEPipeline
    from mage.recognition import Classifier
    from mage.studio.server import create_app, load_samples

    pipe = MAGEPipeline.from_pretrained(model, device="cpu")
    clf = Classifier(classifier) if classifier else None
    return create_app(
        pipe, clf, samples=load_samples(samples, pipe.tokenizer.config.image_size), name=os.path.basename(model)
    )


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 820})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    return page, errors


def last(page, key: str, timeout: float = 60_000):
    page.wait_for_function(f"() => window.studio.last.{key} !== undefined", timeout=timeout)
    return page.evaluate(f"window.studio.last.{key}")


def paint_stroke(page, points):
    """Drag the mouse over the inpainting canvas through points given in fractions of its size."""
    box = page.locator("#paint").bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def test_studio_in_a_browser(browser, tiny_studio, tmp_path):  # noqa: F811
    from mage.sampler import SamplerConfig
    from mage.studio.images import from_data_url

    app = studio_app(tiny_studio["model"], tiny_studio["classifier"], "synthetic")
    with Served(app) as srv:
        page, errors = open_page(browser, srv.url)
        assert "16×16" in page.inner_text("#model-info")

        # ---- generate a class
        page.select_option("#generate-class", "1")
        page.fill("#generate-form input[name=num]", "4")
        page.fill("#generate-form input[name=steps]", "4")
        page.fill("#generate-form input[name=seed]", "7")
        page.click("#generate-go")
        page.wait_for_function("() => document.querySelectorAll('#generate-grid img').length === 4")
        shown = last(page, "generate")["images"]
        want = app.state.studio.pipe.generate(4, 1, SamplerConfig(steps=4), seed=7)
        got = torch.stack([from_data_url(u) for u in shown])
        assert torch.equal(got, want.mul(255).add(0.5).floor().div(255))

        # ---- watch it decode: one frame per step, the slider walks through them
        page.click("#watch-go")
        steps = last(page, "steps")
        assert len(steps["frames"]) == 4 and page.locator("#watch-images canvas").count() == 4
        page.wait_for_function("() => document.querySelector('#watch-caption').textContent.includes('/ 4')")

        # ---- inpaint: pick a sample, paint with the mouse, remove
        page.click("#tab-inpaint")
        page.click("[data-source=inpaint] .thumbs button >> nth=2")
        page.wait_for_function("() => !document.querySelector('#inpaint-go').disabled")
        page.click("#inpaint-go")  # nothing painted yet: the page says so, no request
        page.wait_for_selector("#error:not([hidden])")
        assert "paint the region" in page.inner_text("#error")
        paint_stroke(page, [(0.2, 0.3), (0.45, 0.35), (0.5, 0.6)])
        page.click("#inpaint-go")
        r = last(page, "inpaint")
        page.wait_for_selector("#inpaint-result:not([hidden])")
        painted = from_data_url(page.evaluate("window.studio.maskDataURL"))[0] > 0.5
        mask = from_data_url(r["mask"])[0] > 0.5
        assert torch.equal(mask, painted) and 0 < int(mask.sum()) < mask.numel()
        assert mask[int(0.3 * 16), int(0.2 * 16)] and not mask[15, 15]  # where the stroke went, and not elsewhere
        src, out = from_data_url(r["input"]), from_data_url(r["image"])
        assert torch.equal(out[:, ~mask], src[:, ~mask])  # only the painted region changed
        assert not torch.equal(out[:, mask], src[:, mask])
        sample = from_data_url(page.evaluate("window.studio.samples[2].image"))
        assert torch.equal(src, sample)

        # ---- outpaint
        page.click("#tab-outpaint")
        page.click("[data-source=outpaint] .thumbs button >> nth=0")
        page.wait_for_selector("#outpaint-input:not([hidden])")
        page.fill("#outpaint-form input[name=left]", "4")
        page.fill("#outpaint-form input[name=top]", "0")
        page.fill("#outpaint-form input[name=bottom]", "8")
        page.fill("#outpaint-form input[name=steps]", "2")
        page.click("#outpaint-go")
        r = last(page, "outpaint")
        res = from_data_url(r["image"])
        assert res.shape == (3, 24, 20) and torch.equal(res[:, 0:16, 4:20], from_data_url(r["input"]))
        page.wait_for_selector("#outpaint-box:not([hidden])")

        # ---- classify an uploaded image
        page.click("#tab-classify")
        (tmp_path / "shirt.png").write_bytes(png(rand_image(seed=9)))
        page.set_input_files("[data-source=classify] input[type=file]", str(tmp_path / "shirt.png"))
        r = last(page, "classify")
        assert {t["class"] for t in r["top"]} == set(CLASSES)
        assert page.locator("#classify-bars .bar").count() == 3
        assert page.locator("#classify-bars .bar .name").first.inner_text() == r["top"][0]["class"]

        # ---- a bad upload: the page shows the server's one line
        (tmp_path / "notes.png").write_bytes(b"not an image at all")
        page.set_input_files("[data-source=classify] input[type=file]", str(tmp_path / "notes.png"))
        page.wait_for_selector("#error:not([hidden])")
        assert "not an image" in page.inner_text("#error")
        errors = [e for e in errors if "400" not in e]  # the browser logs the refused upload itself
        assert errors == []
        page.close()


def _trained_model() -> tuple[str, str | None] | None:
    from mage.released import weights_root

    release = Path(weights_root()) / "fashion-mnist"
    if (release / "model.safetensors").is_file():
        clf = release / "classifier"
        return str(release), str(clf) if (clf / "classifier.json").is_file() else None
    demo = ROOT / "runs" / "demo-engine" / "mage"
    if (demo / "tokenizer").is_dir():
        return str(demo), None
    return None


@pytest.mark.skipif(not os.environ.get("MAGE_STUDIO_SCREENSHOTS"), reason="set MAGE_STUDIO_SCREENSHOTS=1 to write them")
def test_docs_screenshots(browser):
    """docs/img/studio_{generate,decode,inpaint,outpaint,classify}.png, taken with a trained model."""
    found = _trained_model()
    if found is None:
        pytest.skip("no trained model: neither weights/fashion-mnist nor runs/demo-engine/mage")
    model, classifier = found
    out = ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    app = studio_app(model, classifier, "fashion-mnist")
    with Served(app) as srv:
        page, _ = open_page(browser, srv.url)
        page.select_option("#generate-class", "7")  # Sneaker
        page.fill("#generate-form input[name=num]", "24")
        page.fill("#generate-form input[name=cfg]", "2")
        page.click("#generate-go")
        last(page, "generate")
        page.wait_for_function("() => document.querySelectorAll('#generate-grid img').length === 24")
        page.screenshot(path=str(out / "studio_generate.png"))

        page.select_option("#generate-class", "8")  # Bag
        page.fill("#generate-form input[name=num]", "4")
        page.fill("#generate-form input[name=steps]", "12")
        page.click("#watch-go")
        last(page, "steps")
        # stop the playback half-way, as a user dragging the slider does
        page.eval_on_selector("#watch-step", "el => { el.value = 5; el.dispatchEvent(new Event('input')); }")
        page.wait_for_function("() => document.querySelector('#watch-caption').textContent.startsWith('step 5')")
        page.screenshot(path=str(out / "studio_decode.png"))

        page.click("#tab-inpaint")
        page.click("[data-source=inpaint] .thumbs button >> nth=0")
        page.wait_for_function("() => !document.querySelector('#inpaint-go').disabled")
        page.fill("#brush", "6")
        paint_stroke(page, [(0.3, 0.35), (0.7, 0.4), (0.7, 0.65), (0.3, 0.6)])
        page.click("#inpaint-go")
        last(page, "inpaint")
        page.wait_for_selector("#inpaint-result:not([hidden])")
        page.mouse.move(5, 5)  # no brush outline over the canvas
        page.screenshot(path=str(out / "studio_inpaint.png"))

        page.click("#tab-outpaint")
        page.click("[data-source=outpaint] .thumbs button >> nth=4")
        page.wait_for_selector("#outpaint-input:not([hidden])")
        for side, n in (("left", "8"), ("right", "8"), ("top", "8"), ("bottom", "8")):
            page.fill(f"#outpaint-form input[name={side}]", n)
        page.click("#outpaint-go")
        last(page, "outpaint")
        page.wait_for_selector("#outpaint-box:not([hidden])")
        page.screenshot(path=str(out / "studio_outpaint.png"))

        page.click("#tab-classify")
        if classifier:
            page.click("[data-source=classify] .thumbs button >> nth=6")
            last(page, "classify")
            page.wait_for_selector("#classify-bars .bar")
        page.screenshot(path=str(out / "studio_classify.png"))
        page.close()
