"""Megatron-LM's published A100 runs predicted by ``plansim simulate``: Table 1 of Narayanan
et al. (SC'21, achieved TFLOP/s), the parallelism sweeps of its Figures 13-15 (against the
findings the paper states), and the measured iteration times of Korthikanti et al. (2022).

Each published row becomes a plan as the authors ran it (``run_table_1.sh``): GPT with
dropout, fp16 mixed precision with fp16 gradients (accumulated by autograd, no fp32 main_grad:
the scripts at Megatron-LM 6985e58 pass neither --accumulate-allreduce-grads-in-fp32 nor
contiguous buffers), synchronous pipeline sends (the 2021 p2p code synchronised the device after
every batched send/receive), TP all-reduces in line (the asynchronous one came in September
2021); with pipelining Megatron's local DDP (one all-reduce after the backward), without it PyTorch DDP (bucketed all-reduce overlapped with the backward),
full activation recomputation, unfused attention (fused scale-mask-softmax; no flash attention
then), no sequence parallelism, the interleaved schedule where the row names virtual stages.
The achieved TFLOP/s per GPU follows the paper's own count, which includes the recomputation
forward: F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)).
"""
from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from plansim.api import simulate
from plansim.validation.reference_data import (load_korthikanti2022, load_megatron_table1, megatron_flops_per_iteration,
                                               megatron_gpt_spec)


#: what the Megatron-LM runs of both papers share: fp16 with loss scaling and fp16 gradients
#: (gradient-accumulation fusion needed fp32 ones until late 2022), synchronous pipeline sends,
#: unfused attention (fused scale-mask-softmax; no flash attention then)
MEGATRON_FP16 = dict(precision="fp16-mixed", fp32_grads=False, grad_accumulation_fusion=False, overlap_p2p=False,
                     attention="unfused")
#: Table 1's fixed setup on top (Megatron-LM 6985e58): no sequence parallelism yet, TP
#: all-reduces in line (the asynchronous one came in September 2021)
TABLE1_SETUP = dict(MEGATRON_FP16, sequence_parallel=False, tp_backward_overlap=False)


def _row_plan(row: Mapping[str, Any], vpp: int, **fields: Any) -> dict[str, Any]:
    """A published run's layout (degrees, batches, sequence, schedule) plus ``fields``."""
    return dict(tp=int(row["tp"]), pp=int(row["pp"]), dp=int(row["dp"]), micro_batch=int(row["micro_batch"]),
                global_batch=int(row["global_batch"]), seq_len=int(row["seq_len"]),
                schedule="interleaved" if vpp > 1 else "1f1b", vpp=vpp, **fields)


def megatron_plan(row: Mapping[str, Any]) -> dict[str, Any]:
    """The plan of one Table 1 row, as the authors' script set it."""
    lpvs = row.get("layers_per_virtual_stage")
    vpp = 1 if pd.isna(lpvs) else int(row["layers"]) // (int(row["pp"]) * int(lpvs))
    # run_table_1.sh: --DDP-impl torch without pipelining (bucketed all-reduce overlapped with
    # backward), local with it (all-reduce after backward).  Either way the gradients are fp16:
    # the scripts (Megatron-LM 6985e58) pass neither --accumulate-allreduce-grads-in-fp32 nor
    # --use-contiguous-buffers-in-ddp, so autograd accumulates into param.grad in fp16.
    local_ddp = int(row["pp"]) > 1
    return _row_plan(row, vpp, recompute="full", overlap_grad_reduce=not local_ddp,
                     ddp="megatron" if local_ddp else "torch", **TABLE1_SETUP)


def _simulate_row(row: Mapping[str, Any], plan: dict[str, Any], hardware: str, calibrated: bool):
    """``plansim simulate`` of a published run on DGX-style nodes of 8 GPUs."""
    return simulate(megatron_gpt_spec(row), hardware, plan=plan, nodes=int(row["gpus"]) // 8, gpus_per_node=8,
                    calibrated=calibrated)


def compare_megatron_table1(hardware: str = "a100-80gb", calibrated: bool = True) -> pd.DataFrame:
    """Predicted vs published TFLOP/s per GPU for every row, with the signed error."""
    rows = []
    for _, row in load_megatron_table1().iterrows():
        gpus = int(row["gpus"])
        result = _simulate_row(row, megatron_plan(row), hardware, calibrated)
        predicted = megatron_flops_per_iteration(row) / result.step_time_s / gpus / 1e12
        published = float(row["tflops_per_gpu"])
        rows.append({"params_b": row["params_b"], "gpus": gpus, "tp": row["tp"], "pp": row["pp"], "dp": row["dp"],
                     "published_tflops": published, "predicted_tflops": predicted,
                     "error": (predicted - published) / published, "step_time_s": result.step_time_s,
                     "bubble_s": result.time_breakdown["pipeline_bubble"],
                     "exposed_comm_s": result.time_breakdown["exposed_communication"],
                     "fits": result.fits, "peak_memory_gib": result.peak_memory_bytes / 2**30})
    return pd.DataFrame(rows)


