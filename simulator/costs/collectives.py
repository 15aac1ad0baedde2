"""Collective communication cost, as NCCL runs it and nccl-tests reports it.

A collective over ``n`` ranks moves ``bus_factor(op, n) · S`` bytes through every rank's
links (S is the buffer size nccl-tests reports: the full buffer; ring algorithm; nccl-tests
``doc/PERFORMANCE.md``).  Inside a node the data crosses the NVLink/NVSwitch port of each GPU;
across nodes the ring crosses each node's NICs once per channel, so a group with ``g`` ranks
per node gets ``g`` GPUs' share of the NICs (8 rails at 25 GB/s give a DGX A100 its ~192 GB/s
multi-node busbw, NVIDIA in nccl#812).  The time is the latency term (NCCL's base latency
plus steps × per-hop latency of the protocol; trees replace the ring's ``n`` steps by ``log2``
steps across nodes) plus the bytes over the slower of the two links at the protocol's wire
efficiency; like NCCL's tuner, the fastest algorithm and protocol for the size is taken.

The result is a :class:`CollectiveCost`: the event engine runs its bytes as a flow on the named
link resource (so concurrent collectives share bandwidth), the analytic estimate just adds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
    if op == "ring_exchange":  # every rank's block of ``nbytes`` visits the n − 1 others
        return n * (n - 1) * nbytes, n * (n - 1) * nbytes
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
    volume_bytes: float  # on the wire: the data plus the protocol's flags (LL doubles it)
    rate_Bps: float  # uncontended rate of that resource for this collective
    payload_fraction: float = 1.0  # the collective's own bytes per wire byte
    floor_s: float = 0.0  # the host's cost of issuing the call(s): the GPU work runs under it, not after it

    @property
    def payload_bytes(self) -> float:
        """The bytes nccl-tests counts (wire bytes less the protocol's overhead): what the
        contention with compute is charged on, as it was measured (large collectives, Simple
        protocol), so that a faster link choosing the LL protocol does not charge its flags."""
        return self.volume_bytes * self.payload_fraction

    def scaled(self, share: float, latency_s: float | None = None, floor_s: float | None = None) -> CollectiveCost:
        """``share`` of the bytes (and, unless given, of the latency and the host floor) on the
        same link and rate."""
        return replace(self, latency_s=self.latency_s * share if latency_s is None else latency_s,
                       floor_s=self.floor_s * share if floor_s is None else floor_s,
                       volume_bytes=self.volume_bytes * share)

    @property
    def time_s(self) -> float:
        return max(self.floor_s, self.latency_s + (self.volume_bytes / self.rate_Bps if self.volume_bytes else 0.0))


#: NCCL protocols: base latency (s), per-hop latency relative to the link's LL hop latency by
#: link class, and the fraction of link bandwidth the protocol's wire format carries.
#: From NCCL ``src/graph/tuning.cc`` (baseLat; hwLat for NVLink 0.6 / 1.9 / 3.4 µs, PCI
#: 1.0 / 1.9 / 5.7 µs, network 5.0 / 8.7 / 14 µs per hop for LL / LL128 / Simple); LL sends a
#: 4-byte flag with every 4 bytes of data, LL128 one 8-byte flag per 128-byte line.
PROTOCOLS = {
    "LL": {"base_s": 6.6e-6, "hop": {"nvlink": 1.0, "pcie": 1.0, "net": 1.0}, "efficiency": 0.5},
    "LL128": {"base_s": 14.0e-6, "hop": {"nvlink": 1.9 / 0.6, "pcie": 1.9, "net": 8.7 / 5.0}, "efficiency": 120 / 128},
    "Simple": {"base_s": 8.4e-6, "hop": {"nvlink": 3.4 / 0.6, "pcie": 5.7, "net": 14.0 / 5.0}, "efficiency": 1.0},
}
_NET_KINDS = ("infiniband", "roce", "ethernet")


def _hop_class(link) -> str:
    if link.kind in _NET_KINDS:
        return "net"
    return "pcie" if link.kind == "pcie" else "nvlink"


def _best_protocol(volume: float, rate: float, hops: list[tuple[object, int]]) -> CollectiveCost | tuple:
    """(latency, efficiency) of the protocol NCCL's tuner would pick: the fastest for this size."""
    best = None
    for proto in PROTOCOLS.values():
        latency = proto["base_s"] + sum(n * link.latency_s * proto["hop"][_hop_class(link)] for link, n in hops)
        time = latency + volume / (rate * proto["efficiency"])
        if best is None or time < best[0]:
            best = (time, latency, proto["efficiency"])
    return best[1], best[2]


def collective_cost(op: str, nbytes: float, group: Group, cluster: Cluster,
                    algorithm: str = "auto") -> CollectiveCost:
    """Cost of one collective of buffer size ``nbytes`` (nccl-tests' size) over ``group``.

    The bytes cross the slower of the NVLink port and the NIC share, at the link's measured
    per-collective efficiency (``Link.op_efficiency``: e.g. all-gather kernels move fewer
    bytes per second than all-reduce ones), for rings inside a node at the busbw measured for
    that many ranks (``Link.ring_fraction``), and with its measured per-collective latency
    (``Link.op_latency_s``, on top of NCCL's); the latency is NCCL's for the chosen algorithm
    (ring; tree for all-reduce across nodes when faster) and protocol (LL, LL128 or Simple,
    whichever is fastest at this size), never below the host's cost of issuing the call.
    """
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
    ring_share = 1.0  # rings inside a node reach the link's busbw for their g ranks there

    if op == "send_recv":
        link, volume, rate = ("inter", nbytes, cluster.nic_bw_per_gpu_Bps) if multi_node \
            else ("intra", nbytes, intra.achievable_bw_Bps)
        candidates = [[(inter if multi_node else intra, 1)]]
    elif op == "all_to_all":
        leaving = nbytes * (n - g) / n  # per rank, to peers on other nodes
        staying = nbytes * (g - 1) / n
        options = [("intra", staying, intra.achievable_bw_Bps)]
        if multi_node:
            options.append(("inter", leaving, cluster.nic_bw_per_gpu_Bps))
        link, volume, rate = max(options, key=lambda c: c[1] / c[2])
        candidates = [[(inter if multi_node else intra, 1)]]
    else:
        steps = 2 if op == "all_reduce" else 1
        ring_share = intra.ring_fraction(g)
        intra_rate = intra.achievable_bw_Bps * ring_share
        if multi_node:
            inter_rate = g * cluster.nic_bw_per_gpu_Bps
            t_intra, t_inter = busbytes / intra_rate, busbytes / inter_rate
            link, rate, volume = ("inter", cluster.nic_bw_per_gpu_Bps, busbytes / g) if t_inter >= t_intra \
                else ("intra", intra.achievable_bw_Bps, busbytes)
            ring = [(intra, steps * (n - group.nodes)), (inter, steps * group.nodes)]
            tree = [(inter, steps * math.ceil(math.log2(group.nodes))), (intra, steps * (g - 1))]
        else:
            link, rate, volume = "intra", intra.achievable_bw_Bps, busbytes
            ring = [(intra, steps * (n - 1))]
            tree = [(intra, steps * math.ceil(math.log2(n)))]
        if op != "all_reduce" or algorithm == "ring":
            candidates = [ring]  # NCCL runs all-gather / reduce-scatter / broadcast as rings
        elif algorithm == "tree":
            candidates = [tree]
        else:
            candidates = [ring, tree]
    link_obj = inter if link == "inter" else intra
    op_eff = (link_obj.op_efficiency or {}).get(op, 1.0)
    if link == "intra":
        op_eff *= ring_share
    op_lat = (link_obj.op_latency_s or {}).get(op, 0.0)
    best = None
    for hops in candidates:
        latency, efficiency = _best_protocol(volume, rate * op_eff, hops)
        cost = CollectiveCost(latency + op_lat, link, volume / (efficiency * op_eff), rate,
                              payload_fraction=efficiency * op_eff)
        if best is None or cost.time_s < best.time_s:
            best = cost
    # back-to-back calls cannot finish faster than the host issues them (PyTorch c10d and
    # NCCL enqueue, once per NCCL call; a send/recv pair is two): the GPU work hides under it
    floor = (cluster.device.collective_launch_s or 0.0) * (2 if op == "send_recv" else 1)
    return replace(best, floor_s=floor) if floor else best


def collective_time(op: str, nbytes: float, group: Group, cluster: Cluster, algorithm: str = "auto") -> float:
    """Seconds for one uncontended collective."""
    return collective_cost(op, nbytes, group, cluster, algorithm).time_s


def nccl_tests_bandwidths(op: str, nbytes: float, n: int, time_s: float) -> tuple[float, float]:
    """(algbw, busbw) in bytes/s exactly as nccl-tests computes them."""
    algbw = nbytes / time_s
    factor = bus_factor(op, n) if op not in ("broadcast", "send_recv") else 1.0
    return algbw, algbw * factor
