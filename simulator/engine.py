"""The SimPy engine for one training iteration.

One process per pipeline rank (data-, tensor- and context-parallel replicas of a stage run
the same ops at the same time, so one representative each suffices: symmetry keeps 16,384
GPUs as cheap as 8).  Each rank has a compute stream (its process), a data-parallel
communication stream and a parameter-gather stream (SimPy resources), a copy stream, and the
link resources its traffic crosses (NVLink port and NIC share, each direction a
:class:`~plansim.simulator.flows.FlowLink`), so concurrent tensor-, data- and
pipeline-parallel transfers slow each other down.

Granularity: one compute event per (chunk, micro-batch, phase) with costs summed from the op
graph, tensor-parallel communication as a flow after it; data-parallel gradient buckets split
the last backward of each chunk so that reduction overlaps the remaining backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import simpy

from plansim.simulator.costs.collectives import CollectiveCost, Group, collective_cost
from plansim.simulator.costs.compute import contention_s, memory_bound_time, overlap_contention
from plansim.simulator.costs.power import PowerModel, PowerState, throttled_device
from plansim.simulator.flows import FlowLink
from plansim.simulator.hardware import Cluster
from plansim.simulator.memory import (MemoryTimeline, bytes_per_param, optimizer_sm_rate, optimizer_step_bytes,
                                      optimizer_transient_bytes, rank_model_states, static_bytes)
from plansim.simulator.schedules import build_schedule
from plansim.simulator.stagecost import ChunkCost, Groups, PhaseCost, cost_workload
from plansim.workloads.plan import Plan, PlanError
from plansim.workloads.training import (ACT_BYTES, TrainingWorkload, gemm_dtype, local_vocab, loss_bytes,
                                        pipeline_message)

MEGATRON_BUCKET_PARAMS = 40_000_000  # Megatron-Core DDP bucket: max(40M, 1M·dp) parameters
TORCH_DDP_BUCKET_BYTES = 25 * 2**20  # PyTorch DDP's bucket_cap_mb default
#: FSDP2 gathers a module's bf16 parameter shards into one flat buffer and then copies it out into
#: the unsharded parameters (``foreach_all_gather_copy_out``: ``split_with_sizes_copy`` on the
#: compute stream), a read and a write of 2 bytes per parameter after every all-gather
FSDP2_COPY_OUT_BYTES_PER_PARAM = 4.0
#: ... and before every reduce-scatter packs the module's unsharded 16-bit gradients into one
#: buffer of the reduce dtype (``foreach_reduce_scatter_copy_in``, ``torch._chunk_cat``), which the
#: compute stream waits for before it frees them: 2 bytes read per parameter (plus the reduce
#: dtype's bytes written, added where it is known)
FSDP2_COPY_IN_READ_BYTES_PER_PARAM = 2.0


def bucket_params(plan) -> float:
    """Parameters per data-parallel gradient bucket for the plan's DDP implementation."""
    if plan.ddp == "torch":
        return TORCH_DDP_BUCKET_BYTES / (4.0 if plan.fp32_grads else 2.0)
    return max(MEGATRON_BUCKET_PARAMS, 1_000_000 * plan.dp)


@dataclass
class TraceEvent:
    name: str
    stream: str
    rank: int
    start_s: float
    duration_s: float
    args: dict = field(default_factory=dict)


@dataclass
class RankStats:
    """What one pipeline rank did: busy times by kind, memory, and its finish time."""

    rank: int
    compute_s: float = 0.0
    comm_exposed_s: float = 0.0
    transfer_exposed_s: float = 0.0
    end_s: float = 0.0
    memory: MemoryTimeline | None = None
    model_state: object = None
    flops: float = 0.0


@dataclass
class EngineOutput:
    step_time_s: float
    ranks: list[RankStats]
    events: list[TraceEvent]
    links: list[FlowLink]
    chunk_costs: list[ChunkCost]
    power: PowerState | None = None  # what the board power limit leaves the step (costs/power.py);
    #   None: the device has no power model


