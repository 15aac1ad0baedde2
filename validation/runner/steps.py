"""Suite ``steps``: whole training steps of a Llama-style model, precision ``bf16-pure``.

bf16 parameters, bf16 gradients, ``torch.optim.AdamW(fused=True)`` whose states (exp_avg,
exp_avg_sq) take the parameters' dtype, bf16 -> 2 + 2 + 2 + 2 = 8 bytes per parameter.
One step = ``num_microbatches`` forward+backward passes (loss / num_microbatches) then
``opt.step()`` and ``opt.zero_grad(set_to_none=True)``; timed with CUDA events around the
whole step, median of ``ITERS`` steps after ``WARMUP``; peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (reset after warm-up), max over ranks.
"""
from __future__ import annotations

import gc

import torch
import torch.distributed as dist

from plansim.validation.runner.common import error_status, summarize
from plansim.validation.runner.model import LlamaConfig, Transformer, init_weights, pick_attention
from plansim.validation.runner.timing import Span, sync

MODELS = ("tinyllama-1.1b", "llama3.2-3b-untied")
WARMUP, ITERS = 3, 10
SEQ = 2048


def _case(model, strategy, *, tp=1, pp=1, dp=1, mb, nmb=1, seq, recompute="none", schedule="-"):
    zero = 3 if strategy == "fsdp" else 0
    gb = mb * nmb * dp
    sched = f"-{schedule}" if schedule != "-" else ""
    cid = (f"{model}-{strategy}{sched}-tp{tp}-pp{pp}-dp{dp}-mb{mb}-nmb{nmb}-s{seq}-rc{recompute}")
    return {"case_id": cid, "model": model, "strategy": strategy, "tp": tp, "pp": pp, "dp": dp,
            "zero": zero, "micro_batch": mb, "global_batch": gb, "num_microbatches": nmb,
            "seq_len": seq, "recompute": recompute, "schedule": schedule, "precision": "bf16-pure"}


def single_cases(quick: bool) -> list[dict]:
    if quick:
        return [_case("tiny", "single", mb=2, seq=64), _case("tiny", "single", mb=2, seq=64, recompute="full"),
                _case("tiny", "single", mb=1, nmb=2, seq=64)]
    out = []
    for m in MODELS:
        for mb, nmb, rc in ((1, 1, "none"), (2, 1, "none"), (4, 1, "none"), (4, 1, "full"), (8, 1, "full"),
                            (2, 4, "none")):
            out.append(_case(m, "single", mb=mb, nmb=nmb, seq=SEQ, recompute=rc))
    return out


#: suite ``bigsteps``: a full Llama-3-8B on one GPU (bf16 weights, gradients and AdamW states:
#: 64 GB; 71.4 GiB at most with activations, within an 80 GB H100), the largest hidden size and
#: vocabulary we can step on one GPU
BIG_MODEL = "llama3-8b"


def big_cases(quick: bool) -> list[dict]:
    """Suite ``bigsteps``: whole Llama-3-8B steps on one GPU, with and without recomputation,
    at 4,096 and 8,192 tokens (quick: the tiny model)."""
    if quick:
        return [_case("tiny", "single", mb=1, seq=64, recompute="full")]
    return [_case(BIG_MODEL, "single", mb=mb, seq=seq, recompute=rc)
            for mb, seq, rc in ((1, 4096, "full"), (2, 4096, "full"), (1, 8192, "full"), (1, 4096, "none"))]


#: case keys that ask the runner for something and are not columns of the row it writes (the
#: row records what ran instead: ``attention`` asks for a backend, ``attn_impl`` names the one used)
REQUEST_KEYS = ("attention",)


def cudnn_cases(quick: bool) -> list[dict]:
    """Suite ``cudnnsteps``: the ``steps`` suite's single-GPU cases and ``bigsteps``' whole
    Llama-3-8B with SDPA on cuDNN's fused attention (case ids end ``-cudnn``)."""
    cases = single_cases(quick) + ([] if quick else big_cases(False))
    return [dict(c, case_id=f"{c['case_id']}-cudnn", attention="cudnn") for c in cases]


def sac_cases(quick: bool) -> list[dict]:
    """Suite ``sacsteps``: single-GPU steps under torchtitan's op-level selective AC
    (``recompute = "selective-op"``) beside the ``steps`` and ``bigsteps`` cases measured without
    recomputation and with full recomputation at the same micro-batches."""
    if quick:
        return [_case("tiny", "single", mb=2, seq=64, recompute="selective-op")]
    return ([_case(m, "single", mb=mb, seq=SEQ, recompute="selective-op") for m in MODELS for mb in (2, 4, 8)]
            + [_case(BIG_MODEL, "single", mb=mb, seq=seq, recompute="selective-op")
               for mb, seq in ((1, 4096), (2, 4096), (1, 8192))])


#: the suites of single-GPU steps beside ``steps``: suite -> its cases (``run_single`` runs each)
SINGLE_GPU_SUITES = {"bigsteps": big_cases, "cudnnsteps": cudnn_cases, "sacsteps": sac_cases}


