"""Korthikanti et al. 2022 (arXiv:2205.05198): measured Megatron-LM iteration times on A100.

Held-out: nothing in plansim is fitted to these runs.  The tests check the transcription against
a second source, that every run simulates and fits, that the saving of sequence parallelism with
selective recomputation over full recomputation is predicted as measured, and the current
accuracy (a regression bound, not a target)."""
import pandas as pd
import pytest

from plansim.validation.megatron import compare_korthikanti2022, korthikanti_plan
from plansim.validation.reference_data import load_korthikanti2022, megatron_model_flops_per_iteration

# Megatron-LM README at 841f789f48 (May 2022): MFU of these runs (selective recomputation +
# sequence parallelism, data-parallel size 1)
README_MFU = {"22B": 0.415, "175B": 0.514, "530B": 0.560, "1T": 0.563}


@pytest.fixture(scope="module")
def runs():
    return compare_korthikanti2022()


def test_transcription_reproduces_megatron_readme_mfu():
    data = load_korthikanti2022()
    selective = data[data["recompute"] == "selective"]
    assert set(selective["model"]) == set(README_MFU)
    for _, row in selective.iterrows():
        mfu = megatron_model_flops_per_iteration(row) / (row["iteration_time_s"] * row["gpus"] * 312e12)
        assert mfu == pytest.approx(README_MFU[row["model"]], abs=0.002), row["model"]


def test_plans_are_the_published_layouts():
    for _, row in load_korthikanti2022().iterrows():
        plan = korthikanti_plan(row)
        assert plan["tp"] * plan["pp"] * plan["dp"] == row["gpus"]
        assert plan["global_batch"] % (plan["dp"] * plan["micro_batch"]) == 0
        assert plan["sequence_parallel"] == (plan["recompute"] == "selective")


def test_every_run_simulates_and_fits(runs):
    assert len(runs) == 8
    assert runs["fits"].all(), runs.loc[~runs["fits"], ["model", "recompute", "peak_memory_gib"]]


def test_recomputation_saving_is_predicted_as_measured(runs):
    """Full / selective iteration time, per model: measured 1.29-1.32; the prediction must agree
    within 5 % (it is a ratio of two predictions, so device-rate errors largely cancel)."""
    wide = runs.pivot(index="model", columns="recompute", values=["measured_s", "predicted_s"])
    measured = wide["measured_s"]["full"] / wide["measured_s"]["selective"]
    predicted = wide["predicted_s"]["full"] / wide["predicted_s"]["selective"]
    assert ((predicted / measured - 1).abs() < 0.05).all(), pd.DataFrame({"measured": measured, "predicted": predicted})


def test_accuracy_regression_bound(runs):
    """Current accuracy on the calibrated A100 profile (GEMM rate fitted to Vidur's A100 tables):
    median |error| 4.1 %, worst 10.3 % (1T, pessimistic), within 3.1 % up to 175B (README,
    "Accuracy against published runs"; 22B selective went from -2.9 to -3.05 % when its tied
    embedding stopped being counted twice at pp 1)."""
    err = runs["error"]
    assert err.abs().median() <= 0.05
    assert err.abs().max() <= 0.11
    small = runs[runs["model"].isin(["22B", "175B"])]
    assert (small["error"].abs() <= 0.035).all()
