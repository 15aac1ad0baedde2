"""Suite ``power``: what the board power limit does to the clock under sustained load.

A GPU that runs dense tensor-core work for longer than its power controller's window settles at
a lower SM clock than it shows in a short benchmark (the board holds its power limit; the clock
pays).  Short kernel and step measurements see the boost clock; a training run of hours sees
the settled one.  This suite measures both, with the board's power, SM clock and temperature
sampled by ``nvidia-smi`` every 100 ms beside the work:

* ``gemm``: back-to-back 8192³ bf16 products for 60 s (TFLOP/s per 0.5 s window);
* ``hbm``: back-to-back 1 GiB elementwise adds (read 2, write 1) for 30 s (GB/s per window);
* ``mix-U``: loops of GEMMs then adds, sized so that the GEMMs take a fraction U of the time
  at boost clock, 30 s each (U = 0.75, 0.5, 0.25) — the duty-cycle evidence;
* ``step-<case>``: whole single-GPU training steps (the ``steps`` suite's model and step) run
  back to back for 60 s — the held-out check of the sustained prediction.

Writes ``power.csv`` (one row per window of each phase) and ``power_samples.csv`` (raw samples).
Idle gaps between phases let the card cool as it would between runs.

Suite ``powerkernels`` (``run_kernels``) streams one kernel at a time — GEMMs of the shapes the
steps suite's models run, flash attention forward + backward, an RMSNorm — for ``KERNEL_STREAM_S``
each, after a short boost-clock probe of the same kernel, and writes ``power_kernels.csv`` (one
row per window: the kernel's rate at the boost clock and in the window, board power, SM clock) and
``power_kernels_samples.csv``: what each kind of kernel draws, beyond the one large GEMM of
``power``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import subprocess
import tempfile
import time

import torch
from plansim.validation.runner.timing import sync

GEMM_N = 8192
ADD_ELEMS = 1 << 29  # 1 GiB of bf16 per operand
WINDOW_S = 0.5
STEP_PHASE_S = 40.0  # powersteps: seconds of back-to-back steps per case
SAMPLE_FIELDS = ("timestamp", "power.draw", "power.draw.instant", "clocks.sm", "clocks.mem", "temperature.gpu",
                 "clocks_event_reasons.sw_power_cap", "clocks_event_reasons.sw_thermal_slowdown",
                 "clocks_event_reasons.hw_slowdown")
COLUMNS = ("phase", "window", "t_start_s", "duration_s", "gemm_s", "other_s", "tflops", "gbps", "step_time_s",
           "power_w", "sm_clock_mhz", "temperature_c", "power_cap_active")


class Sampler:
    """``nvidia-smi --query-gpu ... -lms 100`` in the background, written to a CSV file."""

    def __init__(self, path: str, interval_ms: int = 100):
        fields = [f for f in SAMPLE_FIELDS if self._probe([f]) is not None]  # those this driver knows
        self.fields = fields
        self.path = path
        self._fh = open(path, "w")  # noqa: SIM115 - held open for the sampler's lifetime
        self._fh.write(",".join(fields) + "\n")
        self._fh.flush()
        self._proc = subprocess.Popen(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(fields)}",
                                       "--format=csv,noheader,nounits", f"-lms={interval_ms}"],
                                      stdout=self._fh, stderr=subprocess.DEVNULL)

    @staticmethod
    def _probe(fields):
        out = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(fields)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False)
        return out.stdout if out.returncode == 0 and "Field" not in out.stdout else None

    def stop(self) -> list[dict]:
        self._proc.terminate()
        self._proc.wait(timeout=10)
        self._fh.close()
        rows = []
        with open(self.path) as fh:
            for rec in csv.DictReader(fh, skipinitialspace=True):
                try:
                    stamp = _dt.datetime.strptime(rec["timestamp"].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                except (ValueError, KeyError):
                    continue
                rec["t"] = stamp
                rows.append(rec)
        return rows


def _num(value) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        return float("nan")


def _gemm_block(a, b, c, count):
    for _ in range(count):
        torch.matmul(a, b, out=c)


def _add_block(x, y, z, count):
    for _ in range(count):
        torch.add(x, y, out=z)


def _loop(seconds: float, gemms: int, adds: int, bufs, device) -> list[tuple[float, float, float]]:
    """(wall start, gemm seconds, add seconds) per iteration, iterations grouped into windows."""
    a, b, c, x, y, z = bufs
    out, pending = [], []
    t_end = time.time() + seconds
    while time.time() < t_end:
        t0 = time.time()
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        evs[0].record()
        _gemm_block(a, b, c, gemms)
        evs[1].record()
        _add_block(x, y, z, adds)
        evs[2].record()
        pending.append((t0, evs))
        if len(pending) > 32:  # keep the launch queue bounded without draining it
            pending[-32][1][2].synchronize()
    sync(device)
    for t0, evs in pending:
        out.append((t0, evs[0].elapsed_time(evs[1]) / 1e3, evs[1].elapsed_time(evs[2]) / 1e3))
    return out


def _windowed(marks):
    """(window start, values) for ``(wall start, value)`` marks grouped into ``WINDOW_S`` windows."""
    start, acc = None, []
    for t0, value in marks:
        start = t0 if start is None else start
        acc.append(value)
        if t0 - start >= WINDOW_S:
            yield start, acc
            start, acc = None, []


def _windows(phase: str, iters, t_origin: float, gemm_flops: float, add_bytes: float, gemms: int, adds: int):
    return [_window_row(phase, i, start - t_origin, acc, gemm_flops * gemms, add_bytes * adds)
            for i, (start, acc) in enumerate(_windowed((t0, (g, e)) for t0, g, e in iters))]


def _window_row(phase, index, t_start, acc, flops, nbytes):
    g = sum(x for x, _ in acc)
    e = sum(y for _, y in acc)
    return {"phase": phase, "window": index, "t_start_s": round(t_start, 3), "duration_s": g + e,
            "gemm_s": g, "other_s": e, "tflops": flops * len(acc) / g / 1e12 if g else None,
            "gbps": nbytes * len(acc) / e / 1e9 if e else None}


def _steps_phase(case: dict, seconds: float, device, t_origin: float, gap_s: float = 0.0) -> list[dict]:
    """Back-to-back training steps of a ``steps``-suite case for ``seconds``; one row per step.
    ``gap_s`` > 0 leaves the GPU idle that long after each step (the host waits, then launches)."""
    from plansim.validation.runner import steps
    from plansim.validation.runner.model import LlamaConfig, pick_attention

    cfg = LlamaConfig.named(case["model"])
    model = steps._build(cfg, device, 0, recompute=case["recompute"])
    pick_attention(model, device)
    opt, _ = steps._optimizer(model.parameters(), device)
    data = steps._batches(cfg, case["micro_batch"], case["seq_len"], 2, device, 1)
    step = steps._train_step(model, opt, data, case["num_microbatches"])
    for i in range(3):
        step(i)
    sync(device)
    events = []
    first = torch.cuda.Event(enable_timing=True)
    first.record()
    sync(device)
    t_first = time.time()
    t_end = t_first + seconds
    i = 0
    while time.time() < t_end:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step(3 + i)
        b.record()
        events.append((a, b))
        if gap_s:
            b.synchronize()
            time.sleep(gap_s)
        elif len(events) > 2:  # two steps in flight at most: the host never drains the queue
            events[-3][1].synchronize()
        i += 1
    sync(device)
    marks = [(t_first + first.elapsed_time(a) / 1e3, a.elapsed_time(b) / 1e3) for a, b in events]
    phase = f"step-{case['case_id']}" + (f"-gap{gap_s:g}" if gap_s else "")
    rows = [{"phase": phase, "window": k, "t_start_s": round(t0 - t_origin, 3),
             "duration_s": dt, "step_time_s": dt} for k, (t0, dt) in enumerate(marks)]
    del model, opt, data, step
    steps._free(device)
    return rows


GAPS_S = (0.5, 0.05)  # powergaps: idle seconds after each step


def run_gaps(device: torch.device, quick: bool, out_dir: str, log=print) -> list[str]:
    """Suite ``powergaps``: the ``powersteps`` Llama-3-8B step (full recomputation) with the GPU
    left idle ``GAPS_S`` after each step, ``STEP_PHASE_S`` each: does idle time between bursts of
    work raise the clock the work runs at (as a pipeline bubble or an exposed all-reduce would)?
    The samples inside each step's own window give its clock.  Writes power_gaps.csv."""
    from plansim.validation.runner.steps import BIG_MODEL, _case

    case = (_case("tiny", "single", mb=2, seq=64, recompute="full") if quick else
            _case(BIG_MODEL, "single", mb=1, seq=4096, recompute="full"))
    return _sampled(out_dir, "power_gaps", quick, COLUMNS, lambda t_origin: _step_phases(
        "powergaps", [(case, gap) for gap in GAPS_S], STEP_PHASE_S, quick, device, t_origin, log))


