"""``mage demo``: the main job, end to end on Fashion-MNIST within a wall-clock budget (default 15 minutes).

Stages (each is reused when already finished; ``--fresh`` starts over; see ``_budget_plan`` for the sizes):
  1. tokenizer    train the fmnist-32 VQGAN (16% of short budgets, 19.5 min from 45 min on), PSNR / usage
  2. cache        tokenize training images (+ mirrored copies)
  3. mage         pre-train a class-conditional MAGE (24-28% of the budget; label dropout keeps it unconditional)
  4. judge        a small CNN classifier on real images (for class agreement)
  5. recognition  linear probe and 1/10-shot on frozen features, and the same on raw pixels
  6. samples      unconditional and per-class grids, inpaint (remove / replace), outpaint (16 -> 32, 32 -> 48 px)
  7. agreement    share of class-conditional samples the judge assigns to the intended class
  8. fid          FID / KID / precision-recall with the FID Inception (N scales with the budget: 2,000 at 60 min)
  9. fid-floor    real train images vs the same test reference (only when the budget has room)
 10. report       report.md + report.html: pictures, curve, metrics next to the pixel baselines, timings, configs

OUT/.mage-demo.json lists every entry of OUT the demo created (recorded before it is written). The demo runs only
in an empty OUT or one holding nothing but those entries, and ``--fresh`` removes exactly those: a file the demo
did not write is never deleted or overwritten.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import platform
import shutil
import time
from typing import Any, Callable

import torch

from .checkpoint import step_dirs
from .errors import MageError
from .files import atomic_write_json, foreign_entries, read_json, remove_entries

MANIFEST = ".mage-demo.json"  # what the demo created in OUT: {"made_by": "mage demo", "created": [names]}


def _created(out: str) -> list[str] | None:
    """The entries of ``out`` the demo recorded as its own; None when ``out`` has no manifest."""
    path = os.path.join(out, MANIFEST)
    if not os.path.isfile(path):
        return None
    m = read_json(path, "demo manifest")
    names = m.get("created")
    if m.get("made_by") != "mage demo" or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise MageError(f"cannot read demo manifest {path}: not written by 'mage demo'")
    return names


def claim(out: str, names: list[str] | tuple[str, ...]) -> None:
    """Record ``names`` (entries of ``out``) in the manifest before the demo writes them, so that a run killed
    half-way still knows them as its own."""
    created = _created(out) or []
    new = [n for n in names if n not in created]
    if new or not os.path.isfile(os.path.join(out, MANIFEST)):
        atomic_write_json(os.path.join(out, MANIFEST), {"made_by": "mage demo", "created": created + new})


def prepare_out(out: str, fresh: bool) -> list[str]:
    """Make ``out`` ready for the demo: refuse it (one line, nothing changed) when it holds anything the demo did
    not create; with ``fresh``, remove what the demo created there before (only that). Returns the names removed."""
    if os.path.lexists(out) and (not os.path.isdir(out) or os.path.islink(out)):
        raise MageError(f"--out {out} exists and is not a folder: choose another --out")
    if os.path.isdir(out) and os.listdir(out):
        created = _created(out)
        if created is None:
            raise MageError(
                f"--out {out} is not empty and was not made by 'mage demo' (no {MANIFEST}): choose another --out, "
                f"or delete it yourself if it is an older demo's (nothing was changed)"
            )
        foreign = foreign_entries(out, [*created, MANIFEST])
        if foreign:
            more = f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
            raise MageError(
                f"--out {out} holds {', '.join(foreign[:3])}{more}, which the demo did not write: move it away "
                f"or choose another --out (nothing was changed)"
            )
        if fresh:
            removed = remove_entries(out, created)
            os.remove(os.path.join(out, MANIFEST))
            return removed
    os.makedirs(out, exist_ok=True)
    return []


def _stage(
    state: dict[str, Any], path: str, name: str, fn: Callable[[], dict[str, Any]], writes: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run one stage (or reuse its recorded result); ``writes``: the entries of OUT it creates (claimed first)."""
    if name in state:
        print(f"[demo] {name}: already done ({state[name]['seconds']:.0f} s), reusing", flush=True)
        return state[name]
    print(f"[demo] {name}: starting", flush=True)
    claim(os.path.dirname(path), writes)
    t = time.time()
    res = fn() or {}
    res["seconds"] = time.time() - t
    state[name] = res
    atomic_write_json(path, state)
    print(f"[demo] {name}: done in {res['seconds']:.0f} s", flush=True)
    return res


