"""Shared by the step benchmarks: the machine's matmul peak and FLOP counting of CPU attention."""

from __future__ import annotations

import time

import torch

aten = torch.ops.aten


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, tries: int) -> float:
    """Best-of-``tries`` FLOP/s of an (m,k) @ (k,n) matmul (2*m*k*n FLOPs)."""
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def _sdpa_cpu_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash-attention ops.
CPU_SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_fwd,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_bwd,
}
