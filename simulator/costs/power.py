"""The SM clock a step sustains under the board power limit, and what it does to tensor kernels.

A training step that keeps the tensor cores busy draws more than the board's power limit at full
clock, so the power controller lowers the SM clock until the average draw is at the limit. Every
GEMM streamed alone on an H200 sits at its 700 W limit, each at its own clock (1,470-1,660 MHz);
flash attention draws ~640 W at the 1,980 MHz maximum (`validation/data/h200-x1/power/`).
Kernel costs are calibrated on short samples; a step runs at the clock its own mix of work
sustains.  The controller averages over many kernels of a step (a 1.3 ms GEMM then up to 0.4 ms
idle, repeated, holds one clock) but resolves idle spans of 50 ms and more (steps with such gaps run at
the clock of steps without), so one clock φ (a fraction of the maximum clock) holds over a GPU's
busy span: its passes with the communication inside them, and its optimizer step, not the
pipeline bubble or the data-parallel tail.

Over a busy span of ``span_s`` seconds at short-sample rates (``Activity``), with k over the
tensor-core kernel classes (GEMMs, attention)::

    power(φ) = idle + (Σ_k eq_k · s_k(φ) · W_k · min(φ, φ_k)^γ + other_s · memory_w · φ^γ) / span_s(φ)
    span_s(φ) = span_s + Σ_k t_k · (s_k(φ) − 1),     s_k(φ) = max(1, φ_k / φ)
    W_k = tensor_w · (a + (1 − a) · u_k),     u_k = ref_k / t_k,     eq_k = t_k · W_k / tensor_w

* Power is ``memory_w · φ^γ`` for HBM-bound kernels and ``W_k · φ^γ`` for tensor kernels, γ the
  ``power_clock_exponent``.  A large GEMM draws ``tensor_w``; a tensor kernel with fewer FLOPs
  per second (a small GEMM, flash attention at 30-40 % of peak) draws less: a share ``a``
  (``tensor_static_fraction``) of ``tensor_w`` whatever its rate, the rest in proportion to
  its rate.  ``t_k`` is a class's time, ``ref_k`` the time a GEMM at the device's achievable
  rate would take for its FLOPs.
* Tensor-core kernels run at a rate proportional to the clock (the H200's GEMM stream and its
  GEMM-HBM loops: 0.454 TFLOP/s per MHz at every clock), up to their short-sample clock ``φ_k``:
  even a short burst is held below the burst power limit ``burst_power_w``, so
  ``W_k · φ_k^γ = burst − idle`` (the H200's 787 TFLOP/s short-sample GEMM is 1,733 MHz at that
  slope, below the 1,980 MHz maximum; flash attention, drawing less, reaches the maximum).  At
  φ < φ_k a kernel of class k takes s_k(φ) times its short-sample time.
* Waiting on communication inside the span draws ``idle`` only.

The sustained clock is the largest φ ≤ 1 whose power is within the limit; power rises with φ,
so bisection finds it.  Devices whose profile lacks the power parameters are not throttled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from plansim.simulator.hardware import ProfileError

#: no sustained clock below this fraction of the maximum is searched (H100 and H200 settle at
#: 0.68-0.73 under a pure GEMM stream)
MIN_CLOCK_FRACTION = 0.2
_BISECTION_STEPS = 24  # the clock to 5e-8, the draw to ~1e-7 of the limit


@dataclass(frozen=True)
class Activity:
    """What one GPU does in a step, in seconds at short-sample rates: per tensor-core kernel class
    (GEMMs, attention) its time and the time a GEMM at the achievable rate would take for its
    FLOPs; the other kernels' time; the busy span they lie in (waits inside it included)."""

    tensor_s: tuple[float, ...]
    tensor_ref_s: tuple[float, ...]
    other_s: float
    span_s: float

    @classmethod
    def of(cls, device, tensor: Sequence[float], compute_s: float, span_s: float) -> "Activity":
        """A GPU's step from what the engine and the analytic estimate count: ``tensor`` as
        ``PhaseCost.tensor`` (seconds and FLOPs of each class), all its compute seconds, its busy span."""
        reference = device.flops("bf16") * device.achievable_gemm_fraction
        seconds, flops = tuple(float(x) for x in tensor[0::2]), tuple(float(x) for x in tensor[1::2])
        return cls(tensor_s=seconds, tensor_ref_s=tuple(f / reference for f in flops),
                   other_s=max(0.0, compute_s - sum(seconds)), span_s=span_s)


@dataclass(frozen=True)
class PowerState:
    """What the power limit leaves a step: the sustained clock (fraction of the maximum), the
    slowdown of GEMMs and of attention, and the busiest GPU's average draw (watts)."""

    clock: float
    slowdowns: tuple[float, ...]
    power_w: float

    def energy_per_token_j(self, gpus: int, step_s: float, tokens: float) -> float | None:
        """Every GPU at the busiest one's draw over the step, per token (an upper bound where
        pipeline stages wait more)."""
        return self.power_w * gpus * step_s / tokens if tokens else None


