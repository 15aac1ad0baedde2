"""Suite ``gpt2021``: the operators and whole steps of Megatron-LM's 2021 GPT (unfused attention).

Writes ``kernels_gpt.csv`` (the kernels columns) and ``steps_gpt.csv`` (the steps columns); see
MEASURING.md, "Suite gpt2021".  Kernel kinds: ``bmm`` (attention's batched GEMMs: scores
``q·kᵀ`` by ``torch.baddbmm`` and context ``probs·v`` by ``torch.bmm``), ``softmax``,
``masked_softmax`` (in-place causal ``masked_fill_`` then softmax), ``dropout`` (p = 0.1,
training), ``dropout_add`` (``residual + dropout(x)``), ``gelu`` (tanh and exact) and
``bias_gelu`` (``gelu(x + bias)``, two eager kernels).  Steps: ``gpt_model.GPT`` on one GPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from plansim.validation.runner import steps as _steps
from plansim.validation.runner.gpt_model import GPTConfig, build
from plansim.validation.runner.kernels import DTYPES, _measure, _rand, _row, _start
from plansim.validation.runner.timing import rotation_sets

MODELS = ("gpt-1.7b",)
P_DROP = 0.1


# --- cases -------------------------------------------------------------------------------
def bmm_cases(quick: bool) -> list[tuple[int, int, int, str]]:
    """(batch = b·heads, s, d, dtype)."""
    if quick:
        return [(4, 64, 32, "bf16")]
    out = [(bt, s, d, "bf16") for d in (64, 96, 128) for s in (1024, 2048) for bt in (64, 384)]
    out += [(48, 2048, 96, "bf16"), (96, 2048, 96, "bf16")]  # gpt-1.7b, micro-batch 2 and 4
    out += [(384, 2048, 128, "fp16"), (64, 2048, 64, "fp16"), (96, 2048, 96, "fp16")]
    return out


def softmax_cases(quick: bool) -> list[tuple[int, int, str]]:
    """(batch·heads, s, dtype) of a [batch·heads, s, s] tensor."""
    if quick:
        return [(4, 64, "bf16")]
    return [(48, 2048, "bf16"), (96, 2048, "bf16"), (384, 1024, "bf16"), (384, 2048, "bf16"),
            (96, 2048, "fp16")]


def dropout_shapes(quick: bool) -> list[tuple[int, ...]]:
    if quick:
        return [(256, 128), (4, 64, 64)]
    return [(4096, 2304), (8192, 2304), (8192, 9216), (48, 2048, 2048), (96, 2048, 2048), (384, 2048, 2048)]


def gelu_shapes(quick: bool) -> list[tuple[int, int]]:
    """(tokens, 4h)."""
    if quick:
        return [(256, 512)]
    return [(4096, 9216), (8192, 9216), (16384, 9216), (8192, 16384)]


# --- kernels -----------------------------------------------------------------------------
def _bench_row(row, factory, device, samples, rate):
    with torch.no_grad():
        return _measure(row, factory, device, samples, rate=rate)


def run_kernels(device: torch.device, quick: bool, log=print) -> list[dict]:
    gen, samples, rows, emit = _start(device, quick, 4321, log)

    # --- attention's batched GEMMs ---------------------------------------------------------
    for bt, s, d, dt in bmm_cases(quick):
        dtype = DTYPES[dt]
        es = dtype.itemsize
        for op in ("scores", "context"):
            m, n, k = (s, s, d) if op == "scores" else (s, d, s)
            row = _row(f"bmm-{op}-{dt}-batch{bt}-s{s}-d{d}", kind="bmm", dtype=dt, m=m, n=n, k=k, batch=bt,
                       seq_len=s, head_dim=d, phase="forward", impl="baddbmm" if op == "scores" else "bmm",
                       flops=2 * bt * m * n * k, bytes=bt * (m * k + k * n) * es,
                       bytes_moved=bt * (m * k + k * n + m * n) * es)

            def factory(bt=bt, s=s, d=d, dtype=dtype, op=op, es=es):
                per = bt * (2 * s * d + s * s) * es
                sets = rotation_sets(per, device)
                if op == "scores":  # q [bt, s, d] · kᵀ, scale folded into alpha, beta 0 (Megatron)
                    xs = [(_rand((bt, s, d), dtype, device, gen), _rand((bt, s, d), dtype, device, gen),
                           torch.empty(bt, s, s, dtype=dtype, device=device)) for _ in range(sets)]
                    alpha = 1.0 / math.sqrt(d)
                    return (lambda i: xs[i][2].baddbmm_(xs[i][0], xs[i][1].transpose(1, 2), beta=0.0,
                                                        alpha=alpha)), sets
                xs = [(torch.softmax(_rand((bt, s, s), dtype, device, gen), -1), _rand((bt, s, d), dtype, device, gen),
                       torch.empty(bt, s, d, dtype=dtype, device=device)) for _ in range(sets)]
                return (lambda i: torch.bmm(xs[i][0], xs[i][1], out=xs[i][2])), sets

            emit(_bench_row(row, factory, device, samples, "tflops"))

    # --- softmax and causal masked softmax ----------------------------------------------------
    for bt, s, dt in softmax_cases(quick):
        dtype = DTYPES[dt]
        nbytes = bt * s * s * dtype.itemsize
        for kind in ("softmax", "masked_softmax"):
            # softmax reads and writes the tensor; masked_fill_ reads and writes it once more (the
            # [s, s] bool mask is broadcast and stays in L2)
            row = _row(f"{kind}-{dt}-batch{bt}-s{s}", kind=kind, dtype=dt, batch=bt, seq_len=s,
                       causal=kind == "masked_softmax", phase="forward", bytes=nbytes,
                       bytes_moved=(2 if kind == "softmax" else 4) * nbytes,
                       impl="torch.softmax" if kind == "softmax" else "masked_fill_+torch.softmax")

            def factory(bt=bt, s=s, dtype=dtype, kind=kind, nbytes=nbytes):
                sets = rotation_sets(2 * nbytes, device)
                xs = [_rand((bt, s, s), dtype, device, gen) for _ in range(sets)]
                if kind == "softmax":
                    return (lambda i: torch.softmax(xs[i], dim=-1)), sets
                mask = torch.ones(s, s, dtype=torch.bool, device=device).triu_(1)
                return (lambda i: torch.softmax(xs[i].masked_fill_(mask, -10000.0), dim=-1)), sets

            emit(_bench_row(row, factory, device, samples, "gbps"))

    # --- dropout and residual dropout-add --------------------------------------------------------
    for shape in dropout_shapes(quick):
        numel = math.prod(shape)
        nbytes = numel * 2
        tag = "x".join(str(x) for x in shape)
        # native dropout reads x, writes the output and a 1-byte bool mask: 2.5 bytes per input byte
        row = _row(f"dropout-bf16-shape{tag}", kind="dropout", dtype="bf16", tokens=numel // shape[-1],
                   hidden=shape[-1], phase="forward", impl="F.dropout(p=0.1)", bytes=nbytes,
                   bytes_moved=int(2.5 * nbytes))

        def factory(shape=shape, nbytes=nbytes):
            sets = rotation_sets(int(2.5 * nbytes), device)
            xs = [_rand(shape, torch.bfloat16, device, gen) for _ in range(sets)]
            return (lambda i: F.dropout(xs[i], P_DROP, training=True)), sets

        emit(_bench_row(row, factory, device, samples, "gbps"))
        if len(shape) == 2:
            # residual + dropout(x): the dropout (2.5) then the add (read 2, write 1): 5.5 per byte
            row = _row(f"dropout_add-bf16-shape{tag}", kind="dropout_add", dtype="bf16", tokens=shape[0],
                       hidden=shape[1], phase="forward", impl="r + F.dropout(x, p=0.1)", bytes=nbytes,
                       bytes_moved=int(5.5 * nbytes))

            def factory2(shape=shape, nbytes=nbytes):
                sets = rotation_sets(int(5.5 * nbytes), device)
                xs = [(_rand(shape, torch.bfloat16, device, gen), _rand(shape, torch.bfloat16, device, gen))
                      for _ in range(sets)]
                return (lambda i: xs[i][1] + F.dropout(xs[i][0], P_DROP, training=True)), sets

            emit(_bench_row(row, factory2, device, samples, "gbps"))

    # --- GELU and bias + GELU ---------------------------------------------------------------------
    for t, f in gelu_shapes(quick):
        nbytes = t * f * 2
        for kind, approx in (("gelu", "tanh"), ("gelu", "none"), ("bias_gelu", "tanh")):
            # gelu reads and writes [t, f]; eager bias_gelu is two kernels: add (read, write) then gelu
            row = _row(f"{kind}-{approx}-bf16-t{t}-f{f}", kind=kind, dtype="bf16", tokens=t, hidden=f,
                       phase="forward", impl=f"approximate={approx}", bytes=nbytes,
                       bytes_moved=(2 if kind == "gelu" else 4) * nbytes)

            def factory(t=t, f=f, approx=approx, kind=kind, nbytes=nbytes):
                sets = rotation_sets(2 * nbytes, device)
                xs = [_rand((t, f), torch.bfloat16, device, gen) for _ in range(sets)]
                if kind == "gelu":
                    return (lambda i: F.gelu(xs[i], approximate=approx)), sets
                bias = _rand((f,), torch.bfloat16, device, gen)
                return (lambda i: F.gelu(xs[i] + bias, approximate=approx)), sets

            emit(_bench_row(row, factory, device, samples, "gbps"))
    return rows


# --- steps -------------------------------------------------------------------------------
def step_cases(quick: bool) -> list[dict]:
    if quick:
        return [_steps._case("gpt-tiny", "single", mb=2, seq=64),
                _steps._case("gpt-tiny", "single", mb=2, seq=64, recompute="full"),
                _steps._case("gpt-tiny", "single", mb=1, nmb=2, seq=64)]
    out = []
    for m in MODELS:
        for mb, nmb, rc in ((2, 1, "none"), (4, 1, "none"), (2, 1, "full"), (4, 1, "full"), (2, 4, "none")):
            out.append(_steps._case(m, "single", mb=mb, nmb=nmb, seq=_steps.SEQ, recompute=rc))
    return out


def run_step(case: dict, device: torch.device, quick: bool) -> dict:
    cfg = GPTConfig.named(case["model"])
    extra = {"n_params": cfg.n_params(), "world_size": 1, "attn_impl": "unfused"}

    def build_checked():
        model = build(cfg, device, 0, recompute=case["recompute"])
        n = sum(p.numel() for p in model.parameters())
        if n != extra["n_params"]:
            raise AssertionError(f"{cfg.name}: {n} parameters built, {extra['n_params']} counted")
        return model

    return _steps.run_one(case, device, quick, cfg, extra, build_checked)


def run_steps(device: torch.device, quick: bool, log=print) -> list[dict]:
    return _steps.run_cases(step_cases(quick), run_step, device, quick, log)
