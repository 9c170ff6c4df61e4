"""The ``mage`` command line: the parser, built from the subcommands in :mod:`mage.commands` (one module per
group, each command's flags next to what it runs), and the error handling. Each subcommand is a thin wrapper
over the Python API.

Errors a user can fix print one line (``mage: error: ...``) and exit 2 -- a :class:`~mage.errors.MageError`,
or an OSError (``cannot write PATH: REASON``: a file where a folder goes, a full disk, no permission); set
MAGE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from .commands import COMMANDS
from .errors import MageError

RUN = {c.name: c.run for c in COMMANDS}  # subcommand -> what it runs


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line too (``mage: error: ... (see 'mage CMD --help')``), exit 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"mage: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mage", description="MAGE: masked generative encoder (generation + recognition)")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    for c in COMMANDS:
        c.add_arguments(sub.add_parser(c.name, help=c.help))
    return ap


# errno values that mean "this path cannot be written as asked" (the rest: "cannot access")
_WRITE_ERRNOS = {
    errno.EEXIST,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENOTEMPTY,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
}


def os_error_line(e: OSError) -> str:
    """An OSError as one line naming the path and the reason: ``cannot write runs/x: Not a directory``."""
    text = str(e).strip()
    reason = e.strerror or (text.splitlines()[0] if text else type(e).__name__)
    path = e.filename2 if e.filename2 is not None and e.errno in (errno.EISDIR, errno.ENOTEMPTY) else e.filename
    if path is None:
        return reason
    path = os.fsdecode(path) if isinstance(path, (bytes, str)) else str(path)
    verb = "cannot write" if e.errno in _WRITE_ERRNOS else "cannot access"
    return f"{verb} {path or repr(path)}: {reason}"


# flags that name a model folder, and the part of a release (``--model fashion-mnist``) each one means
_RELEASE_FLAGS = {
    "model": "mage",
    "init": "mage",
    "agreement": "mage",
    "tokenizer": "tokenizer",
    "classifier": "classifier",
    "judge": "judge",
}


def resolve_releases(args: argparse.Namespace) -> None:
    """Replace a release name given to a model flag by its folder (:mod:`mage.released`), for every command."""
    from .released import resolve

    for flag, part in _RELEASE_FLAGS.items():
        value = getattr(args, flag, None)
        if isinstance(value, str):
            setattr(args, flag, resolve(value, part))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help()
        return 2
    try:
        resolve_releases(args)
        return RUN[args.cmd](args) or 0
    except MageError as e:
        print(f"mage: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (a file where a folder goes, a full disk, ...): one line
        if os.environ.get("MAGE_DEBUG"):
            raise
        print(f"mage: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mage: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for users; MAGE_DEBUG=1 shows it
        if os.environ.get("MAGE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"mage: error: {type(e).__name__}: {msg} (set MAGE_DEBUG=1 for details)", file=sys.stderr)
        return 1