def dist_cases(quick: bool, n: int = 2) -> list[dict]:
    """Cases for ``n`` = 2 ranks: DDP, FSDP2, TP=2, 2-stage PP (GPipe, 1F1B)."""
    models, seq, mb = (("tiny",), 64, 2) if quick else (MODELS, SEQ, 2)
    out = []
    for m in models:
        out += [_case(m, "ddp", dp=n, mb=mb, seq=seq), _case(m, "fsdp", dp=n, mb=mb, seq=seq),
                _case(m, "tp", tp=n, mb=mb, seq=seq),
                _case(m, "pp", pp=n, mb=1, nmb=8 if not quick else 4, seq=seq, schedule="gpipe"),
                _case(m, "pp", pp=n, mb=1, nmb=8 if not quick else 4, seq=seq, schedule="1f1b")]
    return out


def one_rank_cases(quick: bool) -> list[dict]:
    """Suite ``fsdp1``: DDP and FSDP2 on a single rank beside the plain single-GPU step, same
    model and micro-batch: what the wrappers cost with no peer to talk to (FSDP2 still copies
    parameters into and out of its all-gather buffers and gradients into its reduce-scatter's)."""
    models, seq, mb = (("tiny",), 64, 2) if quick else (MODELS, SEQ, 2)
    return [_case(m, strategy, mb=mb, seq=seq) for m in models for strategy in ("single", "ddp", "fsdp")]


def _optimizer(params, device):
    params = list(params)
    for impl in ("fused", "foreach"):
        try:
            opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **{impl: True})
            return opt, f"adamw-{impl}"
        except (RuntimeError, TypeError, ValueError):
            continue
    return torch.optim.AdamW(params, lr=1e-4), "adamw"


def _batches(cfg: LlamaConfig, rows: int, seq: int, count: int, device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(count):
        t = torch.randint(0, cfg.vocab, (rows, seq + 1), device=device, generator=gen)
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def _build(cfg, device, seed, **kw) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg, **kw)
    model = model.to(torch.bfloat16)
    model.to_empty(device=device)
    init_weights(model, seed)
    return model


