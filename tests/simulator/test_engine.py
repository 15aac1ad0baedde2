"""The event engine and the Result it produces: accounting identities and the directions in
which plan changes must move time and memory.  No tuned numbers: only relations that hold
for any cost constants."""
from __future__ import annotations

import pytest

from plansim.api import simulate
from plansim.simulator.calibration import apply_calibration
from plansim.simulator.costs.compute import overlap_contention
from plansim.simulator.engine import TrainingSimulation
from plansim.simulator.hardware import build_cluster
from plansim.simulator.memory import WORKSPACE_BYTES
from plansim.simulator.result import build_result
from plansim.workloads.model_io import load_model
from plansim.workloads.models import ModelSpec
from plansim.workloads.plan import Plan, PlanError
from plansim.workloads.training import TrainingWorkload

REL = 1e-9


def _run(model: str, plan: Plan, nodes: int = 1, gpn: int = 8, hardware: str = "h100-sxm", trace: bool = False):
    spec = load_model(model)
    cluster = build_cluster(hardware, nodes=nodes, gpus_per_node=gpn)
    workload = TrainingWorkload(spec, plan)
    output = TrainingSimulation(workload, cluster, record_trace=trace).run()
    return output, build_result(output, model=spec, plan=plan, cluster=cluster, calibrated=None)


PLAN = Plan(tp=2, pp=2, dp=2, global_batch=16, seq_len=2048)


def test_step_time_is_the_last_rank_and_breakdown_adds_up():
    output, result = _run("llama3-8b", PLAN)
    assert result.step_time_s == max(r.end_s for r in output.ranks)
    tb = result.time_breakdown
    assert sum(tb.values()) == pytest.approx(result.step_time_s, rel=1e-9)
    assert result.tokens_per_s == pytest.approx(PLAN.tokens_per_step / result.step_time_s, rel=REL)
    assert len(result.per_stage) == PLAN.pp


def test_mfu_follows_its_definition():
    spec = load_model("llama3-8b")
    _, result = _run("llama3-8b", PLAN)
    device = build_cluster("h100-sxm").device
    model_flops = spec.model_flops_per_token(PLAN.seq_len) * PLAN.tokens_per_step
    assert result.mfu == pytest.approx(model_flops / (result.step_time_s * 8 * device.flops("bf16")), rel=REL)
    assert result.hfu == pytest.approx(result.mfu, rel=1e-9)  # no recomputation


def test_executed_flops_are_the_op_graph_times_micro_batches():
    output, _ = _run("llama3-8b", PLAN)
    per_mb = sum(c.phases["F"].flops + c.phases["B"].flops for c in output.chunk_costs)
    assert sum(r.flops for r in output.ranks) == pytest.approx(per_mb * PLAN.num_microbatches, rel=REL)


def test_memory_breakdown_adds_up_and_activations_are_all_freed():
    output, result = _run("llama3-8b", PLAN)
    mb = result.memory_breakdown
    assert sum(mb.values()) == pytest.approx(result.peak_memory_bytes, rel=1e-9)
    for r in output.ranks:
        assert r.memory.activations == 0.0  # everything saved for backward was released
        assert r.memory.samples[-1][1] == pytest.approx(r.memory.static_bytes, rel=REL)
        assert r.memory.static_bytes == pytest.approx(r.model_state.total + WORKSPACE_BYTES, rel=REL)


@pytest.mark.parametrize("pp, m", [(2, 8), (4, 8), (4, 2)])
def test_1f1b_first_stage_holds_p_micro_batches(pp, m):
    """Korthikanti et al. 2022 §4.2.3: under 1F1B the first stage keeps p micro-batches in flight."""
    plan = Plan(tp=2, pp=pp, dp=1, global_batch=m, seq_len=2048)
    output, _ = _run("llama3-8b", plan, gpn=2 * pp)
    stage0 = output.ranks[0].memory
    saved = sum(c.saved_bytes for c in output.chunk_costs if c.chunk.rank == 0)
    assert stage0.max_activations == pytest.approx(min(pp, m) * saved, rel=1e-9)


def test_symmetry_data_parallel_replicas_do_the_same_compute():
    """dp only adds gradient reduction: per-rank compute is that of one replica."""
    one = Plan(tp=2, pp=2, dp=1, global_batch=8, seq_len=2048)
    many = Plan(tp=2, pp=2, dp=16, global_batch=128, seq_len=2048)
    o1, r1 = _run("llama3-8b", one, gpn=4)
    o2, r2 = _run("llama3-8b", many, nodes=8)
    for a, b in zip(o1.ranks, o2.ranks):
        assert a.flops == pytest.approx(b.flops, rel=REL)
    assert r2.step_time_s >= r1.step_time_s * (1 - 1e-9)
    assert r2.tokens_per_s > r1.tokens_per_s


def test_zero_stages_shrink_memory_monotonically():
    peaks, states = [], []
    for zero in (0, 1, 2, 3):
        _, r = _run("llama3-8b", Plan(dp=8, zero=zero, global_batch=8, seq_len=2048))
        mb = r.memory_breakdown
        peaks.append(r.peak_memory_bytes)
        states.append(mb["params"] + mb["grads"] + mb["optimizer"])
    assert states[0] > states[1] > states[2] > states[3]
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3]


