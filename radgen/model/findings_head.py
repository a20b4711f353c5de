"""The findings head: one logistic regression per finding on the image tokens the projector reads,
whose decisions become the stated findings line the LLM writes its report after.

Why it exists (measured in docs/reportgen.md, "Why the generator wrote normal for every film"): at
the demo's budget (60 steps of 8 films on 2 CPU cores) the LLM learns the report language but not
to read its image tokens, even oracle tokens that spell the answer; a linear classifier on the
same tokens reads them in seconds. So the decision "which findings are present" is taken by this
head, and the LLM, trained with findings-first targets (``tasks.findings_first``: the target
starts with the stated line of the film's own labels), continues from the line the head states.
Putting a classifier's findings into the language model's context is the design of RaDialog
(Pellegrini et al. 2023) and PromptMRG (Jin et al. 2024).

Arrays in, tensors out; no files. Fitting is full-batch L-BFGS on standardised features (reduced to
their leading principal components when there are more than ``MAX_RANK``: 16 tokens of 784 pixels
are 12,544 features for a few hundred films) with an L2 penalty chosen by k-fold log-loss, and each
finding's decision threshold maximises its F1 on the out-of-fold scores. Written here rather than with scikit-learn's ``LogisticRegression`` so
that all findings fit together in one batched problem (13 outputs over up to ~10^4 features: a
few seconds where one scikit-learn fit per finding and fold took minutes) and the result is a
torch module the generation path applies to a batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eval.chexpert import CHEXPERT_14, NO_FINDING

__all__ = ["FINDINGS", "L2_GRID", "FindingsHead", "fit_findings_head", "label_matrix"]

FINDINGS = tuple(o for o in CHEXPERT_14 if o != NO_FINDING)  # the 13 the stated line can name
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # penalty on the mean log-loss, searched by k-fold log-loss
MAX_RANK = 256  # features beyond this are reduced to their leading principal components


class FindingsHead(nn.Module):
    """``forward(tokens (B, N, C)) -> logits (B, K)``; :meth:`decide` -> one ``{finding: 1 | 0}``
    per film. A finding whose threshold is ``inf`` (too few positives to fit) is never stated."""

    def __init__(self, in_dim: int, rank: int, findings: tuple[str, ...] = FINDINGS):
        super().__init__()
        self.findings = tuple(findings)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.register_buffer("basis", torch.eye(in_dim, rank))  # (D, k): principal directions
        self.linear = nn.Linear(rank, len(self.findings))
        self.register_buffer("threshold", torch.full((len(self.findings),), math.inf))

    @property
    def in_dim(self) -> int:
        return int(self.mean.numel())

    def forward(self, tokens: Tensor) -> Tensor:
        x = tokens.flatten(1).to(self.mean.dtype)
        if x.shape[1] != self.in_dim:
            raise ValueError(f"findings head reads {self.in_dim} features per film, got {x.shape[1]}")
        return self.linear(((x - self.mean) / self.scale) @ self.basis)

    @torch.no_grad()
    def decide(self, tokens: Tensor) -> list[dict[str, int]]:
        """``{finding: 1 | 0}`` for each film of ``tokens (B, N, C)``."""
        pos = (self(tokens) > self.threshold).cpu()
        return [{f: int(p) for f, p in zip(self.findings, row.tolist())} for row in pos]


def label_matrix(labels: list[dict | None], findings: tuple[str, ...] = FINDINGS) -> Tensor:
    """``(n, K)`` float: 1 where a film's label is positive (1), else 0 (negative, uncertain, blank)."""
    return torch.tensor([[float((lab or {}).get(f) == 1) for f in findings] for lab in labels])


