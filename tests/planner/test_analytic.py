"""The analytic estimate against the event engine: exact memory, close step time, same order."""
from __future__ import annotations

import pytest

from plansim.planner.space import SearchSpace, enumerate_plans
from plansim.simulator.analytic import AnalyticModel
from plansim.simulator.engine import TrainingSimulation
from plansim.simulator.hardware import build_cluster
from plansim.simulator.result import build_result
from plansim.simulator.stagecost import cost_workload
from plansim.workloads.model_io import load_model
from plansim.workloads.plan import Plan
from plansim.workloads.training import TrainingWorkload

MODEL = load_model("llama3-8b")
CLUSTER = build_cluster("h100-sxm", None, 2, 8)


def engine(plan: Plan):
    out = TrainingSimulation(TrainingWorkload(MODEL, plan), CLUSTER).run()
    return build_result(out, model=MODEL, plan=plan, cluster=CLUSTER, calibrated=None)


PLANS = [
    Plan(tp=8, pp=1, dp=2, micro_batch=1, global_batch=64, seq_len=4096, recompute="selective"),
    Plan(tp=4, pp=2, dp=2, micro_batch=1, global_batch=64, seq_len=4096),
    Plan(tp=2, pp=4, dp=2, micro_batch=2, global_batch=64, seq_len=4096, recompute="full"),
    Plan(tp=2, pp=4, dp=2, micro_batch=1, global_batch=64, seq_len=4096, schedule="interleaved", vpp=2),
    Plan(tp=2, pp=4, dp=2, micro_batch=1, global_batch=64, seq_len=4096, schedule="zero-bubble"),
    Plan(tp=1, pp=4, dp=4, micro_batch=1, global_batch=64, seq_len=4096, recompute="full", zero=1),
    Plan(tp=2, pp=1, dp=8, micro_batch=1, global_batch=64, seq_len=4096, recompute="full", zero=3),
    Plan(tp=2, pp=2, dp=4, micro_batch=1, global_batch=64, seq_len=4096, recompute="full", zero=3),
    Plan(tp=2, pp=2, dp=4, micro_batch=1, global_batch=64, seq_len=4096, recompute="full", zero=3,
         schedule="zero-bubble"),
    Plan(tp=1, pp=4, dp=4, micro_batch=1, global_batch=64, seq_len=4096, recompute="full", zero=1,
         schedule="zero-bubble"),
    Plan(tp=2, pp=8, dp=1, micro_batch=1, global_batch=2, seq_len=4096, schedule="zero-bubble"),  # m = 2 < p
    Plan(tp=4, pp=2, dp=1, cp=2, micro_batch=1, global_batch=64, seq_len=4096, zero=2),
    Plan(tp=1, pp=3, dp=5, micro_batch=1, global_batch=60, seq_len=4096, recompute="full"),  # uneven: 11+10+11
    # Megatron 2021 DDP flavours: unfused accumulation into 16-bit grads (cost depends on m), or
    # into fp32 main_grad with the all-reduce after the backward
    Plan(tp=2, pp=2, dp=4, micro_batch=1, global_batch=32, seq_len=4096, recompute="full",
         grad_accumulation_fusion=False, sequence_parallel=False, attention="unfused"),
    Plan(tp=2, pp=2, dp=4, micro_batch=1, global_batch=32, seq_len=4096, recompute="full", fp32_grads=True,
         overlap_grad_reduce=False, grad_accumulation_fusion=False, schedule="interleaved", vpp=2),
    # Megatron's block method: the first 3 layers of each chunk recomputed (uneven chunks: 11+10+11)
    Plan(tp=2, pp=4, dp=2, micro_batch=1, global_batch=64, seq_len=4096, recompute="full", recompute_layers=3,
         schedule="interleaved", vpp=2),
    Plan(tp=1, pp=3, dp=5, micro_batch=1, global_batch=60, seq_len=4096, recompute="full", recompute_layers=10),
    # interleaving in groups: 10 micro-batches on 4 stages as one group (Megatron-Core's
    # microbatch_group_size_per_vp_stage), and 12 in groups of 6 (more in flight than groups of 4)
    Plan(tp=2, pp=4, dp=2, micro_batch=1, global_batch=20, seq_len=4096, schedule="interleaved", vpp=2,
         microbatch_group=10),
    Plan(tp=2, pp=4, dp=2, micro_batch=1, global_batch=24, seq_len=4096, schedule="interleaved", vpp=2,
         microbatch_group=6),
    # torchtitan's layer policy: every third layer of each chunk
    Plan(tp=1, pp=3, dp=5, micro_batch=1, global_batch=60, seq_len=4096, recompute="full", recompute_every=3),
    # the fused loss (the last stage's peak is its backward, where the loss's working memory counts)
    Plan(tp=2, pp=2, dp=4, micro_batch=2, global_batch=64, seq_len=4096, cross_entropy="fused"),
    Plan(tp=1, pp=1, dp=16, micro_batch=1, global_batch=64, seq_len=4096, zero=3, cross_entropy="fused"),
    # userbuffers TP overlap; the distributed optimizer's parameter gather beside the first forward
    Plan(tp=8, pp=1, dp=2, micro_batch=1, global_batch=64, seq_len=4096, zero=1, tp_comm_overlap=True),
    Plan(tp=4, pp=2, dp=2, micro_batch=2, global_batch=64, seq_len=4096, zero=1, tp_comm_overlap=True,
         fp32_grads=True),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"tp{p.tp}pp{p.pp}dp{p.dp}cp{p.cp}z{p.zero}-{p.schedule}"
                         + (f"-rl{p.recompute_layers}" if p.recompute_layers else "")
                         + (f"-re{p.recompute_every}" if p.recompute_every else "")
                         + ("-fusedloss" if p.cross_entropy == "fused" else "")
                         + ("-tpoverlap" if p.tp_comm_overlap else "")
                         + (f"-group{p.microbatch_group}" if p.microbatch_group else ""))
