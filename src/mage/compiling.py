"""``--compile``: a training step through ``torch.compile``, with a fallback to eager.

Small models on a GPU are launch-bound (the fmnist-32 step at batch 16 took 21 ms on an H200: kernel launches,
not math); a compiled step fuses the elementwise work and, with ``reduce-overhead``, replays the whole step as
CUDA graphs. MAGE's training forward is one graph (the token drop is a static gather, ``model.kept_positions``).
Compiling happens on the first step; if it fails there (no C++ compiler, an unsupported op), the run says so in
one line and goes on eagerly rather than losing the job.

Generation is not compiled: the sampler's forward through inductor with freezing (``mage bench --compile``'s
generation rows) measured 0.93-1.23x eager for vit-b at batch 16 in bf16 on a 2-core AMX CPU, run-to-run noise.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.nn as nn

from .errors import MageError

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
T = TypeVar("T")


def check_mode(mode: str) -> None:
    if mode and mode not in MODES:
        raise MageError(f"unknown compile mode '{mode}' (choose from: {', '.join(MODES)})")


class CompiledStep:
    """Runs ``step(module)`` with ``module`` compiled in ``mode`` ("" = eager). The first call is the compile
    check: if it raises (anything but a MageError), ``reset()`` restores the step's random state, a warning is
    printed (when ``verbose``) and that call and every later one run eagerly."""

    def __init__(self, module: nn.Module, mode: str, verbose: bool = True):
        check_mode(mode)
        self.eager, self.mode, self.verbose = module, mode, verbose
        self.module = torch.compile(module, mode=mode) if mode else module
        self._unchecked = bool(mode)

    @property
    def compiled(self) -> bool:
        return self.module is not self.eager

    def __call__(self, step: Callable[[nn.Module], T], reset: Callable[[], None] = lambda: None) -> T:
        if self.compiled and torch.cuda.is_available():
            torch.compiler.cudagraph_mark_step_begin()  # reduce-overhead: a new step
        if not self._unchecked:
            return step(self.module)
        self._unchecked = False
        try:
            return step(self.module)
        except MageError:
            raise
        except Exception as e:  # noqa: BLE001 -- any compiler failure: the run goes on eagerly
            if self.verbose:
                why = (str(e).strip().splitlines() or [""])[0][:200]
                print(
                    f"warning: --compile {self.mode} failed ({type(e).__name__}: {why}); training eagerly", flush=True
                )
            self.module = self.eager
            reset()
            return step(self.eager)