def test_recomputation_trades_memory_for_time():
    results = {rc: _run("llama3-8b", PLAN.replace(recompute=rc))[1] for rc in ("none", "selective", "full")}
    acts = [results[rc].peak_activation_bytes for rc in ("none", "selective", "full")]
    assert acts[0] > acts[1] > acts[2]
    assert results["full"].step_time_s > results["none"].step_time_s
    assert results["full"].hfu > results["full"].mfu
    assert results["selective"].hfu >= results["selective"].mfu


def test_cpu_optimizer_offload_frees_device_memory_and_costs_transfers():
    base = Plan(tp=8, global_batch=4, seq_len=2048)
    _, on_gpu = _run("llama3-8b", base)
    out, off = _run("llama3-8b", base.replace(offload={"optimizer": "cpu"}), trace=True)
    assert off.memory_breakdown["optimizer"] == 0 < on_gpu.memory_breakdown["optimizer"]
    assert off.peak_memory_bytes < on_gpu.peak_memory_bytes
    assert off.time_breakdown["exposed_transfers"] > 0
    assert any(e.stream == "copy" for e in out.events)
    assert all(link.bytes_carried == pytest.approx(link.bytes_offered, rel=1e-6) for link in out.links)


def test_more_micro_batches_take_longer_but_amortise_the_bubble():
    steps = {}
    for m in (4, 8, 16):
        _, r = _run("llama3-8b", Plan(tp=2, pp=4, dp=1, global_batch=m, seq_len=2048))
        steps[m] = r
    assert steps[4].step_time_s < steps[8].step_time_s < steps[16].step_time_s
    assert steps[4].mfu < steps[8].mfu < steps[16].mfu
    frac = {m: r.time_breakdown["pipeline_bubble"] / r.step_time_s for m, r in steps.items()}
    assert frac[4] > frac[8] > frac[16]


def test_overlapping_gradient_reduction_never_hurts():
    base = Plan(tp=1, pp=1, dp=8, global_batch=16, seq_len=2048)
    _, overlapped = _run("llama3-8b", base)
    _, exposed = _run("llama3-8b", base.replace(overlap_grad_reduce=False))
    assert exposed.step_time_s >= overlapped.step_time_s
    assert exposed.time_breakdown["exposed_communication"] >= overlapped.time_breakdown["exposed_communication"]


def test_slower_network_exposes_more_communication():
    plan = Plan(tp=8, pp=1, dp=4, global_batch=8, seq_len=2048)
    spec = load_model("llama3-8b")
    fast = build_cluster("h100-sxm", nodes=4)
    slow = build_cluster("h100-sxm", nodes=4, nic_gbps=25)
    w = TrainingWorkload(spec, plan)
    r_fast = build_result(TrainingSimulation(w, fast).run(), model=spec, plan=plan, cluster=fast, calibrated=None)
    r_slow = build_result(TrainingSimulation(w, slow).run(), model=spec, plan=plan, cluster=slow, calibrated=None)
    assert r_slow.step_time_s > r_fast.step_time_s
    assert r_slow.time_breakdown["exposed_communication"] > r_fast.time_breakdown["exposed_communication"]


def test_trace_streams_follow_the_plan():
    out, _ = _run("llama3-8b", PLAN, trace=True)
    streams = {e.stream for e in out.events}
    assert {"compute", "comm:tp", "comm:pp", "comm:dp"} <= streams
    out, _ = _run("llama3-8b", Plan(tp=8, global_batch=2, seq_len=2048), trace=True)
    streams = {e.stream for e in out.events}
    assert "comm:pp" not in streams and "comm:dp" not in streams
    out, _ = _run("llama3-8b", PLAN, trace=False)
    assert out.events == []


def test_out_of_memory_is_reported_not_raised():
    r = simulate("llama3-70b", "h100-sxm", plan=dict(tp=1, pp=1, dp=8, global_batch=8, seq_len=2048),
                 nodes=1, gpus_per_node=8)
    assert r.fits is False and r.peak_memory_bytes > r.device_memory_bytes
    assert "out of memory" in r.infeasible_reason


@pytest.mark.parametrize("kw", [
    dict(model="mixtral-8x7b", plan=dict(tp=2, pp=2, dp=4, ep=4, global_batch=16, seq_len=2048), nodes=2),
    dict(model="llama3-8b", plan=dict(tp=2, cp=2, pp=2, dp=1, global_batch=4, seq_len=8192), nodes=1),
    dict(model="llama3-8b", plan=dict(tp=2, pp=2, dp=2, global_batch=8, schedule="interleaved", vpp=2), nodes=1),
    dict(model="llama3-8b", plan=dict(tp=2, pp=4, dp=1, global_batch=8, schedule="zero-bubble"), nodes=1),
    dict(model="gpt3-175b", plan=dict(tp=8, pp=8, dp=2, global_batch=32, precision="fp8", zero=1), nodes=16),
])
def test_parallelism_mixes_run(kw):
    r = simulate(kw["model"], "h100-sxm", plan=kw["plan"], nodes=kw["nodes"], gpus_per_node=8)
    assert r.step_time_s > 0 and 0 < r.mfu <= r.hfu < 2 and r.peak_memory_bytes > 0


