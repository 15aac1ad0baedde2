"""Device memory: model states by precision and ZeRO stage, and a timeline of allocations.

Model states per parameter (ZeRO, arXiv:1910.02054; Megatron-LM distributed optimizer docs):
``bf16-mixed`` 2 (bf16 params) + 2 (bf16 grads; 4 with ``fp32_grads``, Megatron's main_grad)
+ 12 (fp32 master, momentum, variance) = 16 or 18 bytes; ``bf16-pure`` 2 + 2 + 4 = 8;
``fp16-mixed`` and ``fp8`` store like ``bf16-mixed``.  ZeRO-1 shards the optimizer states over the data-parallel
ranks, ZeRO-2 also the gradients, ZeRO-3 (FSDP) also the parameters.  Offloaded states
(``Plan.offload``) leave the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from plansim.workloads.plan import Plan

if TYPE_CHECKING:
    from plansim.simulator.hardware import Cluster

WORKSPACE_BYTES = 32 * 2**20  # cuBLAS workspace and small allocator slack
CONTEXT_BYTES = 2**30  # CUDA context, NCCL buffers, library handles: outside the allocator (estimate)
ALLOCATOR_RESERVE = 0.03  # caching-allocator rounding and fragmentation above max_memory_allocated (estimate)
HOST_USABLE_FRACTION = 0.9  # of a node's DRAM, for pinned offloaded states (estimate)


def usable_memory_bytes(hbm_bytes: float) -> float:
    """What ``max_memory_allocated`` may reach before an allocation fails: the device memory
    less the CUDA context and NCCL buffers, less the caching allocator's fragmentation."""
    return (hbm_bytes - CONTEXT_BYTES) * (1.0 - ALLOCATOR_RESERVE)


def infeasible_reason(plan: Plan, cluster: "Cluster", peak_bytes: float, stage: int,
                      params_on_rank: float) -> str | None:
    """Why ``plan`` cannot run, in the words both the engine's result and the search's analytic
    memory report: its peak over the device memory the allocator can reach (on pipeline ``stage``),
    else offloaded states the node cannot hold (``offload_overflow``); None if it fits."""
    capacity = usable_memory_bytes(cluster.device.hbm_bytes)
    if peak_bytes > capacity:
        return f"out of memory: peak {peak_bytes / 2**30:.1f} GiB > {capacity / 2**30:.1f} GiB usable on stage {stage}"
    return offload_overflow(plan, cluster, params_on_rank)


def offload_overflow(plan: Plan, cluster: "Cluster", params_on_rank: float) -> str | None:
    """Why a node cannot hold its GPUs' offloaded optimizer states where the plan puts them, or
    None.  ZeRO-Offload keeps each GPU's shard of the fp32 states, and the gradients it brings down
    for CPU Adam, in host DRAM (``HOST_USABLE_FRACTION`` of it: the rest is the OS's, the page
    cache's and the data loaders'); ZeRO-Infinity keeps the states on the node's NVMe drives or
    CXL memory (their capacity summed) and only the gradients in DRAM.  The shard is the
    engine's (``params_on_rank`` over dp·cp from ZeRO-1 on) and every GPU of the node is taken to
    hold the busiest pipeline stage's: an upper bound where a node spans stages."""
    tier = plan.placement("optimizer")
    if tier == "gpu":
        return None
    _, grad_b, optim_b = bytes_per_param(plan)
    shard = params_on_rank / (plan.dp * plan.cp if plan.zero >= 1 else 1)
    gpus = cluster.gpus_per_node
    dram = cluster.host.dram_bytes * HOST_USABLE_FRACTION
    in_dram = gpus * shard * (grad_b + (optim_b if tier == "cpu" else 0.0))
    if in_dram > dram:
        what = "optimizer states and gradients" if tier == "cpu" else "gradients"
        return (f"out of host memory: the {what} of {gpus} GPUs need {in_dram / 2**30:.0f} GiB > "
                f"{dram / 2**30:.0f} GiB usable of {cluster.host.name}'s DRAM")
    if tier != "cpu":
        capacity = sum(t.capacity_bytes for t in cluster.storage if t.kind == tier)
        states = gpus * shard * optim_b
        if states > capacity:
            return (f"out of {tier} capacity: the optimizer states of {gpus} GPUs need {states / 1e12:.2f} TB > "
                    f"{capacity / 1e12:.2f} TB of the node's {tier}")
    return None


