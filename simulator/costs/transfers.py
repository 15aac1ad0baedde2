"""Host-device and storage transfers: latency plus bytes over the achievable link bandwidth.

Pageable host memory is staged through a pinned bounce buffer by the driver, which costs an
extra host memcpy per chunk; measured pageable H2D on Hopper hosts runs at roughly half the
pinned rate (validation/data).  The pageable factor is a profile parameter.
"""
from __future__ import annotations

import numpy as np

from plansim.simulator.hardware import Link, Storage

DEFAULT_PAGEABLE_FRACTION = 0.5


def host_transfer_time(nbytes, link: Link, pinned: bool = True, direction: str = "h2d"):
    """Seconds to copy ``nbytes`` between host and device over ``link`` (PCIe).

    Pageable copies are staged through pinned buffers by a CPU memcpy, whose speed differs by
    direction (into the staging buffer for host-to-device, out of it for device-to-host), so
    each direction has its own pageable fraction (falling back to the host-to-device one)."""
    rate = link.achievable_bw_Bps
    if not pinned:
        fraction = link.pageable_fraction or DEFAULT_PAGEABLE_FRACTION
        if direction == "d2h":
            fraction = link.pageable_d2h_fraction or fraction
        rate = rate * fraction
    return link.latency_s + np.asarray(nbytes, float) / rate


def storage_time(nbytes, storage: Storage, write: bool = False):
    """Seconds to read or write ``nbytes`` sequentially from an NVMe or CXL tier."""
    rate = storage.write_bw_Bps if write else storage.read_bw_Bps
    return storage.latency_s + np.asarray(nbytes, float) / rate
