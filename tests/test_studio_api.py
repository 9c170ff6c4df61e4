"""mage studio's JSON API, in process, on a tiny random class-conditional model: every endpoint, determinism,
bad uploads and parameters, the bounded queue, failures that leave the server serving, exact pixels outside an
inpainting mask, one frame per decoding step; and the sampler hook those frames come from."""

import dataclasses
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="mage studio needs fastapi (pip install -r requirements.txt)")

from fastapi.testclient import TestClient  # noqa: E402

from mage.checkpoint import save_checkpoint  # noqa: E402
from mage.config import mage_preset, tokenizer_preset  # noqa: E402
from mage.model import MAGE  # noqa: E402
from mage.pipeline import MAGEPipeline  # noqa: E402
from mage.recognition import Classifier, ProbeHead, save_classifier  # noqa: E402
from mage.sampler import SamplerConfig, decode_tokens  # noqa: E402
from mage.studio.images import from_data_url  # noqa: E402
from mage.studio.server import create_app, load_samples  # noqa: E402
from mage.vqgan import VQTokenizer  # noqa: E402
from test_tokenizer import ENV, run_cli  # noqa: E402

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="session")
def tiny_studio(tmp_path_factory):
    """A tiny random class-conditional MAGE run (16x16 images, 4x4 tokens, 3 named classes) and a linear-probe
    classifier on it: {"model": dir, "classifier": dir}."""
    d = tmp_path_factory.mktemp("studio")
    torch.manual_seed(0)
    m = MAGE(dataclasses.replace(mage_preset("tiny"), num_classes=len(CLASSES)))
    save_checkpoint(str(d / "m"), m.state_dict(), m.config)
    tok = VQTokenizer(tokenizer_preset("tiny"))
    save_checkpoint(str(d / "m" / "tokenizer"), tok.state_dict(), tok.config)
    (d / "m" / "classes.json").write_text(json.dumps(CLASSES))
    head = ProbeHead(m.config.embed_dim, len(CLASSES))
    torch.nn.init.normal_(head.linear.weight, std=1.0)  # not the near-zero init: the top classes differ
    save_classifier(str(d / "clf"), head.eval(), str(d / "m"), "mean", CLASSES, tok.config.image_size, {})
    return {"model": str(d / "m"), "classifier": str(d / "clf")}


def make_app(tiny_studio, classifier=True, **kw):
    pipe = MAGEPipeline.from_pretrained(tiny_studio["model"], device="cpu")
    clf = Classifier(tiny_studio["classifier"]) if classifier else None
    samples = load_samples("synthetic", pipe.tokenizer.config.image_size, per_class=1)
    return create_app(pipe, clf, samples=samples, name="tiny", **kw)


@pytest.fixture(scope="module")
def client(tiny_studio):
    with TestClient(make_app(tiny_studio)) as c:
        yield c


def png(img: torch.Tensor | Image.Image) -> bytes:
    if torch.is_tensor(img):
        img = Image.fromarray(img.mul(255).round().byte().permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rand_image(h=16, w=16, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed)).float() / 255


def box_mask(h=16, w=16, box=(4, 3, 11, 9)) -> torch.Tensor:
    x0, y0, x1, y1 = box
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def mask_png(m: torch.Tensor) -> bytes:
    return png(Image.fromarray(m.byte().mul(255).numpy(), mode="L"))


def without_time(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "seconds"}


