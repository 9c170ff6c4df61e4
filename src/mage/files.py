"""The one atomic write: temporary file beside the target, fsync, rename, fsync of the folder.

A process killed at any moment leaves either the old file or the new one; the temporary leftovers start with
``.tmp-`` and are removed by ``checkpoint.clean_partial`` when a run starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Callable


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(path)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """The one atomic file write: ``write(tmp)`` fills a temporary file beside ``path``, which is fsynced and
    renamed over ``path``; a crash leaves the old file or the new one, never half of one."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(parent)


def atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_write(path, write)
