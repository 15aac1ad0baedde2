"""Suite ``profile``: where the time of a single-GPU training step goes, kernel class by class.

The ``steps`` suite times whole steps; this one runs a few of the same steps (same model,
optimizer, data and code: ``steps.py``) under ``torch.profiler`` and adds up the CUDA kernel time
of one step by class: GEMMs, attention, normalisation, elementwise, reductions and softmax/loss,
the optimizer, copies, and the rest.  The GPU-idle time between kernels is the step time minus
the busy time.  It exists to find which work the op graph misses around the GEMMs.

Run on one GPU (not part of ``--suite all``)::

    python -m plansim.validation.runner --suite profile --out DIR

Writes ``profile.csv`` (case, class, kernels, seconds per step) and ``profile_kernels.csv`` (the
20 costliest kernel names per case, as the profiler names them).  ``layout.csv`` times the
elementwise kernels of eager RoPE (multiply by a broadcast cos, add, cat) on the transposed
[b, heads, s, d] views the model feeds them and on contiguous copies of the same tensors: the
bandwidth PyTorch's strided, non-vectorised kernels reach.
"""
from __future__ import annotations

import csv
import os
import re
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from plansim.validation.runner import steps as _steps
from plansim.validation.runner.model import LlamaConfig, pick_attention
from plansim.validation.runner.timing import bench

CASES = (("llama3.2-3b-untied", 4, "full"), ("llama3.2-3b-untied", 2, "none"), ("tinyllama-1.1b", 4, "none"))
SEQ = 2048
#: kernel class by the first pattern its name matches (case-insensitive); order matters
CLASSES = (
    ("attention", r"flash|fmha|attention|sdpa"),  # before GEMMs: flash kernels name cutlass types
    ("gemm", r"gemm|cutlass|nvjet|sm90_xmma|ampere_.*s16816|cublas"),
    ("optimizer", r"adam|multi_tensor|foreach|fused_.*adam"),
    ("norm", r"rms|layer_?norm|norm_"),
    ("softmax_loss", r"softmax|nll|cross_?entropy|log_?softmax"),
    ("reduce", r"reduce|sum_|mean|welford"),
    ("copy", r"copy|cat|memcpy|transpose|contiguous|index|gather|scatter|embedding"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|mul|add|neg|rsqrt|pow|fill"),
)
COLUMNS = ("case_id", "model", "micro_batch", "recompute", "klass", "kernels", "seconds")


def classify(name: str) -> str:
    for klass, pattern in CLASSES:
        if re.search(pattern, name, re.IGNORECASE):
            return klass
    return "other"


def _profile_case(model_name: str, mb: int, recompute: str, device: torch.device):
    cfg = LlamaConfig.named(model_name)
    model = _steps._build(cfg, device, 0, recompute=recompute)
    pick_attention(model, device)
    opt, _ = _steps._optimizer(model.parameters(), device)
    data = _steps._batches(cfg, mb, SEQ, 2, device, 1)
    step = _steps._train_step(model, opt, data, 1)
    for i in range(3):  # warm-up: allocator, cuBLAS heuristics, flash kernels
        step(i)
    torch.cuda.synchronize(device)
    steps_profiled = 3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for i in range(steps_profiled):
            step(i)
        end.record()
        torch.cuda.synchronize(device)
    wall = start.elapsed_time(end) / 1e3 / steps_profiled
    by_class: dict[str, list[float]] = {}
    by_name: dict[str, float] = {}
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "self_device_time_total", None)
        if cuda_us is None:
            cuda_us = getattr(evt, "self_cuda_time_total", 0.0)
        if not cuda_us or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        klass = classify(evt.key)
        count_s = by_class.setdefault(klass, [0, 0.0])
        count_s[0] += evt.count / steps_profiled
        count_s[1] += cuda_us / 1e6 / steps_profiled
        by_name[evt.key] = by_name.get(evt.key, 0.0) + cuda_us / 1e6 / steps_profiled
    del model, opt, data, step
    _steps._free(device)
    return wall, by_class, by_name


LAYOUT_COLUMNS = ("op", "heads", "elements", "layout", "bytes_moved", "time_s", "gbps")


def _time(fn, device: torch.device) -> float:
    """Median seconds of ``fn()`` by the runner's own sampling (``timing.bench``)."""
    return statistics.median(bench(lambda _i: fn(), device))


