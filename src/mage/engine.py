"""The one training loop. Every trainer (tokenizer, MAGE pre-training, fine-tuning, the linear probe, the judge)
is a :class:`Task` -- set-up plus a loss on one micro-batch -- run by :func:`fit`.

What the loop owns, so no trainer repeats it:
- devices and DDP (``torchrun``: gloo on CPUs, nccl on GPUs), gradient accumulation (``accum`` micro-batches per
  optimizer step, gradients all-reduced once, on the last), clipping, ``--compile`` with its eager fallback;
- one warm-up + half-cycle cosine :class:`Schedule`, by step or by wall time (``max_minutes``: the cosine ends when
  the budget does, and a resumed run continues the clock where it stopped);
- one seed per (step, rank, micro-batch) from ``seeding.mix``, so a resumed run is bit-equal to a straight one;
- EMA on the model's device; non-finite steps skipped, counted, and fatal after ``max_bad_steps`` in a row;
- the run folder: a lock (one writer), atomic checkpoints (pruned to the newest ``keep_last``, never a
  non-finite one), leftovers of a killed write removed, an unreadable newest checkpoint skipped for the one
  before, the log written after the checkpoint it describes and cut back to it on resume.

A checkpoint holds ``model.safetensors`` + ``config.json`` (the architecture) + ``train.json`` (the recipe) +
``train_state.pt`` (tensors and plain types only: optimizers, EMA, step, elapsed time, the task's own state),
read back with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Iterator

import torch
import torch.nn as nn
from tqdm import tqdm

from . import seeding
from .checkpoint import (
    CONFIG,
    clean_partial,
    load_config,
    load_strict,
    load_train_state,
    load_weights,
    refuse_overwrite,
    save_checkpoint,
    save_step,
    step_dirs,
)
from .compiling import CompiledStep
from .config import to_dict
from .distributed import DistInfo, all_reduce_mean, barrier, max_over_ranks
from .errors import MageError, UnsafeFileError
from .files import atomic_write, atomic_write_json, read_json

# config fields a resumed run may change; any other difference from the run's saved config is refused
RESUMABLE_CHANGES = ("max_minutes", "max_steps", "log_every", "ckpt_every", "sample_every")
RUN_ARGS = "run.json"
RECIPE = "train.json"  # the recipe beside config.json (the architecture) in every checkpoint


def _recipe(ckpt: str) -> Any:
    """The training recipe saved beside a checkpoint's weights (None in checkpoints from before train.json)."""
    path = os.path.join(ckpt, RECIPE)
    return load_config(path) if os.path.isfile(path) else None


def saved_run(out: str) -> tuple[Any, Any, dict[str, Any]] | None:
    """(architecture, recipe, run.json arguments) of the run in ``out`` (its newest checkpoint), or None."""
    steps = step_dirs(out)
    if not steps:
        return None
    path = os.path.join(out, RUN_ARGS)
    args = read_json(path, "the run's data flags") if os.path.isfile(path) else {}
    return load_config(os.path.join(steps[-1][1], CONFIG)), _recipe(steps[-1][1]), args


