"""How long one ``plansim simulate`` takes, and how that grows with the cluster.

Acceptance (issue 2): one iteration of a 175 B model on 1024 GPUs (GPT-3 175B, TP8 PP8 DP16,
1F1B, global batch 1536, micro-batch 1) in under 2 s on one core.  Then the growth with GPU
count up to 16,384: data parallelism (weak scaling: micro-batches per pipeline fixed; and
strong scaling: global batch fixed), pipeline depth, and micro-batch count.

Run:  python benchmarks/bench_simulate.py [--repeat N] [--out benchmarks/RESULTS_simulate.md]

Each row is the median wall time of ``plansim.simulate`` over N runs in this process after one
warm-up run (profiles and model specs are parsed once and cached; the warm-up's "cold" time is
reported separately for the headline case).  Single-threaded: numpy/BLAS threads are pinned to 1
and, where the OS allows, the process to one CPU.  No assertion on time lives in the tests.
"""
from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

from plansim.api import simulate  # noqa: E402

MODEL = "gpt3-175b"
TARGET_S = 2.0


def _pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        try:
            cpu = sorted(os.sched_getaffinity(0))[0]
            os.sched_setaffinity(0, {cpu})
            return f"pinned to CPU {cpu}"
        except OSError:
            pass
    return "not pinned"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_case(hardware: str, tp: int, pp: int, dp: int, global_batch: int, micro_batch: int = 1,
             schedule: str = "1f1b", trace: bool = False, repeat: int = 5) -> dict:
    gpus = tp * pp * dp
    nodes = gpus // 8
    plan = dict(tp=tp, pp=pp, dp=dp, global_batch=global_batch, micro_batch=micro_batch, schedule=schedule)
    t0 = time.perf_counter()
    result = simulate(MODEL, hardware, plan=plan, nodes=nodes, gpus_per_node=8, trace=trace)
    cold = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        simulate(MODEL, hardware, plan=plan, nodes=nodes, gpus_per_node=8, trace=trace)
        times.append(time.perf_counter() - t0)
    return dict(hardware=hardware, gpus=gpus, tp=tp, pp=pp, dp=dp, global_batch=global_batch,
                microbatches=global_batch // (dp * micro_batch), schedule=schedule, trace=trace,
                wall_s=statistics.median(times), min_s=min(times), cold_s=cold,
                step_time_s=result.step_time_s, mfu=result.mfu, events=len(result.events))


def _row(r: dict) -> str:
    return (f"| {r['hardware']} | {r['gpus']:,} | {r['tp']} | {r['pp']} | {r['dp']} | {r['global_batch']:,} "
            f"| {r['microbatches']} | {'yes' if r['trace'] else 'no'} | {r['wall_s'] * 1e3:.1f} "
            f"| {r['min_s'] * 1e3:.1f} | {r['step_time_s']:.2f} | {r['mfu']:.1%} |")


HEADER = ("| hardware | GPUs | TP | PP | DP | global batch | micro-batches / pipeline | trace | "
          "median wall (ms) | min wall (ms) | simulated step (s) | MFU |\n"
          "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", help="markdown file to write (default: RESULTS_simulate.md beside this script; "
                                   "with --quick, nothing unless given)")
    ap.add_argument("--quick", action="store_true", help="headline cases only")
    args = ap.parse_args(argv)
    pinned = _pin_one_core()

    sections: list[tuple[str, str, list[dict]]] = []

    def section(title: str, note: str, cases: list[dict]) -> list[dict]:
        rows = []
        print(f"\n{title}\n{HEADER}")
        for kw in cases:
            r = run_case(repeat=args.repeat, **kw)
            rows.append(r)
            print(_row(r), flush=True)
        sections.append((title, note, rows))
        return rows

    head = section(
        "Headline: GPT-3 175B, 1024 GPUs, TP8 PP8 DP16, 1F1B, global batch 1536, micro-batch 1",
        f"Target: under {TARGET_S:g} s per simulated iteration on one core.",
        [dict(hardware=hw, tp=8, pp=8, dp=16, global_batch=1536, trace=tr)
         for hw in ("a100-80gb", "h100-sxm") for tr in (False, True)])
    if not args.quick:
        section("Data-parallel growth, weak scaling (96 micro-batches per pipeline; global batch 96·DP)",
                "Symmetry: DP replicas are simulated once, so the cost should stay flat.",
                [dict(hardware="h100-sxm", tp=8, pp=8, dp=dp, global_batch=96 * dp) for dp in (2, 16, 32, 64, 128, 256)])
        section("Data-parallel growth, strong scaling (global batch 1536 fixed)",
                "Fewer micro-batches per pipeline as DP grows: fewer events.",
                [dict(hardware="h100-sxm", tp=8, pp=8, dp=dp, global_batch=1536) for dp in (16, 32, 64, 128, 256)])
        section("Pipeline-depth growth (DP16, 96 micro-batches per pipeline)",
                "One process per pipeline stage: events grow with PP × micro-batches.",
                [dict(hardware="h100-sxm", tp=8, pp=pp, dp=16, global_batch=1536) for pp in (1, 2, 4, 8, 16, 32)]
                + [dict(hardware="h100-sxm", tp=8, pp=32, dp=64, global_batch=96 * 64)])
        section("Micro-batch growth (TP8 PP8 DP16)",
                "Events grow linearly with micro-batches per pipeline.",
                [dict(hardware="h100-sxm", tp=8, pp=8, dp=16, global_batch=16 * m) for m in (8, 32, 96, 384, 1536)])

    headline = [r for r in head if not r["trace"]]
    verdict = all(r["wall_s"] < TARGET_S for r in headline)
    lines = [
        "# plansim simulate: time per simulated iteration",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with `python benchmarks/bench_simulate.py "
        f"--repeat {args.repeat}`",
        f"on {_cpu_name()} ({pinned}; BLAS threads 1), Python {platform.python_version()}, "
        f"{sys.platform}. Wall times are the median (and minimum) of {args.repeat} runs of "
        "`plansim.simulate` after one warm-up; the warm-up (cold, profiles parsed) of each headline "
        "row is listed below the table.",
        "",
        f"**Acceptance: {'met' if verdict else 'NOT met'}** — GPT-3 175B on 1024 GPUs (TP8 PP8 DP16, 1F1B, "
        f"global batch 1536, micro-batch 1): " + ", ".join(
            f"{r['hardware']} {r['wall_s'] * 1e3:.0f} ms" for r in headline) + f" (target < {TARGET_S:g} s).",
        "",
    ]
    for title, note, rows in sections:
        lines += [f"## {title}", "", note, "", HEADER] + [_row(r) for r in rows] + [""]
        if rows is head:
            lines += ["Cold (first call in the process): " + ", ".join(
                f"{r['hardware']}{' +trace' if r['trace'] else ''} {r['cold_s'] * 1e3:.0f} ms" for r in rows), ""]
    out = args.out or (None if args.quick else str(Path(__file__).with_name("RESULTS_simulate.md")))
    if out:
        Path(out).write_text("\n".join(lines))
    print(f"\n{'wrote ' + out if out else 'quick run, nothing written'}; acceptance {'met' if verdict else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
