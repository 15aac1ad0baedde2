"""The stored measurements under validation/data/<gpu>-x<count>/: schema, provenance, coverage."""
from __future__ import annotations

import csv
import json
import math
import pathlib

import pytest

from plansim.validation.compare import XLA_PREFIX
from plansim.validation.runner.common import BUSBW_FACTORS, COLUMNS, PROVENANCE_FIELDS, split_for

DATA = pathlib.Path(__file__).resolve().parents[2] / "validation" / "data"
EXPECTED = {"h100-x1": ("kernels", "transfers", "steps"),
            "h200-x2": ("kernels", "transfers", "collectives", "steps")}
#: the runner's folders (OpenXLA's converted tables, ``xla-*``, are tests/validation/test_xla.py's)
MEASURED = sorted(p.parent for p in DATA.glob("*-x*/provenance.json") if not p.parent.name.startswith(XLA_PREFIX))


def _rows(folder: pathlib.Path, suite: str) -> tuple[list[str], list[dict]]:
    with open(folder / f"{suite}.csv", newline="") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


def test_the_issue_9_machines_are_stored():
    names = {p.name for p in MEASURED}
    assert set(EXPECTED) <= names, f"missing measurement folders: {set(EXPECTED) - names}"
    for name, suites in EXPECTED.items():
        for s in suites:
            assert (DATA / name / f"{s}.csv").exists(), f"{name}/{s}.csv missing"


@pytest.mark.parametrize("folder", MEASURED, ids=lambda p: p.name)
def test_provenance_has_every_field(folder):
    prov = json.loads((folder / "provenance.json").read_text())
    for f in PROVENANCE_FIELDS:
        assert prov.get(f) not in (None, ""), f"{folder.name}: provenance.{f} empty"
    assert prov["gpu_count"] == int(folder.name.rsplit("-x", 1)[1])
    assert prov["quick"] is False


@pytest.mark.parametrize("folder", MEASURED, ids=lambda p: p.name)
def test_csvs_have_the_schema_and_consistent_rows(folder):
    csvs = sorted(folder.glob("*.csv"))
    assert csvs
    for path in csvs:
        suite = path.stem
        assert suite in COLUMNS, f"{path}: unknown suite"
        cols, rows = _rows(folder, suite)
        assert tuple(cols) == COLUMNS[suite], f"{path}: columns differ from COLUMNS[{suite!r}]"
        ids = [r["case_id"] for r in rows]
        assert len(ids) == len(set(ids)), f"{path}: duplicate case_id"
        for r in rows:
            assert r["split"] == split_for(suite, r["case_id"]), f"{path}: {r['case_id']} split"
            assert r["status"] == "ok" or r["status"] == "oom" or r["status"].startswith(("error:", "skipped:"))
            if r["status"] != "ok":
                continue
            t, lo, hi = float(r["time_s"]), float(r["time_p10_s"]), float(r["time_p90_s"])
            assert 0 < lo <= t <= hi and math.isfinite(hi), (path, r["case_id"])
            assert int(r["n_samples"]) >= 3
        hashed = [r for r in rows if suite != "steps" and not r["case_id"].startswith("mla-")]  # the rest: held out
        if hashed:
            share = sum(r["split"] == "calibration" for r in hashed) / len(hashed)
            assert 0.3 < share < 0.7, f"{path}: calibration share {share:.2f}"


def _ok(folder, suite):
    return [r for r in _rows(folder, suite)[1] if r["status"] == "ok"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_kernels_cover_the_issue(name):
    rows = _ok(DATA / name, "kernels")
    gemm = [r for r in rows if r["kind"] == "gemm"]
    assert len({(r["m"], r["n"], r["k"]) for r in gemm if r["dtype"] == "bf16"}) >= 40
    assert {"bf16", "fp16", "fp32", "tf32"} <= {r["dtype"] for r in gemm}
    assert any(int(r["m"]) <= 64 for r in gemm)
    assert {"128256", "50257", "32000"} <= {r["n"] for r in gemm}
    for r in gemm:
        assert float(r["tflops"]) == pytest.approx(2 * int(r["m"]) * int(r["n"]) * int(r["k"]) / float(r["time_s"]) / 1e12)
    attn = [r for r in rows if r["kind"] == "attention"]
    assert {r["phase"] for r in attn} == {"forward", "backward"}
    assert {r["causal"] for r in attn} == {"true", "false"}
    assert any(int(r["kv_heads"]) < int(r["heads"]) for r in attn)
    assert {"elementwise", "rmsnorm", "layernorm", "memcpy"} <= {r["kind"] for r in rows}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transfers_cover_the_issue(name):
    rows = _ok(DATA / name, "transfers")
    kinds = {(r["kind"], r["memory"]) for r in rows}
    for k in ("h2d", "d2h"):
        assert {(k, "pinned"), (k, "pageable")} <= kinds
    assert {("disk_write", "odirect"), ("disk_read", "odirect")} <= kinds
    adamw = [r for r in rows if r["kind"] == "adamw_cpu"]
    assert {"1", "2", "4", "8"} <= {r["threads"] for r in adamw}
    for r in adamw:
        assert float(r["params_per_s"]) == pytest.approx(int(r["params"]) / float(r["time_s"]))


def test_collectives_follow_nccl_tests():
    rows = _ok(DATA / "h200-x2", "collectives")
    assert {r["op"] for r in rows} == set(BUSBW_FACTORS)
    assert {int(r["bytes"]) for r in rows} == {1024 * 2**i for i in range(21)}  # 1 KiB .. 1 GiB, every power of two
    for r in rows:
        n, nb, t = int(r["group_size"]), int(r["bytes"]), float(r["time_s"])
        assert float(r["algbw_GBps"]) == pytest.approx(nb / t / 1e9)
        assert float(r["busbw_GBps"]) == pytest.approx(nb / t / 1e9 * BUSBW_FACTORS[r["op"]](n))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_steps_cover_the_issue(name):
    rows = _rows(DATA / name, "steps")[1]
    assert all(r["split"] == "evaluation" for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["recompute"] for r in ok if r["strategy"] == "single"} == {"none", "full"}
    assert any(int(r["num_microbatches"]) > 1 for r in ok if r["strategy"] == "single")
    want = {"single"} if name.endswith("-x1") else {"single", "ddp", "fsdp", "tp", "pp"}
    assert want <= {r["strategy"] for r in ok}
    if "pp" in want:
        assert {"gpipe", "1f1b"} <= {r["schedule"] for r in ok if r["strategy"] == "pp"}
    for r in ok:
        assert int(r["n_samples"]) >= 10
        assert r["precision"] == "bf16-pure"
        assert float(r["step_time_s"]) == float(r["time_s"])
        assert int(r["peak_memory_bytes"]) > 0
        gb = int(r["micro_batch"]) * int(r["num_microbatches"]) * int(r["dp"])
        assert int(r["global_batch"]) == gb
        assert float(r["tokens_per_s"]) == pytest.approx(gb * int(r["seq_len"]) / float(r["time_s"]))
        cp = 2 if r["strategy"] == "cp" else 1  # suite parallel2: cp = 2 lives in the case id ("-cp2-")
        assert int(r["tp"]) * int(r["pp"]) * int(r["dp"]) * cp == int(r["world_size"])
