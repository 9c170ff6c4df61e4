"""``mage demo``: the main job, end to end on Fashion-MNIST within a wall-clock budget.

Stages (each is reused when already finished; ``--fresh`` starts over):
  1. tokenizer   train the fmnist-32 VQGAN                       (30% of the budget)
  2. cache       tokenize (up to 1000 x budget minutes) training images (+ mirrored copies)
  3. mage        pre-train a class-conditional MAGE               (40% of the budget)
  4. samples     unconditional and per-class grids, tokenizer reconstructions
  5. report      report.md + report.html: pictures, metrics, timings, versions, configs
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


def _stage(state: dict[str, Any], path: str, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if name in state:
        print(f"[demo] {name}: already done ({state[name]['seconds']:.0f} s), reusing", flush=True)
        return state[name]
    print(f"[demo] {name}: starting", flush=True)
    t = time.time()
    res = fn() or {}
    res["seconds"] = time.time() - t
    state[name] = res
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"[demo] {name}: done in {res['seconds']:.0f} s", flush=True)
    return res


def run_demo(out: str = "runs/demo", budget_minutes: float = 15.0, fresh: bool = False,
             data_dir: str | None = None) -> str:
    from .config import mage_preset, tokenizer_preset
    from .data import load_dataset
    from .pipeline import MAGEPipeline
    from .pretrain import cache_tokens, pretrain
    from .sampler import SamplerConfig
    from .train_tokenizer import reconstruction_metrics, train_tokenizer
    from .transforms import save_image
    from .vqgan import VQTokenizer

    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, "stages.json")
    state = json.load(open(state_path)) if os.path.isfile(state_path) else {}
    tok_dir, mage_dir = os.path.join(out, "tokenizer"), os.path.join(out, "mage")
    cache = os.path.join(out, "tokens-train.safetensors")
    tcfg = tokenizer_preset("fmnist-32")
    tcfg.max_minutes = 0.3 * budget_minutes
    mcfg = mage_preset("fmnist-32")
    mcfg.max_minutes = 0.4 * budget_minutes
    mcfg.num_classes = -1

    def tokenizer_stage():
        train = load_dataset("fashion-mnist", "train", 32, tcfg.data_augment, data_dir)
        val = load_dataset("fashion-mnist", "val", 32, "none", data_dir, limit=1000)
        m = train_tokenizer(tcfg, train, tok_dir, val, resume=bool(step_dirs(tok_dir)))
        return {"val_psnr": m["psnr"], "val_usage": m["usage"], "steps": m["step"]}

    def cache_stage():
        n = min(55000, int(1000 * budget_minutes))  # tokenizing costs ~5 ms/image on 2 cores
        cache_tokens(tok_dir, "fashion-mnist", cache, data_dir=data_dir, limit=n)
        return {"images": n}

    def mage_stage():
        r = pretrain(mcfg, mage_dir, cache=cache, resume=bool(step_dirs(mage_dir)))
        return {"loss": r["loss"], "acc": r["acc"], "steps": r["step"]}

    def samples_stage():
        pipe = MAGEPipeline.from_pretrained(mage_dir)
        s = SamplerConfig(steps=12, choice_temperature=3.0)
        save_image(pipe.generate(64, sampler=s, seed=0), os.path.join(out, "samples_uncond.png"), nrow=8)
        save_image(pipe.generate_per_class(10, sampler=s, seed=1), os.path.join(out, "samples_per_class.png"), nrow=10)
        tok = VQTokenizer.from_pretrained(tok_dir)
        test = load_dataset("fashion-mnist", "test", 32, "none", data_dir)
        x = torch.stack([test[i][0] for i in range(16)])
        save_image(torch.cat([x, tok.decode(tok.encode(x)).clamp(0, 1)]), os.path.join(out, "reconstructions.png"), nrow=16)
        m = reconstruction_metrics(tok, test, limit=2000)
        return {"test_psnr": m["psnr"], "test_usage": m["usage"], "test_perplexity": m["perplexity"]}

    t0 = time.time()
    _stage(state, state_path, "tokenizer", tokenizer_stage)
    _stage(state, state_path, "cache", cache_stage)
    _stage(state, state_path, "mage", mage_stage)
    _stage(state, state_path, "samples", samples_stage)
    for src, dst in ((os.path.join(mage_dir, "curve.png"), "mage_curve.png"),):
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(out, dst))
    return write_report(out, state, {"tokenizer": dataclasses.asdict(tcfg), "mage": dataclasses.asdict(mcfg)},
                        time.time() - t0, budget_minutes)


def write_report(out: str, state: dict[str, Any], configs: dict[str, Any], seconds: float, budget: float) -> str:
    mage, smp = state.get("mage", {}), state.get("samples", {})
    rows = [
        ("Tokenizer test PSNR (dB)", f"{smp.get('test_psnr', float('nan')):.2f}", "goal >= 24"),
        ("Tokenizer codebook usage (%)", f"{smp.get('test_usage', float('nan')):.1f}", "goal >= 90"),
        ("Tokenizer code perplexity", f"{smp.get('test_perplexity', float('nan')):.1f}", ""),
        ("MAGE final loss", f"{mage.get('loss', float('nan')):.3f}", "label-smoothed CE, masked tokens"),
        ("MAGE masked-token accuracy (%)", f"{100 * mage.get('acc', float('nan')):.2f}", ""),
    ]
    timings = [(k, f"{v['seconds']:.0f} s") for k, v in state.items()]
    versions = f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} threads"
    images = [("Unconditional samples", "samples_uncond.png"), ("10 samples per class (one row per class)", "samples_per_class.png"),
              ("Tokenizer: test images (top) and reconstructions (bottom)", "reconstructions.png"),
              ("MAGE pre-training curve", "mage_curve.png")]
    md = ["# mage demo report\n", f"Fashion-MNIST, `fmnist-32` presets, budget {budget:.0f} min, ran {seconds / 60:.1f} min. {versions}\n",
          "| metric | value | note |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    md += ["", "| stage | time |", "|---|---|"] + [f"| {a} | {b} |" for a, b in timings] + [""]
    md += [f"## {t}\n\n![{t}]({f})\n" for t, f in images if os.path.isfile(os.path.join(out, f))]
    md += ["## Configs\n", "```json", json.dumps(configs, indent=2), "```"]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md))
    h = ["<html><head><meta charset='utf-8'><title>mage demo</title><style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}img{image-rendering:pixelated;max-width:100%}</style></head><body>",
         f"<h1>mage demo report</h1><p>Fashion-MNIST, fmnist-32 presets, budget {budget:.0f} min, ran {seconds / 60:.1f} min. {html.escape(versions)}</p>",
         "<table><tr><th>metric</th><th>value</th><th>note</th></tr>"]
    h += [f"<tr><td>{a}</td><td>{b}</td><td>{html.escape(c)}</td></tr>" for a, b, c in rows] + ["</table>"]
    h += ["<h2>Timings</h2><table>"] + [f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in timings] + ["</table>"]
    h += [f"<h2>{t}</h2><img src='{f}' width='600'>" for t, f in images if os.path.isfile(os.path.join(out, f))]
    h += [f"<h2>Configs</h2><pre>{html.escape(json.dumps(configs, indent=2))}</pre></body></html>"]
    path = os.path.join(out, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(h))
    return path
