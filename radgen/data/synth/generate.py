"""``radgen synth``: write a synthetic chest X-ray data set (images, masks, reports, manifest).

Image ``i`` of a set depends only on ``(seed, i)``, so output is identical for any number of
worker processes, and the split is a seeded permutation with exact proportions.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from encoder.io import atomic_write_bytes, atomic_write_text
from eval.chexpert.observations import CHEXPERT_14
from radgen.config import ConfigError, save_config
from radgen.data.images import image_to_uint8
from radgen.data.synth.case import sample_case
from radgen.data.synth.phantom import render
from radgen.data.synth.report import write_report

__all__ = ["SynthSummary", "generate_dataset", "make_example", "sample_example_case", "validate_synth_config"]

SPLIT_NAMES = ("train", "validate", "test")


@dataclass
class SynthSummary:
    out: Path
    n: int
    seconds: float
    split_counts: dict
    label_counts: dict  # observation -> {"pos": int, "unc": int, "neg": int, "blank": int}
    female: int
    age_mean: float

    @property
    def images_per_second(self) -> float:
        return self.n / max(self.seconds, 1e-9)

    def format(self) -> str:
        lines = [
            f"synthetic set: {self.n} images in {self.out}",
            f"  time {self.seconds:.1f} s  ->  {self.images_per_second:.1f} images/s",
            "  splits: " + ", ".join(f"{k} {v}" for k, v in self.split_counts.items()),
            f"  sex: {self.female} F / {self.n - self.female} M   mean age {self.age_mean:.1f}",
            f"  {'observation':28s} {'pos':>5s} {'unc':>5s} {'neg':>5s} {'blank':>6s}  prevalence",
        ]
        for k, c in self.label_counts.items():
            prev = (c["pos"] + c["unc"]) / max(self.n, 1)
            lines.append(f"  {k:28s} {c['pos']:5d} {c['unc']:5d} {c['neg']:5d} {c['blank']:6d}  {prev:6.1%}")
        return "\n".join(lines)


def validate_synth_config(cfg: DictConfig) -> None:
    """Fail fast, before any image is drawn."""
    if not cfg.out:
        raise ConfigError("synth: 'out' (output folder) is required")
    if not isinstance(cfg.n, int) or cfg.n < 1:
        raise ConfigError(f"synth: n must be a positive integer, got {cfg.n!r}")
    if not isinstance(cfg.size, int) or not 32 <= cfg.size <= 4096:
        raise ConfigError(f"synth: size must be an integer in [32, 4096], got {cfg.size!r}")
    if cfg.format not in ("png", "dicom"):
        raise ConfigError(f"synth: format must be 'png' or 'dicom', got {cfg.format!r}")
    if not isinstance(cfg.workers, int) or cfg.workers < 1:
        raise ConfigError(f"synth: workers must be >= 1, got {cfg.workers!r}")
    fr = [float(cfg.splits[k]) for k in SPLIT_NAMES]
    if any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(f"synth: split fractions must be >= 0 and sum to 1, got {fr}")
    if cfg.prevalence_scale < 0:
        raise ConfigError("synth: prevalence_scale must be >= 0")


def sample_example_case(seed: int, index: int, prevalence_scale: float = 1.0):
    """The ``Case`` of example ``index`` of the set with ``seed``, and the generator it was drawn
    from (its report is drawn next, from the same generator): ``(case, rng)``. The one place an
    example's randomness is seeded, so an analysis can redraw a set's cases without rendering."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    return sample_case(rng, prevalence_scale=prevalence_scale, seed=seed), rng