DUTY_PHASE_S = 20.0  # powerduty: seconds per duty cycle
DUTIES = (0.9, 0.8, 0.65)  # powerduty: share of time in GEMMs, the rest idle
PERIODS = 8  # powerduty: GEMM + idle periods per timed record


def run_duty(device: torch.device, quick: bool, out_dir: str, log=print) -> list[str]:
    """Suite ``powerduty``: one 8192³ GEMM, then the GPU idle (a one-thread spin kernel,
    ``torch.cuda._sleep``) for as long as makes the GEMMs a share U of the time, repeated for
    ``DUTY_PHASE_S`` at each U in ``DUTIES``.  A period of ~2 ms is far shorter than the power
    controller's averaging, so the board holds one clock per phase and the GEMMs' rate gives it:
    with the GEMM stream, how a GEMM's draw follows the clock (``validation/power.py``).  Writes
    power_duty.csv (``gemm_s`` GEMM time, ``other_s`` idle time per window) and its samples."""
    n = 1024 if quick else GEMM_N
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    flops = 2.0 * n ** 3
    for _ in range(5):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000)  # its first call carries a one-off setup cost
    torch.cuda.synchronize()
    e0.record()
    torch.cuda._sleep(10_000_000)
    e1.record()
    torch.cuda.synchronize()
    cycles_per_s = 10_000_000 / (e0.elapsed_time(e1) / 1e3)
    log(f"powerduty: the spin kernel runs {cycles_per_s / 1e6:.0f} M cycles/s")
    def measure(t_origin: float) -> list[dict]:
        rows: list[dict] = []
        for u in DUTIES:
            time.sleep(10 * (0.1 if quick else 1.0))
            e0.record()
            torch.matmul(a, b, out=c)
            e1.record()
            torch.cuda.synchronize()
            gap = int(cycles_per_s * e0.elapsed_time(e1) / 1e3 * (1 - u) / u)
            pending = []
            t_end = time.time() + DUTY_PHASE_S * (0.1 if quick else 1.0)
            while time.time() < t_end:
                t0 = time.time()
                evs = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                evs[0].record()
                torch.matmul(a, b, out=c)  # the first GEMM of 8 periods is timed alone: its rate
                evs[1].record()
                torch.cuda._sleep(gap)
                for _ in range(PERIODS - 1):
                    torch.matmul(a, b, out=c)
                    torch.cuda._sleep(gap)
                evs[2].record()
                pending.append((t0, evs))
                if len(pending) > 32:
                    pending[-32][1][2].synchronize()
            torch.cuda.synchronize()
            marks = ((t0, (evs[0].elapsed_time(evs[1]) / 1e3, evs[0].elapsed_time(evs[2]) / 1e3))
                     for t0, evs in pending)
            for i, (start, acc) in enumerate(_windowed(marks)):
                gemm = sum(g for g, _ in acc)  # one timed GEMM per record
                total = sum(t for _, t in acc)
                rows.append({"phase": f"duty-{u}", "window": i, "t_start_s": round(start - t_origin, 3),
                             "duration_s": total, "gemm_s": PERIODS * gemm, "other_s": total - PERIODS * gemm,
                             "tflops": flops * len(acc) / gemm / 1e12})
            log(f"powerduty {u}: {sum(r['phase'] == f'duty-{u}' for r in rows)} windows")
        return rows

    return _sampled(out_dir, "power_duty", quick, COLUMNS, measure)


