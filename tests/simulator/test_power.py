"""The power-limited clock (simulator/costs/power.py): the limit holds, the clock moves the right
way with the work, only tensor-core kernels slow down, and the engine and the analytic estimate
apply it alike."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plansim.api import ProfileError, resolve_cluster, simulate
from plansim.simulator.analytic import estimate
from plansim.simulator.costs.power import MIN_CLOCK_FRACTION, Activity, PowerModel, throttled_device
from plansim.workloads.model_io import load_model
from plansim.workloads.plan import Plan

#: the H200's fitted parameters (hardware_profiles/calibrated/h200.yaml), rounded
H200 = PowerModel(limit_w=700.0, burst_w=869.0, idle_w=125.0, tensor_w=1006.0, memory_w=570.0, clock_exponent=2.08,
                  tensor_static_fraction=0.30)

seconds = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)


@st.composite
def activities(draw) -> Activity:
    gemm, attention, other, idle = draw(seconds), draw(seconds), draw(seconds), draw(seconds)
    gemm_u, attention_u = draw(st.floats(0.0, 1.0)), draw(st.floats(0.0, 1.0))
    return Activity(tensor_s=(gemm, attention), tensor_ref_s=(gemm * gemm_u, attention * attention_u), other_s=other,
                    span_s=gemm + attention + other + idle)


@settings(max_examples=300, deadline=None)
@given(activities())
def test_the_sustained_clock_holds_the_limit(activity):
    clock = H200.sustained_clock(activity)
    assert MIN_CLOCK_FRACTION <= clock <= 1.0
    if clock == 1.0:
        assert H200.power_w(1.0, activity) <= H200.limit_w + 1e-9
    elif clock > MIN_CLOCK_FRACTION:
        assert H200.power_w(clock, activity) == pytest.approx(H200.limit_w, rel=1e-6)
    assert all(s >= 1.0 for s in H200.slowdowns(clock, activity))


@settings(max_examples=300, deadline=None)
@given(activities(), st.floats(min_value=0.01, max_value=5.0))
def test_more_tensor_work_never_raises_the_clock_and_idle_time_never_lowers_it(activity, extra):
    clock = H200.sustained_clock(activity)
    busier = Activity((activity.tensor_s[0] + extra, activity.tensor_s[1]),
                      (activity.tensor_ref_s[0] + extra, activity.tensor_ref_s[1]), activity.other_s,
                      activity.span_s + extra)
    idler = Activity(activity.tensor_s, activity.tensor_ref_s, activity.other_s, activity.span_s + extra)
    assert H200.sustained_clock(busier) <= clock + 1e-9
    assert H200.sustained_clock(idler) >= clock - 1e-9


def test_a_large_gemm_stream_settles_where_the_h200_measured_it():
    """A stream of one large GEMM (u = 1, nothing else): the model's clock against the 8192³
    stream of the powerkernels run the fit used (1,479 MHz; a consistency check, not held-out:
    the line in u through the eight tensor streams leaves 2 % median, 14 % p90 in their draw).
    The power suite's run of the same GEMM, on another lease, settled at 1,440 MHz."""
    clock = H200.sustained_clock(Activity((1.0, 0.0), (1.0, 0.0), 0.0, 1.0))
    assert clock * 1980 == pytest.approx(1479, rel=0.05)


def test_throttling_slows_only_the_tensor_core_kernels():
    device = resolve_cluster("h200", None, nodes=1, gpus_per_node=1)[0].device
    slow = throttled_device(device, (1.1, 1.2))
    assert slow.achievable_gemm_fraction == pytest.approx(device.achievable_gemm_fraction / 1.1)
    assert slow.attention_fraction == pytest.approx(device.attention_fraction / 1.2)
    assert slow.achievable_hbm_bw_Bps == device.achievable_hbm_bw_Bps
    assert throttled_device(device, (1.0, 1.0)) is device


def _without_power(cluster):
    return cluster.model_copy(update={"device": cluster.device.model_copy(update={"power_limit_w": None})})


PLAN = dict(micro_batch=2, global_batch=2, seq_len=4096, recompute="full")


def test_the_engine_slows_a_step_held_at_the_limit_by_no_more_than_its_tensor_kernels_allow():
    cluster, _ = resolve_cluster("h200", None, nodes=1, gpus_per_node=1)
    held = simulate("llama3-8b", cluster=cluster, plan=PLAN)
    free = simulate("llama3-8b", cluster=_without_power(cluster), plan=PLAN)
    assert free.sm_clock is None
    assert held.sm_clock < 1.0
    assert held.step_time_s > free.step_time_s
    # at most every tensor kernel at the lowest clock's slowdown: their share of the step is < 1
    assert held.step_time_s < free.step_time_s / held.sm_clock


