"""Checkpoint directories, written atomically.

A training run writes ``OUT/checkpoints/step-0000500/`` directories, each holding

    model.safetensors   the weights (same key names as the original release where one exists)
    config.json         the resolved config (see config.py)
    train_state.pt      optimizer, scaler, step, RNG states ... (only what resume needs)

Each directory is first written under a temporary name, fsynced and then renamed, so a crash never leaves a
half-written checkpoint behind (``clean_partial`` removes the temporary leftovers of a killed write).
``resolve_checkpoint(OUT)`` finds the newest complete one, so users can pass
either the run directory or one step directory wherever a model is expected.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import load_config, save_config
from .errors import MageError, UnsafeFileError
from .files import atomic_write, atomic_write_json, fsync_dir, fsync_tree  # noqa: F401  (re-exported)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "train_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")
# what torch_load_official reads beyond tensors and plain types: the original's training checkpoints
# (``util/misc.py save_model``) hold ``'args': argparse.Namespace(...)`` next to model / optimizer / epoch / scaler
OFFICIAL_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, WEIGHTS)) and os.path.isfile(os.path.join(path, CONFIG))


def step_dirs(run_dir: str) -> list[tuple[int, str]]:
    """All complete step checkpoints under ``run_dir/checkpoints``, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        full = os.path.join(root, name)
        if m and is_checkpoint_dir(full):
            out.append((int(m.group(1)), full))
    return sorted(out)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory itself, or the newest one inside a run directory."""
    if is_checkpoint_dir(path):
        return path
    steps = step_dirs(path)
    if steps:
        return steps[-1][1]
    if not os.path.exists(path):
        raise MageError(f"checkpoint not found: {path}")
    raise MageError(f"no checkpoint in {path} (expected {WEIGHTS} + {CONFIG}, or checkpoints/step-*/)")


def save_checkpoint(
    path: str,
    weights: dict[str, torch.Tensor],
    config: Any,
    train_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint directory atomically: a temporary folder, every file fsynced, then renamed.
    ``extra`` maps file names to JSON-able dicts. ``train_state`` holds tensors and plain types only (it is
    read back with ``weights_only=True``)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, os.path.join(tmp, WEIGHTS))
        save_config(config, os.path.join(tmp, CONFIG))
        if train_state is not None:
            torch.save(train_state, os.path.join(tmp, STATE))
        for name, obj in (extra or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)
        fsync_tree(tmp)
        if os.path.exists(path):  # replace an older copy: move it aside first, then swap (see clean_partial)
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def clean_partial(folder: str) -> list[str]:
    """Remove what a killed write left in ``folder``: ``.tmp-*`` files and folders; a ``X.old`` whose ``X`` is
    missing (killed between the two renames of a replacement) is put back. Returns the names removed."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if name.startswith(".tmp-"):
            shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
            removed.append(name)
        elif name.endswith(".old"):
            if os.path.exists(full[:-4]):
                shutil.rmtree(full, ignore_errors=True)
                removed.append(name)
            else:
                os.replace(full, full[:-4])
    return removed


def remove_tree(path: str) -> None:
    """Delete a folder so that a kill half-way leaves a ``.tmp-*`` (cleaned later), never a half checkpoint."""
    doomed = os.path.join(os.path.dirname(path), ".tmp-removing-" + os.path.basename(path))
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def refuse_overwrite(run_dir: str, resume: bool) -> None:
    """Starting a run afresh in a folder that holds one would lose it (its log is rewritten and, worse, its newer
    checkpoints outlive the new run's in pruning): refuse unless resuming."""
    steps = [] if resume else step_dirs(run_dir)
    if steps:
        raise MageError(
            f"{run_dir} already holds a run (checkpoint at step {steps[-1][0]}): "
            f"pass --resume to continue it, or choose another --out"
        )


def save_step(
    run_dir: str,
    step: int,
    weights: dict[str, torch.Tensor],
    config: Any,
    train_state: dict[str, Any] | None = None,
    keep_last: int = 2,
    extra: dict[str, Any] | None = None,
) -> str:
    """Save ``run_dir/checkpoints/step-{step}`` (``extra``: as :func:`save_checkpoint`) and prune all but the
    newest ``keep_last``."""
    path = save_checkpoint(
        os.path.join(run_dir, "checkpoints", f"step-{step:07d}"), weights, config, train_state, extra
    )
    for _, old in step_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        remove_tree(old)
    return path