class _Rank:
    """Streams, links and memory of one pipeline rank."""

    def __init__(self, env: simpy.Environment, index: int, cluster: Cluster) -> None:
        self.index = index
        self.intra = FlowLink(env, f"rank{index}.nvlink", cluster.intra_node_link.achievable_bw_Bps)
        nic = cluster.nic_bw_per_gpu_Bps if cluster.inter_node_link is not None else cluster.intra_node_link.achievable_bw_Bps
        self.inter = FlowLink(env, f"rank{index}.nic", nic)
        # PCIe is full duplex: host-to-device and device-to-host flows do not share bandwidth
        self.h2d = FlowLink(env, f"rank{index}.pcie.h2d", cluster.host_link.achievable_bw_Bps)
        self.d2h = FlowLink(env, f"rank{index}.pcie.d2h", cluster.host_link.achievable_bw_Bps)
        # a node's storage tiers are shared by its GPUs: each rank gets its share of each direction
        self.storage_read: dict[str, FlowLink] = {}
        self.storage_write: dict[str, FlowLink] = {}
        for tier in cluster.storage:
            if tier.kind not in self.storage_read:
                share = cluster.gpus_per_node
                self.storage_read[tier.kind] = FlowLink(env, f"rank{index}.{tier.kind}.read",
                                                        tier.effective_read_bw_Bps / share)
                self.storage_write[tier.kind] = FlowLink(env, f"rank{index}.{tier.kind}.write",
                                                         tier.effective_write_bw_Bps / share)
        self.dp_stream = simpy.Resource(env, capacity=1)
        self.gather_stream = simpy.Resource(env, capacity=1)
        self.pending: list[simpy.Event] = []
        self.stats = RankStats(index)
        # contention of asynchronous collectives with compute: the compute intervals so far (and
        # the start of the one running), and the GEMM slowdown owed but not yet simulated
        self.compute_intervals: list[tuple[float, float]] = []
        self.computing_since: float | None = None
        self.contention_debt = 0.0

    def link(self, name: str) -> FlowLink:
        return self.intra if name == "intra" else self.inter

    def compute_overlap(self, start: float, end: float) -> float:
        """Seconds of compute between ``start`` and ``end`` (intervals are in time order)."""
        total = 0.0
        if self.computing_since is not None:
            total += max(0.0, end - max(start, self.computing_since))
        for a, b in reversed(self.compute_intervals):
            if b <= start:
                break
            total += max(0.0, min(b, end) - max(a, start))
        return total


#: offload placements the engine models (transfers and their time); others are refused
#: rather than simulated as free memory
SUPPORTED_OFFLOAD = {("optimizer", "cpu"), ("optimizer", "nvme"), ("optimizer", "cxl"), ("activations", "cpu")}


def check_plan_on_cluster(plan: Plan, cluster: Cluster) -> None:
    """PlanError unless the cluster can run the plan as asked: fp8 GEMMs need fp8 tensor cores
    (Transformer Engine has none to use on an A100), and every placement in ``plan.offload`` must
    be one the engine models, on a tier the cluster has."""
    device = cluster.device
    if gemm_dtype(plan) not in device.peak_flops:
        raise PlanError(f"precision: {plan.precision} needs {gemm_dtype(plan)} tensor cores, which {device.name} lacks "
                        f"(it has {', '.join(device.peak_flops)})")
    for what, tier in plan.offload.items():
        if tier != "gpu" and (what, tier) not in SUPPORTED_OFFLOAD:
            raise PlanError(f"offload.{what}: {tier!r} is not simulated yet; supported: "
                            + ", ".join(f"{w}={t}" for w, t in sorted(SUPPORTED_OFFLOAD)))
        if tier not in cluster.tiers:
            have = ", ".join(sorted({t.kind for t in cluster.storage})) or "none"
            raise PlanError(f"offload.{what}: cluster {cluster.name} has no {tier} tier (it has: {have})")


