"""Hardware descriptions: devices, links, hosts, storage tiers and clusters.

Profiles are YAML files under ``hardware_profiles/`` (one item per file) whose numbers are
written in human units with a source for each; they are parsed once into these frozen
pydantic models, whose fields are SI.  Peak (datasheet) and achievable (measured) figures
are separate fields: cost models use the achievable ones, MFU uses the peak.

YAML keys are the field names without their unit suffix (``hbm_bw: 3.35 TB/s`` fills
``hbm_bw_Bps``; ``hbm: 80 GiB`` fills ``hbm_bytes``; ``latency: 0.6 us`` fills ``latency_s``);
the full field name is accepted too.  ``sources`` maps each given number (by either name)
to its citation.  A bad file raises :class:`ProfileError` with one line naming the file and
the field.
"""
from __future__ import annotations

import math
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError,
                      model_validator)

from plansim.simulator.units import UnitError, parse_quantity

DTYPES = ("fp8", "bf16", "fp16", "tf32", "fp32")

#: field-name suffix -> (unit kind for parse_quantity, YAML key suffix to strip)
_SUFFIX_UNITS = (("_Bps", "bytes_per_s"), ("_bytes", "bytes"), ("_s", "seconds"))


class ProfileError(ValueError):
    """A hardware profile that is missing, unknown or invalid; the message is one line."""


def _short_key(field: str) -> str:
    """YAML key for a field: the field name without its unit suffix (hbm_bw_Bps -> hbm_bw)."""
    for suffix, _ in _SUFFIX_UNITS:
        if field.endswith(suffix) and field != suffix.lstrip("_") and not field.endswith("_per_s"):
            return field[: -len(suffix)]
    return field