def _budget_plan(budget: float) -> dict[str, Any]:
    """How a budget (minutes) is spent. Training gets fixed shares; evaluation sizes scale with the budget."""
    scale = min(1.0, budget / 60)
    return {
        # short budgets: ~25% of the time goes to FID (the Inception runs at ~5 images/s on 2 CPU cores);
        # from 45 minutes on, the tokenizer gets its preset's full 19.5 minutes
        "tokenizer_minutes": 0.16 * budget if budget < 45 else min(19.5, budget / 3),
        "mage_minutes": (0.24 if budget < 45 else 0.28) * budget,
        "judge_minutes": min(2.0, 0.03 * budget),
        "tokenizer_test_images": 2000 if budget < 45 else 10000,
        "cache_images": min(55000, int(1000 * budget)),  # tokenizing costs ~1-2 ms/image on 2 cores
        "probe_train_images": min(55000, int(500 * budget)),
        # the FID Inception runs at ~5 images/s on 2 CPU cores: N = 500 at 15 min, 2,000 at 60 min
        "fid_num": max(500, int(2000 * scale / 500) * 500),
        "agreement_per_class": max(20, int(50 * scale)),
        "fid_steps": 8,
        # the stages aim to end this many seconds before the budget: a fresh clone's set-up (venv + pip, ~80 s)
        # counts against `make demo`'s 15 minutes, and CPU speed varies from run to run
        "reserve_seconds": min(0.12 * budget * 60, 150.0),
    }


def _features_from_tokens(model, tokens: torch.Tensor, pool: str = "mean", batch: int = 500) -> torch.Tensor:
    from .recognition import pool_features

    dev = next(model.parameters()).device  # CUDA when there is one
    with torch.no_grad():
        return torch.cat(
            [
                pool_features(model.features(tokens[s : s + batch].to(dev)), pool).float().cpu()
                for s in range(0, len(tokens), batch)
            ]
        )


