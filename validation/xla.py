"""OpenXLA's published GEMM and collective tables as measurement folders plansim can score.

OpenXLA embeds in its GPU cost model throughput tables its developers measured on 8-GPU hosts:
GEMMs (CUPTI kernel time) and NCCL collectives (event timer around the executable) on H100
(``sm_90``) and B200 (``sm_100``); ``validation/reference/xla/`` holds them as published, with
their commits and definitions.  This module rewrites them in the runner's schema
(``plansim.validation.runner.common.COLUMNS``) as ``validation/data/xla-h100-x8`` and
``xla-b200-x8``, so that ``plansim calibrate`` and ``plansim validate`` treat them like any
folder:

* H100: every row is ``evaluation``.  The H100 is calibrated on this project's own
  measurements; XLA's rows are independent evidence (and its only 8-GPU collectives).
* B200: nothing of ours was measured on one, so the rows split by the runner's rule
  (``split_for``): half calibrate the B200 profile, the other half score it.

Kept: bf16 GEMMs everywhere; fp8 (e4m3 × e4m3, bf16 out) on the B200 only, since XLA's
``sm_90`` fp8 rows run up to 1.3× the H100's dense fp8 peak (its kernel-median timing cannot
be a whole GEMM there); f32 GEMMs are left out (whether they ran as TF32 is not recorded).
Collectives: all-reduce, all-gather, reduce-scatter and all-to-all on groups of 2, 4 and 8 (all
groups of the host at once).  XLA's byte count is the HLO result (reduce-scatter: its operand),
nccl-tests' ``size`` convention, so ``time_s`` is that count over the published throughput.
Permutes are left out: 100 of them in an XLA while loop, whose times stay near 0.85 ms from
64 MiB to 128 MiB, are no point-to-point send's cost.

    python -m plansim.validation.xla        # rewrites validation/data/xla-*-x8 from the tables
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from plansim.validation.compare import DATA_DIR, VALIDATION_DIR, XLA_PREFIX
from plansim.validation.runner.common import BUSBW_FACTORS, COLUMNS, split_for

TABLES = VALIDATION_DIR / "reference" / "xla"


class XlaGpu(NamedTuple):
    folder: str  # the data folder written
    gpu_name: str  # as the runner would record it
    held_out: bool  # every row ``evaluation`` (the GPU is calibrated on our own measurements)
    fp8: bool  # keep the fp8 GEMMs


GPUS = {"sm_90": XlaGpu(f"{XLA_PREFIX}h100-x8", "NVIDIA H100 (OpenXLA sm_90 table)", held_out=True, fp8=False),
        "sm_100": XlaGpu(f"{XLA_PREFIX}b200-x8", "NVIDIA B200 (OpenXLA sm_100 table)", held_out=False, fp8=True)}
GEMM_DTYPES = {"bf16xbf16->bf16": ("bf16", "xla"), "f8e4m3fnxf8e4m3fn->bf16": ("fp8", "xla-e4m3")}
COLLECTIVE_OPS = {"all-reduce": "all_reduce", "all-gather": "all_gather", "reduce-scatter": "reduce_scatter",
                  "all-to-all": "all_to_all"}
#: XLA's profiling runs per GEMM (matmul_perf_table_gen) and per collective (5 before e2a7ce36)
GEMM_RUNS, COLLECTIVE_RUNS = 10, 5


def _split(suite: str, case_id: str, held_out: bool) -> str:
    return "evaluation" if held_out else split_for(suite, case_id)


def kernels_frame(gpu_key: str) -> pd.DataFrame:
    """XLA's GEMMs of one GPU as ``kernels.csv`` rows (``bmm`` where the batch exceeds 1)."""
    gpu = GPUS[gpu_key]
    table = pd.read_csv(TABLES / f"matmul_{gpu_key.replace('_', '')}.csv")
    rows = []
    for r in table.itertuples():
        if r.dtypes not in GEMM_DTYPES:
            continue
        dtype, impl = GEMM_DTYPES[r.dtypes]
        if dtype == "fp8" and not gpu.fp8:
            continue
        b, m, n, k = int(r.b), int(r.m), int(r.n), int(r.k)
        case_id = f"xla-{'gemm' if b == 1 else 'bmm'}-{dtype}-b{b}-m{m}-n{n}-k{k}"
        flops = 2.0 * b * m * n * k
        rows.append({"case_id": case_id, "kind": "gemm" if b == 1 else "bmm", "dtype": dtype, "m": m, "n": n, "k": k,
                     "batch": b, "impl": impl, "flops": flops, "time_s": flops / r.flops_per_s,
                     "n_samples": GEMM_RUNS, "tflops": r.flops_per_s / 1e12, "status": "ok",
                     "split": _split("kernels", case_id, gpu.held_out)})
    return pd.DataFrame(rows).reindex(columns=COLUMNS["kernels"])


