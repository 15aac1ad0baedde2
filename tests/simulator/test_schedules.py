"""Pipeline schedules: structure (every pass once, in a deadlock-free order), in-flight
micro-batches, and the bubble the engine produces against the closed forms of Narayanan et
al. SC'21 (GPipe and 1F1B (p − 1)/m; interleaved (p − 1)/(v·m)).
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from plansim.api import simulate
from plansim.simulator.engine import TrainingSimulation
from plansim.simulator.hardware import build_cluster
from plansim.simulator.schedules import build_schedule, gpipe, interleaved, one_f_one_b, zero_bubble_h1
from plansim.simulator.stagecost import ChunkCost, PhaseCost
from plansim.workloads.models import ModelSpec
from plansim.workloads.plan import Plan
from plansim.workloads.training import TrainingWorkload


def _chunks_of(rank: int, p: int, v: int) -> list[int]:
    return [c * p + rank for c in range(v)]


def _check_structure(sched, p: int, m: int, v: int, split_w: bool) -> None:
    assert len(sched) == p
    for i, order in enumerate(sched):
        phases = ("F", "B", "W") if split_w else ("F", "B")
        expected = {(ph, mb, vs) for ph in phases for mb in range(m) for vs in _chunks_of(i, p, v)}
        assert len(order) == len(set(order)) == len(expected), f"rank {i}: a pass is missing or repeated"
        assert set(order) == expected
        pos = {item: k for k, item in enumerate(order)}
        for mb in range(m):
            for vs in _chunks_of(i, p, v):
                assert pos[("F", mb, vs)] < pos[("B", mb, vs)]
                if split_w:
                    assert pos[("B", mb, vs)] < pos[("W", mb, vs)]


def _runs_without_deadlock(sched, p: int, v: int) -> bool:
    """Execute the per-rank orders with the pipeline's data dependencies: F(mb, vs) needs
    F(mb, vs − 1); B(mb, vs) needs B(mb, vs + 1) (the last stage's backward needs its own F)."""
    last = p * v - 1
    done: set = set()
    heads = [0] * p
    total = sum(len(o) for o in sched)
    while len(done) < total:
        progressed = False
        for i, order in enumerate(sched):
            while heads[i] < len(order):
                ph, mb, vs = order[heads[i]]
                if ph == "F":
                    ready = vs == 0 or ("F", mb, vs - 1) in done
                elif ph == "B":
                    ready = ("F", mb, vs) in done and (vs == last or ("B", mb, vs + 1) in done)
                else:
                    ready = ("B", mb, vs) in done
                if not ready:
                    break
                done.add((ph, mb, vs))
                heads[i] += 1
                progressed = True
        if not progressed:
            return False
    return True


def _max_in_flight(order) -> int:
    live = peak = 0
    for ph, _, _ in order:
        live += ph == "F"
        live -= ph == "B"
        peak = max(peak, live)
    return peak


@settings(max_examples=80, deadline=None)
@given(p=st.integers(1, 8), m=st.integers(1, 24))
def test_gpipe_1f1b_zero_bubble_structure(p, m):
    for name, split in (("gpipe", False), ("1f1b", False), ("zero-bubble", True)):
        sched = build_schedule(name, p, m)
        _check_structure(sched, p, m, 1, split)
        assert _runs_without_deadlock(sched, p, 1), name


@settings(max_examples=60, deadline=None)
@given(p=st.integers(2, 8), groups=st.integers(1, 4), v=st.integers(2, 4))
def test_interleaved_structure(p, groups, v):
    m = p * groups  # Megatron requires micro-batches to be a multiple of pp
    sched = interleaved(p, m, v)
    _check_structure(sched, p, m, v, False)
    assert _runs_without_deadlock(sched, p, v)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(2, 6), v=st.integers(2, 4), extra=st.integers(0, 6), m=st.integers(2, 30))
