"""GEMM beside an NCCL collective on 2×H200 (validation/data/h200-x2/overlap): the data is
physical, and the contention term of the cost model (simulator/costs/compute.py) is the
calibration split's median and predicts the held-out pairs."""
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from plansim.simulator.costs.compute import DEFAULT_OVERLAP_CONTENTION

DATA = Path(__file__).resolve().parents[2] / "validation" / "data" / "h200-x2" / "overlap" / "overlap.csv"
H200_BF16_PEAK, NVLINK4_BUSBW = 989e12, 450e9


@pytest.fixture(scope="module")
def pairs():
    d = pd.read_csv(DATA)
    d["case_id"] = d.gemm + "-" + d.collective + "-" + (d.size_bytes // 2**20).astype(str) + "MiB"
    d["split"] = ["calibration" if zlib.crc32(c.encode()) % 2 == 0 else "evaluation" for c in d.case_id]
    d["gemms_s"] = d.gemms_per_pair * d.gemm_alone_s
    return d


def test_measurements_are_physical(pairs):
    assert (pairs.gemm_tflops_alone * 1e12 < H200_BF16_PEAK).all()
    assert (pairs.busbw_alone_GBps * 1e9 < NVLINK4_BUSBW).all()
    # together never beats the longer part alone (time is not created by overlap) and never
    # costs much more than the two one after the other
    longer = np.maximum(pairs.comm_alone_s, pairs.gemms_s)
    assert (pairs.pair_together_s >= 0.98 * longer).all()
    assert (pairs.pair_together_s <= 1.1 * (pairs.comm_alone_s + pairs.gemms_s) + 50e-6).all()


def _predict(frame, kappa):
    c, g = frame.comm_alone_s, frame.gemms_s
    return np.maximum(c, g) + kappa * np.minimum(c, g)


def test_contention_is_the_calibration_median_and_predicts_held_out_pairs(pairs):
    big = pairs[pairs.size_bytes >= 32 << 20]  # below, fixed per-pair costs dominate the excess
    calibration, held_out = big[big.split == "calibration"], big[big.split == "evaluation"]
    assert len(calibration) >= 5 and len(held_out) >= 5
    assert DEFAULT_OVERLAP_CONTENTION == pytest.approx(calibration.overlap_excess.median(), abs=0.01)
    err = (_predict(held_out, DEFAULT_OVERLAP_CONTENTION) - held_out.pair_together_s) / held_out.pair_together_s
    assert err.abs().median() <= 0.05 and err.abs().max() <= 0.10
    # free overlap (no contention) is clearly worse on the same held-out pairs
    free = (_predict(held_out, 0.0) - held_out.pair_together_s) / held_out.pair_together_s
    assert free.abs().median() > 2 * err.abs().median()
