"""Block-scaled FP8 GEMMs with backend choice: Triton, torch._scaled_mm, or plain torch;
and the 1x128 activation quantisation that feeds them (Triton on CUDA, else plain torch).

Operands follow DeepSeek-V3's recipe: activations a [M, K] float8_e4m3fn with 1x128 scales
a_scale [M, K/128]; weights b [N, K] float8_e4m3fn with 128x128 scales b_scale
[ceil(N/128), K/128]. `fp8_gemm` returns (a * a_scale) @ (b * b_scale).T accumulated in
float32 across K blocks. K must be a multiple of 128 (pad it); anything else fails loudly.

Backends: "torch" dequantises and multiplies in float32 (the CPU path and the tests'
oracle); "triton" runs moetune's kernels; "scaled_mm" calls torch._scaled_mm's blockwise
mode (Hopper, torch >= 2.9). "auto" takes scaled_mm, then triton, on CUDA, torch elsewhere.
"""

from __future__ import annotations

import torch

from moetune.kernels import quantize
from moetune.kernels.quantize import dequantize_act, dequantize_weight

BACKENDS = ("auto", "torch", "triton", "scaled_mm")


def check_operands(a, a_scale, b, b_scale) -> None:
    K = a.shape[-1]
    if K % 128:
        raise ValueError(f"fp8 GEMM needs K a multiple of 128, got K={K}; pad the inputs")
    if b.shape[-1] != K:
        raise ValueError(f"fp8 GEMM: a has K={K} but b {tuple(b.shape)} has K={b.shape[-1]}")
    if tuple(a_scale.shape) != (*a.shape[:-1], K // 128):
        raise ValueError(
            f"a_scale {tuple(a_scale.shape)} does not match a {tuple(a.shape)} (1x128 tiles)"
        )
    expected = (*b.shape[:-2], -(-b.shape[-2] // 128), K // 128)
    if tuple(b_scale.shape) != expected:
        raise ValueError(
            f"b_scale {tuple(b_scale.shape)} does not match b {tuple(b.shape)} "
            f"(128x128 blocks: want {expected})"
        )


def scaled_mm_available(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def triton_available(device: torch.device) -> bool:
    try:
        import triton
    except ImportError:
        return False
    return device.type == "cuda" or triton.knobs.runtime.interpret


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {BACKENDS}, not {backend!r}")
    if backend != "auto":
        return backend
    if scaled_mm_available(device):
        return "scaled_mm"
    if device.type == "cuda" and triton_available(device):
        return "triton"
    return "torch"


def quantize_act(
    x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_q float8_e4m3fn, scale [..., K/128]) per 1x128 tile, as
    `moetune.kernels.quantize.quantize_act`. backend "auto": the one-pass Triton kernel on
    CUDA, else "torch"."""
    if backend == "auto":
        backend = "triton" if x.is_cuda and triton_available(x.device) else "torch"
    if backend == "triton" and block_size == 128:
        from moetune.kernels import triton_fp8

        return triton_fp8.quantize_act(x, block_size, scale_fmt)
    return quantize.quantize_act(x, block_size, scale_fmt)


def transpose_fp8(w: torch.Tensor) -> torch.Tensor:
    """w [..., R, C] float8 -> its transpose [..., C, R], contiguous: a tiled Triton kernel on
    CUDA (torch's strided float8 copy moves a small fraction of memory bandwidth)."""
    if w.is_cuda and triton_available(w.device):
        from moetune.kernels import triton_fp8

        return triton_fp8.transpose(w)
    return w.transpose(-2, -1).contiguous()


def fp8_gemm_reference(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    return (dequantize_act(a, a_scale) @ dequantize_weight(b, b_scale, dtype=torch.float32).T).to(
        out_dtype
    )


def fp8_gemm(
    a, a_scale, b, b_scale, out_dtype=torch.bfloat16, backend: str = "auto"
) -> torch.Tensor:
    """a [M, K] fp8 with a_scale [M, K/128]; b [N, K] fp8 with b_scale [ceil(N/128), K/128]
    -> a @ b.T [M, N] in out_dtype."""
    check_operands(a, a_scale, b, b_scale)
    chosen = resolve_backend(backend, a.device)
    if backend == "auto" and chosen == "scaled_mm" and b.shape[0] % 16:
        chosen = "triton"  # torch._scaled_mm takes N multiples of 16 only
    if chosen == "torch":
        return fp8_gemm_reference(a, a_scale, b, b_scale, out_dtype)
    if chosen == "triton":
        from moetune.kernels import triton_fp8

        return triton_fp8.fp8_gemm(a, a_scale, b, b_scale, out_dtype)
    # torch._scaled_mm blockwise: scale_a [M, K/128] column-major, scale_b [K/128, N/128].
    return torch._scaled_mm(
        a, b.t(), scale_a=a_scale.t().contiguous().t(), scale_b=b_scale.t(), out_dtype=out_dtype
    )


def fp8_grouped_gemm_reference(a, a_scale, b, b_scale, offsets, out_dtype=torch.bfloat16):
    w = dequantize_weight(b, b_scale, dtype=torch.float32)
    return torch._grouped_mm(dequantize_act(a, a_scale), w.transpose(-2, -1), offs=offsets).to(
        out_dtype
    )


def fp8_grouped_gemm(
    a, a_scale, b, b_scale, offsets, out_dtype=torch.bfloat16, backend: str = "auto"
) -> torch.Tensor:
    """Expert GEMM on expert-sorted rows, `torch._grouped_mm`'s contract: rows of a [R, K]
    in groups ending at offsets [E] (int32) times b [E, N, K] transposed -> [R, N].
    a_scale [R, K/128]; b_scale [E, ceil(N/128), K/128]."""
    check_operands(a, a_scale, b, b_scale)
    backend = resolve_backend(backend, a.device)
    if backend == "triton" or backend == "scaled_mm":  # no blockwise grouped _scaled_mm yet
        from moetune.kernels import triton_fp8

        return triton_fp8.fp8_grouped_gemm(a, a_scale, b, b_scale, offsets, out_dtype)
    return fp8_grouped_gemm_reference(a, a_scale, b, b_scale, offsets, out_dtype)
