"""Vidur's published profiling tables as a further held-out check (never fitted).

Vidur (Agrawal et al., MLSys 2024; github.com/microsoft/vidur, MIT licence) ships per-operator
timings measured on A100 and H100 nodes: ``data/profiling/compute/<gpu>/<org>/<model>/mlp.csv``
(the linear layers of one transformer block, sarathi-serve kernels in fp16, times in ms, for
``num_tokens`` rows and ``num_tensor_parallel_workers`` shards) and
``data/profiling/network/<gpu>_dgx/{all_reduce,send_recv}.csv`` (NCCL kernels, ``size`` in
bytes, times in ms).  ``import_vidur`` copies a small subset into ``validation/data/vidur/``
with its licence; ``score_vidur`` predicts every row with the simulator's cost models.

Mapping (vidur/profiling/mlp/mlp_impl.py): with ``h = n_embd``, ``d = h / n_head``,
``t`` tensor-parallel shards and ``T`` tokens,

* ``attn_pre_proj``  = GEMM (T, (n_head + 2·n_kv_head)·d / t, h)   (fused QKV, column-parallel)
* ``attn_post_proj`` = GEMM (T, h, h / t)                           (row-parallel output proj.)
* ``mlp_up_proj``    = GEMM (T, (2 if gated else 1)·n_expanded / t, h)
* ``mlp_down_proj``  = GEMM (T, h, n_expanded / t)

and the network tables map to ``collective_cost`` on one DGX node with ``num_workers`` ranks
(rows with ``devices_per_node == num_workers``: the whole group inside one node; sizes of
1 MiB and more, see ``MIN_COLLECTIVE_BYTES``).  The A100 rows are scored on the datasheet
``a100-80gb`` profile (nothing of ours was measured on an A100); the H100 rows on the
calibrated ``h100-sxm`` profile, whose parameters come from our own H100, never from Vidur.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from plansim.simulator.costs import compute
from plansim.simulator.costs.collectives import Group, collective_cost
from plansim.simulator.calibration import calibrate_cluster, read_calibration
from plansim.simulator.hardware import build_cluster

#: Vidur's device folder -> (our device profile, our cluster profile)
DEVICES = {"h100": ("h100-sxm", "dgx-h100"), "a100": ("a100-80gb", "dgx-a100")}
NETWORKS = {"h100_dgx": "h100", "a100_dgx": "a100"}
GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
SHAPE_COLUMNS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp",
                 "num_tokens", "num_tensor_parallel_workers")
#: Vidur's NCCL kernel times below this size are dominated by waiting for the peer rank (CUPTI
#: kernel time, no barrier per launch: 40 us for 35 KB but 7 us for 2 KB); scored from 1 MiB,
#: the range of issue 9's collective bound
MIN_COLLECTIVE_BYTES = 1 << 20
TOKENS_KEPT = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096)


# ------------------------------------------------------------------------------ import

def import_vidur(src: Path, dst: Path) -> list[Path]:
    """Copy the subset of Vidur's ``data/profiling`` that ``score_vidur`` reads: the H100 and
    A100 ``mlp.csv`` tables (median columns of the four GEMMs, token counts ``TOKENS_KEPT``)
    and the DGX all-reduce / send-recv tables (about two sizes per octave), with the licence."""
    src, dst = Path(src), Path(dst)
    written = []
    for gpu in DEVICES:
        for table in sorted((src / "compute" / gpu).glob("*/*/mlp.csv")):
            frame = pd.read_csv(table)
            keep = [f"time_stats.{op}.median" for op in GEMM_OPS] + list(SHAPE_COLUMNS)
            frame = frame[frame["num_tokens"].isin(TOKENS_KEPT)][keep]
            out = dst / table.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(out, index=False)
            written.append(out)
    for net in NETWORKS:
        for name in ("all_reduce", "send_recv"):
            table = src / "network" / net / f"{name}.csv"
            if not table.is_file():
                continue
            frame = pd.read_csv(table, index_col=0)
            frame = frame[frame["devices_per_node"] == frame["num_workers"]]
            kept = []
            for _, part in frame.groupby("num_workers"):
                octave = np.round(2 * np.log2(part["size"].to_numpy(float)))
                kept.append(part.loc[~pd.Series(octave, index=part.index).duplicated()])
            frame = pd.concat(kept)
            cols = [f"time_stats.{name}.median", "num_workers", "size", "collective", "devices_per_node",
                    "max_devices_per_node"]
            out = dst / "network" / net / f"{name}.csv"
            out.parent.mkdir(parents=True, exist_ok=True)
            frame[cols].to_csv(out, index=False)
            written.append(out)
    licence = src.parent.parent / "LICENSE"
    if licence.is_file():
        shutil.copyfile(licence, dst / "LICENSE")
    return written


# ------------------------------------------------------------------------------ scoring

def gemm_shapes(row) -> dict[str, tuple[float, float, float]]:
    """(m, n, k) of the four GEMMs of one ``mlp.csv`` row."""
    tokens, t = float(row["num_tokens"]), float(row["num_tensor_parallel_workers"])
    h, heads, kv = float(row["n_embd"]), float(row["n_head"]), float(row["n_kv_head"])
    d = h / heads
    up = (2.0 if str(row["use_gated_mlp"]).lower() == "true" else 1.0) * float(row["n_expanded_embd"])
    return {"attn_pre_proj": (tokens, (heads + 2 * kv) * d / t, h),
            "attn_post_proj": (tokens, h, h / t),
            "mlp_up_proj": (tokens, up / t, h),
            "mlp_down_proj": (tokens, h, float(row["n_expanded_embd"]) / t)}


def _cluster(gpu: str, profiles_dir: Path | None, calibrated: bool):
    device, cluster_name = DEVICES[gpu]
    cluster = build_cluster(device, cluster_name)
    if calibrated and profiles_dir is not None:
        path = Path(profiles_dir) / f"{device}.yaml"
        if path.is_file():
            read_calibration.cache_clear()
            cluster, _ = calibrate_cluster(cluster, path)
    return cluster


def score_vidur(vidur_dir: Path, profiles_dir: Path | None, calibrated: bool = True) -> list[dict]:
    """One record per (table row, operator): Vidur's measured median against our prediction."""
    vidur_dir = Path(vidur_dir)
    records: list[dict] = []
    if not vidur_dir.is_dir():
        return records
    for gpu in DEVICES:
        cluster = _cluster(gpu, profiles_dir, calibrated)
        device = cluster.device
        for table in sorted((vidur_dir / "compute" / gpu).glob("*/*/mlp.csv")):
            model = f"{table.parent.parent.name}/{table.parent.name}"
            frame = pd.read_csv(table)
            for row in frame.to_dict("records"):
                for op, (m, n, k) in gemm_shapes(row).items():
                    measured = float(row[f"time_stats.{op}.median"]) * 1e-3
                    if not measured > 0 or not float(n).is_integer() or not float(k).is_integer():
                        continue
                    predicted = float(compute.gemm_time(m, n, k, "fp16", device))
                    records.append(_rec(f"vidur-{gpu}", device.name,
                                        f"{model}:{op}:T{int(m)}:tp{int(row['num_tensor_parallel_workers'])}",
                                        f"gemm-{op}", measured, predicted, np.nan))
        net = next((n for n, g in NETWORKS.items() if g == gpu), None)
        for name in ("all_reduce", "send_recv"):
            table = vidur_dir / "network" / str(net) / f"{name}.csv"
            if not table.is_file():
                continue
            for row in pd.read_csv(table).to_dict("records"):
                n, size = int(row["num_workers"]), float(row["size"])
                measured = float(row[f"time_stats.{name}.median"]) * 1e-3
                if not measured > 0 or size < MIN_COLLECTIVE_BYTES:
                    continue
                predicted = collective_cost(name, size, Group(n, n), cluster).time_s
                records.append(_rec(f"vidur-{net}", device.name, f"{name}-n{n}-bytes{int(size)}", name,
                                    measured, predicted, size))
    return records


def _rec(source, device, case_id, kind, measured, predicted, size) -> dict:
    return {"suite": "vidur", "source": source, "device": device, "case_id": case_id, "kind": kind,
            "metric": "time_s", "size_bytes": size, "measured": measured, "predicted": predicted,
            "error": (predicted - measured) / measured}


__all__ = ["import_vidur", "score_vidur", "gemm_shapes"]