def collectives_frame(gpu_key: str) -> pd.DataFrame:
    """XLA's collectives of one GPU as ``collectives.csv`` rows (bytes: nccl-tests' size)."""
    held_out = GPUS[gpu_key].held_out
    table = pd.read_csv(TABLES / f"collectives_{gpu_key.replace('_', '')}.csv", keep_default_na=False)
    rows = []
    for r in table.itertuples():
        if r.opcode not in COLLECTIVE_OPS:
            continue
        op, group = COLLECTIVE_OPS[r.opcode], int(r.devices_per_group)
        size = int(r.throughput_basis_bytes)
        case_id = f"xla-{op}-f32-n{group}-bytes{size}"
        algbw = r.network_throughput_bytes_per_sec / 1e9
        rows.append({"case_id": case_id, "op": op, "dtype": "fp32", "bytes": size, "group_size": group,
                     "world_size": 8, "time_s": size / r.network_throughput_bytes_per_sec,
                     "n_samples": COLLECTIVE_RUNS, "algbw_GBps": algbw, "busbw_GBps": algbw * BUSBW_FACTORS[op](group),
                     "status": "ok", "split": _split("collectives", case_id, held_out)})
    return pd.DataFrame(rows).reindex(columns=COLUMNS["collectives"])


def provenance(gpu_key: str) -> dict:
    folder, gpu_name = GPUS[gpu_key].folder, GPUS[gpu_key].gpu_name
    return {"gpu_name": gpu_name, "gpu_count": 8,
            "source": "OpenXLA default GPU performance tables (third-party measurements, not made here): "
                      "xla/service/gpu/model/matmul_interpolator_data.h @ 71feeddf7cc3c9c7878eee18ea43c983631e6e84, "
                      "collective_interpolator_data.h @ 6984b93376fba7a8f15b0f022add783a2ae650ad "
                      "(validation/reference/xla/README.md)",
            "generator": "bazel run --config=cuda -- //xla/tools:collective_perf_table_gen_main (collectives); "
                         "xla/tools/matmul_perf_table_gen (GEMMs)",
            "driver": "not published", "cuda": "not published", "nccl": "not published", "torch": None,
            "date": "2025 (commit dates: GEMMs 2025-10-21, collectives 2025-08-29 / 2025-06-05)",
            "command": f"python -m plansim.validation.xla  (writes validation/data/{folder} from the tables)",
            "suites": ["kernels", "collectives"]}


def write_folders(data_dir: Path = DATA_DIR) -> list[Path]:
    """(Re)write the XLA data folders; returns them."""
    written = []
    for key, gpu in GPUS.items():
        out = Path(data_dir) / gpu.folder
        out.mkdir(parents=True, exist_ok=True)
        kernels_frame(key).to_csv(out / "kernels.csv", index=False)
        collectives_frame(key).to_csv(out / "collectives.csv", index=False)
        (out / "provenance.json").write_text(json.dumps(provenance(key), indent=2) + "\n")
        written.append(out)
    return written


if __name__ == "__main__":
    for path in write_folders():
        print(path)
