"""``radgen probe scaling``: probe quality against the number of pretraining images.

Pretrains the same encoder config on nested fractions of a manifest's ``train`` split (a seeded
permutation; fraction 25% is the first quarter of it, 50% the first half, ...), then probes every
checkpoint, seeded random inits of the same architecture and raw pixels in one
:func:`radgen.probes.run_probes` call on the full manifest, so all points share the same
test rows and bootstrap resamples. Writes ``OUT/scaling.json``, ``scaling.md``, ``scaling.png``
(macro AUROC and, with masks, Dice against pretraining images, with CIs) and the probe outputs.

Resumable: a fraction whose pretraining finished is recorded in ``OUT/fractions.json`` and
reused; an interrupted one resumes from its checkpoint (exact resume of ``pretrain-encoder``).
By default every fraction runs the config's schedule (same epochs: larger fractions take more
steps). ``optim.steps_per_epoch=N`` gives every fraction the same schedule and compute
(``optim.epochs * N`` steps; the sampler cycles a small subset). ``optim.max_steps`` only cuts
each schedule short, so it does not equalise fractions whose schedules are shorter than it.
``scaling.md`` and ``scaling.json`` record the steps each fraction ran.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from encoder.io import atomic_write_text
from radgen.config import ConfigError, load_config
from radgen.data.manifest import read_manifest
from encoder.specs import random_like_spec

__all__ = ["nested_subsets", "run_scaling", "steps_note"]


def nested_subsets(n: int, fractions: list[float], seed: int = 0) -> list[np.ndarray]:
    """Row indices of each fraction of ``n`` rows; each subset contains the smaller ones."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"probe scaling: fractions must be in (0, 1], got {fractions}")
    perm = np.random.default_rng(np.random.SeedSequence([seed, 7])).permutation(n)
    return [np.sort(perm[:max(1, int(round(f * n)))]) for f in sorted(fractions)]


def steps_note(steps: dict[str, int]) -> str | None:
    """A warning when the fractions ran different numbers of steps (their compute differs), else None.

    ``steps``: encoder name -> optimiser steps its pretraining ran, in fraction order.
    """
    if len(set(steps.values())) <= 1:
        return None
    return (f"the fractions ran different numbers of steps ({', '.join(map(str, steps.values()))}); "
            "optim.steps_per_epoch=N gives each the same schedule")


def _pretrain(cfg, done: dict, key: str, progress: bool) -> dict:
    from radgen.pretraining import run_pretrain

    ckpt = Path(cfg.out) / "checkpoint.pt"
    if key in done and ckpt.is_file():
        return done[key]
    summary = run_pretrain(cfg)
    if summary["status"] != "finished":
        raise ConfigError(f"probe scaling: pretraining for {key} stopped ({summary['status']}); run again to resume")
    return {"checkpoint": summary["checkpoint"], "steps": summary["steps"]}


