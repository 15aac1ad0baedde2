"""What the board power limit does to sustained throughput, read from the ``power`` suite's data.

``python -m plansim.validation.power [DIR]`` prints one row per phase of ``power.csv``
(``validation/runner/power.py`` measured it): the first and the last seconds of each phase,
their GEMM rate, HBM rate or step time, board power, SM clock, temperature and how often the
power cap was active.  It answers two questions the cost models depend on:

* do short measurements (the ``kernels`` and ``steps`` suites: a few seconds) see the clocks a
  training run of hours sees? — compare a phase's first seconds with its last;
* how far does a dense stream of tensor-core work fall below the short-burst GEMM rate, as a
  function of the share of time the tensor cores are busy (the ``mix-U`` phases)?
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "h100-x1" / "power"
EDGE_S = 5.0  # seconds at the start and at the end of a phase that are compared


def load_power(data_dir: Path = DEFAULT_DIR) -> pd.DataFrame:
    """``power.csv`` of a measurement folder, with the phase's own clock (seconds since it began)."""
    frame = pd.read_csv(Path(data_dir) / "power.csv")
    frame["t_phase_s"] = frame["t_start_s"] - frame.groupby("phase", sort=False)["t_start_s"].transform("min")
    return frame


def summarize_power(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per phase: its first and last ``EDGE_S`` seconds side by side."""
    rows = []
    for phase, g in frame.groupby("phase", sort=False):
        end = g["t_phase_s"].max()
        first, last = g[g["t_phase_s"] <= EDGE_S], g[g["t_phase_s"] >= end - EDGE_S]
        row = {"phase": phase, "seconds": round(end + g["duration_s"].iloc[-1], 1),
               "tensor_busy": g["gemm_s"].sum() / g["duration_s"].sum() if g["gemm_s"].notna().any() else None}
        for label, part in (("first", first), ("last", last)):
            for col in ("tflops", "gbps", "step_time_s", "power_w", "sm_clock_mhz", "temperature_c",
                        "power_cap_active"):
                values = part[col].dropna()
                row[f"{col}_{label}"] = float(values.mean()) if len(values) else None
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    summary = summarize_power(load_power(Path(args[0]) if args else DEFAULT_DIR))
    cols = ["phase", "seconds", "tensor_busy", "tflops_first", "tflops_last", "gbps_last", "step_time_s_first",
            "step_time_s_last", "power_w_last", "sm_clock_mhz_first", "sm_clock_mhz_last", "temperature_c_last",
            "power_cap_active_last"]
    print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
