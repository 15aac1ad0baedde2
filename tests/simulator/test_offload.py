"""Offload placements the engine simulates: activations to host memory (layer by layer, beside
the forward and the backward) and optimizer states on the CPU, NVMe or CXL memory."""
from __future__ import annotations

import pytest

from plansim.simulator.engine import TrainingSimulation
from plansim.simulator.hardware import build_cluster
from plansim.simulator.memory import bytes_per_param
from plansim.simulator.result import build_result
from plansim.workloads.model_io import load_model
from plansim.workloads.plan import Plan, PlanError
from plansim.workloads.training import TrainingWorkload

PIPELINE = Plan(tp=2, pp=4, dp=1, zero=1, global_batch=8, seq_len=4096)


def _run(plan: Plan, cluster=None, model: str = "llama3-8b"):
    spec = load_model(model)
    cluster = cluster or build_cluster("h100-sxm", nodes=1, gpus_per_node=plan.world_size)
    output = TrainingSimulation(TrainingWorkload(spec, plan), cluster, record_trace=True).run()
    return output, build_result(output, model=spec, plan=plan, cluster=cluster, calibrated=None)


def _link_bytes(output, suffix: str) -> float:
    return sum(link.bytes_offered for link in output.links if link.name.endswith(suffix))


def test_activation_offload_moves_every_offloadable_byte_down_and_back():
    out, res = _run(PIPELINE.replace(offload={"activations": "cpu"}))
    m = PIPELINE.num_microbatches
    # all but each chunk's last layer's activations, once per micro-batch, each way
    expected = sum(c.saved_bytes * (c.chunk.num_layers - 1) / c.chunk.num_layers for c in out.chunk_costs) * m
    assert _link_bytes(out, ".pcie.d2h") == pytest.approx(expected, rel=1e-9)
    assert _link_bytes(out, ".pcie.h2d") == pytest.approx(expected, rel=1e-9)
    assert all(link.bytes_carried == pytest.approx(link.bytes_offered, rel=1e-9) for link in out.links)
    assert any(e.stream == "copy" for e in res.events)


def test_activation_offload_trades_time_for_memory():
    _, base = _run(PIPELINE)
    _, off = _run(PIPELINE.replace(offload={"activations": "cpu"}))
    assert off.peak_activation_bytes < base.peak_activation_bytes
    assert off.peak_memory_bytes < base.peak_memory_bytes
    assert off.step_time_s >= base.step_time_s * (1 - 1e-9)  # copies never make a step faster


def test_a_fast_host_link_hides_activation_copies():
    plan = PIPELINE.replace(offload={"activations": "cpu"})
    cluster = build_cluster("h100-sxm", nodes=1, gpus_per_node=plan.world_size)
    fast = cluster.model_copy(update={"host_link": cluster.host_link.model_copy(
        update={"bw_Bps": cluster.host_link.bw_Bps * 100, "achievable_bw_Bps": cluster.host_link.achievable_bw_Bps * 100})})
    _, base = _run(PIPELINE)
    _, slow = _run(plan, cluster)
    _, quick = _run(plan, fast)
    assert quick.step_time_s <= slow.step_time_s * (1 + 1e-9)
    assert quick.step_time_s == pytest.approx(base.step_time_s, rel=0.02)


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_optimizer_offload_frees_the_states_and_pays_for_the_traffic(tier):
    plan = PIPELINE.replace(offload={"optimizer": tier})
    out, res = _run(plan)
    _, base = _run(PIPELINE)
    assert res.memory_breakdown["optimizer"] == 0 < base.memory_breakdown["optimizer"]
    assert res.time_breakdown["exposed_transfers"] > 0
    if tier == "nvme":
        _, _, o_b = bytes_per_param(plan)
        shards = sum(sum(c.params for c in out.chunk_costs if c.chunk.rank == r) for r in range(plan.pp)) / (
            plan.dp * plan.cp)
        # the states are read once and written once per step
        assert _link_bytes(out, ".nvme.read") == pytest.approx(shards * o_b, rel=1e-9)
        assert _link_bytes(out, ".nvme.write") == pytest.approx(shards * o_b, rel=1e-9)


def test_states_on_one_shared_ssd_are_slower_than_on_the_host():
    _, cpu = _run(PIPELINE.replace(offload={"optimizer": "cpu"}))
    _, nvme = _run(PIPELINE.replace(offload={"optimizer": "nvme"}))
    assert nvme.step_time_s > cpu.step_time_s


@pytest.mark.parametrize("offload, needle", [({"params": "cpu"}, "offload.params"),
                                             ({"optimizer": "cxl"}, "no cxl tier")])
def test_placements_not_simulated_are_refused_not_free(offload, needle):
    with pytest.raises(PlanError, match=needle):
        _run(PIPELINE.replace(offload=offload))


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "zero-bubble"])
def test_offloaded_activations_are_all_accounted_for(schedule):
    """Every byte allocated for activations (on the device or brought back) is freed by the end
    of the step, and the device never holds a negative amount."""
    out, _ = _run(PIPELINE.replace(schedule=schedule, offload={"activations": "cpu"}))
    for rank in out.ranks:
        assert rank.memory.activations == pytest.approx(0.0, abs=1.0)
        assert rank.memory.over_freed == 0.0


def _small_host(cluster, dram_gib: float, nvme_tb: float | None = None):
    update = {"host": cluster.host.model_copy(update={"dram_bytes": dram_gib * 2**30})}
    if nvme_tb is not None:
        update["storage"] = tuple(t.model_copy(update={"capacity_bytes": nvme_tb * 1e12}) for t in cluster.storage)
    return cluster.model_copy(update=update)


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_offloaded_states_must_fit_the_node(tier):
    """An offloaded optimizer fits only where the node can hold it: ZeRO-Offload's fp32 states and
    gradients in host DRAM (cpu), ZeRO-Infinity's states on the node's NVMe with the gradients in
    DRAM (nvme).  The engine's result and the search's analytic memory give the same verdict."""
    from plansim.simulator.analytic import AnalyticModel
    plan = PIPELINE.replace(offload={"optimizer": tier})
    spec = load_model("llama3-8b")
    roomy = build_cluster("h100-sxm", nodes=1, gpus_per_node=plan.world_size)
    out, res = _run(plan, roomy)
    _, g_b, o_b = bytes_per_param(plan)
    busiest = max(sum(c.params for c in out.chunk_costs if c.chunk.rank == r) for r in range(plan.pp))
    per_node = roomy.gpus_per_node * busiest * (g_b + (o_b if tier == "cpu" else 0.0))
    assert res.fits and res.infeasible_reason is None
    tight = _small_host(roomy, dram_gib=per_node / 2**30 / 0.9 * 0.99)  # 1 % short of the usable 90 %
    _, res_tight = _run(plan, tight)
    assert not res_tight.fits and res_tight.infeasible_reason.startswith("out of host memory")
    assert AnalyticModel(spec, tight).memory_of(plan)[1] == res_tight.infeasible_reason
    assert AnalyticModel(spec, roomy).memory_of(plan)[1] is None
    if tier == "nvme":
        states = roomy.gpus_per_node * busiest * o_b
        small_ssd = _small_host(roomy, dram_gib=roomy.host.dram_bytes / 2**30, nvme_tb=states / 1e12 * 0.99)
        _, res_ssd = _run(plan, small_ssd)
        assert not res_ssd.fits and res_ssd.infeasible_reason.startswith("out of nvme capacity")
        assert AnalyticModel(spec, small_ssd).memory_of(plan)[1] == res_ssd.infeasible_reason
