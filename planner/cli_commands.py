"""``plansim search``: the argument parser and the command (a thin shell over :func:`search`).

Registered by ``plansim/cli.py``::

    from plansim.planner.cli_commands import add_search_parser
    add_search_parser(sub, _Parser)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from plansim.simulator.files import write_atomically
from plansim.workloads.plan import CROSS_ENTROPY, FRAMEWORKS, MOE_DISPATCHERS, PRECISIONS, PlanError

TABLE_COLUMNS = (("hardware", "hardware"), ("num_gpus", "GPUs"), ("tp", "tp"), ("pp", "pp"), ("dp", "dp"),
                 ("cp", "cp"), ("ep", "ep"), ("etp", "etp"), ("zero", "zero"), ("micro_batch", "mb"), ("global_batch", "gbs"),
                 ("recompute", "recompute"), ("schedule", "schedule"), ("optimizer_tier", "optimizer"),
                 ("activations_tier", "activations"),
                 ("step_time_s", "step s"),
                 ("tokens_per_s", "tokens/s"), ("mfu", "MFU"), ("sm_clock", "clock"), ("peak_memory_bytes", "peak mem"),
                 ("cost_per_million_tokens_usd", "$/Mtok"), ("time_to_train_days", "days"), ("evaluated", "by"))


def add_power_limit_arg(p: argparse.ArgumentParser) -> None:
    """``--power-limit WATTS``, for ``plansim simulate`` and ``plansim search``."""
    p.add_argument("--power-limit", type=float, metavar="WATTS",
                   help="cap each GPU's board power (as nvidia-smi -pl does); default: the datasheet limit")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _tokens(text: str) -> float:
    """Token counts: ``2e12``, ``15T``, ``300B``, ``500M``."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count such as 2e12 or 15T, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive token count, got {text!r}")
    return value


