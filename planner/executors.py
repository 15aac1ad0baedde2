"""Where plan evaluations run: inline, a local process pool (the default), or a Ray cluster.

An executor maps one module-level task function over a list of argument tuples and yields
``(index, result)`` as tasks finish; the search puts results back in task order, so the
outcome does not depend on the executor or the number of workers (a test checks local against
Ray).  The tasks themselves (:func:`evaluate_task`, :func:`simulate_task`) are pure functions of
their arguments; each process keeps its own per-(model, cluster) cache of layer costs.

Ray is an optional extra (``pip install 'plansim[ray]'``); ``--address`` joins an existing
cluster (``ray://head:10001`` or ``auto``), otherwise a local Ray instance is started.
"""
from __future__ import annotations

import math
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator, Sequence

import multiprocessing

from plansim.simulator.analytic import AnalyticModel
from plansim.simulator.engine import TrainingSimulation, check_plan_on_cluster
from plansim.simulator.hardware import Cluster
from plansim.simulator.result import build_result
from plansim.workloads.models import ModelSpec
from plansim.workloads.plan import Plan, PlanError
from plansim.workloads.training import TrainingWorkload, split_layers

EXECUTORS = ("local", "ray")

# --- tasks (run in workers) ------------------------------------------------------------------------
_MODELS: dict[tuple, AnalyticModel] = {}


def _analytic(model: ModelSpec, cluster: Cluster) -> AnalyticModel:
    key = (model, cluster.name, cluster.device.profile_key, cluster.nodes, cluster.gpus_per_node)
    am = _MODELS.get(key)
    if am is None:
        if len(_MODELS) > 64:
            _MODELS.clear()
        am = _MODELS[key] = AnalyticModel(model, cluster)
    return am


def _metrics(est_or_result) -> dict[str, Any]:
    r = est_or_result
    return {"step_time_s": r.step_time_s, "tokens_per_s": r.tokens_per_s, "mfu": r.mfu, "hfu": r.hfu,
            "fits": r.fits, "peak_memory_bytes": r.peak_memory_bytes, "device_memory_bytes": r.device_memory_bytes,
            "memory_breakdown": dict(r.memory_breakdown), "time_breakdown": dict(r.time_breakdown),
            "infeasible_reason": r.infeasible_reason, "sm_clock": r.sm_clock, "power_w": r.power_w,
            "energy_per_token_j": r.energy_per_token_j}


#: the policies each one re-runs a superset of (so they are faster wherever they fit); Megatron's
#: selective (the attention core) and torchtitan's op-level policy (GEMMs and elementwise ops)
#: re-run different things, and neither dominates the other
_RERUNS_LESS = {"none": (), "selective": ("none",), "selective-op": ("none",),
                "full": ("none", "selective", "selective-op")}
_RECOMPUTE_ORDER = {r: i for i, r in enumerate(_RERUNS_LESS)}
#: optimizer placements that run no slower than each (the engine: CPU Adam after the gradients
#: come down; from NVMe or CXL memory also the states' reads and writes beside it), for the
#: same dominance as recomputation's: a plan is dropped where one of these fits
_FASTER_TIERS = {"gpu": (), "cpu": ("gpu",), "nvme": ("gpu", "cpu"), "cxl": ("gpu", "cpu")}
_TIER_ORDER = {t: i for i, t in enumerate(_FASTER_TIERS)}


def _fewest_recomputed_layers(am: AnalyticModel, plan: Plan, limit: float) -> tuple[Plan, Any] | None:
    """The fitting plan that recomputes the fewest layers per chunk (``recompute_layers``) of a
    plan that fits with full recomputation: memory only falls and time only rises as more layers
    are recomputed, so the smallest count that fits is the one to take.  None when only recomputing every layer fits."""
    layers = max(split_layers(am.model.num_layers, plan.pp * plan.vpp, plan.first_stage_layers,
                              plan.last_stage_layers))

    def fitting(k: int):
        candidate = plan.replace(recompute_layers=k)
        mem, reason = am.memory_of(candidate)
        return (candidate, mem) if reason is None and mem.peak <= limit else None

    if layers < 2:
        return None
    # the ends first: one evaluation settles a plan that fits recomputing a single layer, two one
    # that needs every layer recomputed; bisection between them otherwise
    found = fitting(1)
    if found is not None or layers == 2:
        return found
    found = fitting(layers - 1)
    lo, hi = 2, layers - 2
    while found is not None and lo <= hi:
        k = (lo + hi) // 2
        smaller = fitting(k)
        if smaller is not None:
            found, hi = smaller, k - 1
        else:
            lo = k + 1
    return found


