"""``mage demo``: the main job on Fashion-MNIST within a wall-clock budget (default 15 minutes).

Part 1 shows the released model (``weights/fashion-mnist``, :mod:`mage.released`); part 2 trains a MAGE on this
machine from the released tokenizer with the time that is left, and evaluates it the same way, so the report
puts what the method reaches next to what minutes of this CPU reach. Stages (each is reused when already
finished; ``--fresh`` starts over; sizes in ``_budget_plan``):

  release-samples      unconditional and per-class grids, inpaint (remove / replace), outpaint 16 -> 32, 32 -> 48
  release-classify     the released fine-tuned classifier on the test split, and a few test images' top-3
  cache                tokens of training images (+ mirrors) with the released tokenizer
  release-recognition  linear probe and 1/10-shot on frozen features, and the same on raw pixels
  release-agreement    share of class-conditional samples the released judge assigns to the intended class
  release-fid          FID / KID / precision-recall against the test split, and its floor at the same N
                       (real train images; the released reference features make both cheap)
  tokenizer            only with ``train_tokenizer``: train the fmnist-32 VQGAN here too (then its own cache)
  mage                 pre-train a class-conditional MAGE with the time left after its evaluation's share
  recognition, samples, agreement, fid   the same evaluation of the model trained here
  report               report.md + report.html: both models' pictures and numbers, timings, configs

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
from .transforms import save_image

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
    """How a budget (minutes) is spent: evaluation sizes scale with it; training gets what is left."""
    scale = min(1.0, budget / 60)
    return {
        "tokenizer_minutes": 0.16 * budget if budget < 45 else min(19.5, budget / 3),  # train_tokenizer only
        "tokenizer_test_images": 2000 if budget < 45 else 10000,
        "cache_images": min(55000, int(1000 * budget)),  # tokenizing costs ~1-2 ms/image on 2 cores
        "probe_train_images": min(55000, int(500 * budget)),
        "classify_images": 10000,
        # the FID Inception runs at ~5-9 images/s on 2 CPU cores: N = 500 at 15 min (the released reference
        # features cover it), 2,000 at 60 min
        "fid_num": max(500, int(2000 * scale / 500) * 500),
        "agreement_per_class": max(20, int(50 * scale)),
        "steps": None,  # sampling steps (None: the release's recommended sampler)
        "min_mage_minutes": 0.5,
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


def _test_images(data: str, data_dir: str | None, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from .data import load_dataset

    test = load_dataset(data, "test", 32, "none", data_dir, limit=limit)
    return torch.stack([test[i][0] for i in range(len(test))]), test.labels()


def run_demo(
    out: str = "runs/demo",
    budget_minutes: float = 15.0,
    fresh: bool = False,
    data_dir: str | None = None,
    train_tokenizer: bool = False,
    release: str = "fashion-mnist",
    plan_overrides: dict[str, Any] | None = None,
) -> str:
    """Run (or resume) every stage and write the report; returns the path of report.html.
    ``release``: the released model shown first and whose tokenizer and judge the trained part uses (a release
    name or a folder laid out as one). ``plan_overrides`` exists for tests."""
    from . import evaluate as ev
    from .config import mage_preset, pretrain_preset, tokenizer_preset, tokenizer_training_preset
    from .data import load_dataset
    from .engine import saved_run
    from .pretrain import pretrain
    from .recognition import Classifier
    from .released import resolve
    from .sampler import model_sampler
    from .tokens import cache_tokens
    from .train_tokenizer import reconstruction_metrics
    from .train_tokenizer import train_tokenizer as train_tok
    from .vqgan import VQTokenizer

    data = "fashion-mnist"
    root = resolve(release, "mage")  # a release name, or a folder laid out as one
    if not os.path.isdir(root):
        raise MageError(f"released model {release} not found")
    rel = {"mage": root} | {
        part: os.path.join(root, part) for part in ("tokenizer", "classifier", "judge", "reference")
    }
    prepare_out(out, fresh)
    state_path = os.path.join(out, "stages.json")
    claim(out, ["stages.json"])
    state = read_json(state_path, "demo state") if os.path.isfile(state_path) else {}
    plan = {**_budget_plan(budget_minutes), **(plan_overrides or {})}
    tok_dir = os.path.join(out, "tokenizer") if train_tokenizer else rel["tokenizer"]
    mage_dir = os.path.join(out, "mage")
    release_cache = os.path.join(out, "tokens-release.safetensors")
    cache = os.path.join(out, "tokens-train.safetensors") if train_tokenizer else release_cache
    tcfg, ttrain = tokenizer_preset("fmnist-32"), tokenizer_training_preset("fmnist-32")
    ttrain = dataclasses.replace(ttrain, max_minutes=plan["tokenizer_minutes"])
    mcfg, mtrain = mage_preset("fmnist-32"), pretrain_preset("fmnist-32")
    # FID: the release's recommended sampler (its sampler.json: the steps and guidance of its lowest FID), for
    # both models; agreement and the per-class grid: strong guidance and a cooler token temperature (the setting
    # the release's card measures agreement with)
    fid_sampler = model_sampler(root)
    if plan["steps"]:
        fid_sampler = dataclasses.replace(fid_sampler, steps=plan["steps"])
    gen_sampler = dataclasses.replace(fid_sampler, cfg=4.0, temperature=0.7)
    t0 = time.time()

    def seconds_left() -> float:
        """Seconds until the stages should end (the budget less the plan's reserve)."""
        return budget_minutes * 60 - plan["reserve_seconds"] - (time.time() - t0)

    def stage(name: str, fn: Callable[[], dict[str, Any]], writes: tuple[str, ...] = ()) -> dict[str, Any]:
        return _stage(state, state_path, name, fn, writes)

    # ---- the evaluation both models get ----------------------------------------------------------------------
    def samples(model_dir: str, prefix: str) -> dict[str, Any]:
        _samples(model_dir, out, prefix, gen_sampler, data_dir)
        return {}

    def recognition(model_dir: str, with_pixels: bool) -> dict[str, Any]:
        return _recognition(model_dir, cache if model_dir == mage_dir else release_cache, plan, data_dir, with_pixels)

    def agreement(model_dir: str) -> dict[str, Any]:
        r = ev.class_agreement(model_dir, rel["judge"], plan["agreement_per_class"], gen_sampler, seed=2)
        keep = ("agreement", "per_class", "num", "judge_test_accuracy", "images_per_second")
        return {k: r[k] for k in keep}

    def fid(model_dir: str) -> dict[str, Any]:
        num = plan["fid_num"]
        ref = _reference(rel["reference"], "test", num)
        r = ev.evaluate_fid(model_dir, data, num, True, fid_sampler, seed=3, data_dir=data_dir, ref_stats=ref)
        res = {k: r[k] for k in ("fid", "kid", "precision", "recall")} | {"num": num, "line": ev.fid_line(r)}
        if model_dir != mage_dir:  # the floor: real train images against the same reference, same N
            floor_ref = _reference(rel["reference"], "train", num)
            if ref and floor_ref:
                test, train = ev.load_stats_file(ref), ev.load_stats_file(floor_ref)
                res["floor"] = ev.compare(test, train["features"], metrics=("fid",))["fid"]
            else:
                res["floor"] = ev.evaluate_fid(None, data, num, images=data, images_split="train", data_dir=data_dir)[
                    "fid"
                ]
        return res

    # ---- part 1: the released model ----------------------------------------------------------------------------
    def classify_stage():
        clf = Classifier(rel["classifier"])
        x, y = _test_images(data, data_dir, plan["classify_images"])
        probs = torch.cat([clf.predict(x[s : s + 500]) for s in range(0, len(x), 500)])
        examples = []
        for i in range(6):
            top = probs[i].topk(3)
            examples.append(
                {
                    "true": clf.classes[int(y[i])],
                    "top3": [[clf.classes[int(c)], round(100 * float(p), 1)] for p, c in zip(top.values, top.indices)],
                }
            )
        save_image(x[:6], os.path.join(out, "classify_examples.png"), nrow=6)
        return {
            "accuracy": 100.0 * (probs.argmax(1) == y).float().mean().item(),
            "images": len(y),
            "examples": examples,
        }

    stage("release-samples", lambda: samples(rel["mage"], "release_"), _sample_files("release_"))
    stage("release-classify", classify_stage, ("classify_examples.png",))

    def cache_stage(tokenizer: str, path: str) -> dict[str, Any]:
        cache_tokens(tokenizer, data, path, data_dir=data_dir, limit=plan["cache_images"])
        return {"images": plan["cache_images"]}

    stage("cache", lambda: cache_stage(rel["tokenizer"], release_cache), (os.path.basename(release_cache),))
    stage("release-recognition", lambda: recognition(rel["mage"], True))
    stage("release-agreement", lambda: agreement(rel["mage"]))
    fid_ok = _inception_available(ev)
    if fid_ok:
        stage("release-fid", lambda: fid(rel["mage"]))

    # ---- part 2: a MAGE trained here -----------------------------------------------------------------------------
    def tokenizer_stage():
        train = load_dataset(data, "train", 32, ttrain.data_augment, data_dir)
        val = load_dataset(data, "val", 32, "none", data_dir, limit=1000)
        m = train_tok(tcfg, ttrain, train, tok_dir, val, resume=bool(step_dirs(tok_dir)))
        test = load_dataset(data, "test", 32, "none", data_dir)
        t = reconstruction_metrics(VQTokenizer.from_pretrained(tok_dir), test, limit=plan["tokenizer_test_images"])
        return {"steps": m["step"], "test_psnr": t["psnr"], "test_usage": t["usage"]}

    if train_tokenizer:
        stage("tokenizer", tokenizer_stage, ("tokenizer",))
        stage("train-cache", lambda: cache_stage(tok_dir, cache), (os.path.basename(cache),))

    def mage_stage():
        # the time left, less what evaluating it will take: the released model's evaluation just measured it
        evals = sum(state.get(f"release-{k}", {}).get("seconds", 0.0) for k in ("samples", "recognition", "agreement"))
        evals += state.get("release-fid", {}).get("seconds", 0.0) * 0.8  # its floor is not repeated
        recipe = dataclasses.replace(mtrain, max_minutes=max(plan["min_mage_minutes"], (seconds_left() - evals) / 60))
        resume = bool(step_dirs(mage_dir))
        if resume:  # a demo killed while training continues its run with the run's own budget
            recipe = saved_run(mage_dir)[1] or recipe
        r = pretrain(mcfg, recipe, mage_dir, cache=cache, resume=resume, class_conditional=True)
        return {"loss": r["loss"], "acc": r["acc"], "steps": r["step"], "minutes": recipe.max_minutes}

    stage("mage", mage_stage, ("mage",))
    stage("samples", lambda: samples(mage_dir, ""), _sample_files(""))
    stage("recognition", lambda: recognition(mage_dir, False))
    stage("agreement", lambda: agreement(mage_dir))
    if fid_ok:
        stage("fid", lambda: fid(mage_dir))
    if os.path.isfile(os.path.join(mage_dir, "curve.png")):
        claim(out, ["mage_curve.png"])
        shutil.copy(os.path.join(mage_dir, "curve.png"), os.path.join(out, "mage_curve.png"))
    claim(out, ["report.md", "report.html"])
    return write_report(
        out,
        state,
        {
            "release": os.path.abspath(rel["mage"]),
            "tokenizer": os.path.abspath(tok_dir),
            "mage": {**dataclasses.asdict(mcfg), **dataclasses.asdict(mtrain)},
            "plan": plan,
            "generation": dataclasses.asdict(gen_sampler),
            "fid_generation": dataclasses.asdict(fid_sampler),
        },
        time.time() - t0,
        budget_minutes,
    )


def _inception_available(ev) -> bool:
    try:
        ev.inception_path()
        return True
    except MageError as e:
        print(f"[demo] fid: skipped ({e})", flush=True)
        return False


def _reference(folder: str, split: str, num: int) -> str | None:
    """The released Inception features of ``num`` images of a split (``reference/{split}-{num}.npz``), if shipped."""
    path = os.path.join(folder, f"{split}-{num}.npz")
    return path if os.path.isfile(path) else None


SAMPLE_FILES = ("samples_uncond.png", "samples_per_class.png", "inpaint.png", "outpaint.png", "outpaint48.png")


def _sample_files(prefix: str) -> tuple[str, ...]:
    return tuple(prefix + f for f in SAMPLE_FILES)


def _samples(model_dir: str, out: str, prefix: str, class_sampler, data_dir: str | None) -> None:
    """Grids of a model: unconditional, per class, inpaint (remove / replace), outpaint 16 -> 32 and 32 -> 48 px."""
    from .pipeline import MAGEPipeline, inpaint, outpaint
    from .sampler import SamplerConfig

    pipe = MAGEPipeline.from_pretrained(model_dir)
    s = SamplerConfig(steps=12, choice_temperature=3.0)

    def path(name: str) -> str:
        return os.path.join(out, prefix + name)

    save_image(pipe.generate(64, sampler=s, seed=0), path("samples_uncond.png"), nrow=8)
    save_image(pipe.generate_per_class(10, sampler=class_sampler, seed=1), path("samples_per_class.png"), nrow=10)
    x, y = _test_images("fashion-mnist", data_dir, 8)
    box = torch.zeros(32, 32, dtype=torch.bool)
    box[8:24, 8:24] = True  # 25% of the image
    C = pipe.model.config.num_classes
    removed = torch.stack([inpaint(pipe, im, box, sampler=s, seed=i) for i, im in enumerate(x)])
    replaced = torch.stack(
        [
            inpaint(pipe, im, box, class_label=(int(y[i]) + 1 + i) % C, sampler=class_sampler, seed=i)
            for i, im in enumerate(x)
        ]
    )
    holed = x.clone()
    holed[:, :, box] = 0.5
    save_image(torch.cat([x, holed, removed, replaced]), path("inpaint.png"), nrow=8)
    crops = x[:, :, 8:24, 8:24]
    uncropped = torch.stack([outpaint(pipe, c, 8, 8, 8, 8, sampler=s, seed=i) for i, c in enumerate(crops)])
    padded = torch.nn.functional.pad(crops, (8, 8, 8, 8), value=0.5)
    save_image(torch.cat([x, padded, uncropped]), path("outpaint.png"), nrow=8)
    # beyond the model's resolution: 32 -> 48 px, filled in overlapping 32 x 32 tiles
    wide = torch.stack([outpaint(pipe, im, 8, 8, 8, 8, sampler=s, seed=100 + i) for i, im in enumerate(x)])
    save_image(torch.cat([torch.nn.functional.pad(x, (8, 8, 8, 8), value=0.5), wide]), path("outpaint48.png"), nrow=8)


def _recognition(
    model_dir: str, cache: str, plan: dict[str, Any], data_dir: str | None, with_pixels: bool
) -> dict[str, Any]:
    """Linear probe and 1/10-shot on frozen mean-pooled features of the cached training images (view 0), tested on
    the test split; with ``with_pixels`` the same protocol on raw pixels, the baseline."""
    from .pipeline import MAGEPipeline
    from .recognition import accuracy, few_shot, train_probe
    from .tokens import TokenCache

    pipe = MAGEPipeline.from_pretrained(model_dir)
    tc = TokenCache(cache)
    n = min(len(tc), plan["probe_train_images"])
    tr_f, tr_y = _features_from_tokens(pipe.model, tc.rows(torch.arange(n), 0)), tc.labels[:n]
    xt, te_y = _test_images("fashion-mnist", data_dir)
    with torch.no_grad():
        te_tok = torch.cat([pipe.tokenizer.encode(xt[s : s + 500]) for s in range(0, len(xt), 500)])
    te_f = _features_from_tokens(pipe.model, te_tok)
    C = len(tc.classes)
    head = train_probe(tr_f, tr_y, C, epochs=30, progress=True)
    with torch.no_grad():
        lin = accuracy(head(te_f), te_y)
    fs = few_shot(tr_f, tr_y, te_f, te_y, [1, 10], draws=5)
    res = {
        "train_images": n,
        "linear": lin,
        "shot1": fs["1"]["logreg_mean"],
        "shot10": fs["10"]["logreg_mean"],
        "shot10_std": fs["10"]["logreg_std"],
    }
    if with_pixels:
        from .data import load_dataset

        train = load_dataset("fashion-mnist", "train", 32, "none", data_dir, limit=n)
        px_tr, px_te = torch.stack([train[i][0] for i in range(n)])[:, 0].flatten(1), xt[:, 0].flatten(1)  # grey
        mu, sd = px_tr.mean(0), px_tr.std(0) + 1e-6
        px_head = train_probe((px_tr - mu) / sd, tr_y, C, epochs=30, progress=True)
        with torch.no_grad():
            res["pixels_linear"] = accuracy(px_head((px_te - mu) / sd), te_y)
        px_fs = few_shot(px_tr, tr_y, px_te, te_y, [1, 10], draws=5)
        res["pixels_shot1"], res["pixels_shot10"] = px_fs["1"]["logreg_mean"], px_fs["10"]["logreg_mean"]
    return res


def write_report(out: str, state: dict[str, Any], configs: dict[str, Any], seconds: float, budget: float) -> str:
    """report.md and report.html: a table with the released model, the model trained here and the baselines,
    then both models' pictures side by side."""
    nan = float("nan")

    def get(stage: str, key: str, fmt: str = "{:.2f}") -> str:
        v = state.get(stage, {}).get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    mage, judge_acc = state.get("mage", {}), state.get("release-agreement", {}).get("judge_test_accuracy", nan)
    here = f"trained here ({mage.get('minutes') or 0:.1f} min, {mage.get('steps', 0)} steps)"
    rows = [
        ("Fine-tuned classifier, test top-1 (%)", get("release-classify", "accuracy"), "-", "-", "released only"),
        (
            "Linear probe top-1 (%)",
            get("release-recognition", "linear"),
            get("recognition", "linear"),
            get("release-recognition", "pixels_linear") + " (raw pixels)",
            f"frozen features of {state.get('release-recognition', {}).get('train_images', 0)} train images",
        ),
        (
            "10-shot top-1 (%)",
            get("release-recognition", "shot10"),
            get("recognition", "shot10"),
            get("release-recognition", "pixels_shot10") + " (raw pixels)",
            "logistic regression, 5 draws",
        ),
        (
            "1-shot top-1 (%)",
            get("release-recognition", "shot1"),
            get("recognition", "shot1"),
            get("release-recognition", "pixels_shot1") + " (raw pixels)",
            "5 draws",
        ),
        (
            "Class agreement (%)",
            get("release-agreement", "agreement"),
            get("agreement", "agreement"),
            "-",
            f"{state.get('agreement', state.get('release-agreement', {})).get('num', 0)} class-conditional samples "
            f"(cfg 4, token temperature 0.7) judged by the released pixel CNN ({judge_acc:.2f}% test accuracy)",
        ),
        (
            f"FID (N = {state.get('release-fid', {}).get('num', 0)})",
            get("release-fid", "fid"),
            get("fid", "fid"),
            get("release-fid", "floor") + " (real train images: the floor)",
            "Inception-v3 (FID weights) vs the test split, class-balanced samples",
        ),
        (
            "KID / precision / recall",
            " / ".join(get("release-fid", k, "{:.3f}") for k in ("kid", "precision", "recall")),
            " / ".join(get("fid", k, "{:.3f}") for k in ("kid", "precision", "recall")),
            "-",
            "",
        ),
        ("MAGE final loss", "-", get("mage", "loss", "{:.3f}"), "-", "label-smoothed CE on masked tokens"),
    ]
    if "tokenizer" in state:
        rows.append(("Tokenizer trained here: test PSNR (dB)", "-", get("tokenizer", "test_psnr"), "-", ""))
    timings = [(k, f"{v['seconds']:.0f} s") for k, v in state.items()]
    versions = (
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    pictures = [
        ("10 samples per class (one row per class)", "samples_per_class.png"),
        ("Unconditional samples", "samples_uncond.png"),
        (
            "Inpainting: test images, 25% box removed, filled (remove), filled with another class (replace)",
            "inpaint.png",
        ),
        ("Outpainting 16 -> 32 px: test images, centre crops, uncropped", "outpaint.png"),
        ("Outpainting 32 -> 48 px (overlapping 32 x 32 tiles): test images, extended", "outpaint48.png"),
    ]
    examples = state.get("release-classify", {}).get("examples", [])
    ex_text = "; ".join(f"{e['true']} -> " + ", ".join(f"{c} {p:.1f}%" for c, p in e["top3"][:2]) for e in examples)
    head = ["metric", "released model", here, "baseline", "note"]
    title = f"Fashion-MNIST, budget {budget:.0f} min, ran {seconds / 60:.1f} min. {versions}"
    md = ["# mage demo report\n", title + "\n", "| " + " | ".join(head) + " |", "|---|---|---|---|---|"]
    md += [f"| {' | '.join(r)} |" for r in rows]
    if examples:
        md += ["", "The released classifier on test images (`classify_examples.png`): " + ex_text]
    md += ["", "| stage | time |", "|---|---|"] + [f"| {a} | {b} |" for a, b in timings] + [""]
    for t, f in pictures:
        if os.path.isfile(os.path.join(out, "release_" + f)):
            md += [f"## {t}\n", f"released: ![{t}](release_{f})  trained here: ![{t}]({f})\n"]
    if os.path.isfile(os.path.join(out, "mage_curve.png")):
        md += ["## Pre-training curve of the model trained here\n", "![curve](mage_curve.png)\n"]
    md += ["## Configs\n", "```json", json.dumps(configs, indent=2), "```"]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md))
    h = [
        "<html><head><meta charset='utf-8'><title>mage demo</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        ".pair{display:flex;gap:2em}.pair div{flex:1}"
        "img{image-rendering:pixelated;max-width:100%}</style></head><body>",
        f"<h1>mage demo report</h1><p>{html.escape(title)}</p>",
        "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>",
    ]
    h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows] + ["</table>"]
    if examples:
        h += [
            "<h2>The released classifier on test images</h2><img src='classify_examples.png' width='360'>",
            f"<p>{html.escape(ex_text)}</p>",
        ]
    for t, f in pictures:
        if os.path.isfile(os.path.join(out, "release_" + f)):
            cells = [("released model", "release_" + f), (here, f)]
            h += [f"<h2>{html.escape(t)}</h2><div class='pair'>"]
            h += [
                f"<div><p>{html.escape(c)}</p><img src='{p}' width='480'></div>"
                for c, p in cells
                if os.path.isfile(os.path.join(out, p))
            ]
            h += ["</div>"]
    if os.path.isfile(os.path.join(out, "mage_curve.png")):
        h += ["<h2>Pre-training curve of the model trained here</h2><img src='mage_curve.png' width='600'>"]
    h += ["<h2>Timings</h2><table>"] + [f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in timings] + ["</table>"]
    h += [f"<h2>Configs</h2><pre>{html.escape(json.dumps(configs, indent=2))}</pre></body></html>"]
    path = os.path.join(out, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(h))
    return path