def _unit_kind(field: str) -> str | None:
    if field.endswith("_per_s"):  # counts per second (cpu_adam_params_per_s): plain numbers
        return None
    for suffix, kind in _SUFFIX_UNITS:
        if field.endswith(suffix):
            return kind
    return "flops" if field == "peak_flops" else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Profile(BaseModel):
    """Common base: frozen, no unknown keys, human units parsed, a source for every number."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    sources: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _parse_human_units(cls, data: Any) -> Any:
        """Map YAML keys to fields and convert '3.35 TB/s'-style strings to SI numbers."""
        if not isinstance(data, dict):
            return data
        by_short = {_short_key(f): f for f in cls.model_fields}
        out: dict[str, Any] = {}
        for key, value in data.items():
            field = key if key in cls.model_fields else by_short.get(key)
            if field is None:
                raise ValueError(f"{key}: unknown field; allowed: {', '.join(sorted(by_short))}")
            kind = _unit_kind(field)
            try:
                if kind is not None and isinstance(value, dict):
                    value = {k: parse_quantity(v, kind) for k, v in value.items()}
                elif kind is not None and value is not None and not isinstance(value, (list, tuple)):
                    value = parse_quantity(value, kind)
                elif kind is None and isinstance(value, str) and field.endswith("_per_s"):
                    value = float(value)
            except (UnitError, ValueError) as exc:
                raise ValueError(f"{key}: {exc}") from None
            numbers = value.values() if isinstance(value, dict) else [value]
            for n in numbers:
                if _is_number(n) and not (n > 0 and math.isfinite(n)):
                    raise ValueError(f"{key}: must be positive, got {n:g}")
            out[field] = value
        return out

    @model_validator(mode="after")
    def _every_number_has_a_source(self):
        """Each number written in the file (not a default) needs a citation in ``sources``."""
        cited = set(self.sources)
        missing = []
        for field in sorted(self.model_fields_set - {"sources"}):
            value = getattr(self, field)
            if isinstance(value, dict):
                numeric = any(_is_number(v) for v in value.values())
                covered = field in cited or _short_key(field) in cited or all(
                    f"{field}.{k}" in cited for k in value)
            else:
                numeric = _is_number(value)
                covered = field in cited or _short_key(field) in cited
            if numeric and not covered:
                missing.append(_short_key(field))
        if missing:
            raise ValueError(f"sources: no source given for {', '.join(missing)}")
        return self

    @cached_property
    def profile_key(self) -> str:
        """Canonical JSON of the profile: its identity for hashing and caching."""
        return self.model_dump_json()

    def __hash__(self) -> int:  # dict fields (peak_flops, sources) are not hashable as such
        return hash((type(self).__name__, self.profile_key))


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
    # shape-efficiency parameters of the cost models (simulator/costs/compute.py); None: the
    # model's default.  Calibrated profiles (hardware_profiles/calibrated/) set them.
    gemm_k_overhead: PositiveFloat | None = None  # K elements' worth of per-tile fixed work
    attention_bwd_ratio: PositiveFloat | None = None  # backward / forward attention FLOP rate
    attention_fwd_cta_overhead: PositiveFloat | None = None  # key columns' worth of fixed work per forward CTA
    attention_bwd_cta_overhead: PositiveFloat | None = None  # query rows' worth of fixed work per backward CTA
    attention_head_dim_half: PositiveFloat | None = None  # head dim at which tiles reach half their rate
    # backward kernels beyond head dim 128 run smaller tiles: their rate falls as (128 / d) ** this
    attention_bwd_wide_exponent: float | None = Field(default=None, ge=0)
    unaligned_gemm_fraction: float | None = Field(default=None, gt=0, le=1)  # K or N not 16-byte aligned
    fp8_gemm_fraction: float | None = Field(default=None, gt=0, le=1)  # fp8 GEMM's share of its peak / bf16's
    fp8_split_accumulate_ratio: float | None = Field(default=None, gt=0, le=1)  # fp8 GEMM promoting sums / fast
    cudnn_attention: dict[str, PositiveFloat] | None = None  # cuDNN fused attention's own attention_* parameters
    norm_bandwidth_fraction: float | None = Field(default=None, gt=0, le=1)  # norm kernels vs streaming ops
    collective_launch_s: float | None = Field(default=None, ge=0)  # host cost of issuing one NCCL call
    kernel_issue_s: float | None = Field(default=None, gt=0)  # host cost of issuing one eager kernel
    overlap_contention: float | None = Field(default=None, ge=0, le=1)  # hidden collective's time that still shows
    # the power-limited clock (simulator/costs/power.py), watts above idle at the maximum clock;
    # None: the device is not throttled
    power_limit_w: PositiveFloat | None = None  # board power limit (datasheet TDP), held on average
    max_power_limit_w: PositiveFloat | None = None  # highest limit an operator may set, where the default is lower
    burst_power_w: PositiveFloat | None = None  # what a short burst of tensor work is held to
    idle_power_w: PositiveFloat | None = None  # drawn with nothing running
    tensor_power_w: PositiveFloat | None = None  # a large GEMM's draw
    memory_power_w: PositiveFloat | None = None  # an HBM-bound kernel's draw
    power_clock_exponent: float | None = Field(default=None, gt=0)  # draw ∝ clock^γ
    tensor_static_fraction: float | None = Field(default=None, ge=0, le=1)  # tensor draw whatever the FLOP rate
    price_per_hour_usd: PositiveFloat | None = None
    default_cluster: str | None = None  # cluster profile used when only the device is named
    same_die_as: str | None = None  # a device with this die and clocks, whose calibrated kernel rates apply

    @model_validator(mode="after")
    def _check_dtypes(self):
        unknown = set(self.peak_flops) - set(DTYPES)
        if unknown:
            raise ValueError(f"peak_flops: unknown dtype {sorted(unknown)}; allowed: {', '.join(DTYPES)}")
        if "bf16" not in self.peak_flops:
            raise ValueError("peak_flops: bf16 is required (MFU is defined against it)")
        if self.achievable_hbm_bw_Bps > self.hbm_bw_Bps:
            raise ValueError("achievable_hbm_bw: larger than the datasheet hbm_bw")
        if self.idle_power_w is not None:
            for name in ("power_limit_w", "burst_power_w"):
                value = getattr(self, name)
                if value is not None and value <= self.idle_power_w:
                    raise ValueError(f"{name}: {value} W must exceed idle_power_w ({self.idle_power_w} W)")
        if self.max_power_limit_w is not None and (self.power_limit_w is None
                                                   or self.max_power_limit_w < self.power_limit_w):
            raise ValueError("max_power_limit_w: needs a power_limit_w no larger than it")
        return self

    def flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; tf32 falls back to fp32 and fp16 to bf16 where a device
        lists only the one (no fp8 fallback: a GPU without fp8 tensor cores cannot run fp8 GEMMs)."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        fallback = {"tf32": "fp32", "fp16": "bf16"}.get(dtype)
        if fallback and fallback in self.peak_flops:
            return self.peak_flops[fallback]
        # a ProfileError (not KeyError) so that `plansim op --dtype` reports it as bad input, exit 2
        raise ProfileError(f"dtype: {dtype!r} not supported by {self.name}; allowed: {', '.join(self.peak_flops)}")


class Link(_Profile):
    """A link class: NVLink/NVSwitch port, PCIe, InfiniBand or Ethernet NIC, HCCS, Infinity Fabric.

    ``bw_Bps`` is one direction of one endpoint's attachment (per GPU for NVLink, summed over
    its ``ports``; per NIC for networks); ``achievable_bw_Bps`` what a large transfer or
    collective's bus bandwidth reaches on it.  Where ``switched`` is false (a point-to-point
    mesh such as MI300X Infinity Fabric or Ascend HCCS) each of the ``ports`` peer links
    carries ``bw_Bps / ports``.
    """

    kind: Literal["nvlink", "infinity-fabric", "hccs", "pcie", "infiniband", "roce", "ethernet",
                  "cxl", "soc"]
    bw_Bps: PositiveFloat
    achievable_bw_Bps: PositiveFloat
    latency_s: PositiveFloat  # per hop, as NCCL-style collectives see it
    switched: bool = True  # all-to-all reachable through a switch (NVSwitch, IB fabric)
    ports: PositiveInt = 1  # peer links per endpoint (meaningful for meshes)
    pageable_fraction: float | None = Field(default=None, gt=0, le=1)  # pageable / pinned rate, host to device
    pageable_d2h_fraction: float | None = Field(default=None, gt=0, le=1)  # the same, device to host
    op_efficiency: dict[str, float] | None = None  # per-collective busbw relative to all-reduce's
    op_latency_s: dict[str, float] | None = None  # per-collective latency beyond NCCL's protocol model
    #: ring bus bandwidth with n ranks on the link, relative to ``achievable_bw_Bps`` (which is
    #: the bandwidth at the largest n given); measured, since NCCL's rings on NVSwitch reach less
    #: with fewer ranks (H100: 329, 355, 361 GB/s all-reduce busbw at 2, 4, 8 GPUs)
    ring_busbw_by_ranks: dict[int, float] | None = None

    @model_validator(mode="after")
    def _achievable_below_peak(self):
        if self.achievable_bw_Bps > self.bw_Bps:
            raise ValueError("achievable_bw: larger than the peak bw")
        if self.ring_busbw_by_ranks and (min(self.ring_busbw_by_ranks) < 2
                                          or not all(0 < f <= 1 for f in self.ring_busbw_by_ranks.values())):
            raise ValueError("ring_busbw_by_ranks: keys must be rank counts >= 2, values fractions in (0, 1]")
        return self

    def ring_fraction(self, ranks: int) -> float:
        """``ring_busbw_by_ranks`` at ``ranks``: linear in 1/ranks between the measured counts
        (busbw approaches its limit as 1/n shrinks), the nearest measured count outside them."""
        table = self.ring_busbw_by_ranks
        if not table or ranks < 2:
            return 1.0
        xs = sorted(table)
        if ranks in table or ranks < xs[0] or ranks > xs[-1]:
            return table[min(max(ranks, xs[0]), xs[-1])]
        hi = next(x for x in xs if x > ranks)
        lo = max(x for x in xs if x < ranks)
        w = (1 / lo - 1 / ranks) / (1 / lo - 1 / hi)
        return table[lo] + w * (table[hi] - table[lo])

    @property
    def per_port_bw_Bps(self) -> float:
        return self.bw_Bps / self.ports

    @property
    def per_port_achievable_bw_Bps(self) -> float:
        return self.achievable_bw_Bps / self.ports


class Host(_Profile):
    """The CPU side of a node."""

    cpu: str = ""
    cpu_cores: PositiveInt
    dram_bytes: PositiveFloat
    dram_bw_Bps: PositiveFloat
    cpu_adam_params_per_s: PositiveFloat  # CPU AdamW throughput, all cores (ZeRO-Offload)


class Storage(_Profile):
    """A memory or storage tier below HBM: NVMe SSD or CXL memory expander."""

    kind: Literal["nvme", "cxl"]
    capacity_bytes: PositiveFloat
    read_bw_Bps: PositiveFloat  # datasheet sequential read
    write_bw_Bps: PositiveFloat  # datasheet sequential write
    achievable_read_bw_Bps: PositiveFloat | None = None  # measured; None: the datasheet figure
    achievable_write_bw_Bps: PositiveFloat | None = None
    latency_s: PositiveFloat

    @model_validator(mode="after")
    def _achievable_below_peak(self):
        for peak in ("read_bw_Bps", "write_bw_Bps"):
            ach = getattr(self, "achievable_" + peak)
            if ach is not None and ach > getattr(self, peak):
                raise ValueError(f"achievable_{_short_key(peak)}: larger than the peak {_short_key(peak)}")
        return self

    @property
    def effective_read_bw_Bps(self) -> float:
        return self.achievable_read_bw_Bps or self.read_bw_Bps

    @property
    def effective_write_bw_Bps(self) -> float:
        return self.achievable_write_bw_Bps or self.write_bw_Bps


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
    switch_radix: PositiveInt = 64  # ports per network switch (leaf), e.g. 64 on Quantum-2 NDR
    oversubscription: float = Field(default=1.0, ge=1.0)  # leaf downlink / uplink bandwidth


class Cluster(BaseModel):
    """A resolved cluster: the spec with its profiles looked up.  Immutable and hashable."""

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
    switch_radix: PositiveInt = 64
    oversubscription: float = 1.0

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def tiers(self) -> frozenset[str]:
        """Where this cluster can keep state: the GPU, host memory and its storage kinds."""
        return frozenset({"gpu", "cpu"} | {t.kind for t in self.storage})

    @property  # not cached: model_copy(update=...) would carry a stale value over
    def nic_bw_per_gpu_Bps(self) -> float:
        """Achievable inter-node bandwidth available to one GPU (its share of the node's NICs)."""
        if self.inter_node_link is None:
            return 0.0
        return self.inter_node_link.achievable_bw_Bps * self.nics_per_node / self.gpus_per_node

    @property
    def intra_node_bw_per_gpu_Bps(self) -> float:
        """Achievable bandwidth out of one GPU to its node peers, one direction.

        Through a switch this is the link's achievable figure; on a mesh only the peer links
        that reach a GPU of this node count (min(gpus_per_node - 1, ports) of them).
        """
        link = self.intra_node_link
        if link.switched:
            return link.achievable_bw_Bps
        return link.per_port_achievable_bw_Bps * min(self.gpus_per_node - 1, link.ports)

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node


# --------------------------------------------------------------------------------- loading

KINDS = {"devices": Device, "links": Link, "hosts": Host, "storage": Storage, "clusters": ClusterSpec}
_SINGULAR = {"device": "devices", "link": "links", "host": "hosts", "cluster": "clusters",
             "storages": "storage"}


def _kind(kind: str) -> str:
    kind = _SINGULAR.get(kind, kind)
    if kind not in KINDS:
        raise ProfileError(f"kind: unknown profile kind {kind!r}; allowed: {', '.join(KINDS)}")
    return kind


def _root():
    return resources.files("plansim.hardware_profiles")


@lru_cache(maxsize=None)
def profile_names(kind: str) -> tuple[str, ...]:
    """Built-in profile names of one kind, sorted."""
    folder = _root().joinpath(_kind(kind))
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")))


def _format_validation_error(exc: ValidationError, cls: type[_Profile]) -> str:
    err = exc.errors()[0]
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    loc = [str(p) for p in err["loc"]]
    if not loc:
        return msg
    field = loc[0]
    key = _short_key(field) if field in cls.model_fields else field
    where = ".".join([key] + loc[1:])
    if err["type"] == "missing":
        return f"{where}: required field missing"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown field"
    value = err.get("input")
    shown = f", got {value!r}" if value is not None and not isinstance(value, dict) else ""
    return f"{where}: {msg.rstrip('.').lower() if msg[:1].isupper() else msg}{shown}"


def parse_profile(kind: str, data: Any, label: str) -> _Profile:
    """Validate one profile's YAML data (already loaded) into its model; ``label`` names the file."""
    cls = KINDS[_kind(kind)]
    if not isinstance(data, dict):
        raise ProfileError(f"{label}: expected a mapping of fields, got {type(data).__name__}")
    data = dict(data)
    stem = Path(label).stem
    data.setdefault("name", stem)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"{label}: {_format_validation_error(exc, cls)}") from None


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name


