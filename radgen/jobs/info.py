"""``radgen info``: versions, device, and where models and data are looked up."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from radgen.config import SHARED_DATA_HINT


def add_info_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="versions, device, and where models and data are looked up")
    p.set_defaults(func=cmd_info)
    return p


def cmd_info(args) -> int:
    import importlib.metadata as md

    import torch

    from encoder.inference import cpu_bf16_flags

    print(f"radgen {md.version('radgen')}  (python {platform.python_version()}, {platform.platform()})")
    for pkg in ("torch", "torchvision", "transformers", "peft", "timm", "datasets", "evaluate",
                "pycocoevalcap", "pydicom", "numpy", "pillow", "scikit-learn", "omegaconf"):
        try:
            print(f"  {pkg:14s} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"  {pkg:14s} (not installed)")
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        dev = "mps"
    else:
        dev = "cpu"
    print(f"device: {dev}; torch threads: {torch.get_num_threads()}; "
          f"native bf16 on CPU: {', '.join(cpu_bf16_flags()) or 'no (bf16 would be emulated)'}")
    from radgen.config import configs_dir

    print("lookup paths (every loader takes a local path; nothing is downloaded at run time):")
    print(f"  configs:        {configs_dir()}")
    print(f"  RADGEN_HOME:    {os.environ.get('RADGEN_HOME', str(Path.home() / '.cache' / 'radgen'))}")
    from radgen.model.llm_source import builtin_llm_cache_dir  # light: transformers is imported lazily there
    print(f"  built-in LLM:   {builtin_llm_cache_dir()}")
    print(f"  HF_HOME:        {os.environ.get('HF_HOME', str(Path.home() / '.cache' / 'huggingface'))}"
          f"  (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')})")
    shared = Path(SHARED_DATA_HINT).resolve()
    print(f"  shared data:    {shared} ({'present' if shared.is_dir() else 'absent'})")
    return 0