@dataclass(frozen=True)
class ModelStateBytes:
    params: float
    grads: float
    optimizer: float
    ddp_buckets: float = 0.0  # PyTorch DDP's second copy of the gradients it reduces

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def bytes_per_param(plan: Plan) -> tuple[float, float, float]:
    """(param, grad, optimizer) bytes per parameter before sharding."""
    if plan.precision == "bf16-pure":
        return 2.0, 2.0, 4.0
    return 2.0, 4.0 if plan.fp32_grads else 2.0, 12.0


#: PyTorch's fused AdamW does not speed up with HBM: 2.29 TB/s on the H100, 2.74 on the H200
#: (both 132 SMs; 14 bytes per parameter; validation/data/h100-x1 and h200-x1, profile/adamw.csv), so its
#: rate is taken per SM, the mean of the two (each within 10 %)
FUSED_ADAMW_SM_RATE = (2.29e12 + 2.74e12) / 2 / 132


def optimizer_sm_rate(plan: Plan) -> float:
    """The per-SM rate cap of the optimizer step's kernels (0: HBM-bound), see FUSED_ADAMW_SM_RATE;
    Megatron's (apex) optimizer was not measured and stays HBM-bound."""
    return FUSED_ADAMW_SM_RATE if plan.framework == "pytorch" else 0.0


def optimizer_step_bytes(plan: Plan, params: float, shard: float) -> float:
    """HBM bytes the optimizer step moves on a rank holding ``params`` parameters whose
    optimizer covers ``shard`` of them (all, or 1/(dp·cp) with ZeRO).

    Megatron's mixed-precision optimizer (``MixedPrecisionOptimizer.step`` and its fp16
    predecessor), per parameter of the shard: copy 16-bit gradients into fp32 ones (read 2,
    write 4; nothing when they are fp32 already), with loss scaling unscale them and check for
    inf/NaN (read 4, write 4), their norm for clipping (read 4), Adam (read param, grad, m, v:
    16; write param, m, v: 12), copy the fp32 master into the 16-bit model parameter (read 4,
    write 2); then the whole gradient buffer is zeroed for the next step (write 2 or 4 per
    parameter held).  PyTorch's fused AdamW reads param, grad, m and v and writes param, m, v in
    one pass (bf16-pure: 2-byte everything; mixed: fp32 master and states, 16-bit gradient)."""
    if plan.precision == "bf16-pure":
        return 14.0 * shard  # read p, g, m, v (bf16); write p, m, v
    grad_b = 4.0 if plan.fp32_grads else 2.0
    if plan.framework == "pytorch":
        return (26.0 + grad_b) * shard  # fp32 master, m, v read and written; grad read; 16-bit param written
    per_param = (0.0 if plan.fp32_grads else 6.0) + 4.0 + 28.0 + 6.0
    if plan.precision == "fp16-mixed":
        per_param += 8.0
    return per_param * shard + grad_b * params


def model_state_bytes(params_on_rank: float, plan: Plan, shard_over: int | None = None) -> ModelStateBytes:
    """Bytes of params, grads and optimizer states a rank keeps on the device for
    ``params_on_rank`` parameters (already divided by tp·pp), sharded per ZeRO stage over
    ``shard_over`` data-parallel ranks (default ``plan.dp · plan.cp``: Megatron shards the
    distributed optimizer over the data- and context-parallel ranks together)."""
    n_d = plan.dp * plan.cp if shard_over is None else shard_over
    p_b, g_b, o_b = bytes_per_param(plan)
    params = params_on_rank * p_b / (n_d if plan.zero >= 3 else 1)
    grads = params_on_rank * g_b / (n_d if plan.zero >= 2 else 1)
    optimizer = params_on_rank * o_b / (n_d if plan.zero >= 1 else 1)
    off = plan.offload
    return ModelStateBytes(
        params=0.0 if off.get("params", "gpu") != "gpu" else params,
        grads=0.0 if off.get("grads", "gpu") != "gpu" else grads,
        optimizer=0.0 if off.get("optimizer", "gpu") != "gpu" else optimizer,
    )