def test_grouped_interleaved_structure(p, v, extra, m):
    """Megatron-Core's micro-batch groups (microbatch_group_size_per_vp_stage N, p ≤ N ≤ m, a
    last group empty or of at least p): every pass once, no deadlock, and rank i warms up with
    w = (p − i − 1)·2 + (v − 1)·N forwards, so its first backward follows the forward after them."""
    n = p + extra
    if not n <= m or 0 < m % n < p:
        return
    sched = interleaved(p, m, v, n)
    _check_structure(sched, p, m, v, False)
    assert _runs_without_deadlock(sched, p, v)
    for i, order in enumerate(sched):
        first_b = next(k for k, (ph, _, _) in enumerate(order) if ph == "B")
        warmup = (p - i - 1) * 2 + (v - 1) * n
        assert first_b == (warmup + 1 if warmup < m * v else m * v)
    assert interleaved(p, p * 3, v, p) == interleaved(p, p * 3, v)  # N = p is the classic schedule


def _peak_states(order) -> set:
    """The maximal in-flight vectors (per local chunk) at each (phase, chunk) of one rank."""
    local = sorted({vs for _, _, vs in order})
    live, seen = dict.fromkeys(local, 0), {}
    for ph, _, vs in order:
        live[vs] += ph == "F"
        seen.setdefault((ph, vs), set()).add(tuple(live[c] for c in local))
        live[vs] -= ph == "B"
    return {(key, a) for key, vecs in seen.items() for a in vecs
            if not any(b != a and all(y >= x for x, y in zip(a, b)) for b in vecs)}


def test_grouped_interleaving_settles_after_two_groups():
    """The analytic memory replays min(m, 2N + m mod N) micro-batches of a grouped interleaved
    schedule instead of m: the states that can be a rank's peak are the same (checked here over
    every valid (p, v, N, m) with p ≤ 5, v ≤ 3, N ≤ 2p + 1, m ≤ 5N)."""
    for p in range(2, 6):
        for v in (2, 3):
            for n in range(p, 2 * p + 2):
                for m in range(2 * n + 1, 5 * n + 1):
                    if 0 < m % n < p:
                        continue
                    short = 2 * n + m % n
                    for full, cut in zip(interleaved(p, m, v, n), interleaved(p, short, v, n)):
                        assert _peak_states(full) == _peak_states(cut), (p, v, n, m)


@settings(max_examples=80, deadline=None)
@given(p=st.integers(1, 8), m=st.integers(1, 24))
def test_in_flight_micro_batches(p, m):
    """1F1B keeps at most p − i micro-batches' activations on rank i; GPipe keeps all m;
    ZB-H1 keeps what 1F1B keeps (Qi et al. 2023: same memory)."""
    for i, order in enumerate(one_f_one_b(p, m)):
        assert _max_in_flight(order) == min(p - i, m)
    for order in gpipe(p, m):
        assert _max_in_flight(order) == m
    for i, order in enumerate(zero_bubble_h1(p, m)):
        assert _max_in_flight(order) <= min(p - i, m)
        # a micro-batch is let go at its W: every rank holds what rank 0 of 1F1B holds, no more
        assert _max_in_flight([(ph.replace("B", "-").replace("W", "B"), mb, vs) for ph, mb, vs in order]) \
            == min(p, m)


def test_interleaved_in_flight_follows_megatron_warmup():
    p, v, m = 4, 2, 8
    for i, order in enumerate(interleaved(p, m, v)):
        warmup = min((p - i - 1) * 2 + (v - 1) * p, m * v)
        assert _max_in_flight(order) == min(warmup + 1, m * v)


def test_unknown_schedule_and_interleaved_with_one_chunk():
    with pytest.raises(ValueError, match="schedule"):
        build_schedule("pipedream", 4, 8)
    assert build_schedule("interleaved", 4, 8, 1) == one_f_one_b(4, 8)


# --- the engine against the closed forms ---------------------------------------------------------
TF, TB = 0.010, 0.020  # seconds per micro-batch of one whole stage (forward, backward)


def _tiny_model(layers: int) -> ModelSpec:
    # small enough that point-to-point messages (b·s·h) cost microseconds against 10 ms phases
    return ModelSpec(name="tiny", num_layers=layers, hidden=64, num_heads=2, num_kv_heads=2,
                     ffn_hidden=256, vocab=128, max_seq_len=128)


