"""Fit cost-model parameters to the calibration split (``plansim calibrate``).

For each device measured under ``validation/data/<gpu>-x<count>/`` this fits, by bounded least
squares on log(predicted / measured) (``scipy.optimize.least_squares``, soft-L1 loss so that a
few odd kernels do not pull the rest), the parameters of the cost models' physical forms:

* device (simulator/costs/compute.py), from ``kernels.csv``: ``achievable_gemm_fraction``,
  ``gemm_k_overhead`` (per-tile prologue/epilogue in K elements), ``kernel_launch_s``,
  ``achievable_hbm_bw_Bps``, ``attention_fraction``, ``attention_bwd_ratio``, the flash-attention
  CTAs' fixed work (``attention_fwd_cta_overhead``, ``attention_bwd_cta_overhead``) — all bounded to physical ranges (fractions ≤ 1, bandwidth ≤ datasheet);
* host link (simulator/costs/transfers.py), from ``transfers.csv``: PCIe ``achievable_bw_Bps``
  and ``latency_s`` on pinned copies, then ``pageable_fraction`` on pageable ones;
* intra-node link (simulator/costs/collectives.py), from ``collectives.csv``: NVLink
  ``achievable_bw_Bps`` from cases of 1 MiB and more, ``latency_s`` from the smaller ones
  (alternating, three rounds), for the group size measured (2 GPUs on the H200 host).

Only rows with ``split == calibration`` are used; the case ids are written into the profile
(``case_ids``) so that ``validate`` can prove it never scores them.  The result is
``hardware_profiles/calibrated/<device>.yaml`` (format: simulator/calibration.py).
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import least_squares

from plansim.simulator.costs import compute
from plansim.simulator.hardware import Cluster, Device, Link
from plansim.validation.compare import (CALIBRATED_DIR, DATA_DIR, KERNEL_KINDS, SPLIT_ACCUMULATE_IMPLS, MiB,
                                        TRANSFER_KINDS, attention_of, base_cluster, data_folders, device_for_folder,
                                        load_suite, predict_collective, predict_kernel, rel)
from plansim.validation.power import fit_power, fits_own_draws

#: (field, lower bound, upper bound); a callable bound takes the datasheet device
KERNEL_PARAMETERS: tuple[tuple[str, object, object, tuple[str, ...]], ...] = (
    # field, lower, upper, kernel kinds that identify it
    ("achievable_gemm_fraction", 0.2, 1.0, ("gemm",)),
    ("gemm_k_overhead", 1.0, 4096.0, ("gemm",)),
    ("kernel_launch_s", 0.2e-6, 30e-6, KERNEL_KINDS),
    ("achievable_hbm_bw_Bps", lambda d: 0.3 * d.hbm_bw_Bps, lambda d: d.hbm_bw_Bps, ("memcpy", "elementwise")),
    ("attention_fraction", 0.05, 1.0, ("attention",)),
    ("attention_bwd_ratio", 0.1, 2.0, ("attention",)),
    ("attention_fwd_cta_overhead", 1.0, 4096.0, ("attention",)),
    ("attention_bwd_cta_overhead", 1.0, 4096.0, ("attention",)),
    ("attention_head_dim_half", 1.0, 1024.0, ("attention",)),
    ("attention_bwd_wide_exponent", 0.01, 4.0, ("attention",)),
    ("unaligned_gemm_fraction", 0.02, 1.0, ("gemm",)),
    ("fp8_gemm_fraction", 0.5, 1.0, ("gemm",)),
    ("fp8_split_accumulate_ratio", 0.5, 1.0, ("gemm",)),
    ("norm_bandwidth_fraction", 0.2, 1.0, ("rmsnorm", "layernorm")),
)
DEFAULTS = {"gemm_k_overhead": compute.DEFAULT_GEMM_K_OVERHEAD, "attention_bwd_ratio": compute.DEFAULT_ATTENTION_BWD_RATIO,
            "attention_fwd_cta_overhead": compute.DEFAULT_ATTENTION_FWD_CTA_OVERHEAD,
            "attention_bwd_cta_overhead": compute.DEFAULT_ATTENTION_BWD_CTA_OVERHEAD,
            "attention_head_dim_half": compute.DEFAULT_ATTENTION_HEAD_DIM_HALF,
            "attention_bwd_wide_exponent": 1.0,  # the fit's start (the model's default, 0, has no log)
            "unaligned_gemm_fraction": compute.DEFAULT_UNALIGNED_GEMM_FRACTION,
            "fp8_gemm_fraction": compute.DEFAULT_FP8_GEMM_FRACTION,
            "fp8_split_accumulate_ratio": compute.DEFAULT_FP8_SPLIT_ACCUMULATE_RATIO,
            "norm_bandwidth_fraction": compute.DEFAULT_NORM_BANDWIDTH_FRACTION}


def _fit_log(residual: Callable[[dict], np.ndarray], names: Sequence[str], start: dict, lo: dict, hi: dict) -> dict:
    """Bounded least squares over log-parameters; returns the fitted values."""
    names = list(names)
    if not names:
        return {}
    lo_v = np.log([lo[n] for n in names])
    hi_v = np.log([hi[n] for n in names])
    x0 = np.clip(np.log([start[n] for n in names]), lo_v + 1e-9, hi_v - 1e-9)

    def fun(x):
        return residual(dict(zip(names, np.exp(x))))

    sol = least_squares(fun, x0, bounds=(lo_v, hi_v), loss="soft_l1", f_scale=0.05, x_scale=1.0)
    return {n: float(v) for n, v in zip(names, np.exp(sol.x))}


def _log_ratio(pred: Iterable[float], meas: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(list(pred), float), 1e-30) / meas)


def _stats(res: np.ndarray) -> dict:
    err = np.expm1(res)
    return {"rows": int(len(err)), "median_abs_error": round(float(np.median(np.abs(err))), 4),
            "p90_abs_error": round(float(np.percentile(np.abs(err), 90)), 4)}


def _unaligned(row) -> bool:
    """A GEMM row whose K or N leading dimension breaks the 16-byte alignment rule."""
    if row["kind"] != "gemm":
        return False
    elem = compute.DTYPE_BYTES[row["dtype"]]
    return bool((int(row["k"]) * elem) % compute.ALIGNMENT_BYTES or (int(row["n"]) * elem) % compute.ALIGNMENT_BYTES)


#: kernel kinds the fit uses: all but the fp8 casts, which test (held out, never fitted) that a cast
#: streams at the rate the elementwise ops set
FITTED_KINDS = tuple(k for k in KERNEL_KINDS if k != "cast")
#: fitted parameters a GPU of the same die takes where its own data cannot identify them: the
#: kernel library's (cuDNN attention, fp8 GEMM shares) and the host software's cost of one NCCL
#: call (PyTorch c10d and NCCL on this environment's leases, measured where 2 GPUs were lent)
DIE_PARAMETERS = ("cudnn_attention", "fp8_gemm_fraction", "fp8_split_accumulate_ratio", "attention_bwd_wide_exponent",
                  "collective_launch_s")
#: the attention parameters cuDNN's fused attention gets its own values of (Device.cudnn_attention)
CUDNN_ATTENTION_PARAMETERS = tuple(p for p in KERNEL_PARAMETERS if p[0].startswith("attention_"))
#: parameters only some rows of a kind identify: without such a row in the split, none is fitted
IDENTIFIED_BY = {
    "unaligned_gemm_fraction": _unaligned,
    "fp8_gemm_fraction": lambda r: r["kind"] == "gemm" and r["dtype"] == "fp8",
    "fp8_split_accumulate_ratio": lambda r: r.get("impl") in SPLIT_ACCUMULATE_IMPLS,
    "attention_bwd_wide_exponent": lambda r: (r["kind"] == "attention" and r["phase"] == "backward"
                                              and float(r["head_dim"]) > 128),
}


def _is_cudnn(row) -> bool:
    return row["kind"] == "attention" and attention_of(row.get("impl")) == "cudnn"


def fit_device(device: Device, kernels: pd.DataFrame) -> tuple[dict, dict]:
    """Device parameters fitted on calibration kernels: (parameters, fit statistics).  The
    cuDNN attention rows are fitted after the rest, their own ``attention_*`` parameters on the
    device the other kernels gave (``cudnn_attention``)."""
    records = [r for r in kernels.to_dict("records") if r["kind"] in FITTED_KINDS]
    params, stats = _fit_kernels(device, [r for r in records if not _is_cudnn(r)], KERNEL_PARAMETERS)
    cudnn = [r for r in records if _is_cudnn(r)]
    if cudnn:  # starting from the FlashAttention-2 fit
        got, cudnn_stats = _fit_kernels(device.model_copy(update=params), cudnn, CUDNN_ATTENTION_PARAMETERS,
                                        within="cudnn_attention")
        params["cudnn_attention"] = got
        stats["cudnn attention"] = cudnn_stats["kernels"]
    return params, stats


def _fit_kernels(device: Device, rows: list[dict], parameters, within: str | None = None) -> tuple[dict, dict]:
    """Those of ``parameters`` (KERNEL_PARAMETERS rows) that ``rows`` identify, fitted to them;
    ``within``: a device field holding them as a dict (``cudnn_attention``), not the fields themselves."""
    if not rows:
        return {}, {}
    kinds = {r["kind"] for r in rows}
    meas = np.array([float(r["time_s"]) for r in rows])
    names, lo, hi, start = [], {}, {}, {}
    for name, low, high, needs in parameters:
        if not kinds & set(needs):
            continue
        if name in IDENTIFIED_BY and not any(IDENTIFIED_BY[name](r) for r in rows):
            continue  # e.g. no calibration GEMM is misaligned: the data cannot identify it
        names.append(name)
        lo[name] = low(device) if callable(low) else low
        hi[name] = high(device) if callable(high) else high
        value = getattr(device, name, None)
        start[name] = float(value if value is not None else DEFAULTS[name])

    def residual(params: dict) -> np.ndarray:
        trial = device.model_copy(update={within: params} if within else params)
        return _log_ratio((predict_kernel(r, trial) for r in rows), meas)

    params = _fit_log(residual, names, start, lo, hi)
    return params, {"kernels": _stats(residual(params))}


def fit_host_link(link: Link, transfers: pd.DataFrame) -> tuple[dict, dict]:
    """PCIe achievable bandwidth and latency (pinned copies), then the pageable fraction of
    each direction."""
    rows = [r for r in transfers.to_dict("records") if r["kind"] in TRANSFER_KINDS]
    pinned = [r for r in rows if r["memory"] == "pinned"]
    pageable = [r for r in rows if r["memory"] == "pageable"]
    cluster_link: dict = {}
    stats: dict = {}
    if pinned:
        meas = np.array([float(r["time_s"]) for r in pinned])

        def res_pinned(p):
            trial = link.model_copy(update=p)
            return _log_ratio((_host(r, trial) for r in pinned), meas)

        cluster_link = _fit_log(res_pinned, ["achievable_bw_Bps", "latency_s"],
                                {"achievable_bw_Bps": link.achievable_bw_Bps, "latency_s": link.latency_s},
                                {"achievable_bw_Bps": 0.05 * link.bw_Bps, "latency_s": 0.1e-6},
                                {"achievable_bw_Bps": link.bw_Bps, "latency_s": 100e-6})
        stats["transfers pinned"] = _stats(res_pinned(cluster_link))
    base = link.model_copy(update=cluster_link)
    for direction, field in (("h2d", "pageable_fraction"), ("d2h", "pageable_d2h_fraction")):
        part = [r for r in pageable if r["kind"] == direction]
        if not part:
            continue
        meas = np.array([float(r["time_s"]) for r in part])

        def res_pageable(p, part=part, meas=meas):
            trial = base.model_copy(update=p)
            return _log_ratio((_host(r, trial) for r in part), meas)

        got = _fit_log(res_pageable, [field], {field: 0.5}, {field: 0.02}, {field: 1.0})
        cluster_link.update(got)
        base = base.model_copy(update=got)
        stats[f"transfers pageable {direction}"] = _stats(res_pageable(got))
    return cluster_link, stats


def _host(row, link: Link) -> float:
    from plansim.simulator.costs.transfers import host_transfer_time
    return float(host_transfer_time(float(row["bytes"]), link, pinned=row["memory"] == "pinned",
                                    direction=row["kind"]))


#: the collectives NCCL runs as rings inside a node (their busbw depends on the ring's size)
RING_OPS = ("all_reduce", "all_gather", "reduce_scatter")


def fit_intra_link(cluster: Cluster, collectives: pd.DataFrame) -> tuple[dict, dict, dict]:
    """NVLink collectives, latency plus bytes over bandwidth per collective (issue 9: "latency
    and bandwidth per algorithm and group size"): the host's floor per NCCL call is the median
    time of the cases of 64 KiB and less (where bytes cost nothing); then, on the cases of 1 MiB
    and more, the achievable bus bandwidth, each collective's bandwidth relative to all-reduce's
    and each collective's latency beyond NCCL's protocol model; where rings of several sizes were
    measured, the busbw of each smaller ring relative to the largest's (``ring_busbw_by_ranks``:
    NCCL's rings on NVSwitch reach less with fewer ranks).  The per-hop latencies stay NCCL's
    (tuning.cc).  Returns (link parameters, device parameters, fit statistics)."""
    rows = [r for r in collectives.to_dict("records") if int(r["group_size"]) > 1]
    if not rows:
        return {}, {}, {}
    link = cluster.intra_node_link
    tiny = [r for r in rows if float(r["bytes"]) <= 64 * 1024]
    big = [r for r in rows if float(r["bytes"]) >= MiB]
    device_params = {}
    if tiny:
        device_params["collective_launch_s"] = float(np.median(
            [float(r["time_s"]) / (2 if r["op"] == "send_recv" else 1) for r in tiny]))
    base = cluster.model_copy(update={"device": cluster.device.model_copy(update=device_params)})
    ops = sorted({r["op"] for r in big})
    rings = sorted({int(r["group_size"]) for r in big if r["op"] in RING_OPS})
    names = (["achievable_bw_Bps"] + [f"eff:{op}" for op in ops if op != "all_reduce"] + [f"lat:{op}" for op in ops]
             + [f"ring:{n}" for n in rings[:-1]])
    start = {"achievable_bw_Bps": link.achievable_bw_Bps, **{n: 1.0 for n in names if n[:4] in ("eff:", "ring")},
             **{n: 5e-6 for n in names if n.startswith("lat:")}}
    lo = {"achievable_bw_Bps": 0.05 * link.bw_Bps, **{n: 0.3 for n in names if n[:4] in ("eff:", "ring")},
          **{n: 0.01e-6 for n in names if n.startswith("lat:")}}
    hi = {"achievable_bw_Bps": link.bw_Bps, **{n: 1.5 for n in names if n.startswith("eff:")},
          **{n: 1.0 for n in names if n.startswith("ring:")}, **{n: 200e-6 for n in names if n.startswith("lat:")}}

    def machine(p: dict) -> Cluster:
        eff = {k[4:]: v for k, v in p.items() if k.startswith("eff:")}
        lat = {k[4:]: v for k, v in p.items() if k.startswith("lat:")}
        ring = {int(k[5:]): v for k, v in p.items() if k.startswith("ring:")}
        update = {"achievable_bw_Bps": p["achievable_bw_Bps"], "op_efficiency": eff or None, "op_latency_s": lat or None}
        if ring:  # the largest ring measured is the reference (1.0)
            update["ring_busbw_by_ranks"] = {**ring, rings[-1]: 1.0}
        return base.model_copy(update={"intra_node_link": link.model_copy(update=update)})

    def residual_on(part, p):
        meas = np.array([float(r["time_s"]) for r in part])
        trial = machine(p)
        return _log_ratio((predict_collective(r, trial) for r in part), meas)

    params = _fit_log(lambda p: residual_on(big, {**start, **p}), names, start, lo, hi) if big else dict(start)
    fitted = machine(params).intra_node_link
    link_params = {"achievable_bw_Bps": fitted.achievable_bw_Bps}
    if fitted.op_efficiency:
        link_params["op_efficiency"] = dict(fitted.op_efficiency)
    if fitted.op_latency_s:
        link_params["op_latency_s"] = dict(fitted.op_latency_s)
    if len(rings) > 1:
        link_params["ring_busbw_by_ranks"] = dict(fitted.ring_busbw_by_ranks)
    stats = {"collectives": _stats(residual_on(rows, params))}
    if big:
        stats["collectives >= 1 MiB"] = _stats(residual_on(big, params))
    return link_params, device_params, stats


def _sig(value, digits: int = 4):
    """Round to ``digits`` significant figures (mappings element by element)."""
    if isinstance(value, dict):
        return {k: _sig(v, digits) for k, v in value.items()}
    return float(f"{value:.{digits}g}")


def calibrate(data_dir: Path | str = DATA_DIR, devices: Sequence[str] | None = None,
              out_dir: Path | str = CALIBRATED_DIR) -> dict[str, Path]:
    """Fit every device measured under ``data_dir`` (or only ``devices``) on the calibration
    split and write ``<out_dir>/<device>.yaml``; returns device -> written path."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    by_device: dict[str, list[Path]] = {}
    for folder in data_folders(data_dir, devices):
        by_device.setdefault(device_for_folder(folder), []).append(folder)
    if devices:
        missing = sorted(set(devices) - set(by_device))
        if missing:
            raise ValueError(f"device: no measurements of {', '.join(missing)} under {data_dir}")
    written: dict[str, Path] = {}
    # per die, the fits a GPU of that die without its own measurements takes: the power model's
    # (no powerkernels streams) and DIE_PARAMETERS (no cuDNN, fp8, wide-head or collective rows).
    # Every device's kernels are fitted first, so that any GPU of a die lends its kernel fits to
    # the others whatever the order; the power fits and the collectives' call cost follow in order
    shared: dict[str, dict[tuple, dict]] = {"power": {}, "die": {}}
    kernel_fits = {}
    for name, folders in sorted(by_device.items()):
        kernels = _gather(folders, "kernels", KERNEL_KINDS)
        device = base_cluster(folders[0]).device
        kernel_fits[name] = (kernels, *(fit_device(device, kernels) if not kernels.empty else ({}, {})))
        _fill_die_fits(shared["die"].setdefault(_die(device), {}), kernel_fits[name][1])
    for name, folders in sorted(by_device.items(), key=lambda item: (not _fits_own_draws(item[1]), item[0])):
        written[name] = _calibrate_device(name, folders, out_dir, shared, *kernel_fits[name])
    return written


def _gather(folders: list[Path], suite: str, kinds=None) -> pd.DataFrame:
    """The calibration rows of one suite over ``folders`` (optionally of some kinds), tagged with
    their folder."""
    parts = []
    for folder in folders:
        part = load_suite(folder, suite, "calibration")
        if not part.empty and kinds is not None:
            part = part[part["kind"].isin(kinds)]
        if not part.empty:
            parts.append(part.assign(_folder=folder.name))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _fill_die_fits(target: dict, source: dict) -> None:
    """Give ``target`` the DIE_PARAMETERS fits of ``source`` it lacks, its own values winning (a
    dict, cuDNN's attention parameters, gains the keys it lacked).  Lending a device's fits to its
    die's store and borrowing the store's into a device are the same filling."""
    for field in DIE_PARAMETERS:
        if field not in source:
            continue
        if field not in target:
            target[field] = source[field]
        elif isinstance(target[field], dict) and isinstance(source[field], dict):
            target[field] = {**source[field], **target[field]}


def _fits_own_draws(folders: list[Path]) -> bool:
    return any(fits_own_draws(folder / "power") for folder in folders)


def _die(device: Device) -> tuple:
    """What two GPUs of one die share (H100 SXM and H200: GH100, 132 SMs, the same peaks)."""
    return device.vendor, device.compute_units, tuple(sorted(device.peak_flops.items()))


def _calibrate_device(name: str, folders: list[Path], out_dir: Path, shared: dict[str, dict[tuple, dict]],
                      kernels: pd.DataFrame, params: dict, stats: dict) -> Path:
    """Write one device's profile from its kernel fit (``params``, ``stats`` on ``kernels``), what
    its die lends, and the fits of its links, collectives and power."""
    cluster = base_cluster(folders[0])
    transfers = _gather(folders, "transfers", TRANSFER_KINDS)
    collectives = _gather(folders, "collectives")
    if not collectives.empty:
        collectives = collectives[collectives["group_size"].astype(int) > 1]

    params, stats = dict(params), dict(stats)
    die_fits = shared["die"].setdefault(_die(cluster.device), {})
    _fill_die_fits(params, die_fits)
    device = cluster.device.model_copy(update=params)
    links: dict[str, dict] = {}
    if not transfers.empty:
        host, s = fit_host_link(cluster.host_link, transfers)
        links[cluster.host_link.name] = host
        stats.update(s)
    if not collectives.empty:
        multi = [f for f in folders if (f / "collectives.csv").is_file()]
        machine = base_cluster(multi[0]).model_copy(update={"device": device})
        intra, device_extra, s = fit_intra_link(machine, collectives)
        links[machine.intra_node_link.name] = intra
        params.update(device_extra)
        stats.update(s)
        _fill_die_fits(die_fits, device_extra)  # the NCCL call's host cost, for a GPU of the die measured later
    _fill_die_fits(params, die_fits)

    used = {"kernels": kernels, "transfers": transfers, "collectives": collectives}
    fitted_on, case_ids = [], {}
    for folder in folders:  # the power model, from the power suite's synthetic phases (not its steps)
        if (folder / "power" / "power.csv").is_file():
            power, s = fit_power(folder / "power", device, shared["power"].get(_die(device)))
            own = fits_own_draws(folder / "power")
            if own:
                shared["power"][_die(device)] = power
            params.update(power)
            stats.update(s)
            source = ("power.csv phases gemm and hbm, power_duty.csv, power_kernels.csv" if own else
                      "power.csv phases gemm and hbm; power_clock_exponent and tensor_static_fraction from the same "
                      "die's power_duty.csv and power_kernels.csv")
            fitted_on.append(f"{rel(folder / 'power')} ({source})")
    for folder in folders:
        for suite, frame in used.items():
            if frame.empty:
                continue
            ids = sorted(frame.loc[frame["_folder"] == folder.name, "case_id"].astype(str))
            if ids:
                fitted_on.append(f"{rel(folder / (suite + '.csv'))} (split=calibration, {len(ids)} rows)")
                case_ids.setdefault(folder.name, {})[suite] = ids
    profile = {
        "device": name,
        "description": f"{name} cost-model parameters fitted by plansim calibrate "
                       f"({_dt.date.today().isoformat()}); SI units",
        "fitted_on": fitted_on,
        "parameters": {k: _sig(v) for k, v in params.items()},
        "links": {ln: {k: _sig(v) for k, v in fields.items()} for ln, fields in links.items() if fields},
        "fit": stats,
        "case_ids": case_ids,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False, width=120))
    return path


__all__ = ["calibrate", "fit_device", "fit_host_link", "fit_intra_link"]