@dataclass(frozen=True)
class PowerModel:
    """A GPU's power-limited clock: its limits and the draw of each kind of work (watts above idle
    at the maximum clock)."""

    limit_w: float  # board power limit (datasheet TDP), held on average
    burst_w: float  # the draw a short burst of tensor work is held to
    idle_w: float  # drawn by a GPU with a process attached and nothing running
    tensor_w: float  # a large GEMM's draw
    memory_w: float  # an HBM-bound kernel's draw
    clock_exponent: float  # γ: draw ∝ clock^γ
    tensor_static_fraction: float  # a: share of tensor_w a tensor kernel draws whatever its FLOP rate

    @classmethod
    def of(cls, device) -> "PowerModel | None":
        """The device's power model, or None where its profile does not give every parameter."""
        values = (device.power_limit_w, device.burst_power_w, device.idle_power_w, device.tensor_power_w,
                  device.memory_power_w, device.power_clock_exponent, device.tensor_static_fraction)
        if any(v is None for v in values):
            return None
        return cls(*(float(v) for v in values))

    def draw_w(self, seconds: float, ref_s: float) -> float:
        """A tensor kernel class's draw at the maximum clock, from its time and reference time."""
        a = self.tensor_static_fraction
        return self.tensor_w * (a + (1.0 - a) * min(1.0, ref_s / seconds)) if seconds > 0 else 0.0

    def short_sample_clock(self, draw_w: float) -> float:
        """The clock (fraction of maximum) a kernel drawing ``draw_w`` runs at in a short burst."""
        if draw_w <= 0:
            return 1.0
        return min(1.0, ((self.burst_w - self.idle_w) / draw_w) ** (1.0 / self.clock_exponent))

    def _classes(self, activity: Activity) -> tuple[tuple[float, float, float], ...]:
        """Per tensor-kernel class: its time, its draw at the maximum clock, its short-sample clock."""
        out = []
        for t, r in zip(activity.tensor_s, activity.tensor_ref_s):
            draw = self.draw_w(t, r)
            out.append((t, draw, self.short_sample_clock(draw)))
        return tuple(out)

    def _power(self, clock: float, activity: Activity, classes) -> float:
        if activity.span_s <= 0:
            return self.idle_w
        g = self.clock_exponent
        energy = activity.other_s * self.memory_w * clock ** g
        span = activity.span_s
        for t, draw, top in classes:
            slow = max(1.0, top / clock)
            energy += t * slow * draw * min(clock, top) ** g
            span += t * (slow - 1.0)
        return self.idle_w + energy / span

    def _clock(self, activity: Activity, classes) -> float:
        if self._power(1.0, activity, classes) <= self.limit_w:
            return 1.0
        lo, hi = MIN_CLOCK_FRACTION, 1.0
        if self._power(lo, activity, classes) > self.limit_w:
            return lo
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            if self._power(mid, activity, classes) > self.limit_w:
                hi = mid
            else:
                lo = mid
        return lo

    def power_w(self, clock: float, activity: Activity) -> float:
        """Average draw over the busy span run at ``clock`` (fraction of the maximum clock)."""
        return self._power(clock, activity, self._classes(activity))

    def sustained_clock(self, activity: Activity) -> float:
        """The clock (fraction of maximum, ≤ 1) at which the span's average draw meets the limit."""
        return self._clock(activity, self._classes(activity))

    def slowdowns(self, clock: float, activity: Activity) -> tuple[float, ...]:
        """Per tensor-kernel class, how many times its short-sample time it takes at ``clock``."""
        return tuple(max(1.0, top / clock) for _, _, top in self._classes(activity))

    def state(self, activity: Activity) -> PowerState:
        """The sustained clock, the slowdowns at it and the draw there."""
        classes = self._classes(activity)
        clock = self._clock(activity, classes)
        return PowerState(clock, tuple(max(1.0, top / clock) for _, _, top in classes),
                          self._power(clock, activity, classes))


def with_power_limit(cluster, watts: float | None):
    """``cluster`` with its GPUs' board power limit set to ``watts`` (``nvidia-smi -pl``, a power
    cap an operator sets); None leaves the profile's default limit.  Raises ProfileError for a limit
    at or below the device's idle draw, or above its board limit (``max_power_limit_w`` where the
    default is lower, else ``power_limit_w``), which ``nvidia-smi -pl`` refuses too (a what-if board
    takes a device profile with a higher limit)."""
    if watts is None:
        return cluster
    if isinstance(watts, bool) or not watts > 0:
        raise ProfileError(f"power_limit: must be positive watts, got {watts!r}")
    device = cluster.device
    if device.idle_power_w is not None and watts <= device.idle_power_w:
        raise ProfileError(f"power_limit: {watts:g} W must exceed {device.name}'s idle draw ({device.idle_power_w:g} W)")
    board = device.max_power_limit_w or device.power_limit_w
    if board is not None and watts > board:
        raise ProfileError(f"power_limit: {watts:g} W exceeds {device.name}'s board limit ({board:g} W)")
    return cluster.model_copy(update={"device": device.model_copy(update={"power_limit_w": float(watts)})})


def throttled_device(device, slowdowns: Sequence[float]):
    """``device`` with its GEMMs and attention kernels ``slowdowns`` times slower (their rates
    divided; their HBM traffic, and every memory-bound kernel, unchanged)."""
    gemm, attention = slowdowns
    if gemm <= 1.0 and attention <= 1.0:
        return device
    update = {"achievable_gemm_fraction": device.achievable_gemm_fraction / gemm,
              "attention_fraction": device.attention_fraction / attention}
    if device.cudnn_attention and "attention_fraction" in device.cudnn_attention:
        update["cudnn_attention"] = dict(device.cudnn_attention,
                                         attention_fraction=device.cudnn_attention["attention_fraction"] / attention)
    return device.model_copy(update=update)