# --------------------------------------------------------------------------------------------------
# schedule, EMA
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Schedule:
    """Linear warm-up from 0 over ``warmup`` steps, then half-cycle cosine from ``lr`` to ``min_lr`` at ``total``.
    With ``max_minutes`` the cosine follows whichever is further on, steps or wall time (such runs end when the
    budget does and are not bit-reproducible; step-limited runs are)."""

    lr: float
    total: int
    warmup: int = 0
    min_lr: float = 0.0
    max_minutes: float = 0.0

    def progress(self, step: int, elapsed_s: float = 0.0) -> float:
        frac = step / max(1, self.total)
        if self.max_minutes > 0:
            frac = max(frac, elapsed_s / 60 / self.max_minutes)
        return min(1.0, frac)

    def __call__(self, step: int, elapsed_s: float = 0.0) -> float:
        if step < self.warmup:
            return self.lr * step / self.warmup
        pos = max(step, self.progress(step, elapsed_s) * self.total)
        t = min(1.0, (pos - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


class EMA:
    """Exponential moving average of a model's floating-point state, in fp32 on the model's device."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {
            k: v.detach().float().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        sd = model.state_dict()
        torch._foreach_lerp_(list(self.shadow.values()), [sd[k].float() for k in self.shadow], 1.0 - self.decay)

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The averaged weights in the model's own dtypes (non-float entries taken from the model)."""
        return {k: self.shadow[k].to(v.dtype) if k in self.shadow else v for k, v in model.state_dict().items()}

    def load(self, shadow: dict[str, torch.Tensor]) -> None:
        for k, v in self.shadow.items():
            v.copy_(shadow[k])


# --------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoopSettings:
    """The loop's knobs, filled by each trainer from its config (see each trainer's ``settings``)."""

    total_steps: int
    lr: float
    warmup_steps: int = 0
    min_lr: float = 0.0
    max_minutes: float = 0.0
    grad_clip: float = 0.0  # 0 = no clipping (the norm is still computed: non-finite steps are skipped)
    accum: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.0
    compile: str = ""
    log_every: int = 20
    ckpt_every: int = 1000
    seed: int = 0
    keep_last: int = 2
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops

    @classmethod
    def from_recipe(cls, recipe: Any, **given: Any) -> LoopSettings:
        """The settings ``given`` (schedule, accumulation), the rest read from the recipe's fields of the same
        names (max_minutes, grad_clip, ema_decay, compile, log_every, ckpt_every, seed)."""
        own = {f.name for f in dataclasses.fields(cls)}
        shared = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name in own}
        return cls(**{**shared, **given})


class Task:
    """One trainer: what ``fit`` needs to know about it. Subclasses set the attributes and override the methods."""

    name = "train"
    config: Any = None  # the architecture: saved as config.json beside the weights
    recipe: Any = None  # the training recipe: saved as train.json
    model: nn.Module  # its state_dict is the checkpoint's model.safetensors (and the EMA's)
    net: nn.Module  # what ``loss`` calls: the model, DDP-wrapped (``fit`` may compile it)
    synced: list[nn.Module] = []  # DDP modules (gradient all-reduce skipped on all but the last micro-batch)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    global_batch: int = 0  # images per optimizer step over all ranks (for images/s)
    curve: tuple[str, ...] = ()  # log keys plotted in OUT/curve.png
    progress: float = 0.0  # share of the run done when the current step started (set by ``fit``)
    run_args: dict[str, Any] = {}  # where the data came from: OUT/run.json, so ``--resume`` needs only --out

    def batches(self, start: int, end: int) -> Iterator[tuple[int, Any]]:
        """(step, this rank's batch) for steps start .. end - 1."""
        raise NotImplementedError

    def split(self, batch: Any, n: int) -> list[Any]:
        """``n`` micro-batches of ``batch`` (default: every tensor chunked along dim 0)."""
        if n == 1:
            return [batch]
        parts = [t.chunk(n) if torch.is_tensor(t) else [t] * n for t in batch]
        if min(len(p) for p in parts if p) < n:
            raise MageError(f"--accum {n} is more than the {len(batch[0])} rows each rank gets per step")
        return [tuple(p[i] for p in parts) for i in range(n)]

    def loss(self, net: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, metrics to log) of one micro-batch."""
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)

    def reduce_grads(self) -> None:
        """Gradients of modules outside DDP, all-reduced by the task before the optimizer step."""

    def after_step(self, step: int, progress: float) -> dict[str, float]:
        """Work between optimizer steps (e.g. codebook restarts); returns extra log values."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything else a resume needs (tensors and plain types)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_start(self, out: str) -> None:
        """Files the run writes once it holds OUT (rank 0), e.g. a copy of its tokenizer."""

    def on_checkpoint(self, out: str, step: int) -> None:
        """Side outputs written with each checkpoint (sample grids)."""


# --------------------------------------------------------------------------------------------------
# the run folder
# --------------------------------------------------------------------------------------------------
class RunLock:
    """``OUT/.lock``, held while a run writes to OUT: a second writer fails at once. The lock is the kernel's, so a
    killed run never leaves a stale one behind; a POSIX record lock (``lockf``) belongs to the process alone, so
    DataLoader workers forked from a killed run do not keep holding it while they wind down."""

    _held: set[str] = set()  # a process's own record locks do not exclude each other: track them here

    def __init__(self, out: str):
        import fcntl

        os.makedirs(out, exist_ok=True)
        self.path = os.path.realpath(os.path.join(out, ".lock"))
        if self.path in RunLock._held:
            raise MageError(f"{out} is in use by pid {os.getpid()} (another run is writing to it)")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise MageError(f"{out} is in use by pid {pid} (another run is writing to it)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        RunLock._held.add(self.path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            RunLock._held.discard(self.path)


# the fields every log row has besides the task's own metrics
_LOG_FIELDS = ("step", "lr", "grad_norm", "elapsed_s", "images_per_s", "skipped")


def read_log(path: str) -> list[dict[str, Any]]:
    """The rows of a JSONL log; a torn or garbled line (a kill mid-write) is skipped."""
    rows = []
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("step"), int):
                        rows.append(row)
    return rows


def _cut_log(path: str, step: int) -> None:
    """Keep the rows of steps <= ``step`` (the checkpoint being resumed): the rows after it are made again."""
    if not os.path.isfile(path):
        return
    rows = [r for r in read_log(path) if r["step"] <= step]
    with open(path, "rb") as f:
        old = f.read()
    new = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if new != old:
        atomic_write(path, lambda tmp: open(tmp, "wb").write(new))


def plot_curve(log_path: str, png: str, keys: tuple[str, ...]) -> None:
    """One panel per logged key against step (``%`` for accuracies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    keys = tuple(k for k in keys if any(k in r for r in rows))
    if not rows or not keys:
        return
    fig, ax = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for a, k in zip(ax[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        scale = 100 if k in ("acc", "usage") and max(abs(v) for _, v in pts) <= 1 else 1
        a.plot([s for s, _ in pts], [scale * v for _, v in pts], color=f"C{keys.index(k)}")
        a.set(xlabel="step", title=k)
        a.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def check_resume_config(out: str, saved: Any, cfg: Any) -> None:
    """A resumed run keeps its own settings: any field that differs from the saved config (other than
    ``RESUMABLE_CHANGES``) is a one-line error naming the fields."""
    if type(saved) is not type(cfg):
        raise MageError(f"cannot resume {out}: it holds a {type(saved).__name__} run, not a {type(cfg).__name__} one")
    diff = [
        f"{f.name} {getattr(saved, f.name)!r} -> {getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(cfg)
        if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)
    ]
    if diff:
        raise MageError(
            f"cannot resume {out}: its run has other settings ({', '.join(diff)}); leave them out to "
            f"use the run's own (only {', '.join(RESUMABLE_CHANGES)} may change), or choose another --out"
        )


def _newest_readable(out: str, device: torch.device) -> tuple[int, str, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(step, dir, weights, train state) of the newest checkpoint that reads back; an unreadable one is skipped
    with a warning naming it. None when the run has no checkpoint; an error when none of them reads back, or when
    one holds code (a run folder someone tampered with is not resumed from an older step either)."""
    dirs = step_dirs(out)
    for step, path in reversed(dirs):
        try:
            weights = load_weights(path)
            state = load_train_state(path, map_location=device)
            load_config(os.path.join(path, CONFIG))
            return step, path, weights, state
        except UnsafeFileError:
            raise
        except MageError as e:
            warnings.warn(
                f"checkpoint {path} is unreadable ({e}); resuming from the one before it", RuntimeWarning, stacklevel=3
            )
    if dirs:
        raise MageError(f"cannot resume {out}: none of its {len(dirs)} checkpoints reads back (see the warnings)")
    return None


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
def fit(
    task: Task,
    s: LoopSettings,
    info: DistInfo,
    out: str | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train ``task`` for ``s.total_steps`` optimizer steps (or until ``s.max_minutes``), checkpointing into
    ``out`` (None: in memory only, no checkpoints or log). ``stop_at`` ends the run at that step with a
    checkpoint, as an interruption would. Returns the last logged metrics, ``step``, ``minutes``, ``skipped``."""
    if s.accum < 1:
        raise MageError(f"--accum must be >= 1 (got {s.accum})")
    dev = info.device
    main = info.is_main and out is not None
    lock = RunLock(out) if main else None
    try:
        return _fit(task, s, info, dev, out, main, resume, progress, stop_at)
    finally:
        if lock is not None:
            lock.release()


def _fit(
    task: Task,
    s: LoopSettings,
    info: DistInfo,
    dev: torch.device,
    out: str | None,
    main: bool,
    resume: bool,
    progress: bool,
    stop_at: int | None,
) -> dict[str, Any]:
    sched = Schedule(s.lr, s.total_steps, s.warmup_steps, s.min_lr, s.max_minutes)
    ema = EMA(task.model, s.ema_decay) if s.ema_decay > 0 else None
    start, elapsed0, skipped, last_good = 0, 0.0, 0, None
    if out is not None:
        if main:
            left = clean_partial(out) + clean_partial(os.path.join(out, "checkpoints"))
            if left:
                print(f"note: removed {len(left)} leftover(s) of an interrupted write in {out}", file=sys.stderr)
        barrier(info)
        refuse_overwrite(out, resume)
        found = _newest_readable(out, dev) if resume else None
        if found is not None:
            start, last_good, weights, st = found
            check_resume_config(out, load_config(os.path.join(last_good, CONFIG)), task.config)
            if task.recipe is not None and _recipe(last_good) is not None:
                check_resume_config(out, _recipe(last_good), task.recipe)
            load_strict(task.model, weights, f"cannot resume from {last_good}")
            for name, opt in task.optimizers.items():
                opt.load_state_dict(st["optimizers"][name])
            if ema is not None and st.get("ema") is not None:
                ema.load(st["ema"])
            task.load_state_dict(st.get("task", {}))
            elapsed0, skipped = float(st.get("elapsed_s", 0.0)), int(st.get("skipped", 0))
        if main:
            _cut_log(os.path.join(out, "log.jsonl"), start)
            if found is None or not os.path.isfile(os.path.join(out, RUN_ARGS)):
                atomic_write_json(os.path.join(out, RUN_ARGS), task.run_args)
            task.on_start(out)
    runner = CompiledStep(task.net, s.compile, info.is_main)
    log = open(os.path.join(out, "log.jsonl"), "a") if main else None
    bar = tqdm(
        total=s.total_steps,
        initial=start,
        desc=task.name,
        disable=not (progress and info.is_main),
        dynamic_ncols=True,
        leave=out is not None,
    )
    t0, first_s, bad_run = time.time(), None, 0
    step, last = start, {}

    def clock() -> float:  # elapsed seconds of the whole run, the same on every rank
        e = elapsed0 + time.time() - t0
        return max_over_ranks(e, info) if s.max_minutes > 0 else e

    def seed(micro: int) -> None:  # dropout, drop-path, label dropout of this micro-batch
        torch.manual_seed(seeding.mix(s.seed, seeding.STEP, step, info.rank, micro))

    # a time-limited run resumed after its budget is finished: it returns as it is, not one step further
    finished = s.max_minutes > 0 and elapsed0 / 60 >= s.max_minutes and start > 0
    if finished and out is not None:
        rows = [r for r in read_log(os.path.join(out, "log.jsonl")) if r.get("step") == start]
        last = {k: v for k, v in (rows[-1] if rows else {}).items() if k not in _LOG_FIELDS}
    try:
        for step, batch in [] if finished else task.batches(start, s.total_steps):
            elapsed = clock()
            lr = sched(step, elapsed)
            task.set_lr(lr)
            task.progress = sched.progress(step, elapsed)
            task.model.train()
            for opt in task.optimizers.values():
                opt.zero_grad(set_to_none=True)
            micros = task.split(batch, s.accum)
            sums = _backward(task, runner, micros, step, seed)
            task.reduce_grads()
            norms = [
                torch.nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], s.grad_clip if s.grad_clip > 0 else float("inf")
                )
                for opt in task.optimizers.values()
            ]
            finite = bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()) if norms else True
            step += 1
            if finite:
                bad_run = 0
                for opt in task.optimizers.values():
                    opt.step()
                if ema is not None:
                    ema.update(task.model)
            else:  # skip the update; the data moves on
                skipped += 1
                bad_run += 1
                if bad_run >= s.max_bad_steps:
                    raise MageError(
                        f"loss is not finite at step {step} ({bad_run} steps in a row; last good "
                        f"checkpoint: {last_good or 'none'}): lower the learning rate or check the data"
                    )
            extra = task.after_step(step, sched.progress(step, elapsed)) if finite else {}
            if first_s is None:  # images/s counts from the end of the first step (warm-up)
                first_s, first_step = time.time(), step
            elapsed = clock()
            stop = step == stop_at or (s.max_minutes > 0 and elapsed / 60 >= s.max_minutes)
            if step % s.log_every == 0 or step == s.total_steps or stop:  # the last step is always logged
                n = len(micros)
                last = {k: all_reduce_mean(v / n, info).item() for k, v in sums.items()}
                last.update(extra)
                rate = (step - first_step) * task.global_batch / max(1e-9, time.time() - first_s)
                row = {
                    "step": step,
                    **last,
                    "lr": lr,
                    "grad_norm": float(norms[0]) if norms else 0.0,
                    "elapsed_s": round(elapsed, 3),
                    "images_per_s": round(rate, 2),
                    "skipped": skipped,
                }
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(last.items())[:3]} | {"lr": f"{lr:.2e}"})
            else:
                row = None
            if out is not None and (step % s.ckpt_every == 0 or step == s.total_steps or stop):
                last_good = _save(task, s, info, out, step, ema, elapsed, skipped, main) or last_good
            if row is not None and log is not None:  # after the checkpoint it describes
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.update(1)
            if stop:
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
    barrier(info)
    return {"step": step, **last, "minutes": (elapsed0 + time.time() - t0) / 60, "skipped": skipped}


def _backward(task: Task, runner: CompiledStep, micros: list[Any], step: int, seed) -> dict[str, torch.Tensor]:
    """Forward + backward of each micro-batch (gradients add up; DDP all-reduces on the last one only).
    Returns the metrics summed over the micro-batches."""
    sums: dict[str, torch.Tensor] = {}
    for i, micro in enumerate(micros):
        sync = contextlib.ExitStack()
        if i < len(micros) - 1:
            for m in task.synced:
                sync.enter_context(m.no_sync())

        def micro_step(net: nn.Module, micro=micro) -> dict[str, torch.Tensor]:
            loss, metrics = task.loss(net, micro, step)
            (loss / len(micros)).backward()
            return metrics

        def reset(i=i) -> None:  # the compiler failed on the first call: redo it eagerly
            for opt in task.optimizers.values():
                opt.zero_grad(set_to_none=True)
            seed(i)

        seed(i)
        with sync:
            metrics = runner(micro_step, reset=reset)
        task.net = runner.module
        for k, v in metrics.items():
            v = v.detach().float()
            sums[k] = sums[k] + v if k in sums else v
    return sums


def _save(
    task: Task,
    s: LoopSettings,
    info: DistInfo,
    out: str,
    step: int,
    ema: EMA | None,
    elapsed: float,
    skipped: int,
    main: bool,
) -> str | None:
    """Write step ``step``'s checkpoint (rank 0) and prune; a model with non-finite weights is never saved."""
    path = None
    if main:
        weights = task.model.state_dict()
        if not all(bool(torch.isfinite(v).all()) for v in weights.values() if v.dtype.is_floating_point):
            raise MageError(f"the weights are not finite at step {step}: not saved (last good checkpoint kept)")
        state = {
            "step": step,
            "elapsed_s": elapsed,
            "skipped": skipped,
            "optimizers": {k: o.state_dict() for k, o in task.optimizers.items()},
            "ema": ema.shadow if ema is not None else None,
            "task": task.state_dict(),
        }
        recipe = {RECIPE: to_dict(task.recipe)} if task.recipe is not None else None
        path = save_step(out, step, weights, task.config, state, s.keep_last, extra=recipe)
        if ema is not None:
            save_checkpoint(os.path.join(out, "ema"), ema.weights(task.model), task.config)
        task.on_checkpoint(out, step)
        if task.curve:
            plot_curve(os.path.join(out, "log.jsonl"), os.path.join(out, "curve.png"), task.curve)
    barrier(info)
    return path


def batch_count(n: int, batch: int, epochs: float, max_steps: int) -> tuple[int, int]:
    """(steps per epoch, total steps): ``max_steps`` when > 0, else ``epochs`` over ``n`` items (last batch dropped)."""
    if n < batch:
        raise MageError(f"dataset has {n} items, fewer than the global batch {batch}")
    per_epoch = n // batch
    return per_epoch, max_steps if max_steps > 0 else max(1, int(epochs * per_epoch))
