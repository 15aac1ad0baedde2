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


def _reps(call_s: float, target_s: float, max_reps: int) -> int:
    """Calls per sample: as many as fill ``target_s``, at least one, at most ``max_reps``."""
    return max(1, min(max_reps, math.ceil(target_s / max(call_s, 1e-7))))


def bench(fn, device: torch.device, *, n_sets: int = 1, samples: int = 15, warmup: int = 3,
          target_s: float = 1e-3, max_reps: int = 200, graph: bool = False) -> list[float]:
    """Per-op seconds of ``samples`` samples of ``fn(i)`` (i = buffer-set index).

    ``graph`` (CUDA only) captures each sample's repetitions in one CUDA graph and replays it:
    the kernels then start back to back on the GPU whatever the host's speed, so a kernel shorter
    than eager PyTorch's issue time (~10-30 µs a call) is timed, not the host that launches it."""
    if graph and device.type == "cuda":
        return _bench_graph(fn, device, n_sets=n_sets, samples=samples, warmup=warmup, target_s=target_s,
                            max_reps=max_reps)
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
    reps = _reps(probe.seconds() / 3, target_s, max_reps)
    spans = [Span(device) for _ in range(samples)]
    for sp in spans:
        sp.start()
        for _ in range(reps):
            fn(idx % n_sets)
            idx += 1
        sp.stop()
    sync(device)
    return [sp.seconds() / reps for sp in spans]


def _bench_graph(fn, device: torch.device, *, n_sets: int, samples: int, warmup: int, target_s: float,
                 max_reps: int) -> list[float]:
    """``bench`` through one captured CUDA graph of ``reps`` calls (rotating over the sets)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for i in range(max(warmup, n_sets)):
            fn(i % n_sets)
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)

    def capture(reps: int) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(reps):
                fn(i % n_sets)
        return g

    probe = capture(1)
    probe.replay()
    sync(device)
    span = Span(device)
    span.start()
    probe.replay()
    span.stop()
    sync(device)
    # as many calls per sample as fill ``target_s`` (one for a kernel of a millisecond or more):
    # the samples together stay a short burst, before the power controller lowers the clock
    reps = _reps(span.seconds(), target_s, max_reps)
    g = probe if reps == 1 else capture(reps)
    g.replay()
    spans = [Span(device) for _ in range(samples)]
    for sp in spans:
        sp.start()
        g.replay()
        sp.stop()
    sync(device)
    return [sp.seconds() / reps for sp in spans]
