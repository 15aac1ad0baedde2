"""FlowLink: processor-sharing bandwidth on one link direction (flow-level network model)."""
from __future__ import annotations

import pytest
import simpy
from hypothesis import given, settings, strategies as st

from plansim.simulator.flows import FlowLink

CAP = 100e9  # bytes/s


def _run(flows: list[tuple[float, float]], capacity: float = CAP) -> tuple[list[float], FlowLink]:
    """Start each (start_s, nbytes) flow; return the finish times and the link."""
    env = simpy.Environment()
    link = FlowLink(env, "l", capacity)
    finish = [float("nan")] * len(flows)

    def flow(i, start, nbytes):
        yield env.timeout(start)
        yield link.transfer(nbytes)
        finish[i] = env.now

    for i, (start, nbytes) in enumerate(flows):
        env.process(flow(i, start, nbytes))
    env.run()
    return finish, link


def test_single_flow_runs_at_capacity():
    (t,), link = _run([(0.0, 1e9)])
    assert t == pytest.approx(1e9 / CAP, rel=1e-12)
    assert link.bytes_carried == pytest.approx(link.bytes_offered, rel=1e-12)
    assert link.busy_time_s == pytest.approx(t, rel=1e-12)


def test_two_equal_flows_started_together_finish_at_twice_the_single_time():
    (single,), _ = _run([(0.0, 1e9)])
    (a, b), _ = _run([(0.0, 1e9), (0.0, 1e9)])
    assert a == pytest.approx(2 * single, rel=1e-9) and b == pytest.approx(2 * single, rel=1e-9)


def test_a_flows_finish_moves_when_another_starts():
    (alone,), _ = _run([(0.0, 1e9)])
    (first, second), _ = _run([(0.0, 1e9), (0.004, 1e9)])
    # alone: 10 ms. Shared from 4 ms: 0.6 GB left at half rate -> 12 ms more -> 16 ms.
    assert first > alone
    assert first == pytest.approx(0.016, rel=1e-9)
    # the second had 0.6 GB done at 16 ms, then runs alone: 0.4 GB at full rate -> 20 ms
    assert second == pytest.approx(0.020, rel=1e-9)


def test_a_flows_finish_moves_earlier_when_another_finishes():
    (short, long), _ = _run([(0.0, 1e8), (0.0, 1e9)])
    assert short == pytest.approx(2e8 / CAP, rel=1e-9)  # shared throughout
    assert long == pytest.approx(1.1e9 / CAP, rel=1e-9)  # work conserving: all bytes / capacity


def test_zero_bytes_complete_at_once_and_capacity_must_be_positive():
    (t,), link = _run([(0.0, 0.0)])
    assert t == 0.0 and link.bytes_offered == 0.0
    with pytest.raises(ValueError, match="capacity must be positive"):
        FlowLink(simpy.Environment(), "bad", 0.0)


flows_strategy = st.lists(
    st.tuples(st.floats(0.0, 0.02, allow_nan=False), st.floats(1e3, 5e9, allow_nan=False)),
    min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(flows=flows_strategy)
def test_processor_sharing_invariants(flows):
    finish, link = _run(flows)
    # bytes in = bytes out
    assert link.bytes_carried == pytest.approx(link.bytes_offered, rel=1e-9)
    assert link.bytes_offered == pytest.approx(sum(b for _, b in flows), rel=1e-12)
    assert link.active_flows == 0
    for (start, nbytes), end in zip(flows, finish):
        # no flow beats the link's full rate, none runs backwards in time
        assert end >= start + nbytes / CAP * (1 - 1e-9)
    # never busier than the span it was active, and the busy time carried every byte at capacity
    span = max(finish) - min(s for s, _ in flows)
    assert link.busy_time_s <= span * (1 + 1e-9) + 1e-12
    assert link.busy_time_s * CAP == pytest.approx(link.bytes_offered, rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 16), nbytes=st.floats(1e3, 1e10))
def test_n_equal_flows_take_n_times_as_long(n, nbytes):
    finish, _ = _run([(0.0, nbytes)] * n)
    for t in finish:
        assert t == pytest.approx(n * nbytes / CAP, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(flows=flows_strategy, extra=st.tuples(st.floats(0.0, 0.02), st.floats(1e3, 5e9)))
def test_another_flow_never_makes_a_flow_finish_earlier(flows, extra):
    before, _ = _run(flows)
    after, _ = _run(flows + [extra])
    for a, b in zip(before, after):
        assert b >= a * (1 - 1e-9)