def test_uneven_pipeline_split_is_accepted():
    r = simulate("llama3-8b", "h100-sxm", plan=dict(pp=3, tp=1, dp=1, global_batch=6), nodes=1, gpus_per_node=3)
    assert r.step_time_s > 0
    r2 = simulate("llama3-8b", "h100-sxm", plan=dict(pp=4, tp=2, dp=1, global_batch=8, first_stage_layers=7,
                                                      last_stage_layers=7), nodes=1, gpus_per_node=8)
    assert r2.step_time_s > 0


@pytest.mark.parametrize("p, v", [(4, 2), (4, 4), (2, 2), (8, 2)])
def test_interleaved_first_stage_memory_factor(p, v):
    """Korthikanti et al. 2022 §4.2.3: interleaving multiplies the first stage's activation
    memory by 1 + (p − 1)/(p·v) against 1F1B (equal layers per chunk, nothing on the embedding)."""
    m = 2 * p
    base = Plan(tp=1, pp=p, dp=1, global_batch=m, seq_len=1024)
    o1, _ = _run("llama3-8b", base, gpn=p)
    o2, _ = _run("llama3-8b", base.replace(schedule="interleaved", vpp=v), gpn=p)
    ratio = o2.ranks[0].memory.max_activations / o1.ranks[0].memory.max_activations
    assert ratio == pytest.approx(1 + (p - 1) / (p * v), rel=1e-9)


def test_data_parallel_traffic_per_zero_stage():
    """Bytes each rank puts on its links in one step (one micro-batch, pure DP): ZeRO-1/2 (and
    Megatron's distributed optimizer) reduce-scatter gradients and all-gather parameters, the
    volume of one all-reduce; ZeRO-3/FSDP gathers parameters in forward and again in backward
    and reduce-scatters gradients: 1.5× (ZeRO paper §7; modelling reference)."""
    n = 8
    volume = {}
    for zero in (0, 1, 2, 3):
        out, _ = _run("llama3-8b", Plan(dp=n, zero=zero, global_batch=n, seq_len=1024))
        volume[zero] = sum(link.bytes_offered for link in out.links)
    params = sum(c.params for c in out.chunk_costs)
    assert volume[0] == pytest.approx(2 * (n - 1) / n * 2 * params, rel=1e-6)  # bf16 gradients, ring all-reduce
    assert volume[1] == pytest.approx(volume[0], rel=1e-6)
    assert volume[2] == pytest.approx(volume[0], rel=1e-6)
    assert volume[3] == pytest.approx(1.5 * volume[0], rel=1e-6)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("sp", [True, False])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_tensor_parallel_traffic(sp, recompute, overlap):
    """Megatron TP per micro-batch: per layer 2 all-reduces of b·s·h forward and 2 backward, and
    one more of each forward one when the layer is recomputed in full; one for the embedding
    (forward) and one for the logits' input (backward).  With sequence parallelism each
    all-reduce becomes a reduce-scatter plus an all-gather: the same bytes (Korthikanti 2022 §4.2.2),
    and backward all-gathers the two column-parallel GEMMs' inputs again for their weight
    gradients (two all-gathers: one all-reduce's bytes per layer).  Hiding the backward
    collectives behind GEMMs changes when bytes move, never how many.
    Messages are large enough for NCCL's Simple protocol, whose wire bytes equal the data bytes
    (LL and LL128 add flags on the wire)."""
    t, b, s = 8, 1, 8192
    spec = load_model("llama3-8b")
    out, _ = _run("llama3-8b", Plan(tp=t, sequence_parallel=sp, global_batch=1, micro_batch=b, seq_len=s,
                                    recompute=recompute, tp_backward_overlap=overlap))
    per_layer = (6 if recompute == "full" else 4) + (1 if sp else 0)
    all_reduces = per_layer * spec.num_layers + 2
    expected = all_reduces * 2 * (t - 1) / t * b * s * spec.hidden * 2
    assert sum(link.bytes_offered for link in out.links) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("sp", [True, False])
def test_tp_backward_overlap_hides_backward_collectives_behind_gemms(sp):
    """Megatron's asynchronous TP collectives: the input-gradient all-reduce (reduce-scatter with
    SP) of each column-parallel GEMM runs beside its weight-gradient GEMM, and with SP the
    re-gather of its input beside its input-gradient GEMM.  What leaves the exposed
    communication comes back in part as slower GEMMs (the device's overlap contention, measured
    in validation/data/h200-x2/overlap), so the step gains (1 − contention) of it; forward
    collectives stay exposed."""
    plan = Plan(tp=8, sequence_parallel=sp, global_batch=2, micro_batch=1, seq_len=8192)
    _, hidden = _run("llama3-8b", plan.replace(tp_backward_overlap=True))
    _, inline = _run("llama3-8b", plan.replace(tp_backward_overlap=False))
    kappa = overlap_contention(build_cluster("h100-sxm", nodes=1, gpus_per_node=8).device)
    less_comm = inline.time_breakdown["exposed_communication"] - hidden.time_breakdown["exposed_communication"]
    more_compute = hidden.time_breakdown["compute"] - inline.time_breakdown["compute"]
    assert less_comm > 0
    assert more_compute == pytest.approx(kappa * less_comm, rel=1e-3)
    assert inline.step_time_s - hidden.step_time_s == pytest.approx((1 - kappa) * less_comm, rel=1e-3)
    assert hidden.time_breakdown["exposed_communication"] >= 0.4 * inline.time_breakdown["exposed_communication"]


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_tp_comm_overlap_pipelines_every_collective_with_its_gemm(recompute):
    """Userbuffers / AsyncTP: beyond the backward pairs, each all-gather runs beside the
    column-parallel GEMM it feeds, each reduce-scatter beside the row-parallel GEMM it drains, and
    the reduce-scatter's backward all-gather beside that GEMM's input gradient.  The bytes on the
    links are the same; exposed TP communication falls, and of what it hides the device's overlap
    contention comes back as slower GEMMs, so the step gains (1 − contention) of it."""
    plan = Plan(tp=8, global_batch=2, micro_batch=1, seq_len=8192, recompute=recompute)
    out_on, on = _run("llama3-8b", plan.replace(tp_comm_overlap=True))
    out_off, off = _run("llama3-8b", plan)
    assert sum(link.bytes_offered for link in out_on.links) == pytest.approx(
        sum(link.bytes_offered for link in out_off.links), rel=1e-12)
    kappa = overlap_contention(build_cluster("h100-sxm", nodes=1, gpus_per_node=8).device)
    less_comm = off.time_breakdown["exposed_communication"] - on.time_breakdown["exposed_communication"]
    more_compute = on.time_breakdown["compute"] - off.time_breakdown["compute"]
    assert less_comm > 0.4 * off.time_breakdown["exposed_communication"]  # the head's and embedding's stay
    assert more_compute == pytest.approx(kappa * less_comm, rel=1e-3)
    assert off.step_time_s - on.step_time_s == pytest.approx((1 - kappa) * less_comm, rel=1e-3)