def run_scaling(out: str, data: str, configs: list[str], overrides: list[str], fractions: list[float],
                random_seeds: int = 2, seed: int = 0, probe_kw: dict | None = None,
                progress: bool = True) -> dict:
    from eval.probes import plots
    from radgen.probes import format_report, run_probes, write_report

    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    ds = read_manifest(data, check_files=False)
    train_rows = [i for i, s in enumerate(ds["split"]) if s == "train"]
    if not train_rows:
        raise ConfigError(f"probe scaling: {data} has no 'train' rows to pretrain on")
    subsets = nested_subsets(len(train_rows), fractions, seed)
    cfg0 = load_config("encoder", configs, ["data.path=unused", f"out={out_p}", *overrides])  # validated early
    state_file = out_p / "fractions.json"
    done = json.loads(state_file.read_text()) if state_file.is_file() else {}
    encoders: dict[str, str] = {}
    n_images: dict[str, int] = {}
    steps: dict[str, int] = {}
    t0 = time.perf_counter()
    for f, idx in zip(sorted(fractions), subsets):
        key = f"{len(idx)}img"
        sub = out_p / f"pretrain-{key}"
        manifest = sub / "train.jsonl"
        lines = [json.dumps({"id": ds["id"][train_rows[i]], "split": "train",
                             "image": str(Path(ds["images"][train_rows[i]][0]).resolve())}) for i in idx]
        subset_sha = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        if manifest.is_file() and hashlib.sha256(manifest.read_text().rstrip("\n").encode()).hexdigest() != subset_sha:
            # Reusing (or resuming) a checkpoint of other images would be silently wrong.
            raise ConfigError(f"probe scaling: {manifest} holds a different subset (other data or --seed); "
                              "use a new --out")
        if not manifest.is_file():
            atomic_write_text(manifest, "\n".join(lines) + "\n")
        print(f"[scaling] {f:.0%} of train = {len(idx)} images -> {sub}", file=sys.stderr)
        cfg = load_config("encoder", configs, [f"data.path={manifest}", f"out={sub}",
                                               f"train.progress={str(progress).lower()}", *overrides])
        done[key] = _pretrain(cfg, done, key, progress)
        atomic_write_text(state_file, json.dumps(done, indent=2) + "\n")
        encoders[f"pretrained-{key}"] = done[key]["checkpoint"]
        n_images[f"pretrained-{key}"] = len(idx)
        steps[f"pretrained-{key}"] = int(done[key]["steps"])
    note = steps_note(steps)
    if note:
        print(f"[scaling] note: {note}", file=sys.stderr)
    first = next(iter(encoders.values()))
    encoders.update({f"random-{k}": random_like_spec(first, k) for k in range(random_seeds)})
    image_size = int(cfg0.crops.global_size)
    print(f"[scaling] pretraining done in {time.perf_counter() - t0:.0f} s; probing {len(encoders)} encoders",
          file=sys.stderr)
    run = run_probes(data, encoders, image_size, cache_dir=out_p / "features", **(probe_kw or {}))
    title = f"Data scaling: {cfg0.model.arch}, fractions {sorted(fractions)} of {len(train_rows)} train images"
    write_report(run, out_p, {"data": str(Path(data).resolve()), "encoders": encoders, "n_images": n_images,
                              "fractions": sorted(fractions), "configs": configs, "overrides": overrides}, title)

    curves = [("logistic", "macro", "auroc", "macro AUROC (logistic)"), ("knn", "macro", "auroc", "macro AUROC (kNN)"),
              ("logistic", "sex (F)", "auroc", "sex AUROC (logistic)"),
              ("segment", "heart", "dice", "heart Dice"), ("segment", "right_lung", "dice", "right lung Dice"),
              ("ridge", "age", "mae", "age MAE")]
    points = []
    for probe, target, metric, label in curves:
        for r in run.rows:
            if (r["probe"], r["target"], r["metric"]) != (probe, target, metric) or r["value"] is None:
                continue
            if r["model"] in n_images:
                points.append({"series": label, "metric": metric, "n_images": n_images[r["model"]],
                               "steps": steps[r["model"]], "value": r["value"], "low": r["low"], "high": r["high"]})
        rand = [r["value"] for r in run.rows if r["kind"] == "random" and r["value"] is not None
                and (r["probe"], r["target"], r["metric"]) == (probe, target, metric)]
        if rand:
            points.append({"series": f"{label}, random init (mean of {len(rand)})", "metric": metric,
                           "n_images": max(n_images.values()), "steps": None, "value": float(np.mean(rand)),
                           "low": None, "high": None})
    pngs = []
    for metric, name, label in (("auroc", "scaling.png", "AUROC"), ("dice", "scaling_dice.png", "Dice"),
                                ("mae", "scaling_age.png", "age MAE (years)")):
        pts = [p for p in points if p["metric"] == metric]
        if pts:
            pngs.append(plots.plot_scaling(pts, out_p / name, metric_label=label,
                                           title=f"{label} vs pretraining images (95% CI)"))
    lines = [f"## {title}", "", "| series | pretraining images | steps | value [95% CI] |", "|---|---:|---:|---|"]
    for p in points:
        ci = "" if p["low"] is None else f" [{p['low']:.3f}, {p['high']:.3f}]"
        lines.append(f"| {p['series']} | {p['n_images']} | {p['steps'] if p['steps'] is not None else '—'} | "
                     f"{p['value']:.3f}{ci} |")
    lines += ["", format_report(run)]
    atomic_write_text(out_p / "scaling.md", "\n".join(lines) + "\n")
    atomic_write_text(out_p / "scaling.json", json.dumps({"points": points, "n_images": n_images, "steps": steps,
                                                          "encoders": encoders}, indent=2) + "\n")
    return {"points": points, "pngs": [str(p) for p in pngs], "table": "\n".join(lines)}
