"""The stored ``power`` suite data (H100): physical sanity, and what it says about our method.

The data is a measurement, not a prediction: these tests check that it is self-consistent and
that the steady state it shows agrees with the short runs the validation suites rely on.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from plansim.validation.power import DEFAULT_DIR, load_power, summarize_power

POWER_LIMIT_W = 700.0  # nvidia-smi power.limit of the measured H100 SXM (printed before the run)
MAX_SM_CLOCK_MHZ = 1980.0  # nvidia-smi clocks.max.sm of the same card


@pytest.fixture(scope="module")
def summary() -> pd.DataFrame:
    return summarize_power(load_power()).set_index("phase")


def test_provenance_names_the_card_and_the_command():
    prov = json.loads((DEFAULT_DIR / "provenance.json").read_text())
    assert prov["gpu_name"].startswith("NVIDIA H100")
    assert prov["driver"] and prov["torch"] and prov["date"]
    assert "--suite power" in prov["command"] and prov["quick"] is False


def test_power_and_clock_stay_within_the_cards_limits():
    """The board's averaged power (nvidia-smi power.draw, a one-second average) holds the limit;
    instantaneous readings overshoot it within the controller's response time, so are not checked."""
    samples = pd.read_csv(DEFAULT_DIR / "power_samples.csv", skipinitialspace=True)
    assert len(samples) > 1000
    averaged = pd.to_numeric(samples["power.draw"], errors="coerce").dropna()
    assert averaged.quantile(0.99) <= POWER_LIMIT_W * 1.01
    assert averaged.max() <= POWER_LIMIT_W * 1.05
    assert (averaged > 0).all()
    clocks = pd.to_numeric(samples["clocks.sm"], errors="coerce").dropna()
    assert clocks.max() <= MAX_SM_CLOCK_MHZ
    frame = load_power()
    assert (frame["duration_s"] > 0).all()


def test_gemm_rate_falls_as_the_tensor_cores_get_busier(summary):
    """More tensor-core time per power-controller window: lower clock, lower GEMM rate."""
    order = ["mix-0.25", "mix-0.5", "mix-0.75", "gemm"]
    busy = [summary.loc[p, "tensor_busy"] for p in order]
    rates = [summary.loc[p, "tflops_last"] for p in order]
    clocks = [summary.loc[p, "sm_clock_mhz_last"] for p in order]
    assert busy == sorted(busy)
    assert rates == sorted(rates, reverse=True)
    assert clocks == sorted(clocks, reverse=True)
    # the continuous stream is power-capped: below the short-burst rate of the kernels suite
    kernels = pd.read_csv(DEFAULT_DIR.parent / "kernels.csv")
    burst = kernels[(kernels.kind == "gemm") & (kernels.m == 8192) & (kernels.n == 8192) & (kernels.k == 8192)
                    & (kernels.dtype == "bf16")]["tflops"]
    assert len(burst) == 1
    assert summary.loc["gemm", "tflops_last"] < 0.9 * float(burst.iloc[0])
    assert summary.loc["gemm", "power_cap_active_last"] > 0.9


def test_memory_bound_stream_is_not_throttled(summary):
    row = summary.loc["hbm"]
    assert row["power_w_last"] < POWER_LIMIT_W
    assert row["sm_clock_mhz_last"] == pytest.approx(MAX_SM_CLOCK_MHZ, rel=0.01)


def test_ten_step_runs_measure_the_steady_state(summary):
    """The steps suite times 10 steps after 3 warm-ups; a minute of the same steps ends within
    3 % of that, so the validated step times are what a long run sustains."""
    steps = pd.read_csv(DEFAULT_DIR.parent / "steps.csv").set_index("case_id")
    phases = [p for p in summary.index if p.startswith("step-")]
    assert len(phases) == 2
    for phase in phases:
        short = float(steps.loc[phase.removeprefix("step-"), "step_time_s"])
        sustained = summary.loc[phase, "step_time_s_last"]
        assert abs(sustained - short) / short < 0.03, phase