def test_tp_comm_overlap_needs_sequence_parallelism():
    from plansim.workloads.plan import PlanError
    with pytest.raises(PlanError, match="tp_comm_overlap: needs sequence_parallel"):
        Plan(tp=2, sequence_parallel=False, tp_comm_overlap=True)
    assert Plan(tp=1, tp_comm_overlap=True).tp_comm_overlap  # nothing to overlap, nothing wrong


def test_overlapped_parameter_gather_runs_layer_by_layer_beside_the_first_forward():
    """Megatron-Core's overlap_param_gather without interleaving: the first bucket's all-gather
    starts with the step and each next one as the forward reaches the bucket before it.  With a
    forward longer than the gathers, one step waits about one layer's gather for parameters,
    not the whole model's; under the interleaved schedule each chunk's whole gather is started
    ahead and awaited before its first forward."""
    from plansim.simulator.costs.collectives import collective_cost

    plan = Plan(dp=16, zero=1, micro_batch=4, global_batch=64, seq_len=4096)
    output, result = _run("llama3-8b", plan, nodes=16, gpn=1, trace=True)
    chunk = output.chunk_costs[0]
    layers = chunk.chunk.num_layers
    sim = TrainingSimulation(TrainingWorkload(load_model("llama3-8b"), plan),
                             build_cluster("h100-sxm", nodes=16, gpus_per_node=1))
    per_layer = collective_cost("all_gather", chunk.params * 2.0 / layers, sim.grad_group, sim.cluster).time_s
    gathers = [e for e in output.events if e.rank == 0 and e.name.startswith("param gather")]
    assert len(gathers) == 2  # the first layer's from the step's start, the others beside the forward
    assert sum(e.duration_s for e in gathers) == pytest.approx(layers * per_layer, rel=1e-9)
    forward = chunk.phases["F"].compute_s
    assert (layers - 1) * per_layer < forward  # the premise: the forward can hide the rest
    reduce_wait = next(e for e in output.events if e.rank == 0 and e.name == "wait grad reduction").duration_s
    gather_wait = result.time_breakdown["exposed_communication"] - reduce_wait
    assert per_layer * (1 - 1e-9) <= gather_wait <= 2 * per_layer


def test_tp_backward_overlap_is_off_when_zero_bubble_defers_weight_gradients():
    """ZB-H1 runs weight gradients later, so nothing is beside the input-gradient all-reduces
    (without SP there is no re-gather, whose partner, the input-gradient GEMM, stays)."""
    plan = Plan(tp=8, pp=2, global_batch=8, micro_batch=1, seq_len=4096, schedule="zero-bubble",
                sequence_parallel=False)
    _, on = _run("llama3-8b", plan.replace(tp_backward_overlap=True), nodes=2)
    _, off = _run("llama3-8b", plan.replace(tp_backward_overlap=False), nodes=2)
    assert on.step_time_s == pytest.approx(off.step_time_s, rel=1e-9)