@lru_cache(maxsize=None)
def _load(kind: str, name_or_path: str) -> _Profile:
    kind = _kind(kind)
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        label = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ProfileError(f"{label}: cannot read {kind[:-1] if kind != 'storage' else kind} "
                               f"profile ({exc.strerror or exc})") from None
    else:
        if name_or_path not in profile_names(kind):
            raise ProfileError(f"{kind}: unknown name {name_or_path!r}; allowed: "
                               f"{', '.join(profile_names(kind))}")
        label = f"hardware_profiles/{kind}/{name_or_path}.yaml"
        text = _root().joinpath(kind, f"{name_or_path}.yaml").read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"{label}: not valid YAML{where}") from None
    return parse_profile(kind, data, label)


def load_device(name_or_path: str | Path) -> Device:
    return _load("devices", str(name_or_path))  # type: ignore[return-value]


def load_link(name_or_path: str | Path) -> Link:
    return _load("links", str(name_or_path))  # type: ignore[return-value]


def load_host(name_or_path: str | Path) -> Host:
    return _load("hosts", str(name_or_path))  # type: ignore[return-value]


def load_storage(name_or_path: str | Path) -> Storage:
    return _load("storage", str(name_or_path))  # type: ignore[return-value]


def load_cluster_spec(name_or_path: str | Path) -> ClusterSpec:
    return _load("clusters", str(name_or_path))  # type: ignore[return-value]


