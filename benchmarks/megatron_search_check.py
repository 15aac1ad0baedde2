"""Megatron-LM Table 1 check: does the search find the published plans, or better?

For each row of Narayanan et al. (SC'21) Table 1 (``validation/reference/megatron_table1.csv``),
search plans for the row's GPT model on the row's GPU count of A100 80GB (DGX A100 nodes) at the
row's global batch, and compare with the published plan (its tp, pp, dp, micro-batch, interleaving,
full recomputation) as plansim predicts it.  Pass: the best plan found predicts at least the
published plan's throughput, and the published plan ranks in the top 10.

The published plan is ``validation.megatron.megatron_plan(row)`` (the authors' script: full
recomputation, unfused attention, no sequence parallelism, unfused gradient accumulation,
torch DDP without pipelining and Megatron's local DDP with it).  The search space is Megatron-LM's
of 2021 with that fixed training setup: no distributed optimizer (ZeRO 0), full recomputation
(allowing none finds plans ~1.3-1.5x faster, which says nothing about the layouts), 1F1B or
interleaved, torch DDP without pipelining and local DDP with it (the script's rule); tp inside a
node; the asserts of that Megatron-LM (layers divisible by pp, interleaving only with pp > 2,
micro-batches a multiple of pp when interleaved); tp, pp, dp, micro-batch and virtual stages free.  ``--full-space`` lets the degrees, schedule, ZeRO and recomputation range over
everything plansim knows.

    python benchmarks/megatron_search_check.py [--rows 1.7,3.6] [--write benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from plansim.planner import SearchSpace, search
from plansim.planner.executors import simulate_task
from plansim.simulator.calibration import apply_calibration
from plansim.simulator.hardware import build_cluster
from plansim.validation.megatron import TABLE1_SETUP, megatron_plan
from plansim.validation.reference_data import load_megatron_table1, megatron_gpt_spec
from plansim.workloads.plan import Plan

#: what the authors' Megatron-LM (6985e58) could run: no distributed optimizer, and its asserts:
#: layers divisible by pp (model/transformer.py), the interleaved schedule only with pp > 2
#: (arguments.py) and micro-batches a multiple of pp under interleaving (schedules.py; no groups)
MEGATRON_2021 = SearchSpace(recompute=("full",), schedules=("1f1b", "interleaved"), zero=(0,), even_layers=True,
                            interleaved_min_pp=3, microbatch_groups=False)
# fixed for every plan, as run_table_1.sh ran them: validation/megatron.py's TABLE1_SETUP (fp16 with
# fp16 gradients, no sequence parallelism, unfused attention, no gradient-accumulation fusion,
# synchronous pipeline sends, TP all-reduces in line); and either DDP implementation of the script
SETUP = TABLE1_SETUP
# the script's rule (Megatron-LM of 2021 ran pipelines with its local DDP only): torch DDP without
# pipelining (all-reduce overlapped), local DDP with it (all-reduce after backward)
DDP_IMPLS = {"torch": ({"overlap_grad_reduce": True, "ddp": "torch"}, ["pp=1"]),
             "local": ({"overlap_grad_reduce": False, "ddp": "megatron"}, ["pp>=2"])}


def published_plan(row) -> Plan:
    return Plan.from_dict(megatron_plan(row))


def check_row(row, space: SearchSpace = MEGATRON_2021, workers: int | None = None) -> dict:
    spec = megatron_gpt_spec(row)
    nodes = int(row.gpus) // 8
    t0 = time.perf_counter()
    frames, explored = [], 0
    for ddp, (fields, constraints) in DDP_IMPLS.items():
        f = search(spec, "a100-80gb", "dgx-a100", nodes=nodes, gpus_per_node=8, global_batch=int(row.global_batch),
                   seq_len=int(row.seq_len), top=None, space=space, workers=workers, constraints=constraints,
                   **SETUP, **fields)
        if f.empty:
            continue
        explored += f.attrs["summary"]["explored"]
        frames.append(f.assign(ddp=ddp))
    frame = pd.concat(frames, ignore_index=True).sort_values("tokens_per_s", ascending=False, kind="stable")
    elapsed = time.perf_counter() - t0
    cluster = build_cluster("a100-80gb", "dgx-a100", nodes, 8)
    device, source = apply_calibration(cluster.device)
    if source is not None:
        cluster = cluster.model_copy(update={"device": device})
    pub = simulate_task(spec, cluster, published_plan(row))
    best = frame.iloc[0]
    rank = 1 + int((frame["tokens_per_s"] > pub["tokens_per_s"] * (1 + 1e-9)).sum())
    # the same, counting each (tp, pp, dp, micro-batch) layout once (its vpp/schedule variants are near-ties)
    best_per_layout = frame.groupby(["tp", "pp", "dp", "micro_batch"])["tokens_per_s"].max()
    layout_rank = 1 + int((best_per_layout > pub["tokens_per_s"] * (1 + 1e-9)).sum())
    vpp = published_plan(row).vpp
    return {"model": f"{row.params_b:g}B", "gpus": int(row.gpus), "global_batch": int(row.global_batch),
            "published": f"tp{int(row.tp)} pp{int(row.pp)} dp{int(row.dp)} mb{int(row.micro_batch)}"
                         + (f" v{vpp}" if vpp > 1 else "") + (" local-DDP" if int(row.pp) > 1 else " torch-DDP"),
            "published_tokens_per_s": pub["tokens_per_s"], "published_fits": pub["fits"],
            "found": f"tp{best.tp} pp{best.pp} dp{best.dp} mb{best.micro_batch}" + (f" v{best.vpp}" if best.vpp > 1 else "")
                     + f" {best.ddp}-DDP",
            "found_tokens_per_s": float(best.tokens_per_s), "found_mfu": float(best.mfu),
            "ratio": float(best.tokens_per_s) / pub["tokens_per_s"], "published_rank": rank,
            "published_layout_rank": layout_rank,
            "ok": bool(float(best.tokens_per_s) >= pub["tokens_per_s"] * (1 - 1e-9) and rank <= 10),
            "plans": explored, "search_s": elapsed}


def markdown(results: list[dict]) -> str:
    lines = ["| model | GPUs | batch | published plan | its prediction (tokens/s) | found plan | found (tokens/s) | "
             "found / published | published rank | rank among layouts | pass | search s |",
             "|---|---:|---:|---|---:|---|---:|---:|---:|---:|:-:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['gpus']:,} | {r['global_batch']:,} | {r['published']} | "
                     f"{r['published_tokens_per_s']:,.0f} | {r['found']} | {r['found_tokens_per_s']:,.0f} | "
                     f"{r['ratio']:.3f} | {r['published_rank']} | {r['published_layout_rank']} | {'yes' if r['ok'] else 'NO'} | "
                     f"{r['search_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", help="comma-separated params_b values (default: all ten rows)")
    ap.add_argument("--full-space", action="store_true")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--write", help="replace the Megatron section of this markdown file")
    args = ap.parse_args(argv)
    table = load_megatron_table1()
    if args.rows:
        wanted = {float(x) for x in args.rows.split(",")}
        table = table[table.params_b.isin(wanted)]
    space = SearchSpace() if args.full_space else MEGATRON_2021
    results = []
    for _, row in table.iterrows():
        r = check_row(row, space, args.workers)
        results.append(r)
        print(f"{r['model']:>8} published {r['published']:<22} rank {r['published_rank']:>3}  found {r['found']:<28} "
              f"x{r['ratio']:.3f}  {'ok' if r['ok'] else 'FAIL'}  ({r['search_s']:.1f} s)", flush=True)
    md = markdown(results)
    print(md)
    if args.write:
        write_section(Path(args.write), "## Megatron-LM Table 1: search vs published plans",
                      "Generated by `python benchmarks/megatron_search_check.py --write benchmarks/RESULTS.md`"
                      + (" (full plansim space)" if args.full_space else
                         " (Megatron-LM 2021 space: ZeRO 0, full recomputation, no sequence parallelism, unfused attention "
                         "and gradient accumulation as in the paper's script, torch DDP without pipelining and local DDP with "
                         "it; 1F1B or interleaved; that Megatron-LM's asserts: layers divisible by pp, interleaving "
                         "only with pp > 2; tp, pp, dp, micro-batch and virtual stages free)") + ". Throughputs are plansim predictions (event simulation) on A100 80GB, "
                         "DGX A100 nodes. *Pass*: the best plan found predicts at least the published plan's throughput "
                         "and the published plan ranks in the top 10 of all plans; *rank among layouts* counts each "
                         "(tp, pp, dp, micro-batch) once, since its schedule/vpp variants are near-ties.\n\n" + md)
    return 0 if all(r["ok"] for r in results) else 1


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the section that starts with ``heading`` in a markdown file."""
    text = path.read_text() if path.exists() else "# Planner benchmarks\n"
    start = text.find(heading)
    block = f"{heading}\n\n{body}\n"
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + block + (text[end + 1:] if end >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
