"""Suite ``transfers``: H2D/D2H (pinned, pageable), disk with O_DIRECT, CPU AdamW throughput."""
from __future__ import annotations

import gc
import mmap
import os
import tempfile
import time

import torch

from plansim.validation.runner.common import error_status, row_logger, summarize
from plansim.validation.runner.timing import bench

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _fs_type(path: str) -> str:
    """Filesystem type of the mount holding ``path`` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best, fs = "", "unknown"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fs = parts[1], parts[2]
    except OSError:
        pass
    return fs


def run(device: torch.device, quick: bool, log=print, disk_dir: str | None = None) -> list[dict]:
    rows: list[dict] = []
    emit = row_logger(rows, log, "transfers", 52, ("gbps", "params_per_s"), ".4g")

    # --- host <-> device ------------------------------------------------------------------
    if device.type == "cuda":
        sizes = [64 * KiB * 4**i for i in range(8)] if not quick else [64 * KiB, 1 * MiB]
        top = max(sizes)
        host_src = torch.randint(0, 255, (top,), dtype=torch.uint8)
        pinned = torch.empty(top, dtype=torch.uint8, pin_memory=True)
        pinned.copy_(host_src)
        pageable = host_src.clone()
        dev = torch.randint(0, 255, (top,), dtype=torch.uint8, device=device)
        for direction in ("h2d", "d2h"):
            for mem, host in (("pinned", pinned), ("pageable", pageable)):
                for nbytes in sizes:
                    row = {"case_id": f"{direction}-{mem}-bytes{nbytes}", "kind": direction, "memory": mem,
                           "bytes": nbytes}
                    h, d = host[:nbytes], dev[:nbytes]
                    nb = mem == "pinned"
                    if direction == "h2d":
                        def fn(i, h=h, d=d, nb=nb):
                            d.copy_(h, non_blocking=nb)
                    else:
                        def fn(i, h=h, d=d, nb=nb):
                            h.copy_(d, non_blocking=nb)
                    try:
                        times = bench(fn, device, samples=5 if quick else 10, warmup=2, target_s=2e-3)
                        row.update(summarize(times), status="ok")
                        row["gbps"] = nbytes / row["time_s"] / 1e9
                    except Exception as exc:  # noqa: BLE001
                        row["status"] = error_status(exc)
                    emit(row)
        del host_src, pinned, pageable, dev
        gc.collect()
        torch.cuda.empty_cache()

    # --- disk, O_DIRECT -------------------------------------------------------------------
    rows_disk = _disk(disk_dir or os.getcwd(), quick)
    for r in rows_disk:
        emit(r)

    # --- CPU AdamW ------------------------------------------------------------------------
    for r in _cpu_adamw(quick):
        emit(r)
    return rows


def _disk(where: str, quick: bool) -> list[dict]:
    rows = []
    block = 8 * MiB
    sizes = [16 * MiB, 256 * MiB, 1 * GiB] if not quick else [16 * MiB]
    reps = 3
    fs = _fs_type(where)
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(block))
    tmpdir = tempfile.mkdtemp(prefix="plansim-disk-", dir=where)
    path = os.path.join(tmpdir, "odirect.bin")
    flag = getattr(os, "O_DIRECT", 0)
    try:
        slow = False
        for nbytes in sizes:
            for kind in ("disk_write", "disk_read"):
                row = {"case_id": f"{kind}-odirect-bytes{nbytes}", "kind": kind, "memory": "odirect",
                       "bytes": nbytes, "block_bytes": block, "fs": fs}
                if slow:
                    row["status"] = "skipped:disk too slow for this size in the time budget"
                    rows.append(row)
                    continue
                try:
                    if not flag:
                        raise OSError("O_DIRECT not available on this platform")
                    times = []
                    for _ in range(reps):
                        if kind == "disk_write":
                            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o600)
                            t0 = time.perf_counter()
                            done = 0
                            while done < nbytes:
                                done += os.write(fd, buf)
                            os.fsync(fd)
                            times.append(time.perf_counter() - t0)
                        else:
                            fd = os.open(path, os.O_RDONLY | flag)
                            t0 = time.perf_counter()
                            done = 0
                            while done < nbytes:
                                got = os.readv(fd, [buf])
                                if got <= 0:
                                    raise OSError(f"short read at {done} of {nbytes}")
                                done += got
                            times.append(time.perf_counter() - t0)
                        os.close(fd)
                    row.update(summarize(times), status="ok")
                    row["gbps"] = nbytes / row["time_s"] / 1e9
                    slow = slow or row["time_s"] * 4 * reps > 20.0  # the next size is 4x larger
                except Exception as exc:  # noqa: BLE001
                    row["status"] = error_status(exc)
                rows.append(row)
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
        os.rmdir(tmpdir)
        buf.close()
    return rows


def _cpu_adamw(quick: bool) -> list[dict]:
    """torch.optim.AdamW on fp32 CPU parameters: parameters per second by thread count."""
    rows = []
    n_tensors, per = (4, 1 << 16) if quick else (32, 1 << 20)
    params = n_tensors * per
    cpus = os.cpu_count() or 1
    threads = sorted({t for t in (1, 2, 4, 8, cpus) if t <= cpus})
    if quick:
        threads = threads[:2]
    old = torch.get_num_threads()
    gen = torch.Generator().manual_seed(7)
    for impl in ("foreach", "fused"):
        for nt in threads:
            row = {"case_id": f"adamw_cpu-fp32-{impl}-threads{nt}-params{params}", "kind": "adamw_cpu",
                   "memory": "host", "threads": nt, "params": params, "impl": impl}
            try:
                torch.set_num_threads(nt)
                ps = [torch.nn.Parameter(torch.randn(per, generator=gen)) for _ in range(n_tensors)]
                for p in ps:
                    p.grad = torch.randn(per, generator=gen) * 1e-3
                opt = torch.optim.AdamW(ps, lr=1e-4, **{impl: True})
                for _ in range(2):
                    opt.step()
                times = []
                for _ in range(3 if quick else 7):
                    t0 = time.perf_counter()
                    opt.step()
                    times.append(time.perf_counter() - t0)
                row.update(summarize(times), status="ok")
                row["params_per_s"] = params / row["time_s"]
            except Exception as exc:  # noqa: BLE001
                row["status"] = error_status(exc)
            finally:
                ps = opt = None
                torch.set_num_threads(old)
            rows.append(row)
    return rows