def test_data_parallel_reduction_beside_backward_slows_it():
    """Bucketed gradient all-reduce overlapped with backward shares the GPU with it: the step
    grows by the device's contention share of the overlapped communication at most, and not at
    all with contention 0 (the held-out DDP steps in validation/data/h200-x2 need it)."""
    spec = load_model("tinyllama-1.1b")
    plan = Plan(dp=2, global_batch=4, micro_batch=2, seq_len=2048, framework="pytorch", ddp="torch",
                precision="bf16-pure", sequence_parallel=False)
    cluster = build_cluster("h200", nodes=1, gpus_per_node=2)
    free = cluster.model_copy(update={"device": cluster.device.model_copy(update={"overlap_contention": 0.0})})
    runs, reductions = {}, 0.0
    for name, machine in (("shared", cluster), ("free", free)):
        out = TrainingSimulation(TrainingWorkload(spec, plan), machine, record_trace=True).run()
        runs[name] = build_result(out, model=spec, plan=plan, cluster=machine, calibrated=None)
        if name == "free":
            reductions = sum(e.duration_s for e in out.events if e.name.startswith("grad reduce"))
    extra = runs["shared"].step_time_s - runs["free"].step_time_s
    assert reductions > 0
    assert 0 < extra <= overlap_contention(cluster.device) * reductions * (1 + 1e-9)


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_pytorch_ddp_and_fsdp2_copy_every_gradient_and_gathered_parameter(micro_batches):
    """PyTorch DDP copies each gradient into its bucket and back once per step (a read and a
    write of bf16 each way); FSDP2 copies every gathered parameter out once per forward and per
    backward of every micro-batch; Megatron's DDP, whose gradients live in its buffer, copies
    nothing."""
    plain = Plan(dp=2, global_batch=2 * micro_batches, seq_len=1024)
    n_params = sum(c.params for c in _run("llama3-8b", plain, gpn=2)[0].chunk_costs)
    for ddp, zero, name, expected in (("torch", 0, "ddp bucket", 2 * 2 * 2.0 * n_params),
                                      ("torch", 3, "fsdp copy-out", 2 * micro_batches * 4.0 * n_params),
                                      ("megatron", 0, "ddp bucket", 0.0)):
        plan = Plan(dp=2, zero=zero, ddp=ddp, global_batch=2 * micro_batches, seq_len=1024,
                    precision="bf16-pure", framework="pytorch")
        output, _ = _run("llama3-8b", plan, gpn=2, trace=True)
        moved = sum(e.args["bytes"] for e in output.events if e.rank == 0 and e.name.startswith(name))
        assert moved == pytest.approx(expected, rel=1e-9), (ddp, zero)


def test_fsdp_reduces_each_layer_beside_the_backward_still_to_run():
    """ZeRO-3 / FSDP reduce-scatters a layer's gradients as soon as its backward ends, one call
    per layer beside the layers still to run: after the last backward only about one layer's
    reduction is left to wait for, not the chunk's (the whole model's, without pipelining)."""
    from plansim.simulator.costs.collectives import collective_cost

    plan = Plan(dp=16, zero=3, global_batch=16, seq_len=4096)
    output, _ = _run("llama3-8b", plan, nodes=16, gpn=1, trace=True)
    chunk = output.chunk_costs[0]
    layers = chunk.chunk.num_layers
    sim = TrainingSimulation(TrainingWorkload(load_model("llama3-8b"), plan), build_cluster("h100-sxm", nodes=16,
                                                                                            gpus_per_node=1))
    per_layer = collective_cost("reduce_scatter", chunk.params * 2.0 / layers, sim.grad_group, sim.cluster)
    reductions = [e for e in output.events if e.rank == 0 and e.name.startswith("fsdp reduce")]
    assert len(reductions) == layers
    wait = next(e for e in output.events if e.rank == 0 and e.name == "wait grad reduction")
    assert wait.duration_s <= 2 * per_layer.time_s
    assert layers * per_layer.time_s > 10 * wait.duration_s


def _faster_links(cluster, factor: float, links: tuple[str, ...]):
    """``cluster`` with the named links ``factor`` times as fast (peak and achievable)."""
    return cluster.model_copy(update={k: getattr(cluster, k).model_copy(update={
        "bw_Bps": getattr(cluster, k).bw_Bps * factor,
        "achievable_bw_Bps": getattr(cluster, k).achievable_bw_Bps * factor}) for k in links})


def _step_time(spec, plan: Plan, cluster) -> float:
    out = TrainingSimulation(TrainingWorkload(spec, plan), cluster).run()
    return build_result(out, model=spec, plan=plan, cluster=cluster, calibrated=None).step_time_s


def test_fsdp_gather_protocol_is_chosen_per_layer():
    """A counterexample hypothesis found (test_invariants): 1.5x the bandwidth made a ZeRO-3 step
    slower because the chunk's gather was costed as one call, whose protocol (LL at the higher
    rate: half the wire efficiency, less latency) then moved the prefetched layers' bytes with no
    latency left to save.  Each layer is its own call now, so more bandwidth never slows it."""
    spec = ModelSpec(name="rand", num_layers=3, hidden=256, num_heads=4, num_kv_heads=1, ffn_hidden=768, vocab=756,
                     mlp="swiglu", norm="rmsnorm", position="rope", max_seq_len=1024, tied_embeddings=False,
                     bias=False, head_dim=64, dropout=False)
    plan = Plan(pp=2, dp=2, zero=3, global_batch=2, seq_len=128, overlap_grad_reduce=False)
    cluster = build_cluster("h200", nodes=2, gpus_per_node=2)
    cluster = cluster.model_copy(update={"device": apply_calibration(cluster.device)[0]})
    times = [_step_time(spec, plan, _faster_links(cluster, f, ("intra_node_link",))) for f in (1.0, 1.5)]
    assert times[1] <= times[0] * (1 + 1e-9)