def add_search_parser(subparsers: Any, parser_class: type | None = None) -> argparse.ArgumentParser:
    """Register ``plansim search`` on ``subparsers`` (the CLI's ``add_subparsers`` object, which
    already makes parsers of the CLI's class; ``parser_class`` is accepted for symmetry)."""
    p = subparsers.add_parser(
        "search", help="search training plans (parallelism, memory, hardware) and rank them",
        description="Enumerate training plans, prune the infeasible, rank the rest by an analytic estimate and "
                    "confirm the best with the event simulation.")
    p.add_argument("--model", required=True, help="built-in name (plansim models list) or config.json/YAML path")
    p.add_argument("--hardware",
                   help="device name(s), comma-separated to choose among them (h100-sxm,h200,b200,mi300x); "
                        "default: the --cluster's device, else h100-sxm")
    p.add_argument("--cluster", help="cluster name or YAML path (default: each device's default cluster)")
    p.add_argument("--gpus", help="GPU count(s): 512, 256,512, 256..2048 (doubling) or 256..2048:256 (step)")
    p.add_argument("--nodes", type=positive_int)
    p.add_argument("--gpus-per-node", type=positive_int)
    p.add_argument("--nics-per-node", type=positive_int)
    p.add_argument("--nic-gbps", type=float)
    add_power_limit_arg(p)
    batch = p.add_mutually_exclusive_group(required=True)
    batch.add_argument("--global-batch", type=positive_int, help="sequences per step, fixed")
    batch.add_argument("--max-global-batch", type=positive_int,
                       help="each plan takes the largest multiple of dp × micro-batch not above this")
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    p.add_argument("--framework", choices=FRAMEWORKS, default="megatron",
                   help="megatron (default) | pytorch: eager modules, FSDP-style gradients, torchtitan's "
                        "op-level selective recomputation searched too")
    p.add_argument("--cross-entropy", choices=CROSS_ENTROPY, default="unfused",
                   help="the loss kernel every plan uses: unfused (fp32 logits, default) | fused (one kernel on the "
                        "16-bit logits: less memory, so more plans fit)")
    p.add_argument("--moe-dispatcher", choices=MOE_DISPATCHERS, default="alltoall",
                   help="MoE token dispatch every plan uses: alltoall (NCCL all-to-all, token permutations as "
                        "copies; default) | fused (DeepEP / HybridEP kernels that permute as they send)")
    p.add_argument("--moe-a2a-overlap", action="store_true",
                   help="every plan overlaps one micro-batch's MoE all-to-alls with another's compute (Megatron-Core "
                        "--overlap-moe-expert-parallel-comm)")
    p.add_argument("--fp32-grads", action="store_true",
                   help="every plan accumulates and reduces gradients in fp32 (Megatron-LM's bf16 default, "
                        "NeMo's and Megatron-Bridge's grad_reduce_in_fp32): 18 bytes per parameter")
    p.add_argument("--tp-comm-overlap", action="store_true",
                   help="every plan pipelines its sequence-parallel TP collectives with their GEMMs (Megatron-Core "
                        "--tp-comm-overlap, torchtitan AsyncTP)")
    p.add_argument("--partial-recompute", action="store_true",
                   help="where only full recomputation fits, search the fewest recomputed layers per pipeline "
                        "chunk that fit (Megatron's --recompute-method block --recompute-num-layers)")
    p.add_argument("--tp-across-nodes", action="store_true",
                   help="let tensor parallelism span nodes, its collectives over the inter-node network (default: "
                        "inside one NVLink domain; a constraint such as tp=16 also admits that degree)")
    p.add_argument("--offload-optimizer", default="gpu", metavar="TIERS",
                   help="where the optimizer states may live, comma-separated: gpu (default), cpu (ZeRO-Offload's "
                        "CPU Adam), nvme, cxl (ZeRO-Infinity, where the cluster has the tier); e.g. gpu,cpu")
    p.add_argument("--offload-activations", action="store_true",
                   help="also weigh each plan with its saved activations in host memory, sent down layer by "
                        "layer in the forward and fetched back for the backward")
    p.add_argument("--objective", default="throughput",
                   help="throughput | mfu | cost | time-to-train (default throughput)")
    p.add_argument("--tokens", type=_tokens, help="tokens to train on, for time-to-train (e.g. 15T)")
    p.add_argument("--top", type=positive_int, default=10, help="plans to show (default 10)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--out", metavar="FILE.parquet|csv", help="also write the shown plans to a file")
    p.add_argument("--explain", action="store_true", help="why the winner beats the runner-up")
    p.add_argument("--constraint", action="append", default=[], metavar="EXPR",
                   help="repeatable: tp<=8, pp=1, zero>=1, schedule!=zero-bubble, max-memory=70GiB")
    p.add_argument("--pareto", metavar="A,B", help="keep the non-dominated plans on these metrics "
                                                   "(throughput, cost, memory, mfu, time-to-train)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the plans and the Pareto front")
    p.add_argument("--executor", default="local", help="local (process pool) | ray")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--workers", type=positive_int, help="worker processes (default: CPU count, at most 8)")
    p.add_argument("--price", action="append", default=None, metavar="NAME=USD|FILE.yaml",
                   help="price per GPU-hour override, repeatable (built-in: the devices' list prices)")
    p.add_argument("--list-infeasible", action="store_true", help="also list the pruned plans with their reason")
    p.add_argument("--confirm", type=int, default=None,
                   help="event-simulate at least this many of the best estimates (default: max(top, 5)); "
                        "simulated rows come first, so with fewer than --top an estimated row may follow a slower "
                        "simulated one")
    p.add_argument("--no-calibration", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_search)
    return p


#: file kinds a search can write: --out tables, --plot figures (matplotlib's format from the suffix)
OUT_SUFFIXES, PLOT_SUFFIXES = (".parquet", ".csv"), (".png", ".pdf", ".svg")


def parse_tiers(text: str) -> tuple[str, ...]:
    """``--offload-optimizer gpu,cpu`` as a tuple of placements, each one Plan.offload allows."""
    from plansim.workloads.plan import TIERS
    tiers = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in tiers if t not in TIERS]
    if bad or not tiers:
        raise PlanError(f"offload-optimizer: {bad[0] if bad else text!r} is not one of {', '.join(TIERS)}")
    return tiers


