"""Held-out error on the stored measurements (issue 9's bounds), run in CI without a GPU.

Bounds are on the median |error| of the cases not used for calibration.  A bound that is not
reached is marked ``xfail(strict=True)`` with the measured number, never loosened silently.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import write_folder  # noqa: E402

from plansim.validation.calibrate import calibrate
from plansim.validation.compare import DATA_DIR, data_folders, step_plan, summarize, validate
from plansim.validation.vidur import gemm_shapes

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
