"""The result of simulating one training plan: metrics, breakdowns, and a Chrome trace.

Field names are the JSON contract of ``plansim simulate --format json`` (DESIGN.md).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from plansim.simulator.engine import EngineOutput, TraceEvent
from plansim.simulator.files import write_atomically
from plansim.simulator.memory import infeasible_reason, usable_memory_bytes
from plansim.simulator.units import remainder_s
from plansim.workloads.training import gemm_dtype


@dataclass
class Result:
    """One simulated (or infeasible) training plan."""

    model: str
    hardware: str
    cluster: str
    num_gpus: int
    plan: dict[str, Any]
    step_time_s: float
    tokens_per_s: float
    mfu: float
    hfu: float
    fits: bool
    peak_memory_bytes: float
    device_memory_bytes: float  # usable by tensors: HBM less CUDA context and allocator reserve
    memory_breakdown: dict[str, float]  # what is live at the peak (on the busiest device)
    peak_activation_bytes: float  # the most activations any device holds at once (not always at the peak)
    time_breakdown: dict[str, float]
    calibrated_profile: str | None = None
    sm_clock: float | None = None  # SM clock over its maximum that the board power limit sustains
    #   (costs/power.py): 1 where the step stays under the limit; None where the device has no power model
    power_w: float | None = None  # the busiest GPU's average board draw over the step
    energy_per_token_j: float | None = None  # every GPU at that draw (an upper bound where stages wait more)
    infeasible_reason: str | None = None
    per_stage: list[dict[str, float]] = field(default_factory=list)
    events: list[TraceEvent] = field(default_factory=list, repr=False)
    memory_samples: list[list[tuple[float, float]]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("events")
        out.pop("memory_samples")
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def chrome_trace(self) -> dict[str, Any]:
        """Chrome/Perfetto trace: one process per pipeline stage (its representative rank), one
        thread per stream (compute, kernels, comm:tp, comm:dp, comm:pp, copy, bubble), plus a
        memory counter track."""
        streams = ["compute", "kernels", "comm:tp", "comm:dp", "comm:pp", "copy", "bubble"]
        tid = {s: i for i, s in enumerate(streams)}
        events: list[dict[str, Any]] = []
        stages = sorted({e.rank for e in self.events} | set(range(len(self.memory_samples))))
        for stage in stages:
            events.append({"ph": "M", "name": "process_name", "pid": stage, "tid": 0,
                           "args": {"name": f"pipeline stage {stage}"}})
            for s, i in tid.items():
                events.append({"ph": "M", "name": "thread_name", "pid": stage, "tid": i, "args": {"name": s}})
        for e in self.events:
            events.append({"ph": "X", "name": e.name, "cat": e.stream, "pid": e.rank, "tid": tid.get(e.stream, 0),
                           "ts": e.start_s * 1e6, "dur": e.duration_s * 1e6, "args": e.args})
        for stage, samples in enumerate(self.memory_samples):
            for t, b in samples:
                events.append({"ph": "C", "name": "memory", "pid": stage, "ts": t * 1e6,
                               "args": {"GiB": b / 2**30}})
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"model": self.model, "hardware": self.hardware, "plan": self.plan}}

    def write_trace(self, path: str) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w") as fh:
                json.dump(self.chrome_trace(), fh)

        write_atomically(path, write)


def build_result(output: EngineOutput, *, model, plan, cluster, calibrated: str | None) -> Result:
    """Summarise an engine run: step metrics, the peak device's memory, the time breakdown of
    the rank that finishes last (compute, exposed communication, exposed transfers, bubble)."""
    step = output.step_time_s
    tokens = plan.tokens_per_step
    model_flops = model.model_flops_per_token(plan.seq_len) * tokens
    peak = cluster.device.flops(gemm_dtype(plan))  # the GEMMs' precision: fp8 plans against the fp8 peak
    n = plan.world_size
    mfu = model_flops / (step * n * peak) if step > 0 else 0.0
    # hardware FLOPs: what the ranks executed (GEMMs and flash attention, recomputation included)
    # scaled to the cluster
    replicas = plan.tp * plan.dp * plan.cp
    executed = sum(r.flops for r in output.ranks) * replicas
    gemm_forward_backward = sum(
        c.phases["F"].flops + c.phases["B"].flops - c.recompute_flops for c in output.chunk_costs
    ) * plan.num_microbatches * replicas
    hfu = mfu * (executed / gemm_forward_backward) if gemm_forward_backward else mfu
    peak_rank = max(output.ranks, key=lambda r: r.memory.peak_bytes)
    mem = peak_rank.memory
    states = peak_rank.model_state
    # gradients live at the peak: Megatron's persistent buffer or those backward had made
    # (PyTorch), plus DDP's bucket copy
    made = mem.peak_grads if plan.framework == "pytorch" else states.grads
    grads = made + states.ddp_buckets
    other = mem.peak_bytes - states.params - states.optimizer - grads - mem.peak_activations
    last = max(output.ranks, key=lambda r: r.end_s)
    bubble = remainder_s(step, last.compute_s, last.comm_exposed_s, last.transfer_exposed_s)
    per_stage = [{"stage": r.rank, "compute_s": r.compute_s, "comm_exposed_s": r.comm_exposed_s,
                  "peak_memory_bytes": r.memory.peak_bytes, "end_s": r.end_s} for r in output.ranks]
    capacity = usable_memory_bytes(cluster.device.hbm_bytes)
    stage_params = [sum(c.params for c in output.chunk_costs if c.chunk.rank == r.rank) for r in output.ranks]
    reason = infeasible_reason(plan, cluster, mem.peak_bytes, peak_rank.rank, max(stage_params))
    return Result(
        model=model.name, hardware=cluster.device.name, cluster=cluster.name, num_gpus=n,
        plan=plan.to_dict(), step_time_s=step, tokens_per_s=tokens / step if step else 0.0,
        mfu=mfu, hfu=hfu, fits=reason is None, peak_memory_bytes=mem.peak_bytes,
        device_memory_bytes=capacity,
        peak_activation_bytes=max(r.memory.max_activations for r in output.ranks),
        memory_breakdown={"params": states.params, "grads": grads, "optimizer": states.optimizer,
                          "activations": mem.peak_activations, "other": max(0.0, other)},
        time_breakdown={"compute": last.compute_s, "exposed_communication": last.comm_exposed_s,
                        "exposed_transfers": last.transfer_exposed_s, "pipeline_bubble": bubble},
        calibrated_profile=calibrated, sm_clock=output.power.clock if output.power else None,
        power_w=output.power.power_w if output.power else None,
        energy_per_token_j=output.power.energy_per_token_j(n, step, tokens) if output.power else None,
        infeasible_reason=reason,
        per_stage=per_stage, events=output.events,
        memory_samples=[r.memory.samples for r in output.ranks],
    )