def check_output_path(flag: str, path: str | None, suffixes: tuple[str, ...] | None = None) -> None:
    """Refuse an output file of an unknown kind (``suffixes``; None: any), or in a folder that
    does not exist, before the work runs (not after it, with its result lost)."""
    if not path:
        return
    if suffixes is not None and Path(path).suffix.lower() not in suffixes:
        raise PlanError(f"{flag}: {path!r} must end in {', '.join(suffixes)}")
    if not Path(path).resolve().parent.is_dir():
        raise PlanError(f"{flag}: cannot write {path!r}: folder {str(Path(path).parent)!r} does not exist")


def cmd_search(args: argparse.Namespace) -> int:
    from plansim.planner.search import explain, search
    from plansim.planner.space import SearchSpace
    check_output_path("out", args.out, OUT_SUFFIXES)
    check_output_path("plot", args.plot, PLOT_SUFFIXES)
    frame = search(args.model, args.hardware, args.cluster, gpus=args.gpus, nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, nics_per_node=args.nics_per_node, nic_gbps=args.nic_gbps,
                   power_limit_w=args.power_limit, global_batch=args.global_batch,
                   max_global_batch=args.max_global_batch, seq_len=args.seq_len,
                   objective=args.objective, tokens=args.tokens, top=args.top, constraints=args.constraint,
                   pareto=args.pareto, executor=args.executor, workers=args.workers, address=args.address,
                   prices=args.price, confirm=args.confirm, calibrated=not args.no_calibration,
                   progress=not args.no_progress and args.format == "table",
                   list_infeasible=args.list_infeasible, precision=args.precision, framework=args.framework,
                   cross_entropy=args.cross_entropy, moe_dispatcher=args.moe_dispatcher,
                   moe_a2a_overlap=args.moe_a2a_overlap, tp_comm_overlap=args.tp_comm_overlap, fp32_grads=args.fp32_grads,
                   space=SearchSpace(partial_recompute=args.partial_recompute,
                                     optimizer_tiers=parse_tiers(args.offload_optimizer),
                                     activation_offload=args.offload_activations,
                                     tp_within_node=not args.tp_across_nodes))
    summary = frame.attrs["summary"]
    if frame.empty:  # nothing to show: leave --out and --plot files as they were
        if args.format == "json":
            print(json.dumps({"plans": [], "summary": summary, "why_empty": frame.attrs.get("why_empty"),
                              **({"infeasible": frame.attrs.get("infeasible", [])} if args.list_infeasible else {})},
                             indent=2, default=str))
        elif args.list_infeasible:
            _print_infeasible(frame.attrs.get("infeasible", []))
        print(f"plansim search: {frame.attrs.get('why_empty')}", file=sys.stderr)
        return 1
    if args.out:
        write_frame(frame, args.out)
    if args.plot:
        plot_frame(frame, args.plot, args.pareto)
    if args.format == "json":
        out = {"plans": json.loads(frame.to_json(orient="records")), "summary": summary}
        if args.list_infeasible:
            out["infeasible"] = frame.attrs.get("infeasible", [])
        print(json.dumps(out, indent=2, default=str))
    elif args.format == "csv":
        print(csv_frame(frame).to_csv(index=False), end="")
        if args.list_infeasible:
            import pandas as pd
            print(pd.DataFrame(frame.attrs.get("infeasible", [])).to_csv(index=False), end="", file=sys.stderr)
    else:
        _print_table(frame, summary)
        if args.list_infeasible:
            _print_infeasible(frame.attrs.get("infeasible", []))
        if args.explain and len(frame) >= 2:
            print(explain(frame))
    return 0


def csv_frame(frame):
    """The frame with its dict columns as JSON strings (for CSV)."""
    out = frame.copy()
    for col in ("memory_breakdown", "time_breakdown", "plan"):
        out[col] = out[col].map(lambda d: json.dumps(d, sort_keys=True))
    return out


def write_frame(frame, path: str) -> None:
    if path.endswith(".parquet"):
        frame_out = frame.copy()
        frame_out["plan"] = frame_out["plan"].map(lambda d: json.dumps(d, sort_keys=True))
        frame_out.attrs = {}
        write_atomically(path, lambda tmp: frame_out.to_parquet(tmp, index=False))
    elif path.endswith(".csv"):
        write_atomically(path, lambda tmp: csv_frame(frame).to_csv(tmp, index=False))
    else:
        raise PlanError(f"out: {path!r} must end in {', '.join(OUT_SUFFIXES)}")


