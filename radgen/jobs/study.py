"""``radgen pretrain-study``: does pretraining teach the encoder anything? One command.

Synthesises a set (or uses ``--data``), pretrains an encoder with the given config, then compares
frozen-feature linear probes of the pretrained encoder, random inits of the same architecture
(several seeds) and the raw-pixel baseline, with bootstrap CIs (``radgen.jobs.probe``).
"""

from __future__ import annotations

from pathlib import Path

from encoder.features import POOLS
from encoder.io import atomic_write_text
from radgen.config import load_config
from encoder.specs import random_like_spec
from radgen.jobs.pretrain import run_pretrain
from radgen.jobs.probe import format_report, run_probes, write_report

__all__ = ["add_study_parser", "run_study"]


def run_study(out: str, configs: list[str], overrides: list[str], data: str | None = None,
              n: int = 2000, size: int = 128, synth_seed: int = 1, random_seeds: int = 3,
              n_resamples: int = 1000, pool: str = "cls+grid2", progress: bool = True) -> str:
    out_p = Path(out)
    if data is None:
        data = str(out_p / "synth")
        if not (Path(data) / "manifest.jsonl").is_file():
            from radgen.data.synth.generate import generate_dataset

            generate_dataset(load_config("synth", [], [f"out={data}", f"n={n}", f"size={size}",
                                                        f"seed={synth_seed}", "overwrite=true"]),
                             progress=progress)
    cfg = load_config("encoder", configs, [f"data.path={data}", f"out={out_p / 'pretrain'}",
                                           f"train.progress={str(progress).lower()}", *overrides])
    summary = run_pretrain(cfg)
    ckpt = summary["checkpoint"]
    encoders = {"pretrained": ckpt}
    encoders.update({f"random-{k}": random_like_spec(ckpt, k) for k in range(random_seeds)})
    image_size = int(cfg.crops.global_size)
    run = run_probes(data, encoders, image_size, n_resamples=n_resamples, cache_dir=out_p / "features",
                     pool=pool, progress=progress)
    last = summary["last"]
    title = (f"Pretrained ({summary['steps']} steps, last loss {last.get('loss', float('nan')):.3f}, "
             f"collapse monitor: {last.get('collapse')}) vs {random_seeds} random inits vs raw pixels; "
             f"frozen-feature probes ({pool} features for the image-level ones), image {image_size}")
    table = format_report(run, title=title)
    write_report(run, out_p / "probe", {"data": str(data), "encoders": encoders, "pool": pool,
                                        "pretrain": {k: v for k, v in summary.items() if k != "last"},
                                        "last_logs": last}, title)
    atomic_write_text(out_p / "study.md", table + "\n")
    return table


def add_study_parser(subparsers):
    p = subparsers.add_parser(
        "pretrain-study", help="pretrain on a synthetic set, then probe pretrained vs random init vs pixels",
        description="One command for 'does it learn?': synthesise (or use --data), pretrain with the "
                    "given encoder config, and compare frozen-feature probes (findings, sex, age, "
                    "segmentation; see radgen probe) of the pretrained encoder, random inits and raw pixels.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", help="manifest/folder with train and validate/test splits (default: synthesise)")
    p.add_argument("--n", type=int, default=2000, help="synthetic images (default 2000)")
    p.add_argument("--size", type=int, default=128, help="synthetic image size (default 128)")
    p.add_argument("--random-seeds", type=int, default=3, help="random-init encoders (default 3)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--pool", default="cls+grid2", choices=[q for q in POOLS if q != "patches"],
                   help="frozen features: CLS, mean patch token, both (DINOv2 linear eval), or CLS + "
                        "2x2 pooled patch grid (default: keeps the layout cardiomegaly is read from)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="encoder config override file(s), e.g. cpu_tiny")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="encoder config overrides")
    p.set_defaults(func=lambda a: (print(run_study(a.out, a.config or ["cpu_tiny"], a.overrides, a.data, a.n,
                                                   a.size, random_seeds=a.random_seeds,
                                                   n_resamples=a.resamples, pool=a.pool)), 0)[1])
    return p
