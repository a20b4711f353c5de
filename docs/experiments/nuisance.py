"""What an encoder's image feature says about the phantom's acquisition, pose, anatomy and findings
(a one-off analysis behind docs/encoder.md, "What the objective learns"; not part of the package).

The synthetic generator draws every random choice of a film into a ``Case`` before rendering
(``radgen/data/synth/case.py``), from a generator seeded by ``(set seed, index)``. This script
redraws the cases of a synthetic set (exactly: the case is drawn first, from its own generator)
and asks, for each encoder spec (anything ``radgen probe --encoder`` takes), how well a linear
model on its frozen image feature (the CLS; ``--pool`` as in ``radgen probe``) predicts each
variable on held-out films: ridge for continuous ones (test R², alpha by RidgeCV's leave-one-out
on ``train``), the probes' own logistic regression for binary ones
(``eval.probes.classify.fit_logistic``: C chosen on ``validate``; test AUROC).

    python docs/experiments/nuisance.py DATA name=spec [name=spec ...] [--pool cls] [--json OUT]

``raw:<k>`` is the raw-pixel control: the film area-resized to k×k, every pixel a feature.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.linear_model import RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from encoder.features import encode_batches
from encoder.processor import RadDinoProcessor
from encoder.specs import load_encoder_spec
from eval.probes.classify import fit_logistic
from radgen.data.images import load_image
from radgen.data.manifest import read_manifest
from radgen.data.synth.generate import sample_example_case

# variable -> how to read it off a Case; a variable whose values are all 0/1 is scored as binary.
VARIABLES = {
    # acquisition and processing (nuisance for a finding)
    "scale": lambda c: c.scale, "shift_x": lambda c: c.shift[0], "shift_y": lambda c: c.shift[1],
    "rotation": lambda c: c.rotation_deg, "aspect": lambda c: c.aspect, "yaw": lambda c: c.yaw_deg,
    "kvp": lambda c: c.kvp, "photons": lambda c: np.log(c.photons), "scatter": lambda c: c.scatter,
    "range_compression": lambda c: c.range_compression, "detail_gain": lambda c: c.detail_gain,
    "tone_slope": lambda c: c.tone_slope, "tone_centre": lambda c: c.tone_centre,
    "collimated": lambda c: any(x > 0 for x in c.collimation), "marker": lambda c: c.marker is not None,
    "AP view": lambda c: c.view == "AP",
    # anatomy / habitus
    "thorax_halfwidth": lambda c: c.thorax_halfwidth, "body_margin": lambda c: c.body_margin,
    "dome_y": lambda c: c.dome_y_right, "breast_size": lambda c: c.breast_size,
    "bone_density": lambda c: c.bone_density, "age": lambda c: c.age, "sex F": lambda c: c.sex == "F",
    # what the findings are read from
    "ctr": lambda c: c.ctr, "mediastinal_ratio": lambda c: c.mediastinal_ratio,
    "any finding": lambda c: any(f.kind not in ("Support Devices",) for f in c.findings),
}
GROUPS = {"acquisition": list(VARIABLES)[:16], "anatomy": list(VARIABLES)[16:23], "findings": list(VARIABLES)[23:]}


def cases(cfg, ids: list[str]) -> list:
    """The redrawn ``Case`` of each id of the set whose ``config.yaml`` is ``cfg``."""
    return [sample_example_case(int(cfg.seed), int(i.rsplit("_", 1)[1]), float(cfg.prevalence_scale))[0]
            for i in ids]


def score(x: dict, y: dict, binary: bool) -> float:
    """Test R² (ridge) or test AUROC (logistic, C on validate) of one variable; x, y by split."""
    if binary:
        if len(set(y["train"])) < 2 or len(set(y["test"])) < 2:
            return float("nan")
        predict, _, _ = fit_logistic(x["train"], y["train"], x["validate"], y["validate"])
        return float(roc_auc_score(y["test"], predict(x["test"])))
    sc = StandardScaler().fit(x["train"])
    ridge = RidgeCV(alphas=np.logspace(-1, 4, 11)).fit(sc.transform(x["train"]), y["train"])
    return float(ridge.score(sc.transform(x["test"]), y["test"]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("specs", nargs="+")
    p.add_argument("--pool", default="cls")
    p.add_argument("--json")
    a = p.parse_args()
    torch.manual_seed(0)
    ds = read_manifest(a.data)
    rows = {s: [r for r in ds if r["split"] == s] for s in ("train", "validate", "test")}
    ims = {s: [load_image(r["images"][0])[0] for r in rs] for s, rs in rows.items()}
    synth_cfg = OmegaConf.load(f"{a.data}/config.yaml")
    cs = {s: cases(synth_cfg, [r["id"] for r in rs]) for s, rs in rows.items()}
    for s in rows:  # the redrawn cases must be the ones the manifest was written from
        assert all(c.sex == r["sex"] and c.age == r["age"] for c, r in zip(cs[s], rows[s])), "cases do not match"
    y = {s: {k: np.array([f(c) for c in cs[s]], dtype=np.float64) for k, f in VARIABLES.items()} for s in rows}
    binary = {k: set(np.unique(y["train"][k])) <= {0.0, 1.0} for k in VARIABLES}
    results = {}
    for arg in a.specs:
        name, spec = arg.split("=", 1)
        if spec.startswith("raw:"):  # the probes' raw-pixel control: the film area-resized to k x k
            k = int(spec[4:])
            feats = {s: torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(np.stack(ims[s]))[:, None], k)
                     .flatten(1).numpy() for s in rows}
        else:
            enc = load_encoder_spec(spec).eval()
            proc = RadDinoProcessor(shortest_edge=enc.cfg.img_size, crop_size=enc.cfg.img_size)
            feats = {s: encode_batches(enc, (proc(ims[s][i:i + 64]) for i in range(0, len(ims[s]), 64)),
                                       pool=a.pool).numpy() for s in rows}
        results[name] = {k: score(feats, {s: y[s][k] for s in rows}, binary[k]) for k in VARIABLES}
        print(name, " ".join(f"{k}={v:.2f}" for k, v in results[name].items()), flush=True)
    names = list(results)
    print("\n| variable | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for g, ks in GROUPS.items():
        for k in ks:
            kind = "AUROC" if binary[k] else "R²"
            print(f"| {k} ({g}, {kind}) | " + " | ".join(f"{results[n][k]:.2f}" for n in names) + " |")
    if a.json:
        json.dump(results, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