def make_example(seed: int, index: int, size: int, prevalence_scale: float = 1.0):
    """Draw example ``index`` of the set with ``seed``: ``(case, rendered, findings, impression, labels)``."""
    case, rng = sample_example_case(seed, index, prevalence_scale)
    rendered = render(case, size)
    findings, impression, labels = write_report(case, rng)
    return case, rendered, findings, impression, labels


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _dicom_bytes(image: np.ndarray, case, uid_seed: str) -> bytes:
    """A 12-bit MONOCHROME2 DX object with only non-identifying attributes."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = case.view
    ds.PatientSex = case.sex
    ds.PatientAge = f"{case.age:03d}Y"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.round(np.clip(image, 0, 1) * 4095).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _work(args) -> dict:
    seed, index, size, fmt, prevalence, out = args
    case, rendered, findings, impression, labels = make_example(seed, index, size, prevalence)
    ident = f"synth_{index:06d}"
    out = Path(out)
    if fmt == "png":
        rel = f"images/{ident}.png"
        atomic_write_bytes(out / rel, _png_bytes(image_to_uint8(rendered.image)))
    else:
        rel = f"images/{ident}.dcm"
        atomic_write_bytes(out / rel, _dicom_bytes(rendered.image, case, f"{seed}-{index}"))
    mask_rel = f"masks/{ident}.png"
    atomic_write_bytes(out / mask_rel, _png_bytes(rendered.mask))
    row = {
        "id": ident,
        "image": rel,
        "study_id": ident,
        "subject_id": f"p{index:06d}",
        "findings": findings,
        "impression": impression,
        "sex": case.sex,
        "age": case.age,
        "view": case.view,
        "mask": mask_rel,
        "ctr": round(case.ctr, 4),
        "mediastinal_ratio": round(case.mediastinal_ratio, 4),
        "setting": case.setting,
        "drawn": json.dumps([{k: v for k, v in f.__dict__.items() if v not in (None, {}, False)}
                             for f in case.findings]),
    }
    row.update(labels)
    return row


def _split_of(n: int, seed: int, fractions: list[float]) -> list[str]:
    perm = np.random.default_rng(np.random.SeedSequence([seed, 2**31 - 1])).permutation(n)
    counts = np.floor(np.array(fractions) * n).astype(int)
    counts[0] += n - counts.sum()  # remainder to train
    split = np.empty(n, dtype=object)
    start = 0
    for name, cnt in zip(SPLIT_NAMES, counts):
        split[perm[start:start + cnt]] = name
        start += cnt
    return list(split)


def generate_dataset(cfg: DictConfig, progress: bool = True) -> SynthSummary:
    """Write the set described by a resolved ``synth`` config; return its summary."""
    validate_synth_config(cfg)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"synth: output folder {out} is not empty (pass overwrite=true to replace)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    jobs = [(int(cfg.seed), i, int(cfg.size), str(cfg.format), float(cfg.prevalence_scale), str(out))
            for i in range(cfg.n)]
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.n, desc="synth", unit="img", disable=not progress)
    rows: list[dict] = []
    if cfg.workers > 1 and cfg.n > 8:
        ctx = mp.get_context("fork")
        with ctx.Pool(cfg.workers) as pool:
            for row in pool.imap(_work, jobs, chunksize=4):
                rows.append(row)
                bar.update()
    else:
        for j in jobs:
            rows.append(_work(j))
            bar.update()
    bar.close()
    splits = _split_of(cfg.n, int(cfg.seed), [float(cfg.splits[k]) for k in SPLIT_NAMES])
    for row, sp in zip(rows, splits):
        row["split"] = sp
    seconds = time.perf_counter() - t0
    _write_manifests(out, rows)
    summary = _summarise(out, rows, seconds)
    atomic_write_text(out / "summary.json", json.dumps({
        "n": summary.n, "seconds": round(seconds, 3),
        "images_per_second": round(summary.images_per_second, 2),
        "splits": summary.split_counts, "labels": summary.label_counts,
        "female": summary.female, "age_mean": round(summary.age_mean, 2),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }, indent=2))
    return summary


MANIFEST_COLUMNS = ["id", "image", "study_id", "subject_id", "split", "findings", "impression",
                    "sex", "age", "view", *CHEXPERT_14, "mask", "ctr", "mediastinal_ratio",
                    "setting", "drawn"]


def _write_manifests(out: Path, rows: list[dict]) -> None:
    import csv

    atomic_write_text(out / "manifest.jsonl",
                      "".join(json.dumps({k: r[k] for k in MANIFEST_COLUMNS}) + "\n" for r in rows))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in MANIFEST_COLUMNS})
    atomic_write_text(out / "manifest.csv", buf.getvalue())


def _summarise(out: Path, rows: list[dict], seconds: float) -> SynthSummary:
    label_counts = {}
    for k in CHEXPERT_14:
        vals = [r[k] for r in rows]
        label_counts[k] = {"pos": vals.count(1), "unc": vals.count(-1), "neg": vals.count(0),
                           "blank": sum(v is None for v in vals)}
    split_counts = {s: sum(r["split"] == s for r in rows) for s in SPLIT_NAMES}
    return SynthSummary(out=out, n=len(rows), seconds=seconds, split_counts=split_counts,
                        label_counts=label_counts, female=sum(r["sex"] == "F" for r in rows),
                        age_mean=float(np.mean([r["age"] for r in rows])))
