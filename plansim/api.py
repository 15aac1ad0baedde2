"""The public Python API.  The CLI is a thin shell over these functions."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from plansim.simulator.calibration import apply_calibration, calibrate_cluster
from plansim.simulator.costs.collectives import Group, collective_cost, nccl_tests_bandwidths
from plansim.simulator.costs import compute
from plansim.simulator.costs.power import with_power_limit
from plansim.simulator.engine import TrainingSimulation
from plansim.simulator.hardware import Cluster, ProfileError, build_cluster, load_device
from plansim.simulator.result import Result, build_result
from plansim.workloads.model_io import load_model
from plansim.workloads.models import ModelSpec
from plansim.workloads.plan import Plan, PlanError, check_positive_int
from plansim.workloads.training import TrainingWorkload


def resolve_cluster(hardware: str | None = None, cluster: str | Cluster | None = None, *,
                    nodes: int | None = None, gpus_per_node: int | None = None,
                    nics_per_node: int | None = None, nic_gbps: float | None = None,
                    calibrated: bool = True, power_limit_w: float | None = None) -> tuple[Cluster, str | None]:
    """The cluster to simulate on, with the device's calibrated profile applied if one exists
    and its board power limit set to ``power_limit_w`` if given."""
    if isinstance(cluster, Cluster):
        base = cluster
    else:
        base = build_cluster(hardware, cluster, nodes, gpus_per_node, nics_per_node, nic_gbps)
    machine, source = calibrate_cluster(base) if calibrated else (base, None)
    return with_power_limit(machine, power_limit_w), source


def load_plan(path: str | Path) -> dict[str, Any]:
    """Plan fields from a YAML or JSON file (``--plan plan.yaml``)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise PlanError(f"plan: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"plan: {path} is not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PlanError(f"plan: {path} must hold a mapping of plan fields")
    return data


def simulate(model: str | ModelSpec, hardware: str | None = None, cluster: str | Cluster | None = None,
             plan: Plan | dict[str, Any] | None = None, *, nodes: int | None = None,
             gpus_per_node: int | None = None, nics_per_node: int | None = None, nic_gbps: float | None = None,
             trace: bool = False, trace_detail: str = "phase", calibrated: bool = True,
             power_limit_w: float | None = None) -> Result:
    """Simulate one training iteration of ``model`` under ``plan`` on a cluster.

    ``plan`` may omit ``dp``: it is then the GPU count over tp·pp·cp.  A plan that does not fit
    in memory is returned with ``fits=False`` and the reason, not raised.  ``power_limit_w``
    caps the GPUs' board power (as ``nvidia-smi -pl`` does); the default is the datasheet limit.
    """
    spec = load_model(model) if not isinstance(model, ModelSpec) else model
    machine, source = resolve_cluster(hardware, cluster, nodes=nodes, gpus_per_node=gpus_per_node,
                                      nics_per_node=nics_per_node, nic_gbps=nic_gbps, calibrated=calibrated,
                                      power_limit_w=power_limit_w)
    plan = complete_plan(plan, machine)
    if plan.world_size != machine.num_gpus:
        raise PlanError(f"dp: tp·pp·dp·cp = {plan.tp}·{plan.pp}·{plan.dp}·{plan.cp} = {plan.world_size} "
                        f"must equal the cluster's {machine.num_gpus} GPUs")
    workload = TrainingWorkload(spec, plan)
    output = TrainingSimulation(workload, machine, record_trace=trace, trace_detail=trace_detail).run()
    return build_result(output, model=spec, plan=plan, cluster=machine, calibrated=source)


def complete_plan(plan: Plan | dict[str, Any] | None, cluster: Cluster) -> Plan:
    """A Plan from a Plan or a dict of fields; dp defaults to what the GPU count leaves."""
    if isinstance(plan, Plan):
        return plan
    fields = {k: v for k, v in dict(plan or {}).items() if v is not None}
    for name in ("tp", "pp", "cp"):
        if name in fields:
            check_positive_int(name, fields[name])
    if fields.get("dp") is None:
        inner = fields.get("tp", 1) * fields.get("pp", 1) * fields.get("cp", 1)
        if cluster.num_gpus % inner:
            raise PlanError(f"dp: the cluster's {cluster.num_gpus} GPUs are not a multiple of tp·pp·cp = {inner}")
        fields["dp"] = cluster.num_gpus // inner
    if "global_batch" not in fields:
        fields["global_batch"] = fields["dp"] * fields.get("micro_batch", 1)
    return Plan.from_dict(fields)


def predict_op(kind: str, hardware: str, *, calibrated: bool = True, **shape: Any) -> dict[str, float]:
    """Time and achieved rate of one kernel (``plansim op``)."""
    device = load_device(hardware)
    source = None
    if calibrated:
        device, source = apply_calibration(device)
    if kind == "gemm":
        m, n, k, dtype = shape["m"], shape["n"], shape["k"], shape.get("dtype", "bf16")
        t = float(compute.gemm_time(m, n, k, dtype, device, split_accumulate=bool(shape.get("split_accumulate"))))
        return {"time_s": t, "tflops": 2.0 * m * n * k / t / 1e12, "calibrated_profile": source}
    if kind == "attention":
        phase = shape.get("phase", "forward")
        b, heads, d, s = shape["batch"], shape["heads"], shape["head_dim"], shape["seq_len"]
        kv = shape.get("kv_heads") or heads
        causal = bool(shape.get("causal", False))
        t = float(compute.attention_time(b, heads, kv, d, s, s, causal, phase, device,
                                         impl=shape.get("attention") or "flash"))
        # the MFU convention counts all score FLOPs (DESIGN.md); report the executed rate too
        executed = float(compute.attention_flops(b, heads, d, s, s, causal, phase))
        return {"time_s": t, "tflops": executed / t / 1e12, "calibrated_profile": source}
    if kind in ("memcpy", "elementwise"):
        nbytes = shape["bytes"]
        fn = compute.memcpy_time if kind == "memcpy" else compute.elementwise_time
        t = float(fn(nbytes, device))
        moved = nbytes * (2 if kind == "memcpy" else 3)
        return {"time_s": t, "bandwidth_GBps": moved / t / 1e9, "calibrated_profile": source}
    if kind in ("h2d", "d2h"):
        from plansim.simulator.costs.transfers import host_transfer_time
        cluster, _ = resolve_cluster(hardware, calibrated=calibrated)
        t = float(host_transfer_time(shape["bytes"], cluster.host_link, pinned=not shape.get("pageable", False),
                                     direction=kind))
        return {"time_s": t, "bandwidth_GBps": shape["bytes"] / t / 1e9, "calibrated_profile": source}
    raise ValueError(f"kind: {kind!r} is not one of gemm, attention, memcpy, elementwise, h2d, d2h")


def predict_collective(op: str, nbytes: float, hardware: str | None = None, cluster: str | Cluster | None = None, *,
                       nodes: int | None = None, gpus_per_node: int | None = None, ranks: int | None = None,
                       algorithm: str = "auto", calibrated: bool = True) -> dict[str, float]:
    """One collective as nccl-tests would measure it (``plansim collective``)."""
    machine, source = resolve_cluster(hardware, cluster, nodes=nodes, gpus_per_node=gpus_per_node,
                                      calibrated=calibrated)
    n = ranks or machine.num_gpus
    if n < 2:
        raise PlanError(f"ranks: a collective needs at least 2 GPUs, the cluster {machine.name} has {n}")
    group = Group(n, min(n, machine.gpus_per_node))
    if op == "send_recv":
        group = Group(2, 2 if machine.nodes == 1 else 1)
        n = 2
    t = collective_cost(op, nbytes, group, machine, algorithm).time_s
    algbw, busbw = nccl_tests_bandwidths(op, nbytes, n, t)
    return {"time_s": t, "algbw_gbps": algbw / 1e9, "busbw_gbps": busbw / 1e9, "ranks": n,
            "calibrated_profile": source}


__all__ = ["simulate", "predict_op", "predict_collective", "resolve_cluster", "complete_plan", "load_plan",
           "Plan", "PlanError", "ProfileError", "Result"]
