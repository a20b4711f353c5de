"""Rows of the report generator (image + findings + optional indication) and image streaming.

``read_report_rows`` turns a manifest (or a plain folder of X-rays) into :class:`ReportRow`s;
``image_batches`` streams them as preprocessed tensors in their order, with a thread pool loading
the next batch while the current one runs, so a folder of any size never sits in memory at once.
A file that fails to load becomes a failure record (path, error, reason: never patient data)
and the stream goes on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from eval.chexpert import CHEXPERT_14
from radgen.data.images import ImageLoadError, load_image
from radgen.data.manifest import FEATURES, ManifestError, image_folder_dataset, is_image_folder, read_manifest
from radgen.data.stream import StreamBatch, stream_batches

__all__ = ["ReportRow", "read_report_rows", "image_batches", "image_loader", "record_image_path"]


def record_image_path(path: str, root: Path) -> str:
    """The ``image`` of a per-row output record (generated reports, baseline reports): ``path``
    relative to ``root`` (the manifest's or image folder's) when inside it, else as given.
    Lexical: no symlink is followed, so a symlink loop or a broken link still gets its record."""
    p, r = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return str(p.relative_to(r)) if p.is_relative_to(r) else str(path)


@dataclass
class ReportRow:
    id: str
    image: str                     # path of the image the model reads (a study's first image)
    text: str | None = None        # reference findings
    indication: str | None = None
    labels: dict | None = None     # CheXpert-14 labels of the manifest (1 / 0 / -1 / None), if any


def read_report_rows(data: str | os.PathLike, split: str | None = None, text_field: str = "findings",
                     indication_field: str | None = None, require_text: bool = False) -> list[ReportRow]:
    """Rows of a manifest (file or folder holding one) or of a plain image folder.

    For a plain folder the id is the file's path relative to the folder (with its suffix, so
    ``a.png`` and ``a.dcm`` stay apart) and there is no text. ``require_text`` drops rows whose
    ``text_field`` is empty (training needs a target); missing image files are kept, so the
    caller records them like any other unreadable image.
    """
    p = Path(data)
    if is_image_folder(p):
        if split is not None:
            raise ManifestError(p, f"a plain image folder has no splits (split={split!r})")
        ds = image_folder_dataset(p)
        return [ReportRow(id=str(Path(imgs[0]).relative_to(p)), image=imgs[0]) for imgs in ds["images"]]
    extra = [f for f in (text_field, indication_field) if f and f not in FEATURES]
    ds = read_manifest(p, split=split, check_files=False, keep_extra=extra)
    if text_field not in ds.column_names:
        raise ManifestError(p, f"no column {text_field!r} (data.text_field)")
    rows = []
    for r in ds:
        text = r.get(text_field)
        if require_text and not (text and text.strip()):
            continue
        labels = {o: r.get(o) for o in CHEXPERT_14} if any(o in ds.column_names for o in CHEXPERT_14) else None
        rows.append(ReportRow(id=str(r["id"]), image=r["images"][0] if r["images"] else "",
                              text=text, indication=r.get(indication_field) if indication_field else None,
                              labels=labels))
    return rows


def image_loader(preprocess: Callable) -> Callable[[ReportRow], torch.Tensor]:
    """``row -> preprocess(image of row)``: reads the row's image file (raising
    :class:`ImageLoadError` for a missing or unreadable one); ``preprocess`` maps a float (H, W)
    image in [0, 1] to a (3, S, S) tensor."""
    def load(row: ReportRow) -> torch.Tensor:
        if not row.image:
            raise ImageLoadError("<none>", "row has no image")
        img, _ = load_image(row.image)
        return preprocess(img)
    return load


def image_batches(rows: Sequence[ReportRow], load_row: Callable[[ReportRow], torch.Tensor], batch_size: int,
                  workers: int = 2) -> Iterator[StreamBatch]:
    """Batches of the model inputs of ``rows`` in order; the next batch loads while this one is used.
    Each :class:`~radgen.data.stream.StreamBatch` holds the rows that loaded (``items``), their
    stacked inputs (``inputs``, (B, ...)) and ``(row, ImageLoadError record)`` ``failures``.

    ``load_row`` maps a row to its input tensor (:func:`image_loader` for images; the oracle
    control builds its tokens from the row's labels) and raises :class:`ImageLoadError` for one
    that cannot be had. Streamed by :func:`radgen.data.stream.stream_batches` in ``workers``
    threads, at most two batches in flight whatever the number of rows.
    """
    def load(row: ReportRow):
        try:
            return load_row(row), None
        except ImageLoadError as exc:
            return None, exc.record()

    yield from stream_batches(rows, load, batch_size, workers, loader="thread", prefetch=1)
