"""A fast estimate of one training step: closed-form pipeline time, exact memory.

The planner ranks thousands of plans with this before it spends event simulations on the few
that can still win (DESIGN.md, What the engine costs).  It reads the *same* numbers as the event
engine, so the two agree wherever nothing contends:

* per micro-batch phase costs (F, B, Bi, W: compute plus inline TP/CP/EP communication) come
  from :func:`~plansim.simulator.stagecost.cost_workload`, run once per distinct layer shape on
  *pieces* of the model (the embedding, one dense layer, one MoE layer, the head); a chunk's cost
  is the sum of its pieces, which is exactly how ``cost_workload`` sums a chunk;
* collectives (pipeline p2p, data-parallel buckets, ZeRO gathers) are priced by
  :func:`~plansim.simulator.costs.collectives.collective_cost` with the engine's groups;
* static memory is :func:`~plansim.simulator.memory.rank_model_states`, working memory the
  engine's own ``TrainingSimulation._transient``, and the optimizer step the engine's own
  ``TrainingSimulation._optimizer``; the activation peak replays the schedule's allocation order
  (:func:`~plansim.simulator.schedules.build_schedule`), so peak memory is exact, not estimated.

What is approximated is only the timeline.  With per-rank work per micro-batch
``R_r = Σ_chunks (F + B)`` (plus ``2·p2p`` per chunk where the sender waits for its sends; overlapped
sends only lengthen the chain that fills and drains the pipeline, one hop each way between adjacent
ranks, added to the bubble), ``m`` micro-batches and ``v`` virtual stages per rank,

    T_pipeline = m · max_r R_r + (Σ_r R_r − max_r R_r) / v · β

which is ``(m + p − 1)(F + B)`` for equal stages under 1F1B/GPipe (Narayanan et al. SC'21,
§2.2.1), the bubble shrunk by ``v`` for the interleaved schedule (§2.2.2), and for zero-bubble
ZB-H1 ``β = 1 − 2W/(F + Bi + W)``, i.e. a bubble of (p−1)(T_F + T_B − T_W) (Qi et al., ICLR 2024,
§2.1; the engine's ZB-H1 order gives it exactly for m ≥ p); with fewer micro-batches than stages
the step is at least (m + p − 1)(F + Bi) + W, the forwards and input gradients pipelined and the
last W after them (the engine's order gives that exactly for m ≤ p).  Each rank then waits for its last data-parallel gradient buckets (launched
as the last backward computes, as the engine does), pays the engine's overlap contention for the
part of them its compute hid (or waits longer, whichever is more), and runs the optimizer; the
step ends when the last rank does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import simpy

from plansim.simulator.costs.collectives import Group, collective_cost
from plansim.simulator.costs.compute import contention_s
from plansim.simulator.costs.power import Activity, PowerModel, PowerState
from plansim.simulator.engine import TrainingSimulation, _Rank, bucket_params, check_plan_on_cluster
from plansim.simulator.hardware import Cluster
from plansim.simulator.memory import (infeasible_reason, optimizer_transient_bytes, rank_model_states, static_bytes,
                                      usable_memory_bytes)
from plansim.simulator.schedules import build_schedule
from plansim.simulator.stagecost import Groups, cost_workload, ep_overlap_share
from plansim.simulator.units import remainder_s
from plansim.workloads.models import ModelSpec
from plansim.workloads.plan import Plan
from plansim.workloads.training import Chunk, TrainingWorkload, gemm_dtype, pipeline_message, split_layers


# columns of the per-piece / per-chunk cost vectors (per micro-batch)
F, FC, B, BC, BI, W, WC, FLOPS, RFLOPS, SAVED, DENSE, EXPERT = range(12)
TENSOR = slice(12, 16)  # PhaseCost.tensor of F + B: seconds and FLOPs of GEMMs and of attention
COLUMNS = 16
#: the pieces a chunk is counted in: layers under the plan's recomputation, and (under a partial
#: recomputation, ``Plan.layer_recomputed``) the layers it leaves out, which keep their activations
_PIECES = ("embedding", "dense", "moe", "head", "dense-kept", "moe-kept")


def _piece_vector(cc) -> np.ndarray:
    """A ChunkCost as the vector of the columns above."""
    f, b, bi, w = cc.phases["F"], cc.phases["B"], cc.phases["Bi"], cc.phases["W"]
    return np.array([f.time_s, f.compute_s, b.time_s, b.compute_s, bi.time_s, w.time_s, w.compute_s,
                     f.flops + b.flops, cc.recompute_flops, cc.saved_bytes, cc.dense_params, cc.expert_params,
                     *(f.tensor + b.tensor)])


@dataclass(frozen=True)
class Layout:
    """How a plan's layers fall into chunks: per chunk the count of each piece, its rank, its layers."""

    counts: np.ndarray  # chunks × pieces (_PIECES)
    ranks: np.ndarray
    chunks: tuple[Chunk, ...]


