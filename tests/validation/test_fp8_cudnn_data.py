"""The stored ``fp8``, ``cudnnattention`` and ``powerfp8`` runs (one H200, 2026-12-05): what they
measured, and the cost models against their held-out half (calibration saw only the other half)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from plansim.simulator.costs.compute import attention_time, gemm_time
from plansim.validation.compare import DATA_DIR, calibrated_cluster, validate
from plansim.validation.power import fp8_stream_rates

FP8 = DATA_DIR / "fp8-h200-x1"
CUDNN = DATA_DIR / "cudnnattention-h200-x1"
POWER_FP8 = DATA_DIR / "h200-x1" / "powerfp8"


@pytest.fixture(scope="module")
def scored() -> pd.DataFrame:
    return validate("kernels")


@pytest.fixture(scope="module")
def h200():
    return calibrated_cluster(FP8)[0].device


@pytest.mark.parametrize("folder, suite", [(FP8, "fp8"), (CUDNN, "cudnnattention"), (POWER_FP8, "powerfp8")])
def test_provenance_names_the_card_and_the_command(folder, suite):
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["gpu_name"] == "NVIDIA H200" and prov["driver"] and prov["torch"] and prov["date"]
    assert f"--suite {suite}" in prov["command"] and prov["quick"] is False


def test_fp8_gemms_run_near_twice_bf16_and_split_accumulation_costs_a_few_percent():
    """The measurement itself: on large shapes an fp8 GEMM runs at ~1.9× its bf16 twin measured
    beside it, and the split accumulator (Transformer Engine's dgrad and wgrad) 3-10 % slower."""
    rows = pd.read_csv(FP8 / "kernels.csv")
    gemm = rows[(rows["kind"] == "gemm") & (rows["m"] >= 4096)]
    rates = gemm.pivot_table(index=["m", "n", "k"], columns="impl", values="tflops")
    assert (rates["e4m3-fast"] / rates["fp8-reference"]).median() == pytest.approx(1.9, abs=0.1)
    split = (rates["e5m2-e4m3"] / rates["e4m3-fast"]).median()
    assert 0.90 < split < 0.97


def test_held_out_fp8_gemms_are_predicted_within_3_percent(scored):
    fp8 = scored[(scored["source"] == "fp8-h200-x1") & (scored["kind"] == "gemm")]
    assert len(fp8) >= 40  # the evaluation half of 129 GEMM rows
    for impl in ("e4m3-fast", "e5m2-e4m3", "fp8ref"):
        part = fp8[fp8["case_id"].str.contains(impl)]
        assert part["error"].abs().median() <= 0.03, (impl, part[["case_id", "error"]])


def test_the_model_charges_split_accumulation_and_short_k_like_the_measurement(h200):
    fast = float(gemm_time(8192, 8192, 8192, "fp8", h200))
    split = float(gemm_time(8192, 8192, 8192, "fp8", h200, split_accumulate=True))
    assert 1.03 < split / fast < 1.12
    assert float(gemm_time(8192, 8192, 8192, "bf16", h200, split_accumulate=True)) == pytest.approx(
        float(gemm_time(8192, 8192, 8192, "bf16", h200)))  # bf16 accumulates in fp32 anyway
    # a short K loop costs fp8 a larger share of its time than bf16 (fixed per-tile work)
    short = float(gemm_time(4096, 8192, 1024, "bf16", h200)) / float(gemm_time(4096, 8192, 1024, "fp8", h200))
    long = float(gemm_time(4096, 8192, 8192, "bf16", h200)) / float(gemm_time(4096, 8192, 8192, "fp8", h200))
    assert short < long


def test_cudnn_attention_runs_near_twice_flash_attention_2_and_is_predicted_held_out(scored, h200):
    rows = pd.read_csv(CUDNN / "kernels.csv")
    long = rows[(rows["head_dim"] == 128) & (rows["seq_len"] >= 4096)]
    assert long["tflops"].median() > 500  # FlashAttention-2 on this card: 280-360
    part = scored[scored["source"] == "cudnnattention-h200-x1"]
    assert len(part) >= 50 and part["error"].abs().median() <= 0.05, part[["case_id", "error"]]
    for phase in ("forward", "backward"):
        flash = float(attention_time(1, 32, 8, 128, 8192, 8192, True, phase, h200))
        cudnn = float(attention_time(1, 32, 8, 128, 8192, 8192, True, phase, h200, impl="cudnn"))
        assert 1.6 < flash / cudnn < 2.2, phase


def test_fp8_gemm_streams_settle_where_the_power_model_puts_them(h200):
    """An fp8 GEMM at twice bf16's FLOP rate is held to about a bf16 GEMM's clock (the model caps
    a tensor kernel's draw at a large bf16 GEMM's): the sustained rates are never fitted."""
    rates = fp8_stream_rates(POWER_FP8, h200)
    assert len(rates) == 4 and rates["phase"].str.contains("fp8").sum() == 3
    assert (rates["measured_tflops"] < rates["short_tflops"]).all()  # the limit holds every stream
    assert rates["error"].abs().max() <= 0.08, rates


def test_one_die_measures_alike_and_lends_what_the_other_lacks():
    """One die (GH100) and one library: the H100 SXM, measured on its own cuDNN attention and fp8
    GEMMs (cudnnattention-h100-x1, fp8-h100-x1), fits them within a few percent of the H200's;
    never measured on collectives (one GPU lent), it carries the H200 host's cost of an NCCL call,
    which ``plansim calibrate`` copies across (``DIE_PARAMETERS``), as it lends the H200 what only
    the H100 measured."""
    from plansim.simulator.calibration import read_calibration
    from plansim.validation.compare import CALIBRATED_DIR

    h100, h200 = (read_calibration(CALIBRATED_DIR / f"{name}.yaml") for name in ("h100-sxm", "h200"))
    for folder in ("fp8-h100-x1", "cudnnattention-h100-x1"):
        assert any(folder in source for source in h100["fitted_on"]), folder
    for field in ("fp8_gemm_fraction", "fp8_split_accumulate_ratio"):
        assert h100["parameters"][field] == pytest.approx(h200["parameters"][field], rel=0.02), field
    for field in ("attention_fraction", "attention_bwd_ratio"):
        assert (h100["parameters"]["cudnn_attention"][field]
                == pytest.approx(h200["parameters"]["cudnn_attention"][field], rel=0.03)), field
    assert h100["parameters"]["collective_launch_s"] == h200["parameters"]["collective_launch_s"]
    # the other way round, the H200 (no wide-head rows) takes the H100's wide-head backward loss,
    # for FlashAttention-2 and inside its own cuDNN fit
    assert h200["parameters"]["attention_bwd_wide_exponent"] == h100["parameters"]["attention_bwd_wide_exponent"]
    assert (h200["parameters"]["cudnn_attention"]["attention_bwd_wide_exponent"]
            == h100["parameters"]["cudnn_attention"]["attention_bwd_wide_exponent"])
    assert h200["parameters"]["cudnn_attention"]["attention_fraction"] != h100["parameters"]["cudnn_attention"][
        "attention_fraction"]  # its own fit otherwise


def test_wide_head_attention_is_costed_from_its_own_calibration_half():
    """Suite ``headdims`` (one H100, 2026-12-05): SDPA flash and cuDNN attention at head dims 96,
    192 and 256.  Half of it fits how the backward kernels slow down beyond head dim 128
    (``attention_bwd_wide_exponent``; before it, the model extrapolated the 64/128 rates and put the
    held-out wide backward passes 18 % fast at the median); the other half is predicted within 10 %
    (median), the backward without bias."""
    from plansim.validation.compare import DATA_DIR, validate

    frame = validate("kernels", DATA_DIR)
    wide = frame[frame.source == "headdims-h100-x1"]
    assert len(wide) >= 30
    assert wide.error.abs().median() < 0.10
    assert abs(wide[wide.case_id.str.contains("-bwd-")].error.median()) < 0.05


def test_latent_attention_kernels_are_held_out_and_predicted_within_12_percent():
    """Suite ``mlaattention`` (one H100, 2026-12-05): cuDNN's attention with DeepSeek-V3's query/key
    heads of 192 and value heads of 128, never fitted.  The forward is predicted within 5 % (median);
    the backward 11 % slow, where it was 10 % fast before the wide-head backward term: costed at the
    mean of the two widths (the backward's blocks scale with their sum), MLA's backward sits between
    a 128- and a 160-wide one on the GPU."""
    from plansim.validation.compare import DATA_DIR, validate

    frame = validate("kernels", DATA_DIR)
    mla = frame[frame.source == "mlaattention-h100-x1"]
    assert len(mla) == 16
    assert mla[mla.case_id.str.contains("-fwd-")].error.abs().median() < 0.05
    assert mla[mla.case_id.str.contains("-bwd-")].error.abs().median() < 0.15
