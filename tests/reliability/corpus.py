"""The bad-input corpus, built by the tests (no binary blobs in the repository), and the helpers
that run a real ``radgen`` process on it.

Image cases (:func:`build_image_corpus`): zero-byte, truncated PNG and JPEG, random bytes named
``.png`` and ``.dcm``, text named ``.jpg``, DICOM without pixel data, DICOM in a transfer syntax
nothing here decodes (JPEG-LS, no plugin installed), a PNG declaring 60,000 x 60,000 pixels,
a symlink loop, a named pipe, a symlinked folder pointing at itself, an unreadable file (mode 000) -- all
skipped and recorded -- and a CMYK JPEG and a 16-bit PNG, which load. The good images are DICOMs
carrying fake patient identifiers (:data:`IDENTIFIERS`), so the same runs also check that none
of them is ever written anywhere.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

# A pretraining run of a few seconds: a 2-block ViT at 56 px; each test adds its schedule.
TINY_PRETRAIN = [
    "model.arch=vit_tiny", "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "model.img_size=56",
    "ssl.out_dim=64", "ssl.hidden_dim=64", "ssl.bottleneck_dim=32", "crops.global_size=56",
    "crops.local_size=28", "crops.n_local=2", "optim.batch_size=4", "optim.warmup_epochs=0",
    "optim.freeze_last_layer_epochs=0", "teacher.warmup_temp_epochs=0", "data.image_size=64",
    "data.num_workers=0", "train.progress=false", "train.log_every=1", "train.precision=fp32",
]

# Fake identifiers (made-up strings that occur nowhere else) and the fragments searched for.
IDENTIFIERS = {
    "PatientName": "Zyxwvu^Qutrebnik",
    "PatientID": "PID84712093",
    "PatientBirthDate": "19310517",
    "AccessionNumber": "ACC55190274",
    "InstitutionName": "Vlorimont General Infirmary",
    "ReferringPhysicianName": "Draxby^Kelvorn",
}
SEARCH = ["Zyxwvu", "Qutrebnik", "84712093", "19310517", "55190274", "Vlorimont", "Draxby", "Kelvorn"]


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG (IHDR, one tiny IDAT, IEND) declaring ``width x height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
            + chunk(b"IEND", b""))


def _dicom_base(pixels: np.ndarray | None, transfer_syntax=None):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def dicom_without_pixels(path: Path) -> None:
    _dicom_base(None).save_as(path, enforce_file_format=True)


def dicom_undecodable(path: Path) -> None:
    """A DICOM declaring JPEG-LS pixel data (no JPEG-LS decoder plugin is installed here)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    ds = _dicom_base(np.zeros((8, 8)), JPEGLSLossless)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def dicom_with_identifiers(path: Path, image: np.ndarray) -> None:
    """A MONOCHROME2 12-bit DICOM of ``image`` ((H, W) in [0, 1]) carrying :data:`IDENTIFIERS`."""
    ds = _dicom_base(np.round(np.clip(image, 0, 1) * 4095))
    for key, value in IDENTIFIERS.items():
        setattr(ds, key, value)
    ds.PatientSex, ds.PatientAge, ds.ViewPosition = "F", "067Y", "PA"
    ds.save_as(path, enforce_file_format=True)