def test_memory_is_exact_and_time_close(plan):
    cluster = CLUSTER if plan.world_size == 16 else build_cluster("h100-sxm", None, 1, plan.world_size)
    am = AnalyticModel(MODEL, cluster)
    est = am.estimate(plan)
    out = TrainingSimulation(TrainingWorkload(MODEL, plan), cluster).run()
    res = build_result(out, model=MODEL, plan=plan, cluster=cluster, calibrated=None)
    assert est.peak_memory_bytes == pytest.approx(res.peak_memory_bytes, rel=1e-9)
    assert est.fits == res.fits
    for k in ("params", "grads", "optimizer"):
        assert est.memory_breakdown[k] == pytest.approx(res.memory_breakdown[k], rel=1e-9)
    # no contention to speak of here: ZeRO-3 gathers and reduce-scatters share the link, but one
    # layer at a time; the zero-bubble estimate assumes ZB-H1's bubble, which the engine runs
    assert est.step_time_s == pytest.approx(res.step_time_s, rel=0.02)
    assert est.mfu == pytest.approx(res.mfu, rel=0.02)


def test_pieces_sum_to_cost_workload():
    """A chunk's analytic cost is cost_workload's chunk cost (same functions, summed per piece)."""
    plan = Plan(tp=2, pp=4, dp=2, micro_batch=1, global_batch=64, seq_len=4096, schedule="interleaved", vpp=2,
                grad_accumulation_fusion=False)
    am = AnalyticModel(MODEL, CLUSTER)
    am.chunk_costs(plan.replace(global_batch=16))  # another micro-batch count must not be reused
    _, layout, costs = am.chunk_costs(plan)
    ref = cost_workload(TrainingWorkload(MODEL, plan), CLUSTER)
    for row, cc in zip(costs, ref):
        assert row[0] == pytest.approx(cc.phases["F"].time_s, rel=1e-9)
        assert row[2] == pytest.approx(cc.phases["B"].time_s, rel=1e-9)
        assert row[5] == pytest.approx(cc.phases["W"].time_s, rel=1e-9)
        assert row[9] == pytest.approx(cc.saved_bytes, rel=1e-9)
        assert row[10] + row[11] == pytest.approx(cc.params, rel=1e-9)


def test_analytic_and_event_agree_on_the_order_of_the_top_plans():
    """Without contention (no ZeRO sharding, no cp), the best plans come in the same order
    (up to near-ties: plans within 1% of each other may swap)."""
    space = SearchSpace(zero=(0,), micro_batch=(1, 2), recompute=("selective", "full"),
                        schedules=("1f1b", "interleaved"), max_vpp=2)
    plans = enumerate_plans(MODEL, CLUSTER, space, seq_len=4096, global_batch=32).plans
    am = AnalyticModel(MODEL, CLUSTER)
    fitting = [p for p in plans if am.peak_memory(p)[1] is None]
    est = [am.estimate(p).step_time_s for p in fitting]
    top = sorted(range(len(fitting)), key=est.__getitem__)[:6]
    sim = {i: engine(fitting[i]).step_time_s for i in top}
    assert min(top, key=sim.get) == top[0]
    for i in top:  # every pair the engine separates by more than 1% comes in the same order
        for j in top:
            if sim[i] < sim[j] * 0.99:
                assert est[i] < est[j]
    for i in top:
        assert est[i] == pytest.approx(sim[i], rel=0.02)


