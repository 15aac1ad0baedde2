"""Suite ``profile``: where the time of a single-GPU training step goes, kernel class by class.

The ``steps`` suite times whole steps; this one runs a few of the same steps (same model,
optimizer, data and code: ``steps.py``) under ``torch.profiler`` and adds up the CUDA kernel time
of one step by class: GEMMs, attention, normalisation, elementwise, reductions and softmax/loss,
the optimizer, copies, and the rest.  The GPU-idle time between kernels is the step time minus
the busy time.  It exists to find which work the op graph misses around the GEMMs.

The single-GPU cases are Llama steps (flash attention) and the eager 2021 GPT (``gpt_model``,
unfused attention); with two GPUs visible the expert-parallel steps of suite ``parallel2`` and
the steps suite's DDP and FSDP2 steps are profiled too (rank 0's kernels, under torchrun).  Not part of ``--suite all``::

    python -m plansim.validation.runner --suite profile --out DIR

Writes ``profile.csv`` (case, class, kernels, seconds per step) and ``profile_kernels.csv`` (the
20 costliest kernel names per case, as the profiler names them).  ``host.csv`` times how fast the
host issues an eager step's kernels: the same models shrunk until every kernel is shorter than
its launch, so the wall time of a forward, a backward, an optimizer step or whole steps back to
back is the host's (and one full-size step timed until it returns to the host).  ``layout.csv``
times the elementwise kernels of eager RoPE (multiply by a broadcast cos, add, cat) on the transposed
[b, heads, s, d] views the model feeds them and on contiguous copies of the same tensors: the
bandwidth PyTorch's strided, non-vectorised kernels reach.

Suite ``bigprofile`` (``run_big``) profiles the ``bigsteps`` cases, whole Llama-3-8B steps on one
H200, into the same ``profile.csv`` and ``profile_kernels.csv``.
"""
from __future__ import annotations

import csv
import functools
import os
import re
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from plansim.validation.runner import steps as _steps
from plansim.validation.runner.model import LlamaConfig, pick_attention
from plansim.validation.runner.timing import bench

#: (model, micro-batch, recompute); GPT-2 style configs run the eager 2021 GPT (gpt_model.py)
CASES = (("llama3.2-3b-untied", 4, "full"), ("llama3.2-3b-untied", 2, "none"), ("tinyllama-1.1b", 4, "none"),
         ("gpt-1.7b", 2, "none"), ("gpt-1.7b", 4, "full"))
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


def _build_step(model_name: str, mb: int, recompute: str, device: torch.device, seq: int = SEQ):
    """``step(i)`` of the steps suite's single-GPU training step for one model."""
    if model_name.startswith("gpt"):
        from plansim.validation.runner import gpt_model

        cfg = gpt_model.GPTConfig.named(model_name)
        model = gpt_model.build(cfg, device, 0, recompute=recompute)
    else:
        cfg = LlamaConfig.named(model_name)
        model = _steps._build(cfg, device, 0, recompute=recompute)
        pick_attention(model, device)
    opt, _ = _steps._optimizer(model.parameters(), device)
    return _steps._train_step(model, opt, _steps._batches(cfg, mb, seq, 2, device, 1), 1)


def profile_step(step, device: torch.device, steps_profiled: int = 3):
    """Wall seconds per step, {class: [kernels, seconds]} and {kernel name: seconds} per step."""
    for i in range(3):  # warm-up: allocator, cuBLAS heuristics, flash kernels
        step(i)
    torch.cuda.synchronize(device)
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
    return wall, by_class, by_name