def test_a_device_without_power_parameters_is_not_throttled():
    result = simulate("llama3-8b", "a100-80gb", plan=dict(tp=8, **PLAN), nodes=1, gpus_per_node=8)
    assert result.sm_clock is None


def test_the_analytic_estimate_applies_the_limit_as_the_engine_does():
    cluster, _ = resolve_cluster("h200", None, nodes=1, gpus_per_node=1)
    model = load_model("llama3-8b")
    plan = Plan(**PLAN)
    engine = simulate(model, cluster=cluster, plan=plan)
    analytic = estimate(model, plan, cluster)
    free = estimate(model, plan, _without_power(cluster))
    assert analytic.step_time_s > free.step_time_s
    assert analytic.step_time_s == pytest.approx(engine.step_time_s, rel=0.01)


@settings(max_examples=25, deadline=None)
@given(st.floats(min_value=150.0, max_value=600.0), st.floats(min_value=1.0, max_value=100.0))
def test_a_higher_power_limit_never_makes_a_step_slower(limit, more):
    cluster, _ = resolve_cluster("h200", None, nodes=1, gpus_per_node=1)
    low = simulate("llama3-8b", cluster=cluster, plan=PLAN, power_limit_w=limit)
    high = simulate("llama3-8b", cluster=cluster, plan=PLAN, power_limit_w=limit + more)
    assert high.step_time_s <= low.step_time_s * (1 + 1e-9)
    assert high.sm_clock >= low.sm_clock - 1e-9


def test_a_power_limit_at_or_below_idle_is_refused():
    with pytest.raises(ProfileError, match="power_limit: 100 W must exceed h200's idle draw"):
        simulate("llama3-8b", "h200", plan=PLAN, nodes=1, gpus_per_node=1, power_limit_w=100)
    with pytest.raises(ProfileError, match="power_limit: must be positive"):
        simulate("llama3-8b", "h200", plan=PLAN, nodes=1, gpus_per_node=1, power_limit_w=-5)


def test_a_power_limit_above_the_board_limit_is_refused():
    """nvidia-smi -pl cannot raise a board past its maximum: neither can --power-limit."""
    with pytest.raises(ProfileError, match=r"power_limit: 5000 W exceeds h100-sxm's board limit \(700 W\)"):
        simulate("llama3-8b", "h100-sxm", plan=PLAN, nodes=1, gpus_per_node=1, power_limit_w=5000)


def test_a_board_shipped_below_its_tdp_may_be_raised_to_it():
    """The Grand Teton H100 runs at 500 W by default and takes up to its 700 W TDP: a raised limit
    speeds its step, and one past the TDP is refused."""
    low = simulate("llama3-8b", "h100-sxm-96gb", plan=PLAN, nodes=1, gpus_per_node=1)
    high = simulate("llama3-8b", "h100-sxm-96gb", plan=PLAN, nodes=1, gpus_per_node=1, power_limit_w=700)
    assert high.sm_clock > low.sm_clock and high.step_time_s < low.step_time_s
    with pytest.raises(ProfileError, match=r"power_limit: 701 W exceeds h100-sxm-96gb's board limit \(700 W\)"):
        simulate("llama3-8b", "h100-sxm-96gb", plan=PLAN, nodes=1, gpus_per_node=1, power_limit_w=701)


def test_a_step_held_at_the_limit_draws_the_limit_and_its_energy_adds_up():
    cluster, _ = resolve_cluster("h200", None, nodes=1, gpus_per_node=1)
    for limit in (400.0, 700.0):
        r = simulate("llama3-8b", cluster=cluster, plan=PLAN, power_limit_w=limit)
        assert r.sm_clock < 1.0
        assert r.power_w == pytest.approx(limit, rel=1e-6)
        tokens = PLAN["global_batch"] * PLAN["seq_len"]
        assert r.energy_per_token_j == pytest.approx(r.power_w * r.num_gpus * r.step_time_s / tokens)
    # on a what-if board of 2,000 W a step runs under the limit: it draws less than it, more than idle
    board = cluster.model_copy(update={"device": cluster.device.model_copy(update={"power_limit_w": 2000.0})})
    free = simulate("llama3-8b", cluster=board, plan=PLAN)
    assert free.sm_clock == 1.0
    assert cluster.device.idle_power_w < free.power_w < 2000.0
