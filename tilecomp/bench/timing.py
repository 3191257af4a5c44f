"""Timing on the device: CUDA-event medians and the measured copy bandwidth."""
import statistics
import time

import torch


def summarize(times_ms: list[float]) -> dict:
    ts = sorted(times_ms)
    n = len(ts)
    return {"median_ms": statistics.median(ts), "p10_ms": ts[n // 10], "p90_ms": ts[min(n - 1, (9 * n) // 10)],
            "n": n}


def time_steps(step, iters: int, warmup: int = 5, before=None) -> dict:
    """Time `step()` (which must include its own host read-back) `iters` times after warm-up;
    `before()`, when given, runs untimed ahead of every timed step (e.g. restoring inputs)."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth_gbps(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = nbytes // 2 if dev == "cuda" else min(nbytes, 64 << 20) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    stats = time_steps(lambda: dst.copy_(src), iters, warmup=3)
    return 2 * src.numel() * src.element_size() / (stats["median_ms"] * 1e-3) / 1e9