def profile_rows(case_id: str, model_name: str, mb: int, recompute: str, wall: float, by_class, by_name):
    """``profile.csv`` rows (each class, the GPU-idle rest and the step) and ``profile_kernels.csv``
    rows (the 20 costliest kernels) of one profiled case."""
    base = {"case_id": case_id, "model": model_name, "micro_batch": mb, "recompute": recompute}
    busy = sum(s for _, s in by_class.values())
    rows = [dict(base, klass=k, kernels=round(c, 1), seconds=sec) for k, (c, sec) in sorted(by_class.items())]
    rows += [dict(base, klass="idle", kernels=0, seconds=max(0.0, wall - busy)),
             dict(base, klass="step", kernels=0, seconds=wall)]
    kernels = [{"case_id": case_id, "kernel": name[:200], "klass": classify(name), "seconds": sec}
               for name, sec in sorted(by_name.items(), key=lambda kv: -kv[1])[:20]]
    return rows, kernels


def run_dist_profile(case: dict, rank: int, world: int, device: torch.device) -> dict | None:
    """Profile one 2-rank case (suite ``parallel2``'s, or the steps suite's DDP and FSDP2) on every
    rank (inside ``_worker``); rank 0's rows, as ``{"case_id", "rows", "kernels"}``, or None on
    the other ranks."""
    import torch.distributed as dist

    from plansim.validation.runner import parallel2

    build = parallel2.build_dist_step if case["strategy"] in ("ep", "cp") else _steps.build_dist_step
    step, _ = build(case, rank, world, device)
    dist.barrier()
    wall, by_class, by_name = profile_step(step, device)
    del step
    _steps._free(device)
    dist.barrier()
    if rank != 0:
        return None
    rows, kernels = profile_rows(case["case_id"], case["model"], case["micro_batch"], case["recompute"], wall,
                                 by_class, by_name)
    return {"case_id": case["case_id"], "rows": rows, "kernels": kernels, "status": "ok"}


def _kernels(fn, before, device: torch.device) -> tuple[int, float]:
    """Kernel count and GPU seconds of ``before()`` (if any) and then ``fn()``, by the profiler."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        if before:
            before()
        fn()
        torch.cuda.synchronize(device)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(events), sum(e.time_range.elapsed_us() for e in events) / 1e6


HOST_COLUMNS = ("model", "phase", "kernels", "wall_s", "busy_s", "s_per_kernel")


def host_rows(device: torch.device, repeats: int = 20) -> list[dict]:
    """Host seconds per kernel of eager steps: each model shrunk (4 layers, hidden 256, vocab 1024,
    b = 1, s = 128) so that its kernels take less time than their launch; forward, backward and
    optimizer step timed apart, ``repeats`` times each between two synchronisations, and their
    kernels counted by the profiler (``busy_s``, the GPU's own time, shows the GPU was waiting);
    then ``steady_step``: ``repeats`` whole steps back to back with one synchronisation, the
    host's rate when it never waits for the GPU."""
    import dataclasses
    import time

    from plansim.validation.runner import gpt_model

    rows = []
    llama = dataclasses.replace(LlamaConfig.named("tinyllama-1.1b"), hidden=256, heads=4, kv_heads=2, head_dim=64,
                                ffn=512, vocab=1024, layers=4)
    gpt = dataclasses.replace(gpt_model.GPTConfig.named("gpt-1.7b"), hidden=256, heads=4, ffn=1024, vocab=1024,
                              layers=4)
    for name, cfg, build in (("llama", llama, lambda c: _steps._build(c, device, 0)),
                             ("gpt", gpt, lambda c: gpt_model.build(c, device, 0))):
        model = build(cfg)
        if name == "llama":
            pick_attention(model, device)
        opt, _ = _steps._optimizer(model.parameters(), device)
        forward, backward, step = _phases(model, opt, *_steps._batches(cfg, 1, 128, 1, device, 1)[0])
        for phase, fn, before in (("forward", forward, None), ("backward", backward, forward),
                                  ("optimizer", step, None)):
            walls = []
            for i in range(3 + repeats):  # three warm-ups; no profiler while timing (it slows the host)
                if before:
                    before()
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize(device)
                walls.append(time.perf_counter() - t0)
            kernels, busy = _kernels(fn, before, device)
            if before:  # its kernels are in the profile too
                kernels, busy = kernels - rows[-1]["kernels"], busy - rows[-1]["busy_s"]
            wall = statistics.median(walls[3:])
            rows.append({"model": name, "phase": phase, "kernels": kernels, "wall_s": wall, "busy_s": busy,
                         "s_per_kernel": wall / kernels})
        # whole steps back to back, one synchronisation at the end: the host never waits, as in
        # training (the per-phase rows above start each phase from an idle, synchronised host)
        per_step = rows[-3:]
        kernels, busy = sum(r["kernels"] for r in per_step), sum(r["busy_s"] for r in per_step)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            forward()
            backward()
            step()
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) / repeats
        rows.append({"model": name, "phase": "steady_step", "kernels": kernels, "wall_s": wall, "busy_s": busy,
                     "s_per_kernel": wall / kernels})
        opt.zero_grad(set_to_none=True)
        del model, opt, forward, backward, step
        _steps._free(device)
    rows.append(_enqueue_row("tinyllama-1.1b", 1, device))
    return rows


