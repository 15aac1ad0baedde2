"""Suites ``attention`` and ``bigsteps``: they run end to end (CPU smoke test, quick), write the
kernels/steps schema, and the stored runs are of the cases the suites define today."""
from __future__ import annotations

import csv
import pathlib

import pytest

from plansim.validation.runner.common import COLUMNS

DATA = pathlib.Path(__file__).resolve().parents[2] / "validation" / "data"


@pytest.mark.parametrize("suite, csv_name, columns", [("attention", "kernels", "kernels"),
                                                      ("bigsteps", "steps", "steps")])
def test_sweep_suites_run_on_cpu(tmp_path, suite, csv_name, columns):
    pytest.importorskip("torch")
    from plansim.validation.runner import measure

    paths = measure(suite, str(tmp_path), quick=True, device="cpu", log=lambda m: None)
    assert {pathlib.Path(p).name for p in paths} == {f"{csv_name}.csv", "provenance.json"}
    with open(tmp_path / f"{csv_name}.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == COLUMNS[columns]
        rows = list(reader)
    assert rows and all(r["status"] == "ok" for r in rows), rows


def test_stored_sweeps_are_the_suites_cases():
    pytest.importorskip("torch")
    from plansim.validation.runner.kernels import attention_sweep_cases
    from plansim.validation.runner.steps import big_cases

    shapes = {(b, h, g, d, s) for b, h, g, d, s in attention_sweep_cases(False)}
    for folder in ("attention-h100-x1", "attention-h200-x1"):
        with open(DATA / folder / "kernels.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 4 * len(shapes)  # forward/backward × causal/full
        assert {(int(r["batch"]), int(r["heads"]), int(r["kv_heads"]), int(r["head_dim"]), int(r["seq_len"]))
                for r in rows} == shapes
    with open(DATA / "bigsteps-h200-x1" / "steps.csv", newline="") as fh:
        assert [r["case_id"] for r in csv.DictReader(fh)] == [c["case_id"] for c in big_cases(False)]


def test_every_single_gpu_suites_rows_write_as_steps_rows(tmp_path):
    """What ``run_single`` returns for each single-GPU suite's case has only ``steps`` columns:
    requests the runner answers in other columns (``attention`` -> ``attn_impl``) stay out.
    cudnnsteps once measured all its cases on an H100 and then failed to write them
    (2026-12-05); here its quick case runs on the CPU (cuDNN's attention is CUDA-only, so the
    row may carry an error status) and is written."""
    torch = pytest.importorskip("torch")
    from plansim.validation.runner.common import write_csv
    from plansim.validation.runner.steps import SINGLE_GPU_SUITES, run_single

    for suite, cases in SINGLE_GPU_SUITES.items():
        rows = [run_single(case, torch.device("cpu"), True) for case in cases(True)]
        assert rows and all(r["status"] for r in rows), suite
        write_csv(str(tmp_path / f"{suite}.csv"), "steps", rows)