@pytest.mark.parametrize("layout", [
    dict(tp=2, pp=4), dict(tp=2, pp=4, schedule="interleaved", vpp=2), dict(tp=1, pp=2, schedule="zero-bubble"),
    dict(tp=1, pp=2), dict(tp=8, pp=1), dict(tp=1, pp=1, zero=1), dict(tp=2, pp=1, recompute="selective"),
    dict(tp=1, pp=2, recompute="full")], ids=str)
def test_activation_offload_estimate_errs_fast_and_its_memory_low(layout):
    """Activation offload is estimated, not simulated: each backward waits for its layers'
    fetch, the last stage's forward for its copies down.  Against the engine the step errs fast,
    never slow (so the search, which simulates what can still win, never drops a winner for it),
    and close where the copies are the step's whole story (1F1B, no pipeline: within 3 %); the peak
    memory is a lower bound (copies in flight not counted)."""
    layout = dict(layout)
    tp, pp = layout.pop("tp"), layout.pop("pp")
    cluster = build_cluster("h100-sxm", None, 1, 8)
    dp = 8 // (tp * pp)
    plan = Plan(tp=tp, pp=pp, dp=dp, global_batch=dp * 8, seq_len=4096, offload={"activations": "cpu"}, **layout)
    est = AnalyticModel(MODEL, cluster).estimate(plan)
    out = TrainingSimulation(TrainingWorkload(MODEL, plan), cluster).run()
    res = build_result(out, model=MODEL, plan=plan, cluster=cluster, calibrated=None)
    assert est.step_time_s <= res.step_time_s * (1 + 1e-6)
    assert est.peak_memory_bytes <= res.peak_memory_bytes * (1 + 1e-9)
    if plan.schedule == "1f1b" and plan.recompute != "full":
        assert est.step_time_s == pytest.approx(res.step_time_s, rel=0.03)
        assert est.time_breakdown["exposed_transfers"] > 0


def test_an_offload_tier_the_cluster_lacks_is_refused():
    """As the engine does: a CXL placement on a cluster without CXL memory is one clear error."""
    from plansim.workloads.plan import PlanError

    plan = Plan(dp=8, global_batch=8, seq_len=4096, offload={"optimizer": "cxl"})
    with pytest.raises(PlanError, match="no cxl tier"):
        AnalyticModel(MODEL, build_cluster("h100-sxm", None, 1, 8)).estimate(plan)


def test_moe_ep_overlap_estimate_hides_what_the_engine_hides():
    """Megatron-Core's EP overlap hides the all-to-alls of the plan's steady-state micro-batches,
    not of the estimate's one-stage stand-in plan's (which has one): DeepSeek-MoE with EP 16 over
    two nodes, 8 micro-batches."""
    model = load_model("deepseek-moe-16b")
    plan = Plan(dp=16, ep=16, micro_batch=1, global_batch=128, seq_len=4096, zero=1, moe_a2a_overlap=True)
    est = AnalyticModel(model, CLUSTER).estimate(plan)
    out = TrainingSimulation(TrainingWorkload(model, plan), CLUSTER).run()
    res = build_result(out, model=model, plan=plan, cluster=CLUSTER, calibrated=None)
    assert est.step_time_s == pytest.approx(res.step_time_s, rel=0.02)


@pytest.mark.parametrize("etp", [None, 1])
def test_moe_with_and_without_parallel_folding(etp):
    """Mixtral on 16 H100s, tp 2 and dp 8: ep 4 inside dp (experts split over tp), or whole experts
    with ep 8 over tp·dp (Megatron-Core's folding); the estimate follows the engine either way."""
    model = load_model("mixtral-8x7b")
    plan = Plan(tp=2, dp=8, ep=4 if etp is None else 8, etp=etp, micro_batch=1, global_batch=16, seq_len=4096,
                recompute="full", zero=1)
    est = AnalyticModel(model, CLUSTER).estimate(plan)
    out = TrainingSimulation(TrainingWorkload(model, plan), CLUSTER).run()
    res = build_result(out, model=model, plan=plan, cluster=CLUSTER, calibrated=None)
    assert est.peak_memory_bytes == pytest.approx(res.peak_memory_bytes, rel=1e-9)
    assert est.step_time_s == pytest.approx(res.step_time_s, rel=0.02)
