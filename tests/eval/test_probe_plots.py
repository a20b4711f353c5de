"""Probe figures and CSV from small synthetic rows: files exist, are real images, CSV round-trips."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.probes.plots import (
    CSV_COLUMNS,
    model_colors,
    plot_age_scatter,
    plot_metric_bars,
    plot_scaling,
    plot_segmentation_examples,
    write_rows_csv,
)

MODELS = [("rad-dino-tiny", "encoder"), ("random-init-a", "random"), ("random-init-b", "random"),
          ("raw-pixels", "pixels")]
TARGETS = ["Cardiomegaly", "Edema", "Pleural Effusion", "macro"]


def _row(model, kind, probe, target, metric, value, spread=0.05, **kw) -> dict:
    return {"model": model, "kind": kind, "probe": probe, "target": target, "metric": metric,
            "value": value, "low": None if value is None else value - spread,
            "high": None if value is None else value + spread, "n_train": 120, "n_test": 40,
            "n_pos": kw.get("n_pos", 12), "note": kw.get("note", ""), "extra": kw.get("extra", {})}


@pytest.fixture()
def rows() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for m, (model, kind) in enumerate(MODELS):
        for t, target in enumerate(TARGETS):
            value = None if (model == "random-init-b" and target == "Edema") else 0.55 + 0.1 * m + 0.02 * t
            note = "too few positives" if value is None else ""
            out.append(_row(model, kind, "logistic", target, "auroc", value, note=note,
                            extra={"C": float(rng.choice([0.1, 1.0]))}))
        for s, structure in enumerate(["right_lung", "left_lung", "heart"]):
            out.append(_row(model, kind, "segment", structure, "dice", 0.6 + 0.05 * m + 0.03 * s,
                            n_pos=None))
    out.append(_row("raw-pixels", "pixels", "ridge", "age", "mae", 9.5, spread=0.7, n_pos=None))
    return out


def _check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert min(im.size) > 200, im.size
        px = np.asarray(im.convert("RGB"), dtype=float)
    assert px.std() > 0
    assert not list(path.parent.glob(".*.tmp*")), "temp file left behind"


def test_model_colors_by_kind():
    c = model_colors(MODELS)
    assert len(set(c.values())) == 4
    assert c["raw-pixels"] == "#ff7f0e"
    for name in ("random-init-a", "random-init-b"):  # grey shades: r == g == b
        h = c[name].lstrip("#")
        assert h[0:2] == h[2:4] == h[4:6]
    assert model_colors(["random init", "pretrained"]) == {"random init": "#7f7f7f",
                                                           "pretrained": "#1f77b4"}


def test_metric_bars_auroc_and_dice(rows, tmp_path):
    out = plot_metric_bars(rows, tmp_path / "auroc.png")
    assert out == tmp_path / "auroc.png"
    _check_png(out)
    dice = plot_metric_bars(rows, tmp_path / "sub" / "dice.png", probe="segment", metric="dice",
                            ref_line=None, title="Dice per structure")
    _check_png(dice)
    # nothing matches: still a (blank-but-labelled) figure, no crash
    _check_png(plot_metric_bars(rows, tmp_path / "none.png", probe="knn"))


def test_metric_bars_all_none(tmp_path):
    rows = [_row(m, k, "logistic", "Edema", "auroc", None) for m, k in MODELS]
    _check_png(plot_metric_bars(rows, tmp_path / "all_none.png"))


def test_age_scatter(tmp_path):
    rng = np.random.default_rng(1)
    true = rng.uniform(20, 90, 60)
    preds = {m: (true, true + rng.normal(0, 5 + 3 * i, 60)) for i, (m, _) in enumerate(MODELS)}
    preds["raw-pixels"] = (np.append(true, np.nan), np.append(preds["raw-pixels"][1], 50.0))
    _check_png(plot_age_scatter(preds, tmp_path / "age.png"))
    five = {f"model-{i}": (true, true + i) for i in range(5)}  # two rows of subplots
    _check_png(plot_age_scatter(five, tmp_path / "age5.png", title="five"))


def test_scaling(tmp_path):
    pts = []
    for n, v in [(1000, 0.70), (4000, 0.74), (16000, 0.78)]:
        pts.append({"n_images": n, "series": "pretrained macro AUROC", "value": v,
                    "low": v - 0.02, "high": v + 0.02})
    pts.append({"n_images": 16000, "series": "random init", "value": 0.6, "low": None, "high": None})
    _check_png(plot_scaling(pts, tmp_path / "scaling.png"))
    narrow = [{"n_images": n, "series": "pretrained", "value": 0.7, "low": None, "high": None}
              for n in (1000, 2000)]
    _check_png(plot_scaling(narrow, tmp_path / "narrow.png", metric_label="Dice"))


def _blob_masks(k: int, h: int = 64, w: int = 64, shift: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((k, h, w), dtype=np.int64)
    for i in range(k):
        lab[i][(np.abs(xx - 18 - shift) < 9) & (np.abs(yy - 30 - i) < 18)] = 1
        lab[i][(np.abs(xx - 46 + shift) < 9) & (np.abs(yy - 30) < 18)] = 2
        lab[i][(xx - 32) ** 2 + (yy - 50 + i) ** 2 < 36] = 3
    return lab


def test_segmentation_examples(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 1, (3, 64, 64))
    true = _blob_masks(3)
    predicted = {"rad-dino-tiny": _blob_masks(3, shift=2),
                 "random-init-a": np.zeros_like(true)}  # empty prediction: no outlines, no crash
    out = plot_segmentation_examples(images, true, predicted, tmp_path / "seg.png",
                                     names={1: "right_lung", 2: "left_lung", 3: "heart"})
    _check_png(out)
    with pytest.raises(ValueError):
        plot_segmentation_examples(images, true, {"bad": true[:2]}, tmp_path / "bad.png")


def test_csv_round_trip(rows, tmp_path):
    out = write_rows_csv(rows, tmp_path / "rows.csv")
    with open(out, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        back = list(reader)
    assert len(back) == len(rows)
    assert any(r["value"] is None for r in rows)
    for src, got in zip(rows, back):
        for col in ("model", "kind", "probe", "target", "metric", "note"):
            assert got[col] == src[col]
        for col in ("value", "low", "high", "n_train", "n_test", "n_pos"):
            if src[col] is None:
                assert got[col] == ""
            else:
                assert float(got[col]) == src[col]
        assert json.loads(got["extra"]) == src["extra"]
