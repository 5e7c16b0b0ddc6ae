"""Timing that measures what it says: warm-up, then repeats of `steps` calls, contenders
interleaved repeat by repeat so that clocks and caches drift equally for all of them."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, steps: int, kernel_clock=None) -> tuple[float, float | None]:
    """(device seconds per call, host seconds per call) over `steps` back-to-back calls.
    On CUDA the device time comes from events; the host time is how long the CPU took to
    issue the calls (what bounds the step when kernels are tiny). On the CPU, where kernels
    run on the host too, the host time is the time outside the kernels when the contender
    counts that (`kernel_clock`, a [seconds] list it adds to), else unknown (None)."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        host = time.perf_counter() - t0
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps, host / steps
    if kernel_clock is not None:
        kernel_clock[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    elapsed = (time.perf_counter() - t0) / steps
    return elapsed, None if kernel_clock is None else elapsed - kernel_clock[0] / steps


def time_interleaved(fns: dict, device, repeats: int, steps: int, warmup: int = 2, progress=None,
                     clocks: dict | None = None) -> dict:
    """name -> {"first_s", "median_s", "min_s", "max_s", "host_s", "samples"}: the first call (state
    allocation) timed alone, then `repeats` rounds over all contenders. `clocks`: name -> the
    contender's kernel clock (see time_call)."""
    clocks = clocks or {}
    results = {}
    for name, fn in fns.items():
        first, _ = time_call(fn, device, 1)
        for _ in range(warmup):
            fn()
        results[name] = {"first_s": first, "samples": [], "host": []}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, h = time_call(fn, device, steps, clocks.get(name))
            results[name]["samples"].append(t)
            results[name]["host"].append(h)
            if progress is not None:
                progress()
    for r in results.values():
        samples = r["samples"]  # kept: sample k of every contender is from round k (paired_ratio)
        r.update(median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples),
                 host_s=None if None in r["host"] else statistics.median(r["host"]))
        r.pop("host")
    return results


def paired_ratio(baseline: dict, contender: dict) -> float:
    """The median over rounds of baseline time / contender time, each ratio from one round,
    where the two ran back to back: a machine that slows down for a round slows both (on a
    shared machine the medians of each alone drift apart by more than the effect measured)."""
    return statistics.median(b / c for b, c in zip(baseline["samples"], contender["samples"], strict=True))


# Repeats that spread wider than this (max / min - 1) leave a ratio without meaning: the
# machine was doing something else (another process, frequency changes, swapping).
NOISY_SPREAD = 0.5


def spread(samples: list) -> float:
    """max / min - 1 of the repeats: 0.1 means the slowest repeat took 10 % longer."""
    return max(samples) / min(samples) - 1.0


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting read + write (2N for N bytes): the fastest
    of the repeats, as what the memory can do (a median on a shared machine read half of it)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [time_call(lambda: dst.copy_(src), device, 3)[0] for _ in range(repeats)]
    return 2 * src.numel() * 4 / min(times)


def kernel_launches(fn, device: torch.device) -> int | None:
    """GPU kernels one call launches, from the profiler (memory copies not counted)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))
