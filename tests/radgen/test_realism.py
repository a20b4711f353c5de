"""Realism statistics of phantoms vs films: spectra, flat gradients, the AUROC and the synth-check job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radgen.data.synth.realism import (FAMILIES, image_statistics, normalise, realism_auroc,
                                       realism_report, side_by_side_grid)
from radgen.data.synth.check import grid_phantoms, run_synth_check

REAL_DIR = Path("../shared/data/cxr/images")


def noise_field(rng: np.random.Generator, beta: float, n: int = 256) -> np.ndarray:
    """White noise filtered in Fourier space to power ~ 1/f^beta, scaled to [0, 1]."""
    k = np.fft.fftfreq(n) * n
    r = np.hypot(k[:, None], k[None, :])
    r[0, 0] = 1.0
    f = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) / r ** (beta / 2)))
    return (f - f.min()) / (f.max() - f.min())


def drawing(rng: np.random.Generator, n: int = 256) -> np.ndarray:
    """A few filled ellipses of constant grey on a flat background."""
    yy, xx = np.mgrid[:n, :n] / n
    img = np.full((n, n), rng.uniform(0.0, 0.3))
    for _ in range(rng.integers(3, 7)):
        cy, cx, ry, rx = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)
        img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = rng.uniform(0.3, 1.0)
    return img


def test_normalise_resizes_and_stretches_percentiles():
    img = np.linspace(0.2, 0.6, 300 * 200, dtype=np.float32).reshape(300, 200)
    x = normalise(img, 64)
    assert x.shape == (64, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.isclose(np.percentile(x, 50), 0.5, atol=0.02)
    assert (normalise(np.full((40, 40), 0.3), 32) == 0).all()  # constant: no division by zero


def test_spectrum_slope_of_white_and_brown_noise():
    rng = np.random.default_rng(0)
    white = [image_statistics(rng.uniform(size=(256, 256)))["spectrum_slope"] for _ in range(3)]
    brown = [image_statistics(noise_field(rng, 2.0))["spectrum_slope"] for _ in range(3)]
    steep = image_statistics(noise_field(rng, 3.0))["spectrum_slope"]
    assert all(abs(s) < 0.5 for s in white), white
    assert all(abs(s + 2.0) < 0.4 for s in brown), brown
    assert abs(steep + 3.0) < 0.5 and steep < min(brown)


def test_statistics_families_and_flat_gradients_of_drawings():
    rng = np.random.default_rng(1)
    s_draw, s_noise = image_statistics(drawing(rng)), image_statistics(noise_field(rng, 2.0))
    assert set(s_draw) == set(s_noise) and {k.split("_")[0] for k in s_draw} == set(FAMILIES)
    assert np.isclose(sum(v for k, v in s_draw.items() if k.startswith("hist_bin")), 1.0)
    assert all(np.isfinite(v) for v in s_draw.values())
    assert s_draw["grad_flat"] > 0.8 and s_noise["grad_flat"] < 0.05
    assert s_draw["grad_q50"] == 0.0 < s_noise["grad_q10"]
    assert s_draw["contrast_b8_q50"] < 0.01 < s_noise["contrast_b8_q50"]


def test_realism_auroc_same_distribution_is_near_chance():
    rng = np.random.default_rng(2)
    stats = [image_statistics(noise_field(rng, rng.uniform(1.5, 2.5)), size=128) for _ in range(120)]
    x = np.array([list(s.values()) for s in stats])
    point, low, high = realism_auroc(x[:60], x[60:], n_resamples=200)
    assert low <= point <= high
    assert low <= 0.5 <= high or point < 0.7, (point, low, high)


def test_realism_separates_drawings_from_textures():
    rng = np.random.default_rng(3)
    textures = [noise_field(rng, rng.uniform(1.5, 2.5), 128) for _ in range(24)]
    drawings = [drawing(rng, 128) for _ in range(24)]
    report = realism_report(textures, drawings, n_resamples=200)
    assert report.auroc[0] > 0.95 and report.family_auroc["grad"][0] > 0.95
    assert set(report.family_auroc) == set(FAMILIES)
    flat = report.means["grad"]["grad_flat"]
    assert flat["phantom"] > 0.8 > 0.05 > flat["real"]
    text = report.format()
    assert "| all statistics |" in text and "| contrast |" in text and "flat-gradient fraction" in text
    assert json.loads(json.dumps(report.to_dict()))["n_phantom"] == 24


def test_side_by_side_grid_layout():
    rng = np.random.default_rng(4)
    grid = side_by_side_grid([drawing(rng, 64) for _ in range(3)], [noise_field(rng, 2.0, 96) for _ in range(10)],
                             size=32, cols=4)
    assert grid.dtype == np.uint8 and grid.shape == (4 * 34 + 2, 4 * 34 + 2)  # 1 phantom row + 3 real rows
    assert (grid[:2] == 0).all() and (grid[:, 34:36] == 0).all()  # dark gaps
    assert grid[2:34, 2:34].max() == 255 and (grid[2:34, 3 * 34 + 2:] == 0).all()  # 4th phantom cell empty


def test_grid_phantoms_half_with_findings():
    no_finding = [1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1]
    idx = grid_phantoms(no_finding)
    assert len(idx) == 8 == len(set(idx))
    assert sum(no_finding[i] != 1 for i in idx) == 4
    one_normal = [0, 0, 0, 1] + [0] * 10
    assert sum(one_normal[i] != 1 for i in grid_phantoms(one_normal)) == 7


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory) -> tuple[Path, Path]:
    if not REAL_DIR.is_dir():
        pytest.skip(f"real radiographs not found at {REAL_DIR.resolve()} (run the tests from the repo root)")
    from radgen.config import load_config
    from radgen.data.synth.generate import generate_dataset

    tmp = tmp_path_factory.mktemp("realism")
    synth = tmp / "synth"
    generate_dataset(load_config("synth", overrides=[f"out={synth}", "n=16", "size=64", "workers=1"]), progress=False)
    real = tmp / "real"
    real.mkdir()
    for f in sorted(REAL_DIR.iterdir())[:12]:
        (real / f.name).symlink_to(f.resolve())
    (real / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # skipped and recorded
    return synth, real


def test_synth_check_job_end_to_end(tiny_sets, tmp_path):
    synth, real = tiny_sets
    out = tmp_path / "out"
    report = run_synth_check(synth, real, out=out, n_resamples=100, progress=False)
    assert report.n_real == 12 and report.n_phantom == 12  # default n: as many as real images
    assert [s["file"] for s in report.skipped] == ["broken.png"] and report.skipped[0]["reason"]
    for point, low, high in [report.auroc, *report.family_auroc.values()]:
        assert 0.0 <= low <= point <= high <= 1.0
    saved = json.loads((out / "realism.json").read_text())
    assert saved["auroc"] == list(report.auroc) and set(saved["family_auroc"]) == set(FAMILIES)
    assert (out / "realism.md").read_text().strip() == report.format()
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 130 + 2, 8 * 130 + 2)  # 8 phantoms over 8 real films, 128 px + 2 px gaps
    assert (grid[2:130, 2:1040] > 0).mean() > 0.3 and (grid[132:260, 2:1040] > 0).mean() > 0.3
    assert run_synth_check(synth, real, out=out, n=5, n_resamples=20, progress=False).n_phantom == 5


def test_synth_check_cli(tiny_sets, tmp_path, capsys):
    from radgen.cli import main

    synth, real = tiny_sets
    out = tmp_path / "cli"
    assert main(["synth-check", str(synth), "--real", str(real), "--out", str(out), "--n", "8",
                 "--resamples", "50", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "| all statistics |" in text and str(out / "grid.png") in text and (out / "realism.json").is_file()
    assert main(["synth-check", str(tmp_path / "missing"), "--real", str(real), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and len(err.strip().splitlines()) == 1
    assert main(["synth-check", str(synth), "--real", str(tmp_path / "no_films"), "--quiet"]) == 2
    assert "no_films" in capsys.readouterr().err
