"""Frozen-encoder inference setup: precision, device, optional ``torch.compile``, batch size.

``prepare_encoder(model, precision="auto")`` moves a :class:`~encoder.vit.ViTEncoder` to its
device once, freezes it (eval, no grads) and, for ``bf16``, casts its weights to bfloat16 once, so
that :func:`encoder.features.encode` runs every matmul in bf16 without the per-call weight casts of
``torch.autocast``. ``auto`` picks bf16 only where the hardware runs it natively:

* CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (Ampere and later; without
  the argument it also says yes on older GPUs that only emulate bf16);
* CPU: the ``avx512_bf16`` or ``amx_bf16`` flag (x86) or ``bf16`` (Arm) in ``/proc/cpuinfo``.
  oneDNN emulates bf16 on other AVX-512 CPUs; that runs at a fraction of fp32 speed, so ``auto``
  keeps fp32 there (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` says yes on those, hence
  the flags).

:func:`set_deterministic` is the ``train.deterministic`` switch of the training jobs (their device
setup, like :func:`resolve_device`).

Features in bf16 differ from fp32 by the tolerance stated in ``docs/encoder.md`` (tested on a
tiny model in ``tests/encoder/test_features.py``); callers that cache features keep the
precision in their cache key.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Literal

import torch

from encoder.vit import ViTEncoder

__all__ = ["PRECISIONS", "Precision", "cpu_bf16_flags", "bf16_supported", "resolve_precision",
           "precision_dtype", "resolve_device", "prepare_encoder", "default_batch_size",
           "model_precision", "set_deterministic"]

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86; Arm reports "bf16" in its Features line


def _parse_bf16_flags(cpuinfo: str, machine: str) -> tuple[str, ...]:
    words: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words.update(value.split())
    wanted = _CPU_BF16_FLAGS + (("bf16",) if machine.lower() in ("aarch64", "arm64") else ())
    return tuple(f for f in wanted if f in words)


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The bf16 feature flags this CPU reports in ``/proc/cpuinfo`` (empty if none or unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:  # not Linux: no flags to read, so bf16 is never picked automatically
        return ()
    return _parse_bf16_flags(text, platform.machine())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU.

    A CUDA device without an index is this process's GPU: ``cuda:$LOCAL_RANK`` under torchrun,
    else ``cuda:0``. An explicit index is kept. Every job picks its device here, so this is also
    where TF32 is allowed for the fp32 matmuls and convolutions that remain on CUDA.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        n = torch.cuda.device_count()
        if local >= n:
            raise ValueError(f"LOCAL_RANK={local} but {n} CUDA device(s) are visible: start at most {n} "
                             "processes per node, or choose the device (e.g. device=cpu)")
        dev = torch.device("cuda", local)
    if dev.type == "cuda":  # fp32 matmuls and convolutions left outside bf16 run on TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def set_deterministic(enabled: bool) -> None:
    """``train.deterministic``: only deterministic kernels, or a ``RuntimeError`` naming the op.

    On: ``torch.use_deterministic_algorithms(True, warn_only=False)``, cuDNN deterministic and
    not benchmarking, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS reads it when its first
    handle is made, so call this before any CUDA work; a value already set is kept). Off: the
    default kernels (``use_deterministic_algorithms(False)``), so one process running several
    jobs does not carry the mode over. CPU training is bit-exact either way; on CUDA exact resume
    needs it, at a speed cost the GPU check measures (``bench/``).
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.deterministic = enabled


def bf16_supported(device: str | torch.device | None = None) -> bool:
    """Whether ``device`` (default: :func:`resolve_device`) runs bf16 matmuls natively."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch without the argument: native bf16 is compute capability 8.0+
            return torch.cuda.get_device_capability(dev) >= (8, 0)
    if dev.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


def resolve_precision(precision: str = "auto", device: str | torch.device | None = None) -> str:
    """``"fp32"`` or ``"bf16"``: ``auto`` means bf16 where :func:`bf16_supported`, else fp32.

    An explicit ``"bf16"`` is honoured everywhere (on CPUs without native bf16 it is emulated, and
    slower than fp32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def precision_dtype(precision: str) -> torch.dtype:
    """``"fp32"`` -> ``torch.float32``, ``"bf16"`` -> ``torch.bfloat16``."""
    if precision not in _DTYPES:
        raise ValueError(f"precision {precision!r} has no dtype (resolve 'auto' first)")
    return _DTYPES[precision]


def model_precision(model: torch.nn.Module) -> str:
    """``"bf16"`` or ``"fp32"``: the dtype of the model's weights (other dtypes: their name)."""
    dtype = next(model.parameters()).dtype
    return next((k for k, v in _DTYPES.items() if v == dtype), str(dtype).replace("torch.", ""))


def prepare_encoder(model: ViTEncoder, precision: str = "auto",
                    device: str | torch.device | None = None, compile: bool = False) -> ViTEncoder:
    """Make ``model`` ready for frozen-feature inference, **in place**, and return it.

    Moves it to ``device`` (default :func:`resolve_device`), sets eval mode and
    ``requires_grad_(False)``, casts parameters and buffers to the resolved precision once, and
    with ``compile`` wraps each transformer block in ``torch.compile`` (one compiled graph shared
    by all blocks, so the compile cost is that of one block; both ``forward`` and
    ``get_intermediate_layers`` go through the blocks). The result is still a ``ViTEncoder``, so
    :func:`encoder.features.encode` and every other caller take it unchanged. Pass a copy
    (``copy.deepcopy``) to keep the original fp32 model.
    """
    dev = resolve_device(device)
    dtype = precision_dtype(resolve_precision(precision, dev))
    model.to(device=dev, dtype=dtype)
    model.eval().requires_grad_(False)
    if compile:
        for blk in model.blocks:
            # dynamic=None: the first shape compiles static, a second batch size (the last, short
            # batch) recompiles once with a dynamic batch dimension instead of once per size.
            blk.compile(dynamic=None)
    return model


def default_batch_size(device: str | torch.device | None = None, image_size: int = 518,
                       patch_size: int = 14) -> int:
    """Images per forward pass chosen for throughput on ``device``.

    CPU: about 2,048 tokens per batch (1 image at 518 px, 7 at 224 px). Measured on 2 cores
    (``bench/README.md``): at 518 px batch 1 ran 1.37 s/image and batch 8 1.52 s/image (the
    activations of a big batch spill out of the caches); at 224 px batches 4-8 were best and 16
    was 10 % slower. GPU: 64 at 518 px, 256 at 224 px and below, enough to fill the device.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        return 64 if image_size > 224 else 256
    tokens = 1 + (image_size // patch_size) ** 2
    return max(1, min(64, 2048 // tokens))
