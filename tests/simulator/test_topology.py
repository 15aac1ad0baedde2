import networkx as nx
import pytest
from hypothesis import given, settings, strategies as st

from plansim.simulator.hardware import build_cluster
from plansim.simulator.topology import (bisection_bw_Bps, build_topology, group_layout, path_bw_Bps,
                                        path_latency_s, route)

CASES = [
    dict(hardware="h100-sxm"),
    dict(hardware="mi300x"),
    dict(hardware="ascend-910b", nodes=3),
    dict(hardware="a100-80gb", nodes=40),          # fat tree, several leaves
    dict(hardware="h100-sxm", nodes=40),           # rail-optimized, several leaves per rail
    dict(hardware="h100-sxm", nodes=2, nics_per_node=4),
    dict(hardware="intel-lunar-lake-npu"),
]


@pytest.mark.parametrize("kw", CASES)
def test_every_gpu_reachable(kw):
    c = build_cluster(**kw)
    g = build_topology(c)
    assert nx.is_connected(g)
    gpus = [n for n, d in g.nodes(data=True) if d["kind"] == "gpu"]
    assert sorted(gpus) == list(range(c.num_gpus))
    for _, _, d in g.edges(data=True):
        assert d["bw_Bps"] > 0 and d["achievable_bw_Bps"] <= d["bw_Bps"] and d["latency_s"] > 0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 319), st.integers(0, 319))
def test_route_symmetric(a, b):
    c = build_cluster(hardware="h100-sxm", nodes=40)
    g = build_topology(c)
    fwd, back = route(g, a, b), route(g, b, a)
    assert fwd == [(v, u) for u, v in reversed(back)]
    if a != b:
        assert fwd[0][0] == a and fwd[-1][1] == b
        for u, v in fwd:
            assert g.has_edge(u, v)


def test_routes_intra_and_inter_node():
    c = build_cluster(hardware="h100-sxm", nodes=2)
    g = build_topology(c)
    intra = route(g, 0, 7)
    assert len(intra) == 2 and path_bw_Bps(g, intra) == pytest.approx(370e9)
    inter = route(g, 0, 8)  # same rail: GPU, NIC, rail leaf, NIC, GPU
    assert len(inter) == 4
    assert path_bw_Bps(g, inter) == pytest.approx(48e9)
    assert path_latency_s(g, inter) > path_latency_s(g, intra)
    mesh = build_topology(build_cluster(hardware="mi300x"))
    assert len(route(mesh, 0, 5)) == 1
    assert path_bw_Bps(mesh, route(mesh, 0, 5), achievable=False) == pytest.approx(64e9)


def test_bisection():
    one = build_cluster(hardware="h100-sxm")
    assert bisection_bw_Bps(build_topology(one), one) == pytest.approx(4 * 450e9)
    mesh = build_cluster(hardware="mi300x")
    assert bisection_bw_Bps(build_topology(mesh), mesh) == pytest.approx(16 * 64e9)
    for hardware in ["h100-sxm", "a100-80gb"]:  # rail-optimized and fat tree, non-blocking
        c = build_cluster(hardware=hardware, nodes=40)
        expected = 20 * c.nics_per_node * c.inter_node_link.bw_Bps
        assert bisection_bw_Bps(build_topology(c), c) == pytest.approx(expected)
    c = build_cluster(hardware="h100-sxm", nodes=4, nics_per_node=4)
    assert bisection_bw_Bps(build_topology(c), c) == pytest.approx(2 * 4 * 50e9)


def test_group_layout():
    c = build_cluster(hardware="h100-sxm", nodes=4)
    assert group_layout(c, list(range(8))) == (8, 1)
    assert group_layout(c, [0, 8, 16, 24]) == (1, 4)
    assert group_layout(c, list(range(4, 12))) == (4, 2)
    with pytest.raises(ValueError):
        group_layout(c, [32])
    with pytest.raises(ValueError):
        group_layout(c, [])


def test_large_cluster_is_compact():
    c = build_cluster(hardware="h100-sxm", nodes=2048)  # 16,384 GPUs
    g = build_topology(c)
    assert g.number_of_nodes() < 60_000 and g.number_of_edges() < 120_000
