"""The plan space: enumerate training plans for a model on a cluster and prune the impossible.

A search space is the product of the degrees (tp, cp, pp, dp, ep), ZeRO stage, micro-batch,
recomputation and pipeline schedule (with virtual stages).  Enumeration walks it as a tree
(tp → cp → pp → ep → micro-batch → schedule → ZeRO → recomputation) so a rule that fails high up
prunes the whole subtree at once, and every pruned subtree is kept as a :class:`Pruned` record
with its reason and the number of plans it stood for.  The rules are Megatron-LM's and the
core's (:func:`~plansim.workloads.training.check_plan_fits_model`, :class:`Plan` validation):
heads % tp, kv-heads and tp divide one another, tp inside one NVLink domain (a node) unless
asked otherwise, seq % cp, experts % ep and ep | dp·cp, layers over pp·vpp (plain pipelines
may take the remainder off the first and last stages; interleaving splits evenly, or, as
Megatron-Core's ``account_for_embedding_in_pipeline_split`` / ``account_for_loss_in_pipeline_split``
do, counts the embedding and the loss as a layer each, so the first and last virtual stages run one
layer fewer: Llama 3 405B's 126 layers over 8 × 8 virtual stages),
gpus = tp·pp·dp·cp, and the global batch a multiple of dp·micro-batch (with ``max_global_batch``
each plan takes the largest such multiple not above it, as Calculon does).  Interleaving takes
micro-batch counts that pp does not divide in groups (:func:`smallest_microbatch_group`).

Constraints (``tp<=8``, ``pp=1``, ``schedule!=zero-bubble``, ``max-memory=70GiB``) are parsed
here; the plan-field ones prune during enumeration, ``max-memory`` when memory is known.  A
constraint that pins a dimension (``cp=16``, ``micro-batch=32``, ``vpp=24``, ``tp=16`` across
two 8-GPU nodes) also brings that value into the space where the defaults stop short of it: a
user who names a layout is asking for it to be tried.
"""
from __future__ import annotations

import operator
import re
from itertools import product
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from plansim.simulator.hardware import Cluster
from plansim.simulator.units import UnitError, parse_quantity
from plansim.workloads.models import ModelSpec
from plansim.workloads.plan import RECOMPUTE, SCHEDULES, Plan, PlanError
from plansim.workloads.training import check_plan_fits_model, split_layers

_OPS = {"<=": operator.le, ">=": operator.ge, "!=": operator.ne, "==": operator.eq, "=": operator.eq,
        "<": operator.lt, ">": operator.gt}
INT_KEYS = ("tp", "pp", "dp", "cp", "ep", "etp", "zero", "micro_batch", "vpp", "global_batch", "num_gpus")
STR_KEYS = ("recompute", "schedule", "hardware", "precision")
MEMORY_KEYS = ("max_memory", "memory")
CONSTRAINT_KEYS = INT_KEYS + STR_KEYS + MEMORY_KEYS
_ALIASES = {"gpus": "num_gpus", "mb": "micro_batch", "gbs": "global_batch", "peak_memory": "memory"}