def load_profile(kind: str, name_or_path: str | Path) -> _Profile:
    return _load(_kind(kind), str(name_or_path))


@lru_cache(maxsize=None)
def resolve_cluster(spec: ClusterSpec | str) -> Cluster:
    """Look up the profiles a cluster spec names (a spec, or a cluster name or path)."""
    if not isinstance(spec, ClusterSpec):
        spec = load_cluster_spec(spec)
    topology = spec.topology
    if spec.nodes > 1 and spec.inter_node_link is None:
        raise ProfileError(f"clusters/{spec.name}: nodes: {spec.nodes} nodes need an inter_node_link")
    if topology == "single-node" and spec.nodes > 1:
        topology = "fat-tree"
    return Cluster(
        name=spec.name,
        device=load_device(spec.device),
        nodes=spec.nodes,
        gpus_per_node=spec.gpus_per_node,
        intra_node_link=load_link(spec.intra_node_link),
        inter_node_link=load_link(spec.inter_node_link) if spec.inter_node_link else None,
        nics_per_node=spec.nics_per_node,
        host=load_host(spec.host),
        host_link=load_link(spec.host_link),
        storage=tuple(load_storage(s) for s in spec.storage),
        topology=topology,
        switch_radix=spec.switch_radix,
        oversubscription=spec.oversubscription,
    )