def _enqueue_row(model_name: str, mb: int, device: torch.device, repeats: int = 5) -> dict:
    """A full-size step (the steps suite's, no recomputation): seconds until ``step()`` returns to
    the host, before the GPU finishes (the host's issue time while the launch queue has room),
    its kernel count and the GPU's busy time."""
    import time

    step = _build_step(model_name, mb, "none", device)
    walls = []
    for i in range(3 + repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(i)
        walls.append(time.perf_counter() - t0)
    torch.cuda.synchronize(device)
    kernels, busy = _kernels(functools.partial(step, 0), None, device)
    del step
    _steps._free(device)
    wall = statistics.median(walls[3:])
    return {"model": f"{model_name}-mb{mb}-s{SEQ}", "phase": "enqueue", "kernels": kernels, "wall_s": wall,
            "busy_s": busy, "s_per_kernel": wall / kernels}


def _phases(model, opt, x, y):
    """A training step's three parts as functions: forward (keeps the loss), backward, optimizer."""
    state: dict = {}

    def forward():
        state["loss"] = model.loss(model(x), y)

    def backward():
        state.pop("loss").backward()

    return forward, backward, opt.step


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


def run(device: torch.device, quick: bool, out_dir: str, log=print, n_gpus: int = 1) -> list[str]:
    rows, kernel_rows = [], []
    for model_name, mb, recompute in CASES[:1] if quick else CASES:
        _profile_case(f"{model_name}-mb{mb}-s{SEQ}-rc{recompute}", model_name, mb, recompute, SEQ, device, log,
                      rows, kernel_rows)
    if n_gpus >= 2:
        from plansim.validation.runner import parallel2

        _steps._free(device)
        # expert parallelism, and data parallelism by DDP and FSDP2 (their steps measured the
        # furthest from the model: FSDP2 on TinyLlama 23 % slower than predicted)
        cases = ([c for c in parallel2.cases(quick, 2) if c["strategy"] == "ep"]
                 + [c for c in _steps.dist_cases(quick, 2) if c["strategy"] in ("ddp", "fsdp")])
        _profile_workers(cases, 2, device.type, quick, log, rows, kernel_rows)
    else:
        log("profile: expert-parallel, DDP and FSDP2 cases skipped, one GPU visible (needs 2)")
    host = host_rows(device)
    for r in host:
        log(f"host {r['model']} {r['phase']}: {r['kernels']:.0f} kernels, {r['s_per_kernel'] * 1e6:.1f} us/kernel "
            f"(GPU busy {r['busy_s'] / r['wall_s']:.0%})")
    layout = layout_rows(device)
    for r in layout:
        log(f"layout {r['op']} heads={r['heads']} {r['layout']}: {r['gbps']:.0f} GB/s")
    adamw = adamw_rows(device)
    for r in adamw:
        log(f"adamw {r['params'] / 1e9:.2f} B params ({r['optimizer']}): {r['time_s'] * 1e3:.2f} ms, {r['gbps']:.0f} GB/s")
    return _write(out_dir, {"profile.csv": (COLUMNS, rows), "profile_kernels.csv": (KERNEL_COLUMNS, kernel_rows),
                            "layout.csv": (LAYOUT_COLUMNS, layout), "adamw.csv": (ADAMW_COLUMNS, adamw),
                            "host.csv": (HOST_COLUMNS, host)})


def _profile_workers(cases: list[dict], nproc: int, device: str, quick: bool, log, rows: list, kernel_rows: list):
    """Profile ``cases`` on ``nproc`` torchrun'd ranks; rank 0's rows appended to ``rows``."""
    from plansim.validation.runner import WORKER_TIMEOUT_S
    from plansim.validation.runner.launch import run_workers

    for result in run_workers("profile", cases, nproc, device, quick, WORKER_TIMEOUT_S, log):
        if "rows" not in result:
            log(f"profile {result['case_id']}: {result.get('status')}")
            continue
        rows += result["rows"]
        kernel_rows += result["kernels"]
        _log_case(log, result["rows"])


def run_wrapped(cases: list[dict], device: str, quick: bool, out_dir: str, log=print) -> list[str]:
    """Suite ``fsdp1``'s profile: its one-rank DDP and FSDP2 steps under torch.profiler."""
    rows, kernel_rows = [], []
    _profile_workers(cases, 1, device, quick, log, rows, kernel_rows)
    return _write(out_dir, {"profile.csv": (COLUMNS, rows), "profile_kernels.csv": (KERNEL_COLUMNS, kernel_rows)})


KERNEL_COLUMNS = ("case_id", "kernel", "klass", "seconds")


def _write(out_dir: str, tables: dict[str, tuple[tuple[str, ...], list[dict]]]) -> list[str]:
    """Each ``name: (columns, rows)`` as a CSV in ``out_dir``; the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, (columns, data) in tables.items():
        paths.append(os.path.join(out_dir, name))
        with open(paths[-1], "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(data)
    return paths


def run_big(device: torch.device, quick: bool, out_dir: str, log=print) -> list[str]:
    """Suite ``bigprofile``: the ``bigsteps`` cases under torch.profiler (kernel time by class),
    to see where a whole Llama-3-8B step spends what plansim does not predict."""
    rows, kernel_rows = [], []
    for case in _steps.big_cases(quick):
        _profile_case(case["case_id"], case["model"], case["micro_batch"], case["recompute"], case["seq_len"], device,
                      log, rows, kernel_rows)
    return _write(out_dir, {"profile.csv": (COLUMNS, rows), "profile_kernels.csv": (KERNEL_COLUMNS, kernel_rows)})


def _profile_case(case_id: str, model_name: str, mb: int, recompute: str, seq: int, device: torch.device, log,
                  rows: list[dict], kernel_rows: list[dict]) -> None:
    """Build one single-GPU step, profile it, free it; append its ``profile.csv`` and
    ``profile_kernels.csv`` rows and log it."""
    step = _build_step(model_name, mb, recompute, device, seq)
    wall, by_class, by_name = profile_step(step, device)
    del step
    _steps._free(device)
    case_rows, case_kernels = profile_rows(case_id, model_name, mb, recompute, wall, by_class, by_name)
    rows += case_rows
    kernel_rows += case_kernels
    _log_case(log, case_rows)


def _log_case(log, case_rows: list[dict]) -> None:
    """One line per profiled case from its ``profile.csv`` rows: step, busy time, classes by time."""
    by = {r["klass"]: r["seconds"] for r in case_rows}
    step, _ = by.pop("step"), by.pop("idle")
    log(f"profile {case_rows[0]['case_id']}: step {step * 1e3:.1f} ms, busy {sum(by.values()) * 1e3:.1f} ms: "
        + ", ".join(f"{k} {sec * 1e3:.1f}" for k, sec in sorted(by.items(), key=lambda kv: -kv[1])))