def evaluate_task(model: ModelSpec, cluster: Cluster, plans: Sequence[Plan], memory_limit: float | None,
                  prune_dominated: bool, partial_recompute: bool = False) -> list[dict[str, Any]]:
    """Exact memory, then the analytic estimate, for each plan.  Returns one dict per plan with
    either the metrics or ``pruned`` (the reason).  With ``prune_dominated``, a plan is dropped
    when the same plan with less recomputation fits (it is slower at the same memory ceiling).
    Each estimate carries the ``plan`` it is of: with ``partial_recompute``, a plan that fits with
    full recomputation is replaced by the one recomputing the fewest layers per chunk that fits."""
    am = _analytic(model, cluster)
    out: list[dict[str, Any] | None] = [None] * len(plans)
    fitting: dict[tuple, list[tuple[str, str]]] = {}
    order = sorted(range(len(plans)), key=lambda i: (_RECOMPUTE_ORDER[plans[i].recompute],
                                                     _TIER_ORDER[plans[i].placement("optimizer")],
                                                     plans[i].placement("activations") != "gpu"))
    for i in order:
        plan = plans[i]
        sibling = (plan.tp, plan.pp, plan.dp, plan.cp, plan.ep, plan.etp, plan.zero, plan.micro_batch, plan.global_batch,
                   plan.schedule, plan.vpp, plan.microbatch_group)
        recompute, tier, acts_away = plan.recompute, plan.placement("optimizer"), plan.placement("activations") != "gpu"
        lighter = [(r, t) for r, t in fitting.get(sibling, ())
                   if (r == recompute or r in _RERUNS_LESS[recompute]) and (t == tier or t in _FASTER_TIERS[tier])]
        if prune_dominated and lighter:
            r, t = lighter[0]
            out[i] = {"pruned": "dominated: " + (f"recompute={r} fits with less recomputation" if t == tier else
                      f"recompute={r} with the optimizer on the {t} fits (offload only adds time)")
                      + (" and its activations on the GPU" if acts_away else "")}
            continue
        try:
            check_plan_on_cluster(plan, cluster)  # e.g. fp8 on a GPU without fp8 tensor cores
            mem, reason = am.memory_of(plan)
            peak = mem.peak
        except PlanError as exc:
            out[i] = {"pruned": str(exc)}
            continue
        if reason is not None:
            out[i] = {"pruned": reason, "peak_memory_bytes": peak}
            continue
        if memory_limit is not None and peak > memory_limit:
            out[i] = {"pruned": f"constraint: peak memory {peak / 2**30:.1f} GiB > max-memory "
                                f"{memory_limit / 2**30:.1f} GiB", "peak_memory_bytes": peak}
            continue
        if not acts_away:  # an activation-offload plan's peak is a lower bound: it dominates nothing
            fitting.setdefault(sibling, []).append((recompute, tier))
        if partial_recompute and plan.recompute == "full" and not plan.partial_recompute:
            limit = memory_limit if memory_limit is not None else math.inf
            plan, mem = _fewest_recomputed_layers(am, plan, limit) or (plan, mem)
        out[i] = {**_metrics(am.estimate(plan, mem)), "plan": plan}
    return out  # type: ignore[return-value]


def simulate_task(model: ModelSpec, cluster: Cluster, plan: Plan) -> dict[str, Any]:
    """The event simulation of one plan (the engine, as ``plansim simulate`` runs it)."""
    output = TrainingSimulation(TrainingWorkload(model, plan), cluster).run()
    return _metrics(build_result(output, model=model, plan=plan, cluster=cluster, calibrated=None))


# --- executors -------------------------------------------------------------------------------------
def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent


class InlineExecutor:
    """Runs tasks in this process, one after another."""

    name = "inline"
    workers = 1

    def map(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        for i, args in enumerate(tasks):
            yield i, fn(*args)

    def close(self) -> None:
        pass


class LocalExecutor:
    """A local process pool (fork where available: workers inherit the imported modules)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or min(8, os.cpu_count() or 1))
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_ignore_sigint)
        return self._pool

    def map(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        if self.workers == 1 or len(tasks) <= 1:
            yield from InlineExecutor().map(fn, tasks)
            return
        pool = self._get_pool()
        futures = {pool.submit(fn, *args): i for i, args in enumerate(tasks)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield futures[fut], fut.result()
        except BaseException:
            for fut in pending:
                fut.cancel()
            self.close(cancel=True)
            raise

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
            self._pool = None


class RayExecutor:
    """Ray tasks: the same task functions as the local pool, so results are identical."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise PlanError("executor: 'ray' needs the ray extra (pip install 'plansim[ray]')") from None
        self._ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                                      "include_dashboard": False, "configure_logging": False}
            if address:
                kwargs["address"] = address
            elif workers:
                kwargs["num_cpus"] = workers
            ray.init(**kwargs)
        self.workers = workers or int(ray.cluster_resources().get("CPU", 1))
        self._remote: dict[Callable, Any] = {}

    def map(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = ray.remote(fn)
        refs = {}
        shared: dict[int, Any] = {}
        for i, args in enumerate(tasks):
            # model and cluster repeat across tasks: put each once in the object store
            put = []
            for a in args[:2]:
                key = id(a)
                if key not in shared:
                    shared[key] = ray.put(a)
                put.append(shared[key])
            refs[remote.remote(*put, *args[2:])] = i
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield refs[ref], ray.get(ref)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def close(self) -> None:
        pass  # the Ray instance outlives one search (starting it is the expensive part)


def make_executor(kind: str = "local", workers: int | None = None, address: str | None = None):
    if address is not None and kind != "ray":
        raise PlanError(f"address: a Ray cluster address needs executor 'ray', got {kind!r}")
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "inline":
        return InlineExecutor()
    if kind == "ray":
        return RayExecutor(address, workers)
    raise PlanError(f"executor: {kind!r} is not one of {', '.join(EXECUTORS)}")
