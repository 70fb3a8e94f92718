"""FP8 block-scaled kernels: quantisation, dequantisation, (grouped) GEMMs and weight
transposes; the routed experts' fused row kernels (SwiGLU, combine) live in
`moetune.kernels.expert_rows`.

Imports with torch alone; Triton kernels load when their backend is used.
"""

from moetune.kernels.gemm import fp8_gemm, fp8_grouped_gemm, quantize_act, transpose_fp8
from moetune.kernels.quantize import dequantize_act, dequantize_weight, quantize_weight

__all__ = [
    "dequantize_act",
    "dequantize_weight",
    "fp8_gemm",
    "fp8_grouped_gemm",
    "quantize_act",
    "quantize_weight",
    "transpose_fp8",
]
