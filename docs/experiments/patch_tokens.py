"""What the patch tokens of an encoder carry, read with converged linear models (a one-off
analysis behind docs/encoder.md, "Where the heart Dice went"; not part of the package).

For each encoder spec (anything `radgen probe --encoder` takes) and a few blocks, on the test
films of a synthetic manifest with label-map masks:
- pos R2: a ridge regression from a patch token to its (row, col) on the grid, held-out R^2;
- int R2: the same for the patch's own pixel mean and std (local content);
- cos: the mean cosine between two patch tokens of one image, after removing the mean token of
  the whole set (how much of a token is shared by its image rather than its place);
- heart AUROC (final block): a converged logistic regression from a token to "this patch is
  mostly heart" (300 train films -> test patches), the threshold-free form of the question the
  segmentation probe's argmax Dice asks.

    python docs/experiments/patch_tokens.py DATA name=spec [name=spec ...]
"""
import sys

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from encoder.processor import RadDinoProcessor
from encoder.specs import load_encoder_spec

HEART = 3  # the synthetic label maps: 1 right lung, 2 left lung, 3 heart


def films(data: str, split: str, n: int):
    m = pd.read_csv(f"{data}/manifest.csv")
    m = m[m.split == split].head(n)
    ims = [np.asarray(Image.open(f"{data}/{p}").convert("L"), dtype=np.float32) / 255 for p in m.image]
    masks = [np.asarray(Image.open(f"{data}/{p}")) for p in m["mask"]]
    return ims, masks


def held_out_r2(f: torch.Tensor, y: np.ndarray) -> float:
    """f (N, L, C) tokens, y (N*L, k) targets; fit on the first half of the images, score the rest."""
    f = f.reshape(-1, f.shape[-1]).numpy()
    half = len(f) // 2
    return RidgeCV(alphas=[1e-2, 1, 100]).fit(f[:half], y[:half]).score(f[half:], y[half:])


def within_image_cosine(f: torch.Tensor) -> float:
    """(N, L, C) -> mean cosine between distinct patches of one image, set-mean token removed."""
    n, L, _ = f.shape
    f = torch.nn.functional.normalize(f - f.mean((0, 1), keepdim=True), dim=-1)
    s = f @ f.transpose(1, 2)
    return float((s.sum((1, 2)) - L).mean() / (L * (L - 1)))


def heart_labels(masks, grid: int) -> np.ndarray:
    t = torch.as_tensor(np.stack(masks) == HEART, dtype=torch.float32)[:, None]
    return (torch.nn.functional.adaptive_avg_pool2d(t, grid)[:, 0] > 0.5).reshape(-1).numpy()


def main(data: str, specs: list[str]) -> None:
    torch.manual_seed(0)
    test_ims, test_masks = films(data, "test", 200)
    train_ims, train_masks = films(data, "train", 300)
    for arg in specs:
        name, spec = arg.split("=", 1)
        enc = load_encoder_spec(spec).eval()
        proc = RadDinoProcessor(shortest_edge=enc.cfg.img_size, crop_size=enc.cfg.img_size)
        x = proc(test_ims[:120])
        depth = len(enc.blocks)
        with torch.no_grad():
            outs = [enc.prepare_tokens(x)[:, enc.num_prefix_tokens:]] + [
                o["patches"] for o in enc.get_intermediate_layers(x, list(range(depth)))]
        n, L, _ = outs[1].shape
        g, ps = int(L ** 0.5), enc.cfg.patch_size
        pos = np.tile(np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij"), -1).reshape(-1, 2), (n, 1))
        px = x[:, 0].unfold(1, ps, ps).unfold(2, ps, ps).reshape(n, g, g, -1)
        local = torch.cat([px.mean(-1, keepdim=True), px.std(-1, keepdim=True)], -1).reshape(-1, 2).numpy()
        cells = [f"b{b}: pos R2 {held_out_r2(outs[b], pos):.2f} int R2 {held_out_r2(outs[b], local):.2f} "
                 f"cos {within_image_cosine(outs[b]):.2f}" for b in (0, depth // 4, depth // 2, 3 * depth // 4, depth)]
        with torch.no_grad():
            ftr = enc(proc(train_ims))["patches"]
            fte = enc(proc(test_ims))["patches"]
        a, b = (f.reshape(-1, f.shape[-1]).numpy() for f in (ftr, fte))
        sc = StandardScaler().fit(a)
        clf = LogisticRegression(max_iter=3000).fit(sc.transform(a), heart_labels(train_masks, g))
        heart = roc_auc_score(heart_labels(test_masks, g), clf.decision_function(sc.transform(b)))
        print(f"{name}: " + " | ".join(cells) + f" | heart patch AUROC {heart:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