def korthikanti_plan(row: Mapping[str, Any]) -> dict[str, Any]:
    """The plan of one Korthikanti et al. run as Megatron-LM of May 2022 ran it: the fp16 setup,
    TP collectives beside the gradient GEMMs; full recomputation without sequence parallelism, or
    selective recomputation with it."""
    return _row_plan(row, int(row["virtual_stages"]), recompute=str(row["recompute"]),
                     sequence_parallel=bool(row["sequence_parallel"]), ddp="megatron", overlap_grad_reduce=False,
                     tp_backward_overlap=True, **MEGATRON_FP16)


def compare_korthikanti2022(hardware: str = "a100-80gb", calibrated: bool = True) -> pd.DataFrame:
    """Predicted vs measured iteration time for each run, with the signed error of the prediction."""
    rows = []
    for _, row in load_korthikanti2022().iterrows():
        gpus = int(row["gpus"])
        result = _simulate_row(row, korthikanti_plan(row), hardware, calibrated)
        measured = float(row["iteration_time_s"])
        rows.append({"model": row["model"], "recompute": row["recompute"], "gpus": gpus, "tp": row["tp"],
                     "pp": row["pp"], "measured_s": measured, "predicted_s": result.step_time_s,
                     "error": (result.step_time_s - measured) / measured,
                     "exposed_comm_s": result.time_breakdown["exposed_communication"],
                     "bubble_s": result.time_breakdown["pipeline_bubble"], "fits": result.fits,
                     "peak_memory_gib": result.peak_memory_bytes / 2**30})
    return pd.DataFrame(rows)


#: Narayanan et al. SC'21 §5.4, Figures 13-15: one model on 64 A100s (8 DGX nodes), the product
#: of two degrees fixed at 64, as ``examples/academic_paper_scripts/sc21/run_figure_{13,14,15}.sh``
#: ran them (micro-batch 1, full recomputation, local DDP, plain 1F1B, sequence 2048, the fp16 setup
#: of Table 1).  figure -> (model, the swept degree, its partner, the swept values, global batches,
#: the published finding the sweep shows)
FIGURE_SWEEPS = {
    13: (dict(heads=128, hidden=20480, layers=32), "pp", "tp", (2, 4, 8, 16, 32), (32, 128),
         "peak throughput at tensor-parallel size 8, the GPUs of one node"),
    14: (dict(heads=32, hidden=3840, layers=32), "pp", "dp", (2, 4, 8, 16, 32), (32, 512),
         "throughput falls as the pipeline-parallel size grows"),
    15: (dict(heads=32, hidden=3840, layers=32), "tp", "dp", (2, 4, 8, 16, 32), (32, 128, 512),
         "throughput falls as the tensor-parallel size grows"),
}


def compare_megatron_sweeps(hardware: str = "a100-80gb", calibrated: bool = True) -> pd.DataFrame:
    """Predicted TFLOP/s per GPU (the paper's count) of every configuration of Figures 13-15, for
    checking against the published findings (the figures give no table of numbers)."""
    rows = []
    for figure, (shape, swept, partner, values, batches, _) in FIGURE_SWEEPS.items():
        for batch in batches:
            for value in values:
                degrees = {"tp": 1, "pp": 1, "dp": 1, swept: value, partner: 64 // value}
                row = dict(shape, **degrees, gpus=64, global_batch=batch, micro_batch=1, seq_len=2048, vocab=51200,
                           model=f"figure{figure}")
                plan = _row_plan(row, 1, recompute="full", ddp="megatron", overlap_grad_reduce=False, **TABLE1_SETUP)
                result = _simulate_row(row, plan, hardware, calibrated)
                rows.append({"figure": figure, "global_batch": batch, **degrees,
                             "predicted_tflops": megatron_flops_per_iteration(row) / result.step_time_s / 64 / 1e12,
                             "fits": result.fits})
    return pd.DataFrame(rows)


def _summary(error: pd.Series) -> str:
    return f"median |error| {error.abs().median():.1%}, max {error.abs().max():.1%}, mean signed {error.mean():+.1%}"


def main() -> None:
    """Print both comparisons (``python -m plansim.validation.megatron``)."""
    fmt = {"float_format": lambda v: f"{v:.3f}", "index": False}
    frame = compare_megatron_table1()
    cols = ["params_b", "gpus", "tp", "pp", "dp", "published_tflops", "predicted_tflops", "error",
            "exposed_comm_s", "bubble_s", "peak_memory_gib"]
    print("Narayanan et al. SC'21 Table 1 (achieved TFLOP/s per GPU; error > 0: predicted faster)")
    print(frame[cols].to_string(**fmt))
    print(_summary(frame["error"]))
    runs = compare_korthikanti2022()
    print("\nKorthikanti et al. 2022 (measured iteration time; error < 0: predicted faster)")
    print(runs.to_string(**fmt))
    print(_summary(runs["error"]))
    sweeps = compare_megatron_sweeps()
    print("\nNarayanan et al. SC'21 Figures 13-15 (predicted TFLOP/s per GPU on 64 A100s)")
    for figure, part in sweeps.groupby("figure"):
        shape, swept, partner, *_, finding = FIGURE_SWEEPS[figure]
        table = part.pivot(index="global_batch", columns=swept, values="predicted_tflops")
        print(f"Figure {figure} ({swept} x {partner} = 64; published: {finding})")
        print(table.to_string(float_format=lambda v: f"{v:.1f}"))


if __name__ == "__main__":
    main()
