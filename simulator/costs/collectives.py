"""Collective communication cost, as NCCL runs it and nccl-tests reports it.

A collective over ``n`` ranks moves ``bus_factor(op, n) · S`` bytes through every rank's
links (S is the buffer size nccl-tests reports: the full buffer; ring algorithm; nccl-tests
``doc/PERFORMANCE.md``).  Inside a node the data crosses the NVLink/NVSwitch port of each GPU;
across nodes the ring crosses each node's NICs once per channel, so a group with ``g`` ranks
per node gets ``g`` GPUs' share of the NICs (8 rails at 25 GB/s give a DGX A100 its ~192 GB/s
multi-node busbw, NVIDIA in nccl#812).  The time is the latency term (steps × per-hop latency
plus a launch cost; trees replace the ring's ``n`` steps by ``log2`` steps across nodes) plus
the bytes over the slower of the two links.

The result is a :class:`CollectiveCost`: the event engine runs its bytes as a flow on the named
link resource (so concurrent collectives share bandwidth), the analytic estimate just adds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from plansim.simulator.hardware import Cluster

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv")
ALGORITHMS = ("auto", "ring", "tree")


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' busbw/algbw ratio: bytes each rank moves per byte of buffer."""
    if op not in OPS:
        raise ValueError(f"op: {op!r} is not one of {', '.join(OPS)}")
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


def traffic_bytes(op: str, nbytes: float, n: int) -> tuple[float, float]:
    """(bytes sent, bytes received) summed over all ranks; equal for every collective."""
    if n <= 1:
        return 0.0, 0.0
    if op in ("broadcast", "send_recv"):
        # ring pipeline: every rank but the last forwards S; every rank but the root receives S
        hops = (n - 1) if op == "broadcast" else 1
        return hops * nbytes, hops * nbytes
    per_rank = bus_factor(op, n) * nbytes
    return n * per_rank, n * per_rank


@dataclass(frozen=True)
class Group:
    """Where a communicator's ranks sit: ``size`` ranks, ``ranks_per_node`` of them per node."""

    size: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.size < 1 or self.ranks_per_node < 1 or self.ranks_per_node > self.size:
            raise ValueError(f"group: size {self.size} with {self.ranks_per_node} ranks per node is impossible")

    @property
    def nodes(self) -> int:
        return math.ceil(self.size / self.ranks_per_node)

    @classmethod
    def contiguous(cls, size: int, stride: int, gpus_per_node: int) -> "Group":
        """A group of ``size`` ranks spaced ``stride`` apart in rank order (Megatron's layout:
        tp innermost, then cp, dp, pp), with ``gpus_per_node`` GPUs per node."""
        span_in_node = max(1, gpus_per_node // stride) if stride < gpus_per_node else 1
        return cls(size=size, ranks_per_node=min(size, span_in_node))


@dataclass(frozen=True)
class CollectiveCost:
    """Latency plus bytes that must cross one link resource ("intra" or "inter") per GPU."""

    latency_s: float
    link: str  # "intra" | "inter" | "none"
    volume_bytes: float
    rate_Bps: float  # uncontended rate of that resource for this collective

    @property
    def time_s(self) -> float:
        return self.latency_s + (self.volume_bytes / self.rate_Bps if self.volume_bytes else 0.0)


def _base_latency(cluster: Cluster) -> float:
    return cluster.device.kernel_launch_s


def collective_cost(op: str, nbytes: float, group: Group, cluster: Cluster,
                    algorithm: str = "auto") -> CollectiveCost:
    """Cost of one collective of buffer size ``nbytes`` (nccl-tests' size) over ``group``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    n, g = group.size, group.ranks_per_node
    if n <= 1 or nbytes <= 0:
        return CollectiveCost(0.0, "none", 0.0, 1.0)
    intra, inter = cluster.intra_node_link, cluster.inter_node_link
    multi_node = group.nodes > 1
    if multi_node and inter is None:
        raise ValueError(f"cluster {cluster.name}: a group spans {group.nodes} nodes but the cluster has no inter-node link")
    busbytes = bus_factor(op, n) * nbytes

    if op == "send_recv":
        if multi_node:
            return CollectiveCost(_base_latency(cluster) + inter.latency_s, "inter", nbytes, cluster.nic_bw_per_gpu_Bps)
        return CollectiveCost(_base_latency(cluster) + intra.latency_s, "intra", nbytes, intra.achievable_bw_Bps)

    if op == "all_to_all":
        leaving = nbytes * (n - g) / n  # per rank, to peers on other nodes
        staying = nbytes * (g - 1) / n
        candidates = [("intra", staying, intra.achievable_bw_Bps)]
        if multi_node:
            candidates.append(("inter", leaving, cluster.nic_bw_per_gpu_Bps))
        link, volume, rate = max(candidates, key=lambda c: c[1] / c[2])
        hop = inter.latency_s if multi_node else intra.latency_s
        return CollectiveCost(_base_latency(cluster) + hop, link, volume, rate)

    steps_per_pass = 2 if op == "all_reduce" else 1
    if multi_node:
        inter_rate = g * cluster.nic_bw_per_gpu_Bps
        t_intra, t_inter = busbytes / intra.achievable_bw_Bps, busbytes / inter_rate
        link, rate, volume = ("inter", cluster.nic_bw_per_gpu_Bps, busbytes / g) if t_inter >= t_intra \
            else ("intra", intra.achievable_bw_Bps, busbytes)
        ring_latency = steps_per_pass * ((n - group.nodes) * intra.latency_s + group.nodes * inter.latency_s)
        tree_latency = steps_per_pass * (math.ceil(math.log2(group.nodes)) * inter.latency_s + (g - 1) * intra.latency_s)
    else:
        link, rate, volume = "intra", intra.achievable_bw_Bps, busbytes
        ring_latency = steps_per_pass * (n - 1) * intra.latency_s
        tree_latency = steps_per_pass * math.ceil(math.log2(n)) * intra.latency_s
    if op != "all_reduce" or algorithm == "ring":
        latency = ring_latency  # NCCL runs all-gather / reduce-scatter / broadcast as rings
    elif algorithm == "tree":
        latency = tree_latency
    else:
        latency = min(ring_latency, tree_latency)
    return CollectiveCost(_base_latency(cluster) + latency, link, volume, rate)


def collective_time(op: str, nbytes: float, group: Group, cluster: Cluster, algorithm: str = "auto") -> float:
    """Seconds for one uncontended collective."""
    return collective_cost(op, nbytes, group, cluster, algorithm).time_s


def nccl_tests_bandwidths(op: str, nbytes: float, n: int, time_s: float) -> tuple[float, float]:
    """(algbw, busbw) in bytes/s exactly as nccl-tests computes them."""
    algbw = nbytes / time_s
    factor = bus_factor(op, n) if op not in ("broadcast", "send_recv") else 1.0
    return algbw, algbw * factor
