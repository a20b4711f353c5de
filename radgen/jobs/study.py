"""``radgen pretrain-study``: the command line over :mod:`radgen.pipelines.study`."""

from __future__ import annotations

from encoder.features import POOLS
from radgen.config import add_config_args
from radgen.pipelines.study import run_study


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
    add_config_args(p, "encoder", "cpu_tiny")
    p.set_defaults(func=lambda a: (print(run_study(a.out, a.config or ["cpu_tiny"], a.overrides, a.data, a.n,
                                                   a.size, random_seeds=a.random_seeds,
                                                   n_resamples=a.resamples, pool=a.pool)), 0)[1])
    return p
