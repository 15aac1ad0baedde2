"""Host cost of torch's selective checkpointing (torchtitan's op-level AC), measured on the CPU.

A tiny Llama (``validation/runner`` "tiny": 4 layers, hidden 128, 16 tokens) is stepped eagerly
on one CPU thread with no recomputation, full recomputation and op-level selective recomputation
(``validation/runner/model.py`` ``op_sac_context``).  Its kernels take almost no time, so the step
time is the host's: the forward's host time is full − none (one more forward pass), and selective
checkpointing's extra is selective-op − full, spread over its two passes (forward and
recomputation, both run through its dispatch mode).  Prints the factor
(selective-op − full) / (2 · (full − none)) that ``SAC_DISPATCH_HOST_FACTOR`` takes
(``simulator/costs/compute.py``).  Needs torch (``pip install -e ".[validation]"`` or a CPU build).

    python benchmarks/sac_host_cost.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from plansim.validation.runner.model import LlamaConfig
from plansim.validation.runner.steps import _build


def step_time(recompute: str, steps: int = 50) -> float:
    """Mean seconds per forward + backward of the tiny Llama under ``recompute``."""
    cfg = LlamaConfig.named("tiny")
    model = _build(cfg, torch.device("cpu"), 0, recompute=recompute)
    tokens = torch.randint(0, cfg.vocab, (1, 16))

    def step():
        model.loss(model(tokens), tokens).backward()

    for _ in range(5):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    factors = []
    for i in range(args.repeats):
        none, full, sac = (step_time(rc) for rc in ("none", "full", "selective-op"))
        factors.append((sac - full) / (2 * (full - none)))
        print(f"run {i + 1}: none {none * 1e3:.2f} ms, full {full * 1e3:.2f} ms, selective-op {sac * 1e3:.2f} ms "
              f"-> factor {factors[-1]:.2f}", flush=True)
    print(f"median factor {statistics.median(factors):.2f} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