def run_steps(device: torch.device, quick: bool, out_dir: str, log=print) -> list[str]:
    """Suite ``powersteps``: whole Llama-3-8B steps (the ``bigsteps`` cases with and without
    recomputation) run back to back for ``STEP_PHASE_S`` each, sampled as the ``power`` suite's
    step phases are; writes power_steps.csv and power_steps_samples.csv."""
    from plansim.validation.runner.steps import BIG_MODEL, _case

    cases = ([_case("tiny", "single", mb=2, seq=64, recompute="full")] if quick else
             [_case(BIG_MODEL, "single", mb=1, seq=4096, recompute=rc) for rc in ("full", "none")])
    return _sampled(out_dir, "power_steps", quick, COLUMNS, lambda t_origin: _step_phases(
        "powersteps", [(case, 0.0) for case in cases], STEP_PHASE_S, quick, device, t_origin, log))


def _sampled(out_dir: str, name: str, quick: bool, columns, measure) -> list[str]:
    """Run ``measure(t_origin)`` (its rows, timed from ``t_origin``) with the board sampled
    beside it; give each row its samples' power, clock and temperature, and write ``<name>.csv``
    and (unless ``quick``) ``<name>_samples.csv`` into ``out_dir``."""
    samples_path = os.path.join(out_dir, f"{name}_samples.csv")
    sampler = Sampler(samples_path if not quick else os.path.join(tempfile.mkdtemp(), "samples.csv"))
    t_origin = time.time()
    try:
        rows = measure(t_origin)
    finally:
        samples = sampler.stop()
    _attach_samples(rows, samples, t_origin)
    path = os.path.join(out_dir, f"{name}.csv")
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return [path] + ([samples_path] if not quick else [])