def test_gradient_buckets_wait_for_their_layers_inline_collectives():
    """A counterexample hypothesis found (test_invariants): TP 2 × DP 2 over two nodes, a tiny
    model whose TP all-reduces are latency-bound; 1.5x the bandwidth hid more of the backward's
    TP collective behind its GEMM, so more of the phase counted as (contended) compute and less as
    the inline collective after it, and the last gradient bucket, launched when the compute
    ended, started later.  A part of the backward now launches its bucket after its share of the
    inline collectives too, as a layer's gradients are ready only then."""
    spec = ModelSpec(name="rand", num_layers=2, hidden=128, num_heads=2, num_kv_heads=1, ffn_hidden=256, vocab=200,
                     mlp="swiglu", norm="rmsnorm", position="rope", max_seq_len=1024, tied_embeddings=False,
                     bias=False, dropout=False)
    plan = Plan(tp=2, dp=2, micro_batch=2, global_batch=4, seq_len=512, sequence_parallel=False)
    cluster = build_cluster("h100-sxm", nodes=2, gpus_per_node=2)
    times = [_step_time(spec, plan, _faster_links(cluster, f, ("intra_node_link", "inter_node_link")))
             for f in (1.0, 1.5)]
    assert times[1] <= times[0] * (1 + 1e-9)


def test_kernel_trace_fills_each_part_of_a_split_backward():
    """With ``trace_detail='op'`` the kernels of a backward run in parts (gradient buckets, with
    TP collectives between the parts) lie inside the parts' compute slices and add up to them."""
    plan = Plan(tp=2, dp=4, global_batch=8, seq_len=1024, sequence_parallel=False)
    spec = load_model("llama3-8b")
    cluster = build_cluster("h100-sxm", nodes=1, gpus_per_node=8)
    output = TrainingSimulation(TrainingWorkload(spec, plan), cluster, record_trace=True, trace_detail="op").run()
    slices = [e for e in output.events if e.rank == 0 and e.stream == "compute" and e.name.startswith("B mb1")]
    assert len(slices) > 1  # the last backward, one slice per bucket
    first, last = slices[0].start_s, slices[-1].start_s + slices[-1].duration_s
    kernels = [e for e in output.events if e.rank == 0 and e.stream == "kernels" and first <= e.start_s < last]
    for k in kernels:
        assert any(s.start_s - 1e-12 <= k.start_s and k.start_s + k.duration_s <= s.start_s + s.duration_s + 1e-12
                   for s in slices), k
    assert sum(k.duration_s for k in kernels) == pytest.approx(sum(s.duration_s for s in slices), rel=1e-9)


def test_hfu_counts_recomputed_flash_attention():
    """Selective recomputation with flash attention re-runs the attention forward: HFU counts it
    (it counted GEMMs only, so HFU stayed at MFU while the step grew)."""
    from plansim.api import simulate
    plan = dict(tp=8, micro_batch=1, global_batch=1, seq_len=4096, attention="flash")
    none = simulate("llama3-8b", "h100-sxm", nodes=1, gpus_per_node=8, plan=dict(plan, recompute="none"))
    selective = simulate("llama3-8b", "h100-sxm", nodes=1, gpus_per_node=8, plan=dict(plan, recompute="selective"))
    assert none.hfu == pytest.approx(none.mfu)
    assert selective.hfu > selective.mfu * 1.01


def test_recomputing_the_first_layers_of_each_chunk_lies_between_none_and_full():
    """Megatron's block method: recomputing N of a chunk's layers costs time and saves memory in
    N; all of them is full recomputation, exactly."""
    model = load_model("llama3-8b")
    cluster = build_cluster("h100-sxm", None, 1, 8)
    base = Plan(tp=2, pp=4, micro_batch=1, global_batch=8, seq_len=4096)  # 8 layers per stage

    def run(**kw):
        plan = base.replace(**kw)
        out = TrainingSimulation(TrainingWorkload(model, plan), cluster).run()
        res = build_result(out, model=model, plan=plan, cluster=cluster, calibrated=None)
        return res.step_time_s, res.peak_memory_bytes

    none, full = run(), run(recompute="full")
    assert run(recompute="full", recompute_layers=8) == full
    partial = [run(recompute="full", recompute_layers=k) for k in (1, 3, 6)]
    times, peaks = [none[0], *(t for t, _ in partial), full[0]], [none[1], *(m for _, m in partial), full[1]]
    assert times == sorted(times) and len(set(times)) == len(times)
    # the peak falls until another stage's (the output layer's logits) is the larger
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[1] > peaks[2]


def test_every_nth_layer_recomputed_costs_what_as_many_first_layers_do():
    """torchtitan's layer policy (every N-th block) recomputes as many identical layers as
    Megatron's block method with the same count: the same step time and memory; every layer is
    full recomputation."""
    model = load_model("llama3-8b")
    cluster = build_cluster("h100-sxm", None, 1, 8)
    base = Plan(tp=2, pp=4, micro_batch=1, global_batch=8, seq_len=4096, recompute="full")  # 8 layers a stage

    def run(plan):
        out = TrainingSimulation(TrainingWorkload(model, plan), cluster).run()
        res = build_result(out, model=model, plan=plan, cluster=cluster, calibrated=None)
        return res.step_time_s, res.peak_memory_bytes

    assert run(base.replace(recompute_every=1)) == run(base)
    every_2, first_4 = run(base.replace(recompute_every=2)), run(base.replace(recompute_layers=4))
    assert every_2[0] == pytest.approx(first_4[0], rel=1e-9) and every_2[1] == pytest.approx(first_4[1], rel=1e-9)


