"""Segmentation probe: a linear (1×1) head on frozen patch tokens, upsampled to the mask.

The head is trained with cross-entropy against label maps (0 = background, 1..K structures),
its logits bilinearly upsampled from the patch grid to the mask size, so the only thing learned
is a per-token linear map: what the frozen tokens say about *where* each structure is. It trains
for a fixed number of epochs (no early stopping: on a weak head the best-validation-Dice epoch is
an under-trained one that spreads every label over the image, and Dice rewards that), and the
validation Dice is reported alongside. Dice and IoU are computed per test image and structure and
averaged over images, with a bootstrap CI over images.

Alongside, the **pixel AUROC** of each structure: per test image, the AUROC of the head's softmax
probability for that structure over the image's pixels, averaged over images. It needs no
threshold, so it tells apart tokens that lack a structure from tokens that carry it a little less
cleanly than argmax needs: a small structure (the heart is ~6 % of a synthetic film, two or three
patches of an 8×8 grid) loses most of its argmax Dice when its probability drops below a
neighbour's, at almost no cost in ranking.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from eval.probes.classify import auroc
from eval.probes.result import ProbeScore, finite_or_none
from eval.stats import bootstrap_ci

__all__ = ["SEG_HEAD_EPOCHS", "LinearSegHead", "train_seg_head", "dice_iou", "pixel_auroc", "segmentation_probe",
           "position_features"]

SEG_HEAD_EPOCHS = 60  # the 1x1 head converges mostly by then (15 had not: docs/encoder.md)


class LinearSegHead(torch.nn.Module):
    """Per-channel standardisation, then a 1×1 convolution to ``n_classes`` logits."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, n_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))
        self.conv = torch.nn.Conv2d(mean.numel(), n_classes, kernel_size=1)

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, C, h, w) tokens -> (B, K, H, W) logits at the mask size."""
        logits = self.conv((feats - self.mean) / self.std)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def position_features(intensity: np.ndarray) -> np.ndarray:
    """The raw-pixel control for segmentation: (N, g, g) intensities -> (N, 3, g, g) with the
    pixel's x and y position (in [-1, 1]) as the other two channels."""
    n, h, w = intensity.shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    pos = np.broadcast_to(np.stack([xx, yy])[None], (n, 2, h, w))
    return np.concatenate([intensity[:, None], pos], axis=1).astype(np.float32)


def dice_iou(pred: np.ndarray, true: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU of one structure: pred, true (N, H, W) label maps -> two (N,) arrays,
    NaN where the structure is absent from both (nothing to score)."""
    p = (pred == label).reshape(len(pred), -1)
    t = (true == label).reshape(len(true), -1)
    inter = (p & t).sum(1).astype(float)
    ps, ts = p.sum(1).astype(float), t.sum(1).astype(float)
    union = ps + ts - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(ps + ts > 0, 2 * inter / (ps + ts), np.nan)
        iou = np.where(union > 0, inter / union, np.nan)
    return dice, iou


def pixel_auroc(prob: np.ndarray, true: np.ndarray, label: int) -> np.ndarray:
    """Per-image AUROC of one structure over pixels: prob (N, H, W) the structure's probability,
    true (N, H, W) label maps -> (N,), NaN where the image is all or none of the structure."""
    return np.array([auroc(t.ravel() == label, p.ravel()) for p, t in zip(prob, true)], dtype=float)


def _predict(head: LinearSegHead, feats: torch.Tensor, size, labels: list[int] | None = None,
             batch: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """Argmax label maps (N, H, W) and, if ``labels`` is given, their softmax probabilities
    (N, len(labels), H, W) float32."""
    pred, prob = [], []
    with torch.no_grad():
        for i in range(0, len(feats), batch):
            logits = head(feats[i:i + batch], size)
            pred.append(logits.argmax(1))
            if labels is not None:
                prob.append(logits.softmax(1)[:, labels])
    if not pred:  # no images
        pred, prob = [torch.zeros((0, *size), dtype=torch.long)], [torch.zeros((0, len(labels or ()), *size))]
    return torch.cat(pred).numpy(), None if labels is None else torch.cat(prob).numpy()


def train_seg_head(f_train: np.ndarray, m_train: np.ndarray, f_val: np.ndarray, m_val: np.ndarray,
                   labels: list[int], *, epochs: int = SEG_HEAD_EPOCHS, lr: float = 3e-2, weight_decay: float = 1e-4,
                   batch_size: int = 32, seed: int = 0) -> tuple[LinearSegHead, dict]:
    """Train the 1×1 head for ``epochs`` (AdamW, cosine schedule).

    f_*: (N, C, h, w) float features; m_*: (N, H, W) integer label maps. Returns ``(head, info)``
    with ``info = {"epochs": epochs, "val_dice": mean validation Dice over labels, or None}``.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ft, mt = torch.as_tensor(f_train, dtype=torch.float32), torch.as_tensor(m_train, dtype=torch.long)
    fv = torch.as_tensor(f_val, dtype=torch.float32)
    size = tuple(m_train.shape[1:])
    n_classes = int(max(labels)) + 1
    mean = ft.mean(dim=(0, 2, 3))
    std = ft.std(dim=(0, 2, 3)).clamp_min(1e-6)
    head = LinearSegHead(mean, std, n_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    for _ in range(epochs):
        for idx in torch.randperm(len(ft), generator=g).split(batch_size):
            loss = F.cross_entropy(head(ft[idx], size), mt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    val = None
    if len(fv):
        pred, _ = _predict(head, fv, size)
        val = float(np.nanmean([np.nanmean(dice_iou(pred, m_val, lab)[0]) for lab in labels]))
    return head, {"epochs": epochs, "val_dice": val}


def segmentation_probe(f_train, m_train, f_val, m_val, f_test, m_test, structures: dict[int, str], *,
                       epochs: int = SEG_HEAD_EPOCHS, n_resamples: int = 1000, seed: int = 0, **train_kw):
    """Dice, IoU and pixel AUROC per structure on the test images.

    ``structures`` maps label value -> name (e.g. ``{1: "right_lung", 2: "left_lung", 3: "heart"}``).
    Returns ``(scores, predicted test label maps (N, H, W), per_image)`` with ``per_image[(name,
    metric)]`` the (N,) per-test-image values each score averages (NaN where not scored).
    """
    labels = sorted(structures)
    head, info = train_seg_head(f_train, m_train, f_val, m_val, labels, epochs=epochs, seed=seed, **train_kw)
    pred, prob = _predict(head, torch.as_tensor(f_test, dtype=torch.float32), tuple(m_test.shape[1:]), labels)
    out, per_image = [], {}
    for j, lab in enumerate(labels):
        dice, iou = dice_iou(pred, m_test, lab)
        for metric, values in (("dice", dice), ("iou", iou), ("pixel_auroc", pixel_auroc(prob[:, j], m_test, lab))):
            per_image[(structures[lab], metric)] = values
            ok = ~np.isnan(values)
            v, lo, hi = bootstrap_ci(np.mean, values[ok], n_resamples=n_resamples, seed=seed) if ok.any() \
                else (float("nan"),) * 3
            out.append(ProbeScore("segment", structures[lab], metric, finite_or_none(v), finite_or_none(lo),
                                  finite_or_none(hi), len(f_train), int(ok.sum()), extra=dict(info)))
    return out, pred, per_image
