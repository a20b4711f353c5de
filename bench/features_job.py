"""Frozen-feature extraction, job level: ``radgen features`` against microsoft/rad-dino's model card.

Both sides encode the same real radiographs (the first ``--n`` files of
``../shared/data/cxr/images``, sorted: PNG and JPEG, grayscale and RGB, 479 to 2000 px) with the
same weights: a randomly initialised ``Dinov2Model`` with rad-dino's config saved with
``save_pretrained`` next to rad-dino's ``preprocessor_config.json``
(``encoder.weights.RAD_DINO_PREPROCESSOR``), at rad-dino's native 518 px.

* **model card**: the recipe on https://huggingface.co/microsoft/rad-dino, one image at a time in
  a Python loop: ``AutoImageProcessor.from_pretrained(folder)`` and
  ``AutoModel.from_pretrained(folder)`` once, then per image ``Image.open(path)``,
  ``processor(images=img, return_tensors="pt")``, ``model(**inputs)`` under
  ``torch.inference_mode()``, ``outputs.pooler_output`` (the CLS embedding).
* **ours**: :func:`radgen.features.extract_features` (what ``radgen features`` runs) on a folder
  of the same files, in this process, with its defaults unless ``--ours`` names variants
  (e.g. ``workers=0`` or ``workers=1,loader=thread,batch_size=4``).

Protocol: every side first encodes one image untimed (one-off start-up costs of the process); then
the images are split into ``--chunks`` consecutive chunks; for each chunk every side runs
once, rotating which goes first, so load drift on a shared machine hits all sides alike. A side's
time is the sum over chunks of the whole call (model loading included: each chunk is a fresh job
for both sides), and separately of its loop alone. images/s = n / time; the ratio is ours / model
card (> 1: ours is faster). Also printed: the 2048³ fp32/bf16 matmul peak at start and end,
achieved GFLOP/s (matmul FLOPs of a full ViT-B forward per image / loop time), the 1-min load
average, and the cosine similarity of our features against the model card's per image (the two
preprocessings resize differently: PIL on 8-bit RGB against torch on float grayscale), raw and
centred on the model card's mean feature (random weights give all images nearly the same CLS, so
the centred one says whether the image-to-image differences agree).

    .venv/bin/python bench/features_job.py --quick        # 8 images, 2 chunks (~1 min on 2 cores)
    .venv/bin/python bench/features_job.py                # 100 images, 4 chunks
    .venv/bin/python bench/features_job.py --ours workers=0 workers=1,loader=thread workers=1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import RATIO_OURS_VS_CARD, add_json_arg, peak_row, row, write_json  # noqa: E402
from features_model import RAD_DINO, matmul_peak, vit_fwd_flops  # noqa: E402

from encoder.inference import cpu_bf16_flags  # noqa: E402
from encoder.weights import RAD_DINO_PREPROCESSOR  # noqa: E402

IMAGES = REPO / ".." / "shared" / "data" / "cxr" / "images"


def make_model_folder(folder: Path, seed: int) -> None:
    """A random rad-dino-config Dinov2Model, saved as a Hub download of microsoft/rad-dino looks."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**RAD_DINO)).eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(RAD_DINO_PREPROCESSOR, indent=2))


