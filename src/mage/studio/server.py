"""The studio's web app: one page (``static/``) and a JSON API over one :class:`~mage.pipeline.MAGEPipeline`.

    app = create_app(MAGEPipeline.from_pretrained("runs/mage"), classifier=None)
    uvicorn.run(app, host="127.0.0.1", port=7860)

API (every image in or out is 8-bit RGB; images out are ``data:image/png;base64,...`` URLs in JSON):

    GET  /api/info             the model (image size, token grid, classes), the classifier, the limits
    GET  /api/samples          bundled test images: [{id, label, image}]
    POST /api/generate         JSON {num, class_label, steps, temperature, choice_temperature, cfg, schedule, seed}
                               -> {images}
    POST /api/generate/steps   the same JSON (num <= max_watch) -> {grid, frames: [{step, decided, images, state}],
                               images}: every decoding step, state = one digit per token (0 still masked,
                               1 decided before, 2 decided at this step)
    POST /api/prepare          form: file | sample -> {image}: the image as the model sees it (size S x S)
    POST /api/inpaint          form: file | sample, mask (PNG, white = regenerate), class_label, feather, sampler
                               fields -> {input, mask, image}; pixels outside the mask are the input's, exactly
    POST /api/outpaint         form: file | sample, left, right, top, bottom, class_label, sampler fields
                               -> {input, image, box}
    POST /api/classify         form: file | sample -> {image, top: [{class, prob}]} (top 5)
    GET  /api/openapi.json     the schema

Errors are JSON ``{"error": "one line"}``: 400 a bad input (not an image, unknown class, ...), 413 an upload over
the byte or pixel limit, 422 a parameter out of range, 429 the queue is full (with ``Retry-After``), 500 the
model failed (the server keeps serving). Files are only ever uploads: no request names a path on the server.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MageError
from ..pipeline import MAGEPipeline, inpaint, outpaint
from ..sampler import SamplerConfig, decode_tokens
from .images import UploadError, data_url, decode_upload, fit, quantize

log = logging.getLogger("mage.studio")
STATIC = Path(__file__).parent / "static"

MAX_NUM = 64  # images per generate request (one sampler batch)
MAX_STEPS = 64
MAX_WATCH = 8  # images when every step is decoded too (steps x images VQGAN decodes)
MAX_SEED = 2**63 - 1
MAX_FEATHER = 8


# --------------------------------------------------------------------------------------------------
# request bodies: every limit here shows in the schema and comes back as a 422 naming the field
# --------------------------------------------------------------------------------------------------
class SamplerParams(BaseModel):
    steps: int = Field(20, ge=1, le=MAX_STEPS, description="decoding iterations")
    temperature: float = Field(1.0, gt=0, le=10, description="token sampling temperature")
    choice_temperature: float = Field(6.0, ge=0, le=50, description="Gumbel noise on confidences, annealed to 0")
    cfg: float = Field(0.0, ge=0, le=20, description="classifier-free guidance scale (0 = off; needs a class)")
    schedule: Literal["cosine", "linear", "arccos"] = "cosine"
    seed: int = Field(0, ge=0, le=MAX_SEED)

    def sampler(self) -> SamplerConfig:
        s = SamplerConfig(
            steps=self.steps,
            temperature=self.temperature,
            choice_temperature=self.choice_temperature,
            schedule=self.schedule,
            cfg=self.cfg,
        )
        s.check()
        return s


class GenerateParams(SamplerParams):
    model_config = ConfigDict(extra="forbid")
    num: int = Field(8, ge=1, le=MAX_NUM, description="number of images")
    class_label: int | str | None = Field(None, description="class id or name; null or '' = unconditional")


class EditParams(SamplerParams):
    sample: int | None = Field(None, ge=0, description="a bundled sample's id (instead of a file)")
    class_label: str = Field("", description="class id or name to fill with; '' = remove (unconditional)")


class InpaintParams(EditParams):
    feather: int = Field(0, ge=0, le=MAX_FEATHER, description="soften the paste-back edge inside the mask (pixels)")


class OutpaintParams(EditParams):
    left: int = Field(0, ge=0, le=4096)
    right: int = Field(0, ge=0, le=4096)
    top: int = Field(0, ge=0, le=4096)
    bottom: int = Field(0, ge=0, le=4096)


class ImageParams(BaseModel):
    sample: int | None = Field(None, ge=0, description="a bundled sample's id (instead of a file)")


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def _one_line(e: BaseException) -> str:
    return " ".join((str(e).strip() or type(e).__name__).split())


@contextmanager
def _answers(what: str) -> Iterator[None]:
    """Turn whatever a request raises into an :class:`ApiError` with one clear line; nothing escapes, so a
    failed request never takes the server down."""
    try:
        yield
    except ApiError:
        raise
    except UploadError as e:
        raise ApiError(e.status, str(e)) from None
    except MageError as e:
        raise ApiError(400, _one_line(e)) from None
    except Exception as e:
        log.error("studio: %s failed: %s: %s", what, type(e).__name__, _one_line(e))
        raise ApiError(500, f"{what} failed: {type(e).__name__}: {_one_line(e)}") from None


# --------------------------------------------------------------------------------------------------
# the model, one request at a time
# --------------------------------------------------------------------------------------------------
class Busy(Exception):
    pass


class ModelGate:
    """One request uses the model at a time; at most ``max_waiting`` more wait for it; any further one is
    refused at once (HTTP 429) instead of piling up threads and memory."""

    def __init__(self, max_waiting: int):
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        self.max_waiting = max_waiting
        self.in_flight = 0  # running + waiting
        self.mean_seconds: float | None = None  # of recent jobs: the Retry-After estimate
        self._model = threading.Lock()
        self._count = threading.Lock()

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._count:
            if self.in_flight > self.max_waiting:
                raise Busy
            self.in_flight += 1
        try:
            with self._model:
                t0 = time.perf_counter()
                yield
                took = time.perf_counter() - t0
                self.mean_seconds = took if self.mean_seconds is None else 0.8 * self.mean_seconds + 0.2 * took
        finally:
            with self._count:
                self.in_flight -= 1

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (the ``Retry-After`` of a 429)."""
        if self.mean_seconds is None:  # nothing has finished yet: no basis for more than "soon"
            return 1
        return max(1, math.ceil(self.mean_seconds * self.in_flight))