DEFAULT_HARDWARE = "h100-sxm"


def _positive(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not value > 0):
        raise ProfileError(f"{name}: must be positive, got {value!r}")


@lru_cache(maxsize=256)
def build_cluster(hardware: str | None = None, cluster: str | None = None, nodes: int | None = None,
                  gpus_per_node: int | None = None, nics_per_node: int | None = None,
                  nic_gbps: float | None = None) -> Cluster:
    """The cluster the CLI's ``--hardware/--cluster/--nodes/--gpus-per-node/--nics-per-node/
    --nic-gbps`` describe.

    ``cluster`` picks a cluster profile; otherwise the device's ``default_cluster`` is used
    (``h100-sxm`` -> ``dgx-h100``), with the device swapped in if the cluster names another.
    Nothing at all gives one DGX H100 node.  ``nodes``, ``gpus_per_node`` and ``nics_per_node``
    override the layout; ``nic_gbps`` sets the NIC line rate in Gb/s, scaling the achievable
    bandwidth by the same factor.
    """
    for arg, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node),
                       ("nics_per_node", nics_per_node), ("nic_gbps", nic_gbps)):
        _positive(arg, value)
    device = load_device(hardware) if hardware is not None else None
    if cluster is not None:
        spec = load_cluster_spec(cluster)
    else:
        device = device or load_device(DEFAULT_HARDWARE)
        if device.default_cluster is None:
            raise ProfileError(f"hardware: {device.name} names no default_cluster; give --cluster "
                               f"(allowed: {', '.join(profile_names('clusters'))})")
        spec = load_cluster_spec(device.default_cluster)
    base = resolve_cluster(spec)
    update: dict[str, Any] = {}
    if device is not None and device != base.device:
        update["device"] = device
    if nodes is not None:
        update["nodes"] = int(nodes)
    if gpus_per_node is not None:
        update["gpus_per_node"] = int(gpus_per_node)
    if nics_per_node is not None:
        update["nics_per_node"] = int(nics_per_node)
    n_nodes = update.get("nodes", base.nodes)
    link = base.inter_node_link
    if nic_gbps is not None:
        if link is None:
            link = load_link("roce-400g")
        scale = nic_gbps * 1e9 / 8 / link.bw_Bps
        link = link.model_copy(update={
            "name": f"{link.name}@{nic_gbps:g}gbps", "bw_Bps": link.bw_Bps * scale,
            "achievable_bw_Bps": link.achievable_bw_Bps * scale,
            "description": f"{link.description} (line rate overridden to {nic_gbps:g} Gb/s)"})
        update["inter_node_link"] = link
    if n_nodes > 1 and link is None:
        raise ProfileError(f"nodes: cluster {base.name} has no inter-node network; "
                           f"give --nic-gbps or a multi-node --cluster")
    if n_nodes > 1 and base.topology == "single-node":
        update["topology"] = "fat-tree"
    if not update:
        return base
    changed = [f"{k}={getattr(v, 'name', v)}" for k, v in
               (("hardware", update.get("device")), ("nodes", nodes), ("gpus_per_node", gpus_per_node),
                ("nics_per_node", nics_per_node), ("nic_gbps", nic_gbps)) if v is not None]
    update["name"] = f"{base.name}[{','.join(changed)}]" if changed else base.name
    return base.model_copy(update=update)


