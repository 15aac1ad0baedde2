"""Pipeline schedules: the order in which each pipeline rank runs its forward and backward passes.

Each function returns, per pipeline rank, a list of ``(phase, micro_batch, virtual_stage)``
with phase ``F`` (forward), ``B`` (backward; input and weight gradients together unless the
schedule splits them) or ``W`` (weight gradient, zero-bubble only).  The engine runs the list
in order, waiting for activations and gradients from neighbouring stages.

* GPipe (Huang et al. 2019): all forwards, then all backwards.
* 1F1B (PipeDream-Flush; Narayanan et al. SC'21 §2.2.1): rank i warms up with p − i − 1
  forwards, then alternates one forward and one backward, then drains.
* Interleaved 1F1B (SC'21 §2.2.2; Megatron-LM ``schedules.py``): each rank holds v chunks;
  groups of N micro-batches (N = p unless Megatron-Core's
  ``microbatch_group_size_per_vp_stage`` sets it, p ≤ N ≤ m) move through the chunks in turn, the
  last group taking the remainder; warm-up of (p − i − 1)·2 + (v − 1)·N virtual micro-batches.
* Zero-bubble ZB-H1 (Qi et al., ICLR 2024, §2.1): 1F1B whose backward is split into B and W;
  rank i starts its W passes i backwards late, so that every rank holds as many micro-batches
  as rank 0 (1F1B's peak) and the late W passes fill the drain.
"""
from __future__ import annotations

Item = tuple[str, int, int]


def gpipe(p: int, m: int) -> list[list[Item]]:
    return [[("F", j, i) for j in range(m)] + [("B", j, i) for j in range(m)] for i in range(p)]


def one_f_one_b(p: int, m: int) -> list[list[Item]]:
    ranks = []
    for i in range(p):
        warmup = min(p - i - 1, m)
        order: list[Item] = [("F", j, i) for j in range(warmup)]
        for j in range(m - warmup):
            order += [("F", warmup + j, i), ("B", j, i)]
        order += [("B", j, i) for j in range(m - warmup, m)]
        ranks.append(order)
    return ranks


def interleaved(p: int, m: int, v: int, group: int | None = None) -> list[list[Item]]:
    """Megatron's interleaved schedule, micro-batches in groups of ``group`` (default p; the
    Plan checks p ≤ group ≤ m and that a last, smaller group has at least p): Megatron-Core's
    ``get_schedule_table``, whose order every rank walks forward from its first chunk and
    backward from its last."""
    n = group or p
    table: list[tuple[int, int]] = []  # (micro-batch, local chunk) per virtual micro-batch
    for start in range(0, m, n):
        end = m if start + n >= m else start + n
        table += [(mb, chunk) for chunk in range(v) for mb in range(start, end)]
    total = m * v

    def forward_item(k: int, i: int) -> Item:
        mb, chunk = table[k]
        return ("F", mb, chunk * p + i)

    def backward_item(k: int, i: int) -> Item:
        mb, chunk = table[k]
        return ("B", mb, (v - 1 - chunk) * p + i)

    ranks = []
    for i in range(p):
        warmup = min((p - i - 1) * 2 + (v - 1) * n, total)
        order = [forward_item(k, i) for k in range(warmup)]
        for k in range(total - warmup):
            order += [forward_item(warmup + k, i), backward_item(k, i)]
        order += [backward_item(k, i) for k in range(total - warmup, total)]
        ranks.append(order)
    return ranks


def zero_bubble_h1(p: int, m: int) -> list[list[Item]]:
    """1F1B with the backward split into B and W, rank i starting its W passes i backwards late.

    Every rank then holds min(p, m) micro-batches, as rank 0 does in 1F1B (so with equal stages
    the peak is 1F1B's; a last stage made heavier by the LM head holds more than it did), the B
    passes on the critical path upstream are not held up by W passes, and the late W passes fill
    the drain: with equal F, B and W the bubble is (p − 1)·(F + B − W), a third of 1F1B's."""
    ranks = []
    for i in range(p):
        warmup = min(p - i - 1, m)
        order: list[Item] = [("F", j, i) for j in range(warmup)]
        weights = 0  # W passes placed so far

        def backward(j: int) -> None:
            nonlocal weights
            order.append(("B", j, i))
            if j + 1 - weights > i:
                order.append(("W", weights, i))
                weights += 1
        for j in range(m - warmup):
            order.append(("F", warmup + j, i))
            backward(j)
        for j in range(m - warmup, m):
            backward(j)
        order += [("W", j, i) for j in range(weights, m)]
        ranks.append(order)
    return ranks


def build_schedule(name: str, p: int, m: int, v: int = 1, group: int | None = None) -> list[list[Item]]:
    """Per-rank order for schedule ``name`` (Plan.schedule); ``group``: the interleaved
    schedule's micro-batch group (Plan.microbatch_group)."""
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    if name == "interleaved":
        return interleaved(p, m, v, group) if v > 1 else one_f_one_b(p, m)
    if name == "zero-bubble":
        return zero_bubble_h1(p, m)
    raise ValueError(f"schedule: {name!r} is not one of gpipe, 1f1b, interleaved, zero-bubble")
