"""``mage studio``: a local web page (and JSON API) to generate, inpaint, outpaint and classify with one model."""

from __future__ import annotations

import argparse
import os
import socket

from ..errors import MageError
from .common import POSITIVE_F, Command, add_weights_arg, number

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_studio_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="fashion-mnist", help="a release name (default fashion-mnist), a MAGE run or imported folder"
    )
    p.add_argument(
        "--classifier",
        default=None,
        help="classifier folder for the classify tab ('mage finetune' / 'mage probe linear'; default: the model "
        "folder's classifier/ when it has one, as a release does)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number(int, 1, high=65535), default=7860)
    p.add_argument(
        "--queue", type=number(int, 0), default=8, help="requests that may wait for the model (more get HTTP 429)"
    )
    p.add_argument("--max-upload-mb", type=POSITIVE_F, default=4.0, help="largest image upload (default 4 MB)")
    p.add_argument(
        "--samples",
        default="fashion-mnist",
        help="dataset whose test images the page offers: fashion-mnist | mnist | synthetic | none",
    )
    add_weights_arg(p)


def _check_port(host: str, port: int) -> None:
    """A one-line error now rather than a server that fails after the model has loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise MageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise MageError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port)") from None


def run_studio(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MageError(
            f"mage studio needs fastapi, uvicorn and python-multipart ({e.name} is missing): "
            "pip install -r requirements.txt"
        ) from None
    from ..pipeline import MAGEPipeline
    from ..recognition import Classifier
    from ..studio.server import create_app, load_samples

    if not os.path.isdir(args.model):
        raise MageError(f"no model at {args.model}: give a release name (fashion-mnist), a run or imported folder")
    pipe = MAGEPipeline.from_pretrained(args.model, weights=args.weights)
    clf_dir = args.classifier
    if clf_dir is None and os.path.isfile(os.path.join(args.model, "classifier", "classifier.json")):
        clf_dir = os.path.join(args.model, "classifier")
    classifier = Classifier(clf_dir) if clf_dir else None
    _check_port(args.host, args.port)
    size = pipe.tokenizer.config.image_size
    samples = load_samples(None if args.samples == "none" else args.samples, size)
    app = create_app(
        pipe,
        classifier,
        samples=samples,
        name=os.path.basename(os.path.normpath(args.model)),
        max_queue=args.queue,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
    )
    where = f"[{args.host}]" if ":" in args.host else args.host
    print(f"mage studio: http://{where}:{args.port}/  (model {args.model}; Ctrl+C stops)")
    if classifier is None:
        print("  no classifier: the classify tab is off (add --classifier DIR)")
    if args.host not in LOOPBACK:
        print(f"  listening on {args.host}: anyone who can reach this machine can use the studio")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


COMMANDS = (
    Command(
        "studio",
        "a local web page to generate, inpaint, outpaint and classify (http://127.0.0.1:7860)",
        add_studio_arguments,
        run_studio,
    ),
)
