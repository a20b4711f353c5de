"""CUDA device choices, tested on the CPU with ``torch.cuda`` faked (no call here needs a GPU)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def two_gpus(monkeypatch):
    """``torch.cuda`` says two devices are there; ``set_device`` only records its argument."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return calls


class _Chosen(Exception):
    pass


def test_resolve_device_uses_local_rank(two_gpus, monkeypatch):
    from encoder.inference import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK=2"):
        resolve_device("auto")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda", 0)


@pytest.mark.parametrize("job", ["generate", "train", "pretrain"])
def test_jobs_put_rank_1_on_cuda_1(two_gpus, monkeypatch, tmp_path, job):
    """Under torchrun (LOCAL_RANK=1) every job joins the process group on its own GPU."""
    import encoder.distributed

    def chosen(device):
        raise _Chosen(device)

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(encoder.distributed, "setup_distributed", chosen)
    with pytest.raises(_Chosen) as exc:
        if job == "generate":
            from radgen.jobs.generate import run_generate

            run_generate(tmp_path / "run", tmp_path / "images", tmp_path / "out.jsonl", progress=False)
        elif job == "train":
            import radgen.jobs.train as tr
            from radgen.config import load_config

            monkeypatch.setattr(tr, "setup_distributed", chosen)
            monkeypatch.setattr(tr, "validate_config", lambda cfg: None)
            tr.run_train(load_config("reportgen", [], [f"out={tmp_path}"]), progress=False)
        else:
            import encoder.train as et
            from radgen.config import load_config

            monkeypatch.setattr(et, "setup_distributed", chosen)
            monkeypatch.setattr(et, "validate_config", lambda cfg: None)
            et.train(load_config("encoder", [], [f"out={tmp_path}"]), [])
    assert exc.value.args[0] == torch.device("cuda", 1)


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_auto_precision_needs_native_bf16(two_gpus, monkeypatch, tmp_path, native):
    """``precision: auto`` is bf16 only on GPUs that run it natively, in every job."""
    import encoder.train as et
    from encoder.inference import resolve_precision
    from radgen.config import load_config
    from radgen.jobs.train import _autocast

    # torch.cuda.is_bf16_supported() is True on pre-Ampere GPUs too (emulated): only the
    # including_emulation=False answer tells them apart.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    want = "bf16" if native else "fp32"
    assert resolve_precision("auto", "cuda") == want
    assert et._device_and_precision(load_config("encoder", [], [f"out={tmp_path}", "train.device=cuda"]))[1] == want
    assert _autocast(torch.device("cuda", 0), "auto")[1] == want
    assert et._device_and_precision(load_config("encoder", [], [f"out={tmp_path}", "train.device=cpu"]))[1] == "fp32"


def test_tf32_enabled_on_cuda(two_gpus, monkeypatch):
    """fp32 matmuls and convolutions left on a CUDA device run as TF32 (set once, where the device is chosen)."""
    from encoder.inference import resolve_device

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        resolve_device("cpu")
        assert not torch.backends.cuda.matmul.allow_tf32
        resolve_device("auto")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
