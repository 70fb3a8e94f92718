"""What limits a GPU bench: its top kernels under torch.profiler, and GPU-busy vs wall time.

`print_top_kernels(label, step)` runs `step()` once to warm up, then `steps` times under the
profiler, and prints per step: wall time, the summed kernel time (GPU busy; wall minus busy is
launch overhead, host work and syncs), and the kernels that took the most GPU time with their
share of it. The benches call it with `--profile` (bench/gpu.sh passes it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def kernel_times(prof) -> dict[str, tuple[int, float]]:
    """{kernel name: (launches, microseconds on the GPU)} of a finished profile."""
    totals: dict[str, tuple[int, float]] = {}
    for event in prof.key_averages():
        kernel = (
            event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation
        )
        if kernel and event.self_device_time_total > 0:  # (annotations span their kernels)
            count, micros = totals.get(event.key, (0, 0.0))
            totals[event.key] = (count + event.count, micros + event.self_device_time_total)
    return totals


def print_top_kernels(
    label: str, step: Callable[[], object], steps: int = 3, rows: int = 12
) -> None:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    kernels = sorted(kernel_times(prof).items(), key=lambda item: -item[1][1])
    busy_ms = max(sum(micros for _, (_, micros) in kernels) / 1e3 / steps, 1e-9)
    print(
        f"  profile of {label} ({steps} steps, profiler on): wall {wall_ms:.2f} ms/step, "
        f"GPU busy {busy_ms:.2f} ms/step ({100 * busy_ms / wall_ms:.0f}%), "
        f"{sum(count for _, (count, _) in kernels) // steps} kernel launches/step"
    )
    for name, (count, micros) in kernels[:rows]:
        ms = micros / 1e3 / steps
        print(f"    {ms:8.3f} ms {100 * ms / busy_ms:5.1f}%  x{count // steps:<4d} {name[:110]}")
