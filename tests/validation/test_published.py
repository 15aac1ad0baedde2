"""Published runs of other software stacks (validation/reference/published_runs.csv) through
plansim simulate.  Nothing is fitted to them.  plansim models a tuned stack, so the runs of
current Megatron-Core on the H100 (whose kernels and power are measured here) must come out
close, and no published run may beat plansim's prediction by much: a run far faster than the
prediction would show a cost the model charges that the hardware does not."""
import pytest

from plansim.validation.published import compare_published_runs, summarize
from plansim.validation.reference_data import load_published_runs



@pytest.fixture(scope="module")
def runs():
    return compare_published_runs()


def test_every_run_has_a_source_and_simulates(runs):
    table = load_published_runs()
    assert table["source"].str.len().gt(10).all()
    assert len(runs) == len(table)
    assert (runs["predicted"] > 0).all() and (runs["published"] > 0).all()


def test_current_megatron_core_on_h100_within_5_percent(runs):
    """NeMo 25.02 and every Megatron-Bridge release (2025-26), dense and mixture-of-experts, with
    the userbuffers TP overlap their recipes enable: median within 5 %, every run within 20 %
    (15 % before that overlap was modelled; Llama 3 405B of release 25.11, at a third of the later
    releases' batch, is the largest miss)."""
    current = runs[(runs["stack"].str.startswith("Megatron-Bridge") | (runs["stack"] == "NeMo 25.02"))
                   & (runs["hardware"] == "h100-sxm")]
    assert len(current) >= 10 and current["model"].str.startswith("qwen3").any()
    assert current["error"].abs().median() <= 0.05, current[["model", "published", "predicted", "error"]]
    assert current["error"].abs().max() <= 0.20, current[["model", "published", "predicted", "error"]]


def test_no_published_run_beats_the_prediction_by_more_than_15_percent(runs):
    fastest = runs.nsmallest(3, "error")
    assert runs["error"].min() >= -0.15, fastest[["stack", "model", "hardware", "published", "predicted", "error"]]


def test_summary_counts_every_run(runs):
    summary = summarize(runs)
    assert summary["runs"].sum() == len(runs)
    assert (summary["min_error"] <= summary["median_error"]).all()
    assert (summary["median_error"] <= summary["max_error"]).all()


def test_torchtitan_runs_under_op_level_recompute_fit_as_they_ran(runs):
    """torchtitan's Llama 3 8B runs used its op-level selective checkpointing (llama3_8b.toml,
    selective_ac_option 'op'); modelled as such (``selective-op``) they fit in memory, as they
    did on the hardware.  Megatron's selective (the attention core only) would not fit them."""
    table = load_published_runs()
    op_sac = runs[(table["recompute"] == "selective-op").to_numpy()]
    assert len(op_sac) == 4 and (op_sac["stack"].str.startswith("torchtitan")).all()
    assert op_sac["fits"].all(), op_sac[["model", "gpus", "fits"]]


def test_llm_foundry_runs_with_their_fused_loss_mostly_fit_as_they_ran(runs):
    """llm-foundry's MPTs ran flash-attn's fused cross-entropy (``loss_fn`` default
    ``fused_crossentropy``), which never holds fp32 logits.  Modelled so, at most 9 of its 216 runs
    come out of memory (with the unfused loss: 79, mostly the small models, whose 50k-row logits
    dominate their memory)."""
    table = load_published_runs()
    foundry = table["stack"].str.startswith("llm-foundry")
    assert (table.loc[foundry, "cross_entropy"] == "fused").all() and foundry.sum() == 216
    assert (~runs.loc[foundry.to_numpy(), "fits"]).sum() <= 9


def test_torchtitan_h100_runs_fit_on_the_96_gb_part_they_ran_on(runs):
    """torchtitan's long-context runs reported 83.9-84.5 GiB in use: more than an H100 80GB holds,
    within the Grand Teton H100's 96 GB (``h100-sxm-96gb``), where every one of its H100 runs fits."""
    titan = runs[runs["stack"].str.startswith("torchtitan") & runs["hardware"].str.startswith("h100")]
    assert len(titan) == 10 and (titan["hardware"] == "h100-sxm-96gb").all()
    assert titan["fits"].all(), titan[["model", "gpus", "seq_len", "fits"]]