@dataclass(frozen=True)
class Constraint:
    """``key op value`` on a plan field, the GPU count, the hardware or the peak memory."""

    key: str
    op: str
    value: Any
    text: str

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        match = re.fullmatch(r"\s*([A-Za-z_-]+)\s*(<=|>=|!=|==|=|<|>)\s*(\S+)\s*", text)
        if not match:
            raise PlanError(f"constraint: {text!r} must be KEY OP VALUE with OP one of <=, >=, <, >, =, != "
                            f"(e.g. tp<=8, pp=1, max-memory=70GiB)")
        raw_key, op, raw = match.groups()
        key = raw_key.replace("-", "_").lower()
        key = _ALIASES.get(key, key)
        if key not in CONSTRAINT_KEYS:
            raise PlanError(f"constraint: unknown key {raw_key!r} in {text!r}; allowed: "
                            f"{', '.join(k.replace('_', '-') for k in CONSTRAINT_KEYS)}")
        if key == "max_memory":
            if op not in ("=", "==", "<="):
                raise PlanError(f"constraint: {text!r}: max-memory takes '=' (e.g. max-memory=70GiB)")
            key, op = "memory", "<="
        if key == "memory":
            try:
                value: Any = parse_quantity(raw, "bytes")
            except UnitError as exc:
                raise PlanError(f"constraint: {text!r}: {exc}") from None
            if not value > 0:
                raise PlanError(f"constraint: {text!r}: max-memory must be positive (e.g. max-memory=70GiB)")
        elif key in INT_KEYS:
            try:
                value = int(raw)
            except ValueError:
                raise PlanError(f"constraint: {text!r}: {key} takes an integer, got {raw!r}") from None
        else:
            if op not in ("=", "==", "!="):
                raise PlanError(f"constraint: {text!r}: {key} takes '=' or '!='")
            allowed = {"recompute": RECOMPUTE, "schedule": SCHEDULES}.get(key)
            if allowed and raw not in allowed:
                raise PlanError(f"constraint: {text!r}: {key} must be one of {', '.join(allowed)}")
            value = raw
        return cls(key, op, value, text.strip())

    def admits(self, value: Any) -> bool:
        return _OPS[self.op](value, self.value)


def parse_constraints(items: list[str] | tuple[str, ...] | None) -> list[Constraint]:
    out = []
    for item in items or ():
        for part in str(item).split(","):  # "tp<=8,pp=1" is accepted as well as repeated flags
            if part.strip():
                out.append(Constraint.parse(part))
    return out


@dataclass(frozen=True)
class SearchSpace:
    """Which values each dimension may take (``None``: chosen from the model and cluster)."""

    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    #: default: 1, and for seq ≥ 8192 powers of two up to 8, or up to seq / 8192 for longer
    #: sequences (Llama 3 405B trained its 128k context with cp 16)
    cp: tuple[int, ...] | None = None
    ep: tuple[int, ...] | None = None
    #: MoE with tp > 1: also try whole experts with ep over tp·cp·dp (Megatron-Core's parallel folding)
    expert_folding: bool = True
    micro_batch: tuple[int, ...] = (1, 2, 4, 8, 16)
    #: None: every policy the framework has (torchtitan's ``selective-op`` with framework "pytorch" only)
    recompute: tuple[str, ...] | None = None
    schedules: tuple[str, ...] = ("1f1b", "interleaved", "zero-bubble")
    zero: tuple[int, ...] = (0, 1, 2, 3)
    #: where the optimizer states may live: "gpu", and the offload tiers to weigh against it
    #: ("cpu": ZeRO-Offload's CPU Adam; "nvme"/"cxl": ZeRO-Infinity, where the cluster has them)
    optimizer_tiers: tuple[str, ...] = ("gpu",)
    #: also weigh each plan with its saved activations sent to host memory and fetched back for
    #: the backward (``offload.activations = cpu``; ranked by an estimate that errs fast and
    #: event-simulated before it is shown)
    activation_offload: bool = False
    max_vpp: int = 16
    tp_within_node: bool = True
    even_layers: bool = False  # only plans whose layers split evenly over pp (uneven: Megatron-style)
    #: the smallest pp the interleaved schedule is tried at: Megatron-LM required pp > 2 for it
    #: from March 2021 (182841f7df) until May 2024 (3ee489d9ea, "Enable virtual pipelining ... at
    #: PP=2"); set 3 to search as the Megatron-LM of those years could run
    interleaved_min_pp: int = 2
    #: interleaving where the micro-batches are not a multiple of pp, in groups of the smallest N
    #: Megatron-Core accepts (``microbatch_group``; its --microbatch-group-size-per-virtual-pipeline-
    #: stage, 2024 on); False: only multiples of pp, as Megatron-LM required before
    microbatch_groups: bool = True
    #: a plan that fits only with full recomputation is searched with the fewest layers per chunk
    #: recomputed that fit (Megatron-LM's --recompute-method block --recompute-num-layers N); off by
    #: default: the bisection costs ~0.4 s in the Llama 3 70B / 512 H100 search, and no plan in its
    #: top ten fits only with full recomputation
    partial_recompute: bool = False
    plan_defaults: dict[str, Any] = field(default_factory=dict)  # precision, attention, fp32_grads, ...


