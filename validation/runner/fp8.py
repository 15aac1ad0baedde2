"""Suite ``fp8``: fp8 GEMMs as Transformer Engine runs them on Hopper, beside bf16 on the same shapes.

Writes ``kernels.csv`` rows (kernels columns).  For every shape of the ``kernels`` suite whose
dimensions are multiples of 16 (what fp8 tensor-core GEMMs accept), three GEMMs
C[M,N] = A[M,K]·W[N,K]ᵀ with a bf16 output, timed like the ``kernels`` suite:

* ``impl = e4m3-fast``: both operands e4m3, fast accumulation: the forward (fprop) GEMM of
  Transformer Engine's default recipe (``torch._scaled_mm(..., use_fast_accum=True)``);
* ``impl = e5m2-e4m3``: an e5m2 operand (a gradient) times an e4m3 one, accumulation promoted
  to fp32 every few K steps: TE's dgrad and wgrad GEMMs (split accumulator on, its default);
* ``dtype = bf16``: the same shape in bf16 (``torch.mm``) on the same board in the same run, so
  that the fp8/bf16 ratio does not depend on which card or clock a stored run had.

And the cast that feeds them, ``kind = cast``: a bf16 tensor cast to e4m3 (reads 2 bytes and
writes 1 per element, ``bytes_moved``).  Per-tensor scales are 1 (scaling changes no
timing).  Each case follows ``REST_S`` of idle and is timed through a CUDA graph (``timing.bench(graph=True)``): ``_scaled_mm``
costs the host ~20 µs a call, longer than its small GEMMs run, and Transformer Engine issues them
from C++ (or CUDA graphs), not through that path.  CUDA only: fp8 GEMMs need sm_89 or newer.
"""
from __future__ import annotations

import time

import torch

from plansim.validation.runner.kernels import _measure, _rand, _row, _start, gemm_factory, gemm_shapes
from plansim.validation.runner.timing import rotation_sets, sync

#: idle before each case, so that every case is a short sample at the boost clock: back to back,
#: large fp8 and bf16 GEMMs alone hold the board at its power limit and the later ones run at the
#: settled clock (as in the ``powerstream`` suite's short samples)
REST_S = 1.0

#: impl -> (A's dtype, W's dtype, fast accumulation)
VARIANTS = {"e4m3-fast": (torch.float8_e4m3fn, torch.float8_e4m3fn, True),
            "e5m2-e4m3": (torch.float8_e5m2, torch.float8_e4m3fn, False)}


def scaled_mm(a, w, fast: bool, one):
    """A[m,k]·W[n,k]ᵀ in fp8 with unit per-tensor scales and a bf16 output, accumulating fast or
    with the split accumulator (``VARIANTS``)."""
    return torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=fast)


CAST_SHAPES = [(4096, 4096), (8192, 4096), (8192, 8192), (8192, 14336), (16384, 8192), (4096, 28672)]


def fp8_gemm_shapes(quick: bool) -> list[tuple[int, int, int]]:
    """The bf16 shapes of the ``kernels`` suite whose M, N and K are multiples of 16."""
    if quick:
        return [(512, 512, 512)]
    shapes = [(m, n, k) for m, n, k, dt in gemm_shapes(False) if dt == "bf16"]
    return [s for s in shapes if all(d % 16 == 0 for d in s)]


def run(device: torch.device, quick: bool, log=print) -> list[dict]:
    gen, samples, rows, emit = _start(device, quick, 8888, log)
    one = torch.ones((), dtype=torch.float32, device=device)

    def measure(row, factory, rate):
        if not quick:
            sync(device)
            time.sleep(REST_S)
        emit(_measure(row, factory, device, samples, rate=rate, graph=True))
    for m, n, k in fp8_gemm_shapes(quick):
        flops = 2 * m * n * k
        for impl, (a_dtype, w_dtype, fast) in VARIANTS.items():
            row = _row(f"gemm-fp8-{impl}-m{m}-n{n}-k{k}", kind="gemm", dtype="fp8", impl=impl, m=m, n=n, k=k,
                       flops=flops)

            def factory(m=m, n=n, k=k, a_dtype=a_dtype, w_dtype=w_dtype, fast=fast):
                sets = rotation_sets(m * k + n * k, device)
                ab = [(_rand((m, k), torch.bfloat16, device, gen).to(a_dtype),
                       _rand((n, k), torch.bfloat16, device, gen).to(w_dtype)) for _ in range(sets)]
                return (lambda i: scaled_mm(ab[i][0], ab[i][1], fast, one)), sets

            measure(row, factory, "tflops")
        row = _row(f"gemm-bf16-fp8ref-m{m}-n{n}-k{k}", kind="gemm", dtype="bf16", impl="fp8-reference", m=m, n=n,
                   k=k, flops=flops)
        measure(row, gemm_factory(m, n, k, torch.bfloat16, device, gen), "tflops")

    for t, h in (CAST_SHAPES if not quick else [(256, 512)]):
        numel = t * h
        row = _row(f"cast-fp8-t{t}-h{h}", kind="cast", dtype="bf16", impl="cast-fp8", tokens=t, hidden=h,
                   bytes=2 * numel, bytes_moved=3 * numel)

        def cast_factory(t=t, h=h, numel=numel):
            sets = rotation_sets(3 * numel, device)
            xs = [_rand((t, h), torch.bfloat16, device, gen) for _ in range(sets)]
            outs = [torch.empty((t, h), dtype=torch.float8_e4m3fn, device=device) for _ in range(sets)]
            return (lambda i: outs[i].copy_(xs[i])), sets

        measure(row, cast_factory, "gbps")
    return rows
