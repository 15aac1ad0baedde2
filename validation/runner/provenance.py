"""provenance.json: where, when and how a measurement was taken."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import socket
import subprocess
import sys

import torch


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001 - provenance is best effort, recorded as such
        return f"unavailable: {type(exc).__name__}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command_line() -> str:
    prog = os.path.basename(sys.argv[0]) or "python"
    if prog == "__main__.py":
        prog = "python -m plansim.validation.runner"
    return " ".join([prog, shlex.join(sys.argv[1:])]).strip()


def collect(suites: list[str], quick: bool, device: str) -> dict:
    cuda = torch.cuda.is_available() and device == "cuda"
    n = torch.cuda.device_count() if cuda else 0
    props = torch.cuda.get_device_properties(0) if n else None
    try:
        nccl = ".".join(str(x) for x in torch.cuda.nccl.version()) if cuda else None
    except Exception:  # noqa: BLE001
        nccl = None
    return {
        "gpu_name": torch.cuda.get_device_name(0) if n else None,
        "gpu_count": n,
        "gpu_memory_bytes": int(props.total_memory) if props else None,
        "gpu_sm_count": int(props.multi_processor_count) if props else None,
        "gpu_l2_bytes": int(getattr(props, "L2_cache_size", 0)) if props else None,
        "driver": _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()[0]
        if n else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "nccl": nccl,
        "python": platform.python_version(),
        "host_cpu": _cpu_model(),
        "host_cpu_count": os.cpu_count(),
        "gpu_topology": _cmd(["nvidia-smi", "topo", "-m"]) if n > 1 else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
        "hostname": socket.gethostname(),
        "suites": suites,
        "quick": quick,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL", "CUDA_VISIBLE"))},
    }


def write(out_dir: str, info: dict) -> str:
    """Write provenance.json; runs into the same folder are appended to ``runs``."""
    path = os.path.join(out_dir, "provenance.json")
    runs = []
    if os.path.exists(path):
        try:
            with open(path) as fh:
                runs = json.load(fh).get("runs", [])
        except (OSError, ValueError):
            runs = []
    runs.append({k: info[k] for k in ("date", "command", "suites", "quick", "duration_s") if k in info})
    info = dict(info, runs=runs)
    with open(path, "w") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
    return path