def error_of(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"], body
    return body["error"]


# --------------------------------------------------------------------------------------------------
# the sampler hook
# --------------------------------------------------------------------------------------------------
def test_on_step_hook_sees_every_step_and_changes_nothing():
    torch.manual_seed(0)
    m = MAGE(dataclasses.replace(mage_preset("tiny"), num_classes=3)).eval()
    L, mask_id = m.config.num_tokens, m.vocab.mask_id
    start = torch.full((2, L), mask_id)
    start[1, :5] = 7  # a partly known row: known tokens are never "decided"
    cfg = SamplerConfig(steps=6, cfg=1.5)
    labels = torch.tensor([0, 2])
    plain_trace, hooked_trace, seen = [], [], []
    plain = decode_tokens(m, start, cfg, labels, torch.Generator().manual_seed(3), trace=plain_trace)
    hooked = decode_tokens(
        m,
        start,
        cfg,
        labels,
        torch.Generator().manual_seed(3),
        trace=hooked_trace,
        on_step=lambda s, ids, fixed, guess: seen.append((s, ids, fixed, guess)),
    )
    assert torch.equal(plain, hooked)
    assert all(torch.equal(a, b) for a, b in zip(plain_trace, hooked_trace))
    assert [s for s, *_ in seen] == list(range(cfg.steps))
    decided = torch.stack([fixed for _, _, fixed, _ in seen]).sum(0)  # [2, L]: how often each token was decided
    assert torch.equal(decided, (start == mask_id).long())  # every unknown token exactly once, known ones never
    assert torch.equal(seen[-1][1], plain) and torch.equal(seen[-1][3], plain)
    for s, ids, fixed, _ in seen[:-1]:
        assert torch.equal(ids, plain_trace[s]) and not (fixed & (ids == mask_id)).any()


# --------------------------------------------------------------------------------------------------
# page, info, schema
# --------------------------------------------------------------------------------------------------
def test_page_info_and_schema(client):
    r = client.get("/")
    assert r.status_code == 200 and "mage studio" in r.text and "/static/app.js" in r.text
    assert "http" not in r.text.replace("http-equiv", "")  # nothing fetched from elsewhere
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for f in ("app.js", "style.css"):
        assert client.get(f"/static/{f}").status_code == 200
    assert client.get("/static/../server.py").status_code == 404
    info = client.get("/api/info").json()
    assert info["image_size"] == 16 and info["grid"] == [4, 4] and info["classes"] == CLASSES
    assert info["class_conditional"] and info["classifier"] == {"classes": CLASSES}
    assert info["samples"] == len(client.get("/api/samples").json()["samples"]) > 0
    paths = client.get("/api/openapi.json").json()["paths"]
    for p in ("/api/generate", "/api/generate/steps", "/api/inpaint", "/api/outpaint", "/api/classify"):
        assert p in paths
    assert client.get("/docs").status_code == 404  # its scripts would come from a CDN
    assert error_of(client.get("/api/nope"), 404)


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------
def test_generate_is_deterministic_and_matches_the_pipeline(client):
    body = {"num": 3, "class_label": "square", "steps": 4, "seed": 11}
    a = client.post("/api/generate", json=body).json()["images"]
    b = client.post("/api/generate", json=body).json()["images"]
    c = client.post("/api/generate", json={**body, "seed": 12}).json()["images"]
    assert len(a) == 3 and a == b and a != c
    pipe = client.app.state.studio.pipe
    want = pipe.generate(3, "square", SamplerConfig(steps=4), seed=11)
    assert torch.equal(torch.stack([from_data_url(u) for u in a]), want.mul(255).add(0.5).floor().div(255))
    by_id = client.post("/api/generate", json={**body, "class_label": 1}).json()["images"]
    assert by_id == a
    uncond = client.post("/api/generate", json={"num": 2, "steps": 2, "class_label": None, "cfg": 2.0})
    assert uncond.status_code == 200 and len(uncond.json()["images"]) == 2
    assert "unknown class 'dog'" in error_of(client.post("/api/generate", json={"class_label": "dog"}), 400)
    assert "out of range" in error_of(client.post("/api/generate", json={"class_label": 7}), 400)


def test_decode_steps_one_frame_per_step(client):
    body = {"num": 2, "class_label": "circle", "steps": 5, "seed": 4, "cfg": 1.0}
    r = client.post("/api/generate/steps", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["grid"] == [4, 4] and len(out["frames"]) == 5
    assert [f["step"] for f in out["frames"]] == [1, 2, 3, 4, 5]
    for f in out["frames"]:
        assert len(f["images"]) == 2 and len(f["state"]) == 2 and all(len(s) == 16 for s in f["state"])
        assert f["decided"] == sum(s.count("2") for s in f["state"]) > 0
    assert sum(f["decided"] for f in out["frames"]) == 2 * 16  # each token decided once
    masked = [sum(s.count("0") for s in f["state"]) for f in out["frames"]]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0
    assert out["frames"][-1]["images"] == out["images"]
    same = client.post("/api/generate", json=body).json()["images"]
    assert out["images"] == same  # watching the decoding gives the images generate gives


def test_out_of_range_parameters_are_422(client):
    cases = [
        ({"num": 65}, "num"),
        ({"num": 0}, "num"),
        ({"steps": 0}, "steps"),
        ({"steps": 65}, "steps"),
        ({"temperature": 0}, "temperature"),
        ({"choice_temperature": -1}, "choice_temperature"),
        ({"cfg": 100}, "cfg"),
        ({"seed": -1}, "seed"),
        ({"schedule": "cubic"}, "schedule"),
        ({"steps": "many"}, "steps"),
        ({"nmu": 3}, "nmu"),
    ]
    for body, field in cases:
        assert error_of(client.post("/api/generate", json=body), 422).startswith(field), body
    assert "num: at most 8" in error_of(client.post("/api/generate/steps", json={"num": 9}), 422)
    assert error_of(
        client.post("/api/generate", content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    form = {"sample": "0", "left": "17"}
    assert "left: at most 16" in error_of(client.post("/api/outpaint", data=form), 422)
    m = mask_png(box_mask())
    r = client.post("/api/inpaint", data={"sample": "0", "feather": "9"}, files={"mask": ("m.png", m)})
    assert error_of(r, 422).startswith("feather")
    assert error_of(client.post("/api/prepare", data={"sample": "-1"}), 422).startswith("sample")


# --------------------------------------------------------------------------------------------------
# editing
# --------------------------------------------------------------------------------------------------
def test_inpaint_keeps_every_pixel_outside_the_mask(client):
    img, mask = rand_image(seed=1), box_mask()
    for extra in ({}, {"class_label": "triangle"}, {"feather": "2"}):
        r = client.post(
            "/api/inpaint",
            data={"steps": "3", "seed": "5", **extra},
            files={"file": ("x.png", png(img)), "mask": ("m.png", mask_png(mask))},
        )
        assert r.status_code == 200, r.text
        out = r.json()
        res, inp = from_data_url(out["image"]), from_data_url(out["input"])
        assert torch.equal(inp, img)  # a 16x16 upload is used as it is
        assert torch.equal(from_data_url(out["mask"])[0] > 0.5, mask)
        assert torch.equal(res[:, ~mask], img[:, ~mask])  # exact, not close
        assert not torch.equal(res[:, mask], img[:, mask])
    a = client.post("/api/inpaint", data={"sample": "1", "seed": "2"}, files={"mask": ("m.png", mask_png(mask))})
    b = client.post("/api/inpaint", data={"sample": "1", "seed": "2"}, files={"mask": ("m.png", mask_png(mask))})
    assert a.status_code == 200 and without_time(a.json()) == without_time(b.json())
    sample = from_data_url(client.get("/api/samples").json()["samples"][1]["image"])
    assert torch.equal(from_data_url(a.json()["image"])[:, ~mask], sample[:, ~mask])
    # an upload of another size: image and mask of that size go through the same fitting
    big, big_mask = rand_image(24, 24, seed=2), box_mask(24, 24, (0, 0, 12, 24))
    r = client.post(
        "/api/inpaint", files={"file": ("x.png", png(big)), "mask": ("m.png", mask_png(big_mask))}, data={"steps": "2"}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    m = from_data_url(out["mask"])[0] > 0.5
    assert m[:, :6].all() and not m[:, 10:].any()
    assert torch.equal(from_data_url(out["image"])[:, ~m], from_data_url(out["input"])[:, ~m])


def test_inpaint_and_prepare_input_errors(client):
    m = mask_png(box_mask())
    assert "exactly one" in error_of(client.post("/api/inpaint", files={"mask": ("m.png", m)}), 400)
    both = client.post("/api/inpaint", data={"sample": "0"}, files={"file": ("x.png", png(rand_image())), "mask": m})
    assert "exactly one" in error_of(both, 400)
    assert "no sample 999" in error_of(client.post("/api/inpaint", data={"sample": "999"}, files={"mask": m}), 400)
    assert "send a mask" in error_of(client.post("/api/inpaint", data={"sample": "0"}), 400)
    empty = mask_png(torch.zeros(16, 16, dtype=torch.bool))
    assert "mask is empty" in error_of(client.post("/api/inpaint", data={"sample": "0"}, files={"mask": empty}), 400)
    wrong = mask_png(box_mask(20, 20))
    assert "the mask is 20x20" in error_of(
        client.post("/api/inpaint", data={"sample": "0"}, files={"mask": wrong}), 400
    )
    r = client.post("/api/prepare", files={"file": ("x.png", png(rand_image(28, 28)))})
    assert (
        r.status_code == 200 and r.json()["sent"] == [28, 28] and from_data_url(r.json()["image"]).shape == (3, 16, 16)
    )


def test_outpaint_extends_and_keeps_the_original(client):
    r = client.post("/api/outpaint", data={"sample": "0", "left": "4", "bottom": "8", "steps": "2", "seed": "1"})
    assert r.status_code == 200, r.text
    out = r.json()
    res, inp = from_data_url(out["image"]), from_data_url(out["input"])
    assert res.shape == (3, 24, 20) and out["box"] == {"left": 4, "top": 0, "width": 16, "height": 16}
    assert torch.equal(res[:, 0:16, 4:20], inp)
    r2 = client.post("/api/outpaint", data={"sample": "0", "left": "4", "bottom": "8", "steps": "2", "seed": "1"})
    assert without_time(r2.json()) == without_time(out)
    assert "at least one side" in error_of(client.post("/api/outpaint", data={"sample": "0"}), 400)
    img = png(rand_image(seed=3))
    r = client.post("/api/outpaint", data={"right": "16", "class_label": "circle", "steps": "2"}, files={"file": img})
    assert r.status_code == 200 and from_data_url(r.json()["image"]).shape == (3, 16, 32)


# --------------------------------------------------------------------------------------------------
# recognition
# --------------------------------------------------------------------------------------------------
def test_classify_top_classes(client, tiny_studio):
    r = client.post("/api/classify", files={"file": ("x.png", png(rand_image(seed=4)))})
    assert r.status_code == 200, r.text
    top = r.json()["top"]
    assert [t["class"] for t in top] != [] and {t["class"] for t in top} == set(CLASSES)  # top 5 of 3 = all
    probs = [t["prob"] for t in top]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
    clf = client.app.state.studio.classifier
    want = clf.predict(rand_image(seed=4)[None])[0]
    assert abs(want.max().item() - probs[0]) < 1e-6
    assert client.post("/api/classify", data={"sample": "2"}).status_code == 200
    with TestClient(make_app(tiny_studio, classifier=False)) as bare:
        assert "no classifier is loaded" in error_of(bare.post("/api/classify", data={"sample": "0"}), 400)
        assert bare.get("/api/info").json()["classifier"] is None


# --------------------------------------------------------------------------------------------------
# safety
# --------------------------------------------------------------------------------------------------
def test_bad_uploads_are_4xx_with_a_clear_message(tiny_studio):
    app = make_app(tiny_studio, classifier=True, max_upload_bytes=3000, max_pixels=20 * 20)
    with TestClient(app) as c:

        def classify(data: bytes):
            return c.post("/api/classify", files={"file": ("x.png", data, "image/png")})

        assert "not an image" in error_of(classify(b"%PDF-1.4 certainly not a picture"), 400)
        assert "is empty" in error_of(classify(b""), 400)
        broken = png(rand_image())[:200]  # a PNG cut short
        assert "cannot be decoded" in error_of(classify(broken), 400)
        from PIL.PngImagePlugin import PngInfo

        padded, meta = io.BytesIO(), PngInfo()
        meta.add_text("comment", "x" * 4000)  # a small image in a large file
        Image.new("RGB", (8, 8)).save(padded, format="PNG", pnginfo=meta)
        assert "larger than the limit of 3,000 bytes" in error_of(classify(padded.getvalue()), 413)
        assert "21x21 = 441 pixels: the limit is 400 pixels" in error_of(classify(png(Image.new("L", (21, 21)))), 413)
        # a whole request far over the limit is refused before it is read, with or without a length
        huge = b"x" * 100_000
        assert "request is too large" in error_of(classify(huge), 413)
        chunked = c.post("/api/classify", content=iter([huge[:50_000], huge[50_000:]]))
        assert "request is too large" in error_of(chunked, 413)
        assert c.get("/api/info").status_code == 200
    with TestClient(make_app(tiny_studio, classifier=True)) as c:
        # a small file that claims 81 megapixels is refused from its header, never expanded
        bomb = io.BytesIO()
        Image.new("1", (9000, 9000)).save(bomb, format="PNG")
        assert len(bomb.getvalue()) < 4 * 1024 * 1024
        assert "9000x9000 = 81,000,000 pixels" in error_of(
            c.post("/api/classify", files={"file": ("b.png", bomb.getvalue())}), 413
        )


def test_full_queue_is_429_with_retry_after(tiny_studio):
    app = make_app(tiny_studio, classifier=False, max_queue=1)
    gate = app.state.studio.gate
    with TestClient(app) as c:
        with gate.slot():  # the model is busy
            entered = threading.Event()

            def wait_in_line():
                with gate.slot():
                    entered.set()

            waiter = threading.Thread(target=wait_in_line)
            waiter.start()
            for _ in range(200):
                if gate.in_flight == 2:
                    break
                time.sleep(0.01)
            assert gate.in_flight == 2  # one running, one waiting: the queue (1) is full
            r = c.post("/api/generate", json={"num": 1, "steps": 1})
            assert "model is busy" in error_of(r, 429)
            assert int(r.headers["retry-after"]) >= 1
            assert c.get("/api/info").status_code == 200  # reading needs no model
        waiter.join(5)
        assert entered.is_set() and gate.in_flight == 0
        assert c.post("/api/generate", json={"num": 1, "steps": 1}).status_code == 200


def test_a_failing_request_leaves_the_server_serving(tiny_studio, monkeypatch):
    app = make_app(tiny_studio, classifier=False, max_queue=0)
    st = app.state.studio
    with TestClient(app) as c:
        monkeypatch.setattr(st.pipe, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of\nmemory")))
        msg = error_of(c.post("/api/generate", json={"num": 1, "steps": 1}), 500)
        assert msg == "generating failed: RuntimeError: out of memory"
        monkeypatch.undo()
        assert st.gate.in_flight == 0  # the slot was given back: with queue 0 the next request would be a 429
        assert c.post("/api/generate", json={"num": 1, "steps": 1}).status_code == 200


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_errors_are_one_line_before_serving(tiny_studio, tmp_path):
    r = run_cli("studio", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.startswith("mage: error: no model at") and len(r.stderr.splitlines()) == 1
    env = {**ENV, "MAGE_WEIGHTS": str(tmp_path)}  # no release there
    r = subprocess.run([sys.executable, "-m", "mage", "studio"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "released 'fashion-mnist' weights are not at" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("studio", "--model", tiny_studio["model"], "--port", str(port), "--samples", "none")
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run_cli("studio", "--model", tiny_studio["model"], "--classifier", str(tmp_path))
    assert r.returncode == 2 and "no classifier at" in r.stderr and len(r.stderr.splitlines()) == 1


def test_cli_serves_the_page(tiny_studio):
    port = free_port()
    cmd = [sys.executable, "-m", "mage", "studio", "--model", tiny_studio["model"], "--port", str(port)]
    cmd += ["--classifier", tiny_studio["classifier"], "--samples", "synthetic"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        info = None
        for _ in range(600):
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=2) as resp:
                    info = json.load(resp)
                break
            except OSError:
                time.sleep(0.1)
        assert info is not None, proc.communicate(timeout=10)
        assert (
            info["name"] == "m" and info["classifier"] == {"classes": CLASSES} and info["samples"] == 8
        )  # 2 of each synthetic class
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            assert b"mage studio" in resp.read()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out and "Traceback" not in err + out
