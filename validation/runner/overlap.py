"""Suite ``overlap``: a GEMM and an NCCL collective at the same time on the same GPUs.

plansim hides a collective behind the GEMM it runs beside (Megatron's asynchronous TP
all-reduce and reduce-scatter beside the weight-gradient GEMM, DP gradient reduction beside
backward) and assumes the GEMM keeps its own rate meanwhile.  NCCL's kernels occupy SMs and HBM
bandwidth, so both may slow down.  This suite measures by how much, the way Megatron overlaps:
one collective launched on a second stream and, right after it, the GEMMs it should hide behind
(as many as take about as long as the collective alone), then both streams wait for each other
before the next pair.  It times a pair alone (the two parts one after the other) and
together, every rank doing the same, and reports ``overlap_excess``: how much longer the pair
takes than perfect overlap, as a fraction of the shorter part:
(together − max(comm, gemms)) / min(comm, gemms); 0 is free overlap, 1 is none at all.

Run on 2 or more GPUs (not part of ``--suite all``)::

    python -m torch.distributed.run --standalone --nproc-per-node=2 validation/runner/overlap.py --out DIR

Writes ``overlap.csv`` (one row per pair, as each pair finishes) and ``provenance.json`` into DIR.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import faulthandler
import os
import statistics
import sys

if __package__ in (None, ""):  # run as a file from an uninstalled checkout
    import _bootstrap  # noqa: F401

import torch
import torch.distributed as dist

# (m, n, k): a Megatron weight-gradient GEMM of a 22B layer under TP 8 (dW = Xᵀ·dY: hidden ×
# columns, summed over 8192 tokens) and a square reference
GEMMS = {"wgrad-6144x2304x8192": (6144, 2304, 8192), "square-8192": (8192, 8192, 8192)}
COLLECTIVES = ("all_reduce", "reduce_scatter")
SIZES_MIB = (8, 32, 128, 256)
REPEATS = 5
LOOP_S = 0.1  # each loop lasts about this long alone
COLUMNS = ("gemm", "m", "n", "k", "collective", "size_bytes", "world", "gemms_per_pair", "gemm_alone_s",
           "comm_alone_s", "pair_together_s", "overlap_excess", "gemm_tflops_alone", "busbw_alone_GBps")


def _busbw(collective: str, size: int, seconds: float, world: int) -> float:
    factor = 2 * (world - 1) / world if collective == "all_reduce" else (world - 1) / world
    return size / seconds * factor / 1e9


def _collective(name: str, size: int, world: int, device: torch.device):
    """A closure running one collective of ``size`` bytes (nccl-tests' buffer convention)."""
    elems = size // 2 // world * world
    full = torch.randn(elems, device=device, dtype=torch.bfloat16)
    if name == "all_reduce":
        return lambda: dist.all_reduce(full)
    shard = torch.empty(elems // world, device=device, dtype=torch.bfloat16)
    return lambda: dist.reduce_scatter_tensor(shard, full)


def _loop(fn, count: int, stream: torch.cuda.Stream):
    """Enqueue ``count`` calls of ``fn`` on ``stream`` between two timing events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        for _ in range(count):
            fn()
        end.record()
    return start, end


def _seconds(events, count: int) -> float:
    return events[0].elapsed_time(events[1]) / 1e3 / count


def _alone(fn, count: int, stream) -> float:
    dist.barrier()
    events = _loop(fn, count, stream)
    torch.cuda.synchronize()
    return _seconds(events, count)


def _pairs(gemm, per_pair: int, comm, pairs: int, main, side) -> float:
    """Seconds per pair: the collective on ``side`` beside ``per_pair`` GEMMs on ``main``."""
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(main)
    for _ in range(pairs):
        side.wait_stream(main)
        with torch.cuda.stream(side):
            comm()
        for _ in range(per_pair):
            gemm()
        main.wait_stream(side)
    end.record(main)
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / pairs


def run(out_dir: str) -> None:
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(seconds=120))
    faulthandler.dump_traceback_later(240, exit=True)  # a hang prints where it is and ends the run
    rank, world = dist.get_rank(), dist.get_world_size()
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    writer = fh = None
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        fh = open(os.path.join(out_dir, "overlap.csv"), "w", newline="")  # noqa: SIM115 - rows as they come
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
    for gname, (m, n, k) in GEMMS.items():
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
        out = torch.empty(m, n, device=device, dtype=torch.bfloat16)

        def gemm(a=a, b=b, out=out) -> None:
            torch.matmul(a, b, out=out)

        for cname in COLLECTIVES:
            for mib in SIZES_MIB:
                size = mib << 20
                comm = _collective(cname, size, world, device)
                g1, c1 = _alone(gemm, 10, main), _alone(comm, 5, side)  # warm-up and sizing
                # every rank must run the same number of collectives: agree on the sizes
                counts = torch.tensor([max(1, round(c1 / g1)), max(3, round(LOOP_S / max(c1, g1)))], device=device)
                dist.all_reduce(counts, op=dist.ReduceOp.MAX)
                per_pair, pairs = (int(c) for c in counts.tolist())
                ga = statistics.median(_alone(gemm, pairs * per_pair, main) for _ in range(REPEATS))
                ca = statistics.median(_alone(comm, pairs, side) for _ in range(REPEATS))
                together = statistics.median(_pairs(gemm, per_pair, comm, pairs, main, side) for _ in range(REPEATS))
                parts = (ca, per_pair * ga)
                row = {"gemm": gname, "m": m, "n": n, "k": k, "collective": cname, "size_bytes": size, "world": world,
                       "gemms_per_pair": per_pair, "gemm_alone_s": ga, "comm_alone_s": ca,
                       "pair_together_s": together, "overlap_excess": (together - max(parts)) / min(parts),
                       "gemm_tflops_alone": 2 * m * n * k / ga / 1e12, "busbw_alone_GBps": _busbw(cname, size, ca, world)}
                if rank == 0:
                    writer.writerow(row)
                    fh.flush()
                    print(f"{gname} x{per_pair} beside {cname} {mib} MiB: comm {ca * 1e3:.3f} ms, gemms "
                          f"{per_pair * ga * 1e3:.3f} ms, together {together * 1e3:.3f} ms, excess "
                          f"{row['overlap_excess']:+.2f} ({row['gemm_tflops_alone']:.0f} TF/s, "
                          f"{row['busbw_alone_GBps']:.0f} GB/s alone)", flush=True)
        del a, b, out
    if rank == 0:
        from plansim.validation.runner import provenance
        fh.close()
        provenance.write(out_dir, provenance.collect(["overlap"], False, "cuda"))
    faulthandler.cancel_dump_traceback_later()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    run(p.parse_args(argv if argv is not None else sys.argv[1:]).out)


if __name__ == "__main__":
    main()
