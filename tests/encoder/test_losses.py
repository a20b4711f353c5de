"""DINO / iBOT / KoLeo losses against hand-computed values and independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from encoder.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss

K = 6


def _probs(b: int, k: int = K, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, k, generator=g), dim=-1)


def _ce(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    """Independent batch-mean cross-entropy via numpy."""
    s = s.double().numpy() / temp
    log_p = s - np.log(np.exp(s).sum(-1, keepdims=True))
    return float(-(t.double().numpy() * log_p).sum(-1).mean())


# ---------------------------------------------------------------- DINO


@pytest.mark.parametrize("n_local", [0, 2])
def test_dino_self_distribution_gives_entropy(n_local: int) -> None:
    temp = 0.1
    loss_fn = DINOLoss(K, student_temp=temp)
    p = _probs(4)
    s = torch.log(p) * temp  # softmax(s / temp) == p
    loss = loss_fn([s] * (2 + n_local), [p, p])
    entropy = float(-(p * torch.log(p)).sum(-1).mean())
    assert loss.item() == pytest.approx(entropy, rel=1e-5)


def test_dino_pairing_counts_2_plus_2L_pairs() -> None:
    temp, n_local, b = 0.1, 3, 4
    loss_fn = DINOLoss(K, student_temp=temp)
    t0, t1 = _probs(b, seed=1), _probs(b, seed=2)
    uniform = torch.zeros(b, K)  # CE(uniform student, any teacher) = log K
    odd = torch.randn(b, K, generator=torch.Generator().manual_seed(3))
    students = [uniform, uniform, uniform, odd, uniform]  # 2 globals + 3 locals; local 1 differs
    loss = loss_fn(students, [t0, t1])
    n_pairs = 2 + 2 * n_local  # 8
    expected = ((n_pairs - 2) * math.log(K) + _ce(odd, t0, temp) + _ce(odd, t1, temp)) / n_pairs
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dino_global_never_paired_with_own_teacher_view() -> None:
    temp = 0.1
    loss_fn = DINOLoss(K, student_temp=temp)
    t0, t1 = _probs(3, seed=4), _probs(3, seed=5)
    g0, g1 = torch.log(t0) * temp, torch.log(t1) * temp  # each student global matches its own view
    loss = loss_fn([g0, g1], [t0, t1]).item()
    cross = (_ce(g0, t1, temp) + _ce(g1, t0, temp)) / 2
    own = (_ce(g0, t0, temp) + _ce(g1, t1, temp)) / 2
    assert loss == pytest.approx(cross, rel=1e-5)
    assert abs(loss - own) > 1e-2


def test_center_ema_and_centered_softmax() -> None:
    m = 0.9
    loss_fn = DINOLoss(3, center_momentum=m)
    assert torch.equal(loss_fn.center, torch.zeros(1, 3))
    a = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])  # mean [2, 3, 4]
    loss_fn.update_center(a)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.2, 0.3, 0.4]]))
    loss_fn.update_center(torch.tensor([[10.0, 0.0, -10.0]]))
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.2 * m + 1.0, 0.3 * m, 0.4 * m - 1.0]]))

    temp = 0.5
    t = torch.tensor([[0.0, 1.0, 2.0]])
    c = loss_fn.center
    expected = torch.exp((t - c) / temp)
    expected = expected / expected.sum()
    torch.testing.assert_close(loss_fn.softmax_center_teacher(t, temp), expected)
    # the centre genuinely matters: differs from the uncentred softmax
    assert not torch.allclose(loss_fn.softmax_center_teacher(t, temp), torch.softmax(t / temp, -1))


def _numpy_sinkhorn(logits: np.ndarray, temp: float, n_iter: int) -> np.ndarray:
    q = np.exp(logits / temp).T  # (K, N), no max-shift: independent of the implementation's trick
    k, n = q.shape
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(1, keepdims=True) * k
        q /= q.sum(0, keepdims=True) * n
    return (q * n).T


def test_sinkhorn_knopp_matches_reference() -> None:
    n, temp = 32, 0.5
    logits = torch.randn(n, K, generator=torch.Generator().manual_seed(6))
    q = DINOLoss(K).sinkhorn_knopp_teacher(logits, temp, n_iterations=3)
    assert q.shape == (n, K)
    ref = _numpy_sinkhorn(logits.double().numpy(), temp, 3)
    np.testing.assert_allclose(q.double().numpy(), ref, rtol=1e-4, atol=1e-6)


def test_sinkhorn_knopp_marginals() -> None:
    n = 32
    logits = torch.randn(n, K, generator=torch.Generator().manual_seed(6))
    loss_fn = DINOLoss(K)

    # mild logits: 3 iterations already balance prototypes to ~1e-3
    q3 = loss_fn.sinkhorn_knopp_teacher(0.1 * logits, 0.5, n_iterations=3)
    torch.testing.assert_close(q3.sum(1), torch.ones(n))  # each sample a distribution
    torch.testing.assert_close(q3.sum(0), torch.full((K,), n / K), atol=1e-3 * n / K, rtol=0)

    # sharper logits need more iterations; 50 converge tightly
    q50 = loss_fn.sinkhorn_knopp_teacher(logits, 0.5, n_iterations=50)
    torch.testing.assert_close(q50.sum(1), torch.ones(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(q50.sum(0), torch.full((K,), n / K), atol=1e-5, rtol=0)
    q3_sharp = loss_fn.sinkhorn_knopp_teacher(logits, 0.5, n_iterations=3)
    err = lambda q: (q.sum(0) - n / K).abs().max()  # noqa: E731
    assert err(q50) < err(q3_sharp)


def test_sinkhorn_knopp_no_overflow_at_small_temperature() -> None:
    # logits/temp reach ~125 > log(float32 max) ~ 88: a naive exp() would give inf and NaN
    logits = 4.0 + torch.rand(16, K, generator=torch.Generator().manual_seed(7))
    q = DINOLoss(K).sinkhorn_knopp_teacher(logits, 0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(16))
    ref = _numpy_sinkhorn(logits.double().numpy(), 0.04, 3)  # float64 does not overflow here
    np.testing.assert_allclose(q.double().numpy(), ref, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- iBOT


def _patch_inputs(seed: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, n = 3, 5
    s = torch.randn(b, n, K, generator=g)
    t = torch.softmax(torch.randn(b, n, K, generator=g), -1)
    masks = torch.tensor(
        [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool
    )  # image 1 has no masked patch
    return s, t, masks


def test_ibot_ignores_unmasked_patches() -> None:
    loss_fn = IBOTPatchLoss(K)
    s, t, masks = _patch_inputs()
    base = loss_fn(s, t, masks)
    s2 = s.clone()
    s2[~masks] = torch.randn(int((~masks).sum()), K) * 100
    s2[1, 0] = float("inf")
    assert loss_fn(s2, t, masks).item() == pytest.approx(base.item(), rel=1e-6)


def test_ibot_hand_computed_with_empty_row() -> None:
    loss_fn = IBOTPatchLoss(2, student_temp=1.0)
    s = torch.tensor(
        [
            [[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 5.0]],  # softmax: [1/4, 3/4], [1/2, 1/2], unmasked
            [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],  # image without masks
        ]
    )
    t = torch.zeros(2, 3, 2)
    t[..., 0] = 1.0  # one-hot on class 0: CE = -log p_0
    masks = torch.tensor([[True, True, False], [False, False, False]])
    expected = ((math.log(4.0) + math.log(2.0)) / 2 + 0.0) / 2  # image 1 counts as 0 in the mean over B
    assert loss_fn(s, t, masks).item() == pytest.approx(expected, rel=1e-6)


def test_ibot_forward_masked_matches_forward() -> None:
    loss_fn = IBOTPatchLoss(K)
    s, t, masks = _patch_inputs(9)
    full = loss_fn(s, t, masks)
    masked = loss_fn.forward_masked(s[masks], t[masks], masks)
    assert masked.item() == pytest.approx(full.item(), rel=1e-6)
    # padded buffers: extra rows past n_masked_total are ignored
    m = int(masks.sum())
    pad_s = torch.cat([s[masks], torch.randn(4, K)])
    pad_t = torch.cat([t[masks], torch.softmax(torch.randn(4, K), -1)])
    padded = loss_fn.forward_masked(pad_s, pad_t, masks, n_masked_total=m)
    assert padded.item() == pytest.approx(full.item(), rel=1e-6)
    with pytest.raises(ValueError):
        loss_fn.forward_masked(pad_s, pad_t, masks)


def test_ibot_center_update_uses_given_rows() -> None:
    loss_fn = IBOTPatchLoss(2, center_momentum=0.5)
    loss_fn.update_center(torch.tensor([[2.0, 4.0], [4.0, 8.0]]))
    torch.testing.assert_close(loss_fn.center, torch.tensor([[1.5, 3.0]]))
    loss_fn.update_center(torch.zeros(0, 2))  # no masked patches: centre unchanged, no NaN
    torch.testing.assert_close(loss_fn.center, torch.tensor([[1.5, 3.0]]))


# ---------------------------------------------------------------- KoLeo


def test_koleo_square_on_circle() -> None:
    angles = torch.tensor([0.0, 90.0, 180.0, 270.0]) * math.pi / 180
    x = 3.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # radius irrelevant after L2 norm
    loss = KoLeoLoss()(x)
    assert loss.item() == pytest.approx(-math.log(math.sqrt(2.0)), abs=1e-6)


def test_koleo_matches_bruteforce_and_has_gradient() -> None:
    x = torch.randn(10, 7, generator=torch.Generator().manual_seed(10), requires_grad=True)
    loss = KoLeoLoss()(x)
    xn = torch.nn.functional.normalize(x.detach().double(), dim=1)
    d = torch.cdist(xn, xn)
    d.fill_diagonal_(float("inf"))
    expected = float(-torch.log(d.min(dim=1).values).mean())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_koleo_batch_of_one_is_zero() -> None:
    x = torch.randn(1, 5, requires_grad=True)
    loss = KoLeoLoss()(x)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()  # still attached to the graph
    torch.testing.assert_close(x.grad, torch.zeros_like(x))
