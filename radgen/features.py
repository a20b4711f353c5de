"""The ``features`` job: a manifest or image folder -> frozen encoder features on disk, cached.

``extract_features(encoder_spec, data, out, image_size)`` reads the rows (a manifest, or every
image under a plain folder), loads each row's first image with :func:`radgen.data.images.load_image`
(a file that fails is skipped and recorded; the job goes on), preprocesses it like rad-dino at
``image_size`` and encodes it with :func:`encoder.features.encode`, the encoder prepared once by
:func:`encoder.inference.prepare_encoder` (``precision`` auto/fp32/bf16, optional
``torch.compile``). Decoding and preprocessing stream through :func:`iter_image_batches` in
background workers (processes or threads) a few batches ahead of the forward passes, so memory
holds the ``(N, D)`` features and a few batches of images, never the whole folder. With ``out``
it writes, each atomically and ``meta.json`` last:

* ``features.safetensors``: key ``features``, float32 ``(N, D)``, one row per kept image;
* ``ids.json``: the N row ids, in order;
* ``skipped.jsonl``: one record per skipped row (``id`` + the :class:`ImageLoadError` record);
* ``meta.json``: encoder spec and weights hash, data hash, split, image size, pool, layers,
  precision, dims, counts, timing.

A later call with the same ``out`` whose ``meta.json`` matches (same encoder *weights*, same rows
and image files by path/size/mtime, split, image size, pool, layers, resolved precision) loads the
files instead of recomputing; a cache written before precision was recorded counts as fp32.

Encoder specs (checkpoint files, HF Dinov2 folders, ``random:``, ``random-like:``, ``pixels``) are
read by :mod:`encoder.specs`; :func:`image_encoder` adds the refusal of the ``oracle`` control.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from encoder.checkpoint import weights_sha256
from encoder.errors import InputError
from encoder.features import POOLS, encode, feature_dim, resolve_layers
from encoder.inference import (bf16_supported, default_batch_size, prepare_encoder, resolve_device,
                               resolve_precision)
from encoder.io import atomic_write_bytes, atomic_write_text
from encoder.processor import RadDinoProcessor
from encoder.specs import EncoderSpecError, load_encoder_spec
from encoder.vit import ViTEncoder
from radgen.data.images import ImageLoadError, load_image
from radgen.data.manifest import image_folder_dataset, is_image_folder, read_manifest
from radgen.data.skips import SKIPPED_FILE, write_skip_log
from radgen.data.stream import LOADERS, StreamBatch, stream_batches

__all__ = [
    "FORMAT", "FeatureJobError", "FeatureSet", "extract_features", "load_features",
    "image_encoder", "read_rows", "iter_image_batches", "LOADERS",
]

FORMAT = "radgen-features/1"
FEATURES_FILE, IDS_FILE, META_FILE = "features.safetensors", "ids.json", "meta.json"
# meta.json fields that must match for a cached result to be reused
_CACHE_KEYS = ("format", "encoder_sha256", "data_sha256", "split", "image_size", "pool", "layers",
               "precision")
# what a cache written before a key existed was computed with (all earlier runs were fp32)
_CACHE_DEFAULTS = {"precision": "fp32"}


class FeatureJobError(InputError):
    """Bad arguments or unusable outputs of the features job; the message says which."""


class FeatureSet(tuple):
    """``(ids, features)``: unpacks as a pair, and also carries ``skipped``, ``meta``, ``cached``."""

    def __new__(cls, ids: list[str], features: np.ndarray, skipped: list[dict], meta: dict,
                cached: bool = False):
        self = super().__new__(cls, (ids, features))
        self.skipped, self.meta, self.cached = skipped, meta, cached
        return self

    @property
    def ids(self) -> list[str]:
        return self[0]

    @property
    def features(self) -> np.ndarray:
        return self[1]


# ----------------------------------------------------------------------------------------------
# Encoders from specs (encoder/specs.py); the features of an image need an image encoder
# ----------------------------------------------------------------------------------------------
def image_encoder(spec: str, which: str = "teacher") -> ViTEncoder:
    """:func:`encoder.specs.load_encoder_spec`, refusing the report generator's ``oracle`` control
    (it has no image features)."""
    if str(spec) == "oracle":
        raise FeatureJobError("encoder 'oracle' is the report generator's labels control (radgen train, "
                              "radgen demo controls): it has no image features to extract, probe or retrieve by")
    try:
        return load_encoder_spec(spec, which=which)
    except EncoderSpecError as exc:
        raise FeatureJobError(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def read_rows(data: str | os.PathLike, split: str | None = None):
    """A manifest (file, or folder holding one) or, for a plain folder, every image under it."""
    p = Path(data)
    if is_image_folder(p):
        if split is not None:
            raise FeatureJobError(f"{p}: a plain image folder has no splits (split={split!r})")
        return image_folder_dataset(p)
    return read_manifest(p, split=split, check_files=False)  # missing files: skipped and recorded


def _data_sha256(ids: Sequence[str], paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for rid, path in zip(ids, paths):
        try:
            st = os.stat(path)
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = None
        h.update(json.dumps([rid, path, stamp]).encode())
        h.update(b"\n")
    return h.hexdigest()


def _load_row(rid: str, path: str, proc: RadDinoProcessor) -> tuple[torch.Tensor | None, dict | None]:
    try:
        img, _ = load_image(path)
    except ImageLoadError as exc:
        return None, {"id": rid, **exc.record()}
    return proc.one(img), None


def _load_item(item: tuple[str, str], proc: RadDinoProcessor):
    return _load_row(item[0], item[1], proc)


def iter_image_batches(ids: Sequence[str], paths: Sequence[str], proc: RadDinoProcessor,
                       batch_size: int, workers: int = 0, loader: str = "process",
                       prefetch: int = 2) -> Iterator[StreamBatch]:
    """Decode and preprocess rows in order, ``batch_size`` rows per
    :class:`~radgen.data.stream.StreamBatch`, streaming through
    :func:`radgen.data.stream.stream_batches` (``loader`` ``"process"`` or ``"thread"``, ``workers``
    of them, ``prefetch`` batches ahead). Its ``items`` are the ``(id, path)`` pairs that loaded,
    ``inputs`` their images (B, 3, S, S); a file that fails to load is one of the batch's
    ``failures`` (``((id, path), {"id": ..., **ImageLoadError record})``) and the rest go on."""
    if loader not in LOADERS:
        raise FeatureJobError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    yield from stream_batches(list(zip(ids, paths)), partial(_load_item, proc=proc), batch_size, workers,
                              loader=loader, prefetch=prefetch)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def load_features(out: str | os.PathLike) -> FeatureSet:
    """Read a folder written by :func:`extract_features` (checks the features hash and shapes)."""
    from safetensors.numpy import load as st_load

    out = Path(out)
    try:
        meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
        blob = (out / FEATURES_FILE).read_bytes()
        ids = json.loads((out / IDS_FILE).read_text(encoding="utf-8"))
        skipped = [json.loads(line) for line in
                   (out / SKIPPED_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise FeatureJobError(f"{out}: incomplete or unreadable features folder ({exc})") from None
    if hashlib.sha256(blob).hexdigest() != meta.get("features_sha256"):
        raise FeatureJobError(f"{out}: {FEATURES_FILE} does not match meta.json (partial write?)")
    feats = st_load(blob)["features"]
    if feats.shape != (len(ids), meta.get("dim")):
        raise FeatureJobError(f"{out}: features {feats.shape} do not match {len(ids)} ids x dim {meta.get('dim')}")
    return FeatureSet(list(ids), feats, skipped, meta, cached=True)


def _write(out: Path, ids: list[str], feats: np.ndarray, skipped: list[dict], meta: dict) -> None:
    from safetensors.numpy import save as st_save

    out.mkdir(parents=True, exist_ok=True)
    # meta.json is the commit record: remove the old one first, so a crash part-way never leaves
    # an old meta.json vouching for new (or half-written) files.
    (out / META_FILE).unlink(missing_ok=True)
    blob = st_save({"features": np.ascontiguousarray(feats, dtype=np.float32)},
                   metadata={"format": FORMAT})
    atomic_write_bytes(out / FEATURES_FILE, blob)
    atomic_write_text(out / IDS_FILE, json.dumps(ids, indent=0) + "\n")
    write_skip_log(out / SKIPPED_FILE, skipped)
    meta["features_sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
def extract_features(
    encoder_spec: str,
    data: str | os.PathLike,
    out: str | os.PathLike | None,
    image_size: int,
    batch_size: int | None = None,
    pool: str = "cls",
    layers: Sequence[int] | int | None = None,
    split: str | None = None,
    progress: bool = True,
    *,
    workers: int | None = None,
    loader: str = "process",
    device: str | torch.device | None = None,
    precision: str = "auto",
    compile: bool = False,
    overwrite: bool = False,
) -> FeatureSet:
    """Frozen features of every loadable image of ``data``: ``(ids, features (N, D) float32)``.

    Args:
        encoder_spec: checkpoint file, HF Dinov2 folder, ``random:<arch>:<img_size>:<seed>`` or
            ``random-like:<spec>:<seed>`` or ``pixels[:<patch>]`` (see :mod:`encoder.specs`).
        data: a manifest file, a folder holding ``manifest.jsonl``/``manifest.csv``, or a plain
            folder of images (every image under it; no splits). Each row's first image is used.
        out: folder for the outputs and cache (see the module docstring); ``None``: memory only.
        image_size: shortest edge and centre crop of the rad-dino preprocessing.
        batch_size: images per forward pass (``None``: :func:`encoder.inference.default_batch_size`).
        pool, layers: see :func:`encoder.features.encode`.
        split: only rows of this split (manifests only).
        workers: background loaders decoding and preprocessing images while the model encodes
            (0: load in the main thread between forwards; ``None``: :func:`default_workers`).
        loader: ``"process"`` (DataLoader worker processes) or ``"thread"`` (a thread pool).
        device: where the encoder runs (default: CUDA when available, else CPU).
        precision: ``auto`` (bf16 where the device runs it natively, else fp32), ``fp32`` or
            ``bf16``; part of the cache key (see :mod:`encoder.inference`).
        compile: ``torch.compile`` the transformer blocks (pays off on long runs; see bench/).
        overwrite: recompute even when ``out`` holds a matching result.

    Returns:
        A :class:`FeatureSet`: unpacks as ``ids, feats``; ``.skipped`` lists the rows whose
        image failed to load (``id``, ``path``, ``error``, ``reason``), ``.meta`` the metadata
        and ``.cached`` whether the result was read from ``out``.
    """
    if pool not in POOLS:
        raise FeatureJobError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    if loader not in LOADERS:
        raise FeatureJobError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    try:
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
    except (ValueError, RuntimeError) as exc:
        raise FeatureJobError(str(exc)) from None
    if prec == "bf16" and not bf16_supported(dev):
        print(f"features: {dev.type} has no native bf16; bf16 is emulated and slower than fp32 here",
              file=sys.stderr)
    batch_size = default_batch_size(dev, image_size) if batch_size is None else batch_size
    workers = default_workers(dev) if workers is None else workers
    if image_size < 1 or batch_size < 1:
        raise FeatureJobError(f"image_size and batch_size must be positive (got {image_size}, {batch_size})")
    ds = read_rows(data, split=split)
    ids = [str(i) for i in ds["id"]]
    paths = [imgs[0] if imgs else "" for imgs in ds["images"]]
    model = image_encoder(encoder_spec)
    try:
        blocks = resolve_layers(model, layers)
    except ValueError as exc:
        raise FeatureJobError(str(exc)) from None
    key = {"format": FORMAT, "encoder_sha256": weights_sha256(model),  # of the fp32 weights
           "data_sha256": _data_sha256(ids, paths), "split": split, "image_size": int(image_size),
           "pool": pool, "layers": blocks, "precision": prec}
    assert tuple(key) == _CACHE_KEYS

    if out is not None and not overwrite and (Path(out) / META_FILE).is_file():
        try:
            cached = load_features(out)
        except FeatureJobError as exc:
            print(f"features: cache at {out} unusable, recomputing ({exc})", file=sys.stderr)
        else:
            if all(cached.meta.get(k, _CACHE_DEFAULTS.get(k)) == v for k, v in key.items()):
                return cached

    model = prepare_encoder(model, prec, dev, compile=compile)
    proc = RadDinoProcessor(shortest_edge=int(image_size), crop_size=int(image_size))
    dim = feature_dim(model, blocks, pool, image_size=int(image_size))
    kept: list[str] = []
    skipped: list[dict] = []
    feats = np.empty((len(ids), dim), dtype=np.float32)  # rows of kept images fill the top
    t0 = time.perf_counter()
    from tqdm import tqdm

    # The rate counts rows encoded or skipped (end-to-end throughput), always as img/s: tqdm's
    # default flips to s/img below 1 img/s, which is where a CPU at 518 px runs.
    fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
    with tqdm(total=len(ids), desc="features", unit="img", disable=not progress, bar_format=fmt) as bar:
        for batch in iter_image_batches(ids, paths, proc, batch_size, workers, loader):
            if batch.inputs is not None:
                n = len(kept)
                batch_feats = encode(model, batch.inputs, layers=blocks, pool=pool)
                feats[n:n + len(batch.items)] = batch_feats.cpu().numpy()
                kept.extend(rid for rid, _ in batch.items)
            skipped.extend(rec for _, rec in batch.failures)
            bar.update(batch.n)
            if skipped:
                bar.set_postfix(skipped=len(skipped))
    seconds = time.perf_counter() - t0
    feats = feats[:len(kept)]
    meta = {
        **key,
        "encoder": str(encoder_spec),
        "vit_config": asdict(model.cfg),
        "data": str(Path(data).resolve()),
        "dim": dim,
        "embed_dim": model.embed_dim,
        "n_rows": len(ids),
        "n_features": int(feats.shape[0]),
        "n_skipped": len(skipped),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(ids) / seconds, 2) if seconds > 0 else None,
        "device": str(dev),
        "batch_size": batch_size,
        "workers": workers,
        "loader": loader if workers > 0 else None,
        "compiled": bool(compile),
    }
    if out is not None:
        _write(Path(out), kept, feats, skipped, meta)
    return FeatureSet(kept, feats, skipped, meta, cached=False)


def default_workers(device: str | torch.device | None = None) -> int:
    """Background loaders for :func:`extract_features` on ``device``.

    A CPU forward already uses every core (torch's intra-op threads), and a loader process
    competing with them costs more than overlapping saves: on 2 cores, 1 loader made the whole job
    ~20 % slower than loading between forwards (``bench/README.md``). So on CPU: none up to 4
    cores, then one per 8 cores (not measured beyond 2 cores). On a GPU the cores are free:
    one per core but one, at most 4.
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if resolve_device(device).type == "cpu":
        return 0 if n <= 4 else min(4, n // 8)
    return max(0, min(4, n - 1))
