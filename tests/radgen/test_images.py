"""load_image on the real files in ../shared/data and on every kind of bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from radgen.data.images import (
    CorruptImageError,
    EmptyFileError,
    ImageLoadError,
    ImageTooLargeError,
    MultiFrameError,
    NoPixelDataError,
    NotAnImageError,
    UnsupportedTransferSyntaxError,
    load_image,
)


# ---------------------------------------------------------------------------------------------
# Real files
# ---------------------------------------------------------------------------------------------
def test_every_shared_radiograph_loads(shared_data: Path):
    files = sorted((shared_data / "cxr" / "images").iterdir())
    assert len(files) == 103
    formats = set()
    for f in files:
        img, info = load_image(f)
        assert img.dtype == np.float32 and img.ndim == 2
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert img.std() > 0.03, f"{f.name} decoded to a nearly flat image"
        assert (info.height, info.width) == img.shape
        formats.add(info.format)
    assert {"png", "jpeg"} <= formats


def test_extension_that_lies_is_sniffed(shared_data: Path, tmp_path: Path):
    """Formats are detected from the bytes: a PNG saved as '.jpg' loads as a PNG."""
    src = shared_data / "cxr" / "images" / "00000001_000.png"
    liar = tmp_path / "really_a_png.jpg"
    liar.write_bytes(src.read_bytes())
    img, info = load_image(liar)
    ref, _ = load_image(src)
    assert info.format == "png" and np.array_equal(img, ref)


def test_grayscale_png_matches_pil_statistics(shared_data: Path):
    f = shared_data / "cxr" / "images" / "00000001_000.png"
    img, info = load_image(f)
    ref = np.asarray(Image.open(f).convert("L"), dtype=np.float64) / 255.0
    assert img.shape == ref.shape
    assert abs(img.mean() - ref.mean()) < 1e-6 and abs(img.std() - ref.std()) < 1e-6
    assert info.intensity == "dtype" and info.bits == 8


def test_rgb_jpeg_converted_with_bt601_luma(shared_data: Path):
    rgb_files = [f for f in sorted((shared_data / "cxr" / "images").glob("*.jpg"))
                 if Image.open(f).mode == "RGB"]
    assert rgb_files
    img, info = load_image(rgb_files[0])
    rgb = np.asarray(Image.open(rgb_files[0]).convert("RGB"), dtype=np.float64) / 255
    ref = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.abs(img - ref).max() < 1e-5
    assert "rgb_to_gray" in info.steps


def test_dicom_mono1_is_inverted_relative_to_mono2(shared_data: Path):
    """The two shared files store byte-identical pixel values; only the declared photometric
    interpretation differs. MONOCHROME1 means 'low = white', so it must load as the negative."""
    d = shared_data / "dicom"
    m1, i1 = load_image(d / "cr_mono1_jpeg_baseline.dcm")
    m2, i2 = load_image(d / "cr_mono2_jpeg_baseline.dcm")
    raw1 = pydicom.dcmread(d / "cr_mono1_jpeg_baseline.dcm").pixel_array
    raw2 = pydicom.dcmread(d / "cr_mono2_jpeg_baseline.dcm").pixel_array
    assert np.array_equal(raw1, raw2)
    assert np.abs(m1 - (1.0 - m2)).max() < 1e-3
    assert "invert_monochrome1" in i1.steps and "invert_monochrome1" not in i2.steps
    assert i1.dicom["TransferSyntax"].startswith("JPEG Baseline")
    assert m2.shape == (1024, 1024)
    # Independent reference: min-max of the raw MONOCHROME2 values.
    ref = (raw2 - raw2.min()) / (raw2.max() - raw2.min())
    assert np.abs(m2 - ref).max() < 1e-6


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_mono1_with_inverted_values_equals_mono2(shared_data: Path, tmp_path: Path):
    """A MONOCHROME1 file whose stored values are the inverse of a MONOCHROME2 file's loads to
    the same image (the equivalence a scanner exporting either convention must give)."""
    raw = pydicom.dcmread(shared_data / "dicom" / "cr_mono2_jpeg_baseline.dcm").pixel_array.astype(np.int64)
    scaled = raw * 16  # into 12 bits
    m2 = _write_dicom(tmp_path / "m2.dcm", scaled, "MONOCHROME2")
    m1 = _write_dicom(tmp_path / "m1.dcm", 4095 - scaled, "MONOCHROME1")
    a, _ = load_image(m1)
    b, _ = load_image(m2)
    assert np.abs(a - b).max() < 1e-3
    c, _ = load_image(shared_data / "dicom" / "cr_mono2_jpeg_baseline.dcm")
    assert np.abs(b - c).max() < 1e-3


def test_dx_dicom_loads_with_safe_metadata_only(shared_data: Path):
    f = shared_data / "dicom" / "dx_mono2_nih.dcm"
    img, info = load_image(f)
    assert img.shape == (1024, 1024) and 0.1 < img.std() < 0.4
    ds = pydicom.dcmread(f)
    assert info.dicom.get("PatientSex") == "M" and info.dicom.get("Modality") == "DX"
    text = str(info.to_dict())
    for tag in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate"):
        val = str(ds.get(tag, "") or "")
        if len(val) > 2:
            assert val not in text, f"{tag} leaked into ImageInfo"


def test_window_and_rescale_are_applied(tmp_path: Path):
    pixels = np.tile(np.arange(0, 4000, 40, dtype=np.int64), (20, 1))
    f = _write_dicom(tmp_path / "w.dcm", pixels, RescaleSlope=2, RescaleIntercept=-1000,
                     WindowCenter=1000, WindowWidth=2000)
    img, info = load_image(f)
    assert info.steps[:2] == ["modality_lut", "voi_lut"]
    hu = pixels * 2 - 1000
    # Linear window [0, 2000]: below 0 black, above 2000 white.
    assert np.all(img[hu <= 0] < 0.01) and np.all(img[hu >= 2000] > 0.99)
    mid = (hu > 200) & (hu < 1800)
    assert np.all(np.diff(img[0][mid[0]]) > 0)


def test_patient_identifiers_never_in_errors_or_info(tmp_path: Path):
    f = _write_dicom(tmp_path / "p.dcm", np.zeros((4, 4)), PatientName="Doe^Jane",
                     PatientID="MRN99887766", PatientBirthDate="19400101", PatientAge="093Y")
    _, info = load_image(f)
    text = str(info.to_dict())
    assert "Doe" not in text and "MRN99887766" not in text and "19400101" not in text
    assert info.dicom["PatientAge"] == "90+"  # ages above 89 are identifying
    ds = pydicom.dcmread(f)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(NoPixelDataError) as err:
        load_image(tmp_path / "nopix.dcm")
    assert "Doe" not in str(err.value) and "MRN99887766" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Synthetic variants of the PIL path
# ---------------------------------------------------------------------------------------------
def test_16bit_png_uses_full_depth(tmp_path: Path):
    arr = (np.linspace(0, 4095, 64 * 64).reshape(64, 64)).astype(np.uint16)  # 12-bit in 16
    Image.fromarray(arr).save(tmp_path / "a.png")
    img, info = load_image(tmp_path / "a.png")
    assert info.bits == 16 and info.intensity == "minmax"
    assert abs(img.min()) < 1e-6 and abs(img.max() - 1) < 1e-6
    img2, _ = load_image(tmp_path / "a.png", intensity="dtype")
    assert abs(img2.max() - 4095 / 65535) < 1e-6


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "LA"])
def test_colour_modes(tmp_path: Path, mode: str):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    base = Image.fromarray(gray).convert("RGB")
    im = base.quantize(256) if mode == "P" else base.convert(mode)  # adaptive palette keeps grays
    ext = "jpg" if mode == "CMYK" else "png"
    im.save(tmp_path / f"x.{ext}", quality=100) if ext == "jpg" else im.save(tmp_path / f"x.{ext}")
    img, info = load_image(tmp_path / f"x.{ext}")
    assert info.source_mode == mode
    tol = 0.03 if ext == "jpg" else 0.01
    assert np.abs(img - gray / 255.0).mean() < tol


def test_exif_orientation_applied(tmp_path: Path):
    arr = np.zeros((40, 80), np.uint8)
    arr[:, :10] = 255  # bright band on the left
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    img, info = load_image(tmp_path / "o.jpg")
    assert img.shape == (80, 40) and "exif_transpose" in info.steps
    assert img[:10].mean() > 0.8  # the left band is now on top


# ---------------------------------------------------------------------------------------------
# Bad input: each case raises its own typed error naming the file
# ---------------------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\0" * 1000)  # far too little data: the header alone must be refused
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_inputs(tmp_path: Path, shared_data: Path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("Patient reported chest pain.\n" * 5)
    good = (shared_data / "cxr" / "images" / "00000001_000.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 3])
    (tmp_path / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    (tmp_path / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x13\x37" * 50)
    cases = {
        "empty.png": EmptyFileError,
        "notes.jpg": NotAnImageError,
        "trunc.png": CorruptImageError,
        "bomb.png": ImageTooLargeError,
        "garbage.dcm": ImageLoadError,
    }
    for name, err in cases.items():
        with pytest.raises(err) as info:
            load_image(tmp_path / name)
        assert name in str(info.value) and info.value.reason
        rec = info.value.record()
        assert rec["path"].endswith(name) and rec["error"] == info.value.code
    with pytest.raises(ImageLoadError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_max_pixels_option(shared_data: Path):
    with pytest.raises(ImageTooLargeError):
        load_image(shared_data / "dicom" / "dx_mono2_nih.dcm", max_pixels=1000)


def test_unsupported_transfer_syntax(tmp_path: Path):
    f = _write_dicom(tmp_path / "ls.dcm", np.zeros((8, 8)))
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\0" * 32])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "ls2.dcm", enforce_file_format=True)
    with pytest.raises(UnsupportedTransferSyntaxError, match="JPEG-LS"):
        load_image(tmp_path / "ls2.dcm")


def test_multiframe(tmp_path: Path):
    frames = np.stack([np.full((6, 6), v) for v in (0, 1000, 4000)])
    frames[:, 0, 0] = 0
    frames[:, -1, -1] = 4095
    f = _write_dicom(tmp_path / "mf.dcm", frames)
    with pytest.raises(MultiFrameError, match="3 frames"):
        load_image(f)
    img, info = load_image(f, frame=2)
    assert info.frame == 2 and info.n_frames == 3
    assert abs(img[2, 2] - 4000 / 4095) < 1e-3
    with pytest.raises(MultiFrameError, match="out of range"):
        load_image(f, frame=3)