def rank_model_states(dense_params: float, expert_params: float, plan: Plan) -> ModelStateBytes:
    """Model states of one rank: dense parameters sharded over the data-parallel ranks, routed
    experts over the expert-data-parallel ones (dp·cp/ep).  PyTorch DDP (``ddp="torch"``, no
    ZeRO) keeps a bucket copy of the gradients it all-reduces: the dense ones whenever dp·cp > 1,
    the experts' only when they have data-parallel replicas."""
    dense = model_state_bytes(dense_params, plan)
    expert_dp = plan.expert_dp
    experts = model_state_bytes(expert_params, plan, shard_over=expert_dp)
    buckets = 0.0
    if plan.ddp == "torch" and plan.zero == 0:
        buckets = (dense.grads if plan.dp * plan.cp > 1 else 0.0) + (experts.grads if expert_dp > 1 else 0.0)
    return ModelStateBytes(dense.params + experts.params, dense.grads + experts.grads,
                           dense.optimizer + experts.optimizer, buckets)


def static_bytes(states: ModelStateBytes, plan: Plan) -> float:
    """What a rank holds for the whole step: parameters, optimizer states, the workspace, the
    gradients where they live in a persistent buffer (Megatron) rather than being created by
    backward (PyTorch, ``framework="pytorch"``), and PyTorch DDP's bucket copy of them."""
    static = states.params + states.optimizer + WORKSPACE_BYTES + states.ddp_buckets
    if plan.framework != "pytorch":
        static += states.grads
    return static


def optimizer_transient_bytes(plan: Plan, params_on_rank: float) -> float:
    """Working memory of the optimizer step: Megatron's mixed-precision optimizer copies 16-bit
    gradients into fp32 gradients of its master weights (``_copy_model_grads_to_main_grads``)
    before Adam runs, 4 bytes per parameter of its shard.  None with fp32 gradients (already in
    fp32), in pure bf16, for PyTorch (its optimizer works on the gradients in place) or when
    the optimizer is offloaded."""
    if (plan.precision == "bf16-pure" or plan.fp32_grads or plan.framework == "pytorch"
            or plan.placement("optimizer") != "gpu"):
        return 0.0
    shard = params_on_rank / (plan.dp * plan.cp) if plan.zero >= 1 else params_on_rank
    return 4.0 * shard


class MemoryTimeline:
    """Allocations of one device over simulated time; never negative, peak tracked exactly."""

    def __init__(self, static_bytes: float) -> None:
        if static_bytes < 0:
            raise ValueError("static memory cannot be negative")
        self.static_bytes = static_bytes
        self.activations = 0.0
        self.grads = 0.0  # gradients allocated during backward (PyTorch's set_to_none semantics)
        self.peak_bytes = static_bytes
        self.peak_activations = 0.0  # activations at the moment of the overall peak
        self.max_activations = 0.0  # the most activations ever held at once
        self.over_freed = 0.0  # bytes freed beyond what was held (0 unless the accounting is wrong)
        self.peak_grads = 0.0
        self.peak_transient = 0.0
        self.samples: list[tuple[float, float]] = [(0.0, static_bytes)]

    @property
    def current(self) -> float:
        return self.static_bytes + self.activations + self.grads

    def allocate_grads(self, now: float, nbytes: float) -> None:
        """Gradients that backward creates and ``zero_grad(set_to_none=True)`` frees."""
        self.grads += nbytes
        self._observe(now, 0.0)

    def free_grads(self, now: float) -> None:
        self.grads = 0.0
        self.samples.append((now, self.current))

    def allocate(self, now: float, nbytes: float, transient: float = 0.0) -> None:
        """Keep ``nbytes`` (saved activations); ``transient`` is working memory live only now."""
        self.activations += nbytes
        self.max_activations = max(self.max_activations, self.activations)
        self._observe(now, transient)

    def free(self, now: float, nbytes: float, transient: float = 0.0) -> None:
        self._observe(now, transient)  # working memory of the backward is live before the free
        # freeing more than is held would be an accounting error: count it, so tests can see it
        self.over_freed += max(0.0, nbytes - self.activations - 1e-6 * max(1.0, nbytes))
        self.activations = max(0.0, self.activations - nbytes)
        if self.activations < 1e-6 * max(1.0, nbytes):
            self.activations = 0.0
        self.samples.append((now, self.current))

    def _observe(self, now: float, transient: float) -> None:
        total = self.current + transient
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_activations = self.activations
            self.peak_grads = self.grads
            self.peak_transient = transient
        self.samples.append((now, self.current))