class TrainingSimulation:
    """Simulate one iteration of ``workload`` on ``cluster``."""

    def __init__(self, workload: TrainingWorkload, cluster: Cluster, record_trace: bool = False,
                 trace_detail: str = "phase") -> None:
        check_plan_on_cluster(workload.plan, cluster)
        self.trace_detail = trace_detail
        self.workload = workload
        self.plan = workload.plan
        # where the device has a power model, its tensor-core kernels run at the clock the board
        # power limit sustains for this step's mix of work (costs/power.py), decided on the
        # closed-form step of the analytic estimate: the clock the planner ranks the plan at
        self.power: PowerState | None = None
        if PowerModel.of(cluster.device) is not None:
            from plansim.simulator.analytic import AnalyticModel  # it builds on this module

            self.power = AnalyticModel(workload.model, cluster).power_state(self.plan)
            if max(self.power.slowdowns) > 1.0:
                cluster = cluster.model_copy(update={"device": throttled_device(cluster.device,
                                                                                self.power.slowdowns)})
        self.cluster = cluster
        self.record_trace = record_trace
        self.costs = cost_workload(workload, cluster)
        self.contention = overlap_contention(cluster.device)
        self.groups = Groups.of(self.plan, cluster)
        self.grad_group = self.groups.grad
        self.expert_grad_group = self.groups.expert_dp
        self.events: list[TraceEvent] = []

    # --- helpers ------------------------------------------------------------------------------
    def _trace(self, rank: _Rank, name: str, stream: str, start: float, end: float, **args) -> None:
        if self.record_trace and end > start:
            self.events.append(TraceEvent(name, stream, rank.index, start, end - start, args))

    def _flow(self, env, rank: _Rank, cost: CollectiveCost):
        """Latency, then the bytes as a flow on the link they cross; never done before the host
        has issued the call (its floor runs beside the GPU work)."""
        start = env.now
        if cost.latency_s:
            yield env.timeout(cost.latency_s)
        if cost.volume_bytes and cost.link != "none":
            yield rank.link(cost.link).transfer(cost.volume_bytes)
        if env.now < start + cost.floor_s:
            yield env.timeout(start + cost.floor_s - env.now)

    def _flows(self, env, rank: _Rank, merged: list[CollectiveCost]):
        """Collectives merged per link (``PhaseCost.by_link``), one link after the other."""
        for c in merged:
            yield from self._flow(env, rank, c)

    def _memory_pass(self, env, rank: _Rank, nbytes: float, label: str):
        """A memory-bound kernel of ``nbytes`` moved on the compute stream (the framework's own
        copies around data-parallel communication)."""
        if nbytes <= 0:
            return
        start = env.now
        yield env.timeout(float(memory_bound_time(nbytes, self.cluster.device)))
        rank.stats.compute_s += env.now - start
        self._trace(rank, label, "compute", start, env.now, bytes=nbytes)

    def _run_phase(self, env, rank: _Rank, cost: PhaseCost, label: str, segments: int = 1, on_segment=None):
        """Compute, with the communication it hides running beside it on the links, and the
        phase's exposed inline (tensor/context/expert-parallel) communication.  In ``segments``
        equal parts (a backward's gradient buckets, FSDP's layers), each its share of the compute
        then of the inline communication, after which ``on_segment`` gets the part's index: a
        layer's gradients are ready once its backward, collectives included, is done."""
        start = env.now
        # hidden collectives move their bytes while the compute runs (no process: their latency
        # is hidden too), so that links see them and contend
        beside = [rank.link(c.link).transfer(c.volume_bytes) for c in cost.by_link("beside") if c.volume_bytes]
        # GEMMs slowed by data-parallel collectives that ran beside earlier compute: paid here,
        # never more than the contention this phase's own compute could have suffered
        owed = min(rank.contention_debt, self.contention * cost.compute_s)
        rank.contention_debt -= owed
        comm = cost.by_link("comm")
        if segments > 1:
            comm = [c.scaled(1.0 / segments) for c in comm]
        parts = []  # (start, compute end, end) of each part
        for s in range(segments):
            a = rank.computing_since = env.now
            yield env.timeout((cost.compute_s + owed) / segments)
            rank.computing_since = None
            b = env.now
            rank.compute_intervals.append((a, b))
            yield from self._flows(env, rank, comm)
            parts.append((a, b, env.now))
            if on_segment is not None:
                on_segment(s)
        late = [e for e in beside if not e.processed]
        if late:  # slowed by contention past the compute it hid behind
            yield env.all_of(late)
        parts[-1] = (*parts[-1][:2], env.now)
        computed = sum(b - a for a, b, _ in parts)
        rank.stats.compute_s += computed
        rank.stats.flops += cost.flops
        rank.stats.comm_exposed_s += env.now - start - computed
        if self.record_trace:
            self._trace_ops(rank, cost, label, parts)

    def _trace_ops(self, rank: _Rank, cost: PhaseCost, label: str, parts: list[tuple[float, float, float]]):
        """A compute slice and an inline-communication slice per part (start, compute end, end);
        with ``trace_detail='op'`` also one slice per kernel, laid end to end over the parts'
        compute (a kernel that spans two parts is cut where the first ends)."""
        computed = sum(b - a for a, b, _ in parts)
        for a, b, end in parts:
            self._trace(rank, label, "compute", a, b, flops=cost.flops * (b - a) / computed if computed else 0.0)
            if end > b:
                self._trace(rank, f"{label} tp/cp/ep comm", "comm:tp", b, end,
                            ops=sorted({n for n, _, s in cost.ops if s != "compute"}))
        if self.trace_detail != "op" or cost.compute_s <= 0:
            return
        scale = computed / cost.compute_s
        i, t = 0, parts[0][0]  # the part being filled and the wall time laid up to
        for name, seconds, stream in cost.ops:
            if stream != "compute":
                continue
            left = seconds * scale
            while left > 0 and i < len(parts):
                step = min(left, parts[i][1] - t)
                if step > 0:
                    self._trace(rank, name, "kernels", t, t + step)
                    left -= step
                    t += step
                if t >= parts[i][1] and i + 1 < len(parts):
                    i += 1
                    t = parts[i][0]
                elif t >= parts[i][1]:
                    break

    def _collective_async(self, env, rank: _Rank, stream: simpy.Resource, cost: CollectiveCost, name: str,
                          done: simpy.Event | None = None):
        def proc():
            with stream.request() as req:
                yield req
                start = env.now
                yield from self._flow(env, rank, cost)
                self._trace(rank, name, "comm:dp", start, env.now, bytes=cost.volume_bytes)
                # the compute it ran beside was slowed (SMs and HBM shared with NCCL's kernels)
                overlap, took = rank.compute_overlap(start, env.now), env.now - start
                if overlap > 0 and took > 0:
                    rank.contention_debt += contention_s(self.cluster.device, overlap,
                                                         cost.payload_bytes * overlap / took)
            if done is not None:
                done.succeed()
        return env.process(proc())

    # --- the iteration ------------------------------------------------------------------------
    def run(self) -> EngineOutput:
        env = simpy.Environment()
        plan, cluster = self.plan, self.cluster
        p = plan.pp
        ranks = [_Rank(env, i, cluster) for i in range(p)]
        schedule = build_schedule(plan.schedule, p, plan.num_microbatches, plan.vpp, plan.microbatch_group)
        last_vs = len(self.costs) - 1
        act_ready = {}
        grad_ready = {}
        for chunk_cost in self.costs:
            for mb in range(plan.num_microbatches):
                act_ready[(mb, chunk_cost.chunk.index)] = env.event()
                grad_ready[(mb, chunk_cost.chunk.index)] = env.event()
        p2p_bytes, regather_bytes = pipeline_message(self.workload.model, plan)

        # static memory per rank; with PyTorch semantics gradients appear during backward
        grads_in_backward = plan.framework == "pytorch"
        for rank in ranks:
            params = sum(c.params for c in self.costs if c.chunk.rank == rank.index)
            dense = sum(c.dense_params for c in self.costs if c.chunk.rank == rank.index)
            states = rank_model_states(dense, params - dense, plan)
            rank.stats.model_state = states
            rank.stats.memory = MemoryTimeline(static_bytes(states, plan))

        split_w = plan.schedule == "zero-bubble"
        final_backward = {}
        for i, order in enumerate(schedule):
            for phase, mb, vs in order:
                if phase == ("W" if split_w else "B"):
                    final_backward[vs] = mb  # the last micro-batch whose weight grads finish this chunk

        # one activation message inside a node or across nodes: at most two costs for the whole run,
        # only those some pair of adjacent stages needs (a one-node cluster may have no network)
        stages = range(plan.pp) if plan.pp > 1 else ()
        p2p_costs = {same: collective_cost("send_recv", p2p_bytes, Group(2, 2 if same else 1), cluster)
                     for same in {self.groups.pp_same_node(s, cluster) for s in stages}}
        # Megatron-LM 2021's scatter-gather: each received piece is all-gathered over TP at once
        regather = collective_cost("all_gather", regather_bytes, self.groups.tp, cluster) if regather_bytes else None

        def received(rank: _Rank, label: str):
            """The receiver's TP all-gather of a pipeline message, on its compute stream."""
            if regather is None:
                return
            start = env.now
            yield from self._flow(env, rank, regather)
            rank.stats.comm_exposed_s += env.now - start
            self._trace(rank, label, "comm:tp", start, env.now, bytes=regather_bytes)
        grad_b = 4.0 if plan.fp32_grads else 2.0  # bytes per gradient element the data-parallel collectives move

        def p2p(src: _Rank, dst_stage: int, event: simpy.Event, name: str, forward: bool):
            stage = src.index
            cost = p2p_costs[self.groups.pp_same_node(min(stage, dst_stage), cluster)]
            start = env.now
            yield from self._flow(env, src, cost)
            self._trace(src, name, "comm:pp", start, env.now, bytes=p2p_bytes)
            event.succeed()

        def torch_ddp_copy(rank: _Rank, chunk: ChunkCost, which: str):
            """PyTorch DDP (``gradient_as_bucket_view=False``, its default) copies each gradient into
            its bucket as autograd produces it, scaled by 1/world size in the same pass
            (``Reducer::mark_variable_ready_dense``: ``mul_out``), and back into ``.grad`` once the
            bucket is reduced (``finalize_bucket_dense``): a read and a write of the gradients each
            time, on the compute stream."""
            if plan.ddp != "torch" or plan.zero != 0 or plan.dp * plan.cp == 1:
                return
            # expert gradients go through DDP only where experts have data-parallel replicas
            reduced = chunk.dense_params + (chunk.expert_params if self.expert_grad_group.size > 1 else 0.0)
            yield from self._memory_pass(env, rank, 2.0 * grad_b * reduced, f"ddp bucket {which}")

        def grad_reduction(rank: _Rank, chunk: ChunkCost):
            """Bucketed data-parallel reduction of a chunk's gradients (all-reduce, or
            reduce-scatter under ZeRO ≥ 1), returned as (bucket count, launcher)."""
            if plan.dp * plan.cp == 1 or plan.zero >= 3:
                return 1, None
            op = "all_reduce" if plan.zero == 0 else "reduce_scatter"
            bucket = bucket_params(plan)
            n_buckets = max(1, math.ceil(chunk.params / bucket))
            dense_cost = collective_cost(op, chunk.dense_params * grad_b / n_buckets, self.grad_group, cluster)
            expert_cost = None
            if chunk.expert_params and self.expert_grad_group.size > 1:
                expert_cost = collective_cost(op, chunk.expert_params * grad_b / n_buckets, self.expert_grad_group,
                                              cluster)

            def launch(_segment: int):
                for cost in (dense_cost, expert_cost):
                    if cost is not None:
                        done = env.event()
                        self._collective_async(env, rank, rank.dp_stream, cost, f"grad reduce chunk{chunk.chunk.index}", done)
                        rank.pending.append(done)
            return n_buckets, launch

        # ZeRO-1/2 all-gather updated parameters: exposed after the optimizer step, or, when
        # gradient reduction is overlapped, beside the next step's first forward of each chunk
        # (Megatron's overlap_param_gather, below)
        def param_gather_cost(chunk: ChunkCost) -> CollectiveCost | None:
            if plan.zero not in (1, 2) or plan.dp * plan.cp == 1:
                return None
            return collective_cost("all_gather", chunk.params * 2.0, self.grad_group, cluster)

        def layer_unit(chunk: ChunkCost, op: str, bytes_per_param: float) -> tuple[int, CollectiveCost]:
            """Gathers and reductions that go layer by layer, one NCCL call per layer (FSDP2's
            per-block units, ZeRO-3's per-module fetch, the distributed optimizer's buckets): the
            layer count and one call's cost, its protocol and latency chosen for a layer's bytes."""
            layers = max(1, chunk.chunk.num_layers)
            return layers, collective_cost(op, chunk.params * bytes_per_param / layers, self.grad_group, cluster)

        # Megatron-Core's overlap_param_gather, queued on each rank's gather stream at the step's
        # start.  Under the interleaved schedule each chunk's whole gather is started ahead of its
        # first forward (param_sync_func: the first chunk at once on every stage, each next one as
        # the chunk before it starts), which waits for it.  Otherwise the forward pre-hooks chain
        # the buckets: the first starts with the step (zero_grad), each next one when the forward
        # reaches the bucket before it, so the rest of a chunk's gather runs layer by layer beside
        # its first forward (DistributedOptimizer._finish_param_sync_helper, core_v0.8.0).
        gather_started: dict[int, tuple[simpy.Event, CollectiveCost | None]] = {}
        if plan.zero in (1, 2) and plan.dp * plan.cp > 1 and plan.overlap_grad_reduce:
            for c in self.costs:
                layers, gather = layer_unit(c, "all_gather", 2.0)
                if plan.schedule == "interleaved" or layers == 1:
                    ahead, rest = gather.scaled(layers), None
                else:
                    ahead, rest = gather, gather.scaled(layers - 1)
                ev = env.event()
                rank = ranks[c.chunk.rank]
                self._collective_async(env, rank, rank.gather_stream, ahead, f"param gather chunk{c.chunk.index}", ev)
                gather_started[c.chunk.index] = (ev, rest)

        def beside_gather(rank: _Rank, rest: CollectiveCost | None, name: str, work):
            """Run ``work`` (the compute that follows a chunk's first gathered layer) with the rest
            of the chunk's parameter gather on the gather stream beside it, then wait for that."""
            rest_done = env.event()
            if rest is not None:
                self._collective_async(env, rank, rank.gather_stream, rest, name, rest_done)
            else:
                rest_done.succeed()
            yield from work
            wait = env.now
            yield rest_done
            rank.stats.comm_exposed_s += env.now - wait

        def gathered_forward(rank: _Rank, c: ChunkCost, label: str):
            """A chunk's first forward of the step under overlap_param_gather: what was started
            ahead awaited, the rest of the chunk's gather beside the forward."""
            ahead, rest = gather_started.pop(c.chunk.index)
            wait = env.now
            yield ahead
            rank.stats.comm_exposed_s += env.now - wait
            yield from beside_gather(rank, rest, f"param gather {label}", self._run_phase(env, rank, c.phases["F"], label))

        transient_f = {c.chunk.index: self._transient(c, "F") for c in self.costs}
        transient_b = {c.chunk.index: self._transient(c, "B") for c in self.costs}

        def zero3_phase(rank: _Rank, c: ChunkCost, phase_cost: PhaseCost, label: str, with_reduce: bool):
            """FSDP: each layer's parameters all-gathered, the first layer's call exposed and the
            others prefetched beside the chunk's compute.  Backward reduce-scatters each layer's
            gradients as its backward finishes, beside the layers still to run."""
            layers, gather = layer_unit(c, "all_gather", 2.0)
            wait_start = env.now
            yield from self._flow(env, rank, gather)
            rank.stats.comm_exposed_s += env.now - wait_start

            def work():
                if plan.ddp == "torch":  # FSDP2 copies the gathered buffer out into the parameters
                    yield from self._memory_pass(env, rank, FSDP2_COPY_OUT_BYTES_PER_PARAM * c.params,
                                                 f"fsdp copy-out {label}")
                segments, launch = fsdp_reduction(rank, c, label) if with_reduce else (1, None)
                yield from self._run_phase(env, rank, phase_cost, label, segments, launch)
            yield from beside_gather(rank, gather.scaled(layers - 1) if layers > 1 else None, f"fsdp gather {label}",
                                     work())

        fsdp2_reducing: dict[tuple[int, str], PhaseCost] = {}

        def reducing_cost(c: ChunkCost, phase: str) -> PhaseCost:
            """The phase that finishes a chunk's weight gradients under FSDP2, whose compute stream
            also packs each layer's gradients for its reduce-scatter (the copy-in, a layer's share
            at the end of each layer's part); other ZeRO-3 implementations reduce in place."""
            cost = c.phases[phase]
            if plan.ddp != "torch":
                return cost
            key = (c.chunk.index, phase)
            if key not in fsdp2_reducing:
                copy_s = float(memory_bound_time((FSDP2_COPY_IN_READ_BYTES_PER_PARAM + grad_b) * c.params,
                                                 cluster.device))
                total = PhaseCost()
                total.add(cost)
                total.add(PhaseCost(compute_s=copy_s, ops=[("fsdp reduce-scatter copy-in", copy_s, "compute")]))
                fsdp2_reducing[key] = total
            return fsdp2_reducing[key]

        def fsdp_reduction(rank: _Rank, c: ChunkCost, label: str):
            """(layers, launcher) for the phase that finishes the chunk's weight gradients: each
            layer's reduce-scatter is queued on the data-parallel stream as its part ends."""
            layers, reduce = layer_unit(c, "reduce_scatter", grad_b)

            def launch(_layer: int):
                done = env.event()
                self._collective_async(env, rank, rank.dp_stream, reduce, f"fsdp reduce {label}", done)
                rank.pending.append(done)
            return layers, launch

        grads_allocated: set[int] = set()
        offload_acts = plan.placement("activations") == "cpu"
        offloaded: dict[tuple[int, int], simpy.Event] = {}

        def offload_done(key: tuple[int, int]) -> simpy.Event:
            if key not in offloaded:
                offloaded[key] = env.event()
            return offloaded[key]

        def offload_activations(rank: _Rank, c: ChunkCost, label: str, done: simpy.Event):
            """Layer by layer, as the forward produces them (evenly over its compute), copy the
            chunk's saved activations but the last layer's to host memory; each layer's device copy
            is held from its production until its copy is over (copies queue on one stream)."""
            layers = c.chunk.num_layers
            per_layer = c.saved_bytes / layers
            step = c.phases["F"].compute_s / layers
            start = env.now
            produced = [env.event() for _ in range(layers - 1)]

            def producer():
                for i, ev in enumerate(produced):
                    yield env.timeout(max(0.0, start + (i + 1) * step - env.now))
                    rank.stats.memory.allocate(env.now, per_layer)
                    ev.succeed()

            env.process(producer())
            for ev in produced:
                yield ev
                yield rank.d2h.transfer(per_layer)
                rank.stats.memory.free(env.now, per_layer)
            self._trace(rank, f"offload acts {label}", "copy", start, env.now, bytes=per_layer * (layers - 1))
            done.succeed()

        def fetch_activations(rank: _Rank, c: ChunkCost, backward_s: float):
            """Bring the offloaded layers back one at a time in backward order, each held from
            its copy until the backward has passed it (evenly over the backward's compute)."""
            layers = c.chunk.num_layers
            per_layer = c.saved_bytes / layers
            start = env.now
            for k in range(1, layers):  # layer L-1 is resident; L-2 .. 0 come back in turn
                rank.stats.memory.allocate(env.now, per_layer)
                yield rank.h2d.transfer(per_layer)
                passed = start + (k + 1) * backward_s / layers
                if env.now < passed:
                    yield env.timeout(passed - env.now)
                rank.stats.memory.free(env.now, per_layer)
            self._trace(rank, "fetch acts", "copy", start, env.now, bytes=per_layer * (layers - 1))

        def offloadable(c: ChunkCost) -> float:
            """Activations a chunk sends to the host per micro-batch: all but its last layer's,
            which the backward needs first and which stays on the device."""
            return c.saved_bytes * (c.chunk.num_layers - 1) / c.chunk.num_layers if c.chunk.num_layers else 0.0

        def blocking(rank: _Rank, send):
            """Synchronous point-to-point (Megatron before p2p overlap): compute waits for the send."""
            start = env.now
            yield send
            rank.stats.comm_exposed_s += env.now - start

        def pipeline_rank(rank: _Rank):
            mem = rank.stats.memory
            for phase, mb, vs in schedule[rank.index]:
                c = self.costs[vs]
                label = f"{phase} mb{mb} chunk{vs}"
                if phase == "F":
                    if vs > 0:
                        wait = env.now
                        yield act_ready[(mb, vs)]
                        self._trace(rank, f"wait act mb{mb}", "bubble", wait, env.now)
                        yield from received(rank, f"gather act mb{mb}")
                    if offload_acts:  # layer by layer as the forward produces them
                        env.process(offload_activations(rank, c, label, offload_done((mb, vs))))
                    if plan.zero >= 3 and plan.dp * plan.cp > 1:
                        yield from zero3_phase(rank, c, c.phases["F"], label, with_reduce=False)
                    elif vs in gather_started:
                        yield from gathered_forward(rank, c, label)
                    else:
                        yield from self._run_phase(env, rank, c.phases["F"], label)
                    mem.allocate(env.now, c.saved_bytes - (offloadable(c) if offload_acts else 0.0), transient_f[vs])
                    if vs < last_vs:
                        send = env.process(p2p(rank, vs + 1, act_ready[(mb, vs + 1)], f"send act mb{mb}", True))
                        if not plan.overlap_p2p:
                            yield from blocking(rank, send)
                elif phase == "B":
                    if vs < last_vs:
                        wait = env.now
                        yield grad_ready[(mb, vs)]
                        self._trace(rank, f"wait grad mb{mb}", "bubble", wait, env.now)
                        yield from received(rank, f"gather grad mb{mb}")
                    cost = c.phases["Bi"] if split_w else c.phases["B"]
                    fetch = None
                    if offload_acts:  # back layer by layer, beside the backward (last layer resident)
                        wait = env.now
                        yield offload_done((mb, vs))
                        rank.stats.transfer_exposed_s += env.now - wait
                        fetch = env.process(fetch_activations(rank, c, cost.compute_s))
                    segments, launch = (1, None)
                    if not split_w and final_backward[vs] == mb and plan.overlap_grad_reduce:
                        segments, launch = grad_reduction(rank, c)
                    if plan.zero >= 3 and plan.dp * plan.cp > 1:
                        if not split_w:
                            cost = reducing_cost(c, "B")
                        yield from zero3_phase(rank, c, cost, label, with_reduce=not split_w)
                    else:
                        yield from self._run_phase(env, rank, cost, label, segments, launch)
                        if launch is not None:
                            yield from torch_ddp_copy(rank, c, "copy-in")
                    if fetch is not None:  # the backward of a layer needs its activations back
                        wait = env.now
                        yield fetch
                        rank.stats.transfer_exposed_s += env.now - wait
                    kept = c.saved_bytes - (offloadable(c) if offload_acts else 0.0)
                    mem.free(env.now, kept * (0.5 if split_w else 1.0), transient_b[vs])
                    if grads_in_backward and vs not in grads_allocated:
                        grads_allocated.add(vs)
                        mem.allocate_grads(env.now, self._grad_bytes(c))
                    if vs > 0:
                        send = env.process(p2p(rank, vs - 1, grad_ready[(mb, vs - 1)], f"send grad mb{mb}", False))
                        if not plan.overlap_p2p:
                            yield from blocking(rank, send)
                else:  # W
                    segments, launch, cost = 1, None, c.phases["W"]
                    if plan.zero >= 3 and plan.dp * plan.cp > 1:  # FSDP reduces every micro-batch's gradients
                        segments, launch = fsdp_reduction(rank, c, label)
                        cost = reducing_cost(c, "W")
                    elif final_backward[vs] == mb and plan.overlap_grad_reduce:
                        segments, launch = grad_reduction(rank, c)
                    yield from self._run_phase(env, rank, cost, label, segments, launch)
                    if launch is not None:
                        yield from torch_ddp_copy(rank, c, "copy-in")
                    mem.free(env.now, (c.saved_bytes - (offloadable(c) if offload_acts else 0.0)) * 0.5)
            # gradients not reduced during backward are reduced now
            if not plan.overlap_grad_reduce:
                for c in self.costs:
                    if c.chunk.rank == rank.index:
                        n, launch = grad_reduction(rank, c)
                        if launch is not None:
                            yield from torch_ddp_copy(rank, c, "copy-in")
                            for s in range(n):
                                launch(s)
            wait = env.now
            for ev in rank.pending:
                yield ev
            rank.stats.comm_exposed_s += env.now - wait
            self._trace(rank, "wait grad reduction", "comm:dp", wait, env.now)
            for c in self.costs:
                if c.chunk.rank == rank.index:
                    yield from torch_ddp_copy(rank, c, "copy-out")
            # slowdown still owed: had it been simulated where it happened, the compute would
            # have ended that much later and the wait been that much shorter
            late = max(0.0, rank.contention_debt - (env.now - wait))
            rank.contention_debt = 0.0
            if late > 0:
                start = env.now
                yield env.timeout(late)
                rank.stats.compute_s += late
                self._trace(rank, "overlap contention", "compute", start, env.now)
            rank_params = sum(c.params for c in self.costs if c.chunk.rank == rank.index)
            mem.allocate(env.now, 0.0, transient=optimizer_transient_bytes(plan, rank_params))
            yield from self._optimizer(env, rank)
            if grads_in_backward:
                mem.free_grads(env.now)  # zero_grad(set_to_none=True)
            if not plan.overlap_grad_reduce:
                for c in self.costs:
                    cost = param_gather_cost(c) if c.chunk.rank == rank.index else None
                    if cost is not None:
                        start = env.now
                        yield from self._flow(env, rank, cost)
                        rank.stats.comm_exposed_s += env.now - start
            rank.stats.end_s = env.now

        for rank in ranks:
            env.process(pipeline_rank(rank))
        env.run()
        step = max(r.stats.end_s for r in ranks)
        links = [link for r in ranks for link in (r.intra, r.inter, r.h2d, r.d2h, *r.storage_read.values(),
                                                   *r.storage_write.values())]
        return EngineOutput(step, [r.stats for r in ranks], self.events, links, self.costs, self.power)

    def _grad_bytes(self, c: ChunkCost) -> float:
        """Gradient bytes of a chunk on one rank (sharded under ZeRO-2/3)."""
        plan = self.plan
        _, grad_b, _ = bytes_per_param(plan)
        n_d = plan.dp * plan.cp
        return c.params * grad_b / (n_d if plan.zero >= 2 else 1)

    def _transient(self, c: ChunkCost, phase: str) -> float:
        """Working memory live during a chunk's phase on top of what is kept.

        Layers: one hidden- or FFN-wide tensor in flight forward, two (output and input
        gradient) backward, plus one layer's activations while it is recomputed; at the head,
        the loss's own working memory (``loss_bytes``) where it is larger."""
        plan, model = self.plan, self.workload.model
        tokens = plan.micro_batch * plan.seq_len // plan.cp
        wide = tokens * max(model.ffn_hidden, model.hidden) * ACT_BYTES / plan.tp
        out = wide if phase == "F" else 2 * wide
        if phase == "B" and plan.recompute in ("full", "selective-op") and c.chunk.num_layers:
            out += sum(op.saved_bytes for op in self.workload.dense_layer)
        if c.chunk.has_head:
            loss = loss_bytes(plan)
            out = max(out, tokens * local_vocab(model, plan) * (loss.working_f if phase == "F" else loss.working_b))
        if plan.zero >= 3 and c.chunk.num_layers:
            out += 2 * c.params * 2.0 / c.chunk.num_layers  # gathered layer and the prefetched next
        return out

    def _optimizer(self, env, rank: _Rank):
        """AdamW over the rank's shard: memory-bound on the GPU, or on the host CPU when offloaded
        (ZeRO-Offload: gradients down, CPU Adam, parameters up), its states streamed from NVMe or
        CXL memory when they live there (ZeRO-Infinity: read and written once per step, beside
        the CPU's work).  A node's CPU cores and storage are shared by its GPUs."""
        plan, cluster = self.plan, self.cluster
        params = sum(c.params for c in self.costs if c.chunk.rank == rank.index)
        shard = params / (plan.dp * plan.cp) if plan.zero >= 1 else params
        start = env.now
        tier = plan.placement("optimizer")
        if tier != "gpu":
            _, g_b, o_b = bytes_per_param(plan)
            yield rank.d2h.transfer(shard * g_b)  # gradients down
            cpu = env.timeout(shard * cluster.gpus_per_node / cluster.host.cpu_adam_params_per_s)
            if tier in ("nvme", "cxl"):
                yield rank.storage_read[tier].transfer(shard * o_b) & rank.storage_write[tier].transfer(shard * o_b) & cpu
            else:
                yield cpu
            yield rank.h2d.transfer(shard * 2.0)  # updated 16-bit parameters up
            rank.stats.transfer_exposed_s += env.now - start
            self._trace(rank, f"optimizer ({tier})", "copy", start, env.now)
            return
        yield env.timeout(float(memory_bound_time(optimizer_step_bytes(plan, params, shard), cluster.device,
                                                  optimizer_sm_rate(plan))))
        rank.stats.compute_s += env.now - start
        self._trace(rank, "optimizer step", "compute", start, env.now)