def model_card(folder: Path, paths: list[Path]) -> tuple[dict[str, np.ndarray], float]:
    """The rad-dino model card's recipe over ``paths``; CLS per file stem, and the loop's seconds."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    out = {}
    t0 = time.perf_counter()
    for p in paths:
        image = Image.open(p)
        inputs = processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            outputs = model(**inputs)
        out[p.stem] = outputs.pooler_output[0].numpy()
    return out, time.perf_counter() - t0


def ours(folder: Path, data: Path, variant: dict) -> tuple[dict[str, np.ndarray], float, dict]:
    from radgen.features import extract_features

    fs = extract_features(str(folder), data, None, 518, progress=False, **variant)
    return dict(zip(fs.ids, fs.features)), fs.meta["seconds"], fs.meta


def parse_variant(text: str) -> dict:
    """``workers=1,loader=thread`` -> keyword arguments of ``extract_features``."""
    out: dict = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        out[k] = int(v) if v.lstrip("-").isdigit() else (v == "true" if v in ("true", "false") else v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="images (default 100)")
    ap.add_argument("--chunks", type=int, default=4, help="interleaved chunks (default 4)")
    ap.add_argument("--ours", nargs="+", default=[""], metavar="K=V,...",
                    help="our job's variants (extract_features keywords); default: its defaults")
    ap.add_argument("--quick", action="store_true", help="8 images, 2 chunks")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_json_arg(ap)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.n, args.chunks = min(args.n, 8), 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if not IMAGES.is_dir():
        sys.exit(f"no images at {IMAGES} (expected ../shared/data/cxr/images beside the repo)")
    files = sorted(p for p in IMAGES.iterdir() if p.is_file())[:args.n]
    n = len(files)
    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} CPUs, cpu bf16 flags {list(cpu_bf16_flags()) or 'none'}, "
          f"loadavg {os.getloadavg()[0]:.2f}; {n} images from {IMAGES.resolve()}")
    peak0 = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (start): fp32 {peak0['fp32']:.0f}, bf16 {peak0['bf16']:.0f} GFLOP/s")

    sides = {"model card": None} | {f"ours[{v or 'defaults'}]": parse_variant(v) for v in args.ours}
    total = {k: 0.0 for k in sides}
    loop = {k: 0.0 for k in sides}
    feats: dict[str, dict[str, np.ndarray]] = {k: {} for k in sides}
    metas: dict[str, dict] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "rad-dino"
        make_model_folder(folder, args.seed)
        bounds = np.linspace(0, n, args.chunks + 1).round().astype(int)
        names = list(sides)
        # untimed warm-up of every side on one image: the process's first forward pays one-off
        # costs (oneDNN/MKL set-up, first touch of the weights) that would land on whoever runs first
        warm = Path(tmp) / "warm"
        warm.mkdir()
        (warm / files[0].name).symlink_to(files[0].resolve())
        for name in names:
            model_card(folder, files[:1]) if sides[name] is None else ours(folder, warm, sides[name])
        for c in range(args.chunks):
            chunk = files[bounds[c]:bounds[c + 1]]
            data = Path(tmp) / f"chunk{c}"
            data.mkdir()
            for f in chunk:  # a plain folder of the same files for our job
                (data / f.name).symlink_to(f.resolve())
            for name in names[c % len(names):] + names[:c % len(names)]:
                t0 = time.perf_counter()
                if sides[name] is None:
                    got, secs = model_card(folder, chunk)
                else:
                    got, secs, metas[name] = ours(folder, data, sides[name])
                total[name] += time.perf_counter() - t0
                loop[name] += secs
                feats[name].update(got)
                loads.append(os.getloadavg()[0])
                print(f"  chunk {c + 1}/{args.chunks} ({len(chunk)} images) {name}: "
                      f"{time.perf_counter() - t0:.1f} s, loadavg {loads[-1]:.2f}", flush=True)
    peak1 = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (end): fp32 {peak1['fp32']:.0f}, bf16 {peak1['bf16']:.0f} GFLOP/s; "
          f"loadavg during the run {min(loads):.2f}-{max(loads):.2f}")

    flops = vit_fwd_flops(1 + 37 * 37)
    card = feats["model card"]
    print("\n| side | settings | images/s (whole call) | ours / model card | images/s (loop) "
          "| ours / model card (loop) | GFLOP/s (loop) | CLS cos vs model card (min / mean) "
          "| centred cos (min / mean) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in names:
        m = metas.get(name, {})
        settings = ("fp32, batch 1, no workers" if name == "model card" else
                    f"{m.get('precision')}, batch {m.get('batch_size')}, workers {m.get('workers')}"
                    f"{' (' + m['loader'] + ')' if m.get('loader') else ''}"
                    f"{', compiled' if m.get('compiled') else ''}")
        ips, ips_loop = n / total[name], n / loop[name]
        common = sorted(set(card) & set(feats[name]))
        a = np.stack([card[k] for k in common])
        b = np.stack([feats[name][k] for k in common])
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        # random weights give every image nearly the same CLS, so also compare the features
        # centred on the model card's mean: how well the image-to-image differences agree
        mu = a.mean(0)
        ca, cb = a - mu, b - mu
        ccos = (ca * cb).sum(1) / np.linalg.norm(ca, axis=1) / np.linalg.norm(cb, axis=1)
        rows.append(dict(side=name, settings=settings, images_per_s=ips, images_per_s_loop=ips_loop,
                         ratio=ips * total["model card"] / n, ratio_loop=ips_loop * loop["model card"] / n,
                         gflops=flops * ips_loop / 1e9, cos_min=float(cos.min()), cos_mean=float(cos.mean()),
                         centred_cos_min=float(ccos.min()), centred_cos_mean=float(ccos.mean()),
                         n_features=len(feats[name])))
        r = rows[-1]
        ratio, ratio_loop = (("—", "—") if name == "model card"
                             else (f"{r['ratio']:.2f}x", f"{r['ratio_loop']:.2f}x"))
        print(f"| {name} | {settings} | {ips:.3f} | {ratio} | {ips_loop:.3f} | {ratio_loop} "
              f"| {r['gflops']:.0f} | {r['cos_min']:.4f} / {r['cos_mean']:.4f} "
              f"| {r['centred_cos_min']:.4f} / {r['centred_cos_mean']:.4f} |")
    print(f"images: {n}; whole call includes model loading per chunk ({args.chunks} chunks); loop = "
          "encoding loop only (ours: meta 'seconds'). GFLOP/s: full-forward matmul FLOPs "
          f"({flops / 1e9:.0f} GFLOP/image) x images/s (loop).")
    out = [peak_row("features_job", p, v, when) for when, pk in (("start", peak0), ("end", peak1))
           for p, v in pk.items()]
    card_row = rows[0]
    out += [row("features_job", f"{n} images 518px: {r['side']} ({r['settings']})", RATIO_OURS_VS_CARD, r["ratio"],
                r["images_per_s"], "images/s (ours, whole call)",
                f"loop only {r['ratio_loop']:.2f}x; model card {card_row['images_per_s']:.3f} images/s; "
                f"{args.chunks} chunks; CLS cos min {r['cos_min']:.4f}; loadavg {min(loads):.1f}-{max(loads):.1f}",
                detail=r, model_card_images_per_s=card_row["images_per_s"],
                model_card_images_per_s_loop=card_row["images_per_s_loop"], chunks=args.chunks, loadavg=loads)
            for r in rows[1:]]
    write_json(args.json, out)


if __name__ == "__main__":
    main()