def _encoded(image: np.ndarray, fmt: str, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    im.convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def gray16_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str           # what the case is
    files: list[str]    # names under the corpus folder that belong to it
    expect: str         # "loaded" or "skipped:<error code>"


def can_make_unreadable() -> bool:
    """Whether a mode-000 file is really unreadable for the job processes (see :func:`job_prefix`)."""
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


def build_image_corpus(folder: Path, image: np.ndarray) -> list[Case]:
    """Every image case in ``folder`` (made here), for one good ``image`` ((H, W) in [0, 1])."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    png, jpg = _encoded(image, "PNG"), _encoded(image, "JPEG")
    files = {
        "zero-byte file": ("empty.png", b"", "skipped:empty_file"),
        "truncated PNG": ("truncated.png", png[: len(png) // 2], "skipped:corrupt_image"),
        "truncated JPEG": ("truncated.jpg", jpg[: len(jpg) // 2], "skipped:corrupt_image"),
        "random bytes named .png": ("random.png", rng.bytes(3000), "skipped:not_an_image"),
        "random bytes named .dcm": ("random.dcm", rng.bytes(3000), "skipped:not_an_image"),
        "text named .jpg": ("text.jpg", b"this is not an image\n" * 4, "skipped:not_an_image"),
        "PNG declaring 60000x60000": ("huge.png", png_declaring(60000, 60000), "skipped:too_large"),
        "CMYK JPEG": ("cmyk.jpg", _encoded(image, "JPEG", "CMYK"), "loaded"),
        "16-bit PNG": ("gray16.png", gray16_png(image), "loaded"),
    }
    cases = []
    for name, (fname, data, expect) in files.items():
        (folder / fname).write_bytes(data)
        cases.append(Case(name, [fname], expect))
    dicom_without_pixels(folder / "nopixels.dcm")
    cases.append(Case("DICOM without pixel data", ["nopixels.dcm"], "skipped:no_pixel_data"))
    dicom_undecodable(folder / "jpeg2000.dcm")
    cases.append(Case("DICOM in an undecodable transfer syntax", ["jpeg2000.dcm"],
                      "skipped:unsupported_transfer_syntax"))
    os.symlink("loop_b.png", folder / "loop_a.png")
    os.symlink("loop_a.png", folder / "loop_b.png")
    cases.append(Case("symlink loop (a -> b -> a)", ["loop_a.png", "loop_b.png"], "skipped:unreadable_file"))
    os.mkfifo(folder / "fifo.png")  # opening it would block forever
    cases.append(Case("named pipe (FIFO) named .png", ["fifo.png"], "skipped:unreadable_file"))
    os.symlink(".", folder / "cycle")  # a folder linking to itself: the scan must not enter it
    cases.append(Case("folder symlink to itself", ["cycle"], "not listed"))
    if can_make_unreadable():
        (folder / "unreadable.png").write_bytes(png)
        os.chmod(folder / "unreadable.png", 0)
        cases.append(Case("unreadable file (mode 000)", ["unreadable.png"], "skipped:unreadable_file"))
    return cases


def bad_files_for_kill(folder: Path, good_png: bytes) -> list[str]:
    """20 files no loader can read, of 7 kinds (the generate kill test); returns their names."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(3):
        for name, data in ((f"empty_{k}.png", b""), (f"random_{k}.png", rng.bytes(2048)),
                           (f"random_{k}.dcm", rng.bytes(4096)), (f"truncated_{k}.png", good_png[: 40 + 200 * k]),
                           (f"text_{k}.jpg", b"not an image\n" * (k + 1)), (f"huge_{k}.png", png_declaring(60000, 60000))):
            (folder / name).write_bytes(data)
            names.append(name)
    for k in range(2):
        dicom_without_pixels(folder / f"nopixels_{k}.dcm")
        names.append(f"nopixels_{k}.dcm")
    assert len(names) == 20
    return names


# ----------------------------------------------------------------------------------------------
# Running jobs
# ----------------------------------------------------------------------------------------------
def job_prefix() -> list[str]:
    """Root reads a mode-000 file anyway; drop the capabilities that let it, so the unreadable
    case is real. Other users need nothing."""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        drop = "-dac_override,-dac_read_search"
        return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"]
    return []


def radgen(*args: str, env: dict | None = None, timeout: float = 600, check_rc: tuple[int, ...] | None = None):
    """Run ``python -m radgen ARGS`` from the repository root; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([*job_prefix(), sys.executable, "-m", "radgen", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode in check_rc, (f"radgen {args[0]} exited {proc.returncode}:\n"
                                             f"{proc.stderr[-3000:]}")
    return proc


def has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text


def search_identifiers(roots: list[Path], texts: dict[str, str] = {}) -> tuple[int, list[str]]:
    """Search every file under ``roots`` (bytes, case-insensitive) and each captured text for
    the :data:`SEARCH` fragments; returns (files searched, ["file: fragment", ...])."""
    needles = [s.lower().encode() for s in SEARCH]
    found, n = [], 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if path.is_symlink() or not path.is_file():
                    continue
                n += 1
                data = path.read_bytes().lower()
                found += [f"{path}: {s.decode()}" for s in needles if s in data]
    for label, text in texts.items():
        n += 1
        low = text.lower()
        found += [f"{label}: {s}" for s in SEARCH if s.lower() in low]
    return n, found
