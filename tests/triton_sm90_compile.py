"""Compile moetune's Triton kernels (FP8 and expert-row) for Hopper (sm_90) without a GPU.

    python tests/triton_sm90_compile.py OUT_JSON

Triton's own compiler and ptxas (shipped in the triton wheel) build each kernel for every
autotuned config, with pointers, K and the row strides 16-divisible, as the JIT specialises
real calls at DeepSeek's shapes. OUT_JSON receives, per kernel and config: shared memory
bytes, and the number of Hopper wgmma ops and asynchronous (pipelined) global-to-shared
copies in the TTGIR.
Run without TRITON_INTERPRET: the interpreter replaces the jit functions.
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moetune.kernels import triton_expert_rows, triton_fp8

HOPPER = GPUTarget("cuda", 90, 32)
GEMM_ARGS = {
    "a_ptr": "*fp8e4nv",
    "b_ptr": "*fp8e4nv",
    "c_ptr": "*bf16",
    "a_s_ptr": "*fp32",
    "b_s_ptr": "*fp32",
}


DIVISIBLE = ("K", "stride_am", "stride_be", "stride_bn", "stride_cm")  # besides pointers


def build(fn, signature: dict[str, str], constexprs: dict, **options) -> dict:
    names = list(signature)
    divisible = [
        n
        for n, kind in signature.items()
        if kind.startswith("*") or (n in DIVISIBLE and kind != "constexpr")
    ]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=HOPPER,
        options=options,
    )
    ttgir = kernel.asm["ttgir"]
    return {
        "shared": kernel.metadata.shared,
        "wgmma": ttgir.count("warp_group_dot "),
        "async_copies": ttgir.count("async_copy_global_to_local"),
    }


def main() -> None:
    results = {}
    results["quantize_act"] = build(
        triton_fp8._quantize_act_kernel,
        {
            "x_ptr": "*bf16",
            "q_ptr": "*fp8e4nv",
            "s_ptr": "*fp32",
            "n_tiles": "i32",
            "BLOCK_K": "constexpr",
            "TILES": "constexpr",
            "UE8M0": "constexpr",
        },
        {"BLOCK_K": 128, "TILES": 16, "UE8M0": False},
    )
    dense = GEMM_ARGS | {
        n: "i32"
        for n in ("M", "N", "K", "stride_am", "stride_bn", "stride_cm", "stride_asm", "stride_bsn")
    }
    results["fp8_gemm"] = build(
        triton_fp8._fp8_gemm_kernel,
        dense | dict.fromkeys(("BLOCK_M", "BLOCK_N", "BLOCK_K"), "constexpr"),
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128},
    )
    grouped = (
        GEMM_ARGS
        | {"offsets_ptr": "*i32"}
        | {
            n: "i32"
            for n in (
                "N",
                "K",
                "E",
                "stride_am",
                "stride_be",
                "stride_bn",
                "stride_cm",
                "stride_asm",
                "stride_bse",
                "stride_bsn",
            )
        }
        | dict.fromkeys(("E_PAD", "BLOCK_M", "BLOCK_N", "BLOCK_K"), "constexpr")
    )
    autotuned = triton_fp8._fp8_grouped_gemm_kernel
    for config in autotuned.configs:
        label = (
            f"fp8_grouped_gemm {config.kwargs} warps {config.num_warps} stages {config.num_stages}"
        )
        results[label] = build(
            autotuned.fn,
            grouped,
            {"E_PAD": 256, "BLOCK_K": 128} | config.kwargs,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    results["transpose"] = build(
        triton_fp8._transpose_kernel,
        {"x_ptr": "*u8", "y_ptr": "*u8", "R": "i32", "C": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 64},
    )
    results["swiglu"] = build(
        triton_expert_rows._swiglu_kernel,
        {
            "h_ptr": "*bf16",
            "w_ptr": "*fp32",
            "act_ptr": "*bf16",
            "I": "i32",
            "stride_h": "i32",
            "stride_act": "i32",
            "BLOCK": "constexpr",
        },
        {"BLOCK": triton_expert_rows.SWIGLU_BLOCK},
    )
    results["swiglu_backward"] = build(
        triton_expert_rows._swiglu_backward_kernel,
        {
            "h_ptr": "*bf16",
            "w_ptr": "*fp32",
            "grad_act_ptr": "*bf16",
            "grad_h_ptr": "*bf16",
            "grad_w_ptr": "*bf16",
        }
        | {n: "i32" for n in ("I", "stride_h", "stride_grad_act", "stride_grad_h")}
        | {"BLOCK": "constexpr"},
        {"BLOCK": triton_expert_rows.SWIGLU_BLOCK},
    )
    results["combine"] = build(
        triton_expert_rows._combine_kernel,
        {
            "rows_ptr": "*bf16",
            "token_rows_ptr": "*i64",
            "out_ptr": "*bf16",
            "D": "i32",
            "stride_rows": "i32",
            "stride_out": "i32",
            "K": "constexpr",
            "BLOCK": "constexpr",
        },
        {"K": 8, "BLOCK": triton_expert_rows.COMBINE_BLOCK},
    )
    with open(sys.argv[1], "w") as out:
        json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
