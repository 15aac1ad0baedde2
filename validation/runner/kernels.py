"""Suite ``kernels``: GEMMs, SDPA flash attention, elementwise add, norms, device memcpy."""
from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from plansim.validation.runner.common import error_status, row_logger, summarize
from plansim.validation.runner.timing import bench, rotation_sets

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def gemm_shapes(quick: bool) -> list[tuple[int, int, int, str]]:
    """(M, N, K, dtype): C[M,N] = A[M,K] @ W[N,K]^T, the layout of nn.Linear's forward."""
    bf16: list[tuple[int, int, int]] = []
    # anchors
    bf16 += [(s, s, s) for s in (1024, 2048, 4096, 8192, 16384)]
    # Llama-3-8B (h 4096, q+kv 6144, ffn 14336), tokens 4096 and 8192; forward, dgrad, wgrad
    for t in (4096, 8192):
        bf16 += [(t, 6144, 4096), (t, 4096, 4096), (t, 14336, 4096), (t, 4096, 14336)]
    bf16 += [(8192, 4096, 6144), (8192, 14336, 4096 * 2)]  # dgrad of qkv, fused gate+up weight K
    bf16 += [(4096, 4096, 8192), (14336, 4096, 8192), (4096, 14336, 8192)]  # wgrad: K = tokens
    # Llama-2-70B / 3-70B (h 8192, qkv 10240, ffn 28672), tokens 4096; TP=8 shards
    bf16 += [(4096, 10240, 8192), (4096, 8192, 8192), (4096, 28672, 8192), (4096, 8192, 28672)]
    bf16 += [(4096, 1280, 8192), (4096, 8192, 1024), (4096, 3584, 8192), (4096, 8192, 3584)]
    # TinyLlama-1.1B (h 2048, qkv 2560, ffn 5632), tokens 4096 / 8192
    bf16 += [(4096, 2560, 2048), (4096, 2048, 2048), (8192, 5632, 2048), (8192, 2048, 5632)]
    # vocabulary-sized logits
    bf16 += [(4096, 128256, 4096), (8192, 32000, 2048), (4096, 50257, 12288 // 4), (2048, 128256, 8192),
             (8192, 64128, 4096)]
    # skinny decode shapes (M = batch of tokens)
    for m in (1, 8, 16, 32, 64):
        bf16 += [(m, 4096, 4096), (m, 14336, 4096)]
    bf16 += [(1, 128256, 4096), (32, 6144, 4096), (64, 8192, 28672), (16, 10240, 8192)]
    # odd sizes (tile and wave quantisation)
    bf16 += [(3000, 3000, 3000), (4095, 4097, 4096), (12288, 12288, 12288)]
    bf16 = list(dict.fromkeys(bf16))  # unique, in order
    shapes = [(m, n, k, "bf16") for m, n, k in bf16]
    few = [(4096, 4096, 4096), (8192, 8192, 8192), (4096, 14336, 4096), (16, 4096, 4096)]
    shapes += [(m, n, k, "fp16") for m, n, k in few + [(4096, 128256, 4096)]]
    shapes += [(m, n, k, "tf32") for m, n, k in few]
    shapes += [(m, n, k, "fp32") for m, n, k in few]
    if quick:
        shapes = [(512, 512, 512, "bf16"), (1, 1024, 512, "bf16"), (256, 1000, 512, "bf16"),
                  (512, 512, 512, "fp32"), (512, 512, 512, "tf32")]
    return shapes


def attention_cases(quick: bool) -> list[tuple[int, int, int, int, int]]:
    """(batch, heads, kv_heads, head_dim, seq_len)."""
    if quick:
        return [(1, 4, 2, 32, 128)]
    return [
        (1, 32, 32, 128, 2048), (1, 32, 32, 128, 4096), (1, 32, 32, 128, 8192),
        (4, 32, 8, 128, 2048), (2, 32, 8, 128, 4096), (1, 32, 8, 128, 8192),
        (1, 64, 8, 128, 4096), (1, 32, 4, 64, 2048), (8, 16, 16, 64, 1024), (2, 32, 4, 64, 4096),
        (1, 24, 8, 128, 16384), (16, 32, 8, 128, 512),
    ]


def _set_tf32(on: bool) -> None:
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
    except Exception:  # noqa: BLE001 - older torch
        torch.backends.cuda.matmul.allow_tf32 = on


def _row(case_id: str, **params) -> dict:
    return {"case_id": case_id, **params}


def _measure(row: dict, fn_factory, device, samples: int, warmup: int = 3, rate: str | None = None,
             graph: bool = False) -> dict:
    """Fill time columns of ``row`` from ``fn_factory() -> (fn, n_sets)``; OOM/errors recorded.
    ``rate`` ``"tflops"`` (from ``flops``) or ``"gbps"`` (from ``bytes_moved``) is filled when ok;
    ``graph`` times through a CUDA graph (``timing.bench``)."""
    try:
        fn, n_sets = fn_factory()
        times = bench(fn, device, n_sets=n_sets, samples=samples, warmup=warmup, graph=graph)
        row.update(summarize(times))
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure is a recorded status
        row["status"] = error_status(exc)
    finally:
        fn = None  # noqa: F841
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rate is not None and row["status"] == "ok":
        if rate == "tflops":
            row["tflops"] = row["flops"] / row["time_s"] / 1e12
        else:
            row["gbps"] = row["bytes_moved"] / row["time_s"] / 1e9
    return row


def _spin_up(device, seconds: float = 0.5) -> None:
    """Keep the GPU busy with large GEMMs for ``seconds`` so its clocks have left idle before the
    first case is timed (the first GEMM of the stored runs ran while clocks ramped)."""
    if device.type != "cuda":
        return
    import time
    a, b = (torch.randn(4096, 4096, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            torch.mm(a, b, out=c)  # random operands: zeros would draw less power than real work
        torch.cuda.synchronize(device)


def _start(device, quick: bool, seed: int, log):
    """(generator seeded ``seed``, samples per case, rows, ``emit(row)`` that logs and appends);
    spins the GPU up first."""
    if not quick:
        _spin_up(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    rows: list[dict] = []
    return gen, (5 if quick else 15), rows, row_logger(rows, log, "kernels", 58, ("tflops", "gbps"), ".1f")


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, dtype=torch.float32, device=device, generator=gen).to(dtype)


def gemm_factory(m: int, n: int, k: int, dtype, device, gen):
    """``_measure``'s factory for C[m,n] = A[m,k]·W[n,k]ᵀ in ``dtype`` (nn.Linear's forward layout)."""
    def factory():
        sets = rotation_sets((m * k + n * k) * dtype.itemsize, device)
        ab = [(_rand((m, k), dtype, device, gen), _rand((n, k), dtype, device, gen)) for _ in range(sets)]
        out = torch.empty((m, n), dtype=dtype, device=device)
        return (lambda i: torch.mm(ab[i][0], ab[i][1].t(), out=out)), sets
    return factory


def run(device: torch.device, quick: bool, log=print) -> list[dict]:
    gen, samples, rows, emit = _start(device, quick, 1234, log)

    # --- GEMM ------------------------------------------------------------------------------
    for m, n, k, dt in gemm_shapes(quick):
        dtype = DTYPES[dt]
        row = _row(f"gemm-{dt}-m{m}-n{n}-k{k}", kind="gemm", dtype=dt, m=m, n=n, k=k,
                   flops=2 * m * n * k)

        _set_tf32(dt == "tf32")
        _measure(row, gemm_factory(m, n, k, dtype, device, gen), device, samples, rate="tflops")
        _set_tf32(False)
        emit(row)

    # --- SDPA flash attention -------------------------------------------------------------
    _attention_rows(attention_cases(quick), device, gen, samples, emit)

    # --- elementwise add, norms, memcpy -----------------------------------------------------
    sizes = [1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB] if not quick else [1 * MiB]
    for dt in ("bf16", "fp32"):
        dtype = DTYPES[dt]
        for nbytes in (sizes if dt == "bf16" else sizes[1::2]):
            numel = nbytes // dtype.itemsize
            row = _row(f"add-{dt}-bytes{nbytes}", kind="elementwise", dtype=dt, bytes=nbytes,
                       bytes_moved=3 * nbytes)

            def factory(numel=numel, dtype=dtype, nbytes=nbytes):
                sets = rotation_sets(3 * nbytes, device)
                xs = [(_rand((numel,), dtype, device, gen), _rand((numel,), dtype, device, gen),
                       torch.empty(numel, dtype=dtype, device=device)) for _ in range(sets)]
                return (lambda i: torch.add(xs[i][0], xs[i][1], out=xs[i][2])), sets

            emit(_measure(row, factory, device, samples, rate="gbps"))

    norm_shapes = [(2048, 2048), (8192, 2048), (4096, 4096), (8192, 4096), (16384, 4096), (8192, 8192),
                   (4096, 3072)] if not quick else [(256, 512)]
    for kind in ("rmsnorm", "layernorm"):
        for t, hdim in norm_shapes:
            nbytes = t * hdim * 2
            row = _row(f"{kind}-bf16-t{t}-h{hdim}", kind=kind, dtype="bf16", tokens=t, hidden=hdim,
                       phase="forward", bytes=nbytes, bytes_moved=2 * nbytes)

            def factory(t=t, hdim=hdim, kind=kind, nbytes=nbytes):
                sets = rotation_sets(2 * nbytes, device)
                xs = [_rand((t, hdim), torch.bfloat16, device, gen) for _ in range(sets)]
                w = _rand((hdim,), torch.bfloat16, device, gen)
                bias = _rand((hdim,), torch.bfloat16, device, gen)
                if kind == "rmsnorm":
                    return (lambda i: F.rms_norm(xs[i], (hdim,), w, 1e-5)), sets
                return (lambda i: F.layer_norm(xs[i], (hdim,), w, bias, 1e-5)), sets

            with torch.no_grad():
                emit(_measure(row, factory, device, samples, rate="gbps"))

    for nbytes in ([1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB, 4 * GiB] if not quick else [1 * MiB]):
        row = _row(f"memcpy-bytes{nbytes}", kind="memcpy", dtype="uint8", bytes=nbytes, bytes_moved=2 * nbytes)

        def factory(nbytes=nbytes):
            sets = rotation_sets(2 * nbytes, device)
            src = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device, generator=gen)
                   for _ in range(sets)]
            dst = [torch.empty_like(x) for x in src]
            return (lambda i: dst[i].copy_(src[i])), sets

        emit(_measure(row, factory, device, samples, rate="gbps"))
    return rows


def _attention_rows(cases, device, gen, samples: int, emit, backend: str = "flash") -> None:
    """Forward and backward, causal and full, of every (batch, heads, kv_heads, head_dim, seq),
    on SDPA's ``backend`` (``flash``: FlashAttention-2; ``cudnn``: cuDNN's fused attention, the
    kernels Transformer Engine runs; its case ids start ``cudnn-``)."""
    prefix = "" if backend == "flash" else f"{backend}-"
    for b, h, g, d, s in cases:
        for causal in (True, False):
            for phase in ("forward", "backward"):
                fwd_flops = 4 * b * h * s * s * d // (2 if causal else 1)
                flops = fwd_flops if phase == "forward" else int(2.5 * fwd_flops)
                cid = (f"{prefix}attn-{'fwd' if phase == 'forward' else 'bwd'}-b{b}-h{h}-kv{g}-d{d}-s{s}-"
                       f"{'causal' if causal else 'full'}")
                row = _row(cid, kind="attention", dtype="bf16", batch=b, heads=h, kv_heads=g,
                           head_dim=d, seq_len=s, causal=causal, phase=phase, flops=flops)
                impl = {"name": ""}

                def factory(b=b, h=h, g=g, d=d, s=s, causal=causal, phase=phase, impl=impl):
                    return _attention_fn(b, h, g, d, s, causal, phase, device, gen, impl, backend)

                _measure(row, factory, device, samples, rate="tflops")
                row["impl"] = impl["name"]
                emit(row)


def attention_sweep_cases(quick: bool) -> list[tuple[int, int, int, int, int]]:
    """(batch, heads, kv_heads, head_dim, seq_len) of suite ``attention``: the shapes where the
    flash-attention model could go wrong and the ``kernels`` suite has none.  Few (batch, head)
    pairs, as tensor parallelism leaves per GPU (ragged last waves under a causal mask); long
    sequences; sequence lengths that are not a multiple of the 128-row blocks; head dims 64
    and 128; grouped and full key/value heads."""
    if quick:
        return [(1, 2, 1, 32, 200)]
    return [
        (1, 8, 1, 128, 8192), (1, 8, 8, 128, 16384), (1, 16, 2, 128, 8192), (1, 4, 1, 128, 32768),
        (1, 24, 8, 128, 4096), (1, 40, 8, 128, 8192), (3, 32, 8, 128, 2048), (1, 96, 8, 128, 2048),
        (8, 32, 8, 128, 4096), (4, 64, 8, 128, 1024), (4, 32, 8, 128, 1000), (1, 48, 8, 128, 3000),
        (1, 16, 16, 64, 4096), (4, 12, 12, 64, 2048), (2, 8, 8, 64, 8192), (2, 16, 16, 64, 3000),
        (1, 32, 32, 64, 16384), (16, 16, 16, 64, 512),
    ]


def run_attention_sweep(device: torch.device, quick: bool, log=print) -> list[dict]:
    """Suite ``attention``: SDPA flash attention over ``attention_sweep_cases`` (kernels columns)."""
    gen, samples, rows, emit = _start(device, quick, 4321, log)
    _attention_rows(attention_sweep_cases(quick), device, gen, samples, emit)
    return rows


def run_cudnn_attention(device: torch.device, quick: bool, log=print) -> list[dict]:
    """Suite ``cudnnattention``: the shapes of ``attention_cases`` and ``attention_sweep_cases`` on
    cuDNN's fused attention (SDPA's cuDNN backend), the kernels Megatron-Core runs through
    Transformer Engine on Hopper; GQA's K and V are expanded to every head before timing where
    the backend takes no native GQA (the work per head is the same)."""
    gen, samples, rows, emit = _start(device, quick, 5678, log)
    cases = attention_cases(quick) + ([] if quick else attention_sweep_cases(False))
    _attention_rows(cases, device, gen, samples, emit, backend="cudnn")
    return rows


def head_dim_cases(quick: bool) -> list[tuple[int, int, int, int, int]]:
    """(batch, heads, kv_heads, head_dim, seq_len) of suite ``headdims``: the head widths beyond the
    other suites' 64 and 128 (96; 192 as in DeepSeek's query/key heads; 256 as in Gemma), on which the
    attention model's head-width term is otherwise extrapolated."""
    if quick:
        return [(1, 2, 2, 96, 128)]
    return [(1, 32, 32, d, 4096) for d in (96, 192, 256)] + [(2, 16, 16, d, 8192) for d in (96, 192, 256)] \
        + [(4, 16, 4, d, 2048) for d in (96, 192, 256)]


def run_head_dims(device: torch.device, quick: bool, log=print) -> list[dict]:
    """Suite ``headdims``: ``head_dim_cases`` on SDPA's flash backend and on cuDNN's fused attention
    (kernels columns, split as any kernels row: half of them calibrate)."""
    gen, samples, rows, emit = _start(device, quick, 1357, log)
    for backend in ("flash", "cudnn"):
        _attention_rows(head_dim_cases(quick), device, gen, samples, emit, backend=backend)
    return rows


#: multi-head latent attention's core as DeepSeek-V3 runs it: query/key heads of 192 (128 + a
#: 64-wide rotary part), value heads of 128
MLA_QK_DIM, MLA_V_DIM = 192, 128


def mla_attention_cases(quick: bool) -> list[tuple[int, int, int]]:
    """(batch, heads, seq_len) of suite ``mlaattention``: DeepSeek-V3's 128 heads split over TP 8,
    4, 2 and 1, at its 4,096-token pre-training length, and longer."""
    if quick:
        return [(1, 2, 128)]
    return [(1, 16, 4096), (1, 32, 4096), (1, 64, 4096), (1, 128, 4096), (2, 16, 4096), (1, 16, 8192),
            (1, 32, 16384), (4, 32, 2048)]


def run_mla_attention(device: torch.device, quick: bool, log=print) -> list[dict]:
    """Suite ``mlaattention``: causal SDPA on cuDNN's fused attention with query/key heads of 192
    and value heads of 128 (``MLA_QK_DIM``, ``MLA_V_DIM``), forward and backward.  The rows record
    the mean head width (160) as ``head_dim`` and end ``impl`` with ``-mla-qk192-v128``, from which
    ``plansim validate`` takes the two widths; ``flops`` counts the backward as 2.5 forwards.  Case
    ids start ``mla-``: they test the costing of multi-head latent attention and are never fitted
    (``split_for``)."""
    gen, samples, rows, emit = _start(device, quick, 2468, log)
    qk, v = (MLA_QK_DIM, MLA_V_DIM) if not quick else (48, 32)
    for b, h, s in mla_attention_cases(quick):
        for phase in ("forward", "backward"):
            fwd_flops = 2 * b * h * s * s * (qk + v) // 2  # causal
            row = _row(f"mla-cudnn-attn-{'fwd' if phase == 'forward' else 'bwd'}-b{b}-h{h}-qk{qk}-v{v}-s{s}-causal",
                       kind="attention", dtype="bf16", batch=b, heads=h, kv_heads=h, head_dim=(qk + v) // 2,
                       seq_len=s, causal=True, phase=phase,
                       flops=fwd_flops if phase == "forward" else int(2.5 * fwd_flops))
            impl = {"name": ""}

            def factory(b=b, h=h, s=s, phase=phase, impl=impl):
                return _attention_fn(b, h, h, qk, s, True, phase, device, gen, impl, "cudnn", dv=v)

            _measure(row, factory, device, samples, rate="tflops")
            row["impl"] = f"{impl['name']}-mla-qk{qk}-v{v}"
            emit(row)
    return rows


def _attention_fn(b, h, g, d, s, causal, phase, device, gen, impl, backend: str = "flash", dv: int | None = None):
    """SDPA as PyTorch runs it; on CUDA the ``backend`` is forced (native GQA when it takes it);
    ``dv``: value heads of another width than the query/key heads ``d``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16
    dv = dv or d
    per_set = (b * s * (d * (h + g) + dv * (h + g))) * 2
    sets = rotation_sets(per_set, device, max_sets=4)
    qkv = [(_rand((b, h, s, d), dtype, device, gen), _rand((b, g, s, d), dtype, device, gen),
            _rand((b, g, s, dv), dtype, device, gen)) for _ in range(sets)]
    chosen = SDPBackend.CUDNN_ATTENTION if backend == "cudnn" else SDPBackend.FLASH_ATTENTION
    backends = [chosen] if device.type == "cuda" else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]

    def attend(q, k, v, native):
        if g != h and not native:
            k = k.repeat_interleave(h // g, dim=1)
            v = v.repeat_interleave(h // g, dim=1)
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=(g != h and native))

    native = True
    try:
        attend(*qkv[0], native=True)
    except RuntimeError:
        native = False
        attend(*qkv[0], native=False)
    if backend == "cudnn" and g != h and not native:  # expand outside the timed work
        qkv = [(q, k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)) for q, k, v in qkv]
        g, native = h, True
        impl["name"] = "cudnn-expanded_kv"
    else:
        impl["name"] = ((backend if device.type == "cuda" else "cpu")
                        + ("" if g == h else ("-gqa" if native else "-repeat_kv")))
    if phase == "forward":
        def fwd(i):
            with torch.no_grad():
                attend(*qkv[i], native=native)
        return fwd, sets
    graphs = []
    for q, k, v in qkv:
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        out = attend(q, k, v, native=native)
        graphs.append((out, (q, k, v), torch.randn_like(out)))

    def bwd(i):
        out, inputs, grad = graphs[i]
        torch.autograd.grad(out, inputs, grad, retain_graph=True)

    return bwd, sets
