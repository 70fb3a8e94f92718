"""FP8 block-scaled kernels: quantisation, dequantisation and GEMMs (torch + optional triton)."""

from moetune.kernels.blockwise import dequantize_weight, quantize_weight

__all__ = ["dequantize_weight", "quantize_weight"]
