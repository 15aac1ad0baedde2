"""Calibrated device profiles: datasheet profiles with fitted cost-model parameters.

``plansim calibrate`` (validation/) writes ``hardware_profiles/calibrated/<device>.yaml``::

    device: h100-sxm                 # the datasheet profile it refines
    fitted_on: [validation/data/h100-x1/kernels.csv (split=calibration), ...]
    parameters:                      # Device fields, in SI units
      achievable_gemm_fraction: 0.78
      gemm_k_overhead: 96.0
      ...

Calibration moves predictions only through these parameters: the same cost-model code
serves datasheet and calibrated profiles.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from plansim.simulator.hardware import Device, ProfileError

CALIBRATED_DIR = "calibrated"


def calibrated_path(device_name: str) -> Path | None:
    """Where the calibrated profile of ``device_name`` lives, if there is one."""
    root = resources.files("plansim.hardware_profiles") / CALIBRATED_DIR / f"{device_name}.yaml"
    path = Path(str(root))
    return path if path.is_file() else None


@lru_cache(maxsize=64)
def apply_calibration(device: Device) -> tuple[Device, str | None]:
    """``device`` with its calibrated parameters applied, and the file they came from."""
    path = calibrated_path(device.name)
    if path is None:
        return device, None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    params = data.get("parameters", {})
    unknown = sorted(set(params) - set(type(device).model_fields))
    if unknown:
        raise ProfileError(f"{path}: parameters: unknown field {unknown[0]!r}")
    sources = dict(device.sources)
    for key in params:
        sources[key] = f"calibrated: {path.name} fitted on {', '.join(map(str, data.get('fitted_on', [])))}"
    calibrated = Device.model_validate({**device.model_dump(), **params, "sources": sources})
    return calibrated, f"hardware_profiles/{CALIBRATED_DIR}/{path.name}"
