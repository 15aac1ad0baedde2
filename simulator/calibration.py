"""Calibrated device profiles: datasheet profiles with fitted cost-model parameters.

``plansim calibrate`` (validation/) writes ``hardware_profiles/calibrated/<device>.yaml``::

    device: h100-sxm                 # the datasheet profile it refines
    fitted_on: [validation/data/h100-x1/kernels.csv (split=calibration), ...]
    parameters:                      # Device fields, in SI units
      achievable_gemm_fraction: 0.78
      gemm_k_overhead: 96.0
      ...
    links:                           # optional: Link fields per link profile name, in SI units
      nvlink4-nvswitch: {achievable_bw_Bps: 3.4e11, latency_s: 2.1e-6}
      pcie5-x16: {achievable_bw_Bps: 5.1e10, latency_s: 1.5e-6, pageable_fraction: 0.4}

Calibration moves predictions only through these parameters: the same cost-model code
serves datasheet and calibrated profiles.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from plansim.simulator.hardware import Cluster, Device, Link, ProfileError

CALIBRATED_DIR = "calibrated"


def calibrated_path(device_name: str) -> Path | None:
    """Where the calibrated profile of ``device_name`` lives, if there is one."""
    root = resources.files("plansim.hardware_profiles") / CALIBRATED_DIR / f"{device_name}.yaml"
    path = Path(str(root))
    return path if path.is_file() else None


@lru_cache(maxsize=64)
def read_calibration(path: Path) -> dict:
    """The calibrated profile at ``path`` as a dict (``device``, ``fitted_on``, ``parameters``, ``links``)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping with device, fitted_on, parameters")
    return data


def _source(path: Path, data: dict) -> str:
    return f"calibrated: {Path(path).name} fitted on {', '.join(map(str, data.get('fitted_on', [])))}"


def _with_fields(profile, fields: dict, path: Path, data: dict, where: str):
    """``profile`` revalidated with ``fields`` replaced, each sourced to the calibrated file."""
    unknown = sorted(set(fields) - set(type(profile).model_fields))
    if unknown:
        raise ProfileError(f"{path}: {where}: unknown field {unknown[0]!r}")
    sources = dict(profile.sources)
    for key in fields:
        sources[key] = _source(path, data)
    return type(profile).model_validate({**profile.model_dump(exclude_unset=True), **fields, "sources": sources})


def calibrate_device(device: Device, data: dict, path: Path) -> Device:
    """``device`` with the ``parameters`` of a calibrated profile (``data``, read from ``path``)."""
    return _with_fields(device, data.get("parameters") or {}, path, data, "parameters")


def calibrate_link(link: Link | None, data: dict, path: Path) -> Link | None:
    """``link`` with the fields its calibrated profile lists under ``links: {link name: {...}}``."""
    if link is None:
        return None
    fields = (data.get("links") or {}).get(link.name)
    if not fields:
        return link
    return _with_fields(link, fields, path, data, f"links.{link.name}")


#: what a die's own kernels set (GEMM, fp8 GEMM, attention and norm-kernel rates and shapes, the fixed
#: cost per kernel) and what it draws (idle, per kind of work, its burst limit, the clock exponent): a
#: device with the same die and clocks but other memory (``same_die_as``: the A100 40GB, the H100 96GB
#: HBM2e) borrows these from the other's calibrated profile; its HBM bandwidth and board power limit
#: are its own.  The draws are the approximation: idle and HBM-bound draw were measured with the
#: other part's memory
DIE_PARAMETERS = ("achievable_gemm_fraction", "gemm_k_overhead", "unaligned_gemm_fraction", "attention_fraction",
                  "attention_bwd_ratio", "attention_fwd_cta_overhead", "attention_bwd_cta_overhead",
                  "attention_head_dim_half", "attention_bwd_wide_exponent", "cudnn_attention", "fp8_gemm_fraction", "fp8_split_accumulate_ratio",
                  "norm_bandwidth_fraction", "kernel_launch_s", "idle_power_w", "burst_power_w", "tensor_power_w",
                  "tensor_static_fraction", "memory_power_w", "power_clock_exponent")


def _built_in_profile(device: Device) -> tuple[Path, dict, str] | None:
    """The built-in calibrated profile that applies to ``device`` (its own, or its die's), as
    (path, contents, name to report)."""
    path = calibrated_path(device.name)
    if path is not None:
        return path, read_calibration(path), f"hardware_profiles/{CALIBRATED_DIR}/{path.name}"
    path = calibrated_path(device.same_die_as) if device.same_die_as else None
    if path is None:
        return None
    data = read_calibration(path)
    die = {k: v for k, v in (data.get("parameters") or {}).items() if k in DIE_PARAMETERS}
    return (path, {**data, "parameters": die, "links": {}},
            f"hardware_profiles/{CALIBRATED_DIR}/{path.name} (die parameters: same die as {device.same_die_as})")


@lru_cache(maxsize=64)
def apply_calibration(device: Device) -> tuple[Device, str | None]:
    """``device`` with its calibrated parameters applied, and the file they came from."""
    found = _built_in_profile(device)
    if found is None:
        return device, None
    path, data, name = found
    return calibrate_device(device, data, path), name


def calibrate_cluster(cluster: Cluster, path: Path | None = None) -> tuple[Cluster, str | None]:
    """``cluster`` with its device's calibrated profile applied: the device's ``parameters`` and
    the ``links`` fitted on that device's hosts (NVLink, PCIe).  ``path`` overrides the built-in
    ``hardware_profiles/calibrated/<device>.yaml``; returns the cluster and the profile's name."""
    if path is None:
        found = _built_in_profile(cluster.device)
        if found is None:
            return cluster, None
        path, data, name = found
    else:
        data, name = read_calibration(Path(path)), str(path)
    update = {"device": calibrate_device(cluster.device, data, path),
              "intra_node_link": calibrate_link(cluster.intra_node_link, data, path),
              "inter_node_link": calibrate_link(cluster.inter_node_link, data, path),
              "host_link": calibrate_link(cluster.host_link, data, path)}
    return cluster.model_copy(update=update), name
