"""Megatron-LM Table 1 (Narayanan et al., SC'21) through plansim simulate.

Every published run fitted in an A100's 80 GB and ran, so every row must simulate and fit; the
accuracy bound of issue 2 (median |error| ≤ 5 %, no row over 15 %) is asserted.  Nothing is
fitted to these rows: the A100's GEMM rate comes from Vidur's A100 tables."""
import pandas as pd
import pytest

from plansim.validation.megatron import compare_megatron_table1, megatron_plan
from plansim.validation.reference_data import load_megatron_table1


@pytest.fixture(scope="module")
def table():
    return compare_megatron_table1()


def test_every_published_run_simulates_and_fits(table):
    assert len(table) == len(load_megatron_table1()) == 10
    assert table["fits"].all(), table.loc[~table["fits"], ["params_b", "peak_memory_gib"]]
    assert (table["predicted_tflops"] > 0).all()
    # throughput can never beat the A100's dense fp16 peak
    assert (table["predicted_tflops"] < 312).all()


def test_plans_follow_the_authors_script():
    rows = load_megatron_table1()
    for _, row in rows.iterrows():
        plan = megatron_plan(row)
        assert plan["tp"] * plan["pp"] * plan["dp"] == row["gpus"]
        assert plan["recompute"] == "full" and plan["attention"] == "unfused"
        # run_table_1.sh: virtual stages of the given size cover the layers exactly
        lpvs = row["layers_per_virtual_stage"]
        if pd.isna(lpvs):
            assert plan["vpp"] == 1 and plan["schedule"] == "1f1b"
        else:
            assert plan["pp"] * plan["vpp"] * int(lpvs) == row["layers"]


def test_table1_accuracy_bound(table):
    """Issue 2's target: a median |error| of 5 % and a worst of 15 % (4.8 % and 7.8 % since the
    receiver's TP all-gather of Megatron-LM 2021's scatter-gather pipeline messages is charged;
    5.01 % before it)."""
    err = table["error"].abs()
    assert err.median() <= 0.05
    assert err.max() <= 0.15


@pytest.fixture(scope="module")
def sweeps():
    from plansim.validation.megatron import compare_megatron_sweeps
    return compare_megatron_sweeps()


def test_figure_13_peaks_at_tensor_parallel_size_8(sweeps):
    """Narayanan et al. §5.4.1 (Figure 13): for the 162B model on 64 GPUs, throughput peaks where
    the tensor-parallel size equals the GPUs of one DGX A100 node (8), at both batch sizes."""
    fig = sweeps[sweeps.figure == 13]
    assert fig.fits.all()
    for batch, part in fig.groupby("global_batch"):
        assert int(part.loc[part.predicted_tflops.idxmax(), "tp"]) == 8, (batch, part)


@pytest.mark.parametrize("figure,degree", [(14, "pp"), (15, "tp")])
def test_figures_14_15_throughput_falls_with_model_parallel_size(sweeps, figure, degree):
    """§5.4 (Figures 14 and 15): for the 5.9B model, throughput decreases as the pipeline-parallel
    (Figure 14) or tensor-parallel (Figure 15) size grows at the expense of data parallelism, at
    every batch size."""
    fig = sweeps[sweeps.figure == figure]
    assert fig.fits.all()
    for batch, part in fig.groupby("global_batch"):
        rates = part.sort_values(degree).predicted_tflops.to_numpy()
        assert (rates[1:] < rates[:-1]).all(), (batch, part)
