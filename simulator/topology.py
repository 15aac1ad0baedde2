"""A cluster as a networkx graph: GPUs, intra-node switches or meshes, NICs and network switches.

Compact by design: a switch is one graph node (not one per port), and a network tier that a
fat tree makes non-blocking (the spines) is one aggregated ``core`` node whose edges carry the
tier's summed bandwidth, so a 16k-GPU cluster stays a few tens of thousands of edges.

Graph nodes: GPUs are their global rank (``int``); everything else is a string —
``"n{node}/nvswitch"``, ``"n{node}/nic{k}"``, ``"leaf{j}"`` (fat tree) or ``"rail{k}/leaf{j}"``
(rail-optimized), ``"core"``.  Every edge has ``bw_Bps`` and ``achievable_bw_Bps`` (one
direction, the edge can carry that much each way), ``latency_s`` and ``link`` (the profile name).

Layouts (as in NVIDIA's DGX SuperPOD reference architectures):
- single node: GPUs to one intra-node switch (NVSwitch), or a full mesh of peer links where the
  intra-node link is not switched (MI300X Infinity Fabric, Ascend HCCS);
- fat-tree: every NIC of every node goes to a leaf switch (nodes filled in order, switch_radix/2
  down-ports per leaf), leaves to the core;
- rail-optimized: NIC k of every node goes to rail k's leaf, so same-rail traffic crosses one
  switch; rails meet in the core.
GPU g of a node uses NIC g * nics_per_node // gpus_per_node through the host link (PCIe).
"""
from __future__ import annotations

from collections import Counter
from functools import lru_cache

import networkx as nx

from plansim.simulator.hardware import Cluster, Link


def _edge(link: Link, count: float = 1.0, per_port: bool = False) -> dict:
    bw = link.per_port_bw_Bps if per_port else link.bw_Bps
    ach = link.per_port_achievable_bw_Bps if per_port else link.achievable_bw_Bps
    return {"bw_Bps": bw * count, "achievable_bw_Bps": ach * count, "latency_s": link.latency_s,
            "link": link.name, "kind": link.kind}


def _add_node_interior(g: nx.Graph, cluster: Cluster, node: int) -> None:
    gpn = cluster.gpus_per_node
    link = cluster.intra_node_link
    first = node * gpn
    for r in range(first, first + gpn):
        g.add_node(r, kind="gpu", node=node)
    if gpn == 1:
        return
    if link.switched:
        sw = f"n{node}/nvswitch"
        g.add_node(sw, kind="switch", node=node)
        for r in range(first, first + gpn):
            g.add_edge(r, sw, **_edge(link))
    else:
        for a in range(first, first + gpn):
            for b in range(a + 1, first + gpn):
                g.add_edge(a, b, **_edge(link, per_port=True))


def _leaf_name(cluster: Cluster, node: int, nic: int) -> str:
    per_leaf = max(1, cluster.switch_radix // 2)
    if cluster.topology == "rail-optimized":
        return f"rail{nic}/leaf{node // per_leaf}"
    return f"leaf{(node * cluster.nics_per_node + nic) // per_leaf}"


@lru_cache(maxsize=32)
def build_topology(cluster: Cluster) -> nx.Graph:
    """The cluster's graph (cached per cluster; treat it as read-only)."""
    g = nx.Graph(name=cluster.name, topology=cluster.topology)
    for node in range(cluster.nodes):
        _add_node_interior(g, cluster, node)
    net = cluster.inter_node_link
    if cluster.nodes == 1 or net is None:
        return g
    if cluster.topology == "torus":
        raise NotImplementedError("topology: torus is not modelled yet; allowed: single-node, "
                                  "fat-tree, rail-optimized")
    gpn, nics = cluster.gpus_per_node, cluster.nics_per_node
    down = Counter()
    for node in range(cluster.nodes):
        for k in range(nics):
            nic = f"n{node}/nic{k}"
            g.add_node(nic, kind="nic", node=node)
            leaf = _leaf_name(cluster, node, k)
            g.add_node(leaf, kind="switch")
            g.add_edge(nic, leaf, **_edge(net))
            down[leaf] += 1
        for local in range(gpn):
            g.add_edge(node * gpn + local, f"n{node}/nic{local * nics // gpn}", **_edge(cluster.host_link))
    if len(down) > 1:
        g.add_node("core", kind="switch")
        for leaf, n_down in down.items():  # uplinks match downlinks unless oversubscribed
            g.add_edge(leaf, "core", **_edge(net, count=n_down / cluster.oversubscription))
    return g


def route(graph: nx.Graph, src_gpu: int, dst_gpu: int) -> list[tuple]:
    """Edges ``(u, v)`` of the lowest-latency path from ``src_gpu`` to ``dst_gpu``.

    Ties are broken the same way in both directions: the route from b to a is the route
    from a to b reversed.
    """
    if src_gpu == dst_gpu:
        return []
    if src_gpu > dst_gpu:
        return [(v, u) for u, v in reversed(route(graph, dst_gpu, src_gpu))]
    path = nx.shortest_path(graph, src_gpu, dst_gpu, weight="latency_s")
    return list(zip(path[:-1], path[1:]))


def path_bw_Bps(graph: nx.Graph, edges: list[tuple], achievable: bool = True) -> float:
    """Bottleneck bandwidth of a route (one flow alone on it)."""
    key = "achievable_bw_Bps" if achievable else "bw_Bps"
    return min((graph.edges[e][key] for e in edges), default=float("inf"))


def path_latency_s(graph: nx.Graph, edges: list[tuple]) -> float:
    return sum(graph.edges[e]["latency_s"] for e in edges)


def group_layout(cluster: Cluster, ranks: list[int]) -> tuple[int, int]:
    """``(ranks_per_node, nodes_spanned)`` of a communicator group of global GPU ranks.

    ``ranks_per_node`` is the largest number of the group's ranks on one node (a collective
    runs at the pace of its busiest node); ``nodes_spanned`` the number of distinct nodes.
    A group with ``nodes_spanned == 1`` stays on the intra-node link.
    """
    if not ranks:
        raise ValueError("ranks: empty communicator group")
    bad = [r for r in ranks if not 0 <= r < cluster.num_gpus]
    if bad:
        raise ValueError(f"ranks: {bad[:5]} outside 0..{cluster.num_gpus - 1}")
    per_node = Counter(r // cluster.gpus_per_node for r in ranks)
    return max(per_node.values()), len(per_node)


def bisection_bw_Bps(graph: nx.Graph, cluster: Cluster, achievable: bool = False) -> float:
    """Max-flow between the first and the second half of the GPUs (by rank), one direction.

    Splits at a node boundary when there are several nodes, so it measures the network; on one
    node it measures the intra-node fabric.
    """
    n = cluster.num_gpus
    if n < 2:
        return 0.0
    if cluster.nodes > 1:
        half = (cluster.nodes // 2) * cluster.gpus_per_node
    else:
        half = n // 2
    key = "achievable_bw_Bps" if achievable else "bw_Bps"
    flow = nx.DiGraph()
    for u, v, data in graph.edges(data=True):
        flow.add_edge(u, v, capacity=data[key])
        flow.add_edge(v, u, capacity=data[key])
    for r in range(n):
        if r < half:
            flow.add_edge("_src", r, capacity=float("inf"))
        else:
            flow.add_edge(r, "_dst", capacity=float("inf"))
    return nx.maximum_flow_value(flow, "_src", "_dst")
