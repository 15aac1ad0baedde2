"""Published reference data: Megatron-LM Table 1 (Narayanan et al., SC'21, arXiv:2104.04473)."""
from __future__ import annotations

import pandas as pd
import pytest

from plansim.validation.reference_data import (MEGATRON_A100_PEAK_FLOPS, load_megatron_table1,
                                               megatron_flops_per_iteration, megatron_gpt_spec,
                                               megatron_params, megatron_step_time_s)

TABLE = load_megatron_table1()
ROWS = [row for _, row in TABLE.iterrows()]
IDS = [f"{row.params_b:g}B" for row in ROWS]


def test_all_ten_rows_and_columns():
    assert len(TABLE) == 10
    for col in ("params_b", "heads", "hidden", "layers", "tp", "pp", "dp", "gpus", "global_batch", "micro_batch",
                "layers_per_virtual_stage", "tflops_per_gpu", "pct_peak", "seq_len", "vocab"):
        assert col in TABLE.columns
    assert (TABLE["seq_len"] == 2048).all() and (TABLE["vocab"] == 51200).all()
    assert list(TABLE["params_b"]) == [1.7, 3.6, 7.5, 18.4, 39.1, 76.1, 145.6, 310.1, 529.6, 1008.0]


def test_interleaving_only_where_the_script_sets_it():
    lpvs = dict(zip(TABLE["params_b"], TABLE["layers_per_virtual_stage"]))
    assert {k: int(v) for k, v in lpvs.items() if not pd.isna(v)} == {76.1: 5, 145.6: 5, 310.1: 3, 529.6: 1}
    assert list(TABLE["virtual_stages"]) == [1, 1, 1, 1, 1, 3, 2, 2, 3, 1]


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_row_is_consistent(row):
    assert row.gpus == row.tp * row.pp * row.dp
    assert row.gpus % 8 == 0  # whole DGX A100 nodes
    assert row.global_batch % (row.dp * row.micro_batch) == 0
    assert row.heads % row.tp == 0 and row.hidden % row.heads == 0
    assert row.layers % row.pp == 0
    if not pd.isna(row.layers_per_virtual_stage):
        assert (row.layers // row.pp) % row.layers_per_virtual_stage == 0
    # "% of peak" is TFLOP/s per GPU over 312 TFLOP/s, rounded to a whole percent
    assert round(100 * row.tflops_per_gpu * 1e12 / MEGATRON_A100_PEAK_FLOPS) == row.pct_peak


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_params_match_paper_formula_and_modelspec(row):
    spec = megatron_gpt_spec(row)
    paper = megatron_params(row)
    # ModelSpec counts the final LayerNorm (2h) that the paper's closed form leaves out
    assert spec.num_params - paper == pytest.approx(2 * row.hidden, abs=1.0)
    # the printed value is the count rounded to 0.1 B: within 1% from 3.6 B up, and exactly
    # reproduced by rounding for every row (1.7 B is 1.652 B, 2.8% below the printed figure)
    assert round(spec.num_params / 1e9, 1) == row.params_b
    if row.params_b >= 3.6:
        assert spec.num_params / 1e9 == pytest.approx(row.params_b, rel=0.011)
    if row.params_b >= 7.5:
        assert spec.num_params / 1e9 == pytest.approx(row.params_b, rel=0.01)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_paper_flops_are_modelspec_model_flops_plus_recompute(row):
    """F (paper) = model FLOPs (3 passes: forward + 2× backward, Megatron's MFU convention) + one
    more forward of every layer (full recomputation); logits are not recomputed."""
    spec = megatron_gpt_spec(row)
    s, l, h = int(row.seq_len), int(row.layers), int(row.hidden)
    tokens = row.global_batch * s
    model_flops = spec.model_flops_per_token(s) * tokens
    recompute = l * (24 * h * h + 4 * s * h) * tokens
    assert megatron_flops_per_iteration(row) == pytest.approx(model_flops + recompute, rel=1e-12)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_implied_step_time(row):
    """TFLOP/s per GPU = F / (step time × GPUs): the implied step time is positive and
    reproduces the published throughput; and it is of the size the paper reports."""
    t = megatron_step_time_s(row)
    assert t > 0
    assert megatron_flops_per_iteration(row) / (t * row.gpus) / 1e12 == pytest.approx(row.tflops_per_gpu)
    assert 1.0 < t < 200.0


def test_implied_step_times_values():
    times = [megatron_step_time_s(row) for row in ROWS]
    assert times[0] == pytest.approx(3.53, abs=0.01)    # 1.7 B, 32 GPUs
    assert times[-1] == pytest.approx(102.6, abs=0.1)   # 1 T, 3072 GPUs


def test_gpt_spec_architecture():
    spec = megatron_gpt_spec(ROWS[0])
    assert (spec.mlp, spec.norm, spec.position, spec.bias, spec.tied_embeddings) == (
        "gelu", "layernorm", "learned", True, True)
    assert (spec.ffn_hidden, spec.vocab, spec.max_seq_len) == (4 * 2304, 51200, 2048)
