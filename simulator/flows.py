"""Flow-level bandwidth sharing on a link (processor sharing, as in flow-level network models).

A ``FlowLink`` has a capacity in bytes/s.  Active flows split it equally; whenever a flow
starts or finishes, every other flow's progress is brought up to date and the next finish time
is recomputed, so a flow's completion moves when others come and go.  Bytes in equal bytes
out: the link counts what it carried, and the tests check it against what was offered.
"""
from __future__ import annotations

import itertools
import math

import simpy


class FlowLink:
    """One direction of one link (an NVLink port, a NIC share) with processor-sharing flows."""

    def __init__(self, env: simpy.Environment, name: str, capacity_Bps: float) -> None:
        if capacity_Bps <= 0:
            raise ValueError(f"link {name}: capacity must be positive, got {capacity_Bps}")
        self.env = env
        self.name = name
        self.capacity_Bps = capacity_Bps
        self._remaining: dict[int, float] = {}
        self._done: dict[int, simpy.Event] = {}
        self._ids = itertools.count()
        self._last = env.now
        self._generation = 0
        self.bytes_offered = 0.0
        self.bytes_carried = 0.0
        self.busy_time_s = 0.0

    def transfer(self, nbytes: float) -> simpy.Event:
        """Start a flow of ``nbytes``; the returned event fires when its last byte arrives."""
        done = self.env.event()
        if nbytes <= 0:
            done.succeed()
            return done
        self._advance()
        fid = next(self._ids)
        self._remaining[fid] = float(nbytes)
        self._done[fid] = done
        self.bytes_offered += nbytes
        self._reschedule()
        return done

    @property
    def active_flows(self) -> int:
        return len(self._remaining)

    def _advance(self) -> None:
        """Credit every active flow with its share of the bytes carried since the last update."""
        elapsed = self.env.now - self._last
        self._last = self.env.now
        if elapsed <= 0 or not self._remaining:
            return
        share = self.capacity_Bps * elapsed / len(self._remaining)
        for fid in self._remaining:
            self._remaining[fid] -= share
        self.bytes_carried += share * len(self._remaining)
        self.busy_time_s += elapsed

    def _reschedule(self) -> None:
        self._generation += 1
        if not self._remaining:
            return
        smallest = min(self._remaining.values())
        delay = max(0.0, smallest * len(self._remaining) / self.capacity_Bps)
        generation = self._generation
        self.env.timeout(delay).callbacks.append(lambda _e: self._on_wakeup(generation))

    def _on_wakeup(self, generation: int) -> None:
        if generation != self._generation:
            return  # superseded by a later start or finish
        self._advance()
        # what the link moves in a picosecond, or in the smallest step the clock can still take
        # at this time (float resolution): a flow closer than that to done is done
        resolution = max(1e-12, 4 * math.ulp(self.env.now))
        tolerance = resolution * self.capacity_Bps * len(self._remaining) + 1e-9
        finished = [fid for fid, left in self._remaining.items() if left <= tolerance]
        for fid in finished:
            residue = self._remaining.pop(fid)  # what rounding left of the flow: carried too,
            self.bytes_carried += residue       # in the time the link needs for it
            self.busy_time_s += residue / self.capacity_Bps
            self._done.pop(fid).succeed()
        self._reschedule()