def _step_phases(label: str, phases, seconds: float, quick: bool, device, t_origin: float, log) -> list[dict]:
    """``_steps_phase`` for each ``(case, idle gap)``, 15 s apart (a tenth when ``quick``)."""
    scale = 0.1 if quick else 1.0
    rows: list[dict] = []
    for case, gap in phases:
        time.sleep(15 * scale)
        got = _steps_phase(case, seconds * scale, device, t_origin, gap_s=gap)
        rows += got
        log(f"{label} {got[0]['phase']}: {len(got)} steps, first {got[0]['step_time_s']:.4f} s, "
            f"last {got[-1]['step_time_s']:.4f} s")
    return rows


def _attach_samples(rows: list[dict], samples: list[dict], t_origin: float) -> None:
    """Mean power, SM clock and temperature of the samples inside each row's window."""
    for row in rows:
        lo = t_origin + row["t_start_s"]
        hi = lo + row["duration_s"]
        inside = [s for s in samples if lo <= s["t"] <= hi] or \
                 sorted(samples, key=lambda s: abs(s["t"] - (lo + hi) / 2))[:1]
        power_key = "power.draw.instant" if inside and "power.draw.instant" in inside[0] else "power.draw"
        for key, col in ((power_key, "power_w"), ("clocks.sm", "sm_clock_mhz"), ("temperature.gpu", "temperature_c")):
            vals = [_num(s.get(key)) for s in inside]
            vals = [v for v in vals if not math.isnan(v)]
            row[col] = round(sum(vals) / len(vals), 1) if vals else None
        caps = [str(s.get("clocks_event_reasons.sw_power_cap", "")).strip() for s in inside]
        row["power_cap_active"] = round(sum(c.lower() == "active" for c in caps) / len(caps), 2) if caps else None


