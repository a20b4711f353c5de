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

import argparse
import hashlib
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.utils.data

from encoder.checkpoint import weights_sha256
from encoder.errors import InputError
from encoder.features import POOLS, encode, feature_dim, resolve_layers
from encoder.inference import (PRECISIONS, bf16_supported, default_batch_size, prepare_encoder,
                               resolve_device, resolve_precision)
from encoder.io import atomic_write_bytes, atomic_write_text
from encoder.processor import RadDinoProcessor
from encoder.specs import EncoderSpecError, load_encoder_spec
from encoder.vit import ViTEncoder
from radgen.data.images import ImageLoadError, load_image
from radgen.data.manifest import image_folder_dataset, read_manifest

__all__ = [
    "FORMAT", "FeatureJobError", "FeatureSet", "extract_features", "load_features",
    "image_encoder", "read_rows", "iter_image_batches", "ImageBatch", "LOADERS", "add_features_parser",
    "cmd_features",
]

FORMAT = "radgen-features/1"
FEATURES_FILE, IDS_FILE, SKIPPED_FILE, META_FILE = (
    "features.safetensors", "ids.json", "skipped.jsonl", "meta.json")
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
    if p.is_dir() and not any((p / n).is_file() for n in ("manifest.jsonl", "manifest.csv")):
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


LOADERS = ("thread", "process")


@dataclass
class ImageBatch:
    """One batch from :func:`iter_image_batches`: the loadable rows of a run of ``rows`` rows."""

    ids: list[str]  # ids of the rows in ``images``, in order
    images: torch.Tensor | None  # (len(ids), 3, S, S) preprocessed; None if no row loaded
    skipped: list[dict] = field(default_factory=list)  # ``id`` + ImageLoadError record per failure
    rows: int = 0  # rows covered (kept + skipped)


def _load_row(rid: str, path: str, proc: RadDinoProcessor) -> tuple[torch.Tensor | None, dict | None]:
    try:
        img, _ = load_image(path)
    except ImageLoadError as exc:
        return None, {"id": rid, **exc.record()}
    return proc.one(img), None


def _make_batch(ids: Sequence[str], results) -> ImageBatch:
    kept, xs, skipped = [], [], []
    for rid, (x, err) in zip(ids, results):
        if err is None:
            kept.append(rid)
            xs.append(x)
        else:
            skipped.append(err)
    return ImageBatch(kept, torch.stack(xs) if xs else None, skipped, len(ids))


class _Rows(torch.utils.data.Dataset):
    """Rows as a map-style dataset for DataLoader worker processes (each item: one whole batch)."""

    def __init__(self, ids: Sequence[str], paths: Sequence[str], proc: RadDinoProcessor, batch_size: int):
        self.ids, self.paths, self.proc, self.batch_size = list(ids), list(paths), proc, batch_size

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch_size)

    def __getitem__(self, k: int) -> ImageBatch:
        sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
        ids = self.ids[sl]
        # the batch is stacked in the worker: one shared-memory tensor per batch crosses processes
        return _make_batch(ids, [_load_row(i, p, self.proc) for i, p in zip(ids, self.paths[sl])])


LOADER_NICE = 10  # niceness of loader processes (see _loader_init); 0: same priority as the forward


def _loader_init(worker_id: int) -> None:
    # Loaders should use the cycles the forward leaves idle rather than preempt its intra-op
    # threads (one descheduled thread stalls the whole parallel region).
    if LOADER_NICE and hasattr(os, "nice"):
        try:
            os.nice(LOADER_NICE)
        except OSError:
            pass


