"""Block-scaled FP8 GEMM throughput: moetune's chosen backend vs bf16 and torch._scaled_mm.

On a GPU: DeepSeek-V3 shapes (M x N x K) 4096x7168x16384, 4096x24576x1536, 4096x7168x2048,
128x7168x16384, bf16 `torch.matmul` vs `torch._scaled_mm` blockwise vs moetune's backends,
plus the MoE expert GEMM (64 experts, 49,152 routed rows, 2048 -> 2x1408) against bf16
`torch._grouped_mm` and, for scale, rowwise-scaled FP8 `torch._scaled_grouped_mm` (coarser
scaling than DeepSeek's blocks, so not a drop-in). Each result is first checked against the
float32 reference.
Without a GPU it runs the CPU reference path at small sizes and says so.

    python bench/fp8_gemm.py
"""

from __future__ import annotations

import time

import torch

from moetune.kernels import fp8_gemm, fp8_grouped_gemm, quantize_act, quantize_weight
from moetune.kernels.gemm import resolve_backend, scaled_mm_available

GPU_SHAPES = [(4096, 7168, 16384), (4096, 24576, 1536), (4096, 7168, 2048), (128, 7168, 16384)]
CPU_SHAPES = [(256, 512, 1024), (64, 1024, 512)]


def timed(fn, repeats: int, sync, *args, **kwargs) -> float:
    """Median seconds of fn(*args, **kwargs) over repeats, after a warm-up call."""
    fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def operands(m, n, k, device, experts=None):
    x = torch.randn(m, k, device=device)
    w = torch.randn((experts, n, k) if experts else (n, k), device=device) * 0.05
    return x, w, quantize_act(x), quantize_weight(w)


def check(out, reference, label):
    err = ((out.float() - reference).norm() / reference.norm()).item()
    if err > 1e-2:
        raise SystemExit(f"{label}: relative error {err:.2e} against the float32 reference")


def dense_rows(shapes, device, dtype, sync, repeats):
    backends = ["torch"]
    if device != "cpu":
        backends = ["triton"] + (["scaled_mm"] if scaled_mm_available(torch.device(device)) else [])
    for m, n, k in shapes:
        x, w, (a, a_s), (b, b_s) = operands(m, n, k, device)
        flops = 2 * m * n * k
        reference = fp8_gemm(a, a_s, b, b_s, torch.float32, backend="torch")
        xb, wb = x.to(dtype), w.to(dtype)
        matmul = timed(torch.matmul, repeats, sync, xb, wb.T)
        row = [f"{m}x{n}x{k}", f"{dtype_name(dtype)} matmul {flops / matmul / 1e12:8.3f}"]
        for backend in backends:
            out = fp8_gemm(a, a_s, b, b_s, torch.bfloat16, backend=backend)
            check(out, reference, backend)
            seconds = timed(
                fp8_gemm, repeats, sync, a, a_s, b, b_s, torch.bfloat16, backend=backend
            )
            row.append(f"fp8 {backend} {flops / seconds / 1e12:8.3f}")
        print("  " + " | ".join(row) + " TFLOPS")


def grouped_row(device, dtype, sync, repeats, experts, rows, hidden, inter):
    x, w, (a, a_s), (b, b_s) = operands(rows, 2 * inter, hidden, device, experts=experts)
    offsets = torch.arange(1, experts + 1, device=device, dtype=torch.int32) * (rows // experts)
    flops = 2 * rows * 2 * inter * hidden
    xb, wb = x.to(dtype), w.to(dtype).transpose(-2, -1)
    bf16 = timed(torch._grouped_mm, repeats, sync, xb, wb, offs=offsets)
    backend = "torch" if device == "cpu" else "triton"
    reference = fp8_grouped_gemm(a, a_s, b, b_s, offsets, torch.float32, backend="torch")
    check(
        fp8_grouped_gemm(a, a_s, b, b_s, offsets, torch.bfloat16, backend=backend),
        reference,
        "grouped",
    )
    ours = timed(
        fp8_grouped_gemm, repeats, sync, a, a_s, b, b_s, offsets, torch.bfloat16, backend=backend
    )
    print(
        f"  grouped {experts} experts, {rows} rows, {hidden} -> 2x{inter}: "
        f"{dtype_name(dtype)} _grouped_mm "
        f"{flops / bf16 / 1e12:.3f} | fp8 {backend} {flops / ours / 1e12:.3f} TFLOPS "
        f"(fp8 / {dtype_name(dtype)} = {bf16 / ours:.2f}x)"
    )
    if device != "cpu":
        from moetune.kernels import triton_fp8

        print(f"  autotuned tile: {triton_fp8._fp8_grouped_gemm_kernel.best_config}")
        try:
            rowwise = timed(scaled_grouped_rowwise, repeats, sync, *rowwise_operands(x, w), offsets)
            print(
                f"  torch._scaled_grouped_mm rowwise {flops / rowwise / 1e12:.3f} TFLOPS "
                f"(moetune blockwise / rowwise = {rowwise / ours:.2f}x)"
            )
        except (RuntimeError, AttributeError) as error:
            print(f"  torch._scaled_grouped_mm rowwise: unavailable ({error})")


def rowwise_operands(x, w):
    """x [R, K] and w [E, N, K] in float8 with one scale per row (of x) and per output
    column (of each expert), w laid out [E, K, N] column-major as _scaled_grouped_mm wants."""
    x_scale = x.abs().amax(-1).clamp(min=1e-12) / 448
    w_scale = w.abs().amax(-1).clamp(min=1e-12) / 448
    x_q = (x / x_scale[:, None]).to(torch.float8_e4m3fn)
    w_q = (w / w_scale[..., None]).to(torch.float8_e4m3fn)
    return x_q, w_q.transpose(-2, -1), x_scale, w_scale


def scaled_grouped_rowwise(x_q, w_q, x_scale, w_scale, offsets):
    return torch._scaled_grouped_mm(
        x_q, w_q, x_scale, w_scale, offs=offsets, out_dtype=torch.bfloat16
    )


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main() -> None:
    if torch.cuda.is_available():
        sync = torch.cuda.synchronize
        print(
            f"device: {torch.cuda.get_device_name()}; moetune's dense backend (auto): "
            f"{resolve_backend('auto', torch.device('cuda'))}"
        )
        dense_rows(GPU_SHAPES, "cuda", torch.bfloat16, sync, repeats=20)
        grouped_row(
            "cuda", torch.bfloat16, sync, 20, experts=64, rows=49152, hidden=2048, inter=1408
        )
    else:
        print(
            "no GPU: timing the CPU reference path (dequantise + float32 GEMM) at small sizes; "
            "the float32 matmul column is its peer"
        )
        dense_rows(CPU_SHAPES, "cpu", torch.float32, lambda: None, repeats=5)
        grouped_row(
            "cpu", torch.float32, lambda: None, 5, experts=8, rows=1024, hidden=512, inter=256
        )


if __name__ == "__main__":
    main()
