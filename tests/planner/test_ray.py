"""The Ray executor gives the same plans as the local pool (a local Ray instance; skipped
without the ``ray`` extra)."""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from plansim.planner import SearchSpace, search  # noqa: E402

COLS = ["hardware", "num_gpus", "tp", "pp", "dp", "cp", "zero", "micro_batch", "recompute", "schedule", "vpp",
        "step_time_s", "tokens_per_s", "peak_memory_bytes", "evaluated"]


def test_ray_matches_local():
    kw = dict(hardware="h100-sxm,a100-80gb", gpus="4,8", global_batch=64, seq_len=2048, top=10, confirm=4,
              calibrated=False, space=SearchSpace(micro_batch=(1, 2), max_vpp=2))
    local = search("tinyllama-1.1b", executor="local", workers=2, **kw)
    try:
        remote = search("tinyllama-1.1b", executor="ray", workers=2, **kw)
    finally:
        ray.shutdown()
    assert remote.attrs["summary"]["executor"] == "ray"
    assert local[COLS].equals(remote[COLS])
    assert local.attrs["summary"]["explored"] == remote.attrs["summary"]["explored"]
