"""Plan search: enumerate, prune, estimate, confirm by event simulation, rank, Pareto.

The pipeline (DESIGN.md, planner/):

1. for each (hardware, GPU count), :func:`~plansim.planner.space.enumerate_plans` lists the
   well-formed plans and the pruned subtrees with their reasons;
2. the executor computes each plan's exact peak memory (the engine's own accounting) and drops
   those that do not fit, then estimates the rest analytically
   (:mod:`plansim.simulator.analytic`, the engine's cost functions in a closed-form schedule);
3. plans are ordered by the objective on the estimate, and only those that can still win are
   event-simulated: in estimate order until ``confirm`` plans are simulated and the next
   estimate is worse than the ``confirm``-th best simulated value by more than the estimate's
   tolerance;
4. rows are ranked (simulated first, by the simulated value), optionally reduced to the Pareto
   front, and returned as a DataFrame whose ``attrs`` hold the summary (explored, pruned by
   reason, estimated, simulated) and, on request, the infeasible plans with their reasons.

Objectives compare plans per token, so plans with different global batches stay comparable:
throughput (tokens/s), MFU, cost (USD per million tokens, from the price per GPU-hour) and
time-to-train (``tokens`` / tokens per second).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import yaml

from plansim.planner.executors import InlineExecutor, evaluate_task, make_executor, simulate_task
from plansim.planner.space import (MEMORY_KEYS, Enumeration, Pruned, SearchSpace,
                                   check_constraints_satisfiable, enumerate_plans, parse_constraints)
from plansim.simulator.calibration import calibrate_cluster
from plansim.simulator.costs.power import with_power_limit
from plansim.simulator.engine import check_plan_on_cluster
from plansim.simulator.hardware import Cluster, build_cluster, profile_names
from plansim.workloads.model_io import load_model
from plansim.workloads.models import ModelSpec
from plansim.workloads.plan import Plan, PlanError

# objective -> (column, True if larger is better)
OBJECTIVES = {"throughput": ("tokens_per_s", True), "mfu": ("mfu", True),
              "cost": ("cost_per_million_tokens_usd", False), "time-to-train": ("time_to_train_s", False)}
PARETO_METRICS = {"throughput": ("tokens_per_s", True), "mfu": ("mfu", True),
                  "cost": ("cost_per_million_tokens_usd", False), "memory": ("peak_memory_bytes", False),
                  "time-to-train": ("time_to_train_s", False), "step-time": ("step_time_s", False)}
PLAN_COLUMNS = ("tp", "pp", "dp", "cp", "ep", "etp", "zero", "micro_batch", "global_batch", "seq_len", "recompute",
                "recompute_layers", "recompute_every",
                "schedule", "vpp", "microbatch_group", "optimizer_tier", "activations_tier", "sequence_parallel",
                "precision")
ESTIMATE_TOLERANCE = 0.05  # how much faster than its estimate a plan may simulate (measured: at most 4.3 %)

MAX_SIMULATED_FACTOR = 3  # near-ties stop being simulated after 3 × confirm plans

_SIM_CACHE: dict[tuple, dict[str, Any]] = {}


def clear_caches() -> None:
    """Forget cached simulations and layer costs (benchmarks time cold searches)."""
    from plansim.planner import executors
    from plansim.simulator import analytic
    _SIM_CACHE.clear()
    executors._MODELS.clear()
    analytic._observations.cache_clear()


# --- inputs ---------------------------------------------------------------------------------------
def parse_gpus(spec: int | str | Sequence[int] | None) -> list[int] | None:
    """GPU counts: ``512``, ``256,512,1024``, ``256..2048`` (doubling) or ``256..2048:256`` (step)."""
    if spec is None:
        return None
    if isinstance(spec, int):
        counts = [spec]
    elif isinstance(spec, str):
        counts = []
        for part in spec.split(","):
            part = part.strip()
            try:
                if ".." in part:
                    lo_s, _, rest = part.partition("..")
                    hi_s, _, step_s = rest.partition(":")
                    lo, hi = int(lo_s), int(hi_s)
                    if lo < 1 or hi < lo:
                        raise ValueError
                    if step_s:
                        counts += list(range(lo, hi + 1, int(step_s)))
                    else:
                        v = lo
                        while v <= hi:
                            counts.append(v)
                            v *= 2
                else:
                    counts.append(int(part))  # an empty entry ("8,,16") is malformed too
            except ValueError:
                raise PlanError(f"gpus: {spec!r} must be N, N,M,..., A..B (doubling) or A..B:STEP") from None
    else:
        counts = [int(c) for c in spec]
    if not counts or any(c < 1 for c in counts):
        raise PlanError(f"gpus: {spec!r} must list positive GPU counts")
    return sorted(set(counts))


def resolve_prices(prices: str | Path | dict[str, float] | Sequence[str] | None) -> dict[str, float]:
    """Price overrides in USD per GPU-hour: a mapping, ``name=USD`` strings, or a YAML file of
    ``name: USD`` (the built-in list prices are the devices' ``price_per_hour_usd``, with sources)."""
    if prices is None:
        return {}
    if isinstance(prices, dict):
        items = list(prices.items())
    else:
        if isinstance(prices, (str, Path)):
            prices = [str(prices)]
        items = []
        for entry in prices:
            name, sep, value = str(entry).partition("=")
            if sep:
                items.append((name.strip(), value.strip()))
                continue
            try:
                data = yaml.safe_load(Path(entry).read_text())
            except OSError:
                raise PlanError(f"price: {entry!r} is neither NAME=USD nor a readable YAML file") from None
            except yaml.YAMLError as exc:
                raise PlanError(f"price: {entry} is not valid YAML ({str(exc).splitlines()[0]})") from None
            if not isinstance(data, dict):
                raise PlanError(f"price: {entry} must map device names to USD per GPU-hour")
            items += [(k, v.get("price_per_hour_usd") if isinstance(v, dict) else v) for k, v in data.items()]
    out = {}
    for name, value in items:
        try:
            price = float(value)
        except (TypeError, ValueError):
            raise PlanError(f"price: {name}={value!r} must be a number of USD per GPU-hour") from None
        if not price > 0:
            raise PlanError(f"price: {name}={value!r} must be positive")
        out[str(name)] = price
    return out


def _check_price_names(prices: dict[str, float], targets: list["Target"]) -> None:
    """A price for a device that is neither built in nor searched is a typo (``h100=2.5`` for
    ``h100-sxm``) that would silently leave the list price in place."""
    known = set(profile_names("devices")) | {t.cluster.device.name for t in targets} | {t.hardware for t in targets}
    unknown = sorted(set(prices) - known)
    if unknown:
        raise PlanError(f"price: unknown device {unknown[0]!r}; allowed: {', '.join(sorted(known))}")


def _check_some_target_runs(probe: Plan, targets: list["Target"]) -> None:
    """Bad input, not an empty result, when no target can run the plans at all (fp8 on A100s);
    with some that can, the others' plans are pruned one by one (``check_plan_on_cluster``)."""
    refusals = []
    for t in targets:
        try:
            check_plan_on_cluster(probe, t.cluster)
        except PlanError as exc:
            refusals.append(exc)
    if len(refusals) == len(targets):
        raise refusals[0]


@dataclass
class Target:
    hardware: str
    cluster: Cluster
    price: float | None


def _targets(hardware, cluster, gpus, nodes, gpus_per_node, nics_per_node, nic_gbps, calibrated,
             prices, power_limit_w=None) -> list[Target]:
    names = [h.strip() for h in hardware.split(",")] if isinstance(hardware, str) else list(hardware or [None])
    if isinstance(hardware, str) and not all(names):
        raise PlanError(f"hardware: {hardware!r} has an empty device name; give names such as h100-sxm,h200")
    names = list(dict.fromkeys(n for n in names if n)) or [None]  # repeated names once
    counts = parse_gpus(gpus)
    if counts is not None and nodes is not None:
        raise PlanError("gpus: give --gpus or --nodes (with --gpus-per-node), not both")
    out = []
    for name in names:
        base = build_cluster(name, cluster, nodes, gpus_per_node, nics_per_node, nic_gbps)
        layouts = [(base.nodes, base.gpus_per_node)]
        if counts is not None:
            gpn = base.gpus_per_node
            layouts = []
            for c in counts:
                if c % gpn == 0:
                    layouts.append((c // gpn, gpn))
                elif c < gpn:
                    layouts.append((1, c))
                else:
                    raise PlanError(f"gpus: {c} is not a multiple of the {gpn} GPUs per node of {base.device.name}")
        for n_nodes, gpn in layouts:
            machine = build_cluster(name, cluster, n_nodes, gpn, nics_per_node, nic_gbps)
            if calibrated:  # the device and the links fitted on its hosts, as plansim.simulate does
                machine, _ = calibrate_cluster(machine)
            machine = with_power_limit(machine, power_limit_w)
            dev = machine.device.name
            price = prices.get(dev, prices.get(name or dev, machine.device.price_per_hour_usd))
            out.append(Target(name or dev, machine, price))
    return out


# --- the search -----------------------------------------------------------------------------------
def search(model: str | ModelSpec, hardware: str | Sequence[str] | None = None, cluster: str | None = None, *,
           gpus: int | str | Sequence[int] | None = None, nodes: int | None = None,
           gpus_per_node: int | None = None, nics_per_node: int | None = None, nic_gbps: float | None = None,
           power_limit_w: float | None = None, global_batch: int | None = None, max_global_batch: int | None = None,
           seq_len: int = 2048,
           objective: str = "throughput", tokens: float | None = None, top: int | None = 10,
           constraints: Iterable[str] | None = None, pareto: str | Sequence[str] | None = None,
           executor: str = "local", workers: int | None = None, address: str | None = None,
           prices: Any = None, space: SearchSpace | None = None, confirm: int | None = None,
           calibrated: bool = True, progress: bool = False, list_infeasible: bool = False,
           **plan_defaults: Any) -> pd.DataFrame:
    """Search training plans; the best first.  See ``plansim search --help`` for the options.

    Returns a DataFrame, one row per plan (degrees, batch, schedule, the metrics of
    :class:`~plansim.simulator.result.Result`, cost, and ``evaluated``: ``event`` for plans
    confirmed by the event simulation, ``analytic`` otherwise).  ``df.attrs["summary"]`` counts
    plans explored, pruned by reason, estimated and simulated; ``df.attrs["infeasible"]`` lists
    pruned plans with their reason when ``list_infeasible``; ``df.attrs["why_empty"]`` says why
    no plan fits when the frame is empty.  Extra keyword arguments (``precision``, ``attention``,
    ``fp32_grads``, …) are fixed Plan fields for every plan.
    """
    t0 = time.perf_counter()
    if objective not in OBJECTIVES:
        raise PlanError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if objective == "time-to-train" and not tokens:
        raise PlanError("tokens: --objective time-to-train needs --tokens N (tokens to train on)")
    if tokens is not None and not tokens > 0:
        raise PlanError(f"tokens: must be positive, got {tokens!r}")
    if (global_batch is None) == (max_global_batch is None):
        raise PlanError("global_batch: give exactly one of --global-batch and --max-global-batch")
    for name, value in (("global_batch", global_batch), ("max_global_batch", max_global_batch),
                        ("seq_len", seq_len), ("top", top)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise PlanError(f"{name}: must be a positive integer, got {value!r}")
    pareto_metrics = _parse_pareto(pareto)
    if "time-to-train" in pareto_metrics and not tokens:
        raise PlanError("tokens: --pareto time-to-train needs --tokens N")
    from plansim.workloads.plan import Plan as _P
    # offload is simulated by plansim simulate; the analytic estimate does not model its copies
    known = set(_P.__dataclass_fields__) - set(PLAN_COLUMNS) - {"offload"} | {"precision", "sequence_parallel"}
    unknown = sorted(set(plan_defaults) - known)
    if unknown:
        raise PlanError(f"search: unknown option {unknown[0]!r}; fixed plan fields allowed: {', '.join(sorted(known))}")
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    constraint_list = parse_constraints(list(constraints or []))
    memory_limit = min((c.value for c in constraint_list if c.key in MEMORY_KEYS), default=None)
    space = space or SearchSpace()
    if plan_defaults:
        space = SearchSpace(**{**space.__dict__, "plan_defaults": {**space.plan_defaults, **plan_defaults}})
    price_table = resolve_prices(prices)
    targets = _targets(hardware, cluster, gpus, nodes, gpus_per_node, nics_per_node, nic_gbps, calibrated,
                       price_table, power_limit_w)
    _check_price_names(price_table, targets)
    _check_some_target_runs(Plan(precision=space.plan_defaults.get("precision", "bf16-mixed")), targets)
    _check_optimizer_tiers(space.optimizer_tiers, targets)
    if objective == "cost" or "cost" in pareto_metrics:
        if all(t.price is None for t in targets):
            names = sorted({t.cluster.device.name for t in targets})
            raise PlanError(f"price: no price per GPU-hour for {', '.join(names)}; give --price {names[0]}=USD")

    timings: dict[str, float] = {}
    t_phase = time.perf_counter()
    # 1. enumerate
    enums: list[tuple[Target, Enumeration]] = []
    for t in targets:
        enums.append((t, enumerate_plans(spec, t.cluster, space, seq_len=seq_len, global_batch=global_batch,
                                         max_global_batch=max_global_batch, constraints=constraint_list,
                                         hardware=t.hardware)))
    check_constraints_satisfiable([(t.hardware, t.cluster.num_gpus, e) for t, e in enums], constraint_list)
    if global_batch is not None and not any(e.plans for _, e in enums):
        gb_pruned = [p for _, e in enums for p in e.pruned if p.category == "global_batch"]
        if gb_pruned and all(p.category in ("global_batch", "tp", "cp", "pp", "ep") for _, e in enums for p in e.pruned):
            dps = sorted({p.fields.get("dp") for p in gb_pruned if p.fields.get("dp")})
            raise PlanError(f"global_batch: {global_batch} is not a multiple of dp·micro_batch for any plan "
                            f"(dp can be {', '.join(map(str, dps[:12]))}); use --max-global-batch {global_batch}")

    timings["enumerate_s"] = time.perf_counter() - t_phase
    t_phase = time.perf_counter()
    pruned: list[Pruned] = [p for _, e in enums for p in e.pruned]
    explored = sum(e.explored for _, e in enums)
    # a plan is dropped when a sibling with less recomputation fits, which takes the analytic peak
    # to be exact: it is for Megatron's gradient buffer, a lower bound for PyTorch's (whose plans
    # the event simulation may still find out of memory, and then their siblings must be there)
    prune_dominated = (not any(m == "memory" for m in pareto_metrics)
                       and space.plan_defaults.get("framework", "megatron") != "pytorch")

    # 2. memory + analytic estimate, grouped so that each task shares its layer costs
    tasks, owners = [], []
    for t, e in enums:
        groups: dict[tuple, list[Plan]] = {}
        for p in e.plans:
            groups.setdefault((p.tp, p.cp, p.ep, p.micro_batch), []).append(p)
        for plans in groups.values():
            tasks.append((spec, t.cluster, plans, memory_limit, prune_dominated, space.partial_recompute))
            owners.append(t)
    ex = make_executor(executor, workers, address)
    rows: list[dict[str, Any]] = []
    try:
        with _Progress(progress, len(tasks), "estimating plans") as bar:
            results: list[Any] = [None] * len(tasks)
            runner = ex if sum(len(t[2]) for t in tasks) > 400 or executor == "ray" else InlineExecutor()
            for i, res in runner.map(evaluate_task, tasks):
                results[i] = res
                bar.advance()
        for (spec_, cluster_, plans, *_), t, res in zip(tasks, owners, results):
            for plan, r in zip(plans, res):
                if "pruned" in r:
                    pruned.append(Pruned(t.hardware, cluster_.num_gpus, _plan_fields(plan), r["pruned"]))
                    continue
                rows.append(_row(t, r.pop("plan"), r, "analytic", tokens))
        estimated = len(rows)
        key_col, larger = OBJECTIVES[objective]
        if objective == "cost":
            for r in [r for r in rows if r["price_per_gpu_hour_usd"] is None]:
                pruned.append(Pruned(r["hardware"], r["num_gpus"], _plan_fields(r["_plan"]),
                                     f"no price: no price per GPU-hour for {r['hardware']}; give --price"))
            rows = [r for r in rows if r["price_per_gpu_hour_usd"] is not None]
        rows.sort(key=lambda r: _sort_key(r, key_col, larger))

        timings["estimate_s"] = time.perf_counter() - t_phase
        t_phase = time.perf_counter()
        # 3. event-simulate the plans that can still win
        n_confirm = confirm if confirm is not None else max(top or 10, 5)
        simulated, over = _confirm(spec, rows, key_col, larger, n_confirm, ex, progress, tokens, memory_limit)
        for r in over:  # the event simulation's exact peak exceeds the device or the max-memory constraint
            rows.remove(r)
            pruned.append(Pruned(r["hardware"], r["num_gpus"], _plan_fields(r["_plan"]), _over_memory(r, memory_limit)))
        timings["simulate_s"] = time.perf_counter() - t_phase
    finally:
        ex.close()

    # 4. rank, Pareto, frame
    rows.sort(key=lambda r: (r["evaluated"] != "event", _sort_key(r, key_col, larger)))
    if pareto_metrics:
        rows = _pareto(rows, pareto_metrics)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    shown = rows[:top] if top else rows
    frame = _frame(shown)
    by_reason: dict[str, int] = {}
    for p in pruned:
        by_reason[p.category] = by_reason.get(p.category, 0) + p.count
    summary = {"explored": explored, "pruned": sum(by_reason.values()), "pruned_by_reason": by_reason,
               "estimated": estimated, "simulated": simulated, "feasible": len(rows), "objective": objective,
               "elapsed_s": time.perf_counter() - t0, **timings, "executor": ex.name, "workers": ex.workers,
               "targets": [f"{t.cluster.num_gpus}x {t.cluster.device.name}" for t in targets]}
    frame.attrs["summary"] = summary
    if list_infeasible:
        frame.attrs["infeasible"] = [{"hardware": p.hardware, "num_gpus": p.num_gpus, **p.fields,
                                      "reason": p.reason, "count": p.count} for p in pruned]
    if not rows:
        frame.attrs["why_empty"] = _why_empty(summary, pruned)
    return frame


def _check_optimizer_tiers(tiers: Sequence[str], targets: list[Target]) -> None:
    """One line, not an empty search, when no target cluster has any tier the optimizer may use."""
    have = frozenset().union(*(target.cluster.tiers for target in targets))
    if not set(tiers) & have:
        raise PlanError(f"offload-optimizer: no cluster searched has {' or '.join(tiers)}; they have "
                        f"{', '.join(sorted(have))}")


def _over_memory(row: dict[str, Any], memory_limit: float | None) -> str:
    """Why an event-simulated plan does not fit, in the words of the analytic pruning."""
    peak = row["peak_memory_bytes"] / 2**30
    if not row["fits"]:
        return row.get("infeasible_reason") or f"out of memory: peak {peak:.1f} GiB (event simulation)"
    return f"constraint: peak memory {peak:.1f} GiB > max-memory {memory_limit / 2**30:.1f} GiB (event simulation)"


def _confirm(spec, rows, key_col, larger, n_confirm, ex, progress, tokens,
             memory_limit: float | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Event-simulate in estimate order while a plan can still enter the top ``n_confirm``.
    Returns the number simulated and the rows whose simulated peak memory does not fit (the
    device, or ``memory_limit``): the estimate's peak is a lower bound for PyTorch plans."""
    if n_confirm <= 0 or not rows:
        return 0, []
    simulated = 0
    over: list[dict[str, Any]] = []
    best: list[float] = []
    i = 0
    batch = max(2, getattr(ex, "workers", 1))
    with _Progress(progress, min(len(rows), n_confirm), "simulating top plans") as bar:
        while i < len(rows) and simulated < MAX_SIMULATED_FACTOR * n_confirm:
            if len(best) >= n_confirm:
                kth = sorted(best, reverse=larger)[n_confirm - 1]
                nxt = rows[i][key_col]
                slack = (1 + ESTIMATE_TOLERANCE)
                if (larger and nxt * slack < kth) or (not larger and nxt > kth * slack):
                    break
            chunk = rows[i:i + batch]
            todo, keys = [], []
            for r in chunk:
                key = _cache_key(spec, r)
                if key in _SIM_CACHE:
                    _apply_sim(r, _SIM_CACHE[key], tokens)
                else:
                    todo.append((spec, r["_target"].cluster, r["_plan"]))
                    keys.append((key, r))
            runner = ex if len(todo) > 1 else InlineExecutor()
            for j, res in runner.map(simulate_task, todo):
                key, r = keys[j]
                _SIM_CACHE[key] = res
                _apply_sim(r, res, tokens)
            for r in chunk:
                simulated += 1
                if not r["fits"] or (memory_limit is not None and r["peak_memory_bytes"] > memory_limit):
                    over.append(r)
                else:
                    best.append(r[key_col])
                bar.advance()
            i += len(chunk)
    return simulated, over


def _cache_key(spec: ModelSpec, row: dict[str, Any]) -> tuple:
    c = row["_target"].cluster
    return (spec, c.name, c.device.profile_key, json.dumps(row["_plan"].to_dict(), sort_keys=True))


def _apply_sim(row: dict[str, Any], res: dict[str, Any], tokens) -> None:
    row["analytic_step_time_s"] = row["step_time_s"]
    row.update({k: v for k, v in res.items()})
    row["evaluated"] = "event"
    _derived(row, tokens)


def _plan_fields(plan: Plan) -> dict[str, Any]:
    special = {"etp": plan.expert_tp, "optimizer_tier": plan.placement("optimizer"),
               "activations_tier": plan.placement("activations")}
    return {k: special[k] if k in special else getattr(plan, k) for k in PLAN_COLUMNS}


def _row(t: Target, plan: Plan, metrics: dict[str, Any], evaluated: str, tokens) -> dict[str, Any]:
    c = t.cluster
    row = {"rank": 0, "hardware": c.device.name, "num_gpus": c.num_gpus, "nodes": c.nodes,
           "gpus_per_node": c.gpus_per_node, **_plan_fields(plan), **metrics, "evaluated": evaluated,
           "analytic_step_time_s": metrics["step_time_s"], "price_per_gpu_hour_usd": t.price,
           "_plan": plan, "_target": t}
    _derived(row, tokens)
    return row


def _derived(row: dict[str, Any], tokens) -> None:
    """Cost per million tokens (price × GPUs × step time / tokens per step) and time to train."""
    step, price, n = row["step_time_s"], row["price_per_gpu_hour_usd"], row["num_gpus"]
    tokens_per_step = row["global_batch"] * row["seq_len"]
    row["cost_per_million_tokens_usd"] = (price * n * step / 3600.0 / tokens_per_step * 1e6
                                          if price is not None and step > 0 else math.nan)
    row["time_to_train_s"] = tokens / row["tokens_per_s"] if tokens and row["tokens_per_s"] > 0 else math.nan
    row["time_to_train_days"] = row["time_to_train_s"] / 86400.0


def _sort_key(row: dict[str, Any], col: str, larger: bool) -> tuple:
    v = row[col]
    v = -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else v
    p = row["_plan"]
    tie = (row["hardware"], row["num_gpus"], p.tp, p.pp, p.dp, p.cp, p.ep, p.zero, p.micro_batch, p.schedule, p.vpp,
           p.recompute)
    return (-v if larger else v, tie)


def _parse_pareto(pareto) -> list[str]:
    if not pareto:
        return []
    items = [p.strip() for p in (pareto.split(",") if isinstance(pareto, str) else pareto) if p.strip()]
    for p in items:
        if p not in PARETO_METRICS:
            raise PlanError(f"pareto: {p!r} is not one of {', '.join(PARETO_METRICS)}")
    if len(items) < 2:
        raise PlanError(f"pareto: needs two or more metrics (e.g. throughput,cost), got {pareto!r}")
    return items


def pareto_front(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The rows of ``frame`` that no other row beats on every one of ``metrics``."""
    keep = _pareto_mask([{PARETO_METRICS[m][0]: r[PARETO_METRICS[m][0]] for m in metrics}
                         for r in frame.to_dict("records")], metrics)
    return frame[keep]


def _pareto_mask(rows: list[dict[str, Any]], metrics: Sequence[str]) -> list[bool]:
    cols = [(PARETO_METRICS[m][0], PARETO_METRICS[m][1]) for m in metrics]
    vals = [[(r[c] if larger else -r[c]) for c, larger in cols] for r in rows]  # larger is better
    keep = []
    for i, a in enumerate(vals):
        if any(math.isnan(x) for x in a):
            keep.append(False)
            continue
        dominated = any(all(b[k] >= a[k] for k in range(len(a))) and any(b[k] > a[k] for k in range(len(a)))
                        for j, b in enumerate(vals) if j != i and not any(math.isnan(x) for x in b))
        keep.append(not dominated)
    return keep


def _pareto(rows: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    mask = _pareto_mask(rows, metrics)
    return [r for r, k in zip(rows, mask) if k]


FRAME_COLUMNS = ("rank", "hardware", "num_gpus", "nodes", "gpus_per_node") + PLAN_COLUMNS + (
    "step_time_s", "tokens_per_s", "mfu", "hfu", "fits", "peak_memory_bytes", "device_memory_bytes", "sm_clock",
    "power_w", "energy_per_token_j",
    "cost_per_million_tokens_usd", "price_per_gpu_hour_usd", "time_to_train_s", "time_to_train_days",
    "evaluated", "analytic_step_time_s", "memory_breakdown", "time_breakdown", "plan", "infeasible_reason")


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    records = []
    for r in rows:
        rec = {k: r.get(k) for k in FRAME_COLUMNS}
        rec["plan"] = r["_plan"].to_dict()
        records.append(rec)
    return pd.DataFrame(records, columns=list(FRAME_COLUMNS))


_PEAK = re.compile(r"peak (?:memory )?([0-9.]+) GiB (>.*)$")


def _why_empty(summary: dict[str, Any], pruned: list[Pruned]) -> str:
    parts = ", ".join(f"{n:,} {reason}" for reason, n in sorted(summary["pruned_by_reason"].items(),
                                                                key=lambda kv: -kv[1]))
    # out of memory ("peak 76.4 GiB > 76.3 GiB usable ...") or over max-memory ("peak memory 18.7 GiB >
    # max-memory 1.0 GiB"): the smallest peak says how far the nearest plan is
    peaks = [m for m in (_PEAK.search(p.reason) for p in pruned) if m]
    hint = ""
    if peaks:
        smallest = min(peaks, key=lambda m: float(m.group(1)))
        hint = f"; the smallest peak is {smallest.group(1)} GiB {smallest.group(2)}"
    return f"no plan fits: {summary['explored']:,} plans explored, all pruned ({parts}){hint}"


class _Progress:
    """A rich progress bar on stderr (only when asked and stderr is a terminal)."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled = enabled and total > 0
        self.total, self.label = total, label
        self._p = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            import sys

            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            console = Console(stderr=True)
            if not (sys.stderr.isatty() or console.is_jupyter):
                self.enabled = False
                return self
            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=console, transient=True)
            self._p.start()
            self._task = self._p.add_task(self.label, total=self.total)
        return self

    def advance(self) -> None:
        if self._p is not None:
            self._p.advance(self._task)

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.stop()


def explain(frame: pd.DataFrame) -> str:
    """Why the first plan beats the second: step time split into compute, exposed communication
    and pipeline bubble, and peak memory (``plansim search --explain``)."""
    if len(frame) < 2:
        return "only one plan: nothing to compare"
    a, b = frame.iloc[0], frame.iloc[1]

    def label(r) -> str:
        return (f"{r['hardware']}×{r['num_gpus']} tp={r['tp']} pp={r['pp']} dp={r['dp']} cp={r['cp']} ep={r['ep']} "
                f"zero={r['zero']} mb={r['micro_batch']} {r['recompute']} {r['schedule']}"
                + (f" vpp={r['vpp']}" if r['vpp'] > 1 else ""))
    lines = [f"winner:    {label(a)}", f"runner-up: {label(b)}"]
    ta, tb = a["time_breakdown"], b["time_breakdown"]
    # per token: plans may differ in global batch
    tok_a, tok_b = a["global_batch"] * a["seq_len"], b["global_batch"] * b["seq_len"]
    lines.append(f"{'per million tokens':<28}{'winner':>12}{'runner-up':>12}{'difference':>12}")
    diffs = []
    for k in ("compute", "exposed_communication", "exposed_transfers", "pipeline_bubble"):
        va, vb = ta.get(k, 0.0) / tok_a * 1e6 * a["num_gpus"], tb.get(k, 0.0) / tok_b * 1e6 * b["num_gpus"]
        diffs.append((vb - va, k))
        lines.append(f"{k.replace('_', ' ') + ' (GPU·s)':<28}{va:>12.4g}{vb:>12.4g}{vb - va:>+12.4g}")
    lines.append(f"{'peak memory (GiB)':<28}{a['peak_memory_bytes'] / 2**30:>12.1f}"
                 f"{b['peak_memory_bytes'] / 2**30:>12.1f}{(b['peak_memory_bytes'] - a['peak_memory_bytes']) / 2**30:>+12.1f}")
    gain, why = max(diffs)
    lines.append(f"the winner saves most on {why.replace('_', ' ')} ({gain:.4g} GPU·s per million tokens)")
    return "\n".join(lines)
