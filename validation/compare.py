"""Prediction versus measurement on the held-out split (``plansim validate``).

Every measured case whose ``split`` is ``evaluation`` (validation/runner/common.py: a stable
crc32 of the case id; all whole steps) is predicted with the *same* cost-model functions the
simulator uses — ``gemm_time``, ``attention_time``, ``memory_bound_time``, ``collective_cost``,
``host_transfer_time``, ``plansim.simulate`` — on the calibrated profile of its device
(hardware_profiles/calibrated/<device>.yaml, written by ``plansim calibrate``).  Calibration
moves a prediction only through profile parameters; nothing here is a per-shape table.

The signed error is ``(predicted - measured) / measured``; the summary gives count, median and
p90 of ``|error|`` per suite (and per metric for whole steps: step time and peak memory).
A case that calibration was fitted on is never scored: ``validate`` checks the case ids each
calibrated profile records and raises :class:`SplitError` if one appears among the scored cases.
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from plansim.simulator.calibration import calibrate_cluster, read_calibration
from plansim.simulator.costs import compute
from plansim.simulator.costs.collectives import Group, collective_cost
from plansim.simulator.costs.transfers import host_transfer_time
from plansim.simulator.hardware import Cluster, Device, build_cluster
from plansim.workloads.training import EAGER_MASKED_FILL_SM_RATE

VALIDATION_DIR = Path(__file__).resolve().parent
DATA_DIR = VALIDATION_DIR / "data"
REPO_ROOT = VALIDATION_DIR.parent
CONFIGS_DIR = VALIDATION_DIR / "runner" / "configs"
CALIBRATED_DIR = Path(str(resources.files("plansim.hardware_profiles"))) / "calibrated"

SUITES = ("kernels", "transfers", "collectives", "steps", "vidur")
MEASURED_SUITES = ("kernels", "transfers", "collectives", "steps")
MiB, GiB = 1 << 20, 1 << 30
#: data folders converted from OpenXLA's published tables (validation/xla.py) start with this
XLA_PREFIX = "xla-"

#: data folder -> device profile, used when provenance.json names no GPU we recognise
FOLDER_DEVICES = {"h100-x1": "h100-sxm", "h200-x2": "h200"}
#: substring of torch.cuda.get_device_name (lower case) -> device profile; first match wins
GPU_NAMES = (("h200", "h200"), ("h100", "h100-sxm"), ("a100-sxm4-80gb", "a100-80gb"),
             ("a100 80gb", "a100-80gb"), ("a100", "a100-40gb"), ("b200", "b200"), ("mi300x", "mi300x"))

#: kernels rows of these kinds are predicted; transfers rows likewise (disk and CPU AdamW are
#: reported by the runner but have no calibrated tier on these hosts: see MEASURING.md, transfers.csv)
KERNEL_KINDS = ("gemm", "bmm", "attention", "elementwise", "rmsnorm", "layernorm", "softmax", "masked_softmax",
                "memcpy", "dropout", "dropout_add", "gelu", "cast")
TRANSFER_KINDS = ("h2d", "d2h")
#: kernels rows (``impl``) of fp8 GEMMs that promote their sums to fp32 as they go (the ``fp8``
#: suite's dgrad/wgrad variant, Transformer Engine's split accumulator)
SPLIT_ACCUMULATE_IMPLS = ("e5m2-e4m3",)
#: kernels rows of multi-head latent attention (suite ``mlaattention``): ``impl`` ends ``-mla-qk<d>-v<dv>``
MLA_IMPL = re.compile(r"-mla-qk(\d+)-v(\d+)$")


class SplitError(AssertionError):
    """A case used for calibration was about to be scored as held-out."""


# ------------------------------------------------------------------------------ data access

def provenance(folder: Path) -> dict:
    path = Path(folder) / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def device_for_folder(folder: Path) -> str:
    """The device profile a data folder was measured on: provenance's GPU name (of the folder, or
    of its power suite's subfolder), else the folder name."""
    gpu = str(provenance(folder).get("gpu_name") or provenance(Path(folder) / "power").get("gpu_name") or "").lower()
    for needle, name in GPU_NAMES:
        if needle in gpu:
            return name
    name = Path(folder).name
    if name in FOLDER_DEVICES:
        return FOLDER_DEVICES[name]
    raise ValueError(f"data: cannot tell the device of {folder} (provenance.json gpu_name {gpu!r})")


