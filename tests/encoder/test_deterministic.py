"""``train.deterministic``: the flags it sets, and a position-grid gradient CUDA can compute under it."""

from __future__ import annotations

import pytest
import torch

from encoder.inference import set_deterministic
from encoder.vit import POS_INTERP, ViTConfig, ViTEncoder, resample_pos_grid


@pytest.fixture
def restore_mode(monkeypatch):
    """The tests switch process-wide modes; put them back afterwards."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


def _flags() -> dict:
    import os

    return {"algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


ON = {"algorithms": True, "warn_only": False, "cudnn_benchmark": False, "cudnn_deterministic": True,
      "cublas": ":4096:8"}


def test_set_deterministic_sets_the_flags(restore_mode):
    torch.backends.cudnn.benchmark = True
    set_deterministic(True)
    assert _flags() == ON
    set_deterministic(False)  # a later job in the same process without the option
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


class _Started(Exception):
    pass


@pytest.mark.parametrize("job", ["pretrain", "train"])
def test_jobs_set_the_flags_before_choosing_a_device(restore_mode, monkeypatch, tmp_path, job):
    """``train.deterministic=true`` in either training job: the flags are set when the job reaches
    its device setup (CUDA is first touched there)."""
    from radgen.config import load_config

    seen = {}

    def started(device):
        seen.update(_flags())
        raise _Started

    with pytest.raises(_Started):
        if job == "pretrain":
            import encoder.train as et

            monkeypatch.setattr(et, "setup_distributed", started)
            et.train(load_config("encoder", [], [f"out={tmp_path}", "train.deterministic=true"]), [])
        else:
            import radgen.train.loop as tr

            monkeypatch.setattr(tr, "setup_distributed", started)
            monkeypatch.setattr(tr, "validate_config", lambda cfg: None)
            tr.run_train(load_config("reportgen", [], [f"out={tmp_path}", "train.deterministic=true"]), progress=False)
    assert seen == ON


@pytest.mark.parametrize("pos_interp", POS_INTERP)
def test_deterministic_grad_resample_matches_bicubic(pos_interp):
    """Same forward values, and the matmul gradient equals the bicubic backward (upsampling and
    downsampling)."""
    from encoder.vit import resample_pos_grid_deterministic_grad

    g = torch.Generator().manual_seed(0)
    grid = torch.randn(1, 5, 8, 8, generator=g)
    for h in (3, 8 + 3, 16):
        w = h
        a, b = grid.clone().requires_grad_(), grid.clone().requires_grad_()
        ya, yb = resample_pos_grid(a, h, w, pos_interp), resample_pos_grid_deterministic_grad(b, h, w, pos_interp)
        assert torch.equal(ya, yb)
        up = torch.randn(ya.shape, generator=g)
        (ya * up).sum().backward()
        (yb * up).sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)  # float32 sums, other order


def test_deterministic_mode_keeps_bicubic_backward_out_of_the_graph(restore_mode):
    """CUDA has no deterministic bicubic backward (``use_deterministic_algorithms`` raises on it),
    so under the mode the position grid must not reach it; the forward is unchanged."""
    vit = ViTEncoder(ViTConfig(arch="t", embed_dim=24, depth=1, num_heads=2, img_size=56, patch_size=14))
    x = torch.randn(2, 3, 28, 28)  # 2x2 grid: the 4x4 position grid is resized

    def backward_nodes() -> tuple[set[str], torch.Tensor, torch.Tensor]:
        vit.zero_grad()
        y = vit(x)["patches"]
        visited, stack = set(), [y.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is not None and fn not in visited:
                visited.add(fn)
                stack += [f for f, _ in fn.next_functions]
        y.sum().backward()
        return {type(fn).__name__ for fn in visited}, y.detach(), vit.pos_embed.grad.clone()

    nodes_off, y_off, grad_off = backward_nodes()
    set_deterministic(True)
    nodes_on, y_on, grad_on = backward_nodes()
    assert any("Bicubic" in n for n in nodes_off)
    assert not any("Bicubic" in n for n in nodes_on)
    assert torch.equal(y_on, y_off)
    torch.testing.assert_close(grad_on, grad_off, rtol=1e-5, atol=1e-7)