#: how a metric column is drawn: (axis label, scale applied to the column)
_AXES = {"tokens_per_s": ("throughput (tokens/s, cluster)", 1.0),
         "peak_memory_bytes": ("peak memory per GPU (GiB)", 1 / 2**30),
         "cost_per_million_tokens_usd": ("cost (USD per million tokens)", 1.0),
         "mfu": ("MFU (%)", 100.0), "time_to_train_days": ("time to train (days)", 1.0)}


def plot_frame(frame, path: str, pareto: str | None) -> None:
    """Scatter of the shown plans on two metrics (the --pareto pair, else throughput vs memory)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plansim.planner.search import PARETO_METRICS, pareto_front
    metrics = [m.strip() for m in (pareto or "throughput,memory").split(",")][:2]
    (xc, _), (yc, _) = PARETO_METRICS[metrics[0]], PARETO_METRICS[metrics[1]]
    (x_label, x_scale), (y_label, y_scale) = _AXES.get(xc, (xc, 1.0)), _AXES.get(yc, (yc, 1.0))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if not frame.empty:
        ax.scatter(frame[xc] * x_scale, frame[yc] * y_scale, s=18, alpha=0.5, label="plans shown")
        front = pareto_front(frame, metrics).sort_values(xc)
        ax.plot(front[xc] * x_scale, front[yc] * y_scale, "o-", color="C3", label="Pareto front")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.legend()
    ax.set_title("plansim search")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:].lower()))
    plt.close(fig)


def _fmt(col: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if col == "peak_memory_bytes":
        return f"{v / 2**30:.1f} GiB"
    if col == "mfu":
        return f"{v:.1%}"
    if col == "sm_clock":
        return f"{v:.0%}"
    if col == "tokens_per_s":
        return f"{v:,.0f}"
    if col == "schedule":
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _print_table(frame, summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    cols = [(c, h) for c, h in TABLE_COLUMNS
            if c in frame.columns and not (c == "time_to_train_days" and frame[c].isna().all())
            and not (c in ("optimizer_tier", "activations_tier") and (frame[c] == "gpu").all())]
    table = Table(title=f"plansim search: top {len(frame)} by {summary['objective']}")
    for _, header in cols:
        table.add_column(header, justify="left" if header in ("hardware", "recompute", "schedule", "by") else "right")
    for rec in frame.to_dict("records"):
        cells = []
        for c, _ in cols:
            v = rec[c]
            if c == "schedule" and rec["vpp"] > 1:
                v = f"{v} v={rec['vpp']}"
                group = rec.get("microbatch_group")
                if group is not None and not math.isnan(group):  # NaN: groups of pp
                    v = f"{v} N={int(group)}"
            layers = rec.get("recompute_layers")
            if c == "recompute" and layers is not None and not math.isnan(layers):  # NaN: every layer
                v = f"{v} {int(layers)}/chunk"  # Megatron's block method: the first N layers
            cells.append(_fmt(c, v))
        table.add_row(*cells)
    console = Console(width=220)
    console.print(table)
    reasons = ", ".join(f"{n:,} {r}" for r, n in sorted(summary["pruned_by_reason"].items(), key=lambda kv: -kv[1]))
    console.print(f"{summary['explored']:,} plans explored on {', '.join(summary['targets'])}: "
                  f"{summary['pruned']:,} pruned ({reasons or 'none'}), {summary['estimated']:,} estimated, "
                  f"{summary['simulated']} simulated; {summary['elapsed_s']:.1f} s", highlight=False)


def _print_infeasible(items: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"infeasible plans ({sum(i['count'] for i in items):,})")
    keys = ["hardware", "num_gpus", "tp", "cp", "pp", "dp", "ep", "micro_batch", "schedule", "vpp", "zero",
            "recompute", "count", "reason"]
    for k in keys:
        table.add_column(k)
    for item in items:
        table.add_row(*[str(item.get(k, "*")) for k in keys])
    Console(width=220).print(table)
