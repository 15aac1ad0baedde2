"""Held-out error on the stored measurements (issue 9's bounds), run in CI without a GPU.

Bounds are on the median |error| of the cases not used for calibration.  A bound that is not
reached is marked ``xfail(strict=True)`` with the measured number, never loosened silently.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import write_folder  # noqa: E402

from plansim.validation.calibrate import calibrate
from plansim.validation.compare import DATA_DIR, data_folders, step_plan, summarize, validate
from plansim.validation.vidur import gemm_shapes, stream_slowdown

STORED = data_folders(DATA_DIR)
VIDUR = (DATA_DIR / "vidur").is_dir()

#: (summary suite, metric) -> issue 9's bound on the median |error|
BOUNDS = {
    ("kernels", "time_s"): 0.05,
    ("collectives 1MiB-1GiB", "time_s"): 0.08,
    ("steps", "step_time_s"): 0.08,
    ("steps", "peak_memory_bytes"): 0.10,
    ("vidur", "time_s"): 0.15,
}
#: bounds not reached on the stored data: (suite, metric) -> reason with the measured number
NOT_REACHED: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def stored_summary():
    frame = validate("all", DATA_DIR)
    return frame, summarize(frame).set_index(["suite", "metric"])


def _bound_params():
    out = []
    for key, bound in BOUNDS.items():
        marks = [pytest.mark.xfail(strict=True, reason=NOT_REACHED[key])] if key in NOT_REACHED else []
        out.append(pytest.param(key, bound, marks=marks, id=f"{key[0]}:{key[1]}"))
    return out


@pytest.mark.skipif(not STORED and not VIDUR, reason="no stored measurements under validation/data yet")
@pytest.mark.parametrize("key,bound", _bound_params())
def test_held_out_error_within_bound(stored_summary, key, bound):
    _, summary = stored_summary
    if key not in summary.index:
        pytest.skip(f"no held-out cases for {key[0]} in validation/data")
    median = summary.loc[key, "median_abs_error"]
    assert median <= bound, f"{key[0]} {key[1]}: median |error| {median:.1%} > {bound:.0%}"


@pytest.mark.skipif(not STORED, reason="no stored measurements under validation/data yet")
def test_every_measured_suite_is_scored(stored_summary):
    frame, _ = stored_summary
    assert {"kernels", "transfers", "steps"} <= set(frame.suite)
    assert frame["predicted"].gt(0).all() and frame["measured"].gt(0).all()


def test_validate_on_synthetic_data_is_accurate(tmp_path):
    write_folder(tmp_path, "h200-x2", "h200", 2, seed=5, noise=0.01)
    calibrate(tmp_path, out_dir=tmp_path / "cal")
    frame = validate("all", tmp_path, profiles_dir=tmp_path / "cal")
    summary = summarize(frame).set_index(["suite", "metric"])
    for suite in ("kernels", "transfers", "collectives"):
        assert summary.loc[(suite, "time_s"), "median_abs_error"] < 0.03
    assert set(frame.columns) >= {"suite", "case_id", "measured", "predicted", "error"}
    row = frame.iloc[0]
    assert row.error == pytest.approx((row.predicted - row.measured) / row.measured)


def test_cli_handlers_table_json_csv(tmp_path, capsys):
    from plansim.validation.cli_commands import add_parsers
    write_folder(tmp_path, "h100-x1", "h100-sxm", 1, seed=2)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", "--data", str(tmp_path), "--out", str(tmp_path / "cal")])
    assert args.func(args) == 0
    capsys.readouterr()
    base = ["validate", "--data", str(tmp_path), "--profiles", str(tmp_path / "cal"), "--suite", "kernels"]
    args = parser.parse_args(base + ["--format", "json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cases"] and out["summary"][0]["suite"] == "kernels"
    args = parser.parse_args(base + ["--format", "csv"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("suite,source,device,case_id")
    args = parser.parse_args(base)
    assert args.func(args) == 0
    assert "median" in capsys.readouterr().out
    args = parser.parse_args(["validate", "--data", str(tmp_path / "missing")])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_vidur_shapes_follow_vidur_mlp_impl():
    row = {"num_tokens": 4096, "num_tensor_parallel_workers": 2, "n_embd": 4096, "n_head": 32, "n_kv_head": 32,
           "n_expanded_embd": 11008, "use_gated_mlp": True}
    shapes = gemm_shapes(row)
    assert shapes["attn_pre_proj"] == (4096, 3 * 4096 / 2, 4096)
    assert shapes["attn_post_proj"] == (4096, 4096, 2048)
    assert shapes["mlp_up_proj"] == (4096, 11008, 4096)
    assert shapes["mlp_down_proj"] == (4096, 4096, 5504)


VIDUR_ROW = {"num_tokens": 4096, "num_tensor_parallel_workers": 1, "n_embd": 4096, "n_head": 32, "n_kv_head": 32,
             "n_expanded_embd": 11008, "use_gated_mlp": True}


def test_vidur_stream_runs_h100_gemms_below_short_sample_clock():
    """Vidur's layer stream is ~90 % GEMMs: the H100's power limit holds it near 0.7 of the maximum
    clock, so its GEMMs take longer than at short-sample rates; a lower cap slows them more, and a
    device without a power model (the A100) is not slowed."""
    from plansim.simulator.hardware import build_cluster
    from plansim.simulator.calibration import apply_calibration
    from plansim.simulator.costs.power import with_power_limit

    cluster = build_cluster("h100-sxm", "dgx-h100")
    h100 = apply_calibration(cluster.device)[0]
    slow = stream_slowdown(VIDUR_ROW, h100)
    assert 1.05 < slow < 1.5
    capped = with_power_limit(cluster.model_copy(update={"device": h100}), 500).device
    assert stream_slowdown(VIDUR_ROW, capped) > slow
    assert stream_slowdown(VIDUR_ROW, build_cluster("a100-80gb", "dgx-a100").device) == 1.0


@pytest.mark.skipif(not VIDUR, reason="no Vidur tables under validation/data")
def test_vidur_h100_gemms_are_explained_by_the_stream_clock():
    """Held-out evidence for the power model on someone else's H100: at short-sample rates Vidur's
    training-sized H100 GEMMs are predicted ~9 % fast; at the clock of Vidur's stream (power model
    fitted on our own power data only) the median signed error is within 3 % and |error| halves."""
    from plansim.simulator.calibration import apply_calibration
    from plansim.simulator.costs.compute import gemm_time
    from plansim.simulator.hardware import build_cluster
    from plansim.validation.vidur import _gemm_rows

    h100 = apply_calibration(build_cluster("h100-sxm", "dgx-h100").device)[0]
    short, stream = [], []
    for row, gemms in _gemm_rows(DATA_DIR / "vidur", "h100"):
        for _, m, n, k, measured in gemms:
            if m >= 1024:
                t = float(gemm_time(m, n, k, "fp16", h100))
                short.append(t / measured - 1)
                stream.append(t * stream_slowdown(row, h100) / measured - 1)
    short, stream = np.array(short), np.array(stream)
    assert len(short) > 500
    assert np.median(short) < -0.05
    assert abs(np.median(stream)) < 0.03
    assert np.median(np.abs(stream)) < 0.6 * np.median(np.abs(short))


def test_step_plan_maps_runner_strategies():
    base = {"tp": 1, "pp": 1, "dp": 2, "micro_batch": 2, "global_batch": 4, "seq_len": 2048, "recompute": "none",
            "schedule": "-"}
    assert step_plan({**base, "strategy": "fsdp"}).zero == 3
    assert step_plan({**base, "strategy": "ddp"}).zero == 0
    pp = step_plan({**base, "strategy": "pp", "pp": 2, "dp": 1, "micro_batch": 1, "global_batch": 8,
                    "schedule": "gpipe"})
    assert pp.schedule == "gpipe" and pp.num_microbatches == 8
    tp = step_plan({**base, "strategy": "tp", "tp": 2, "dp": 1, "global_batch": 2})
    assert tp.sequence_parallel is False and tp.precision == "bf16-pure"


def test_cli_suites_match_compare():
    from plansim.validation import cli_commands, compare
    assert cli_commands.SUITES == compare.SUITES