def test_every_nvidia_fp8_run_fits_as_it_ran(runs):
    """NeMo's and Megatron-Bridge's fp8 runs on Transformer Engine, which keeps each linear
    layer's quantized input for backward: every one fits in plansim's memory, as it did on the
    hardware (charged 16-bit inputs, three of them did not)."""
    nvidia = runs[runs["stack"].str.startswith(("NeMo", "Megatron-Bridge"))]
    assert len(nvidia) >= 30
    assert nvidia["fits"].all(), nvidia.loc[~nvidia["fits"], ["stack", "model", "gpus"]]


def test_async_tp_speeds_torchtitans_70b_run_about_as_measured(runs):
    """torchtitan's Llama 3 70B on 256 H100s (FSDP 32 × TP 8) ran at 829 tokens/s per GPU and at
    876 with AsyncTP (+5.7 %).  Modelled as ``tp_comm_overlap``, the same pair must speed up by
    between half and twice that gain (it is +3.5 %: half of what overlap hides comes back as
    slower GEMMs, the contention measured for NCCL beside GEMMs)."""
    table = load_published_runs()
    pair = runs[((table["model"] == "llama3-70b") & table["stack"].str.startswith("torchtitan")
                 & (table["hardware"] == "h100-sxm-96gb")).to_numpy()]
    overlap = table.loc[pair.index, "tp_comm_overlap"].eq(True).to_numpy()
    assert len(pair) == 2 and overlap.sum() == 1
    published = pair["published"][overlap].iloc[0] / pair["published"][~overlap].iloc[0] - 1
    predicted = pair["predicted"][overlap].iloc[0] / pair["predicted"][~overlap].iloc[0] - 1
    assert published / 2 <= predicted <= 2 * published, (predicted, published)


def test_nemo_long_sequence_rows_convert_their_tflops_with_nemos_llama2_count():
    """The NeMo 24.03 long-sequence rows were published as TFLOP/s per GPU: their tokens/s times
    NeMo's llama2 FLOPs per token (nemo/utils/flops_formulas.py, attention not halved for the
    causal mask) gives back the published figure, and every run is a whole CP layout."""
    table = load_published_runs()
    rows = table[table["stack"].str.startswith("NeMo 24.03")]
    assert len(rows) == 9
    layers, hidden, ffn, vocab = 32, 4096, 11008, 32000
    for _, row in rows.iterrows():
        s = row["seq_len"]
        per_token = layers * hidden ** 2 * (12 + 12 + 18 * ffn / hidden + 12 * s / hidden + 6 * vocab / (layers * hidden))
        published = float(row["published_as"].split(" TFLOP/s")[0])
        assert row["tokens_per_s_per_gpu"] * per_token / 1e12 == pytest.approx(published, rel=5e-4)  # tokens/s to 0.1
        assert row["gpus"] % (row["tp"] * row["pp"] * row["cp"]) == 0 and s % row["cp"] == 0


def test_a_run_on_its_own_fabric_is_simulated_on_it(runs):
    """BLOOM's cluster had four 100 Gb/s links per 8-GPU node (``nics_per_node``, ``nic_gbps``),
    a quarter of a DGX A100's: simulated on it, the run is slower than on the default fabric."""
    from plansim.api import simulate
    from plansim.validation.published import run_plan
    from plansim.validation.reference_data import published_model

    table = load_published_runs()
    own = table[table["nics_per_node"].notna()]
    assert set(own["model"]) >= {"bloom-176b"}
    row = own[own["model"] == "bloom-176b"].iloc[0]
    default = simulate(published_model("bloom-176b", 2048), "a100-80gb", plan=run_plan(row), nodes=48, gpus_per_node=8)
    predicted = runs.loc[row.name, "predicted"] * int(row["gpus"])
    assert predicted < default.tokens_per_s