def run(device: torch.device, quick: bool, out_dir: str, log=print) -> list[str]:
    """Run every phase; write power.csv and power_samples.csv into ``out_dir``."""
    scale = 0.1 if quick else 1.0
    gen = torch.Generator(device=device).manual_seed(0)
    n = 2048 if quick else GEMM_N
    elems = (1 << 24) if quick else ADD_ELEMS
    bf = torch.bfloat16
    bufs = (torch.randn(n, n, device=device, dtype=bf, generator=gen),
            torch.randn(n, n, device=device, dtype=bf, generator=gen), torch.empty(n, n, device=device, dtype=bf),
            torch.randn(elems, device=device, dtype=bf, generator=gen),
            torch.randn(elems, device=device, dtype=bf, generator=gen), torch.empty(elems, device=device, dtype=bf))
    gemm_flops, add_bytes = 2.0 * n ** 3, 3.0 * elems * 2
    # boost-clock cost of one GEMM and one add (short bursts after a 1 s spin-up)
    _loop(1.0 * scale + 0.2, 4, 4, bufs, device)
    probe = _loop(0.3, 4, 4, bufs, device)
    t_gemm = min(g for _, g, _ in probe) / 4
    t_add = min(e for _, _, e in probe) / 4
    from plansim.validation.runner.steps import _case

    step_cases = ([_case("tiny", "single", mb=2, seq=64, recompute="full")] if quick else
                  [_case("llama3.2-3b-untied", "single", mb=4, seq=2048, recompute="full"),
                   _case("tinyllama-1.1b", "single", mb=8, seq=2048, recompute="full")])

    def measure(t_origin: float) -> list[dict]:
        nonlocal bufs
        rows: list[dict] = []
        time.sleep(5 * scale)
        plan = [("gemm", 60, 8, 0), ("cool", 20, 0, 0), ("hbm", 30, 0, 8)]
        for u in (0.75, 0.5, 0.25):
            gemms = 8
            adds = max(1, round(gemms * t_gemm * (1 - u) / u / t_add))
            plan += [(f"mix-{u}", 30, gemms, adds), ("cool", 10, 0, 0)]
        for phase, seconds, gemms, adds in plan:
            if phase == "cool":
                time.sleep(seconds * scale)
                continue
            iters = _loop(seconds * scale, gemms, adds, bufs, device)
            got = _windows(phase, iters, t_origin, gemm_flops, add_bytes, gemms, adds)
            rows += got
            log(f"power {phase:<10} {len(got)} windows; first {got[0].get('tflops') or 0:.0f} TF/s "
                f"{got[0].get('gbps') or 0:.0f} GB/s, last {got[-1].get('tflops') or 0:.0f} TF/s "
                f"{got[-1].get('gbps') or 0:.0f} GB/s" if got else f"power {phase}: no windows")
        bufs = None  # the steps need the memory
        torch.cuda.empty_cache()
        return rows + _step_phases("power", [(case, 0.0) for case in step_cases], 60, quick, device, t_origin, log)

    return _sampled(out_dir, "power", quick, COLUMNS, measure)


KERNEL_STREAM_S = 8.0
KERNEL_COOL_S = 4.0
KERNEL_COLUMNS = ("phase", "kind", "window", "t_start_s", "duration_s", "calls", "flops_per_call", "bytes_per_call",
                  "boost_tflops", "boost_gbps", "tflops", "gbps", "power_w", "sm_clock_mhz", "temperature_c",
                  "power_cap_active")


def _kernel_cases(device, quick: bool, fp8: bool = False):
    """(phase, kind, fn, FLOPs per call, HBM bytes per call): each a closure over its own buffers.
    ``fp8``: the ``powerfp8`` cases instead, fp8 GEMMs (fast and split accumulation, as the
    ``fp8`` suite runs them) beside the bf16 8192³ reference on the same board."""
    import torch.nn.functional as F

    bf = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=bf, generator=gen)

    def gemm(m, n, k):
        a, b, c = rand(m, k), rand(k, n), torch.empty(m, n, device=device, dtype=bf)
        return (f"gemm-m{m}-n{n}-k{k}", "tensor", lambda: torch.matmul(a, b, out=c), 2.0 * m * n * k,
                2.0 * (m * k + k * n + m * n))

    def attention(b, h, kv, d, seq):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = rand(b, h, seq, d).requires_grad_()
        k, v = rand(b, kv, seq, d).requires_grad_(), rand(b, kv, seq, d).requires_grad_()
        grad = rand(b, h, seq, d)

        def fn():  # the flash backend, as every other suite forces it (left alone, SDPA may pick cuDNN)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)
            out.backward(grad)
        # causal forward + backward: 3.5 × the forward's 4·b·h·s²·d, halved by the mask
        return (f"attn-b{b}-h{h}-kv{kv}-d{d}-s{seq}-causal", "tensor", fn, 3.5 * 4.0 * b * h * seq * seq * d / 2,
                2.0 * b * (2 * h + 2 * kv) * seq * d * 2)

    def rmsnorm(tokens, hidden):
        x, w = rand(tokens, hidden), rand(hidden)
        return (f"rmsnorm-t{tokens}-h{hidden}", "memory", lambda: F.rms_norm(x, (hidden,), w), 0.0,
                2.0 * 2 * tokens * hidden)

    def gemm_fp8(m, n, k, impl: str):
        from plansim.validation.runner.fp8 import VARIANTS, scaled_mm

        a_dtype, w_dtype, fast = VARIANTS[impl]
        one = torch.ones((), device=device, dtype=torch.float32)
        a, w = rand(m, k).to(a_dtype), rand(n, k).to(w_dtype)
        return (f"gemm-fp8-{impl}-m{m}-n{n}-k{k}", "tensor", lambda: scaled_mm(a, w, fast, one),
                2.0 * m * n * k, m * k + k * n + 2.0 * m * n)

    if fp8:
        if quick:
            return [gemm_fp8(1024, 1024, 1024, "e4m3-fast")]
        return [gemm(8192, 8192, 8192), gemm_fp8(8192, 8192, 8192, "e4m3-fast"),
                gemm_fp8(8192, 8192, 8192, "e5m2-e4m3"), gemm_fp8(4096, 14336, 4096, "e4m3-fast")]
    if quick:
        return [gemm(1024, 1024, 1024), rmsnorm(1024, 1024)]
    return [gemm(8192, 8192, 8192), gemm(4096, 2048, 2048), gemm(16384, 5632, 2048), gemm(8192, 3072, 3072),
            gemm(8192, 8192, 3072), gemm(4096, 14336, 4096), attention(8, 32, 4, 64, 2048),
            attention(4, 24, 8, 128, 2048), rmsnorm(16384, 3072)]


