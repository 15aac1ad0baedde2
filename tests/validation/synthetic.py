"""Synthetic measurement folders for the calibration/validation unit tests (tmp dirs only).

Rows follow validation/runner/common.py's schema; times come from the cost models on a
"true" device whose parameters differ from the datasheet, with a little multiplicative noise,
so that a test can check that calibration recovers them.  Never written into validation/data/.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from plansim.validation.compare import predict_collective, predict_kernel, predict_transfer
from plansim.validation.runner.common import write_csv

TRUE_DEVICE = {"achievable_gemm_fraction": 0.72, "gemm_k_overhead": 150.0, "kernel_launch_s": 3.0e-6,
               "achievable_hbm_bw_Bps": 2.7e12, "attention_fraction": 0.5, "attention_fwd_cta_overhead": 200.0,
               "attention_bwd_ratio": 0.7, "collective_launch_s": 18e-6}
TRUE_PCIE = {"achievable_bw_Bps": 50e9, "latency_s": 4e-6, "pageable_fraction": 0.35}
TRUE_NVLINK = {"achievable_bw_Bps": 300e9, "op_efficiency": {"all_gather": 0.8, "broadcast": 1.1}}


def _kernel_rows():
    rows = []
    for m, n, k in [(4096, 4096, 4096), (8192, 8192, 8192), (1, 4096, 4096), (16, 14336, 4096),
                    (4096, 14336, 4096), (2048, 128256, 4096), (3000, 3000, 3000), (4096, 1280, 8192),
                    (8192, 2048, 5632), (64, 8192, 1024), (1024, 1024, 1024), (4096, 8192, 28672)]:
        for dtype in ("bf16", "fp16"):
            rows.append({"case_id": f"gemm-{dtype}-m{m}-n{n}-k{k}", "kind": "gemm", "dtype": dtype,
                         "m": m, "n": n, "k": k})
    for b, h, g, d, s in [(1, 32, 32, 128, 2048), (1, 32, 8, 128, 8192), (8, 16, 16, 64, 1024),
                          (16, 32, 8, 128, 512), (2, 32, 4, 64, 4096)]:
        for causal in (True, False):
            for phase in ("forward", "backward"):
                rows.append({"case_id": f"attn-{phase[:3]}-b{b}-h{h}-kv{g}-d{d}-s{s}-{causal}", "kind": "attention",
                             "dtype": "bf16", "batch": b, "heads": h, "kv_heads": g, "head_dim": d, "seq_len": s,
                             "causal": causal, "phase": phase})
    for nbytes in [1 << 20, 1 << 24, 1 << 28, 1 << 30]:
        rows.append({"case_id": f"add-bf16-bytes{nbytes}", "kind": "elementwise", "dtype": "bf16", "bytes": nbytes,
                     "bytes_moved": 3 * nbytes})
        rows.append({"case_id": f"memcpy-bytes{nbytes}", "kind": "memcpy", "dtype": "uint8", "bytes": nbytes,
                     "bytes_moved": 2 * nbytes})
    return rows


def write_folder(root: Path, name: str = "h100-x1", device: str = "h100-sxm", gpus: int = 1,
                 seed: int = 0, noise: float = 0.02) -> Path:
    """A measurement folder under ``root`` with kernels, transfers and (gpus > 1) collectives."""
    from plansim.simulator.hardware import build_cluster

    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    cluster = build_cluster(device, nodes=1, gpus_per_node=gpus)
    true_dev = cluster.device.model_copy(update=TRUE_DEVICE)
    host = cluster.host_link.model_copy(update=TRUE_PCIE)
    intra = cluster.intra_node_link.model_copy(update=TRUE_NVLINK)
    true = cluster.model_copy(update={"device": true_dev, "host_link": host, "intra_node_link": intra})

    def noisy(t):
        return float(t * np.exp(rng.normal(0, noise)))

    kernels = []
    for r in _kernel_rows():
        t = noisy(predict_kernel(r, true_dev))
        kernels.append({**r, "time_s": t, "time_p10_s": t, "time_p90_s": t, "n_samples": 15, "status": "ok"})
    write_csv(str(folder / "kernels.csv"), "kernels", kernels)
    transfers = []
    for direction in ("h2d", "d2h"):
        for mem in ("pinned", "pageable"):
            for nbytes in [64 << 10 << (2 * i) for i in range(8)]:
                r = {"case_id": f"{direction}-{mem}-bytes{nbytes}", "kind": direction, "memory": mem, "bytes": nbytes}
                t = noisy(predict_transfer(r, true))
                transfers.append({**r, "time_s": t, "n_samples": 10, "status": "ok"})
    write_csv(str(folder / "transfers.csv"), "transfers", transfers)
    if gpus > 1:
        coll = []
        for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv"):
            for nbytes in [1024 * 4**i for i in range(11)]:
                r = {"case_id": f"{op}-bf16-n{gpus}-bytes{nbytes}", "op": op, "bytes": nbytes, "group_size": gpus,
                     "world_size": gpus}
                t = noisy(predict_collective(r, true))
                coll.append({**r, "dtype": "bf16", "time_s": t, "n_samples": 20, "status": "ok"})
        write_csv(str(folder / "collectives.csv"), "collectives", coll)
    gpu_name = {"h100-sxm": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}[device]
    (folder / "provenance.json").write_text(json.dumps({"gpu_name": gpu_name, "gpu_count": gpus}))
    return folder