def run_demo(
    out: str = "runs/demo",
    budget_minutes: float = 15.0,
    fresh: bool = False,
    data_dir: str | None = None,
    data: str = "fashion-mnist",
    plan_overrides: dict[str, Any] | None = None,
) -> str:
    """Run (or resume) every stage and write the report; returns the path of report.html.
    ``data`` / ``plan_overrides`` exist for tests (the demo is Fashion-MNIST)."""
    from . import evaluate as ev
    from .config import mage_preset, pretrain_preset, tokenizer_preset, tokenizer_training_preset
    from .data import load_dataset
    from .pipeline import MAGEPipeline, inpaint, outpaint
    from .pretrain import pretrain
    from .recognition import accuracy, few_shot, train_probe
    from .sampler import SamplerConfig
    from .tokens import TokenCache, cache_tokens
    from .train_tokenizer import reconstruction_metrics, train_tokenizer
    from .transforms import save_image
    from .vqgan import VQTokenizer

    prepare_out(out, fresh)
    state_path = os.path.join(out, "stages.json")
    claim(out, ["stages.json"])
    state = read_json(state_path, "demo state") if os.path.isfile(state_path) else {}
    plan = {**_budget_plan(budget_minutes), **(plan_overrides or {})}
    tok_dir, mage_dir, judge_dir = (os.path.join(out, d) for d in ("tokenizer", "mage", "judge"))
    cache = os.path.join(out, "tokens-train.safetensors")
    tcfg, ttrain = tokenizer_preset("fmnist-32"), tokenizer_training_preset("fmnist-32")
    ttrain = dataclasses.replace(ttrain, max_minutes=plan["tokenizer_minutes"])
    mcfg, mtrain = (
        mage_preset("fmnist-32"),
        dataclasses.replace(pretrain_preset("fmnist-32"), max_minutes=plan["mage_minutes"]),
    )
    # class-conditional samples: guidance for agreement and the per-class grid; FID without (half the cost)
    gen_sampler = SamplerConfig(steps=plan["fid_steps"], choice_temperature=3.0, cfg=2.0)
    fid_sampler = SamplerConfig(steps=plan["fid_steps"], choice_temperature=3.0)
    t0 = time.time()

    def seconds_left() -> float:
        """Seconds until the stages should end (the budget less the plan's reserve)."""
        return budget_minutes * 60 - plan["reserve_seconds"] - (time.time() - t0)

    def tokenizer_stage():
        train = load_dataset(data, "train", 32, ttrain.data_augment, data_dir)
        val = load_dataset(data, "val", 32, "none", data_dir, limit=1000)
        m = train_tokenizer(tcfg, ttrain, train, tok_dir, val, resume=bool(step_dirs(tok_dir)))
        tok = VQTokenizer.from_pretrained(tok_dir)
        test = load_dataset(data, "test", 32, "none", data_dir)
        x = torch.stack([test[i][0] for i in range(16)])
        save_image(
            torch.cat([x, tok.decode(tok.encode(x)).clamp(0, 1)]), os.path.join(out, "reconstructions.png"), nrow=16
        )
        t = reconstruction_metrics(tok, test, limit=plan["tokenizer_test_images"])
        return {
            "steps": m["step"],
            "test_images": plan["tokenizer_test_images"],
            "test_psnr": t["psnr"],
            "test_usage": t["usage"],
            "test_perplexity": t["perplexity"],
        }

    def cache_stage():
        cache_tokens(tok_dir, data, cache, data_dir=data_dir, limit=plan["cache_images"])
        return {"images": plan["cache_images"]}

    def mage_stage():
        r = pretrain(mcfg, mtrain, mage_dir, cache=cache, resume=bool(step_dirs(mage_dir)), class_conditional=True)
        return {"loss": r["loss"], "acc": r["acc"], "steps": r["step"]}

    def judge_stage():
        m = ev.train_judge(data, judge_dir, epochs=3, width=16, max_minutes=plan["judge_minutes"], data_dir=data_dir)
        return {"test_accuracy": m["test_accuracy"], "steps": m["steps"]}

    def recognition_stage():
        pipe = MAGEPipeline.from_pretrained(mage_dir)
        tc = TokenCache(cache)
        n = min(len(tc), plan["probe_train_images"])
        tr_f, tr_y = _features_from_tokens(pipe.model, tc.rows(torch.arange(n), 0)), tc.labels[:n]
        test = load_dataset(data, "test", 32, "none", data_dir)
        xt = torch.stack([test[i][0] for i in range(len(test))])
        with torch.no_grad():
            te_tok = torch.cat([pipe.tokenizer.encode(xt[s : s + 500]) for s in range(0, len(xt), 500)])
        te_f, te_y = _features_from_tokens(pipe.model, te_tok), test.labels()
        C = len(tc.classes)
        head = train_probe(tr_f, tr_y, C, epochs=30, progress=True)
        with torch.no_grad():
            lin = accuracy(head(te_f), te_y)
        fs = few_shot(tr_f, tr_y, te_f, te_y, [1, 10], draws=5)
        # the raw-pixel baselines, same images, same protocol
        train = load_dataset(data, "train", 32, "none", data_dir, limit=n)
        px_tr = torch.stack([train[i][0] for i in range(n)])
        grey = torch.equal(px_tr[:, 0], px_tr[:, 1])
        px_tr, px_te = (px_tr[:, 0].flatten(1), xt[:, 0].flatten(1)) if grey else (px_tr.flatten(1), xt.flatten(1))
        mu, sd = px_tr.mean(0), px_tr.std(0) + 1e-6
        px_head = train_probe((px_tr - mu) / sd, tr_y, C, epochs=30, progress=True)
        with torch.no_grad():
            px_lin = accuracy(px_head((px_te - mu) / sd), te_y)
        px_fs = few_shot(px_tr, tr_y, px_te, te_y, [1, 10], draws=5)
        return {
            "train_images": n,
            "linear": lin,
            "shot1": fs["1"]["logreg_mean"],
            "shot10": fs["10"]["logreg_mean"],
            "shot10_std": fs["10"]["logreg_std"],
            "pixels_linear": px_lin,
            "pixels_shot1": px_fs["1"]["logreg_mean"],
            "pixels_shot10": px_fs["10"]["logreg_mean"],
        }

    def samples_stage():
        pipe = MAGEPipeline.from_pretrained(mage_dir)
        s = SamplerConfig(steps=12, choice_temperature=3.0)
        save_image(pipe.generate(64, sampler=s, seed=0), os.path.join(out, "samples_uncond.png"), nrow=8)
        save_image(
            pipe.generate_per_class(10, sampler=gen_sampler, seed=1),
            os.path.join(out, "samples_per_class.png"),
            nrow=10,
        )
        test = load_dataset(data, "test", 32, "none", data_dir)
        x = torch.stack([test[i][0] for i in range(8)])
        box = torch.zeros(32, 32, dtype=torch.bool)
        box[8:24, 8:24] = True  # 25% of the image
        inp = torch.stack([inpaint(pipe, im, box, sampler=s, seed=i) for i, im in enumerate(x)])
        rep = torch.stack(
            [
                inpaint(
                    pipe,
                    im,
                    box,
                    class_label=(int(test[i][1]) + 1 + i) % pipe.model.config.num_classes,
                    sampler=gen_sampler,
                    seed=i,
                )
                for i, im in enumerate(x)
            ]
        )
        holed = x.clone()
        holed[:, :, box] = 0.5
        save_image(torch.cat([x, holed, inp, rep]), os.path.join(out, "inpaint.png"), nrow=8)
        crops = x[:, :, 8:24, 8:24]
        outp = torch.stack([outpaint(pipe, c, 8, 8, 8, 8, sampler=s, seed=i) for i, c in enumerate(crops)])
        padded = torch.nn.functional.pad(crops, (8, 8, 8, 8), value=0.5)
        save_image(torch.cat([x, padded, outp]), os.path.join(out, "outpaint.png"), nrow=8)
        # beyond the model's resolution: 32 -> 48 px, filled in overlapping 32 x 32 tiles
        wide = torch.stack([outpaint(pipe, im, 8, 8, 8, 8, sampler=s, seed=100 + i) for i, im in enumerate(x)])
        save_image(
            torch.cat([torch.nn.functional.pad(x, (8, 8, 8, 8), value=0.5), wide]),
            os.path.join(out, "outpaint48.png"),
            nrow=8,
        )
        return {}

    def agreement_stage():
        r = ev.class_agreement(mage_dir, judge_dir, plan["agreement_per_class"], gen_sampler, seed=2)
        return {
            "agreement": r["agreement"],
            "per_class": r["per_class"],
            "num": r["num"],
            "judge_test_accuracy": r["judge_test_accuracy"],
            "images_per_second": r["images_per_second"],
        }

    def fid_stage():
        # N: the plan's, or what the time left allows (~4 images/s through the Inception, generated + reference)
        left = seconds_left()
        num = min(plan["fid_num"], max(200, int(left * 4.0 / 2 / 100) * 100))
        r = ev.evaluate_fid(mage_dir, data, num, True, fid_sampler, seed=3, data_dir=data_dir)
        return {k: r[k] for k in ("fid", "kid", "precision", "recall")} | {"num": num, "line": ev.fid_line(r)}

    def floor_stage():
        num = state["fid"]["num"]
        r = ev.evaluate_fid(None, data, num, images=data, images_split="train", data_dir=data_dir)
        return {"fid": r["fid"], "num": num, "line": ev.fid_line(r)}

    _stage(state, state_path, "tokenizer", tokenizer_stage, ("tokenizer", "reconstructions.png"))
    _stage(state, state_path, "cache", cache_stage, (os.path.basename(cache),))
    _stage(state, state_path, "mage", mage_stage, ("mage",))
    _stage(state, state_path, "judge", judge_stage, ("judge",))
    _stage(state, state_path, "recognition", recognition_stage)
    samples = ("samples_uncond.png", "samples_per_class.png", "inpaint.png", "outpaint.png", "outpaint48.png")
    _stage(state, state_path, "samples", samples_stage, samples)
    _stage(state, state_path, "agreement", agreement_stage)
    try:
        ev.inception_path()
        _stage(state, state_path, "fid", fid_stage)
        # the floor (real train vs the cached test reference) costs about half the fid stage: only within the budget
        left = seconds_left()
        if "fid-floor" in state or left > 1.2 * state["fid"].get("seconds", 1e9) * 0.5:
            _stage(state, state_path, "fid-floor", floor_stage)
        else:
            print(
                f"[demo] fid-floor: skipped ({max(0.0, left):.0f} s left of the budget); "
                f"run: mage evaluate fid --images {data} "
                f"--data {data} --num {state['fid']['num']}",
                flush=True,
            )
    except ev.MageError as e:
        print(f"[demo] fid: skipped ({e})", flush=True)
    for src, dst in ((os.path.join(mage_dir, "curve.png"), "mage_curve.png"),):
        if os.path.isfile(src):
            claim(out, [dst])
            shutil.copy(src, os.path.join(out, dst))
    claim(out, ["report.md", "report.html"])
    return write_report(
        out,
        state,
        {
            "tokenizer": {**dataclasses.asdict(tcfg), **dataclasses.asdict(ttrain)},
            "mage": {**dataclasses.asdict(mcfg), **dataclasses.asdict(mtrain)},
            "plan": plan,
            "generation": dataclasses.asdict(gen_sampler),
            "fid_generation": dataclasses.asdict(fid_sampler),
        },
        time.time() - t0,
        budget_minutes,
    )


