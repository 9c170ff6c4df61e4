"""``mage studio``: a local web page and JSON API over one MAGE pipeline (generate, watch the decoding,
inpaint, outpaint, classify). :func:`create_app` builds the app; ``static/`` holds the page (no CDN: it works
offline). Needs the ``fastapi``, ``uvicorn`` and ``python-multipart`` packages."""

from __future__ import annotations

__all__ = ["create_app", "load_samples"]


def __getattr__(name: str):
    # fastapi is imported only when the studio is used: the rest of mage works without it
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