# --------------------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------------------
@dataclass
class Studio:
    pipe: MAGEPipeline
    classifier: Any = None  # a mage.recognition.Classifier
    samples: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (label, [3, S, S])
    gate: ModelGate = field(default_factory=lambda: ModelGate(8))
    name: str = "model"
    max_upload_bytes: int = 4 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_extend: int = 0  # outpaint pixels per side (0: the model's resolution)
    # a full-size photo takes ~12 bytes a pixel as floats: a few at a time, however many requests come
    decoding: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(2))

    @property
    def size(self) -> int:
        return self.pipe.tokenizer.config.image_size

    @property
    def grid(self) -> tuple[int, int]:
        side = self.size // self.pipe.tokenizer.config.downsample
        return side, side

    def class_names(self) -> list[str]:
        n = self.pipe.model.config.num_classes
        names = self.pipe.classes if self.pipe.classes and len(self.pipe.classes) == n else None
        return list(names) if names else [str(i) for i in range(n)]

    @contextmanager
    def model(self) -> Iterator[None]:
        try:
            with self.gate.slot():
                yield
        except Busy:
            wait = self.gate.retry_after()
            raise ApiError(
                429,
                f"the model is busy ({self.gate.in_flight} requests ahead): try again in {wait} s",
                {"Retry-After": str(wait)},
            ) from None

    def image(self, file: UploadFile | None, sample: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """The request's image at the model's resolution [3, S, S] (8-bit grid) and its size as sent (H, W)."""
        if (file is None) == (sample is None):
            raise ApiError(400, "send exactly one of: an image file ('file'), a sample id ('sample')")
        if sample is not None:
            if sample >= len(self.samples):
                raise ApiError(400, f"no sample {sample}: there are {len(self.samples)} (ids 0..)")
            x = self.samples[sample][1]
            return x, (x.shape[-2], x.shape[-1])
        with self.decoding:
            img = self.decode(file)
            return fit(img, self.size), (img.shape[-2], img.shape[-1])

    def decode(self, file: UploadFile, what: str = "upload") -> torch.Tensor:
        """An uploaded file -> [3, H, W], within the byte and pixel limits (else an UploadError: 400 / 413)."""
        data = file.file.read(self.max_upload_bytes + 1)  # enough to tell it is too large, no more
        return decode_upload(data, self.max_upload_bytes, self.max_pixels, what)

    def label(self, class_label: int | str | None) -> int | None:
        if class_label is None or (isinstance(class_label, str) and not class_label.strip()):
            return None
        return self.pipe.class_index(class_label)


def load_samples(spec: str | None, image_size: int, per_class: int = 2, limit: int = 400) -> list[tuple[str, Any]]:
    """A few test-split images of each class of a dataset (fashion-mnist | mnist | synthetic), at the model's
    resolution; [] when ``spec`` is None or the dataset is not installed (the page then offers uploads only)."""
    if not spec:
        return []
    from ..data import load_dataset

    try:
        ds = load_dataset(spec, "test", image_size, "none", limit=limit)
    except MageError as e:
        log.warning("studio: no sample images (%s)", _one_line(e))
        return []
    labels = ds.labels().tolist()
    counts: dict[int, int] = {}
    out = []
    for i, y in enumerate(labels):
        if counts.get(y, 0) < per_class:
            counts[y] = counts.get(y, 0) + 1
            name = ds.classes[y] if ds.classes and 0 <= y < len(ds.classes) else str(y)
            out.append((name, quantize(ds[i][0])))
    return out


class _Guard:
    """ASGI middleware: a body over ``limit`` bytes is refused (413) before the app reads it, whether the client
    sent a Content-Length or not; every response gets headers that keep the page to its own files."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            b"connect-src 'self'; frame-ancestors 'none'",
        ),
    ]

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(scope, receive, send_with_headers, length.decode("latin-1"))
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.limit:
                return await self._too_large(scope, receive, send_with_headers, f"more than {self.limit:,}")
            chunks.append(body)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_headers)

    async def _too_large(self, scope, receive, send, got: str):
        response = JSONResponse(
            {"error": f"the request is too large ({got} bytes): the limit is {self.limit:,} bytes"}, 413
        )
        await response(scope, receive, send)


def create_app(
    pipe: MAGEPipeline,
    classifier: Any = None,
    *,
    samples: list[tuple[str, torch.Tensor]] | None = None,
    name: str = "model",
    max_queue: int = 8,
    max_upload_bytes: int = 4 * 1024 * 1024,
    max_pixels: int = 4096 * 4096,
    max_extend: int = 0,
) -> FastAPI:
    """The studio app over ``pipe`` (and ``classifier``, a :class:`mage.recognition.Classifier`, for the
    classify tab; None: that tab explains how to add one).

    ``samples``: (label, [3, S, S]) images offered on the page (see :func:`load_samples`). ``max_queue``:
    requests that may wait while one runs (more: 429). ``max_upload_bytes`` / ``max_pixels``: per uploaded
    image (more: 413). ``max_extend``: outpaint pixels per side (0: the model's resolution S)."""
    st = Studio(
        pipe,
        classifier,
        [(n, quantize(x)) for n, x in (samples or [])],
        ModelGate(max_queue),
        name,
        max_upload_bytes,
        max_pixels,
    )
    st.max_extend = max_extend or st.size
    app = FastAPI(
        title="mage studio",
        description="Generate, inpaint, outpaint and classify with one MAGE model.",
        version="1",
        docs_url=None,  # the interactive docs load their scripts from a CDN: the page stays self-contained
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.studio = st
    # two images (inpaint: image + mask) plus the form fields around them
    app.add_middleware(_Guard, limit=2 * max_upload_bytes + 64 * 1024)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse({"error": str(e)}, e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            msg = str(err.get("msg", "invalid")).replace("Input should be", "must be")
            problems.append(f"{where}: {msg}" if where else msg)
        return JSONResponse({"error": "; ".join(problems) or "invalid request"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    # ---- page -------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---- read-only --------------------------------------------------------------------------------
    @app.get("/api/info")
    def info() -> dict:
        cfg = pipe.model.config
        clf = st.classifier
        return {
            "name": st.name,
            "image_size": st.size,
            "grid": list(st.grid),
            "num_tokens": cfg.num_tokens,
            "class_conditional": cfg.num_classes > 0,
            "classes": st.class_names(),
            "classifier": None if clf is None else {"classes": list(clf.classes)},
            "samples": len(st.samples),
            "defaults": {
                **SamplerParams().model_dump(),
                **{k: getattr(pipe.sampler, k) for k in ("steps", "temperature", "choice_temperature", "cfg")},
            },
            "limits": {
                "num": MAX_NUM,
                "watch": MAX_WATCH,
                "steps": MAX_STEPS,
                "feather": MAX_FEATHER,
                "extend": st.max_extend,
                "upload_bytes": st.max_upload_bytes,
                "pixels": st.max_pixels,
                "queue": st.gate.max_waiting,
            },
        }

    @app.get("/api/samples")
    def samples_() -> dict:
        return {"samples": [{"id": i, "label": n, "image": data_url(x)} for i, (n, x) in enumerate(st.samples)]}

    # ---- generation -------------------------------------------------------------------------------
    @app.post("/api/generate")
    def generate(p: GenerateParams) -> dict:
        with _answers("generating"):
            label, sampler = st.label(p.class_label), p.sampler()
            t0 = time.perf_counter()
            with st.model():
                images = pipe.generate(p.num, label, sampler, seed=p.seed)
            return {"images": [data_url(x) for x in images], "seconds": round(time.perf_counter() - t0, 3)}

    @app.post("/api/generate/steps")
    def generate_steps(p: GenerateParams) -> dict:
        if p.num > MAX_WATCH:
            raise ApiError(422, f"num: at most {MAX_WATCH} images when every step is shown (got {p.num})")
        with _answers("generating"):
            label, sampler = st.label(p.class_label), p.sampler()
            t0 = time.perf_counter()
            with st.model():
                frames, final = _decode_steps(pipe, p.num, label, sampler, p.seed)
            return {
                "grid": list(st.grid),
                "frames": frames,
                "images": [data_url(x) for x in final],
                "seconds": round(time.perf_counter() - t0, 3),
            }

    # ---- editing ----------------------------------------------------------------------------------
    @app.post("/api/prepare")
    def prepare(p: Annotated[ImageParams, Form()], file: UploadFile | None = File(None)) -> dict:
        with _answers("reading the image"):
            x, (h, w) = st.image(file, p.sample)
            return {"image": data_url(x), "width": st.size, "height": st.size, "sent": [w, h]}

    @app.post("/api/inpaint")
    def inpaint_(
        p: Annotated[InpaintParams, Form()], file: UploadFile | None = File(None), mask: UploadFile | None = File(None)
    ) -> dict:
        with _answers("inpainting"):
            x, sent = st.image(file, p.sample)
            if mask is None:
                raise ApiError(400, "send a mask: a PNG of the image's size, white where to regenerate")
            with st.decoding:
                m = st.decode(mask, "mask")
                hw, S = tuple(m.shape[-2:]), st.size
                if hw == (S, S):
                    region = m.mean(0) > 0.5
                elif hw == sent:
                    region = fit(m, S).mean(0) > 0.5  # same geometry as the image
            if hw not in ((S, S), sent):
                raise ApiError(
                    400, f"the mask is {hw[1]}x{hw[0]}: it must be the image's size ({sent[1]}x{sent[0]}) or {S}x{S}"
                )
            if not region.any():
                raise ApiError(400, "the mask is empty: paint the region to regenerate (white = regenerate)")
            label, sampler = st.label(p.class_label), p.sampler()
            t0 = time.perf_counter()
            with st.model():
                out = inpaint(pipe, x, region, label, sampler, seed=p.seed, feather=p.feather)
            return {
                "input": data_url(x),
                "mask": data_url(region.float()[None].expand(3, -1, -1)),
                "image": data_url(out),
                "seconds": round(time.perf_counter() - t0, 3),
            }

    @app.post("/api/outpaint")
    def outpaint_(p: Annotated[OutpaintParams, Form()], file: UploadFile | None = File(None)) -> dict:
        with _answers("outpainting"):
            sides = {"left": p.left, "right": p.right, "top": p.top, "bottom": p.bottom}
            for side, n in sides.items():
                if n > st.max_extend:
                    raise ApiError(422, f"{side}: at most {st.max_extend} pixels per side (got {n})")
            if not any(sides.values()):
                raise ApiError(400, "choose at least one side to extend (pixels > 0)")
            x, _ = st.image(file, p.sample)
            label, sampler = st.label(p.class_label), p.sampler()
            t0 = time.perf_counter()
            with st.model():
                out = outpaint(pipe, x, class_label=label, sampler=sampler, seed=p.seed, **sides)
            return {
                "input": data_url(x),
                "image": data_url(out),
                "box": {"left": p.left, "top": p.top, "width": st.size, "height": st.size},
                "seconds": round(time.perf_counter() - t0, 3),
            }

    # ---- recognition ------------------------------------------------------------------------------
    @app.post("/api/classify")
    def classify(p: Annotated[ImageParams, Form()], file: UploadFile | None = File(None)) -> dict:
        with _answers("classifying"):
            clf = st.classifier
            if clf is None:
                raise ApiError(
                    400,
                    "no classifier is loaded: start the studio with --classifier DIR "
                    "(a folder from 'mage finetune' or 'mage probe linear')",
                )
            x, _ = st.image(file, p.sample)
            with st.model():
                probs = clf.predict(fit(x, clf.meta["image_size"])[None])[0].float().cpu()
            top = probs.topk(min(5, probs.numel()))
            return {
                "image": data_url(x),
                "top": [
                    {"class": clf.classes[i], "prob": float(v)}
                    for v, i in zip(top.values.tolist(), top.indices.tolist())
                ],
            }

    return app


@torch.no_grad()
def _decode_steps(
    pipe: MAGEPipeline, num: int, label: int | None, sampler: SamplerConfig, seed: int
) -> tuple[list[dict], torch.Tensor]:
    """Generate ``num`` images as :meth:`MAGEPipeline.generate` does (same seed: the same images) and decode
    every step's guess too. -> (frames, final images [num, 3, S, S])."""
    L, mask_id = pipe.model.config.num_tokens, pipe.model.vocab.mask_id
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def watch(s: int, ids: torch.Tensor, fixed: torch.Tensor, guess: torch.Tensor) -> None:
        steps.append((ids.cpu(), fixed.cpu(), guess))

    labels = None if label is None else torch.full((num,), label, device=pipe.device)
    start = torch.full((num, L), mask_id, device=pipe.device)
    g = torch.Generator().manual_seed(seed)  # generate_tokens: the first batch uses the seed itself
    out = decode_tokens(pipe.model, start, sampler, labels, g, bf16=pipe.bf16, on_step=watch)
    final = pipe.decode(out)  # as generate decodes it, so the last frame is bit-identical to /api/generate
    guesses = pipe.decode(torch.cat([guess for _, _, guess in steps[:-1]])) if len(steps) > 1 else final[:0]
    frames = []
    for s, (ids, fixed, _) in enumerate(steps):
        images = final if s == len(steps) - 1 else guesses[s * num : (s + 1) * num]
        state = (ids != mask_id).long() + fixed.long()  # [num, L]: 0 masked, 1 decided before, 2 now
        frames.append(
            {
                "step": s + 1,
                "decided": int(fixed.sum()),
                "images": [data_url(x) for x in images],
                "state": ["".join(map(str, row)) for row in state.tolist()],
            }
        )
    return frames, final
