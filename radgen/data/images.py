"""The one place where files become pixels.

``load_image(path)`` reads PNG, JPEG (8/16-bit, L/RGB/RGBA/P/CMYK, EXIF orientation) and DICOM
(MONOCHROME1/2, modality LUT, VOI LUT / window, compressed transfer syntaxes that pydicom can
decode) and returns a float32 grayscale array in [0, 1] plus an :class:`ImageInfo` record.

Every failure raises a subclass of :class:`ImageLoadError` carrying the file path and a reason, so
batch jobs can skip-and-record a bad file and go on. Nothing derived from DICOM patient identifiers
ever enters an ``ImageInfo`` or an error message.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from encoder.errors import InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageInfo",
    "ImageLoadError",
    "EmptyFileError",
    "NotAnImageError",
    "CorruptImageError",
    "ImageTooLargeError",
    "NoPixelDataError",
    "UnsupportedTransferSyntaxError",
    "MultiFrameError",
    "UnsupportedImageError",
    "UnreadableFileError",
    "load_image",
    "pixel_features",
    "sniff_format",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")

# Default guard against decompression bombs: 16k x 16k is far above any radiograph (a large
# detector is ~4300 x 4300), and the float32 result alone would be 1 GiB.
DEFAULT_MAX_PIXELS = 16384 * 16384


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class ImageLoadError(InputError):
    """A file could not be turned into an image. ``code`` is a stable short name for records."""

    code = "load_error"

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def record(self) -> dict:
        """A JSON-able record for skip-and-record batch jobs."""
        return {"path": self.path, "error": self.code, "reason": self.reason}


class EmptyFileError(ImageLoadError):
    code = "empty_file"


class NotAnImageError(ImageLoadError):
    code = "not_an_image"


class CorruptImageError(ImageLoadError):
    code = "corrupt_image"


class ImageTooLargeError(ImageLoadError):
    code = "too_large"


class NoPixelDataError(ImageLoadError):
    code = "no_pixel_data"


class UnsupportedTransferSyntaxError(ImageLoadError):
    code = "unsupported_transfer_syntax"


class MultiFrameError(ImageLoadError):
    code = "multi_frame"


class UnsupportedImageError(ImageLoadError):
    code = "unsupported_image"


class UnreadableFileError(ImageLoadError):
    """The file system refused the file: no permission, a symlink loop, a broken link, I/O error."""

    code = "unreadable_file"


# ----------------------------------------------------------------------------------------------
# Record of how an image was read
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageInfo:
    """How a file was read. Holds no patient identifiers."""

    path: str
    format: str  # "png" | "jpeg" | "dicom" | other PIL format name, lowercase
    source_mode: str  # PIL mode, or DICOM "MONOCHROME1"/"MONOCHROME2"/"RGB"
    bits: int  # bits per sample as stored
    height: int
    width: int
    intensity: str  # how values were mapped to [0, 1]
    steps: list[str] = field(default_factory=list)  # e.g. ["exif_transpose", "voi_lut", "invert"]
    frame: int | None = None
    n_frames: int = 1
    # Non-identifying acquisition facts (DICOM only): modality, view position, sex, age.
    dicom: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Format sniffing
# ----------------------------------------------------------------------------------------------
def sniff_format(head: bytes) -> str | None:
    """Identify a file from its first bytes (extensions lie: one '.jpg' in the wild is a PNG)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    return None


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    sample = head[:512]
    if b"\x00" in sample:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in sample)
    return printable / len(sample) > 0.95


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def load_image(
    path: str | os.PathLike,
    *,
    frame: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    intensity: Literal["auto", "dtype", "minmax"] = "auto",
) -> tuple[np.ndarray, ImageInfo]:
    """Read a radiograph into a float32 grayscale array in [0, 1], shape (H, W).

    Args:
        path: PNG / JPEG / DICOM (or TIFF / BMP) file. The format is detected from the bytes.
        frame: for multi-frame DICOM, which frame to take. ``None`` (default) makes a multi-frame
            file an error (:class:`MultiFrameError`) rather than silently picking one.
        max_pixels: refuse images with more pixels than this (decompression-bomb guard).
        intensity: how stored values map to [0, 1]. ``"dtype"`` divides by the storage range
            (255 for 8-bit, 65535 for 16-bit), ``"minmax"`` stretches min..max, and ``"auto"``
            uses ``"dtype"`` for 8-bit files and ``"minmax"`` for deeper ones (16-bit PNGs often
            hold 10-12 bit data). DICOM always goes through the modality and VOI LUTs first.

    Returns:
        ``(image, info)``; ``image`` is float32, values in [0, 1], bright = dense (bone white).

    Raises:
        ImageLoadError: a subclass naming the file and the reason.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        if exc.errno == errno.ENOENT and not p.is_symlink():
            raise ImageLoadError(p, "file does not exist") from None
        raise UnreadableFileError(p, _os_reason(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(p, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise UnreadableFileError(p, "not a regular file")
    if st.st_size == 0:
        raise EmptyFileError(p, "file is empty (0 bytes)")
    try:
        with open(p, "rb") as fh:
            head = fh.read(1024)
    except OSError as exc:
        raise UnreadableFileError(p, _os_reason(exc)) from None
    fmt = sniff_format(head)
    headerless = fmt is None and p.suffix.lower() in (".dcm", ".dicom")
    if headerless:
        fmt = "dicom"  # DICOM written without the 128-byte preamble, or not DICOM at all
    if fmt == "dicom":
        return _load_dicom(p, frame=frame, max_pixels=max_pixels, headerless=headerless)
    if fmt is None:
        if _looks_like_text(head):
            raise NotAnImageError(p, "file is text, not an image (wrong extension?)")
        # Let PIL try formats we do not sniff; it raises if it cannot.
    return _load_pil(p, max_pixels=max_pixels, intensity=intensity)


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno == errno.ENOENT:
        return "broken symlink (its target does not exist)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"cannot read the file ({os.strerror(exc.errno) if exc.errno else type(exc).__name__})"


# ----------------------------------------------------------------------------------------------
# PIL path (PNG, JPEG, TIFF, BMP)
# ----------------------------------------------------------------------------------------------
def _check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImageError(path, f"invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            path,
            f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb; raise max_pixels if this is genuine)",
        )


def _to_unit(arr: np.ndarray, bits: int, intensity: str) -> tuple[np.ndarray, str]:
    arr = arr.astype(np.float32, copy=False)
    mode = intensity
    if mode == "auto":
        mode = "dtype" if bits <= 8 else "minmax"
    if mode == "dtype":
        out = arr / float(2**bits - 1)
    elif mode == "minmax":
        lo, hi = float(arr.min()), float(arr.max())
        out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    else:
        raise ValueError(f"unknown intensity mode {intensity!r}")
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False), mode


def _load_pil(path: Path, *, max_pixels: int, intensity: str) -> tuple[np.ndarray, ImageInfo]:
    steps: list[str] = []
    try:
        # PIL's own bomb check warns/raises based on a global; we check ourselves before decode.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            old_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = old_limit
            _check_size(path, im.width, im.height, max_pixels)
            fmt = (im.format or "unknown").lower()
            source_mode = im.mode
            n_frames = getattr(im, "n_frames", 1)
            im.load()  # force full decode here so truncation surfaces as an error
    except ImageLoadError:
        raise
    except UnidentifiedImageError as exc:
        raise NotAnImageError(path, "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(path, f"image data is truncated or corrupt ({exc})") from exc

    if _had_orientation(im):
        steps.append("exif_transpose")
        im = ImageOps.exif_transpose(im)

    bits = 8
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.uint16)
        bits = 16
    elif mode == "I":
        arr = np.asarray(im, dtype=np.int64)
        bits = 16 if arr.max(initial=0) <= 65535 and arr.min(initial=0) >= 0 else 32
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        bits = 32
        intensity = "minmax" if intensity in ("auto", "dtype") else intensity
    elif mode == "1":
        arr = np.asarray(im.convert("L"))
    elif mode == "L":
        arr = np.asarray(im)
    elif mode == "LA":
        arr = np.asarray(im.getchannel("L"))
        steps.append("drop_alpha")
    else:
        # RGB, RGBA, P, PA, CMYK, YCbCr, LAB, HSV ...: go through RGB, drop alpha, then luma.
        if mode in ("RGBA", "PA", "P") and ("A" in mode or "transparency" in im.info):
            steps.append("drop_alpha")
        if mode == "P":
            steps.append("palette")
        if mode == "CMYK":
            steps.append("cmyk")
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
        # ITU-R BT.601 luma, as PIL's "L" conversion, but kept in float.
        arr = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        steps.append("rgb_to_gray")
    image, used = _to_unit(arr, bits, intensity)
    info = ImageInfo(
        path=str(path),
        format=fmt,
        source_mode=source_mode,
        bits=bits,
        height=image.shape[0],
        width=image.shape[1],
        intensity=used,
        steps=steps,
        n_frames=n_frames,
    )
    return image, info


def _had_orientation(im: Image.Image) -> bool:
    try:
        return im.getexif().get(0x0112, 1) not in (1, None)
    except Exception:  # malformed EXIF is not a reason to fail the image
        return False


# ----------------------------------------------------------------------------------------------
# DICOM path
# ----------------------------------------------------------------------------------------------
_SAFE_DICOM_FIELDS = ("Modality", "ViewPosition", "PatientSex", "PatientAge", "BodyPartExamined")


def _load_dicom(path: Path, *, frame: int | None, max_pixels: int, headerless: bool = False
                ) -> tuple[np.ndarray, ImageInfo]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise CorruptImageError(path, f"unreadable DICOM ({type(exc).__name__})") from exc
    if headerless and not any(k in ds for k in ("PixelData", "SOPClassUID", "Modality", "Rows")):
        # No DICM preamble and nothing DICOM-like parsed: random bytes named .dcm
        raise NotAnImageError(path, "not a DICOM file (no DICM header and no DICOM elements)")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NoPixelDataError(path, "DICOM file has no pixel data (e.g. a structured report)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_size(path, cols, rows, max_pixels)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1 and frame is None:
        raise MultiFrameError(
            path, f"DICOM has {n_frames} frames; pass frame=<index> to choose one"
        )
    if frame is not None and not 0 <= frame < n_frames:
        raise MultiFrameError(path, f"frame {frame} out of range (file has {n_frames} frames)")

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(ts, "name", str(ts)) if ts is not None else "implicit (no file meta)"
    if ts is None:
        # Files without meta: assume implicit little endian, which force=True reading used.
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    missing = _missing_decoder(ts)
    if missing:
        raise UnsupportedTransferSyntaxError(path, f"cannot decode transfer syntax {ts_name}: {missing}")
    try:
        arr = ds.pixel_array[frame] if n_frames > 1 else ds.pixel_array
    except Exception as exc:  # pydicom raises many types for damaged pixel data
        raise CorruptImageError(path, f"pixel data could not be decoded ({type(exc).__name__})") from exc

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    steps: list[str] = []
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"):
        if photometric.startswith("YBR") and arr.ndim == 3:
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
            steps.append("ybr_to_rgb")
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
            steps.append("palette")
        arr = arr.astype(np.float32)
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        steps.append("rgb_to_gray")
        image, _ = _to_unit(arr, bits, "minmax")
    elif photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise UnsupportedImageError(path, f"unexpected pixel array shape {arr.shape}")
        values = apply_modality_lut(arr, ds).astype(np.float64)
        if "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds:
            steps.append("modality_lut")
        has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
        if has_voi:
            values = apply_voi_lut(values, ds, index=0).astype(np.float64)
            steps.append("voi_lut")
        lo, hi = float(values.min()), float(values.max())
        image = ((values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)).astype(np.float32)
        if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
            image = 1.0 - image
            steps.append("invert_monochrome1")
    else:
        raise UnsupportedImageError(path, f"unsupported photometric interpretation {photometric}")

    safe = {k: str(ds.get(k)) for k in _SAFE_DICOM_FIELDS if ds.get(k) not in (None, "")}
    if "PatientAge" in safe:
        safe["PatientAge"] = _safe_age(safe["PatientAge"])
    safe["TransferSyntax"] = ts_name
    info = ImageInfo(
        path=str(path),
        format="dicom",
        source_mode=photometric,
        bits=bits,
        height=image.shape[0],
        width=image.shape[1],
        intensity="voi_minmax" if "voi_lut" in steps else "minmax",
        steps=steps,
        frame=frame if n_frames > 1 else None,
        n_frames=n_frames,
        dicom=safe,
    )
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False), info


def _missing_decoder(ts) -> str | None:
    """Why pixel data in transfer syntax ``ts`` cannot be decoded here, or None if it can."""
    if ts is None or not getattr(ts, "is_compressed", False):
        return None
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return "pydicom has no decoder for it"
    if not decoder.is_available:
        return "no decoder plugin installed (" + "; ".join(decoder.missing_dependencies) + ")"
    return None


def _safe_age(age: str) -> str:
    """Ages above 89 are identifying under HIPAA Safe Harbor: report them as '90+'."""
    digits = "".join(ch for ch in age if ch.isdigit())
    unit = age[-1:].upper() if age[-1:].isalpha() else "Y"
    if digits and unit == "Y" and int(digits) > 89:
        return "90+"
    return age


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8 (for writing PNGs and previews)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def pixel_features(paths: list[str], size: int = 32, progress: bool = False) -> np.ndarray:
    """(N, size*size) float32: each image loaded (:func:`load_image`), box-downsampled to
    size x size, flattened: the raw-pixel baseline's features."""
    from tqdm import tqdm

    out = np.empty((len(paths), size * size), np.float32)
    for i, p in enumerate(tqdm(paths, desc="pixels", disable=not progress)):
        img, _ = load_image(p)
        small = Image.fromarray(img).resize((size, size), Image.BOX)
        out[i] = np.asarray(small, np.float32).ravel()
    return out
