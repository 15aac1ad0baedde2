"""Suite ``collectives``: NCCL collectives as nccl-tests measures them (run inside ``_worker``).

Sizes follow nccl-tests' ``size`` column (the full buffer): all_reduce and broadcast the
tensor; all_gather the gathered output; reduce_scatter the input; all_to_all one rank's send
buffer; send_recv one message (each rank sends to rank+1 and receives from rank-1 at once,
as ``sendrecv_perf``).  algbw = size / time; busbw = algbw x factor (``common.BUSBW_FACTORS``,
nccl-tests doc/PERFORMANCE.md).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from plansim.validation.runner.common import BUSBW_FACTORS, summarize
from plansim.validation.runner.timing import Span, sync

KiB = 1 << 10
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv")


def sizes(quick: bool) -> list[int]:
    return [KiB * 4**i for i in range(3)] if quick else [KiB * 2**i for i in range(21)]  # 1 KiB .. 1 GiB


def group_sizes(world: int) -> list[int]:
    out = {world}
    g = 2
    while g < world:
        out.add(g)
        g *= 2
    return sorted(out)


def cases(world: int, quick: bool) -> list[dict]:
    return [{"case_id": f"{op}-bf16-n{gs}-bytes{nb}", "op": op, "bytes": nb, "group_size": gs}
            for gs in group_sizes(world) for op in OPS for nb in sizes(quick)]


def reps_for(nbytes: int) -> int:
    """Back-to-back ops per timed sample: about 1 ms of work per sample, 1..50 (same on every rank)."""
    est = 20e-6 + nbytes / 100e9
    return max(1, min(50, math.ceil(1e-3 / est)))


def warmup_for(nbytes: int) -> int:
    """Warm-up calls before timing: about 100 ms of work, at least 5 (same on every rank)."""
    est = 20e-6 + nbytes / 100e9
    return max(5, math.ceil(0.1 / est))


def run_case(case: dict, rank: int, world: int, groups: dict, device: torch.device, quick: bool):
    gs = case["group_size"]
    if rank >= gs:
        return None
    group = groups[gs]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.tensor([], dtype=dtype).element_size()
    nb, op = case["bytes"], case["op"]
    n = nb // es
    gen = torch.Generator(device=device).manual_seed(100 + rank)

    def rnd(k):
        return torch.randn(k, generator=gen, device=device, dtype=torch.float32).to(dtype)

    if op == "all_reduce":
        x = rnd(n)
        fn = lambda: dist.all_reduce(x, group=group)  # noqa: E731
    elif op == "all_gather":
        x, out = rnd(n // gs), torch.empty(n, dtype=dtype, device=device)
        fn = lambda: dist.all_gather_into_tensor(out, x, group=group)  # noqa: E731
    elif op == "reduce_scatter":
        x, out = rnd(n), torch.empty(n // gs, dtype=dtype, device=device)
        fn = lambda: dist.reduce_scatter_tensor(out, x, group=group)  # noqa: E731
    elif op == "all_to_all":
        x, out = rnd(n), torch.empty(n, dtype=dtype, device=device)
        fn = lambda: dist.all_to_all_single(out, x, group=group)  # noqa: E731
    elif op == "broadcast":
        x = rnd(n)
        src = dist.get_global_rank(group, 0) if group is not None else 0
        fn = lambda: dist.broadcast(x, src=src, group=group)  # noqa: E731
    elif op == "send_recv":
        x, out = rnd(n), torch.empty(n, dtype=dtype, device=device)
        peer_to = dist.get_global_rank(group, (rank + 1) % gs) if group is not None else (rank + 1) % gs
        peer_from = dist.get_global_rank(group, (rank - 1) % gs) if group is not None else (rank - 1) % gs

        def fn():
            ops = [dist.P2POp(dist.isend, x, peer_to, group), dist.P2POp(dist.irecv, out, peer_from, group)]
            for r in dist.batch_isend_irecv(ops):
                r.wait()
    else:
        raise ValueError(f"unknown op {op}")

    reps = reps_for(nb)
    n_samples = 3 if quick else 20
    # warm up for ~100 ms of collectives (the same count on every rank): short bursts leave the
    # SM clocks low, which NCCL's SM-driven copies feel, and small sizes would be timed slower
    # than they run inside a busy training step
    for _ in range(5 if quick else warmup_for(nb)):
        fn()
    sync(device)
    dist.barrier(group=group)
    spans = []
    for _ in range(n_samples):
        sp = Span(device)
        sp.start()
        for _ in range(reps):
            fn()
        sp.stop()
        spans.append(sp)
    sync(device)
    t = torch.tensor([sp.seconds() / reps for sp in spans], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if rank != 0:
        return None
    row = dict(case, dtype="bf16" if dtype == torch.bfloat16 else "fp32", world_size=world,
               reps_per_sample=reps, status="ok", **summarize(t.tolist()))
    row["algbw_GBps"] = nb / row["time_s"] / 1e9
    row["busbw_GBps"] = row["algbw_GBps"] * BUSBW_FACTORS[op](gs)
    return row
