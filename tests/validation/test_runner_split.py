"""The calibration/evaluation split of the runner's data: deterministic, documented, used."""
from __future__ import annotations

import ast
import pathlib
import sys
import types
import zlib

import pytest

from plansim.validation.runner.common import COLUMNS, SUITES, split_for

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_split_rule_is_crc32_parity_and_steps_are_all_evaluation():
    for cid in ("gemm-bf16-m4096-n4096-k4096", "all_reduce-bf16-n2-bytes1024", "h2d-pinned-bytes65536"):
        want = "calibration" if zlib.crc32(cid.encode()) % 2 == 0 else "evaluation"
        for suite in ("kernels", "transfers", "collectives"):
            assert split_for(suite, cid) == want
        assert split_for("steps", cid) == "evaluation"


def test_split_is_stable_across_calls_and_roughly_half():
    ids = [f"gemm-bf16-m{m}-n4096-k4096" for m in range(1, 401)]
    first = [split_for("kernels", i) for i in ids]
    assert first == [split_for("kernels", i) for i in ids]
    share = first.count("calibration") / len(first)
    assert 0.4 < share < 0.6


def test_split_rule_is_documented():
    text = (ROOT / "validation" / "MEASURING.md").read_text()
    assert "zlib.crc32" in text and "% 2 == 0" in text
    assert "steps" in text and "evaluation" in text


def test_every_suite_has_the_common_columns():
    for suite in SUITES:
        cols = COLUMNS[suite]
        for c in ("case_id", "time_s", "time_p10_s", "time_p90_s", "n_samples", "status", "split"):
            assert c in cols, (suite, c)
        assert len(set(cols)) == len(cols)


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_torch_is_imported_only_under_validation_runner():
    offenders = []
    for folder in ("plansim", "simulator", "workloads", "planner", "validation", "hardware_profiles"):
        for path in (ROOT / folder).rglob("*.py"):
            if "runner" in path.relative_to(ROOT).parts[:2]:
                continue
            if "torch" in _imports(path):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"torch imported outside validation/runner: {offenders}"


def test_runner_package_imports_without_torch_and_measure_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    import plansim.validation.runner as runner

    with pytest.raises(RuntimeError, match="needs PyTorch"):
        runner.measure("kernels", "/nonexistent")


def test_measure_without_gpu_raises_the_clear_error(monkeypatch, tmp_path):
    fake = types.ModuleType("torch")
    fake.cuda = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "torch", fake)
    import plansim.validation.runner as runner

    for suite in ("all", "power", "powerkernels", "powersteps", "powerduty", "powergaps", "parallel2", "gpt2021", "overlap", "profile", "attention", "bigsteps", "bigprofile"):
        with pytest.raises(RuntimeError, match="no CUDA GPU found: plansim measure needs one"):
            runner.measure(suite, str(tmp_path))
    with pytest.raises(ValueError, match="suite"):
        runner.measure("nope", str(tmp_path))


def test_suites_that_time_cuda_have_no_cpu_smoke_test(tmp_path):
    """power, profile and bigprofile read CUDA events, clocks or the CUDA profiler: asked to
    run on the CPU they say so in one line instead of failing inside torch."""
    import plansim.validation.runner as runner

    for suite in runner.CUDA_ONLY:
        with pytest.raises(ValueError, match=f"suite: {suite} reads CUDA kernel times.*run it on a GPU"):
            runner.measure(suite, str(tmp_path), quick=True, device="cpu")