def _fit(x: Tensor, y: Tensor, l2: float, max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """L2 logistic regression, all outputs at once: ``x (n, D)`` standardised, ``y (n, K)`` 0/1 ->
    ``(W (D, K), b (K))`` minimising mean BCE + ``l2 / 2 * |W|^2``."""
    w = torch.zeros(x.shape[1], y.shape[1], dtype=x.dtype, requires_grad=True)
    prior = y.mean(0).clamp(1e-3, 1 - 1e-3)
    b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)  # start at the base rate
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) * y.shape[1] + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _best_threshold(scores: Tensor, y: Tensor, normal: Tensor | None = None,
                    max_false_alarm: float | None = None, min_precision: float | None = None) -> tuple[float, dict]:
    """The logit threshold with the best F1 of ``scores (n,)`` against ``y (n,)`` (ties: the higher
    threshold, fewer false alarms), with that F1, precision, recall and false-alarm rate.

    ``normal (n,)`` marks the films with no finding at all; with ``max_false_alarm`` only thresholds
    that name the finding on at most that share of them are allowed; with ``min_precision`` only
    those whose precision is at least that. When none is (or none finds a positive), the threshold
    is ``inf``: the finding is never stated.
    """
    order = torch.argsort(scores, descending=True)
    s, t = scores[order], y[order]
    tp = torch.cumsum(t, 0)
    k = torch.arange(1, len(s) + 1, dtype=s.dtype)
    f1 = 2 * tp / (k + t.sum())
    ok = torch.ones(len(s), dtype=torch.bool)  # cut only between distinct scores
    ok[:-1] = s[1:] < s[:-1]
    fa = torch.zeros(len(s))
    if normal is not None and normal.any():
        fa = torch.cumsum(normal[order].to(s.dtype), 0) / normal.sum()
        if max_false_alarm is not None:
            ok &= fa <= max_false_alarm + 1e-9
    if min_precision is not None:
        ok &= tp / k >= min_precision - 1e-9
    ok &= tp > 0
    if not ok.any():
        return math.inf, {"f1": 0.0, "precision": None, "recall": 0.0, "false_alarm": 0.0}
    f1 = torch.where(ok, f1, torch.full_like(f1, -1.0))
    i = int(torch.argmax(f1))
    thr = float((s[i] + s[i + 1]) / 2) if i + 1 < len(s) else float(s[i]) - 1.0
    return thr, {"f1": float(f1[i]), "precision": float(tp[i] / (i + 1)), "recall": float(tp[i] / t.sum()),
                 "false_alarm": float(fa[i])}


def fit_findings_head(tokens: Tensor, labels: list[dict | None], *, folds: int = 5, min_positives: int = 5,
                      max_false_alarm: float | None = None, min_precision: float | None = None,
                      l2_grid: tuple[float, ...] = L2_GRID, seed: int = 0) -> tuple[FindingsHead, dict]:
    """Fit a :class:`FindingsHead` on the training films' image tokens ``(n, N, C)`` and labels.

    The L2 penalty is the one of ``l2_grid`` with the lowest out-of-fold log-loss; each finding's
    threshold maximises its out-of-fold F1, among those that name it on at most
    ``max_false_alarm`` of the films without any finding and, with ``min_precision``, are right at
    least that often out of fold (None: no limit). Findings with fewer than
    ``min_positives`` positive films, or without an allowed threshold, are never stated. Returns the head (fit on all films) and a report: the penalty, and per
    finding the number of positives and the out-of-fold F1, precision and recall at its threshold.
    """
    x = tokens.flatten(1).float()
    y = label_matrix(labels)
    n = x.shape[0]
    if n < 2 * folds:
        raise ValueError(f"the findings head needs at least {2 * folds} labelled films, got {n}")
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / scale
    if xs.shape[1] > MAX_RANK:  # principal components of all films (unsupervised: no label leaks into folds)
        _, sv, vh = torch.linalg.svd(xs, full_matrices=False)
        k = min(MAX_RANK, n - 1)
        # leading directions, scaled so the projected features have unit mean variance
        basis = vh[:k].T * (math.sqrt(n - 1) / float(sv[:k].pow(2).mean().sqrt()))
    else:
        basis = torch.eye(xs.shape[1])
    xs = xs @ basis
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = [perm[i::folds] for i in range(folds)]

    def out_of_fold(l2: float) -> Tensor:
        oof = torch.zeros_like(y)
        for part in parts:
            train = torch.ones(n, dtype=torch.bool)
            train[part] = False
            # standardised on all films: the scaling uses no labels, so no label leaks across folds
            w, b = _fit(xs[train], y[train], l2)
            oof[part] = xs[part] @ w + b
        return oof

    losses, oofs = {}, {}
    for l2 in l2_grid:
        oofs[l2] = out_of_fold(l2)
        losses[l2] = float(F.binary_cross_entropy_with_logits(oofs[l2], y))
    l2 = min(l2_grid, key=lambda c: losses[c])
    w, b = _fit(xs, y, l2)
    normal = y.sum(1) == 0
    head = FindingsHead(x.shape[1], basis.shape[1])
    report = {"l2": l2, "max_false_alarm": max_false_alarm, "min_precision": min_precision, "rank": int(basis.shape[1]), "oof_log_loss": {str(k): round(v, 4) for k, v in losses.items()},
              "n_films": n, "folds": folds, "findings": {}}
    thresholds = torch.full((len(FINDINGS),), math.inf)
    for j, f in enumerate(FINDINGS):
        n_pos = int(y[:, j].sum())
        entry = {"positives": n_pos}
        if n_pos >= min_positives:
            thr, stats = _best_threshold(oofs[l2][:, j], y[:, j], normal, max_false_alarm, min_precision)
            thresholds[j] = thr
            entry.update({k: None if v is None else round(v, 4) for k, v in stats.items()})
        report["findings"][f] = entry
    with torch.no_grad():
        head.mean.copy_(mean)
        head.scale.copy_(scale)
        head.basis.copy_(basis)
        head.linear.weight.copy_(w.T)
        head.linear.bias.copy_(b)
        head.threshold.copy_(thresholds)
    return head, report