@dataclass
class Estimate:
    """The analytic counterpart of :class:`~plansim.simulator.result.Result` for one plan."""

    plan: Plan
    step_time_s: float
    tokens_per_s: float
    mfu: float
    hfu: float
    fits: bool
    peak_memory_bytes: float
    device_memory_bytes: float
    memory_breakdown: dict[str, float]
    time_breakdown: dict[str, float]
    peak_stage: int
    infeasible_reason: str | None = None
    sm_clock: float | None = None  # as Result.sm_clock
    power_w: float | None = None  # as Result.power_w
    energy_per_token_j: float | None = None  # as Result.energy_per_token_j
    per_stage_memory: list[float] = field(default_factory=list)


@dataclass
class _Step:
    """The closed-form step of one plan, and what the estimate's metrics read of it."""

    workload: TrainingWorkload
    layout: Layout
    costs: np.ndarray
    m: int
    step_s: float  # with the power limit's stretch
    last: int  # the rank that ends last
    opt_times: np.ndarray
    dp_exposed: np.ndarray
    start_delay: float
    z3: np.ndarray
    copy_waits: np.ndarray  # per chunk and micro-batch: seconds its passes wait on activation copies
    throttle: float  # seconds the power limit adds
    power: PowerState | None


@dataclass
class Memory:
    """Peak bytes per pipeline rank, and at the peak rank the model states and activations."""

    peaks: np.ndarray
    states: object
    activations: float

    @property
    def peak(self) -> float:
        return float(self.peaks.max())

    @property
    def stage(self) -> int:
        return int(self.peaks.argmax())


# Plan fields that do not change a layer's per-micro-batch costs: the layout over ranks, the
# schedule and its micro-batch groups, ZeRO/offload (static memory, DP traffic and copies, priced
# separately below) and the batch (which matters only through the number of micro-batches, kept
# in the key where it counts).
_LAYOUT_FIELDS = frozenset({"pp", "vpp", "dp", "zero", "global_batch", "schedule", "microbatch_group",
                            "first_stage_layers", "last_stage_layers", "offload", "overlap_grad_reduce",
                            "recompute_layers", "recompute_every"})
_COST_FIELDS = tuple(f for f in Plan.__dataclass_fields__ if f not in _LAYOUT_FIELDS)


def _microbatches_matter(plan: Plan) -> bool:
    """Unfused accumulation into 16-bit gradients skips the first micro-batch
    (TrainingWorkload.accumulate_bytes_per_weight), so its cost depends on their number."""
    return not getattr(plan, "grad_accumulation_fusion", True) and not plan.fp32_grads


def _layer_key(plan: Plan) -> tuple:
    """The plan fields that per-layer, per-micro-batch costs depend on (not pp, dp, zero, batch)."""
    return tuple(getattr(plan, f) for f in _COST_FIELDS) + (
        plan.num_microbatches if _microbatches_matter(plan) else 0, plan.partial_recompute)