@dataclass
class Pruned:
    """A pruned plan or subtree: the fields fixed so far, why, and how many plans it stood for."""

    hardware: str
    num_gpus: int
    fields: dict[str, Any]
    reason: str
    count: int = 1

    @property
    def category(self) -> str:
        return self.reason.split(":")[0]


@dataclass
class Enumeration:
    plans: list[Plan]
    pruned: list[Pruned]
    explored: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pow2_upto(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def enumerate_plans(model: ModelSpec, cluster: Cluster, space: SearchSpace, *, seq_len: int,
                    global_batch: int | None = None, max_global_batch: int | None = None,
                    constraints: list[Constraint] = (), hardware: str | None = None) -> Enumeration:
    """All well-formed plans for ``model`` on ``cluster`` (memory not yet checked), and the pruned."""
    if (global_batch is None) == (max_global_batch is None):
        raise PlanError("global_batch: give exactly one of global_batch and max_global_batch")
    n, gpn = cluster.num_gpus, cluster.gpus_per_node
    hw = hardware or cluster.device.name
    plans: list[Plan] = []
    pruned: list[Pruned] = []
    plan_constraints = [c for c in constraints if c.key not in MEMORY_KEYS]
    defaults = dict(space.plan_defaults)
    recomputes = space.recompute or tuple(r for r in RECOMPUTE if r != "selective-op"
                                          or defaults.get("framework") == "pytorch")

    def prune(fields: dict[str, Any], reason: str, count: int = 1) -> None:
        pruned.append(Pruned(hw, n, dict(fields), reason, count))

    def violated(fields: dict[str, Any]) -> Constraint | None:
        values = dict(fields, num_gpus=n, hardware=hw, precision=defaults.get("precision", "bf16-mixed"))
        if "tp" in values:  # experts split like the dense MLP unless folded
            values.setdefault("etp", values["tp"])
        for c in plan_constraints:
            if c.key in values and not c.admits(values[c.key]):
                return c
        return None

    acts = ("gpu", "cpu") if space.activation_offload else ("gpu",)
    tiers_here = cluster.tiers
    pinned = _pinned_values(plan_constraints)
    tps = space.tp or [d for d in _divisors(n) if d <= max(gpn, 1) * (1 if space.tp_within_node else n)]
    tps = sorted(set(tps) | pinned.get("tp", set()))
    cps = space.cp or (_pow2_upto(max(8, seq_len // 8192)) if seq_len >= 8192 else [1])
    cps = sorted(set(cps) | pinned.get("cp", set()))
    micro_batches = sorted(set(space.micro_batch) | pinned.get("micro_batch", set()))
    max_vpp = max([space.max_vpp, *pinned.get("vpp", ())])
    for tp in tps:
        f_tp = {"tp": tp}
        if n % tp:
            prune(f_tp, f"tp: {tp} does not divide the {n} GPUs")
            continue
        if space.tp_within_node and tp > gpn and tp not in pinned.get("tp", ()):
            prune(f_tp, f"tp: {tp} exceeds the {gpn} GPUs of one NVLink domain")
            continue
        if model.num_heads % tp or (model.num_kv_heads % tp and tp % model.num_kv_heads):
            prune(f_tp, f"tp: {tp} does not divide the {model.num_heads} heads / {model.num_kv_heads} kv-heads")
            continue
        for cp in cps:
            f_cp = dict(f_tp, cp=cp)
            if (n // tp) % cp:
                continue  # not a factorisation of the GPU count: not a plan at all
            if seq_len % cp:
                prune(f_cp, f"cp: {cp} does not divide seq_len {seq_len}")
                continue
            pps = space.pp or [d for d in _divisors(n // (tp * cp)) if d <= model.num_layers]
            for pp in pps:
                f_pp = dict(f_cp, pp=pp)
                if (n // (tp * cp)) % pp:
                    continue
                dp = n // (tp * cp * pp)
                f_pp["dp"] = dp
                if model.num_layers % pp and (space.even_layers or pp == 1):
                    prune(f_pp, f"pp: {pp} does not divide the {model.num_layers} layers evenly")
                    continue
                try:
                    split_layers(model.num_layers, pp)
                except PlanError as exc:
                    prune(f_pp, str(exc))
                    continue
                for ep, folded in _expert_layouts(model, space, tp, cp, dp):
                    f_ep = dict(f_pp, ep=ep, **({"etp": 1} if folded else {}))
                    ranks = tp * cp * dp if folded else dp * cp
                    if ranks % ep or (ep > 1 and (not model.is_moe or model.num_experts % ep)):
                        prune(f_ep, f"ep: {ep} must divide {'tp·cp·dp' if folded else 'dp·cp'} = {ranks} and the "
                                    f"{model.num_experts} experts")
                        continue
                    for mb in micro_batches:
                        f_mb = dict(f_ep, micro_batch=mb)
                        yield_base = list(_schedules(model, pp, space, max_vpp))
                        zeros = _zeros(space, dp, cp)
                        count = len(zeros) * len(recomputes) * len(space.optimizer_tiers) * len(acts)  # per schedule
                        subtree = count * len(yield_base)
                        if global_batch is not None:
                            if global_batch % (dp * mb):
                                prune(f_mb, f"global_batch: {global_batch} is not a multiple of dp·micro_batch = "
                                            f"{dp}·{mb}", subtree)
                                continue
                            gb = global_batch
                        else:
                            gb = (max_global_batch // (dp * mb)) * dp * mb
                            if gb == 0:
                                prune(f_mb, f"global_batch: max_global_batch {max_global_batch} is below dp·micro_batch = "
                                            f"{dp}·{mb}", subtree)
                                continue
                        if (mb * seq_len // cp) % tp and tp > 1:
                            prune(f_mb, f"tp: {tp} must divide the tokens per micro-batch for sequence parallelism",
                                  subtree)
                            continue
                        for schedule, vpp in yield_base:
                            gbs = gb
                            m = gbs // (dp * mb)
                            f_s = dict(f_mb, schedule=schedule, vpp=vpp, global_batch=gbs)
                            group = (smallest_microbatch_group(m, pp)
                                     if schedule == "interleaved" and m % pp and space.microbatch_groups else None)
                            if group is not None:
                                f_s["microbatch_group"] = group
                            elif schedule == "interleaved" and m % pp:
                                if max_global_batch is not None and m >= pp:
                                    m = (m // pp) * pp
                                    gbs = m * dp * mb
                                    f_s["global_batch"] = gbs
                                else:
                                    prune(f_s, f"global_batch: the interleaved schedule needs micro-batches ({m}) "
                                               f"to be a multiple of pp ({pp})", count)
                                    continue
                            for zero, recompute, tier, act in product(zeros, recomputes, space.optimizer_tiers, acts):
                                fields = dict(f_s, zero=zero, recompute=recompute)
                                offload = {k: v for k, v in (("optimizer", tier), ("activations", act)) if v != "gpu"}
                                if offload:
                                    fields["offload"] = offload
                                if tier not in tiers_here:
                                    prune(fields, f"offload: cluster {cluster.name} has no {tier} tier")
                                    continue
                                bad = violated(fields)
                                if bad is not None:
                                    prune(fields, f"constraint: {bad.text}")
                                    continue
                                try:
                                    plan = Plan(**{**defaults, **fields, "seq_len": seq_len})
                                    check_plan_fits_model(model, plan)
                                except PlanError as exc:
                                    prune(fields, str(exc))
                                    continue
                                plans.append(plan)
    return Enumeration(plans, pruned, len(plans) + sum(p.count for p in pruned))


def _expert_layouts(model: ModelSpec, space: SearchSpace, tp: int, cp: int, dp: int) -> list[tuple[int, bool]]:
    """(ep, folded) pairs: ep inside dp·cp with experts split over tp, and, for MoE with tp > 1,
    whole experts with ep over tp·cp·dp (folded; ep 1 is the same plan either way)."""
    if not model.is_moe:
        return [(ep, False) for ep in (space.ep or (1,))]
    eps = space.ep or tuple(_divisors(model.num_experts))
    pairs = [(ep, False) for ep in eps if space.ep or (dp * cp) % ep == 0]
    if space.expert_folding and tp > 1:
        pairs += [(ep, True) for ep in eps if ep > 1 and (space.ep or (tp * cp * dp) % ep == 0)]
    return pairs


def _zeros(space: SearchSpace, dp: int, cp: int) -> tuple[int, ...]:
    return space.zero if dp * cp > 1 else (0,)


def smallest_microbatch_group(m: int, pp: int) -> int | None:
    """The smallest interleaving group Megatron-Core accepts for ``m`` micro-batches on ``pp``
    stages (pp ≤ N ≤ m, the last group empty or at least pp); None where m < pp.  The smallest
    keeps the fewest micro-batches in flight."""
    return next((n for n in range(pp, m + 1) if m % n == 0 or m % n >= pp), None)


def _pinned_values(constraints: list[Constraint]) -> dict[str, set[int]]:
    """Values that equality constraints name for integer plan fields (``cp=16`` → {"cp": {16}})."""
    out: dict[str, set[int]] = {}
    for c in constraints:
        if c.op in ("=", "==") and c.key in INT_KEYS:
            out.setdefault(c.key, set()).add(c.value)
    return out


def _schedules(model: ModelSpec, pp: int, space: SearchSpace, max_vpp: int) -> Iterator[tuple[str, int]]:
    """(schedule, vpp) pairs: one for pp = 1 (schedules coincide), else each allowed schedule;
    interleaving (from ``space.interleaved_min_pp`` on) with every vpp ≥ 2 whose pp·vpp chunks
    split the layers evenly or, unless ``space.even_layers``, with the first and/or last chunk one
    layer short (Megatron-Core's embedding and loss counted as layers; :func:`split_layers`
    takes the shortfall off the first and last virtual stages)."""
    if pp == 1:
        yield "1f1b", 1
        return
    shortfalls = (0,) if space.even_layers else (0, 1, 2)
    for name in space.schedules:
        if name == "interleaved":
            if pp < space.interleaved_min_pp:
                continue
            for vpp in range(2, max_vpp + 1):
                chunks = pp * vpp
                if any((model.num_layers + d) % chunks == 0 and (model.num_layers + d) // chunks > (d > 0)
                       for d in shortfalls):
                    yield name, vpp
        else:
            yield name, 1


def check_constraints_satisfiable(enums: list[tuple[str, int, Enumeration]], constraints: list[Constraint]) -> None:
    """Raise one line for a plan-field constraint that excluded every otherwise valid plan."""
    for c in constraints:
        if c.key in MEMORY_KEYS:
            continue
        hit = [p for _, _, e in enums for p in e.pruned if p.reason == f"constraint: {c.text}"]
        if hit and not any(e.plans for _, _, e in enums):
            found = {p.fields.get(c.key, p.num_gpus if c.key == 'num_gpus' else p.hardware)
                     for p in hit if c.key in p.fields or c.key in ('num_gpus', 'hardware')}
            values = [str(v) for v in sorted(found, key=lambda v: (isinstance(v, str), v))]
            raise PlanError(f"constraint: {c.text!r} excludes every plan; {c.key} can be "
                            f"{', '.join(values) or 'nothing else'} here")


def with_fields(plan: Plan, **changes: Any) -> Plan:
    return replace(plan, **changes)