def test_fused_loss_lowers_the_head_stages_peak_by_its_working_memory():
    """GPT-2 small's 50k-row logits dominate its working memory: the fused loss holds the bf16
    logits (forward) and their bf16 gradient (backward) where the unfused one holds an fp32 copy
    and an fp32 softmax besides: 10 bytes per logit against 2 forward and 4 backward, and it keeps
    2 bytes per logit (and 4 per token) for backward instead of 4.  The step is faster."""
    from plansim.workloads.training import local_vocab
    model = ModelSpec(name="gpt2-small", num_layers=12, hidden=768, num_heads=12, num_kv_heads=12, ffn_hidden=3072,
                      vocab=50257, mlp="gelu", norm="layernorm", position="learned", max_seq_len=2048,
                      tied_embeddings=True, bias=True)
    cluster = build_cluster("h100-sxm", None, 1, 1)
    plan = Plan(micro_batch=8, global_batch=8, seq_len=2048, framework="pytorch")
    results = {}
    for loss in ("unfused", "fused"):
        p = plan.replace(cross_entropy=loss)
        results[loss] = TrainingSimulation(TrainingWorkload(model, p), cluster).run()
    logits = 8 * 2048 * local_vocab(model, plan)
    peak = {k: max(s.memory.peak_bytes for s in out.ranks) for k, out in results.items()}
    # the peak is the head's backward: kept (4 vs 2 + the log-sum-exp) plus working memory (10 vs 4)
    assert peak["unfused"] - peak["fused"] == pytest.approx((4 + 10 - 2 - 4) * logits - 4 * 8 * 2048, rel=REL)
    assert results["fused"].step_time_s < results["unfused"].step_time_s


@pytest.mark.parametrize("fp32_grads", [False, True])
def test_fsdp2_packs_each_micro_batchs_gradients_for_its_reduce_scatter(fp32_grads):
    """FSDP2 (ZeRO-3 under ``ddp="torch"``) copies every micro-batch's unsharded 16-bit gradients
    into the reduce-scatter buffer on the compute stream (``foreach_reduce_scatter_copy_in``):
    2 bytes read and the reduce dtype's bytes written per parameter, each backward.  ZeRO-3 in
    Megatron-Core's buffer reduces in place."""
    from plansim.simulator.costs.compute import memory_bound_time
    model = load_model("tinyllama-1.1b")
    cluster = build_cluster("h200", None, 1, 2)
    plan = Plan(dp=2, zero=3, micro_batch=2, global_batch=8, seq_len=2048, framework="pytorch",
                fp32_grads=fp32_grads)
    runs = {}
    for ddp in ("megatron", "torch"):
        sim = TrainingSimulation(TrainingWorkload(model, plan.replace(ddp=ddp)), cluster, record_trace=True,
                                 trace_detail="op")
        sim.contention = 0.0  # no slowdown from the gathers beside the compute: kernels at their own time
        runs[ddp] = (sim, sim.run())
    sim, out = runs["torch"]
    copies = [e for e in sim.events if e.name == "fsdp reduce-scatter copy-in"]
    params = sum(c.params for c in out.chunk_costs)
    per_param = 2.0 + (4.0 if fp32_grads else 2.0)
    assert len(copies) == plan.num_microbatches
    for e in copies:
        assert e.duration_s == pytest.approx(float(memory_bound_time(per_param * params, sim.cluster.device)), rel=1e-6)
    assert not any("copy" in e.name for e in runs["megatron"][0].events)
    assert out.step_time_s > runs["megatron"][1].step_time_s


def test_ep_overlap_pairs_the_steady_state_forwards_with_backwards():
    """Megatron-Core's EP overlap runs a forward beside a backward only in the 1F1B steady state:
    with one pipeline rank every forward but the first; with four interleaved stages of two
    chunks the first rank's (pp − 1)·2 + (v − 1)·pp = 10 warm-up forwards and its first steady one
    run alone, 5 of its 16 paired; nothing without the flag.  Megatron-Core's asserts carry over:
    EP, virtual stages with pipelining, no full recomputation."""
    from plansim.simulator.stagecost import ep_overlap_share
    base = dict(dp=8, ep=8, micro_batch=1, seq_len=4096, moe_a2a_overlap=True)
    assert ep_overlap_share(Plan(**base, global_batch=32)) == pytest.approx(3 / 4)
    assert ep_overlap_share(Plan(**{**base, "dp": 2, "ep": 2}, pp=4, vpp=2, schedule="interleaved",
                                 global_batch=16)) == pytest.approx(5 / 16)
    assert ep_overlap_share(Plan(**{**base, "moe_a2a_overlap": False}, global_batch=32)) == 0.0
    assert ep_overlap_share(Plan(**base, global_batch=8)) == 0.0  # one micro-batch: nothing to pair
    for bad, match in (({"ep": 1}, "needs expert parallelism"), ({"pp": 2}, "needs schedule 'interleaved'"),
                       ({"recompute": "full"}, "needs recompute 'none' or 'selective'")):
        with pytest.raises(PlanError, match=f"moe_a2a_overlap: .*{match}"):
            Plan(**{**base, **bad}, global_batch=32)


