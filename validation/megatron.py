"""Megatron-LM's Table 1 (Narayanan et al., SC'21) predicted by ``plansim simulate``.

Each published row becomes a plan as the authors ran it (``run_table_1.sh``): GPT with
dropout, fp16 mixed precision with fp16 gradients (accumulated by autograd, no fp32 main_grad:
the scripts at Megatron-LM 6985e58 pass neither --accumulate-allreduce-grads-in-fp32 nor
contiguous buffers), synchronous pipeline sends (the 2021 p2p code synchronised the device after
every batched send/receive); with pipelining Megatron's local DDP (one all-reduce after the
backward), without it PyTorch DDP (bucketed all-reduce overlapped with the backward),
full activation recomputation, unfused attention (fused scale-mask-softmax; no flash attention
then), no sequence parallelism, the interleaved schedule where the row names virtual stages.
The achieved TFLOP/s per GPU follows the paper's own count, which includes the recomputation
forward: F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)).
"""
from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from plansim.api import simulate
from plansim.validation.reference_data import load_megatron_table1, megatron_flops_per_iteration, megatron_gpt_spec


def megatron_plan(row: Mapping[str, Any]) -> dict[str, Any]:
    """The plan of one Table 1 row, as the authors' script set it."""
    lpvs = row.get("layers_per_virtual_stage")
    vpp = 1 if pd.isna(lpvs) else int(row["layers"]) // (int(row["pp"]) * int(lpvs))
    # run_table_1.sh: --DDP-impl torch without pipelining (bucketed all-reduce overlapped with
    # backward), local with it (all-reduce after backward).  Either way the gradients are fp16:
    # the scripts (Megatron-LM 6985e58) pass neither --accumulate-allreduce-grads-in-fp32 nor
    # --use-contiguous-buffers-in-ddp, so autograd accumulates into param.grad in fp16.
    local_ddp = int(row["pp"]) > 1
    return dict(tp=int(row["tp"]), pp=int(row["pp"]), dp=int(row["dp"]), micro_batch=int(row["micro_batch"]),
                global_batch=int(row["global_batch"]), seq_len=int(row["seq_len"]), recompute="full",
                sequence_parallel=False, schedule="interleaved" if vpp > 1 else "1f1b", vpp=vpp,
                precision="bf16-mixed", fp32_grads=False, overlap_grad_reduce=not local_ddp,
                ddp="megatron" if local_ddp else "torch",
                grad_accumulation_fusion=False, overlap_p2p=False, attention="unfused")


def compare_megatron_table1(hardware: str = "a100-80gb", calibrated: bool = True) -> pd.DataFrame:
    """Predicted vs published TFLOP/s per GPU for every row, with the signed error."""
    rows = []
    for _, row in load_megatron_table1().iterrows():
        gpus = int(row["gpus"])
        result = simulate(megatron_gpt_spec(row), hardware, plan=megatron_plan(row), nodes=gpus // 8,
                          gpus_per_node=8, calibrated=calibrated)
        predicted = megatron_flops_per_iteration(row) / result.step_time_s / gpus / 1e12
        published = float(row["tflops_per_gpu"])
        rows.append({"params_b": row["params_b"], "gpus": gpus, "tp": row["tp"], "pp": row["pp"], "dp": row["dp"],
                     "published_tflops": published, "predicted_tflops": predicted,
                     "error": (predicted - published) / published, "step_time_s": result.step_time_s,
                     "bubble_s": result.time_breakdown["pipeline_bubble"],
                     "exposed_comm_s": result.time_breakdown["exposed_communication"],
                     "fits": result.fits, "peak_memory_gib": result.peak_memory_bytes / 2**30})
    return pd.DataFrame(rows)


def main() -> None:
    """Print the comparison (``python -m plansim.validation.megatron``)."""
    frame = compare_megatron_table1()
    cols = ["params_b", "gpus", "tp", "pp", "dp", "published_tflops", "predicted_tflops", "error",
            "exposed_comm_s", "bubble_s", "peak_memory_gib"]
    print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    err = frame["error"].abs()
    print(f"median |error| {err.median():.1%}, max {err.max():.1%}, mean signed {frame['error'].mean():+.1%}")


if __name__ == "__main__":
    main()