# --------------------------------------------------------------------------------- listing

def _h(value: float | None, unit: str, scale: float, digits: int = 3) -> str:
    if value is None:
        return ""
    return f"{value / scale:.{digits}g} {unit}"


def _row(kind: str, p: _Profile) -> dict[str, Any]:
    row: dict[str, Any] = {"name": p.name, "kind": kind[:-1] if kind != "storage" else kind}
    if isinstance(p, Device):
        row.update({
            "type": p.kind, "vendor": p.vendor,
            "bf16": _h(p.peak_flops["bf16"], "TFLOP/s", 1e12, 4),
            "fp8": _h(p.peak_flops.get("fp8"), "TFLOP/s", 1e12, 4),
            "memory": _h(p.hbm_bytes, "GiB", 2**30), "mem_bw": _h(p.hbm_bw_Bps, "TB/s", 1e12),
            "mem_bw_achievable": _h(p.achievable_hbm_bw_Bps, "TB/s", 1e12),
            "price": "" if p.price_per_hour_usd is None else f"${p.price_per_hour_usd:.2f}/h",
            "default_cluster": p.default_cluster or ""})
    elif isinstance(p, Link):
        row.update({"type": p.kind, "bw": _h(p.bw_Bps, "GB/s", 1e9),
                    "bw_achievable": _h(p.achievable_bw_Bps, "GB/s", 1e9),
                    "latency": _h(p.latency_s, "us", 1e-6), "switched": p.switched})
    elif isinstance(p, Host):
        row.update({"cpu": p.cpu, "cores": p.cpu_cores, "dram": _h(p.dram_bytes, "GiB", 2**30),
                    "dram_bw": _h(p.dram_bw_Bps, "GB/s", 1e9),
                    "cpu_adam": _h(p.cpu_adam_params_per_s, "Gparam/s", 1e9)})
    elif isinstance(p, Storage):
        row.update({"type": p.kind, "capacity": _h(p.capacity_bytes, "TB", 1e12),
                    "read_bw": _h(p.read_bw_Bps, "GB/s", 1e9), "write_bw": _h(p.write_bw_Bps, "GB/s", 1e9),
                    "latency": _h(p.latency_s, "us", 1e-6)})
    elif isinstance(p, ClusterSpec):
        row.update({"device": p.device, "nodes": p.nodes, "gpus_per_node": p.gpus_per_node,
                    "intra_node_link": p.intra_node_link, "inter_node_link": p.inter_node_link or "",
                    "nics_per_node": p.nics_per_node, "topology": p.topology})
    row["description"] = p.description
    return row


def list_profiles(kind: str = "devices"):
    """Built-in profiles of one kind (devices, links, hosts, storage, clusters; or 'all') as a
    DataFrame: name, kind, key numbers in human units, description."""
    import pandas as pd

    kinds = list(KINDS) if kind == "all" else [_kind(kind)]
    rows = [_row(k, _load(k, n)) for k in kinds for n in profile_names(k)]
    frame = pd.DataFrame(rows)
    if kind == "all":
        frame = frame[["name", "kind", "description"]]
    return frame

