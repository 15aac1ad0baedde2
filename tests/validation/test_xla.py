"""OpenXLA's published GEMM and collective tables as data folders (validation/xla.py), the B200
profile calibrated on half of them, and the ring-size fit that needs several group sizes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from plansim.simulator.calibration import read_calibration
from plansim.simulator.hardware import build_cluster
from plansim.validation import xla
from plansim.validation.calibrate import fit_intra_link
from plansim.validation.compare import CALIBRATED_DIR, DATA_DIR, predict_collective, summarize, validate
from plansim.validation.runner.common import COLUMNS, split_for


@pytest.mark.parametrize("key", sorted(xla.GPUS))
def test_stored_folders_are_the_tables_converted(key, tmp_path):
    """validation/data/xla-* is exactly what the converter makes of validation/reference/xla."""
    folder = xla.GPUS[key][0]
    xla.write_folders(tmp_path)
    for suite in ("kernels", "collectives"):
        fresh = pd.read_csv(tmp_path / folder / f"{suite}.csv")
        stored = pd.read_csv(DATA_DIR / folder / f"{suite}.csv")
        assert tuple(stored.columns) == COLUMNS[suite]
        pd.testing.assert_frame_equal(fresh, stored)


def test_times_are_the_published_throughputs_inverted():
    table = pd.read_csv(xla.TABLES / "collectives_sm100.csv")
    row = table[(table.opcode == "reduce-scatter") & (table.devices_per_group == 8)].iloc[-1]
    frame = xla.collectives_frame("sm_100").set_index("case_id")
    got = frame.loc[f"xla-reduce_scatter-f32-n8-bytes{int(row.throughput_basis_bytes)}"]
    # reduce-scatter's count is its operand: group × the stored result
    assert row.throughput_basis_bytes == row.bytes * 8
    assert got.time_s == pytest.approx(row.throughput_basis_bytes / row.network_throughput_bytes_per_sec)
    kernels = xla.kernels_frame("sm_100")
    assert np.allclose(kernels.flops / kernels.time_s / 1e12, kernels.tflops)
    assert np.allclose(kernels.flops, 2.0 * kernels.batch * kernels.m * kernels.n * kernels.k)


def test_the_h100_rows_are_held_out_and_the_b200_rows_split_by_the_runner_rule():
    h100 = xla.kernels_frame("sm_90"), xla.collectives_frame("sm_90")
    assert all((f.split == "evaluation").all() for f in h100)
    assert "fp8" not in set(h100[0].dtype)  # XLA's sm_90 fp8 rows exceed the H100's fp8 peak
    for suite, frame in zip(("kernels", "collectives"), (xla.kernels_frame("sm_100"), xla.collectives_frame("sm_100"))):
        assert list(frame.split) == [split_for(suite, c) for c in frame.case_id]
        assert 0.3 < (frame.split == "calibration").mean() < 0.7
    assert set(xla.collectives_frame("sm_100").op) == set(xla.COLLECTIVE_OPS.values())


def test_the_b200_profile_is_fitted_on_the_calibration_half_only():
    profile = read_calibration(CALIBRATED_DIR / "b200.yaml")
    fitted = profile["case_ids"]["xla-b200-x8"]
    for suite, ids in fitted.items():
        frame = pd.read_csv(DATA_DIR / "xla-b200-x8" / f"{suite}.csv").set_index("case_id")
        assert (frame.loc[ids, "split"] == "calibration").all()
    assert set(profile["links"]["nvlink5-nvswitch"]["ring_busbw_by_ranks"]) == {2, 4, 8}


def test_held_out_b200_rows_are_predicted_within_ten_percent():
    """The B200's evaluation half (never fitted): median |error| of GEMMs and of collectives of
    1 MiB and more."""
    frame = validate("all", DATA_DIR)
    rows = summarize(frame[frame.source == "xla-b200-x8"]).set_index("suite")
    assert rows.loc["OpenXLA b200 GEMMs", "median_abs_error"] < 0.10
    assert rows.loc["OpenXLA b200 collectives >= 1MiB", "median_abs_error"] < 0.10


def _ring_rows(cluster, sizes=(1 << 20, 1 << 24, 1 << 28, 1 << 30)):
    rows = []
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        for n in (2, 4, 8):
            for nbytes in (1024, *sizes):
                r = {"case_id": f"{op}-n{n}-{nbytes}", "op": op, "bytes": nbytes, "group_size": n}
                rows.append({**r, "time_s": predict_collective(r, cluster)})
    return pd.DataFrame(rows)


def test_ring_fractions_are_recovered_from_several_group_sizes():
    """Data made with rings of 2 and 4 ranks at 70 % and 90 % of the 8-rank busbw: the fit gives
    those fractions back, and the 8-rank bandwidth; one group size alone fits no table."""
    base = build_cluster("b200", nodes=1, gpus_per_node=8)
    link = base.intra_node_link.model_copy(update={"achievable_bw_Bps": 600e9,
                                                   "ring_busbw_by_ranks": {2: 0.7, 4: 0.9, 8: 1.0}})
    true = base.model_copy(update={"intra_node_link": link})
    params, _, _ = fit_intra_link(base, _ring_rows(true))
    assert params["achievable_bw_Bps"] == pytest.approx(600e9, rel=0.03)
    assert params["ring_busbw_by_ranks"][2] == pytest.approx(0.7, rel=0.03)
    assert params["ring_busbw_by_ranks"][4] == pytest.approx(0.9, rel=0.03)
    eight = _ring_rows(true)
    params, _, _ = fit_intra_link(base, eight[eight.group_size == 8])
    assert "ring_busbw_by_ranks" not in params