def read_safetensors(file: str, what: str = "weights") -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors, or a one-line MageError (missing, empty, corrupt)."""
    if not os.path.isfile(file):
        raise MageError(f"cannot read {what} {file}: no such file")
    if os.path.getsize(file) == 0:
        raise MageError(f"cannot read {what} {file}: the file is empty")
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises several types for corrupt files
        raise MageError(f"cannot read {what} {file}: {(str(e).strip() or type(e).__name__).splitlines()[0]}") from None


def load_weights(path: str) -> dict[str, torch.Tensor]:
    return read_safetensors(os.path.join(path, WEIGHTS))


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], Any, str]:
    """(weights, config, resolved dir) of a checkpoint or run directory."""
    ckpt = resolve_checkpoint(path)
    return load_weights(ckpt), load_config(os.path.join(ckpt, CONFIG)), ckpt


def _refused_globals(e: Exception, path: str) -> list[str]:
    """The globals PyTorch's safe unpickler refused in ``path`` (e.g. ``posix.system``); [] when ``e`` is not
    such a refusal (a corrupt or truncated file)."""
    text = str(e)
    if "Weights only load failed" not in text and "WeightsUnpickler" not in text:
        return []
    try:  # the full names of every global outside the allow-list (only the pickle is scanned, nothing runs)
        found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        found = []
    return found or re.findall(r"GLOBAL ([\w.]+)", text)


def _reason(e: Exception) -> str:
    """One line for a file torch.load could not read."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if m:
        return f"PyTorch's safe loader refused it ({m.group(1).strip()})"
    if "Weights only load failed" in text:
        return "PyTorch's safe loader refused it"
    return (text.strip() or type(e).__name__).splitlines()[0]


def safe_torch_load(path: str, map_location: str | torch.device = "cpu", allow: tuple[type, ...] = ()) -> Any:
    """``torch.load`` that never runs code: ``weights_only=True``, with only ``allow`` (e.g. argparse.Namespace)
    added to tensors and plain types. A file that needs another pickle global raises UnsafeFileError naming it;
    a missing or corrupt file a one-line MageError."""
    if not os.path.isfile(path):
        raise MageError(f"file not found: {path}")
    with torch.serialization.safe_globals(list(allow)):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Detected pickle protocol")  # the error, if any, says it all
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            found = _refused_globals(e, path)
            if not found:
                raise MageError(f"cannot read {path}: {_reason(e)}") from None
    kinds = ", ".join(["tensors", "plain types"] + [f"{c.__module__}.{c.__qualname__}" for c in allow])
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise UnsafeFileError(
        f"cannot load {path}: it needs the global {found[0]}{more}, which could run code; "
        f"only {' and '.join(kinds.rsplit(', ', 1))} are read"
    )


def load_train_state(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's train state: tensors and plain types only (``weights_only=True``: a file cannot run code)."""
    f = os.path.join(path, STATE)
    if not os.path.isfile(f):
        raise MageError(f"{path} has no {STATE}: cannot resume from it")
    return safe_torch_load(f, map_location)


def torch_load_official(path: str) -> dict[str, Any]:
    """An original release / training checkpoint (``{'model': sd, 'optimizer': ..., 'epoch': ..., 'args':
    Namespace(...)}`` or a bare state dict), read without running code: tensors, plain types and
    argparse.Namespace only (:func:`safe_torch_load`); a one-line error for missing, corrupt or unsafe files."""
    obj = safe_torch_load(path, "cpu", OFFICIAL_GLOBALS)
    if not isinstance(obj, dict):
        raise MageError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj


def load_strict(model: torch.nn.Module, sd: dict[str, Any], where: str, keep_missing: tuple[str, ...] = ()) -> None:
    """``load_state_dict`` with a one-line MageError for missing, unexpected or mis-shaped keys: the one way a
    state dict is loaded. ``keep_missing``: key prefixes the weights may lack (those keep their initial values,
    e.g. a classifier head on top of pre-trained blocks)."""
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(sd) if not k.startswith(keep_missing))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        more = lambda xs: xs[:3] + (["..."] if len(xs) > 3 else [])  # noqa: E731
        raise MageError(
            f"{where}: weights do not fit the model (missing {more(missing)}, unexpected {more(unexpected)})"
        )
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if bad:
        k = bad[0]
        raise MageError(
            f"{where}: shape mismatch for {k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        )
    model.load_state_dict(sd, strict=not keep_missing)
