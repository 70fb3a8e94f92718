"""FP8 block-scaled kernels against plain reference code, Triton ones under the interpreter
(and compiled for Hopper, without running)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetune.kernels import (
    dequantize_act,
    dequantize_weight,
    fp8_gemm,
    fp8_grouped_gemm,
    quantize_act,
    quantize_weight,
    triton_fp8,  # interpreted on CPU: see conftest.py
)

E4M3_REL = 2.0**-4  # half a step of e4m3's 3 mantissa bits
E4M3_SUBNORMAL_STEP = 2.0**-9  # in units of the scale


def assert_within_e4m3(x, x_back, scale_per_element):
    bound = x.abs() * E4M3_REL + scale_per_element * E4M3_SUBNORMAL_STEP
    assert ((x - x_back).abs() <= bound + 1e-12).all()


@pytest.mark.parametrize("shape", [(3, 128), (5, 7, 384), (1, 1024)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_quantize_act_round_trip(shape, scale_fmt):
    x = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10
    x_q, scale = quantize_act(x, scale_fmt=scale_fmt)
    assert x_q.dtype == torch.float8_e4m3fn and scale.shape == shape[:-1] + (shape[-1] // 128,)
    amax = x.unflatten(-1, (-1, 128)).abs().amax(-1)
    if scale_fmt == "ue8m0":
        assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two
        assert (scale >= amax / 448).all() and (scale < 2 * amax / 448).all()
    else:
        torch.testing.assert_close(scale, amax / 448)
    per_element = scale.repeat_interleave(128, dim=-1)
    assert_within_e4m3(x, dequantize_act(x_q, scale), per_element)


def test_zero_tiles_give_no_nan_and_bad_k_fails():
    x_q, scale = quantize_act(torch.zeros(2, 256))
    assert torch.isfinite(scale).all() and dequantize_act(x_q, scale).abs().max() == 0
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_act(torch.randn(2, 200))


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (2, 130, 129)])
def test_weight_round_trip_with_partial_edge_blocks(shape):
    w = torch.randn(shape)
    w_q, scale_inv = quantize_weight(w)
    assert scale_inv.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    per_element = scale_inv.repeat_interleave(128, -2).repeat_interleave(128, -1)[
        ..., : shape[-2], : shape[-1]
    ]
    assert_within_e4m3(w, dequantize_weight(w_q, scale_inv, dtype=torch.float32), per_element)


def blockwise_loop(a, a_s, b, b_s):
    """sum over K blocks of (a_blk @ b_blk.T) * a_scale * b_scale: the recipe, written out."""
    out = torch.zeros(a.shape[0], b.shape[0])
    b_rows = b_s.repeat_interleave(128, 0)[: b.shape[0]]
    for kb in range(a.shape[1] // 128):
        k = slice(kb * 128, (kb + 1) * 128)
        out += (a[:, k].float() @ b[:, k].float().T) * a_s[:, kb : kb + 1] * b_rows[:, kb][None]
    return out


def random_operands(m, n, k, experts=None):
    a, a_s = quantize_act(torch.randn(m, k))
    w = torch.randn((experts, n, k) if experts else (n, k))
    b, b_s = quantize_weight(w)
    return a, a_s, b, b_s


@pytest.mark.parametrize("m, n, k", [(37, 200, 256), (64, 128, 384), (1, 300, 128)])
def test_fp8_gemm_reference_equals_the_blockwise_recipe(m, n, k):
    a, a_s, b, b_s = random_operands(m, n, k)
    out = fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32, backend="torch")
    torch.testing.assert_close(out, blockwise_loop(a, a_s, b, b_s), rtol=1e-5, atol=1e-4)


def test_fp8_gemm_rejects_bad_shapes():
    a, a_s, b, b_s = random_operands(4, 128, 256)
    with pytest.raises(ValueError, match="K a multiple of 128"):
        fp8_gemm(a[:, :200], a_s, b[:, :200], b_s)
    with pytest.raises(ValueError, match="b_scale"):
        fp8_gemm(a, a_s, b, b_s[:, :1])


@pytest.mark.parametrize(
    "scale_fmt, shape", [(None, (6, 256)), ("ue8m0", (6, 256)), (None, (37, 384))]
)  # 111 tiles: 7 programs
def test_triton_quantize_act_matches_reference(scale_fmt, shape):
    x = torch.randn(shape) * 3
    q, s = triton_fp8.quantize_act(x, scale_fmt=scale_fmt)
    ref_q, ref_s = quantize_act(x, scale_fmt=scale_fmt)
    torch.testing.assert_close(s, ref_s)
    # Triton's interpreter casts float32 -> float8 without rounding up into the next binade:
    # where torch rounds to a power of two (e.g. -125.4 -> -128) it gives half that (-64).
    # Every other value must be bit-identical.
    ours, theirs = q.float(), ref_q.float()
    differ = ours != theirs
    assert differ.float().mean() < 0.05
    assert torch.equal(ours[differ] * 2, theirs[differ])
    assert torch.equal(torch.exp2(torch.log2(theirs[differ].abs()).round()), theirs[differ].abs())


@pytest.mark.parametrize("m, n, k", [(37, 200, 256), (64, 128, 128)])
def test_triton_fp8_gemm_matches_reference(m, n, k):
    a, a_s, b, b_s = random_operands(m, n, k)
    out = fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32, backend="triton")
    torch.testing.assert_close(
        out, fp8_gemm(a, a_s, b, b_s, torch.float32, backend="torch"), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize(
    "counts",
    [
        [70, 0, 5, 33],  # an empty expert, tiles split across experts
        [0, 130, 64, 0, 1, 63, 0, 0, 200, 0],  # empty first/last experts, exact 64-row multiples
    ],
)
def test_triton_fp8_grouped_gemm_matches_reference(counts):
    """The kernel finds each row tile's expert from the offsets itself (no host schedule)."""
    counts = torch.tensor(counts)
    offsets = counts.cumsum(0).to(torch.int32)
    a, a_s, b, b_s = random_operands(int(counts.sum()), 192, 256, experts=len(counts))
    out = fp8_grouped_gemm(a, a_s, b, b_s, offsets, torch.float32, backend="triton")
    ref = fp8_grouped_gemm(a, a_s, b, b_s, offsets, torch.float32, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    start = 0  # and each group against its own expert's plain GEMM
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.testing.assert_close(
                ref[start:end],
                blockwise_loop(a[start:end], a_s[start:end], b[e], b_s[e]),
                rtol=1e-5,
                atol=1e-4,
            )
        start = end


def test_triton_grouped_gemm_with_128_row_tiles():
    """The GPU autotuner also tries 128-row and 256-column tiles; the interpreter runs one
    config, so launch the kernel with those sizes directly."""
    counts = torch.tensor([0, 130, 128, 1, 0, 257])
    offsets = counts.cumsum(0).to(torch.int32)
    a, a_s, b, b_s = random_operands(int(counts.sum()), 320, 256, experts=len(counts))
    out = triton_fp8.fp8_grouped_gemm(a, a_s, b, b_s, offsets, torch.float32, tiles=(128, 256))
    ref = fp8_grouped_gemm(a, a_s, b, b_s, offsets, torch.float32, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_auto_backend_on_cpu_is_the_torch_reference():
    from moetune.kernels.gemm import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="fp8 backend"):
        resolve_backend("cutlass", torch.device("cpu"))


@pytest.mark.integration
def test_triton_kernels_compile_for_hopper_with_wgmma_and_pipelined_loads(tmp_path):
    """The interpreter runs the kernels' logic, not their compiled form: build each kernel
    (FP8 and expert-row; every autotuned config) for sm_90 with Triton's compiler and ptxas,
    no GPU needed. The
    GEMMs must use Hopper's wgmma with pipelined asynchronous loads, and every kernel must fit
    an H100/H200's 227 KB of shared memory per block."""
    out = tmp_path / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("triton_sm90_compile.py")), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = json.loads(out.read_text())
    # quantize_act, fp8_gemm, the grouped GEMM's 8 configs, transpose, the 3 expert-row kernels
    assert len(kernels) == 2 + 8 + 1 + 3
    for name, stats in kernels.items():
        assert stats["shared"] <= 227 * 1024, name
        if name.startswith("fp8_"):
            assert stats["wgmma"] >= 1 and stats["async_copies"] > 0, (name, stats)


@pytest.mark.parametrize("shape", [(3, 130, 70), (64, 200)])  # partial tiles; batched and 2-D
def test_triton_transpose_equals_torch(shape):
    w, _ = quantize_weight(torch.randn(shape))
    ours = triton_fp8.transpose(w)
    assert ours.is_contiguous() and ours.dtype == torch.float8_e4m3fn
    assert torch.equal(ours.view(torch.uint8), w.transpose(-2, -1).contiguous().view(torch.uint8))