def iter_image_batches(ids: Sequence[str], paths: Sequence[str], proc: RadDinoProcessor,
                       batch_size: int, workers: int = 0, loader: str = "process",
                       prefetch: int = 2) -> Iterator[ImageBatch]:
    """Decode and preprocess rows in order, ``batch_size`` rows per :class:`ImageBatch`, streaming.

    ``workers=0`` loads each batch in the calling thread when it is asked for. Otherwise
    ``loader="process"`` runs ``workers`` DataLoader worker processes (one torch thread each), each
    building whole batches; ``loader="thread"`` runs a pool of ``workers`` threads, one image per
    task (PIL decoding and torch's resize release the GIL). Either way at most ``prefetch`` batches
    per worker (processes) or ``prefetch`` batches in all (threads) are loaded ahead of the one the
    caller holds, so memory does not grow with the number of rows. A file that fails to load is
    reported in its batch's ``skipped`` and the rest go on.
    """
    if loader not in LOADERS:
        raise FeatureJobError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    ids, paths = list(ids), list(paths)
    starts = range(0, len(ids), batch_size)
    if workers <= 0:
        for s in starts:
            chunk = slice(s, s + batch_size)
            yield _make_batch(ids[chunk], [_load_row(i, p, proc) for i, p in zip(ids[chunk], paths[chunk])])
        return
    if loader == "process":
        dl = torch.utils.data.DataLoader(_Rows(ids, paths, proc, batch_size), batch_size=None,
                                         shuffle=False, num_workers=workers, prefetch_factor=prefetch,
                                         worker_init_fn=_loader_init)
        yield from dl
        return
    ahead = max(1, prefetch) * batch_size  # images submitted and not yet handed out (>= a batch)
    pending: deque = deque()
    nxt = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="features-load") as pool:

        def refill() -> None:
            nonlocal nxt
            while nxt < len(ids) and len(pending) < ahead:
                pending.append(pool.submit(_load_row, ids[nxt], paths[nxt], proc))
                nxt += 1

        try:
            refill()
            for s in starts:
                chunk = ids[s:s + batch_size]
                results = [pending.popleft().result() for _ in chunk]
                refill()  # before handing the batch out, so loading overlaps the caller's forward
                yield _make_batch(chunk, results)
        finally:
            for f in pending:
                f.cancel()


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
    atomic_write_text(out / SKIPPED_FILE, "".join(json.dumps(r) + "\n" for r in skipped))
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
            if batch.images is not None:
                n = len(kept)
                batch_feats = encode(model, batch.images, layers=blocks, pool=pool)
                feats[n:n + len(batch.ids)] = batch_feats.cpu().numpy()
                kept.extend(batch.ids)
            skipped.extend(batch.skipped)
            bar.update(batch.rows)
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


# ----------------------------------------------------------------------------------------------
# Command line (wired into radgen/cli.py by add_features_parser)
# ----------------------------------------------------------------------------------------------
def add_features_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``radgen features`` on an ``add_subparsers()`` object; returns the parser."""
    p = subparsers.add_parser(
        "features", help="frozen encoder features of a manifest or image folder (cached)",
        description="Encode every image of a manifest (or plain folder) with a frozen encoder and "
                    "write features.safetensors, ids.json, skipped.jsonl and meta.json to --out. "
                    "A matching earlier result in --out is reused.")
    p.add_argument("--encoder", required=True, metavar="SPEC",
                   help="checkpoint file, HF Dinov2 folder, random:<arch>:<img_size>:<seed> or "
                        "random-like:<spec>:<seed>")
    p.add_argument("--data", required=True, metavar="PATH", help="manifest file, folder with a manifest, or image folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output (and cache) folder")
    p.add_argument("--image-size", type=int, default=224, help="preprocessing size (default 224)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: ~2k tokens per batch on CPU, i.e. 1 at "
                        "518 px and 7 at 224 px; 64-256 on GPU)")
    p.add_argument("--pool", choices=POOLS, default="cls", help="token pooling (default cls)")
    p.add_argument("--layers", type=int, nargs="+", metavar="I",
                   help="concatenate these blocks' outputs (e.g. -4 -3 -2 -1); default: final output")
    p.add_argument("--split", help="only rows of this split (train/validate/test)")
    p.add_argument("--workers", type=int, default=None,
                   help="background image loaders, 0 for none (default: none on a CPU of up to "
                        "4 cores, else 1 per 8; on GPU one per core but one, up to 4)")
    p.add_argument("--loader", choices=LOADERS, default="process",
                   help="background loaders are worker processes (default) or threads")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 where the device runs it natively (CUDA with bf16, "
                        "CPU with avx512_bf16/amx_bf16), else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder blocks")
    p.add_argument("--overwrite", action="store_true", help="recompute even if --out holds a matching result")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_features)
    return p


def cmd_features(args) -> int:
    fs = extract_features(args.encoder, args.data, args.out, args.image_size,
                          batch_size=args.batch_size, pool=args.pool, layers=args.layers,
                          split=args.split, progress=not args.quiet, workers=args.workers,
                          loader=args.loader, device=args.device, precision=args.precision,
                          compile=args.compile, overwrite=args.overwrite)
    m = fs.meta
    how = "cached" if fs.cached else f"{m['seconds']:.1f} s, {m['images_per_s']} img/s"
    print(f"features: {len(fs.ids)} x {m['dim']} ({m['pool']}, layers {m['layers'] or 'final'}, "
          f"image {m['image_size']}, {m['precision']}) -> {args.out}  [{how}]")
    if fs.skipped:
        print(f"skipped {len(fs.skipped)} unreadable image(s); see {Path(args.out) / SKIPPED_FILE}",
              file=sys.stderr)
    return 0