def layout_rows(device: torch.device) -> list[dict]:
    """RoPE's elementwise kernels on strided views vs contiguous tensors (bf16, b = 4, s = 2048)."""
    rows = []
    b, s, d = 4, 2048, 128
    cos = torch.randn(s, d, device=device, dtype=torch.bfloat16)
    for heads in (24, 8):
        base = torch.randn(b, s, heads, d, device=device, dtype=torch.bfloat16)
        other = torch.randn(b, s, heads, d, device=device, dtype=torch.bfloat16)
        layouts = {"strided": (base.transpose(1, 2), other.transpose(1, 2)),
                   "contiguous": (base.transpose(1, 2).contiguous(), other.transpose(1, 2).contiguous())}
        n = base.numel()
        for layout, (x, y) in layouts.items():
            x1, x2 = x.chunk(2, dim=-1)
            for op, fn, moved in (("mul_broadcast", lambda: x * cos, 2 * n * 2),
                                  ("add", lambda: x + y, 3 * n * 2),
                                  ("cat_halves", lambda: torch.cat((x2, x1), dim=-1), 2 * n * 2)):
                t = _time(fn, device)
                rows.append({"op": op, "heads": heads, "elements": n, "layout": layout, "bytes_moved": moved,
                             "time_s": t, "gbps": moved / t / 1e9})
        del base, other, layouts
    return rows


ADAMW_COLUMNS = ("params", "tensors", "optimizer", "bytes_moved", "time_s", "gbps")


def adamw_rows(device: torch.device) -> list[dict]:
    """The steps suite's optimizer (fused AdamW on bf16 parameters and states) alone, on tensors
    shaped like a Llama layer's weights: 14 bytes per parameter (read p, g, m, v; write p, m, v)."""
    rows = []
    for layers in (8, 32):
        params = [torch.nn.Parameter(torch.randn(rows_, 3072, device=device, dtype=torch.bfloat16))
                  for _ in range(layers) for rows_ in (3072, 1024, 1024, 3072, 8192, 8192, 3072)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt, name = _steps._optimizer(params, device)
        n = sum(p.numel() for p in params)
        t = _time(opt.step, device)
        rows.append({"params": n, "tensors": len(params), "optimizer": name, "bytes_moved": 14 * n, "time_s": t,
                     "gbps": 14 * n / t / 1e9})
        del params, opt
        _steps._free(device)
    return rows


def run(device: torch.device, quick: bool, out_dir: str, log=print) -> list[str]:
    rows, kernel_rows = [], []
    for model_name, mb, recompute in CASES[:1] if quick else CASES:
        case_id = f"{model_name}-mb{mb}-s{SEQ}-rc{recompute}"
        wall, by_class, by_name = _profile_case(model_name, mb, recompute, device)
        busy = sum(s for _, s in by_class.values())
        for klass, (count, seconds) in sorted(by_class.items()):
            rows.append({"case_id": case_id, "model": model_name, "micro_batch": mb, "recompute": recompute,
                         "klass": klass, "kernels": round(count, 1), "seconds": seconds})
        rows.append({"case_id": case_id, "model": model_name, "micro_batch": mb, "recompute": recompute,
                     "klass": "idle", "kernels": 0, "seconds": max(0.0, wall - busy)})
        rows.append({"case_id": case_id, "model": model_name, "micro_batch": mb, "recompute": recompute,
                     "klass": "step", "kernels": 0, "seconds": wall})
        for name, seconds in sorted(by_name.items(), key=lambda kv: -kv[1])[:20]:
            kernel_rows.append({"case_id": case_id, "kernel": name[:200], "klass": classify(name),
                                "seconds": seconds})
        log(f"profile {case_id}: step {wall * 1e3:.1f} ms, busy {busy * 1e3:.1f} ms: "
            + ", ".join(f"{k} {s * 1e3:.1f}" for k, (_, s) in sorted(by_class.items(), key=lambda kv: -kv[1][1])))
    layout = layout_rows(device)
    for r in layout:
        log(f"layout {r['op']} heads={r['heads']} {r['layout']}: {r['gbps']:.0f} GB/s")
    adamw = adamw_rows(device)
    for r in adamw:
        log(f"adamw {r['params'] / 1e9:.2f} B params ({r['optimizer']}): {r['time_s'] * 1e3:.2f} ms, {r['gbps']:.0f} GB/s")
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("profile.csv", "profile_kernels.csv", "layout.csv",
                                                       "adamw.csv")]
    for path, columns, data in ((paths[0], COLUMNS, rows), (paths[1], ("case_id", "kernel", "klass", "seconds"),
                                                          kernel_rows), (paths[2], LAYOUT_COLUMNS, layout),
                                (paths[3], ADAMW_COLUMNS, adamw)):
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(data)
    return paths
