"""Published training throughput of other software stacks, predicted by ``plansim simulate``.

``validation/reference/published_runs.csv`` holds 288 runs that neither the cost models nor
their calibration ever saw: NVIDIA's NeMo 24.07 / 25.02 and Megatron-Bridge 25.09 – 26.06
performance tables (Megatron-Core, H100 and B200, fp8; Llama 3 and Qwen3 MoE), NeMo 24.03's
long-sequence table (Llama 2 7B, context parallelism up to 32, published as TFLOP/s and
converted with NeMo's own FLOP count), torchtitan's
Llama 3 benchmarks (FSDP2, H100 and A100), MosaicML llm-foundry's MPT tables (Composer FSDP, A100
and H100, 2023) and four Megatron-DeepSpeed runs (BLOOM-176B, MT-NLG 530B).  Each row is
simulated with its plan on 8-GPU nodes of its hardware, and the prediction is compared in tokens
per second per GPU, which no FLOP-counting convention can change (positive error: plansim
predicts faster).

What it shows (``python -m plansim.validation.published``): plansim predicts what a tuned,
current Megatron-Core stack reaches on the GPUs it has measured; older or less tuned stacks run
slower than that, and the B200 (no measurements, no power model) is predicted too fast.
"""
from __future__ import annotations

import math

import pandas as pd

from plansim.api import simulate
from plansim.validation.reference_data import load_published_runs, published_model

#: the plan columns of ``published_runs.csv`` (empty: plansim's default)
PLAN_COLUMNS = ("tp", "pp", "cp", "ep", "etp", "zero", "micro_batch", "global_batch", "seq_len", "recompute", "schedule", "vpp",
                "precision", "framework", "attention", "sequence_parallel", "cross_entropy", "ddp", "tp_comm_overlap",
                "fp32_grads", "moe_dispatcher", "moe_a2a_overlap", "overlap_p2p", "tp_backward_overlap",
                "grad_accumulation_fusion", "overlap_grad_reduce")
_INTEGER_FIELDS = {"tp", "pp", "cp", "ep", "etp", "zero", "micro_batch", "global_batch", "seq_len", "vpp"}


def run_plan(row: pd.Series) -> dict:
    """Plan fields of one published run."""
    plan = {}
    for column in PLAN_COLUMNS:
        value = row[column]
        if isinstance(value, float) and math.isnan(value):
            continue
        plan[column] = int(value) if column in _INTEGER_FIELDS else value
    return plan


def compare_published_runs(calibrated: bool = True) -> pd.DataFrame:
    """Every published run with plansim's prediction (tokens/s per GPU), the signed error
    (predicted / published − 1) and whether plansim finds that the plan fits in memory."""
    rows = []
    for _, row in load_published_runs().iterrows():
        gpus = int(row["gpus"])
        power = None if pd.isna(row["power_limit_w"]) else float(row["power_limit_w"])
        # the run's own fabric where it was not its device's default cluster's (BLOOM's Omni-Path)
        nics = None if pd.isna(row["nics_per_node"]) else int(row["nics_per_node"])
        gbps = None if pd.isna(row["nic_gbps"]) else float(row["nic_gbps"])
        result = simulate(published_model(row["model"], int(row["seq_len"])), row["hardware"], plan=run_plan(row), nodes=max(1, gpus // 8),
                          gpus_per_node=min(8, gpus), calibrated=calibrated, power_limit_w=power,
                          nics_per_node=nics, nic_gbps=gbps)
        predicted = result.tokens_per_s / gpus
        published = float(row["tokens_per_s_per_gpu"])
        rows.append({"stack": row["stack"], "model": row["model"], "hardware": row["hardware"], "gpus": gpus,
                     "seq_len": int(row["seq_len"]), "published": published, "predicted": predicted,
                     "error": predicted / published - 1.0, "fits": result.fits, "source": row["source"]})
    return pd.DataFrame(rows)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Runs, median and range of the signed error, and runs plansim finds out of memory, per
    (software stack, hardware)."""
    grouped = frame.groupby(["stack", "hardware"], sort=True)
    return pd.DataFrame({"runs": grouped.size(), "median_error": grouped["error"].median(),
                         "min_error": grouped["error"].min(), "max_error": grouped["error"].max(),
                         "out_of_memory": grouped["fits"].apply(lambda f: int((~f).sum()))}).reset_index()


def main() -> None:
    """Print the per-stack summary and the runs outside llm-foundry's long table."""
    frame = compare_published_runs()
    fmt = {"float_format": lambda v: f"{v:+.3f}" if abs(v) < 1 else f"{v:.0f}", "index": False}
    print("Published runs vs plansim (tokens/s per GPU; error > 0: predicted faster)")
    print(summarize(frame).to_string(**fmt))
    print()
    print(frame[~frame["stack"].str.startswith("llm-foundry")].drop(columns="source").to_string(**fmt))
    print(f"\nall {len(frame)} runs: median error {frame['error'].median():+.1%}, "
          f"range {frame['error'].min():+.1%} … {frame['error'].max():+.1%}")


if __name__ == "__main__":
    main()
