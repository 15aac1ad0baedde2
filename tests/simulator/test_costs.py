"""Cost models: properties every kernel and collective cost must have, whatever the constants.

No number here is a tuned prediction: the tests check conventions (nccl-tests' bus factors),
conservation (bytes sent = bytes received), bounds (never faster than the datasheet roofline
or the link) and monotonicity (more work never takes less time).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from plansim.simulator.costs.collectives import (OPS, Group, bus_factor, collective_cost, collective_time,
                                                 nccl_tests_bandwidths, traffic_bytes)
from plansim.simulator.costs import compute
from plansim.simulator.costs.compute import (attention_flops, attention_time, context_parallel_attention_time,
                                             elementwise_time, flash_makespan, gemm_efficiency, gemm_time,
                                             memcpy_time, memory_bound_time, roofline_time)
from plansim.simulator.costs.transfers import host_transfer_time
from plansim.simulator.hardware import ProfileError, build_cluster, load_device

DEVICES = ["h100-sxm", "h200", "a100-80gb", "b200", "mi300x", "ascend-910b"]


# --- collectives ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4, 8, 64, 1024])
def test_bus_factors_follow_nccl_tests(n):
    assert bus_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert bus_factor(op, n) == pytest.approx((n - 1) / n)
    assert bus_factor("broadcast", n) == 1.0
    assert all(bus_factor(op, 1) == 0.0 for op in OPS)
    with pytest.raises(ValueError, match="op: 'gather' is not one of"):
        bus_factor("gather", n)


@settings(max_examples=200, deadline=None)
@given(op=st.sampled_from(OPS), nbytes=st.floats(0, 1e12), n=st.integers(1, 4096))
def test_bytes_sent_equal_bytes_received(op, nbytes, n):
    sent, received = traffic_bytes(op, nbytes, n)
    assert sent == received >= 0
    if n > 1 and nbytes > 0 and op not in ("broadcast", "send_recv"):
        assert sent == pytest.approx(n * bus_factor(op, n) * nbytes)


def test_nccl_tests_bandwidth_definitions():
    algbw, busbw = nccl_tests_bandwidths("all_reduce", 1e9, 8, 0.01)
    assert algbw == pytest.approx(1e11) and busbw == pytest.approx(1e11 * 2 * 7 / 8)
    _, busbw = nccl_tests_bandwidths("broadcast", 1e9, 8, 0.01)
    assert busbw == pytest.approx(1e11)


CLUSTERS = [dict(hardware="h100-sxm", nodes=1), dict(hardware="h100-sxm", nodes=4),
            dict(hardware="a100-80gb", nodes=16), dict(hardware="mi300x", nodes=2),
            dict(hardware="h200", nodes=2, nics_per_node=4)]


def _groups(cluster):
    gpn, nodes = cluster.gpus_per_node, cluster.nodes
    out = [Group(n, n) for n in (2, 4, gpn) if n <= gpn]
    if nodes > 1:
        out += [Group(nodes, 1), Group(gpn * nodes, gpn), Group(2 * nodes, 2)]
    return out


@pytest.mark.parametrize("kw", CLUSTERS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_collectives_are_positive_monotone_and_bounded_by_the_link(kw):
    cluster = build_cluster(**kw)
    peak_link = max(cluster.intra_node_link.bw_Bps,
                    cluster.inter_node_link.bw_Bps if cluster.inter_node_link else 0.0)
    for group in _groups(cluster):
        for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"):
            sizes = [2.0 ** k for k in range(10, 36, 3)]
            times = [collective_time(op, s, group, cluster) for s in sizes]
            assert all(t > 0 for t in times)
            assert all(b >= a for a, b in zip(times, times[1:])), (op, group)
            for s, t in zip(sizes, times):
                _, busbw = nccl_tests_bandwidths(op, s, group.size, t)
                # no rank pushes bytes faster than its links' peak (all NICs of a node together)
                limit = peak_link * max(1, cluster.nics_per_node) if group.nodes > 1 else cluster.intra_node_link.bw_Bps
                assert busbw <= limit * (1 + 1e-9)
            c = collective_cost(op, 1e9, group, cluster)
            assert c.latency_s > 0 and c.volume_bytes >= 0 and c.rate_Bps > 0
            assert c.link in ("intra", "inter")


def test_ring_busbw_grows_with_ranks_as_measured_and_only_for_rings():
    """NVLink 4's measured busbw per ring size: a large all-reduce's busbw follows the table's
    ratios between rank counts (monotone, interpolated in 1/n between them); send/recv and
    all-to-all (no ring) and links without a table are unaffected."""
    cluster = build_cluster("h100-sxm")
    link = cluster.intra_node_link
    assert link.ring_busbw_by_ranks, "nvlink4-nvswitch should carry its measured ring table"
    fractions = [link.ring_fraction(n) for n in range(2, 9)]
    assert all(b >= a for a, b in zip(fractions, fractions[1:])) and fractions[-1] == 1.0
    assert link.ring_fraction(1) == 1.0 and link.ring_fraction(64) == link.ring_fraction(8)
    busbw = {n: nccl_tests_bandwidths("all_reduce", 2**30, n, collective_time("all_reduce", 2**30, Group(n, n),
                                                                              cluster))[1] for n in (2, 4, 8)}
    for n in (2, 4):  # latency is < 1 % of a 1 GiB all-reduce: the busbw ratio is the table's
        assert busbw[n] / busbw[8] == pytest.approx(link.ring_fraction(n) / link.ring_fraction(8), rel=0.01)
    flat = cluster.model_copy(update={"intra_node_link": link.model_copy(update={"ring_busbw_by_ranks": None})})
    for op in ("send_recv", "all_to_all"):
        assert collective_time(op, 2**30, Group(2, 2), cluster) == collective_time(op, 2**30, Group(2, 2), flat)
    assert collective_time("all_reduce", 2**30, Group(2, 2), cluster) > collective_time("all_reduce", 2**30,
                                                                                        Group(2, 2), flat)
    with pytest.raises(ValueError, match="ring_busbw_by_ranks"):
        link.model_validate({**link.model_dump(), "ring_busbw_by_ranks": {1: 0.5}})


def test_trivial_collectives_cost_nothing():
    cluster = build_cluster("h100-sxm")
    assert collective_cost("all_reduce", 1e9, Group(1, 1), cluster).time_s == 0.0
    assert collective_cost("all_reduce", 0.0, Group(8, 8), cluster).time_s == 0.0
    with pytest.raises(ValueError, match="algorithm"):
        collective_cost("all_reduce", 1e9, Group(8, 8), cluster, algorithm="butterfly")
    with pytest.raises(ValueError, match="group"):
        Group(4, 8)


def test_tree_and_ring_pick_the_faster_latency_for_all_reduce():
    cluster = build_cluster("h100-sxm", nodes=16)
    g = Group(128, 8)
    auto = collective_time("all_reduce", 1024, g, cluster)
    assert auto <= collective_time("all_reduce", 1024, g, cluster, "ring") + 1e-15
    assert auto <= collective_time("all_reduce", 1024, g, cluster, "tree") + 1e-15


def test_fewer_nics_make_inter_node_collectives_slower():
    """Regression: the per-GPU NIC share was a cached_property that survived model_copy, so a
    cluster built with fewer NICs kept the bandwidth of the base cluster."""
    base = build_cluster("h100-sxm")
    assert base.nic_bw_per_gpu_Bps > 0  # read it first: this is what the cache used to keep
    fewer = build_cluster("h100-sxm", nics_per_node=2)
    assert fewer.nic_bw_per_gpu_Bps == pytest.approx(base.nic_bw_per_gpu_Bps * 2 / base.nics_per_node)
    link = base.inter_node_link
    faster = base.model_copy(update={"inter_node_link": link.model_copy(
        update={"bw_Bps": 4 * link.bw_Bps, "achievable_bw_Bps": 4 * link.achievable_bw_Bps})})
    assert faster.nic_bw_per_gpu_Bps == pytest.approx(4 * base.nic_bw_per_gpu_Bps)
    two = build_cluster("h100-sxm", nodes=2)
    two_few = build_cluster("h100-sxm", nodes=2, nics_per_node=2)
    g = Group(16, 8)
    assert collective_time("all_reduce", 1e9, g, two_few) > collective_time("all_reduce", 1e9, g, two)


# --- kernels ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DEVICES)
@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 65536), n=st.integers(1, 65536), k=st.integers(1, 65536),
       dtype=st.sampled_from(["bf16", "fp16", "fp8", "fp32"]))
def test_gemm_never_beats_the_roofline(name, m, n, k, dtype):
    device = load_device(name)
    try:
        device.flops(dtype)
    except ProfileError:  # a dtype the device has no peak for (its own error names the allowed ones)
        return
    t = float(gemm_time(m, n, k, dtype, device))
    flops = 2.0 * m * n * k
    elem = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    traffic = (m * k + k * n + m * n) * elem
    assert t > 0 and t >= float(roofline_time(flops, traffic, device, dtype)) * (1 - 1e-12)
    e = float(gemm_efficiency(m, n, k, device))
    assert 0 < e <= 1


@pytest.mark.parametrize("name", DEVICES)
def test_gemm_time_grows_with_each_dimension(name):
    device = load_device(name)
    sizes = np.array([256, 512, 1024, 2048, 4096, 8192, 16384])
    base = 4096
    for axis in range(3):
        dims = [np.full_like(sizes, base) for _ in range(3)]
        dims[axis] = sizes
        times = gemm_time(*dims, "bf16", device)
        assert np.all(np.diff(times) >= -1e-15)


@pytest.mark.parametrize("name", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_roofline_and_phases(name, causal):
    device = load_device(name)
    for s in (512, 2048, 8192, 32768):
        fwd = float(attention_time(1, 32, 8, 128, s, s, causal, "forward", device))
        bwd = float(attention_time(1, 32, 8, 128, s, s, causal, "backward", device))
        both = float(attention_time(1, 32, 8, 128, s, s, causal, "both", device))
        assert 0 < fwd < bwd and both == pytest.approx(fwd + bwd, rel=1e-12)
        executed = float(attention_flops(1, 32, 128, s, s, causal, "both"))
        assert both >= executed / device.flops("bf16")
    # causal masking skips work: never slower than the full product
    assert float(attention_time(1, 32, 8, 128, 8192, 8192, True, "both", device)) <= \
        float(attention_time(1, 32, 8, 128, 8192, 8192, False, "both", device))


@settings(max_examples=200, deadline=None)
@given(heads=st.integers(1, 300), works=st.lists(st.floats(1, 1e4), min_size=1, max_size=40),
       slots=st.integers(1, 400))
def test_flash_grid_finishes_within_the_greedy_scheduling_bounds(heads, works, slots):
    """List scheduling: never before the work is spread evenly or the longest CTA ends, and
    never later than that spread plus one CTA (Graham's bound)."""
    total, longest = heads * sum(works), max(works)
    makespan = flash_makespan(heads, tuple(works), slots)
    assert makespan >= max(total / slots, longest) * (1 - 1e-9)
    assert makespan <= total / slots + longest + 1e-9 * total


def test_large_flash_grids_extrapolate_their_full_simulation(monkeypatch):
    """Grids beyond MAX_SIMULATED_CTAS simulate their last heads only; the slots are full until
    then, so the result matches the whole simulation."""
    works = tuple(float(64 * (i + 1) + 100) for i in range(16))
    exact = flash_makespan(2000, works, 264)
    flash_makespan.cache_clear()
    monkeypatch.setattr(compute, "MAX_SIMULATED_CTAS", 16 * 50)
    assert flash_makespan(2000, works, 264) == pytest.approx(exact, rel=0.01)
    flash_makespan.cache_clear()


@pytest.mark.parametrize("name", ["h100-sxm", "h200", "a100-80gb"])
def test_causal_attention_costs_more_than_half_when_few_heads_leave_a_ragged_last_wave(name):
    """Causal masking halves the work, but its CTAs are unequal: with few (batch, head) pairs
    the last wave is ragged and causal costs well over half the full mask's time (H100/H200
    measured 0.80-0.82 at b·h = 32, s = 2,048); with many it approaches half."""
    device = load_device(name)

    def ratio(batch):
        return float(attention_time(batch, 32, 8, 128, 2048, 2048, True, "forward", device)
                     / attention_time(batch, 32, 8, 128, 2048, 2048, False, "forward", device))

    few, many = ratio(1), ratio(64)
    assert few > many > 0.5
    assert few > 0.6


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_context_parallel_causal_attention_shares_the_work_evenly(cp):
    """Zigzag chunks give every context-parallel rank 1/cp of the causal work: without the CTAs'
    fixed costs (which a rank's short query chunks pay more often) and on a grid large enough
    that waves do not matter, one rank's time is 1/cp of the whole sequence's."""
    device = load_device("h100-sxm").model_copy(update={"attention_fwd_cta_overhead": 1e-6,
                                                        "attention_bwd_cta_overhead": 1e-6})
    s = 32768
    whole = float(attention_time(16, 64, 8, 128, s, s, True, "both", device))
    rank = float(context_parallel_attention_time(16, 64, 8, 128, s // cp, s, True, "both", device))
    assert rank == pytest.approx(whole / cp, rel=0.02)


@pytest.mark.parametrize("cp", [2, 4, 8, 16])
def test_context_parallel_attention_counts_the_flops_its_time_runs(cp):
    """A context-parallel rank's executed FLOPs (which the power model reads as its tensor
    rate) add up to 1/cp of the whole causal sequence's, as its time does: its last chunk against
    the whole sequence sees nearly the full rectangle under the bottom-right causal mask, not half
    of it."""
    s, local = 131072, 131072 // cp
    whole = float(attention_flops(1, 16, 128, s, s, True, "both"))
    chunk = local // 2
    rank = float(attention_flops(1, 16, 128, chunk, chunk, True, "both")
                 + attention_flops(1, 16, 128, local - chunk, s, True, "both"))
    assert rank == pytest.approx(whole / cp, rel=0.02)
    # a query block at the end of a long sequence: the whole rectangle but half a square
    assert float(attention_flops(1, 1, 128, 128, s, True, "forward")) == pytest.approx(
        4.0 * 128 * 128 * s * (1 - 128 / (2 * s)), rel=0.01)


@pytest.mark.parametrize("name", DEVICES)
def test_memory_bound_ops_never_beat_peak_bandwidth(name):
    device = load_device(name)
    for nbytes in (1.0, 1e3, 1e6, 1e9, 1e11):
        assert float(memory_bound_time(nbytes, device)) >= nbytes / device.hbm_bw_Bps
        assert float(memcpy_time(nbytes, device)) >= 2 * nbytes / device.hbm_bw_Bps
        assert float(elementwise_time(nbytes, device)) >= 3 * nbytes / device.hbm_bw_Bps
        assert float(memory_bound_time(2 * nbytes, device)) > float(memory_bound_time(nbytes, device))


def test_host_transfers_pageable_slower_than_pinned_and_bounded_by_pcie():
    cluster = build_cluster("h100-sxm")
    link = cluster.host_link
    for nbytes in (1e3, 1e6, 1e9):
        pinned = float(host_transfer_time(nbytes, link))
        pageable = float(host_transfer_time(nbytes, link, pinned=False))
        assert pageable > pinned >= nbytes / link.bw_Bps
    assert math.isfinite(float(host_transfer_time(0, link)))


def test_a_phase_of_small_kernels_runs_at_the_rate_its_host_issues_them():
    """Eager frameworks issue kernels one by one from the host: 200 tiny elementwise kernels take
    200 issue times, while a phase of large GEMMs is untouched by the host."""
    from plansim.simulator.costs.compute import DEFAULT_KERNEL_ISSUE_S
    from plansim.simulator.stagecost import Groups, cost_ops
    from plansim.workloads.ops import Op
    from plansim.workloads.plan import Plan

    cluster = build_cluster("h100-sxm", "dgx-h100", 1, 8)
    groups = Groups.of(Plan(), cluster)
    tiny = cost_ops([Op(f"add{i}", "memory", bytes=4096) for i in range(200)], cluster, groups)
    assert tiny.compute_s == pytest.approx(200 * DEFAULT_KERNEL_ISSUE_S)
    assert any(name == "host.issue" for name, _, _ in tiny.ops)
    rope = cost_ops([Op("rope", "memory", bytes=4096, kernels=5)], cluster, groups)
    assert rope.compute_s == pytest.approx(5 * DEFAULT_KERNEL_ISSUE_S)
    big = cost_ops([Op(f"mlp{i}", "gemm", gemm=(8192, 8192, 8192)) for i in range(4)], cluster, groups)
    assert all(name != "host.issue" for name, _, _ in big.ops)
    assert big.compute_s > 4 * DEFAULT_KERNEL_ISSUE_S


def test_contention_is_charged_on_payload_not_on_protocol_flags():
    """A faster link can tip NCCL's tuner from LL128 or Simple to LL, which sends a flag with
    every 4 bytes: more wire bytes for the same collective.  Its contention with compute is
    charged on the payload (what was measured), so a faster link never charges more."""
    group = Group(2, 1)
    slow = build_cluster("a100-80gb", nodes=2, gpus_per_node=1)
    ib = slow.inter_node_link
    fast = slow.model_copy(update={"inter_node_link": ib.model_copy(
        update={"bw_Bps": 1.5 * ib.bw_Bps, "achievable_bw_Bps": 1.5 * ib.achievable_bw_Bps})})
    flips = 0
    for nbytes in np.geomspace(1e6, 64e6, 25):
        a, b = collective_cost("reduce_scatter", nbytes, group, slow), collective_cost("reduce_scatter", nbytes, group, fast)
        flips += a.payload_fraction != b.payload_fraction
        assert a.payload_bytes == pytest.approx(b.payload_bytes, rel=1e-9)  # (n − 1)/n of the buffer
        assert a.payload_bytes == pytest.approx(nbytes / 2, rel=1e-9)
        assert b.time_s <= a.time_s
    assert flips  # the range crosses a protocol change, or the test checks nothing


def test_attention_at_two_head_widths_counts_each_product_at_its_own():
    """Multi-head latent attention's core: QKᵀ (and dQ, dK) at the query/key width, ·V (and dV,
    dP) at the value width; with equal widths, the single-width kernel exactly."""
    from plansim.simulator.costs.compute import attention_flops, attention_time
    from plansim.simulator.hardware import load_device

    dev = load_device("h100-sxm")
    args = (1, 16, 16, 128, 4096, 4096, True)
    for phase in ("forward", "backward"):
        assert attention_time(*args, phase, dev, v_head_dim=128) == attention_time(*args, phase, dev)
    b, h, s = 1, 16, 4096
    assert attention_flops(b, h, 192, s, s, False, "forward", 128) == 2 * b * h * s * s * (192 + 128)
    assert attention_flops(b, h, 192, s, s, False, "backward", 128) == 2 * b * h * s * s * (3 * 192 + 2 * 128)
    wide = attention_time(b, h, h, 192, s, s, True, "backward", dev, v_head_dim=128)
    assert attention_time(b, h, h, 160, s, s, True, "backward", dev) < wide  # dQ, dK at 192 outweigh dV, dP at 128
