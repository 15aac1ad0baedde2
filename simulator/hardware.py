"""Hardware descriptions: devices, links, hosts, storage tiers and clusters.

Profiles are YAML files under ``hardware_profiles/`` (one item per file) whose numbers are
written in human units with a source for each; they are parsed once into these frozen
pydantic models, whose fields are SI.  Peak (datasheet) and achievable (measured) figures
are separate fields: cost models use the achievable ones, MFU uses the peak.
"""
from __future__ import annotations

from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

DTYPES = ("fp8", "bf16", "fp16", "tf32", "fp32")


class _Profile(BaseModel):
    """Common base: frozen, no unknown keys, a source for every number."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    sources: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _every_number_has_a_source(self):
        missing = [
            f for f, info in type(self).model_fields.items()
            if f not in ("sources",) and isinstance(getattr(self, f), (int, float, dict))
            and not isinstance(getattr(self, f), bool) and getattr(self, f) not in ({},)
            and f not in self.sources and "*" not in self.sources
        ]
        if missing:
            raise ValueError(f"sources: no source given for {', '.join(sorted(missing))}")
        return self


class Device(_Profile):
    """An accelerator (GPU or NPU)."""

    kind: Literal["gpu", "npu"] = "gpu"
    vendor: str
    peak_flops: dict[str, PositiveFloat]  # dtype -> dense FLOP/s (datasheet, no sparsity)
    hbm_bytes: PositiveFloat
    hbm_bw_Bps: PositiveFloat  # datasheet
    achievable_hbm_bw_Bps: PositiveFloat  # large device-to-device copy, read+write counted
    achievable_gemm_fraction: float = Field(gt=0, le=1)  # best large bf16 GEMM / peak
    compute_units: PositiveInt  # SMs (NVIDIA), CUs (AMD), AI cores (Ascend)
    gemm_tile_m: PositiveInt = 128
    gemm_tile_n: PositiveInt = 128
    l2_bytes: PositiveFloat
    kernel_launch_s: PositiveFloat  # fixed cost per kernel seen by an eager framework
    attention_fraction: float = Field(gt=0, le=1)  # flash-attention fwd FLOP rate / peak
    price_per_hour_usd: PositiveFloat | None = None

    @model_validator(mode="after")
    def _check_dtypes(self):
        unknown = set(self.peak_flops) - set(DTYPES)
        if unknown:
            raise ValueError(f"peak_flops: unknown dtype {sorted(unknown)}; allowed: {', '.join(DTYPES)}")
        if "bf16" not in self.peak_flops:
            raise ValueError("peak_flops: bf16 is required (MFU is defined against it)")
        if self.achievable_hbm_bw_Bps > self.hbm_bw_Bps:
            raise ValueError("achievable_hbm_bw_Bps: larger than the datasheet hbm_bw_Bps")
        return self

    def flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; tf32 falls back to fp32 where a device has none."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        fallback = {"fp8": "bf16", "tf32": "fp32", "fp16": "bf16"}.get(dtype)
        if fallback and fallback in self.peak_flops:
            return self.peak_flops[fallback]
        raise KeyError(f"dtype: {dtype!r} not supported by {self.name}; allowed: {', '.join(self.peak_flops)}")


class Link(_Profile):
    """A link class: NVLink/NVSwitch port, PCIe, InfiniBand or Ethernet NIC, HCCS, Infinity Fabric.

    ``bw_Bps`` is one direction of one endpoint's attachment (per GPU for NVLink, per NIC for
    networks); ``achievable_bw_Bps`` what a large collective's bus bandwidth reaches on it.
    """

    kind: Literal["nvlink", "infinity-fabric", "hccs", "pcie", "infiniband", "roce", "ethernet", "cxl"]
    bw_Bps: PositiveFloat
    achievable_bw_Bps: PositiveFloat
    latency_s: PositiveFloat  # per hop, as NCCL-style collectives see it
    switched: bool = True  # all-to-all reachable through a switch (NVSwitch, IB fabric)

    @model_validator(mode="after")
    def _achievable_below_peak(self):
        if self.achievable_bw_Bps > self.bw_Bps:
            raise ValueError("achievable_bw_Bps: larger than the peak bw_Bps")
        return self


class Host(_Profile):
    """The CPU side of a node."""

    cpu_cores: PositiveInt
    dram_bytes: PositiveFloat
    dram_bw_Bps: PositiveFloat
    cpu_adam_params_per_s: PositiveFloat  # CPU AdamW throughput, all cores (ZeRO-Offload)


class Storage(_Profile):
    """A memory or storage tier below HBM: NVMe SSD or CXL memory expander."""

    kind: Literal["nvme", "cxl"]
    capacity_bytes: PositiveFloat
    read_bw_Bps: PositiveFloat
    write_bw_Bps: PositiveFloat
    latency_s: PositiveFloat


class ClusterSpec(_Profile):
    """How devices, links, hosts and storage compose into a cluster (names refer to profiles)."""

    device: str
    nodes: PositiveInt = 1
    gpus_per_node: PositiveInt = 8
    intra_node_link: str  # GPU-GPU inside a node
    inter_node_link: str | None = None  # NIC class
    nics_per_node: PositiveInt = 8
    host: str
    host_link: str  # GPU <-> host (PCIe)
    storage: list[str] = Field(default_factory=list)
    topology: Literal["single-node", "fat-tree", "rail-optimized", "torus"] = "fat-tree"


class Cluster(BaseModel):
    """A resolved cluster: the spec with its profiles looked up.  Immutable."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    device: Device
    nodes: PositiveInt
    gpus_per_node: PositiveInt
    intra_node_link: Link
    inter_node_link: Link | None
    nics_per_node: PositiveInt
    host: Host
    host_link: Link
    storage: tuple[Storage, ...] = ()
    topology: str = "fat-tree"

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @cached_property
    def nic_bw_per_gpu_Bps(self) -> float:
        """Achievable inter-node bandwidth available to one GPU (its share of the node's NICs)."""
        if self.inter_node_link is None:
            return 0.0
        return self.inter_node_link.achievable_bw_Bps * self.nics_per_node / self.gpus_per_node
