"""``radgen pretrain-study``: does pretraining teach the encoder anything? One command.

Synthesises a set (or uses ``--data``), pretrains an encoder with the given config, then compares
frozen-feature linear probes of the pretrained encoder, random inits of the same architecture
(several seeds) and the raw-pixel baseline, with bootstrap CIs (``radgen.probes``).
"""

from __future__ import annotations

from pathlib import Path

from encoder.io import atomic_write_text
from encoder.specs import random_like_spec
from encoder.train import validate_config
from radgen.config import ConfigError, load_config
from radgen.pretraining import run_pretrain
from radgen.probes import format_report, run_probes, write_report

__all__ = [ "run_study"]


def run_study(out: str, configs: list[str], overrides: list[str], data: str | None = None,
              n: int = 2000, size: int = 128, synth_seed: int = 1, random_seeds: int = 3,
              n_resamples: int = 1000, pool: str = "cls+grid2", progress: bool = True) -> str:
    out_p = Path(out)
    synth = data is None
    data = str(out_p / "synth") if synth else data
    # the whole config is read and checked before any long work (the synthetic set takes minutes)
    cfg = load_config("encoder", configs, [f"data.path={data}", f"out={out_p / 'pretrain'}",
                                           f"train.progress={str(progress).lower()}", *overrides])
    try:
        validate_config(cfg)
    except ValueError as exc:
        raise ConfigError(f"pretrain-study encoder settings: {exc}") from None
    if synth and not (Path(data) / "manifest.jsonl").is_file():
        from radgen.data.synth.generate import generate_dataset

        generate_dataset(load_config("synth", [], [f"out={data}", f"n={n}", f"size={size}",
                                                    f"seed={synth_seed}", "overwrite=true"]),
                         progress=progress)
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
