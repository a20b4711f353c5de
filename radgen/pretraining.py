"""``radgen pretrain-encoder``: files -> image Dataset -> ``encoder.train.train``.

Unreadable images are skipped (the next loadable one takes their place) and recorded in
``out/skipped.jsonl``; the summary counts them.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from radgen.config import ConfigError
from radgen.data.manifest import image_folder_dataset, is_image_folder, read_manifest
from radgen.data.skips import SKIPPED_FILE, read_skip_log
from radgen.data.torch_datasets import ImageTensorDataset

__all__ = ["image_paths", "run_pretrain"]



def image_paths(path: str, split: str | None) -> list[str]:
    """All image paths of a manifest (one split) or an image folder."""
    p = Path(path)
    if p.exists() and not is_image_folder(p):  # a manifest (a missing path: the folder error below)
        ds = read_manifest(p, split=split)
        paths = [q for imgs in ds["images"] for q in imgs]
    else:
        paths = [imgs[0] for imgs in image_folder_dataset(p)["images"]]
    if not paths:
        raise ConfigError(f"pretrain-encoder: no images in {path}" + (f" (split {split})" if split else ""))
    return paths


def run_pretrain(cfg: DictConfig) -> dict:
    from encoder.train import train, validate_config

    if not cfg.data.path:
        raise ConfigError("pretrain-encoder: 'data.path' (manifest or image folder) is required")
    try:
        validate_config(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    paths = image_paths(cfg.data.path, cfg.data.split)
    skip_log = Path(cfg.out) / SKIPPED_FILE
    images = ImageTensorDataset(paths, image_size=cfg.data.image_size, cache=cfg.data.cache, skip_log=skip_log)
    summary = train(cfg, images)
    summary["n_images"] = len(paths)
    summary["skipped"] = read_skip_log(skip_log)
    summary["skipped_file"] = str(skip_log)
    return summary