def _equal_stage_step(p: int, m: int, schedule: str = "1f1b", v: int = 1) -> float:
    """Step time of the engine with every stage's costs replaced by equal, communication-free
    phases (TF/v forward, TB/v backward per chunk; ZB splits B evenly into B and W)."""
    plan = Plan(pp=p, global_batch=m, seq_len=128, schedule=schedule, vpp=v)
    workload = TrainingWorkload(_tiny_model(p * v * 2), plan)
    cluster = build_cluster("h100-sxm", nodes=1, gpus_per_node=max(p, 1))
    sim = TrainingSimulation(workload, cluster)
    sim.costs = [ChunkCost(c.chunk, {"F": PhaseCost(compute_s=TF / v), "B": PhaseCost(compute_s=TB / v),
                                     "Bi": PhaseCost(compute_s=TB / v / 2), "W": PhaseCost(compute_s=TB / v / 2)},
                           saved_bytes=1.0, params=0.0, dense_params=0.0, expert_params=0.0)
                 for c in sim.costs]
    return sim.run().step_time_s


@pytest.mark.parametrize("p, m", [(2, 8), (4, 8), (4, 16), (8, 32), (8, 8), (4, 1)])
def test_1f1b_bubble_is_p_minus_1_over_m(p, m):
    ideal = m * (TF + TB)
    bubble = (_equal_stage_step(p, m) - ideal) / ideal
    assert bubble == pytest.approx((p - 1) / m, rel=0.01, abs=1e-3)


@pytest.mark.parametrize("p, m", [(4, 8), (4, 16)])
def test_gpipe_bubble_equals_1f1b_bubble(p, m):
    assert _equal_stage_step(p, m, "gpipe") == pytest.approx(_equal_stage_step(p, m, "1f1b"), rel=0.01)


@pytest.mark.parametrize("p, m, v", [(4, 8, 2), (4, 16, 2), (4, 8, 4), (8, 16, 2)])
def test_interleaved_bubble_is_smaller(p, m, v):
    one = _equal_stage_step(p, m)
    inter = _equal_stage_step(p, m, "interleaved", v)
    assert inter < one
    ideal = m * (TF + TB)
    bubble = (inter - ideal) / ideal
    # SC'21: (p − 1)/(v·m) with equal chunks
    assert bubble == pytest.approx((p - 1) / (v * m), rel=0.05, abs=2e-3)


@pytest.mark.parametrize("p, m", [(4, 8), (4, 16), (8, 16)])
def test_zero_bubble_is_not_slower_than_1f1b(p, m):
    assert _equal_stage_step(p, m, "zero-bubble") <= _equal_stage_step(p, m) * (1 + 1e-9)


@pytest.mark.parametrize("p, m", [(2, 2), (4, 4), (4, 8), (4, 16), (8, 8), (8, 32)])
def test_zero_bubble_h1_bubble_is_a_third_of_1f1b(p, m):
    """Qi et al. (ICLR 2024) §2.1: with F, B and W equal (here 10 ms each) ZB-H1's bubble is
    (p − 1)·(F + B − W), a third of 1F1B's (p − 1)·(F + B + W), from m = p micro-batches on."""
    f = w = TF
    ideal = m * (TF + TB)
    assert _equal_stage_step(p, m, "zero-bubble") - ideal == pytest.approx((p - 1) * f, rel=0.01, abs=1e-3)
    assert _equal_stage_step(p, m) - ideal == pytest.approx((p - 1) * (f + TB / 2 + w), rel=0.01, abs=1e-3)


@pytest.mark.parametrize("model", ["llama3-8b", "gpt3-175b"])
def test_gpipe_needs_at_least_the_memory_of_1f1b(model):
    common = dict(tp=8, pp=4, dp=1, global_batch=16, seq_len=2048)
    if model == "llama3-8b":
        common.update(tp=2)
    nodes = common["tp"] * common["pp"] // 8
    r_gpipe = simulate(model, "h100-sxm", plan=dict(common, schedule="gpipe"), nodes=nodes, gpus_per_node=8)
    r_1f1b = simulate(model, "h100-sxm", plan=dict(common, schedule="1f1b"), nodes=nodes, gpus_per_node=8)
    assert r_gpipe.peak_memory_bytes >= r_1f1b.peak_memory_bytes
    assert r_gpipe.memory_breakdown["activations"] > r_1f1b.memory_breakdown["activations"]
