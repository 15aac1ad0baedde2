"""Torch-free helpers shared by the runner and by the tests of the stored data.

Nothing here imports torch, so the tests of ``validation/data/`` run in CI without it.
"""
from __future__ import annotations

import csv
import json
import math
import os
import zlib
from collections.abc import Iterable, Sequence

#: the runner's model configs (Hugging Face ``config.json`` files)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

SUITES = ("kernels", "transfers", "collectives", "steps")

#: Columns every CSV row carries, whatever the suite.
COMMON_COLUMNS = ("case_id", "time_s", "time_p10_s", "time_p90_s", "n_samples", "status", "split")

#: Exact column order of each suite's CSV (a case leaves the columns that do not apply to it empty).
COLUMNS: dict[str, tuple[str, ...]] = {
    "kernels": (
        "case_id", "kind", "dtype", "m", "n", "k", "batch", "heads", "kv_heads", "head_dim",
        "seq_len", "causal", "phase", "impl", "tokens", "hidden", "bytes", "flops", "bytes_moved",
        "time_s", "time_p10_s", "time_p90_s", "n_samples", "tflops", "gbps", "status", "split",
    ),
    "transfers": (
        "case_id", "kind", "memory", "bytes", "block_bytes", "fs", "threads", "params", "impl",
        "time_s", "time_p10_s", "time_p90_s", "n_samples", "gbps", "params_per_s", "status", "split",
    ),
    "collectives": (
        "case_id", "op", "dtype", "bytes", "group_size", "world_size", "reps_per_sample",
        "time_s", "time_p10_s", "time_p90_s", "n_samples", "algbw_GBps", "busbw_GBps", "status", "split",
    ),
    "steps": (
        "case_id", "model", "n_params", "strategy", "tp", "pp", "dp", "zero", "micro_batch",
        "global_batch", "num_microbatches", "seq_len", "recompute", "schedule", "precision",
        "optimizer", "attn_impl", "world_size",
        "time_s", "time_p10_s", "time_p90_s", "n_samples", "step_time_s", "peak_memory_bytes",
        "tokens_per_s", "status", "split",
    ),
}

PROVENANCE_FIELDS = (
    "gpu_name", "gpu_count", "driver", "cuda", "torch", "nccl", "host_cpu", "date",
    "command", "hostname",
)

#: busbw / algbw per op, nccl-tests doc/PERFORMANCE.md (n = ranks in the group).
BUSBW_FACTORS = {
    "all_reduce": lambda n: 2.0 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "send_recv": lambda n: 1.0,
}


def split_for(suite: str, case_id: str) -> str:
    """The calibration/evaluation split of a case (MEASURING.md, "Split").

    steps, and the multi-head latent attention kernels (case ids ``mla-``), are never fitted: all
    ``evaluation``.  Other suites: ``calibration`` when
    ``zlib.crc32(case_id) % 2 == 0``, else ``evaluation`` -- stable across runs, machines
    and Python versions (crc32 is not salted, unlike ``hash``).
    """
    if suite == "steps" or case_id.startswith("mla-"):  # steps and MLA attention test the model, never fit it
        return "evaluation"
    return "calibration" if zlib.crc32(case_id.encode("utf-8")) % 2 == 0 else "evaluation"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_s: Sequence[float]) -> dict:
    """Median, p10, p90 and count of per-sample times in seconds."""
    return {
        "time_s": percentile(times_s, 50),
        "time_p10_s": percentile(times_s, 10),
        "time_p90_s": percentile(times_s, 90),
        "n_samples": len(times_s),
    }


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return v


def write_csv(path: str, suite: str, rows: Iterable[dict]) -> str:
    """Write ``rows`` as ``suite``'s CSV with the fixed column order and the split column."""
    cols = COLUMNS[suite]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="raise")
        w.writeheader()
        for row in rows:
            row = dict(row)
            row["split"] = split_for(suite, row["case_id"])
            extra = set(row) - set(cols)
            if extra:
                raise ValueError(f"{suite}: unknown columns {sorted(extra)} in case {row['case_id']}")
            w.writerow({c: _fmt(row.get(c)) for c in cols})
    return path


def error_status(exc: BaseException) -> str:
    """``oom`` for out-of-memory errors, else ``error:<Type>: <first line>`` (commas kept out)."""
    name = type(exc).__name__
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "OutOfMemory" in name or "out of memory" in msg.lower():
        return "oom"
    return f"error:{name}: {msg[:160]}".replace(",", ";").replace("\n", " ")


def row_logger(rows: list, log, suite: str, width: int, rates: Sequence[str], rate_fmt: str):
    """``emit(row)``: log ``suite``, the case, its time and its first non-empty rate of ``rates``
    (formatted ``rate_fmt``) and the status, then append ``row`` to ``rows``."""

    def emit(row: dict) -> None:
        rate = None
        for key in rates:
            rate = rate or row.get(key)
        log(f"{suite} {row['case_id']:<{width}} {row.get('time_s', float('nan')):.4e} s  "
            f"{'' if rate in (None, '') else format(rate, rate_fmt)} {row['status']}")
        rows.append(row)

    return emit


class HFConfig:
    """Mixin of the runner's model configs: a subclass defines ``from_hf(path)``, reading the dict
    that ``read_hf`` returns; ``named(name)`` loads ``configs/<name>.json``."""

    @staticmethod
    def read_hf(path: str) -> tuple[str, dict]:
        """(name = the file's stem, the parsed ``config.json``)."""
        with open(path) as fh:
            return os.path.splitext(os.path.basename(path))[0], json.load(fh)

    @classmethod
    def named(cls, name: str):
        return cls.from_hf(os.path.join(CONFIG_DIR, f"{name}.json"))