class AnalyticModel:
    """Analytic estimates for one model on one cluster; per-layer costs are cached by shape."""

    def __init__(self, model: ModelSpec, cluster: Cluster) -> None:
        self.model = model
        self.cluster = cluster
        self._pieces: dict[tuple, tuple[TrainingWorkload, np.ndarray]] = {}
        self._layouts: dict[tuple, Layout] = {}
        self._memo: dict[tuple, float] = {}
        first_moe = next((i for i in range(model.num_layers) if model.is_moe_layer(i)), None)
        first_dense = next((i for i in range(model.num_layers) if not model.is_moe_layer(i)), None)
        self._probe_layers = {"dense": first_dense, "moe": first_moe}
        self._power = PowerModel.of(cluster.device)

    # --- costs of the pieces ------------------------------------------------------------------
    def pieces(self, plan: Plan) -> tuple[TrainingWorkload, np.ndarray]:
        """cost_workload on pseudo-chunks holding one piece each: a matrix with a row per piece
        (``_PIECES``; the rows of layers kept from recomputation are costed only under
        a partial recomputation).  Raises PlanError if the plan does not fit the model."""
        overlap = ep_overlap_share(plan)  # of the plan's own schedule, not the stand-in's below
        key = _layer_key(plan) + (overlap,)
        hit = self._pieces.get(key)
        if hit is not None:
            return hit
        m = plan.num_microbatches if _microbatches_matter(plan) else 1
        base = plan.replace(pp=1, vpp=1, schedule="1f1b", dp=plan.ep, global_batch=plan.ep * plan.micro_batch * m,
                            zero=0, first_stage_layers=None, last_stage_layers=None, offload={}, recompute_layers=None,
                            recompute_every=None, microbatch_group=None)
        workload = TrainingWorkload(self.model, base)
        matrix = np.zeros((len(_PIECES), COLUMNS))
        rows, chunks = [0], [Chunk(0, 0, 0, 0, True, False)]
        for row, kind in ((1, "dense"), (2, "moe")):
            layer = self._probe_layers[kind]
            if layer is not None:
                rows.append(row)
                chunks.append(Chunk(len(chunks), 0, layer, 1, False, False))
        rows.append(3)
        chunks.append(Chunk(len(chunks), 0, 0, 0, False, True))
        workload.chunks = chunks
        for row, cc in zip(rows, cost_workload(workload, self.cluster, overlap)):
            matrix[row] = _piece_vector(cc)
        if plan.partial_recompute:
            kept = TrainingWorkload(self.model, base.replace(recompute="none"))
            kept.chunks = [c for c in chunks if c.num_layers]
            kept_rows = [row + 3 for row in rows if row in (1, 2)]  # dense -> dense-kept, moe -> moe-kept
            for row, cc in zip(kept_rows, cost_workload(kept, self.cluster, overlap)):
                matrix[row] = _piece_vector(cc)
        self._pieces[key] = (workload, matrix)
        return workload, matrix

    def layout(self, plan: Plan) -> Layout:
        """Chunks with their piece counts, as TrainingWorkload splits the layers."""
        key = (plan.pp, plan.vpp, plan.first_stage_layers, plan.last_stage_layers, plan.recompute_layers,
               plan.recompute_every)
        hit = self._layouts.get(key)
        if hit is not None:
            return hit
        model = self.model
        stages = plan.pp * plan.vpp
        split = split_layers(model.num_layers, stages, plan.first_stage_layers, plan.last_stage_layers)
        counts, chunks, start = np.zeros((stages, len(_PIECES))), [], 0
        for vs, n in enumerate(split):
            layers = range(start, start + n)
            rerun = [plan.layer_recomputed(start, i) for i in layers]
            is_moe = [model.is_moe and model.is_moe_layer(i) for i in layers]
            k = sum(rerun)  # layers recomputed
            moe = sum(m and r for m, r in zip(is_moe, rerun))
            moe_kept = sum(is_moe) - moe
            chunk = Chunk(vs, vs % plan.pp, start, n, vs == 0, vs == stages - 1)
            counts[vs] = (chunk.has_embedding, k - moe, moe, chunk.has_head, n - k - moe_kept, moe_kept)
            chunks.append(chunk)
            start += n
        out = Layout(counts, np.arange(stages) % plan.pp, tuple(chunks))
        self._layouts[key] = out
        return out

    def chunk_costs(self, plan: Plan) -> tuple[TrainingWorkload, Layout, np.ndarray]:
        """Per chunk (virtual stage) the sum of its pieces: chunks × 16."""
        workload, matrix = self.pieces(plan)
        layout = self.layout(plan)
        return workload, layout, layout.counts @ matrix

    # --- the engine's own helpers -------------------------------------------------------------
    def optimizer_time_s(self, plan: Plan, params_on_rank: float) -> float:
        """The engine's optimizer step (``TrainingSimulation._optimizer``) for one rank."""
        key = ("opt", params_on_rank, plan.zero, plan.dp * plan.cp, plan.precision, plan.fp32_grads, plan.framework,
               plan.placement("optimizer"))
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        env = simpy.Environment()
        owner = SimpleNamespace(plan=plan, cluster=self.cluster, _trace=lambda *a, **k: None,
                                costs=[SimpleNamespace(chunk=SimpleNamespace(rank=0), params=params_on_rank)])
        rank = _Rank(env, 0, self.cluster)  # its host and storage links, for an offloaded optimizer
        env.process(TrainingSimulation._optimizer(owner, env, rank))
        env.run()
        self._memo[key] = float(env.now)
        return self._memo[key]

    def transient_bytes(self, workload: TrainingWorkload, plan: Plan, chunk: Chunk, params: float,
                        phase: str, layer_key: tuple | None = None) -> float:
        """The engine's working memory of a chunk's phase (``TrainingSimulation._transient``);
        ``layer_key`` is ``_layer_key(plan)`` when the caller has it already."""
        key = ("tr", layer_key or _layer_key(plan), plan.zero >= 3, chunk.has_head, chunk.num_layers,
               params if plan.zero >= 3 else 0.0, phase)
        hit = self._memo.get(key)
        if hit is None:
            owner = SimpleNamespace(plan=plan, workload=SimpleNamespace(model=workload.model,
                                                                       dense_layer=workload.dense_layer))
            hit = self._memo[key] = TrainingSimulation._transient(owner, SimpleNamespace(chunk=chunk, params=params),
                                                                  phase)
        return hit

    def _collective_cost(self, op: str, nbytes: float, group: Group):
        key = ("coll", op, nbytes, group)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = collective_cost(op, nbytes, group, self.cluster)
        return hit

    def _collective(self, op: str, nbytes: float, group: Group) -> float:
        return self._collective_cost(op, nbytes, group).time_s

    def _layer_gather(self, chunk_params: float, layers: int, group: Group) -> tuple[float, float]:
        """A layer-by-layer parameter gather of a chunk: one layer's call (seconds), and the
        compute seconds lost per second it runs hidden beside compute (``contention_s``, which
        is linear in the overlap at a fixed rate)."""
        key = ("layer gather", chunk_params, layers, group)
        hit = self._memo.get(key)
        if hit is None:
            g = self._collective_cost("all_gather", chunk_params * 2.0 / layers, group)
            t = g.time_s
            hit = self._memo[key] = (t, contention_s(self.cluster.device, 1.0, g.payload_bytes / t) if t > 0 else 0.0)
        return hit

    def _rest_of_gather(self, chunk_params: float, layers: int, group: Group, beside_s: float) -> float:
        """What the rest of a chunk's layer-by-layer parameter gather (``layers`` − 1 calls) adds
        to ``beside_s`` of compute it runs beside, as the engine runs it: the part that outlasts
        the compute, plus the contention of the part the compute hides."""
        t, lost_per_s = self._layer_gather(chunk_params, layers, group)
        rest = (layers - 1) * t
        return max(0.0, rest - beside_s) + lost_per_s * min(rest, beside_s)

    # --- memory -------------------------------------------------------------------------------
    def memory(self, plan: Plan, workload: TrainingWorkload, layout: Layout, costs: np.ndarray) -> Memory:
        """Peak bytes per pipeline rank, exactly as the engine's MemoryTimeline records them for
        ``framework="megatron"`` (a persistent gradient buffer); for ``"pytorch"``, whose
        gradients appear during backward, it does not replay them: a lower bound, which prunes
        nothing that fits, and the event simulation of the plans shown gives the exact peak."""
        p = plan.pp
        dense_r = np.bincount(layout.ranks, weights=costs[:, DENSE], minlength=p)
        expert_r = np.bincount(layout.ranks, weights=costs[:, EXPERT], minlength=p)
        m = plan.num_microbatches
        group = plan.microbatch_group or p  # the interleaved schedule's; 1F1B and ZB-H1 settle from 2p as well
        m_eff = m if plan.schedule == "gpipe" else min(m, 2 * group + m % group)
        params = costs[:, DENSE] + costs[:, EXPERT]
        lkey = _layer_key(plan)
        tkey = ("transients", id(layout), lkey, plan.zero >= 3)
        hit = self._memo.get(tkey)
        if hit is None:
            hit = self._memo[tkey] = (
                np.array([self.transient_bytes(workload, plan, c, params[i], "F", lkey)
                          for i, c in enumerate(layout.chunks)]),
                np.array([self.transient_bytes(workload, plan, c, params[i], "B", lkey)
                          for i, c in enumerate(layout.chunks)]))
        t_f, t_b = hit
        # every rank's candidate peaks at once: its observations' activations plus the working
        # memory of the phase observed; each rank's peak is the largest of its own rows
        matrix, kind, stage, starts = _all_observations(plan.schedule, p, m_eff, plan.vpp, plan.microbatch_group)
        # with activation offload a lower bound: the copies in flight are not counted
        act = matrix @ (costs[:, SAVED] - self._offloaded_activations(plan, layout, costs)) / 2.0
        total = act + np.where(kind == 0, t_f[stage], np.where(kind == 1, t_b[stage], 0.0))
        best = np.maximum.reduceat(total, starts)
        offload = tuple(sorted(plan.offload.items()))
        states, static = [], np.empty(p)
        for r in range(p):
            skey = ("states", float(dense_r[r]), float(expert_r[r]), plan.zero, plan.dp, plan.cp, plan.expert_dp,
                    plan.precision, plan.fp32_grads, plan.ddp, offload)
            rank_states = self._memo.get(skey)
            if rank_states is None:
                rank_states = self._memo[skey] = rank_model_states(float(dense_r[r]), float(expert_r[r]), plan)
            states.append(rank_states)
            static[r] = static_bytes(rank_states, plan)
        opt = np.array([optimizer_transient_bytes(plan, float(n)) for n in dense_r + expert_r])
        peaks = static + np.maximum(0.0, np.maximum(best, opt))
        top = int(peaks.argmax())
        rows = slice(starts[top], starts[top + 1] if top + 1 < p else len(total))
        j = starts[top] + int(total[rows].argmax())
        return Memory(peaks, states[top], float(act[j]) if total[j] > 0 else 0.0)

    def memory_of(self, plan: Plan) -> tuple[Memory, str | None]:
        """Peak memory and the out-of-memory reason (None if it fits): the pruning test."""
        workload, layout, costs = self.chunk_costs(plan)
        mem = self.memory(plan, workload, layout, costs)
        return mem, self._infeasible(plan, layout, costs, mem)

    def peak_memory(self, plan: Plan) -> tuple[float, str | None]:
        """(peak bytes, out-of-memory reason or None) without the time estimate."""
        mem, reason = self.memory_of(plan)
        return mem.peak, reason

    def _infeasible(self, plan: Plan, layout: Layout, costs: np.ndarray, mem: Memory) -> str | None:
        """``infeasible_reason`` of the engine's result, from the replayed peak."""
        if mem.peak <= usable_memory_bytes(self.cluster.device.hbm_bytes) and plan.placement("optimizer") == "gpu":
            return None  # the search's hot path: no per-rank parameter sums needed
        params = np.bincount(layout.ranks, weights=costs[:, DENSE] + costs[:, EXPERT], minlength=plan.pp)
        return infeasible_reason(plan, self.cluster, mem.peak, mem.stage, float(params.max()))

    # --- the estimate -------------------------------------------------------------------------
    def _step(self, plan: Plan) -> "_Step":
        """The closed-form step of ``plan`` (module docstring), at the clock the board power
        limit sustains."""
        cluster, model = self.cluster, self.model
        workload, layout, costs = self.chunk_costs(plan)
        p, v, m = plan.pp, plan.vpp, plan.num_microbatches
        n_chunks = len(layout.chunks)
        ranks = layout.ranks
        gpn = cluster.gpus_per_node
        groups = Groups.of(plan, cluster)
        grad_group, expert_group = groups.grad, groups.expert_dp
        n_dp = plan.dp * plan.cp
        split_w = plan.schedule == "zero-bubble"
        grad_b = 4.0 if plan.fp32_grads else 2.0
        params = costs[:, DENSE] + costs[:, EXPERT]

        f = costs[:, F].copy()
        b = costs[:, B].copy()
        # activation offload (the engine's copies): each backward fetches its layers back over PCIe
        # beside its compute, and the last virtual stage's backward, which follows its own forward
        # at once, also waits for that forward's copies down; elsewhere the copies down finish
        # beside later work
        copies = self._offloaded_activations(plan, layout, costs) / cluster.host_link.achievable_bw_Bps
        copy_waits = np.maximum(0.0, copies - b)
        copy_waits[-1] += max(0.0, copies[-1] - f[-1])
        f[-1] = max(f[-1], copies[-1])
        b = np.maximum(b, copies)
        p2p_chain = 0.0
        if p > 1:  # pipeline point-to-point (the engine: source rank index vs destination virtual stage)
            p2p_bytes, regather_bytes = pipeline_message(model, plan)
            same = self._collective("send_recv", p2p_bytes, Group(2, 2))
            cross = self._collective("send_recv", p2p_bytes, Group(2, 1))
            stride = plan.tp * plan.cp * plan.dp
            idx = np.arange(n_chunks)

            def hop(stage: np.ndarray) -> np.ndarray:
                return np.where((stage * stride) // gpn == ((stage + 1) * stride) // gpn, same, cross)
            if plan.overlap_p2p:
                # asynchronous sends cost their sender nothing: they lie only on the chain that fills
                # the pipeline (the first micro-batch's forward to the last rank) and drains it (its
                # gradient back), one hop between each pair of adjacent ranks each way
                p2p_chain = 2.0 * float(hop(np.arange(p - 1)).sum())
            else:  # the sender waits for each of its sends (Megatron-LM 2021)
                f[:-1] += hop(np.minimum(ranks, idx + 1))[:-1]
                b[1:] += hop(np.minimum(ranks, idx - 1))[1:]
            if regather_bytes:  # ... and the receiver all-gathers each message over TP (scatter-gather)
                regather = self._collective("all_gather", regather_bytes, groups.tp)
                f[1:] += regather
                b[:-1] += regather
        z3 = np.zeros(n_chunks)
        if plan.zero >= 3 and n_dp > 1:  # FSDP: a call per layer, the first exposed, the rest prefetched
            for i, chunk in enumerate(layout.chunks):
                layers = max(1, chunk.num_layers)
                first = self._layer_gather(params[i], layers, grad_group)[0]
                beside_b = costs[i, BI] if split_w else costs[i, B]
                exposed_f = first + self._rest_of_gather(params[i], layers, grad_group, costs[i, F])
                exposed_b = first + self._rest_of_gather(params[i], layers, grad_group, beside_b)
                z3[i] = exposed_f + exposed_b
                f[i] += exposed_f
                b[i] += exposed_b
        per_rank = np.bincount(ranks, weights=f + b, minlength=p)
        r_max = float(per_rank.max())
        bubble = (float(per_rank.sum()) - r_max) / v + p2p_chain
        if split_w and p > 1:
            # ZB-H1: late W passes fill the drain, a third of 1F1B's bubble left (β above) ...
            fw, bi, w = costs[:, F].sum(), costs[:, BI].sum(), costs[:, W].sum()
            if fw + bi + w > 0:
                bubble *= 1.0 - 2.0 * w / (fw + bi + w)
            # ... but with fewer micro-batches than stages the drain is longer than they can fill:
            # the forwards and input-gradient passes run as a pipeline of their own, the last W after
            w_r = np.bincount(ranks, weights=costs[:, W], minlength=p)
            fb_r = per_rank - w_r
            bubble = max(bubble, m * float(fb_r.max()) + float(fb_r.sum() - fb_r.max()) + float(w_r.max())
                         - m * r_max)
        t_pipe = m * r_max + bubble

        # ZeRO-1/2 parameter all-gather (overlap_param_gather), as the engine: interleaved, each
        # rank's gathers start with the step and its first forward waits for them; otherwise each
        # chunk's first layer is gathered from t = 0 and the rest layer by layer beside the chunk's
        # first forward, the first micro-batch carrying the first p chunks' waits down the pipeline
        # and a rank's later chunks adding theirs to its own step
        start_delay = 0.0
        if plan.zero in (1, 2) and n_dp > 1 and plan.overlap_grad_reduce:
            gathers = [(max(1, c.num_layers), self._layer_gather(params[i], max(1, c.num_layers), grad_group)[0])
                       for i, c in enumerate(layout.chunks)]
            if plan.schedule == "interleaved":
                arrival = np.concatenate(([0.0], np.cumsum(f[:p])[:-1]))
                whole = np.array([layers * t for layers, t in gathers[:p]])
                start_delay = max(0.0, float((whole - arrival).max()))
            else:
                waits = np.zeros(n_chunks)
                arrival = 0.0
                for i, (layers, first) in enumerate(gathers):
                    waits[i] = (max(0.0, first - (arrival if i < p else np.inf))
                                + self._rest_of_gather(params[i], layers, grad_group, costs[i, F]))
                    if i < p:
                        arrival += f[i] + waits[i]
                later = np.bincount(ranks[p:], weights=waits[p:], minlength=p)
                start_delay = float(waits[:p].sum()) + float(later.max())

        params_r = np.bincount(ranks, weights=params, minlength=p)
        offsets = np.zeros(p) if split_w else np.concatenate(([0.0], np.cumsum(b[:p])[:-1]))
        opt_times = np.array([self.optimizer_time_s(plan, float(params_r[r])) for r in range(p)])
        # the board power limit (costs/power.py): the busiest rank's activity sets the clock;
        # its tensor-core kernels stretch the step.  The controller resolves idle spans of 50 ms
        # and more (suite powergaps), so the activity is over the rank's busy span: its forward
        # and backward passes with the communication and sends inside them, and its optimizer,
        # not the pipeline bubble or the data-parallel tail, which it waits out at idle draw
        power, throttle, stretch = None, 0.0, np.ones(n_chunks)
        if self._power is not None:
            flops = costs[:, TENSOR][:, 1::2].sum(axis=1)
            r = int(np.bincount(ranks, weights=flops, minlength=p).argmax())
            mine_r = ranks == r
            busy = m * float(per_rank[r]) + opt_times[r]
            activity = Activity.of(cluster.device, m * costs[mine_r, TENSOR].sum(axis=0),
                                   m * float((costs[mine_r, FC] + costs[mine_r, BC]).sum()) + opt_times[r], busy)
            power = self._power.state(activity)
            throttle = sum(t * (s - 1.0) for t, s in zip(activity.tensor_s, power.slowdowns))
            # each chunk's passes as the throttled engine runs them: the gradient buckets below
            # hide behind the backward at that length
            extra = sum(costs[:, TENSOR][:, 2 * k] * (s - 1.0) for k, s in enumerate(power.slowdowns))
            fb = costs[:, F] + costs[:, B]
            stretch = 1.0 + np.divide(extra, fb, out=np.zeros(n_chunks), where=fb > 0)
        ends, dp_exposed = np.zeros(p), np.zeros(p)
        for r in range(p):
            exposed = 0.0
            if n_dp > 1 and plan.zero < 3:
                op = "all_reduce" if plan.zero == 0 else "reduce_scatter"
                if plan.overlap_grad_reduce:  # buckets of the rank's last backward (chunk r)
                    n_b = max(1, math.ceil(params[r] / bucket_params(plan)))
                    parts = [self._collective_cost(op, costs[r, DENSE] * grad_b / n_b, grad_group)]
                    if costs[r, EXPERT] and expert_group.size > 1:
                        parts.append(self._collective_cost(op, costs[r, EXPERT] * grad_b / n_b, expert_group))
                    bucket = sum(c.time_s for c in parts)
                    # the engine runs the backward in n_b parts, each its compute then its inline
                    # collectives, and queues a bucket after each
                    end = (costs[r, W] if split_w else costs[r, B]) * stretch[r]
                    seg = end / n_b
                    # bucket k is ready at k·seg and the DP stream sends one at a time, so the last
                    # ends at max over j of j·seg + (n − j + 1)·bucket: j = 1 or j = n (linear in j);
                    # after ``end`` the stream is busy without a gap, so that tail is what shows
                    done = max(seg + n_b * bucket, n_b * seg + bucket)
                    tail = max(0.0, done - end)
                    hidden = max(0.0, n_b * bucket - tail)
                    # the engine owes contention for the hidden part, each collective at its own rate
                    # (the experts' reduction over one GPU per node moves fewer bytes a second than
                    # the dense one), and pays what the wait does not cover
                    owed = sum(contention_s(cluster.device, hidden * c.time_s / bucket, hidden / bucket * c.payload_bytes)
                               for c in parts) if bucket > 0 else 0.0
                    exposed = max(tail, owed)
                else:
                    for i in np.flatnonzero(ranks == r):
                        exposed += self._collective(op, costs[i, DENSE] * grad_b, grad_group)
                        if costs[i, EXPERT] and expert_group.size > 1:
                            exposed += self._collective(op, costs[i, EXPERT] * grad_b, expert_group)
            elif n_dp > 1:  # ZeRO-3: each layer's reduce-scatter queued as its backward ends
                layers = max(1, layout.chunks[r].num_layers)
                unit = self._collective_cost("reduce_scatter", params[r] * grad_b / layers, grad_group)
                rs = layers * unit.time_s
                # the rank's last backward: as the buckets above, one per layer
                end = (costs[r, W] if split_w else costs[r, B]) * stretch[r]
                seg = end / layers
                tail = max(0.0, max(seg + rs, end + unit.time_s) - end)
                # earlier micro-batches' reductions still queued when the pipeline drains
                wait = max(tail, m * v * rs - max(0.0, t_pipe - float(f[:p].sum())))
                hid = max(0.0, m * v * rs - wait)
                rate = unit.payload_bytes / unit.time_s if unit.time_s > 0 else 0.0
                exposed = wait + contention_s(cluster.device, hid, hid * rate)
            if plan.zero in (1, 2) and n_dp > 1 and not plan.overlap_grad_reduce:
                exposed += sum(self._collective("all_gather", params[i] * 2.0, grad_group)
                               for i in np.flatnonzero(ranks == r))
            dp_exposed[r] = exposed
            ends[r] = start_delay + t_pipe - offsets[r] + exposed + opt_times[r]
        last = int(ends.argmax())
        step = float(ends[last])
        return _Step(workload, layout, costs, m, step + throttle, last, opt_times, dp_exposed, start_delay, z3,
                     copy_waits, throttle, power)

    @staticmethod
    def _offloaded_activations(plan: Plan, layout: Layout, costs: np.ndarray) -> np.ndarray:
        """Per chunk, the saved bytes one micro-batch sends to host memory: all but the chunk's
        last layer's (the engine's ``offloadable``); zeros without activation offload."""
        if plan.placement("activations") == "gpu":
            return np.zeros(len(layout.chunks))
        layers = np.array([c.num_layers for c in layout.chunks], float)
        return np.where(layers > 0, costs[:, SAVED] * (layers - 1) / np.maximum(layers, 1.0), 0.0)

    def power_state(self, plan: Plan) -> PowerState | None:
        """The clock, slowdowns and draw the power limit leaves ``plan``: what the event engine
        runs the step at (None: the device has no power model)."""
        return self._step(plan).power

    def estimate(self, plan: Plan, memory: Memory | None = None) -> Estimate:
        """The estimate of ``plan``; ``memory`` is the result of :meth:`memory_of` if already known.

        Activation offload (``offload.activations = cpu``): each backward lasts at least its
        layers' fetch back over PCIe, and the last virtual stage's forward at least its copies
        down (its backward follows at once); elsewhere the copies down run beside later work.
        Against the engine this errs fast, never slow (on 22 plans: within 2 % for 1F1B and
        without pipelining, 6-9 % interleaved, up to 19 % zero-bubble), and its peak memory is a
        lower bound (the replay with each chunk keeping its last layer's activations, copies in
        flight not counted): a search event-simulates such a plan before showing it."""
        check_plan_on_cluster(plan, self.cluster)
        cluster, model = self.cluster, self.model
        t = self._step(plan)
        workload, layout, costs, m, step, last = t.workload, t.layout, t.costs, t.m, t.step_s, t.last
        ranks = layout.ranks
        # metrics, with build_result's definitions
        tokens = plan.tokens_per_step
        peak = cluster.device.flops(gemm_dtype(plan))
        fkey = ("flops", plan.seq_len)
        per_token = self._memo.get(fkey)
        if per_token is None:
            per_token = self._memo[fkey] = model.model_flops_per_token(plan.seq_len)
        mfu = per_token * tokens / (step * plan.world_size * peak) if step > 0 else 0.0
        executed = float(costs[:, FLOPS].sum())
        useful = executed - float(costs[:, RFLOPS].sum())
        hfu = mfu * executed / useful if useful else mfu
        mine = ranks == last
        compute = m * float((costs[mine, FC] + costs[mine, BC]).sum()) + t.opt_times[last] + t.throttle
        comm = m * float(((costs[mine, F] - costs[mine, FC]) + (costs[mine, B] - costs[mine, BC]) + t.z3[mine]).sum())
        comm += t.dp_exposed[last] + t.start_delay
        transfers = m * float(t.copy_waits[mine].sum())
        bubble = remainder_s(step, compute, comm, transfers)

        mem = memory if memory is not None else self.memory(plan, workload, layout, costs)
        states = mem.states
        peak = mem.peak
        capacity = usable_memory_bytes(cluster.device.hbm_bytes)
        reason = self._infeasible(plan, layout, costs, mem)
        return Estimate(
            plan=plan, step_time_s=step, tokens_per_s=tokens / step if step else 0.0, mfu=mfu, hfu=hfu,
            fits=reason is None, peak_memory_bytes=peak, device_memory_bytes=capacity,
            memory_breakdown={"params": states.params, "grads": states.grads, "optimizer": states.optimizer,
                              "activations": mem.activations,
                              "other": max(0.0, peak - states.total - mem.activations)},
            time_breakdown={"compute": compute, "exposed_communication": comm, "exposed_transfers": transfers,
                            "pipeline_bubble": bubble},
            peak_stage=mem.stage, infeasible_reason=reason, per_stage_memory=mem.peaks.tolist(),
            sm_clock=t.power.clock if t.power else None, power_w=t.power.power_w if t.power else None,
            energy_per_token_j=t.power.energy_per_token_j(plan.world_size, step, tokens) if t.power else None)


@lru_cache(maxsize=1024)
def _all_observations(schedule: str, p: int, m: int, v: int, group: int | None) -> tuple[np.ndarray, ...]:
    """``_observations`` of every rank stacked: (observations × virtual stages matrix, kind and
    virtual stage per observation, the first row of each rank)."""
    blocks, kinds, stages, starts, rows = [], [], [], [], 0
    for rank in range(p):
        local, matrix, kind, stage = _observations(schedule, p, m, v, group, rank)
        block = np.zeros((len(matrix), p * v))
        block[:, local] = matrix
        starts.append(rows)
        rows += len(matrix)
        blocks.append(block)
        kinds.append(kind)
        stages.append(stage)
    return np.vstack(blocks), np.concatenate(kinds), np.concatenate(stages), np.array(starts)


@lru_cache(maxsize=8192)
def _observations(schedule: str, p: int, m: int, v: int, group: int | None, rank: int) -> tuple[np.ndarray, ...]:
    """The memory observations of one rank that can be its peak, in the engine's order.

    The engine observes memory after a forward allocates (with the forward's working memory),
    before a backward frees (with the backward's) and before a weight-gradient pass frees its half
    (without).  Each observation is a vector of in-flight micro-batches per local chunk (in
    halves: zero-bubble frees half at B and half at W) plus its (kind, virtual stage); for each
    (kind, stage) only the elementwise-maximal vectors can be the peak, since saved bytes are
    non-negative.  Returns (local chunks, observations × local chunks matrix, kind per observation
    (0 F, 1 B, 2 W), virtual stage per observation).
    From m = 2p on, the maximal states no longer change with m (1F1B, interleaved, ZB-H1), so
    callers pass min(m, 2p); with interleaved groups of N micro-batches, min(m, 2N + m mod N)
    (checked exhaustively for p ≤ 6, v ≤ 4, N ≤ 3p, m ≤ 6N in tests/simulator/test_schedules.py).
    """
    order = build_schedule(schedule, p, m, v, group)[rank]
    split_w = schedule == "zero-bubble"
    local = tuple(sorted({vs for _, _, vs in order}))
    pos = {vs: i for i, vs in enumerate(local)}
    live = [0] * len(local)
    seen: dict[tuple[str, int], set[tuple[int, ...]]] = {}
    for phase, _mb, vs in order:
        i = pos[vs]
        if phase == "F":
            live[i] += 2
            seen.setdefault(("F", vs), set()).add(tuple(live))
        elif phase == "B":
            seen.setdefault(("B", vs), set()).add(tuple(live))
            live[i] -= 1 if split_w else 2
        else:
            seen.setdefault(("W", vs), set()).add(tuple(live))
            live[i] -= 1
    rows, kinds, stages = [], [], []
    for (kind, vs), vecs in seen.items():
        for a in vecs:
            if not any(b != a and all(y >= x for x, y in zip(a, b)) for b in vecs):
                rows.append(a)
                kinds.append("FBW".index(kind))
                stages.append(vs)
    return (np.array(local), np.array(rows, dtype=float).reshape(len(rows), len(local)), np.array(kinds),
            np.array(stages))


def estimate(model: ModelSpec, plan: Plan, cluster: Cluster) -> Estimate:
    """The analytic estimate of one plan (see the module docstring)."""
    return AnalyticModel(model, cluster).estimate(plan)
