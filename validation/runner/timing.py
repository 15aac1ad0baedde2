"""Timing with CUDA events (or the host clock on CPU), following the device METHOD.

``bench`` warms up, picks a number of back-to-back repetitions per sample so that one sample
lasts at least ``target_s`` (amortising the launch gaps of tiny kernels), rotates through the
caller's buffer sets (so that data that fits in L2 is not re-read from cache), and returns the
per-operation time of each sample: sample elapsed time / repetitions.
"""
from __future__ import annotations

import math
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 32 << 20
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))


def rotation_sets(bytes_per_set: int, device: torch.device, max_sets: int = 8) -> int:
    """Buffer sets to rotate through so that the sets together exceed 3x L2."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(3 * l2_bytes(device) / bytes_per_set)))


class Span:
    """Elapsed time of a region of device work: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self._a = torch.cuda.Event(enable_timing=True)
            self._b = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.device.type == "cuda":
            self._a.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.device.type == "cuda":
            self._b.record()
        else:
            self._t1 = time.perf_counter()

    def seconds(self) -> float:
        """Elapsed seconds; on CUDA call after a synchronize."""
        if self.device.type == "cuda":
            return self._a.elapsed_time(self._b) / 1e3
        return self._t1 - self._t0


def bench(fn, device: torch.device, *, n_sets: int = 1, samples: int = 15, warmup: int = 3,
          target_s: float = 1e-3, max_reps: int = 200) -> list[float]:
    """Per-op seconds of ``samples`` samples of ``fn(i)`` (i = buffer-set index)."""
    idx = 0
    for _ in range(max(warmup, n_sets)):
        fn(idx % n_sets)
        idx += 1
    sync(device)
    probe = Span(device)
    probe.start()
    for _ in range(3):
        fn(idx % n_sets)
        idx += 1
    probe.stop()
    sync(device)
    est = max(probe.seconds() / 3, 1e-7)
    reps = max(1, min(max_reps, math.ceil(target_s / est)))
    spans = [Span(device) for _ in range(samples)]
    for sp in spans:
        sp.start()
        for _ in range(reps):
            fn(idx % n_sets)
            idx += 1
        sp.stop()
    sync(device)
    return [sp.seconds() / reps for sp in spans]
