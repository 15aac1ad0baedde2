"""Suite ``powerstream``: GEMMs timed inside a layer stream the way Vidur's profiler times them,
against the same GEMMs timed alone in short samples -> ``power_stream.csv``.

Vidur (vidur/profiling/mlp/mlp_wrapper.py, mlp_impl.py) runs, per token count, one untimed
forward of a 20-layer stack of one transformer layer's non-attention ops (embedding, RMSNorm,
fused QKV, RoPE, ``randn_like(q)`` for attention, output projection, residual add, RMSNorm,
gated up projection, SiLU-and-mul, down projection, add) and then one timed forward, each
kernel's time read from a profiler trace.  Kernels back to back for 20-350 ms let the power
controller settle, so a GEMM there runs at the clock the stream sustains, not at the
short-sample clock of the ``kernels`` suite.  ``validation.vidur.stream_slowdown`` predicts
that slowdown from the power model, for a fully settled clock; this suite measures it on our own
GPU for six configurations, each run in isolation: each GEMM's median time inside the timed
forward (CUDA events around it) against its time alone (``timing.bench`` after an idle second,
as the ``kernels`` suite times it), with the board sampled every 100 ms and ``GAP_S`` of idle
between configurations.  Then Vidur's own order: Llama-2 7B at every token count Vidur profiles
from 4,096 down to 1,024 (steps of 32, then 16: vidur/profiling/utils
``get_num_tokens_to_profile``), back to back with ``SWEEP_GAP_S`` between them, phases
``sweep-...``; every ``SWEEP_SHORT_EVERY``-th count's GEMMs are then timed alone, after the sweep,
and only those counts are written.  This tests whether the clock Vidur's H100 GEMMs ran at (the
reading of ``validation.vidur.stream_slowdown``) is what a long back-to-back sweep settles to.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from plansim.validation.runner.power import _sampled
from plansim.validation.runner.timing import bench, rotation_sets, sync

LAYERS = 20  # Vidur's ACTIVE_STEPS
GAP_S = 0.5
IDLE_BEFORE_SHORT_S = 1.0
GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
COLUMNS = ("phase", "model", "num_tokens", "num_tensor_parallel_workers", "n_embd", "n_head", "n_kv_head",
           "n_expanded_embd", "op", "m", "n", "k", "short_s", "stream_s", "t_start_s", "duration_s",
           "power_w", "sm_clock_mhz", "temperature_c", "power_cap_active")
#: (name, hidden, heads, kv heads, gated FFN width, vocabulary): Vidur's Llama-2 7B and 70B
MODELS = {"llama2-7b": (4096, 32, 32, 11008, 32000), "llama2-70b": (8192, 64, 8, 28672, 32000)}
CONFIGS = [("llama2-7b", t, 1) for t in (1024, 2048, 4096)] + [("llama2-70b", t, tp) for t, tp in
                                                                 ((2048, 4), (4096, 4), (4096, 8))]
#: Vidur's token counts from 4,096 down to 1,024, in its order (descending)
SWEEP = [("llama2-7b", t, 1) for t in sorted(set(range(1024, 2048, 16)) | set(range(2048, 4097, 32)), reverse=True)]
#: seconds between configurations of the sweep: an estimate of Vidur's per-configuration host
#: work (building the layer, its inputs and the profiler), not measured
SWEEP_GAP_S = 0.15
SWEEP_SHORT_EVERY = 8


def _shapes(model: str, tokens: int, tp: int) -> dict[str, tuple[int, int, int]]:
    """(m, n, k) of the layer's four GEMMs (validation.vidur.gemm_shapes, Vidur's mapping)."""
    h, heads, kv, f, _ = MODELS[model]
    d = h // heads
    q, k = heads * d // tp, kv * d // tp
    return {"attn_pre_proj": (tokens, q + 2 * k, h), "attn_post_proj": (tokens, h, q),
            "mlp_up_proj": (tokens, 2 * f // tp, h), "mlp_down_proj": (tokens, h, f // tp)}


class _Layer:
    """One Vidur layer's weights and its forward, with CUDA events around each GEMM."""

    def __init__(self, model: str, tokens: int, tp: int, device, gen):
        h, heads, kv, f, vocab = MODELS[model]
        d = h // heads
        self.q, self.k = heads * d // tp, kv * d // tp
        self.f = f // tp
        half = torch.float16

        def w(*shape):
            return torch.randn(*shape, device=device, dtype=half, generator=gen) * 0.02

        self.ids = torch.randint(0, vocab // tp, (tokens,), device=device, generator=gen)
        self.emb, self.norm1, self.norm2 = w(vocab // tp, h), w(h) + 1, w(h) + 1
        self.w = {"attn_pre_proj": w(h, self.q + 2 * self.k), "attn_post_proj": w(self.q, h),
                  "mlp_up_proj": w(h, 2 * self.f), "mlp_down_proj": w(self.f, h)}
        self.h = h
        self.events: dict[str, list] = {op: [] for op in GEMM_OPS}

    def _gemm(self, op: str, x, timed: bool):
        if not timed:
            return x @ self.w[op]
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y = x @ self.w[op]
        b.record()
        self.events[op].append((a, b))
        return y

    def forward(self, timed: bool):
        x = F.embedding(self.ids, self.emb)
        qkv = self._gemm("attn_pre_proj", F.rms_norm(x, (self.h,), self.norm1), timed)
        qk = qkv[:, :self.q + self.k]
        qk.mul_(0.5)  # RoPE's pass over q and k
        attn = torch.randn_like(qkv[:, :self.q])
        x = x + self._gemm("attn_post_proj", attn, timed)
        up = self._gemm("mlp_up_proj", F.rms_norm(x, (self.h,), self.norm2), timed)
        act = F.silu(up[:, :self.f]) * up[:, self.f:]
        return x + self._gemm("mlp_down_proj", act, timed)


def _stream_times(model: str, tokens: int, tp: int, device, gen) -> tuple[dict[str, float], float, float]:
    """Each GEMM's median time inside Vidur's timed forward, the forward's wall start and length."""
    layer = _Layer(model, tokens, tp, device, gen)
    with torch.inference_mode():
        for _ in range(LAYERS):  # Vidur's untimed forward
            layer.forward(timed=False)
        sync(device)
        start = time.time()
        for _ in range(LAYERS):
            layer.forward(timed=True)
        sync(device)
    stream = {op: statistics.median(a.elapsed_time(b) / 1e3 for a, b in ev) for op, ev in layer.events.items()}
    return stream, start, time.time() - start


def _short_times(model: str, tokens: int, tp: int, device, gen) -> dict[str, float]:
    """Each GEMM's short-sample time, after the GPU idled for ``IDLE_BEFORE_SHORT_S``."""
    layer = _Layer(model, tokens, tp, device, gen)
    time.sleep(IDLE_BEFORE_SHORT_S)
    out = {}
    for op, (m, n, k) in _shapes(model, tokens, tp).items():
        sets = rotation_sets(2 * (m * k + k * n + m * n), device)
        xs = [torch.randn(m, k, device=device, dtype=torch.float16, generator=gen) for _ in range(sets)]
        wt = layer.w[op]
        out[op] = statistics.median(bench(lambda i: xs[i] @ wt, device, n_sets=sets))
    return out


def _rows(cfg, stream, start, duration, short, t_origin: float) -> list[dict]:
    model, tokens, tp = cfg
    h, heads, kv, f, _ = MODELS[model]
    return [{"phase": f"{model}-T{tokens}-tp{tp}", "model": model, "num_tokens": tokens,
             "num_tensor_parallel_workers": tp, "n_embd": h, "n_head": heads, "n_kv_head": kv, "n_expanded_embd": f,
             "op": op, "m": m, "n": n, "k": k, "short_s": short[op], "stream_s": stream[op],
             "t_start_s": round(start - t_origin, 3), "duration_s": duration}
            for op, (m, n, k) in _shapes(model, tokens, tp).items()]


def run(device: torch.device, quick: bool, out_dir: str, log=print) -> list[str]:
    """Every configuration of ``CONFIGS`` (one small one when ``quick``); writes power_stream.csv
    and power_stream_samples.csv into ``out_dir``."""
    gen = torch.Generator(device=device).manual_seed(0)
    configs = [("llama2-7b", 256, 8)] if quick else CONFIGS

    sweep = [("llama2-7b", t, 8) for t in (512, 384, 256)] if quick else SWEEP

    def logged(got: list[dict]) -> list[dict]:
        log(f"powerstream {got[0]['phase']}: " + ", ".join(
            f"{r['op']} x{r['stream_s'] / r['short_s']:.3f}" for r in got))
        return got

    def measure(t_origin: float) -> list[dict]:
        rows: list[dict] = []
        for cfg in configs:
            stream, start, duration = _stream_times(*cfg, device, gen)
            rows += logged(_rows(cfg, stream, start, duration, _short_times(*cfg, device, gen), t_origin))
            time.sleep(GAP_S)
        streamed = []
        for cfg in sweep:  # back to back, as Vidur profiles
            streamed.append((cfg, *_stream_times(*cfg, device, gen)))
            time.sleep(SWEEP_GAP_S)
        for cfg, stream, start, duration in streamed[::SWEEP_SHORT_EVERY]:
            got = _rows(cfg, stream, start, duration, _short_times(*cfg, device, gen), t_origin)
            rows += logged([dict(r, phase=f"sweep-{r['phase']}") for r in got])
        return rows

    return _sampled(out_dir, "power_stream", quick, COLUMNS, measure)
