"""Model FLOPs utilisation: the achieved training rate over a matmul rate measured on the same device.

`measure_peak_flops` is the one matmul-peak measurement: the recipe's MFU denominator and
bench/train_throughput.py's reference peak.
"""

from __future__ import annotations

import statistics
import time

import torch


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int | None = None,
                       rounds: int = 1) -> float:
    """The median rate of `rounds` timings of `reps` n x n matmuls on `device` (bf16 on GPUs, fp32 on CPUs)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 512)
    reps = reps or (20 if cuda else 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) / reps)
    return 2 * n**3 / statistics.median(times)


def mfu(n_params: int, tokens_per_s: float, peak_flops: float | None, world_size: int) -> float | None:
    """6 N FLOPs per trained token (forward + backward) over the peak of all workers; None without a peak."""
    return 6 * n_params * tokens_per_s / (peak_flops * world_size) if peak_flops else None