def _time_steps(step, device, quick: bool):
    """Run ``step(i)`` ``WARMUP`` times, then time ``ITERS`` steps (1 and 3 when ``quick``)."""
    warmup, iters = (1, 3) if quick else (WARMUP, ITERS)
    for i in range(warmup):
        step(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    spans = []
    for i in range(iters):
        sp = Span(device)
        sp.start()
        step(warmup + i)
        sp.stop()
        spans.append(sp)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return [sp.seconds() for sp in spans], peak


def _train_step(model, opt, data, nmb: int, loss=None):
    """``step(i)``: ``nmb`` micro-batches of ``data`` forward and backward (loss / nmb), then
    ``opt.step()`` and ``opt.zero_grad(set_to_none=True)``.  ``loss`` defaults to ``model.loss``."""
    loss = loss or model.loss

    def step(i):
        for j in range(nmb):
            x, y = data[(i * nmb + j) % len(data)]
            (loss(model(x), y) / nmb).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _finish(case, times, peak, extra) -> dict:
    row = dict(case, **extra, **summarize(times), status="ok")
    row["step_time_s"] = row["time_s"]
    row["peak_memory_bytes"] = int(peak)
    row["tokens_per_s"] = case["global_batch"] * case["seq_len"] / row["time_s"]
    return row


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- one process ------------------------------------------------------------------------
def run_one(case: dict, device: torch.device, quick: bool, cfg, extra: dict, build) -> dict:
    """One single-process case: ``build()`` returns the bf16 model (and may fill ``extra``); the
    optimizer, ``max(2, nmb)`` micro-batches of tokens (seed 1) and the timed steps follow."""
    state = {}
    try:
        model = state["model"] = build()
        opt, extra["optimizer"] = _optimizer(model.parameters(), device)
        state["opt"] = opt
        nmb = case["num_microbatches"]
        data = _batches(cfg, case["micro_batch"], case["seq_len"], max(2, nmb), device, 1)
        step = _train_step(model, opt, data, nmb)
        times, peak = _time_steps(step, device, quick)
        return _finish(case, times, peak, extra)
    except Exception as exc:  # noqa: BLE001 - OOM and errors are recorded, the suite goes on
        return dict(case, **extra, status=error_status(exc))
    finally:
        state.clear()
        model = opt = data = step = None  # noqa: F841
        _free(device)


def run_single(case: dict, device: torch.device, quick: bool) -> dict:
    cfg = LlamaConfig.named(case["model"])
    extra = {"n_params": cfg.n_params(), "world_size": 1}

    def build():
        model = _build(cfg, device, 0, recompute=case["recompute"])
        extra["attn_impl"] = pick_attention(model, device, case.get("attention", "flash"))
        return model

    return run_one({k: v for k, v in case.items() if k not in REQUEST_KEYS}, device, quick, cfg, extra, build)


def run_cases(cases, run_case, device: torch.device, quick: bool, log=print) -> list[dict]:
    """``run_case(case, device, quick)`` for each case, one log line per row."""
    rows = []
    for case in cases:
        row = run_case(case, device, quick)
        log(f"steps {row['case_id']:<62} {row.get('time_s', float('nan')):.4f} s  "
            f"{row.get('peak_memory_bytes', 0) / 2**30:.1f} GiB {row['status']}")
        rows.append(row)
    return rows


def run(device: torch.device, quick: bool, log=print) -> list[dict]:
    return run_cases(single_cases(quick), run_single, device, quick, log)


# --- several processes (inside _worker, process group initialised) ----------------------
def run_dist_case(case: dict, rank: int, world: int, device: torch.device, quick: bool):
    """Run one 2-rank case; returns the row on rank 0 (None elsewhere).  Raises on failure."""
    if case["strategy"] in ("ep", "cp"):  # suite parallel2
        from plansim.validation.runner import parallel2

        return parallel2.run_dist_case(case, rank, world, device, quick)
    step, extra = build_dist_step(case, rank, world, device)
    row = time_dist(case, step, device, quick, extra)
    step = None  # noqa: F841 (the step holds the model, optimizer and data: let them go)
    _free(device)
    dist.barrier()
    return row


def build_dist_step(case: dict, rank: int, world: int, device: torch.device):
    """``(step, extra)`` of one DDP, FSDP2, TP or PP case on this rank: ``step(i)`` runs training
    step ``i``; ``extra`` holds the row's descriptive columns (parameters, attention, optimizer)."""
    cfg = LlamaConfig.named(case["model"])
    n = case["tp"] * case["pp"] * case["dp"]
    if n != world:
        raise ValueError(f"case needs {n} ranks, world is {world}")
    extra = {"n_params": cfg.n_params(), "world_size": world}
    nmb, mb, seq = case["num_microbatches"], case["micro_batch"], case["seq_len"]
    strategy = case["strategy"]
    rc = case["recompute"]

    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        inner = _build(cfg, device, 0, recompute=rc)  # same seed on every rank; DDP broadcasts anyway
        extra["attn_impl"] = pick_attention(inner, device)
        model = DDP(inner, device_ids=[device.index] if device.type == "cuda" else None)
        opt, extra["optimizer"] = _optimizer(model.parameters(), device)
        data = _batches(cfg, mb, seq, max(2, nmb), device, 10 + rank)
        step = _train_step(model, opt, data, nmb, loss=inner.loss)

    elif strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
        with torch.device("meta"):
            model = Transformer(cfg, recompute=rc)
        model = model.to(torch.bfloat16)
        for blk in model.layers.values():
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device=device)
        init_weights(model, rank)
        extra["attn_impl"] = pick_attention(model, device)
        opt, extra["optimizer"] = _optimizer(model.parameters(), device)
        data = _batches(cfg, mb, seq, max(2, nmb), device, 10 + rank)
        step = _train_step(model, opt, data, nmb)

    elif strategy == "tp":
        group = dist.group.WORLD
        model = _build(cfg, device, 1 + rank, tp=world, tp_rank=rank, tp_group=group, recompute=rc)
        extra["attn_impl"] = pick_attention(model, device)
        opt, extra["optimizer"] = _optimizer(model.parameters(), device)
        data = _batches(cfg, mb, seq, max(2, nmb), device, 10)  # same tokens on every TP rank
        step = _train_step(model, opt, data, nmb)

    elif strategy == "pp":
        from plansim.validation.runner.pipeline import StageRunner

        pp = world
        per = [cfg.layers // pp + (1 if s < cfg.layers % pp else 0) for s in range(pp)]
        lo = sum(per[:rank])
        first, last = rank == 0, rank == pp - 1
        model = _build(cfg, device, 1 + rank, layer_range=(lo, lo + per[rank]), first=first, last=last,
                       recompute=rc)
        extra["attn_impl"] = pick_attention(model, device)
        opt, extra["optimizer"] = _optimizer(model.parameters(), device)
        runner = StageRunner(model, rank, pp, (mb, seq, cfg.hidden), torch.bfloat16, device)
        schedule = {"gpipe": runner.gpipe, "1f1b": runner.one_f_one_b}[case["schedule"]]
        # the same tokens on every stage: stage 0 embeds them, the last stage takes the targets
        data = [_batches(cfg, mb, seq, nmb, device, 10 + 100 * b) for b in range(2)]
        dist.barrier()

        def step(i):
            batch = data[i % len(data)]
            schedule([x for x, _ in batch], [y for _, y in batch])
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"unknown strategy {strategy}")
    return step, extra


def time_dist(case: dict, step, device: torch.device, quick: bool, extra: dict):
    """Time ``step`` on every rank; per step the max over ranks, peak memory the max over ranks;
    the row on rank 0 (None elsewhere)."""
    times, peak = _time_steps(step, device, quick)
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    pk = torch.tensor([float(peak)], dtype=torch.float64, device=device)
    dist.all_reduce(pk, op=dist.ReduceOp.MAX)
    return _finish(case, t.tolist(), pk.item(), extra) if dist.get_rank() == 0 else None