def _stream(fn, seconds: float, calls: int) -> list[tuple[float, float]]:
    """(wall start, GPU seconds) of blocks of ``calls`` back-to-back calls for ``seconds``."""
    pending = []
    t_end = time.time() + seconds
    while time.time() < t_end:
        t0 = time.time()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        pending.append((t0, a, b))
        if len(pending) > 32:  # keep the launch queue bounded without draining it
            pending[-32][2].synchronize()
    torch.cuda.synchronize()
    return [(t0, a.elapsed_time(b) / 1e3) for t0, a, b in pending]


def run_kernels(device: torch.device, quick: bool, out_dir: str, log=print, fp8: bool = False) -> list[str]:
    """Stream each kernel of ``_kernel_cases``; write power_kernels.csv and power_kernels_samples.csv
    (``fp8``: the fp8 GEMMs, into power_fp8.csv and power_fp8_samples.csv)."""
    scale = 0.1 if quick else 1.0
    def measure(t_origin: float) -> list[dict]:
        rows: list[dict] = []
        time.sleep(KERNEL_COOL_S * scale)
        for phase, kind, fn, flops, nbytes in _kernel_cases(device, quick, fp8):
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            one = min(dt for _, dt in _stream(fn, 0.05, 1))
            calls = max(1, int(0.02 / max(one, 1e-6)))  # blocks of ~20 ms
            boost = min(dt for _, dt in _stream(fn, 0.2, calls)) / calls  # short bursts: the boost clock
            for i, (start, acc) in enumerate(_windowed(_stream(fn, KERNEL_STREAM_S * scale, calls))):
                n, busy = calls * len(acc), sum(acc)
                rows.append({"phase": phase, "kind": kind, "window": i,
                             "t_start_s": round(start - t_origin, 3), "duration_s": busy, "calls": n,
                             "flops_per_call": flops, "bytes_per_call": nbytes,
                             "boost_tflops": flops / boost / 1e12, "boost_gbps": nbytes / boost / 1e9,
                             "tflops": flops * n / busy / 1e12, "gbps": nbytes * n / busy / 1e9})
            last = [r for r in rows if r["phase"] == phase]
            if last:
                log(f"powerkernels {phase:<36} boost {last[-1]['boost_tflops']:.0f} TF/s "
                    f"{last[-1]['boost_gbps']:.0f} GB/s, sustained {last[-1]['tflops']:.0f} TF/s "
                    f"{last[-1]['gbps']:.0f} GB/s")
            time.sleep(KERNEL_COOL_S * scale)
        return rows

    return _sampled(out_dir, "power_fp8" if fp8 else "power_kernels", quick, KERNEL_COLUMNS, measure)