def test_ep_overlap_hides_all_to_alls_behind_the_other_passes_compute_and_keeps_every_byte():
    """Each all-to-all hides at most the steady-state share of its own time and of the compute
    it is paired with (model_chunk_schedule_plan.py), so the step is shorter than without the
    overlap, no shorter than with free all-to-alls, and moves the same bytes."""
    from plansim.simulator.stagecost import cost_workload, ep_overlap_share
    spec = load_model("deepseek-moe-16b")
    cluster = build_cluster("h100-sxm", nodes=2, gpus_per_node=8)
    off = Plan(dp=16, ep=16, zero=1, micro_batch=1, global_batch=64, seq_len=4096)
    on = Plan(**{**off.to_dict(), "moe_a2a_overlap": True})
    share = ep_overlap_share(on)
    chunks = {name: cost_workload(TrainingWorkload(spec, plan), cluster)[0] for name, plan in (("off", off), ("on", on))}

    def wire(phase):
        return sum(c.volume_bytes for c in phase.comm) + sum(c.volume_bytes for c in phase.beside)

    for phase in ("F", "B"):
        before, after = chunks["off"].phases[phase], chunks["on"].phases[phase]
        assert wire(after) == pytest.approx(wire(before), rel=1e-9)
        hidden = sum(c.time_s for c in after.beside) - sum(c.time_s for c in before.beside)
        assert 0 < hidden <= share * (before.comm_s + 1e-12)
        assert after.comm_s == pytest.approx(before.comm_s - hidden, rel=1e-6, abs=1e-9)
    results = {name: simulate(spec, "h100-sxm", plan=plan, nodes=2, gpus_per_node=8, calibrated=False)
               for name, plan in (("off", off), ("on", on))}
    assert results["on"].step_time_s < results["off"].step_time_s
    free = cluster.model_copy(update={"inter_node_link": cluster.inter_node_link.model_copy(
        update={"bw_Bps": 1e15, "achievable_bw_Bps": 1e15})})
    out = TrainingSimulation(TrainingWorkload(spec, off), free).run()
    floor = build_result(out, model=spec, plan=off, cluster=free, calibrated=None)
    assert results["on"].step_time_s > floor.step_time_s


def test_selective_checkpointing_dispatch_is_host_work_on_forward_and_recomputation():
    """torch's selective checkpointing sends every forward op through a Python dispatch mode, in
    the forward and again in the recomputation: a launch-bound step (a small model, 128 tokens)
    pays SAC_DISPATCH_HOST_FACTOR of the forward's kernel issue more than full recomputation
    does in its forward, and runs slower as a whole."""
    from plansim.simulator.costs.compute import SAC_DISPATCH_HOST_FACTOR, kernel_issue_time
    from plansim.simulator.stagecost import cost_workload
    spec = load_model("tinyllama-1.1b")
    cluster = build_cluster("h100-sxm", nodes=1, gpus_per_node=1)
    base = dict(micro_batch=1, global_batch=1, seq_len=128, framework="pytorch", precision="bf16-pure")
    workloads = {rc: TrainingWorkload(spec, Plan(**base, recompute=rc)) for rc in ("full", "selective-op")}
    layer = workloads["full"].layer_ops(0)
    sac_s = SAC_DISPATCH_HOST_FACTOR * float(kernel_issue_time(sum(op.kernels for op in layer), cluster.device))
    costs = {rc: cost_workload(w, cluster)[0] for rc, w in workloads.items()}  # one chunk: every layer

    def host(chunk, phase):
        return sum(s for name, s, _ in chunk.phases[phase].ops if name == "host.issue")

    layers = spec.num_layers
    f_full, f_sac = host(costs["full"], "F"), host(costs["selective-op"], "F")
    assert f_full > 0 and f_sac - f_full == pytest.approx(layers * sac_s, rel=1e-6)  # host-bound either way
    sac_step = simulate(spec, "h100-sxm", plan=Plan(**base, recompute="selective-op"), nodes=1, gpus_per_node=1,
                        calibrated=False).step_time_s
    full_step = simulate(spec, "h100-sxm", plan=Plan(**base, recompute="full"), nodes=1, gpus_per_node=1,
                         calibrated=False).step_time_s
    assert sac_step > full_step


@pytest.mark.parametrize("fields, sent, gathered", [
    (dict(sequence_parallel=True), 1 / 4, 0.0),  # each TP rank sends its sequence share
    (dict(sequence_parallel=False), 1.0, 0.0),  # Megatron-Core without SP: every rank sends it whole
    (dict(sequence_parallel=False, overlap_p2p=False), 1 / 4, 1.0),  # Megatron-LM 2021: scatter, then gather
])
def test_pipeline_messages_follow_the_framework(fields, sent, gathered):
    """A pipeline send between stages carries the [s, b, h] activation (or its gradient): a 1/tp
    share under sequence parallelism, the whole tensor from every TP rank without it, or, in
    Megatron-LM 2021's scatter-gather, a 1/tp share that the receiving TP group all-gathers."""
    from plansim.workloads.training import ACT_BYTES, pipeline_message

    model = load_model("llama3-8b")
    plan = Plan(tp=4, pp=2, micro_batch=2, global_batch=8, seq_len=2048, **fields)
    full = 2 * 2048 * model.hidden * ACT_BYTES
    assert pipeline_message(model, plan) == (pytest.approx(full * sent), pytest.approx(full * gathered))
    result = simulate(model, "h100-sxm", plan=plan, nodes=1, gpus_per_node=8, trace=True)
    gathers = [e for e in result.events if e.name.startswith("gather ")]
    assert bool(gathers) == bool(gathered)
    assert all(e.args["bytes"] == pytest.approx(full) for e in gathers)