def gpu_count(folder: Path) -> int:
    count = provenance(folder).get("gpu_count")
    if count:
        return int(count)
    tail = Path(folder).name.rsplit("-x", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else 1


def data_folders(data_dir: Path = DATA_DIR, devices: Iterable[str] | None = None) -> list[Path]:
    """Measurement folders (``<gpu>-x<count>`` holding at least one suite CSV, or a ``power``
    suite folder), optionally of some devices."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    folders = [p for p in sorted(data_dir.iterdir())
               if p.is_dir() and (any((p / f"{s}.csv").is_file() for s in MEASURED_SUITES)
                                  or (p / "power" / "power.csv").is_file())]
    if devices:
        wanted = set(devices)
        folders = [f for f in folders if device_for_folder(f) in wanted]
    return folders


def rel(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (for provenance strings)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def load_suite(folder: Path, suite: str, split: str | None = None) -> pd.DataFrame:
    """The ``ok`` rows of one suite's CSV in ``folder`` (optionally of one split)."""
    path = Path(folder) / f"{suite}.csv"
    if not path.is_file():
        return pd.DataFrame()
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    frame = frame[frame["status"].astype(str) == "ok"]
    if split is not None:
        frame = frame[frame["split"].astype(str) == split]
    return frame.reset_index(drop=True)


def base_cluster(folder: Path) -> Cluster:
    """The datasheet cluster of a data folder: its device, one node with the GPUs measured."""
    return build_cluster(device_for_folder(folder), nodes=1, gpus_per_node=gpu_count(folder))


def _num(row, key, default=np.nan) -> float:
    value = row.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _bool(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


# ------------------------------------------------------------------------------ predictors

def attention_of(impl) -> str:
    """Plan.attention of what a measured row ran: its ``impl`` (kernels rows) or ``attn_impl``
    (steps rows): ``unfused`` (Megatron 2021), ``cudnn…`` (cuDNN's fused attention), else flash."""
    impl = str(impl or "")
    if impl == "unfused":
        return "unfused"
    return "cudnn" if impl.startswith("cudnn") else "flash"


def predict_kernel(row, device: Device) -> float:
    """Seconds the cost model gives for one ``kernels.csv`` row on ``device``."""
    kind = row["kind"]
    if kind in ("gemm", "bmm"):
        batch = _num(row, "batch") if kind == "bmm" else 1
        return float(compute.gemm_time(_num(row, "m"), _num(row, "n"), _num(row, "k"), row["dtype"], device, batch,
                                       split_accumulate=row.get("impl") in SPLIT_ACCUMULATE_IMPLS))
    if kind == "softmax":  # a row reduction like the norms: read the scores, write the probabilities
        return float(compute.norm_time(0, 0, device, bytes_moved=_num(row, "bytes_moved")))
    if kind == "masked_softmax":  # eager masked_fill_ in place (SM-bound), then the softmax: half the bytes each
        half = _num(row, "bytes_moved") / 2
        return float(compute.memory_bound_time(half, device, EAGER_MASKED_FILL_SM_RATE)
                     + compute.norm_time(0, 0, device, bytes_moved=half))
    if kind in ("dropout", "dropout_add", "gelu", "cast"):  # streaming ops: the bytes the runner counts
        return float(compute.memory_bound_time(_num(row, "bytes_moved"), device))
    if kind == "attention":
        s = _num(row, "seq_len")
        d, dv = _num(row, "head_dim"), None
        mla = MLA_IMPL.search(str(row.get("impl") or ""))
        if mla:  # the suite mlaattention's rows: query/key and value widths in impl (head_dim is their mean)
            d, dv = float(mla.group(1)), float(mla.group(2))
        return float(compute.attention_time(_num(row, "batch"), _num(row, "heads"), _num(row, "kv_heads"),
                                            d, s, s, _bool(row["causal"]), row["phase"],
                                            device, impl=attention_of(row.get("impl")), v_head_dim=dv))
    if kind == "elementwise":
        return float(compute.elementwise_time(_num(row, "bytes"), device))
    if kind == "memcpy":
        return float(compute.memcpy_time(_num(row, "bytes"), device))
    if kind in ("rmsnorm", "layernorm"):
        return float(compute.norm_time(_num(row, "tokens"), _num(row, "hidden"), device, row.get("dtype") or "bf16"))
    raise ValueError(f"kernels: no prediction for kind {kind!r}")


def predict_transfer(row, cluster: Cluster) -> float:
    """Seconds for one ``transfers.csv`` host<->device row over the cluster's host link."""
    kind = row["kind"]
    if kind in ("h2d", "d2h"):
        return float(host_transfer_time(_num(row, "bytes"), cluster.host_link, pinned=row["memory"] == "pinned",
                                        direction=kind))
    raise ValueError(f"transfers: no prediction for kind {kind!r}")


def predict_collective(row, cluster: Cluster) -> float:
    """Seconds for one ``collectives.csv`` row (nccl-tests' size, one node, ``group_size`` ranks)."""
    n = int(_num(row, "group_size"))
    return float(collective_cost(row["op"], _num(row, "bytes"), Group(n, min(n, cluster.gpus_per_node)),
                                 cluster).time_s)


STRATEGY_DEGREES = {"single": (1, 1, 1), "ddp": (1, 1, None), "fsdp": (1, 1, None), "tp": (None, 1, 1),
                    "pp": (1, None, 1)}


def step_plan(row):
    """The Plan of one ``steps.csv`` row: the runner's strategy, degrees, batch and schedule."""
    from plansim.workloads.plan import Plan

    schedule = str(row.get("schedule", "-"))
    # suite parallel2: the steps columns carry no ep or cp; both runs used 2 ranks (case ids "-ep2-", "-cp2-")
    ep = int(row["dp"]) if row["strategy"] == "ep" else 1
    cp = int(row.get("world_size") or 2) if row["strategy"] == "cp" else 1
    return Plan(tp=int(row["tp"]), pp=int(row["pp"]), dp=int(row["dp"]), ep=ep, cp=cp,
                cp_comm="allgather" if cp > 1 else "ring",
                zero=3 if row["strategy"] == "fsdp" else 0,
                micro_batch=int(row["micro_batch"]), global_batch=int(row["global_batch"]),
                seq_len=int(row["seq_len"]), recompute=str(row.get("recompute") or "none"),
                schedule=schedule if schedule in ("gpipe", "1f1b") else "1f1b",
                # the runner's tensor parallelism is Megatron's without sequence parallelism
                sequence_parallel=False, precision="bf16-pure", framework="pytorch", ddp="torch",
                # the gpt2021 rows run Megatron 2021's unfused attention (attn_impl "unfused"), the
                # cudnnsteps rows cuDNN's fused attention (attn_impl "cudnn-…"), the rest flash
                attention=attention_of(row.get("attn_impl")))


def predict_step(row, cluster: Cluster) -> tuple[float, float]:
    """(step time s, peak memory bytes) that ``plansim.simulate`` gives for one ``steps.csv`` row,
    on ``cluster`` (already calibrated) with as many GPUs as the row used."""
    from plansim.simulator.engine import TrainingSimulation
    from plansim.simulator.result import build_result
    from plansim.workloads.model_io import load_model
    from plansim.workloads.training import TrainingWorkload

    spec = load_model(CONFIGS_DIR / f"{row['model']}.json")
    world = int(row.get("world_size") or int(row["tp"]) * int(row["pp"]) * int(row["dp"]))
    machine = cluster.model_copy(update={"gpus_per_node": world, "nodes": 1})
    plan = step_plan(row)
    # what plansim.simulate runs, without importing plansim/ (STYLE.md: imports run one way)
    output = TrainingSimulation(TrainingWorkload(spec, plan), machine).run()
    result = build_result(output, model=spec, plan=plan, cluster=machine, calibrated=None)
    return float(result.step_time_s), float(result.peak_memory_bytes)


# ------------------------------------------------------------------------------ calibration

def calibrated_cluster(folder: Path, profiles_dir: Path | None = CALIBRATED_DIR,
                       calibrated: bool = True) -> tuple[Cluster, dict]:
    """The folder's cluster with its device's calibrated profile from ``profiles_dir`` applied,
    and that profile's data (``{}`` when there is none or ``calibrated`` is false)."""
    cluster = base_cluster(folder)
    if not calibrated or profiles_dir is None:
        return cluster, {}
    path = Path(profiles_dir) / f"{cluster.device.name}.yaml"
    if not path.is_file():
        return cluster, {}
    read_calibration.cache_clear()  # a profile may have just been rewritten by calibrate()
    machine, _ = calibrate_cluster(cluster, path)
    return machine, read_calibration(path)


def fitted_case_ids(profile: dict, folder: Path) -> dict[str, set[str]]:
    """Case ids, per suite, that the calibrated ``profile`` was fitted on in ``folder``."""
    used = (profile.get("case_ids") or {}).get(Path(folder).name, {})
    return {suite: set(ids) for suite, ids in used.items()}


def check_disjoint(scored: pd.DataFrame, used: dict[str, set[str]], folder: Path) -> None:
    """Raise :class:`SplitError` if a scored case of ``folder`` was used for calibration."""
    for suite, ids in used.items():
        overlap = set(scored.loc[scored["suite"] == suite, "case_id"]) & ids
        if overlap:
            raise SplitError(f"{Path(folder).name}/{suite}: {len(overlap)} case(s) used for calibration "
                             f"scored as held-out, e.g. {sorted(overlap)[0]}")


# ------------------------------------------------------------------------------ validate

COLUMNS = ("suite", "source", "device", "case_id", "kind", "metric", "size_bytes", "measured",
           "predicted", "error")


def _record(suite, source, device, case_id, kind, metric, measured, predicted, size=np.nan) -> dict:
    return {"suite": suite, "source": source, "device": device, "case_id": case_id, "kind": kind,
            "metric": metric, "size_bytes": size, "measured": measured, "predicted": predicted,
            "error": (predicted - measured) / measured}


def _score_folder(folder: Path, suites: set[str], profiles_dir, calibrated: bool) -> list[dict]:
    cluster, profile = calibrated_cluster(folder, profiles_dir, calibrated)
    device = cluster.device
    src = Path(folder).name
    rows: list[dict] = []
    if "kernels" in suites:
        for r in load_suite(folder, "kernels", "evaluation").to_dict("records"):
            if r["kind"] in KERNEL_KINDS:
                rows.append(_record("kernels", src, device.name, r["case_id"], r["kind"], "time_s",
                                    float(r["time_s"]), predict_kernel(r, device), _num(r, "bytes")))
    if "transfers" in suites:
        for r in load_suite(folder, "transfers", "evaluation").to_dict("records"):
            if r["kind"] in TRANSFER_KINDS:
                rows.append(_record("transfers", src, device.name, r["case_id"], f"{r['kind']}-{r['memory']}",
                                    "time_s", float(r["time_s"]), predict_transfer(r, cluster), _num(r, "bytes")))
    if "collectives" in suites:
        for r in load_suite(folder, "collectives", "evaluation").to_dict("records"):
            if int(_num(r, "group_size")) > 1:
                rows.append(_record("collectives", src, device.name, r["case_id"], r["op"], "time_s",
                                    float(r["time_s"]), predict_collective(r, cluster), _num(r, "bytes")))
    if "steps" in suites:
        for r in load_suite(folder, "steps", "evaluation").to_dict("records"):
            t, mem = predict_step(r, cluster)
            kind = f"{r['strategy']}" + (f"-{r['schedule']}" if r["strategy"] == "pp" else "")
            rows.append(_record("steps", src, device.name, r["case_id"], kind, "step_time_s",
                                float(r["step_time_s"]), t))
            rows.append(_record("steps", src, device.name, r["case_id"], kind, "peak_memory_bytes",
                                float(r["peak_memory_bytes"]), mem))
    scored = pd.DataFrame(rows, columns=list(COLUMNS))
    if calibrated:
        check_disjoint(scored, fitted_case_ids(profile, folder), folder)
    return rows


def validate(suite: str = "all", data_dir: Path | str = DATA_DIR, *, profiles_dir: Path | str | None = CALIBRATED_DIR,
             calibrated: bool = True, devices: Iterable[str] | None = None) -> pd.DataFrame:
    """Every held-out case predicted: one row per (case, metric) with measured, predicted and
    the signed error ``(predicted - measured) / measured``.

    ``suite`` is one of kernels, transfers, collectives, steps, vidur or all; ``profiles_dir``
    holds the calibrated profiles (``calibrated=False`` scores the datasheet profiles instead).
    """
    if suite not in SUITES + ("all",):
        raise ValueError(f"suite: {suite!r} is not one of {', '.join(SUITES + ('all',))}")
    suites = set(SUITES) if suite == "all" else {suite}
    rows: list[dict] = []
    for folder in data_folders(Path(data_dir), devices):
        rows += _score_folder(folder, suites, profiles_dir and Path(profiles_dir), calibrated)
    if "vidur" in suites:
        from plansim.validation.vidur import score_vidur
        rows += score_vidur(Path(data_dir) / "vidur", profiles_dir and Path(profiles_dir), calibrated)
    return pd.DataFrame(rows, columns=list(COLUMNS))


#: (label, row filter): the summary lines; issue 9's bounds apply to the median |error|
def _summary_groups(frame: pd.DataFrame):
    # OpenXLA's published tables (validation/xla.py) apart from this project's own measurements
    xla = frame.source.astype(str).str.startswith(XLA_PREFIX)
    own, published = frame[~xla], frame[xla]
    yield "kernels", "time_s", own[own.suite == "kernels"]
    yield "transfers", "time_s", own[own.suite == "transfers"]
    coll = own[own.suite == "collectives"]
    yield "collectives", "time_s", coll
    yield "collectives 1MiB-1GiB", "time_s", coll[(coll.size_bytes >= MiB) & (coll.size_bytes <= GiB)]
    for device in sorted(published.device.unique()):
        part = published[published.device == device]
        yield f"OpenXLA {device} GEMMs", "time_s", part[part.suite == "kernels"]
        coll = part[part.suite == "collectives"]
        yield f"OpenXLA {device} collectives >= 1MiB", "time_s", coll[coll.size_bytes >= MiB]
    steps = frame[frame.suite == "steps"]
    yield "steps", "step_time_s", steps[steps.metric == "step_time_s"]
    yield "steps", "peak_memory_bytes", steps[steps.metric == "peak_memory_bytes"]
    vidur = frame[frame.suite == "vidur"]
    yield "vidur", "time_s", vidur
    yield "vidur gemm", "time_s", vidur[vidur.kind.astype(str).str.startswith("gemm")]
    yield "vidur collectives", "time_s", vidur[~vidur.kind.astype(str).str.startswith("gemm")]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per suite (and metric): count, median and p90 of |error|, mean signed error."""
    out = []
    for label, metric, part in _summary_groups(frame):
        if part.empty:
            continue
        err = part["error"].to_numpy(float)
        out.append({"suite": label, "metric": metric, "count": int(len(err)),
                    "median_abs_error": float(np.median(np.abs(err))),
                    "p90_abs_error": float(np.percentile(np.abs(err), 90)),
                    "mean_error": float(np.mean(err))})
    return pd.DataFrame(out, columns=["suite", "metric", "count", "median_abs_error", "p90_abs_error",
                                      "mean_error"])


__all__ = ["validate", "summarize", "predict_kernel", "predict_transfer", "predict_collective", "predict_step",
           "SplitError", "device_for_folder", "data_folders", "load_suite"]
