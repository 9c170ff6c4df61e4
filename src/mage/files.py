"""The one atomic write: temporary file beside the target, fsync, rename, fsync of the folder.

A process killed at any moment leaves either the old file or the new one; the temporary leftovers start with
``.tmp-`` and are removed by ``checkpoint.clean_partial`` when a run starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable

from .errors import MageError


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


def read_json(path: str, what: str = "file") -> dict[str, Any]:
    """A JSON object read from ``path``, or a one-line MageError (missing, empty, corrupt, not an object)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        why = "the file is empty" if empty else (e.strerror if isinstance(e, OSError) else str(e).splitlines()[0])
        raise MageError(f"cannot read {what} {path}: {why}") from None
    if not isinstance(d, dict):
        raise MageError(f"cannot read {what} {path}: not a JSON object")
    return d


def _is_leftover_of(name: str, ours: set[str]) -> bool:
    """``.tmp-NAME-...`` (atomic_write, save_checkpoint) or ``NAME.tmp``: a temporary file of one of ``ours``."""
    if name.endswith(".tmp") and name[:-4] in ours:
        return True
    return name.startswith(".tmp-") and any(name[5:].startswith(o + "-") for o in ours)


def foreign_entries(folder: str, ours: Iterable[str]) -> list[str]:
    """The names in ``folder`` (sorted) that are neither in ``ours`` nor a temporary leftover of one: what a
    command that writes only ``ours`` there did not write, and so must never delete or replace."""
    ours = set(ours)
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n not in ours and not _is_leftover_of(n, ours))


def remove_entries(folder: str, ours: Iterable[str]) -> list[str]:
    """Delete the entries of ``folder`` named in ``ours`` (and their temporary leftovers), nothing else.
    Returns the names removed."""
    ours = set(ours)
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name in ours or _is_leftover_of(name, ours):
            full = os.path.join(folder, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
            removed.append(name)
    return removed