def write_report(out: str, state: dict[str, Any], configs: dict[str, Any], seconds: float, budget: float) -> str:
    nan = float("nan")
    tok, mage, rec = state.get("tokenizer", {}), state.get("mage", {}), state.get("recognition", {})
    agr, fid, floor, judge = (
        state.get("agreement", {}),
        state.get("fid", {}),
        state.get("fid-floor", {}),
        state.get("judge", {}),
    )
    rows = [
        (
            "Tokenizer test PSNR (dB)",
            f"{tok.get('test_psnr', nan):.2f}",
            "",
            f"{tok.get('test_images', 0)} test images; goal >= 24",
        ),
        ("Tokenizer codebook usage (%)", f"{tok.get('test_usage', nan):.1f}", "", "goal >= 90"),
        (
            "MAGE final loss / masked-token accuracy",
            f"{mage.get('loss', nan):.3f} / {100 * mage.get('acc', nan):.1f}%",
            "",
            "label-smoothed CE on masked tokens",
        ),
        (
            "Linear probe top-1 (%)",
            f"{rec.get('linear', nan):.2f}",
            f"{rec.get('pixels_linear', nan):.2f}",
            f"frozen features of {rec.get('train_images', 0)} train images; goal >= 91",
        ),
        (
            "10-shot top-1 (%)",
            f"{rec.get('shot10', nan):.2f} +- {rec.get('shot10_std', nan):.2f}",
            f"{rec.get('pixels_shot10', nan):.2f}",
            "logistic regression, 5 draws; goal >= 80",
        ),
        ("1-shot top-1 (%)", f"{rec.get('shot1', nan):.2f}", f"{rec.get('pixels_shot1', nan):.2f}", "5 draws"),
        (
            "Class agreement (%)",
            f"{agr.get('agreement', nan):.2f}",
            "",
            f"{agr.get('num', 0)} class-conditional samples judged by a CNN with "
            f"{judge.get('test_accuracy', nan):.2f}% test accuracy; goal >= 95",
        ),
        (
            f"FID (N = {fid.get('num', 0)})",
            f"{fid.get('fid', nan):.2f}",
            (
                f"{floor['fid']:.2f} (real train images)"
                if "fid" in floor
                else "floor skipped (budget): mage evaluate fid --images fashion-mnist --data fashion-mnist "
                f"--num {fid.get('num', 0)}"
            ),
            "Inception-v3 (FID weights) vs the test split; goal <= 10 at N = 5000",
        ),
        (
            "KID / precision / recall",
            f"{fid.get('kid', nan):.4f} / {fid.get('precision', nan):.3f} / {fid.get('recall', nan):.3f}",
            "",
            "",
        ),
    ]
    timings = [(k, f"{v['seconds']:.0f} s") for k, v in state.items()]
    versions = (
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    images = [
        ("Unconditional samples", "samples_uncond.png"),
        ("10 samples per class (one row per class)", "samples_per_class.png"),
        (
            "Inpainting: test images, 25% box removed, filled (remove), filled with another class (replace)",
            "inpaint.png",
        ),
        ("Outpainting 16 -> 32 px: test images, centre crops, uncropped", "outpaint.png"),
        ("Outpainting 32 -> 48 px (overlapping 32 x 32 tiles): test images, extended", "outpaint48.png"),
        ("Tokenizer: test images (top) and reconstructions (bottom)", "reconstructions.png"),
        ("MAGE pre-training curve", "mage_curve.png"),
    ]
    md = [
        "# mage demo report\n",
        f"Fashion-MNIST, `fmnist-32` presets, budget {budget:.0f} min, ran {seconds / 60:.1f} min. {versions}\n",
        "| metric | MAGE | baseline | note |",
        "|---|---|---|---|",
    ] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    md += ["", "| stage | time |", "|---|---|"] + [f"| {a} | {b} |" for a, b in timings] + [""]
    md += [f"## {t}\n\n![{t}]({f})\n" for t, f in images if os.path.isfile(os.path.join(out, f))]
    md += ["## Configs\n", "```json", json.dumps(configs, indent=2), "```"]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md))
    h = [
        "<html><head><meta charset='utf-8'><title>mage demo</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "img{image-rendering:pixelated;max-width:100%}</style></head><body>",
        f"<h1>mage demo report</h1><p>Fashion-MNIST, fmnist-32 presets, budget {budget:.0f} min, "
        f"ran {seconds / 60:.1f} min. {html.escape(versions)}</p>",
        "<table><tr><th>metric</th><th>MAGE</th><th>baseline</th><th>note</th></tr>",
    ]
    h += [
        f"<tr><td>{a}</td><td>{b}</td><td>{html.escape(c)}</td><td>{html.escape(d)}</td></tr>" for a, b, c, d in rows
    ] + ["</table>"]
    h += ["<h2>Timings</h2><table>"] + [f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in timings] + ["</table>"]
    h += [f"<h2>{t}</h2><img src='{f}' width='600'>" for t, f in images if os.path.isfile(os.path.join(out, f))]
    h += [f"<h2>Configs</h2><pre>{html.escape(json.dumps(configs, indent=2))}</pre></body></html>"]
    path = os.path.join(out, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(h))
    return path
