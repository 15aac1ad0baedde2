"""Cost a training workload on a cluster: seconds and bytes per chunk and phase.

This is where the op graph (workloads/) meets the cost models (costs/): each op becomes a
time (compute) or a ``CollectiveCost`` (communication), and a chunk's phase is the sum over
its layers.  Identical layers are costed once.  Both the event engine and the planner's
analytic estimate read these numbers, so they agree wherever nothing contends.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from plansim.simulator.costs.collectives import CollectiveCost, Group, collective_cost
from plansim.simulator.costs.compute import (SAC_DISPATCH_HOST_FACTOR, attention_flops, contention_s,
                                             context_parallel_attention_time, gemm_time, kernel_issue_time,
                                             memory_bound_time, norm_time)
from plansim.simulator.hardware import Cluster
from plansim.simulator.schedules import build_schedule
from plansim.workloads.ops import Op
from plansim.workloads.plan import Plan
from plansim.workloads.training import Chunk, TrainingWorkload


#: op kinds that run on the tensor cores, whose time follows the SM clock (costs/power.py), in
#: the order of ``PhaseCost.tensor``
TENSOR_KINDS = ("gemm", "attention")


@dataclass(frozen=True)
class Groups:
    """Placement of each communicator of a rank.  Dense layers: Megatron order tp, cp, dp, pp.
    Experts: Megatron-Core's expert grid over the same tp·cp·dp ranks, etp fastest, then ep, then
    expert-dp (cp folds into ep and expert-dp), so an EP group is ep ranks ``etp`` apart: with
    etp = tp and cp = 1 that is ep of the dp ranks; with MoE parallel folding (etp 1) consecutive
    ranks."""

    tp: Group
    cp: Group
    dp: Group
    grad: Group  # the dense gradients' reduction: every data and context replica (dp·cp)
    ep: Group
    expert_dp: Group  # the replicas of one expert, whose gradients are reduced together
    pp_stride: int  # global-rank distance between adjacent pipeline stages

    @classmethod
    def of(cls, plan: Plan, cluster: Cluster) -> "Groups":
        gpn = cluster.gpus_per_node
        etp = plan.expert_tp
        return cls(
            tp=Group.contiguous(plan.tp, 1, gpn),
            cp=Group.contiguous(plan.cp, plan.tp, gpn),
            dp=Group.contiguous(plan.dp, plan.tp * plan.cp, gpn),
            grad=Group.contiguous(plan.dp * plan.cp, plan.tp, gpn),
            ep=Group.contiguous(plan.ep, etp, gpn),
            expert_dp=Group.contiguous(plan.expert_dp, etp * plan.ep, gpn),
            pp_stride=plan.tp * plan.cp * plan.dp,
        )

    def pp_same_node(self, stage: int, cluster: Cluster) -> bool:
        """Whether stage ``stage`` and stage ``stage + 1`` share a node."""
        gpn = cluster.gpus_per_node
        return (stage * self.pp_stride) // gpn == ((stage + 1) * self.pp_stride) // gpn


@dataclass
class PhaseCost:
    """Compute seconds and communication of one phase of one chunk for one micro-batch."""

    compute_s: float = 0.0
    # of compute_s, the tensor-core kernels: seconds and FLOPs of each of TENSOR_KINDS, which set
    # the step's power draw (costs/power.py): [gemm s, gemm FLOPs, attention s, attention FLOPs]
    tensor: np.ndarray = field(default_factory=lambda: np.zeros(2 * len(TENSOR_KINDS)))
    flops: float = 0.0
    comm: list[CollectiveCost] = field(default_factory=list)  # exposed: runs after the compute
    beside: list[CollectiveCost] = field(default_factory=list)  # runs during the compute, hidden by it
    ops: list[tuple[str, float, str]] = field(default_factory=list)  # (name, seconds, stream) for traces
    _by_link: dict[str, list[CollectiveCost]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def add(self, other: "PhaseCost", times: int = 1) -> None:
        self.compute_s += other.compute_s * times
        self.tensor = self.tensor + other.tensor * times
        self.flops += other.flops * times
        self.comm.extend(other.comm * times)
        self.beside.extend(other.beside * times)
        self.ops.extend(other.ops * times)

    @property
    def comm_s(self) -> float:
        return sum(c.time_s for c in self.comm)

    def by_link(self, which: str) -> list[CollectiveCost]:
        """``comm`` or ``beside`` merged into one cost per link (latencies and bytes added), in
        first-use order; computed once, when the engine first asks (the phase is complete by then)."""
        cache = self._by_link
        if which not in cache:
            merged: dict[str, CollectiveCost] = {}
            for c in getattr(self, which):
                if c.link == "none" and not c.latency_s:
                    continue
                prev = merged.get(c.link)
                merged[c.link] = c if prev is None else _merge(prev, c)
            cache[which] = list(merged.values())
        return cache[which]

    @property
    def time_s(self) -> float:
        return self.compute_s + self.comm_s


def _merge(a: CollectiveCost, b: CollectiveCost) -> CollectiveCost:
    """Two collectives on one link as one: latencies and wire bytes added, payload kept."""
    volume = a.volume_bytes + b.volume_bytes
    payload = a.payload_bytes + b.payload_bytes
    return CollectiveCost(a.latency_s + b.latency_s, b.link, volume, b.rate_Bps,
                          payload_fraction=payload / volume if volume else 1.0, floor_s=a.floor_s + b.floor_s)


def op_cost(op: Op, cluster: Cluster, groups: Groups) -> tuple[float, CollectiveCost | None]:
    """Seconds of compute for a kernel, or the CollectiveCost of a communication op."""
    device = cluster.device
    if op.kind == "gemm":
        m, n, k = op.gemm
        # Transformer Engine's fp8 recipe: fprop accumulates fast, dgrad and wgrad split
        return float(gemm_time(m, n, k, op.dtype, device, op.batch, split_accumulate=op.phase in ("B", "W"))), None
    if op.kind == "attention":
        b, heads, kv_heads, d, sq, skv, causal = op.attention
        phase = "backward" if op.phase == "B" else "forward"
        return float(context_parallel_attention_time(b, heads, kv_heads, d, sq, skv, causal, phase, device,
                                                     impl=op.impl, v_head_dim=op.v_head_dim or None)), None
    if op.kind == "memory":
        return float(memory_bound_time(op.bytes, device, op.sm_rate_Bps)), None
    if op.kind == "norm":
        return float(norm_time(0, 0, device, bytes_moved=op.bytes)), None
    if op.kind == "collective":
        if op.collective == "none" or op.comm_bytes <= 0:
            return 0.0, None
        group = getattr(groups, op.group)
        if op.collective == "ring_exchange":  # size − 1 point-to-point steps to the ring neighbour
            hop = collective_cost("send_recv", op.comm_bytes, Group(2, 2 if group.nodes == 1 else 1), cluster)
            steps = group.size - 1
            return 0.0, hop.scaled(steps)
        return 0.0, collective_cost(op.collective, op.comm_bytes, group, cluster)
    raise ValueError(f"op kind {op.kind!r} unknown")


def _tensor_flops(op: Op) -> float:
    """FLOPs a tensor-core kernel executes (a flash-attention kernel's own count: causal skips tiles)."""
    if op.kind == "attention":
        b, heads, _, d, sq, skv, causal = op.attention
        return float(attention_flops(b, heads, d, sq, skv, causal, "backward" if op.phase == "B" else "forward",
                                     op.v_head_dim or None))
    return op.flops


def _split(comm: CollectiveCost, overlap_s: float) -> tuple[CollectiveCost, CollectiveCost | None]:
    """``comm`` as (the part that outlasts ``overlap_s`` of compute beside it, the part hidden by
    that compute); both parts carry their bytes, so links still see every byte sent."""
    if overlap_s <= 0 or comm.time_s <= 0:
        return comm, None
    left = max(0.0, comm.time_s - overlap_s) / comm.time_s
    return comm.scaled(left), comm.scaled(1 - left)


def cost_ops(ops: list[Op], cluster: Cluster, groups: Groups, beside: dict[str, float] | None = None,
             extra_host_s: float = 0.0) -> PhaseCost:
    """Cost a phase's ops.  A collective with ``hidden_by`` shows only what outlasts that compute
    op, looked up in this phase or in ``beside`` (compute seconds of a phase that runs with it:
    the weight gradients beside the input gradients), and the hidden part slows that compute by
    the device's ``overlap_contention`` share of its time.  A phase never runs faster than its
    host issues its kernels (``kernel_issue_time``, plus ``extra_host_s`` of host work that
    launches nothing): the excess shows as ``host.issue``."""
    cost = PhaseCost()
    issued = 0
    costed = [(op, *op_cost(op, cluster, groups)) for op in ops]
    compute_by_name = dict(beside or {})
    compute_by_name.update({op.name: seconds for op, seconds, comm in costed if comm is None})
    for op, seconds, comm in costed:
        if comm is not None and op.hidden_by:
            partner = next((compute_by_name[n] for n in (op.hidden_by, f"{op.hidden_by}.bwd",
                                                          f"{op.hidden_by}.recompute") if n in compute_by_name), 0.0)
            comm, hidden = _split(comm, partner)
            if hidden is not None:
                cost.beside.append(hidden)
                # the GEMM beside it shares SMs and HBM with NCCL's kernels: part of what was
                # hidden comes back as a slower GEMM
                slower = contention_s(cluster.device, hidden.time_s, hidden.payload_bytes)
                cost.compute_s += slower
                cost.ops.append((f"{op.name}.contention", slower, "compute"))
        if comm is not None:
            cost.comm.append(comm)
            cost.ops.append((op.name, comm.time_s, f"comm:{op.group}"))
        elif seconds:
            cost.compute_s += seconds
            flops = _tensor_flops(op)  # GEMMs and flash attention alike (HFU counts what runs)
            if op.kind in TENSOR_KINDS:
                i = 2 * TENSOR_KINDS.index(op.kind)
                cost.tensor[i:i + 2] += (seconds, flops)
            cost.flops += flops
            cost.ops.append((op.name, seconds, "compute"))
        if comm is not None or seconds:
            issued += op.kernels
    # the host issues the phase's kernels one by one: where it takes longer than the GPU runs
    # them, the GPU waits (eager frameworks; the host keeps no lead across a phase boundary)
    idle = float(kernel_issue_time(issued, cluster.device)) + extra_host_s - cost.compute_s - cost.comm_s
    if idle > 0:
        cost.compute_s += idle
        cost.ops.append(("host.issue", idle, "compute"))
    return cost


@dataclass
class ChunkCost:
    """Per micro-batch costs of one chunk, and what it holds in memory."""

    chunk: Chunk
    phases: dict[str, PhaseCost]  # "F", "B" (recompute + input grads + weight grads), "Bi", "W"
    saved_bytes: float  # activations kept per micro-batch until backward
    params: float  # parameters held by a rank (dense + expert shard)
    dense_params: float
    expert_params: float
    recompute_flops: float = 0.0


def ep_overlap_share(plan: Plan) -> float:
    """Share of a rank's forwards that Megatron-Core's EP overlap (``Plan.moe_a2a_overlap``) runs
    beside a backward: the 1F1B steady state's.  The warm-up forwards, the first steady forward
    and the cool-down backwards have nothing to pair with (``combined_1f1b.py``); the first
    pipeline rank, which warms up longest, is taken."""
    if not plan.moe_a2a_overlap or plan.ep == 1:
        return 0.0
    return _paired_share(plan.schedule, plan.pp, plan.num_microbatches, plan.vpp, plan.microbatch_group)


@functools.lru_cache(maxsize=1024)
def _paired_share(schedule: str, pp: int, microbatches: int, vpp: int, group: int | None) -> float:
    order = build_schedule(schedule, pp, microbatches, vpp, group)[0]
    forwards = sum(1 for phase, _, _ in order if phase == "F")
    first_backward = next(i for i, (phase, _, _) in enumerate(order) if phase != "F")
    return max(0, forwards - first_backward) / forwards


def _ep_overlapped(lists: dict[str, list[Op]], costs: dict[str, PhaseCost], share: float, cluster: Cluster,
                   groups: Groups, weight_grads: dict[str, float],
                   cost_phase: Callable[[str, list[Op], dict[str, float]], PhaseCost]) -> dict[str, PhaseCost]:
    """A MoE layer's F and B phases under Megatron-Core's EP overlap.  Its layer schedule
    (``model_chunk_schedule_plan.py``) runs the backward's combine beside the forward's
    attention block, the forward's dispatch and the backward's dispatch beside the experts'
    backward and forward GEMMs, and the forward's combine beside the backward's attention block.
    Each all-to-all hides behind ``share`` (the paired forwards) of that compute, at most its own
    length, paying the contention of compute beside NCCL as any hidden collective does.
    ``cost_phase(name, ops, beside)`` costs a phase as the plain path does (its host work too)."""
    def compute(phase: PhaseCost, experts: bool) -> float:
        return sum(s for name, s, stream in phase.ops if stream == "compute" and name.startswith("experts.") == experts)

    backward = PhaseCost()
    backward.add(costs["B"])
    backward.add(costs["W"])
    partner = {"moe.dispatch": compute(backward, True), "moe.combine": compute(backward, False),
               "moe.dispatch.bwd": compute(costs["F"], True), "moe.combine.bwd": compute(costs["F"], False)}

    def recost(name: str, ops: list[Op], beside: dict[str, float]) -> PhaseCost:
        budgets, hidden_ops = dict(beside), []
        for op in ops:
            if op.name in partner and op.group == "ep":
                comm = op_cost(op, cluster, groups)[1]
                if comm is not None:
                    key = f"ep overlap: {op.name}"
                    budgets[key] = share * min(comm.time_s, partner[op.name])
                    op = replace(op, hidden_by=key)
            hidden_ops.append(op)
        return cost_phase(name, hidden_ops, budgets)

    return {**costs, "F": recost("F", lists["F"], {}), "B": recost("B", lists["B"], weight_grads)}


def cost_workload(workload: TrainingWorkload, cluster: Cluster, ep_overlap: float | None = None) -> list[ChunkCost]:
    """Cost every chunk once; identical layers share one costing.  ``ep_overlap``: the share of
    micro-batches whose all-to-alls Megatron-Core's EP overlap hides (default: the workload's
    plan's, ``ep_overlap_share``; the planner costs layers on a one-stage stand-in plan)."""
    groups = Groups.of(workload.plan, cluster)
    cache: dict[tuple[int, str], dict[str, PhaseCost]] = {}
    overlap = ep_overlap_share(workload.plan) if ep_overlap is None else ep_overlap

    def phases_of(forward: list[Op], policy: str) -> dict[str, PhaseCost]:
        key = (id(forward), policy)
        if key not in cache:
            lists = workload.phases(forward, policy)
            # selective checkpointing's dispatch mode: host work on every forward op, in the
            # forward and again in the recomputation, whatever of it re-runs
            sac = (SAC_DISPATCH_HOST_FACTOR * float(kernel_issue_time(sum(op.kernels for op in forward), cluster.device))
                   if policy == "selective-op" else 0.0)

            def cost_phase(name: str, ops: list[Op], beside: dict[str, float] | None = None) -> PhaseCost:
                return cost_ops(ops, cluster, groups, beside=beside, extra_host_s=sac if name in ("F", "R") else 0.0)

            costs = {name: cost_phase(name, ops) for name, ops in lists.items() if name != "B"}
            # input- and weight-gradient GEMMs of a layer run together unless a zero-bubble
            # schedule defers the weight gradients: only then may a B collective hide behind a W GEMM
            together = workload.plan.schedule != "zero-bubble"
            weight_grads = {name: s for name, s, stream in costs["W"].ops if stream == "compute"} if together else {}
            costs["B"] = cost_phase("B", lists["B"], weight_grads)
            if overlap and any(op.group == "ep" and op.kind == "collective" for op in forward):
                costs = _ep_overlapped(lists, costs, overlap, cluster, groups, weight_grads, cost_phase)
            cache[key] = costs
        return cache[key]

    out = []
    for chunk in workload.chunks:
        total = {name: PhaseCost() for name in ("F", "R", "B", "W")}
        saved = 0.0
        parts: list[tuple[list[Op], str]] = []
        if chunk.has_embedding:
            parts.append((workload.embedding, "none"))
        parts += [(workload.layer_ops(i), workload.layer_recompute(chunk, i))
                  for i in range(chunk.first_layer, chunk.first_layer + chunk.num_layers)]
        if chunk.has_head:
            parts.append((workload.head, "none"))
        # group identical (list, policy) pairs so that each is costed and summed once
        counts: dict[tuple[int, str], list] = {}
        for ops, policy in parts:
            counts.setdefault((id(ops), policy), [ops, policy, 0])[2] += 1
        for ops, policy, times in counts.values():
            for name, cost in phases_of(ops, policy).items():
                total[name].add(cost, times)
            is_layer = ops is not workload.embedding and ops is not workload.head
            saved += (workload.saved_activation_bytes(ops, policy) if is_layer
                      else sum(op.saved_bytes for op in ops)) * times
        backward = PhaseCost()
        for name in ("R", "B", "W"):
            backward.add(total[name])
        input_grad = PhaseCost()
        for name in ("R", "B"):
            input_grad.add(total[name])
        dense, expert = workload.chunk_params(chunk)
        out.append(ChunkCost(chunk, {"F": total["F"], "B": backward, "Bi": input_grad, "W": total["W"]},
                             saved, dense + expert, dense, expert, total["R"].flops))
    return out
