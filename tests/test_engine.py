"""The training engine: non-finite steps, the run folder (lock, partial writes, unreadable checkpoints, torn logs),
time-limited resume, EMA resume, accumulation, and runs SIGKILLed at random moments that end bit-equal."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from mage.checkpoint import step_dirs
from mage.distributed import DistInfo
from mage.engine import LoopSettings, RunLock, Task, fit, plot_curve, read_log
from mage.errors import MageError
from test_pretrain import _cfg, tiny_setup  # noqa: F401  (fixture)
from test_tokenizer import ENV


class Regression(Task):
    """y = x W: a few steps of SGD; ``nan_from`` makes every loss from that step on non-finite."""

    name = "regression"

    def __init__(self, nan_from: int | None = None, cfg_seed: int = 0):
        from mage.config import tokenizer_preset

        torch.manual_seed(0)
        self.model = self.net = nn.Linear(4, 2)
        self.config = tokenizer_preset("tiny")  # any config dataclass: saved as config.json
        self.optimizers = {"sgd": torch.optim.SGD(self.model.parameters(), lr=0.1)}
        self.nan_from, self.global_batch = nan_from, 8
        self.x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
        self.y = self.x @ torch.randn(4, 2, generator=torch.Generator().manual_seed(2))

    def batches(self, start, end):
        for step in range(start, end):
            idx = torch.arange(8) + 8 * (step % 8)
            yield step, (self.x[idx], self.y[idx])

    def loss(self, net, batch, step):
        x, y = batch
        loss = (net(x) - y).pow(2).mean()
        if self.nan_from is not None and step + 1 >= self.nan_from:
            loss = loss * float("nan")
        return loss, {"loss": loss}


def _settings(**kw):
    return LoopSettings(**{"total_steps": 20, "lr": 0.1, "log_every": 1, "ckpt_every": 4, **kw})


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    """NaN from step 11 on: steps are skipped (no update), the 5th in a row stops the run with one line naming the
    last good checkpoint, and no checkpoint holds non-finite weights (the good ones are not pruned away)."""
    out = str(tmp_path / "r")
    with pytest.raises(MageError, match=r"loss is not finite at step 15 .*step-0000012"):
        fit(Regression(nan_from=11), _settings(), DistInfo(), out, progress=False)
    assert [s for s, _ in step_dirs(out)] == [8, 12]  # skipped steps leave the weights as they were
    for _, d in step_dirs(out):
        assert all(torch.isfinite(v).all() for v in load_file(os.path.join(d, "model.safetensors")).values())
    rows = read_log(os.path.join(out, "log.jsonl"))
    assert rows[-1]["skipped"] >= 4 and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    # a transient NaN (fewer than max_bad_steps in a row) is only counted
    task = Regression(nan_from=19)
    res = fit(task, _settings(), DistInfo(), None, progress=False)
    assert res["skipped"] == 2 and res["step"] == 20


def test_cli_exploding_lr_exits_2_and_keeps_good_checkpoints(tiny_setup, tmp_path):  # noqa: F811
    from test_tokenizer import run_cli

    _, _, cache = tiny_setup
    r = run_cli(
        "pretrain",
        "--cache",
        cache,
        "--preset",
        "tiny",
        "--set",
        "blr=1e12",
        "--max-steps",
        "40",
        "--out",
        str(tmp_path / "nan"),
    )
    lines = [line for line in r.stderr.strip().splitlines() if line.strip() and "%|" not in line]
    assert r.returncode == 2 and len(lines) == 1 and "not finite" in lines[0], r.stderr
    for _, d in step_dirs(str(tmp_path / "nan")):
        assert all(torch.isfinite(v).all() for v in load_file(os.path.join(d, "model.safetensors")).values())


def test_two_writers_and_leftovers_and_unreadable_newest(tmp_path):
    out = str(tmp_path / "r")
    lock = RunLock(out)  # another run holds OUT
    with pytest.raises(MageError, match=f"in use by pid {os.getpid()}"):
        fit(Regression(), _settings(), DistInfo(), out, progress=False)
    lock.release()
    straight = fit(Regression(), _settings(), DistInfo(), str(tmp_path / "straight"), progress=False)
    fit(Regression(), _settings(), DistInfo(), out, progress=False, stop_at=10)
    # what a kill mid-write leaves: a temporary checkpoint folder, a temp file; and a corrupt newest checkpoint
    os.makedirs(os.path.join(out, "checkpoints", ".tmp-step-0000012-abc"))
    open(os.path.join(out, ".tmp-curve.png-xyz"), "w").write("half")
    newest = step_dirs(out)[-1][1]
    open(os.path.join(newest, "model.safetensors"), "wb").write(b"garbage")
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"step": 11, "loss": 0.')  # a torn last line
    with pytest.warns(RuntimeWarning, match="step-0000010 is unreadable"):
        res = fit(Regression(), _settings(), DistInfo(), out, resume=True, progress=False)
    assert res["step"] == 20
    leftovers = [n for _, _, files in os.walk(out) for n in files] + [d for _, dirs, _ in os.walk(out) for d in dirs]
    assert not [n for n in leftovers if n.startswith(".tmp-")]
    a = load_file(os.path.join(step_dirs(str(tmp_path / "straight"))[-1][1], "model.safetensors"))
    b = load_file(os.path.join(step_dirs(out)[-1][1], "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and straight["loss"] == res["loss"]
    steps = [r["step"] for r in read_log(os.path.join(out, "log.jsonl"))]
    assert steps == list(range(1, 21))  # cut back to step 8 on resume, then 9..20 again
    plot_curve(os.path.join(out, "log.jsonl"), str(tmp_path / "c.png"), ("loss",))
    assert os.path.getsize(tmp_path / "c.png") > 1000


def test_accumulation_matches_one_big_batch(tmp_path):
    """accum=2 on a loss that is a mean over rows: the same update as accum=1, to float rounding."""
    a = Regression()
    fit(a, _settings(total_steps=6), DistInfo(), None, progress=False)
    b = Regression()
    fit(b, _settings(total_steps=6, accum=2), DistInfo(), None, progress=False)
    assert torch.allclose(a.model.weight, b.model.weight, atol=1e-6)
    with pytest.raises(MageError, match="--accum 16"):
        fit(Regression(), _settings(accum=16), DistInfo(), None, progress=False)


def test_resume_keeps_the_runs_settings(tiny_setup, tmp_path):  # noqa: F811
    """--resume takes the run's saved config; a flag that contradicts it is a one-line error naming the field;
    --max-steps may change."""
    from test_tokenizer import run_cli

    _, _, cache = tiny_setup
    out = str(tmp_path / "r")
    base = ["pretrain", "--cache", cache, "--preset", "tiny", "--out", out, "--set", "log_every=1"]
    assert run_cli(*base, "--set", "blr=2e-3", "--set", "seed=3", "--max-steps", "4").returncode == 0
    r = run_cli("pretrain", "--cache", cache, "--out", out, "--resume", "--set", "blr=1e-3")
    assert r.returncode == 2 and "blr 0.002 -> 0.001" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("pretrain", "--out", out, "--resume", "--max-steps", "6")  # data, cache, seed, lr: the run's own
    assert r.returncode == 0, r.stderr
    cfg = json.load(open(os.path.join(step_dirs(out)[-1][1], "train.json")))  # the recipe, beside config.json
    assert cfg["blr"] == 2e-3 and cfg["seed"] == 3 and cfg["max_steps"] == 6 and step_dirs(out)[-1][0] == 6


def test_time_limited_resume_continues_the_schedule(tiny_setup, tmp_path):  # noqa: F811
    """A wall-time run killed and resumed continues its clock: the lr never jumps back up, and the elapsed time
    over both parts stays within the budget."""
    from mage.pretrain import pretrain

    _, _, cache = tiny_setup
    out = str(tmp_path / "t")
    cfg = _cfg(max_steps=100_000, max_minutes=0.08, warmup_epochs=0, dropout=0.0)
    pretrain(*cfg, out, cache=cache, progress=False, stop_at=30)
    before = read_log(os.path.join(out, "log.jsonl"))
    time.sleep(1.0)  # the time between kill and resume is not the run's
    pretrain(*cfg, out, cache=cache, progress=False, resume=True)
    after = read_log(os.path.join(out, "log.jsonl"))[len(before) :]
    assert after and after[0]["lr"] <= before[-1]["lr"] + 1e-12
    assert all(a["lr"] >= b["lr"] - 1e-12 for a, b in zip(after, after[1:]))
    assert after[-1]["elapsed_s"] <= 0.08 * 60 + 1.0 and after[-1]["elapsed_s"] >= before[-1]["elapsed_s"]


def test_finished_time_limited_run_resumes_as_it_is(tmp_path):
    """Resuming a run whose time budget is spent changes nothing (no extra step) and returns its last metrics."""
    out = str(tmp_path / "r")
    first = fit(Regression(), _settings(total_steps=10_000, max_minutes=0.004), DistInfo(), out, progress=False)
    steps, log = step_dirs(out), read_log(os.path.join(out, "log.jsonl"))
    again = fit(Regression(), _settings(total_steps=10_000, max_minutes=0.004), DistInfo(), out, resume=True)
    assert step_dirs(out) == steps and read_log(os.path.join(out, "log.jsonl")) == log
    assert again["step"] == first["step"] and again["loss"] == pytest.approx(first["loss"])


def test_ema_resume_equals_straight_run(tiny_setup, tmp_path):  # noqa: F811
    from mage.pretrain import pretrain

    _, _, cache = tiny_setup
    pretrain(*_cfg(ema_decay=0.9), str(tmp_path / "a"), cache=cache, progress=False)
    pretrain(*_cfg(ema_decay=0.9), str(tmp_path / "b"), cache=cache, progress=False, stop_at=3)
    pretrain(*_cfg(ema_decay=0.9), str(tmp_path / "b"), cache=cache, progress=False, resume=True)
    a, b = (load_file(str(tmp_path / r / "ema" / "model.safetensors")) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_state_is_not_a_pickle_of_code(tiny_setup, tmp_path):  # noqa: F811
    """The train state loads with weights_only=True (tensors and plain types only)."""
    from mage.pretrain import pretrain

    _, _, cache = tiny_setup
    pretrain(*_cfg(ema_decay=0.9, max_steps=2), str(tmp_path / "a"), cache=cache, progress=False)
    st = torch.load(os.path.join(step_dirs(str(tmp_path / "a"))[-1][1], "train_state.pt"), weights_only=True)
    assert st["step"] == 2 and "elapsed_s" in st and st["ema"] is not None


# --------------------------------------------------------------------------------------------------
# kill -9 at random moments
# --------------------------------------------------------------------------------------------------
def _kill_cycles(args: list[str], out: str, kills: int, seed: int) -> tuple[int, int]:
    """Run ``mage ARGS --out OUT --resume`` and SIGKILL it at a random moment once it trains, ``kills`` times,
    then let it finish. Returns (kills made, resumes that found leftovers of a write the kill interrupted)."""
    rng = random.Random(seed)
    env = {**ENV, "OMP_NUM_THREADS": "1"}  # as the straight run: same threads, same sums
    log = os.path.join(out, "log.jsonl")
    made, torn = 0, 0
    for _ in range(kills):
        before = os.path.getsize(log) if os.path.exists(log) else 0
        p = subprocess.Popen([sys.executable, "-m", "mage", *args, "--out", out, "--resume"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:  # wait until it trains (a new log row) ...
            if os.path.exists(log) and os.path.getsize(log) > before:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.4))  # ... then kill it at a random moment
        if p.poll() is not None:
            assert p.returncode == 0, p.stderr.read()[-2000:]
            return made, torn  # it finished first
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate()
        made += 1
        torn += "leftover" in err
    r = subprocess.run([sys.executable, "-m", "mage", *args, "--out", out, "--resume"], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return made, torn + ("leftover" in r.stderr)


def _same_run(a: str, b: str) -> None:
    wa = load_file(os.path.join(step_dirs(a)[-1][1], "model.safetensors"))
    wb = load_file(os.path.join(step_dirs(b)[-1][1], "model.safetensors"))
    assert step_dirs(a)[-1][0] == step_dirs(b)[-1][0] and all(torch.equal(wa[k], wb[k]) for k in wa)
    names = [n for _, dirs, files in os.walk(b) for n in dirs + files]
    assert not [n for n in names if n.startswith(".tmp-") or n.endswith(".old")], names
    steps = [r["step"] for r in read_log(os.path.join(b, "log.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == step_dirs(b)[-1][0]
    la = {r["step"]: r["loss"] for r in read_log(os.path.join(a, "log.jsonl"))}
    assert all(la[r["step"]] == r["loss"] for r in read_log(os.path.join(b, "log.jsonl")))


def _fault_test(tiny_setup, tmp_path, kills):  # noqa: F811
    _, _, cache = tiny_setup
    pre = ["pretrain", "--cache", cache, "--preset", "tiny", "--max-steps", str(20 * kills), "--set", "log_every=1",
           "--set", "ckpt_every=3"]  # fmt: skip
    tok = ["train-tokenizer", "--data", "synthetic", "--preset", "tiny", "--limit", "64", "--max-steps", str(8 * kills),
           "--set", "log_every=1", "--set", "ckpt_every=1", "--set", "sample_every=1000"]  # fmt: skip
    report = []
    for i, args in enumerate((pre, tok)):
        straight, killed = str(tmp_path / f"straight{i}"), str(tmp_path / f"killed{i}")
        r = subprocess.run([sys.executable, "-m", "mage", *args, "--out", straight], capture_output=True,
                           env={**ENV, "OMP_NUM_THREADS": "1"}, text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        made, torn = _kill_cycles(args, killed, kills, seed=i)
        assert made == kills, f"{args[0]} finished after {made} of {kills} kills: give it more steps"
        _same_run(straight, killed)
        report.append(f"{args[0]}: {made} SIGKILLs, {torn} of them mid-write")
    print("; ".join(report))


def test_sigkill_at_random_moments_then_resume_is_bit_equal(tiny_setup, tmp_path):  # noqa: F811
    _fault_test(tiny_setup, tmp_path, kills=4)


@pytest.mark.slow
def test_sigkill_20_times_then_resume_is_bit_equal(tiny_setup, tmp_path):  # noqa: F811
    _fault_test(tiny_setup, tmp_path, kills=20)
