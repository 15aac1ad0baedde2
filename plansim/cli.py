"""The ``plansim`` command line: parse, call the public API, format.  Nothing else lives here.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from plansim.planner.cli_commands import add_power_limit_arg, check_output_path, positive_int

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input found by the CLI itself."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UserError(f"{self.prog}: {message}")


def _size(text: str) -> int:
    """Sizes in bytes with optional units (``1GiB``, ``64MiB``, ``4096``)."""
    from plansim.simulator.units import UnitError, parse_quantity
    try:
        value = parse_quantity(text, "bytes")
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(value)


def _add_cluster_args(p: argparse.ArgumentParser, hardware_default: str | None = None) -> None:
    p.add_argument("--hardware", default=hardware_default, help="device name or YAML path (plansim hardware list)")
    p.add_argument("--cluster", help="cluster name or YAML path")
    p.add_argument("--nodes", type=positive_int)
    p.add_argument("--gpus-per-node", type=positive_int)
    p.add_argument("--nics-per-node", type=positive_int)
    p.add_argument("--nic-gbps", type=float)
    p.add_argument("--no-calibration", action="store_true", help="use the datasheet profile even if a calibrated one exists")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    from plansim.workloads.plan import ATTENTION, CROSS_ENTROPY, MOE_DISPATCHERS, PRECISIONS, RECOMPUTE, SCHEDULES
    p.add_argument("--plan", help="YAML/JSON file with plan fields (flags override it)")
    for name in ("tp", "pp", "dp", "cp", "ep", "vpp", "micro-batch", "global-batch", "seq-len",
                 "first-stage-layers", "last-stage-layers"):
        p.add_argument(f"--{name}", type=positive_int)
    p.add_argument("--microbatch-group", type=positive_int, metavar="N",
                   help="interleaved schedule: micro-batches run through one virtual stage before the next "
                        "(Megatron-Core's --microbatch-group-size-per-virtual-pipeline-stage; default pp)")
    p.add_argument("--etp", type=positive_int,
                   help="expert tensor parallelism: tp (default) or 1, Megatron-Core's MoE parallel folding "
                        "(whole experts; ep may then span tp·cp·dp)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    p.add_argument("--recompute", choices=RECOMPUTE)
    p.add_argument("--recompute-layers", type=positive_int, metavar="N",
                   help="with --recompute full: only the first N layers of each pipeline chunk "
                        "(Megatron's --recompute-method block --recompute-num-layers N)")
    p.add_argument("--recompute-every", type=positive_int, metavar="N",
                   help="with --recompute full: only every N-th layer (torchtitan's selective_ac_option = N)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--attention", choices=ATTENTION,
                   help="flash: FlashAttention-2 (PyTorch SDPA); cudnn: cuDNN fused attention (Transformer Engine, "
                        "the default with --framework megatron); unfused: Megatron 2021")
    p.add_argument("--cp-comm", choices=("ring", "allgather"), help="context parallelism: ring attention or K/V all-gather")
    p.add_argument("--cross-entropy", choices=CROSS_ENTROPY,
                   help="unfused: the loss on fp32 logits (default); fused: one kernel on the 16-bit logits "
                        "(flash-attn's xentropy, llm-foundry's fused_crossentropy)")
    p.add_argument("--ddp", choices=("megatron", "torch"), help="data-parallel wrapper (torch: PyTorch DDP's bucket copy)")
    p.add_argument("--moe-dispatcher", choices=MOE_DISPATCHERS,
                   help="MoE token dispatch: alltoall (NCCL all-to-all, token permutations as copies; default) | "
                        "fused (DeepEP / HybridEP kernels that permute as they send)")
    p.add_argument("--moe-a2a-overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="Megatron-Core's EP overlap (--overlap-moe-expert-parallel-comm): one micro-batch's "
                        "all-to-alls beside another's compute in the 1F1B steady state (default off)")
    p.add_argument("--framework", choices=("megatron", "pytorch"),
                   help="megatron: fused kernels, persistent grad buffer (default); pytorch: eager modules")
    p.add_argument("--fp32-grads", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--grad-accumulation-fusion", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--overlap-p2p", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--tp-backward-overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="TP backward collectives beside the gradient GEMMs (default: on with --framework megatron)")
    p.add_argument("--tp-comm-overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="every sequence-parallel TP collective pipelined with its GEMM, forward and backward "
                        "(Megatron-Core --tp-comm-overlap, torchtitan AsyncTP; default off)")
    p.add_argument("--offload", action="append", default=[], metavar="WHAT=TIER",
                   help="e.g. optimizer=cpu (params|grads|optimizer|activations = gpu|cpu|nvme|cxl)")


def _plan_fields(args: argparse.Namespace) -> dict[str, Any]:
    from plansim.api import load_plan
    fields: dict[str, Any] = load_plan(args.plan) if args.plan else {}
    for name in ("tp", "pp", "dp", "cp", "ep", "etp", "vpp", "micro_batch", "global_batch", "seq_len", "zero",
                 "recompute", "recompute_layers", "recompute_every", "sequence_parallel", "schedule", "precision", "attention", "framework", "cp_comm", "cross_entropy", "ddp",
                 "moe_dispatcher", "moe_a2a_overlap", "fp32_grads", "grad_accumulation_fusion",
                 "overlap_grad_reduce", "overlap_p2p", "tp_backward_overlap", "tp_comm_overlap", "first_stage_layers",
                 "last_stage_layers", "microbatch_group"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    for item in args.offload:
        what, sep, tier = item.partition("=")
        if not sep:
            raise UserError(f"--offload: expected WHAT=TIER, got {item!r}")
        fields.setdefault("offload", {})[what] = tier
    if fields.get("vpp", 1) > 1 and "schedule" not in fields:
        fields["schedule"] = "interleaved"
    return fields


def _print_table(rows: list[tuple[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _print_frame(frame, fmt: str, title: str = "") -> None:
    if fmt == "json":
        print(frame.to_json(orient="records", indent=2))
    elif fmt == "csv":
        print(frame.to_csv(index=False), end="")
    else:
        from rich.console import Console
        from rich.table import Table
        table = Table(title=title or None)
        for col in frame.columns:
            table.add_column(str(col))
        for row in frame.itertuples(index=False):
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
        Console(width=200).print(table)


# --- commands ------------------------------------------------------------------------------------
#: what ``plansim simulate`` runs when no plan field is given: Megatron's distributed optimizer
#: (ZeRO-1), 4096-token sequences, 32 sequences per step (4 micro-batches of 1 per GPU on a node)
DEFAULT_PLAN = {"zero": 1, "seq_len": 4096, "micro_batch": 1, "global_batch": 32}


def cmd_simulate(args: argparse.Namespace) -> int:
    from plansim.api import simulate
    from plansim.simulator.units import format_bytes
    if args.trace_detail and not args.trace:
        raise UserError("--trace-detail: needs --trace OUT.json (it sets what the trace holds)")
    check_output_path("trace", args.trace)
    fields = _plan_fields(args) or dict(DEFAULT_PLAN)
    result = simulate(args.model, args.hardware, args.cluster, fields, nodes=args.nodes,
                      gpus_per_node=args.gpus_per_node, nics_per_node=args.nics_per_node, nic_gbps=args.nic_gbps,
                      trace=bool(args.trace), trace_detail=args.trace_detail or "phase",
                      calibrated=not args.no_calibration,
                      power_limit_w=args.power_limit)
    if args.trace:
        result.write_trace(args.trace)
    if args.format == "json":
        print(result.to_json())
        return 0
    p = result.plan
    etp = "" if p.get("etp") is None else f"etp={p['etp']} "  # given only for MoE parallel folding
    layers = ("" if p.get("recompute_layers") is None else f" ({p['recompute_layers']} layers/chunk)") + (
        "" if p.get("recompute_every") is None else f" (every {p['recompute_every']} layers)")
    rows = [
        ("model / hardware", f"{result.model} on {result.num_gpus}× {result.hardware} ({result.cluster})"),
        ("plan", f"tp={p['tp']} pp={p['pp']} dp={p['dp']} cp={p['cp']} ep={p['ep']} {etp}zero={p['zero']} "
                 f"mb={p['micro_batch']} gbs={p['global_batch']} seq={p['seq_len']} recompute={p['recompute']}{layers} "
                 f"schedule={p['schedule']} vpp={p['vpp']}"
                 + ("" if p.get("microbatch_group") is None else f" microbatch_group={p['microbatch_group']}")
                 + f" {p['precision']}"),
        ("step time", f"{result.step_time_s:.4f} s"),
        ("tokens/s (cluster)", f"{result.tokens_per_s:,.0f}"),
        ("MFU / HFU", f"{result.mfu:.1%} / {result.hfu:.1%}"),
        ("peak memory", f"{format_bytes(result.peak_memory_bytes)} of {format_bytes(result.device_memory_bytes)}"
                        f" ({'fits' if result.peak_memory_bytes <= result.device_memory_bytes else 'DOES NOT FIT'})"),
    ]
    if not result.fits:
        rows.append(("infeasible", result.infeasible_reason))
    rows += [(f"  memory: {k}", format_bytes(v)) for k, v in result.memory_breakdown.items()]
    rows += [(f"  time: {k.replace('_', ' ')}", f"{v:.4f} s") for k, v in result.time_breakdown.items()]
    rows.append(("SM clock (power limit)", "not modelled for this device" if result.sm_clock is None else
                 f"{result.sm_clock:.0%} of maximum" + (" (held by the board power limit)" if result.sm_clock < 1 else "")))
    if result.power_w is not None:
        rows.append(("board power / energy", f"{result.power_w:.0f} W per GPU, {result.energy_per_token_j:.3g} J per token"))
    rows.append(("profile", result.calibrated_profile or "datasheet (no calibrated profile)"))
    if args.trace:
        rows.append(("trace", f"{args.trace} (open in https://ui.perfetto.dev or chrome://tracing)"))
    _print_table(rows, "plansim simulate")
    return 0


def cmd_op(args: argparse.Namespace) -> int:
    from plansim.api import predict_op
    shape = {k: getattr(args, k) for k in ("m", "n", "k", "dtype", "split_accumulate", "batch", "heads", "kv_heads",
                                            "head_dim", "seq_len", "causal", "phase", "attention", "bytes",
                                            "pageable")}
    required = {"gemm": ("m", "n", "k"), "attention": ("batch", "heads", "head_dim", "seq_len"),
                "memcpy": ("bytes",), "elementwise": ("bytes",), "h2d": ("bytes",), "d2h": ("bytes",)}[args.kind]
    missing = [f"--{r.replace('_', '-')}" for r in required if shape[r] is None]
    if missing:
        raise UserError(f"plansim op --kind {args.kind}: missing {', '.join(missing)}")
    if args.kind == "attention" and args.kv_heads is not None and args.heads % args.kv_heads:
        raise UserError(f"kv-heads: {args.kv_heads} must divide heads {args.heads} (each key/value head serves "
                        "a whole group of query heads)")
    out = predict_op(args.kind, args.hardware, calibrated=not args.no_calibration, **shape)
    if args.format == "json":
        print(json.dumps(out, indent=2))
    else:
        _print_table([(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in out.items()], f"plansim op {args.kind}")
    return 0


def cmd_collective(args: argparse.Namespace) -> int:
    from plansim.api import predict_collective
    out = predict_collective(args.op, args.bytes, args.hardware, args.cluster, nodes=args.nodes,
                             gpus_per_node=args.gpus_per_node, algorithm=args.algorithm,
                             calibrated=not args.no_calibration)
    if args.format == "json":
        print(json.dumps(out, indent=2))
    else:
        _print_table([(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in out.items()],
                     f"plansim collective {args.op}")
    return 0


def cmd_hardware_list(args: argparse.Namespace) -> int:
    from plansim.simulator.hardware import list_profiles
    _print_frame(list_profiles(args.kind), args.format, f"built-in {args.kind}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from plansim.workloads.model_io import list_models
    _print_frame(list_models(), args.format, "built-in models")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    try:
        from plansim.validation.runner import measure
    except ImportError as exc:
        raise UserError(f"plansim measure needs the validation extra (pip install 'plansim[validation]'): {exc}") from None
    try:
        files = measure(args.suite, args.out, quick=args.quick)
    except RuntimeError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    for f in files:
        print(f)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="plansim", description="Simulate and plan large-scale ML training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("simulate", help="evaluate one training plan")
    p.add_argument("--model", default="llama3-8b", help="built-in name (plansim models list) or config.json/YAML path")
    _add_cluster_args(p)
    add_power_limit_arg(p)
    _add_plan_args(p)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--trace", metavar="OUT.json", help="write a Chrome/Perfetto trace")
    p.add_argument("--trace-detail", choices=("phase", "op"), default=None,
                   help="trace slices per phase (default) or per op; needs --trace")
    p.set_defaults(func=cmd_simulate)

    from plansim.workloads.plan import FUSED_ATTENTION
    p = sub.add_parser("op", help="predict one kernel")
    p.add_argument("--kind", required=True, choices=("gemm", "attention", "memcpy", "elementwise", "h2d", "d2h"))
    p.add_argument("--hardware", default="h100-sxm")
    for name in ("m", "n", "k", "batch", "heads", "kv-heads", "head-dim", "seq-len"):
        p.add_argument(f"--{name}", type=positive_int)
    p.add_argument("--bytes", type=_size)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "tf32", "fp8"), default="bf16")
    p.add_argument("--split-accumulate", action="store_true",
                   help="fp8: promote partial sums as it goes (Transformer Engine's dgrad and wgrad GEMMs)")
    p.add_argument("--attention", choices=FUSED_ATTENTION, default="flash",
                   help="fused attention kernels: FlashAttention-2 (PyTorch SDPA) or cuDNN's (Transformer Engine)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--phase", choices=("forward", "backward", "both"), default="forward")
    p.add_argument("--pageable", action="store_true")
    p.add_argument("--no-calibration", action="store_true")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_op)

    p = sub.add_parser("collective", help="predict one collective as nccl-tests measures it")
    p.add_argument("--op", required=True,
                   choices=("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv"))
    p.add_argument("--bytes", required=True, type=_size)
    p.add_argument("--algorithm", choices=("auto", "ring", "tree"), default="auto")
    _add_cluster_args(p)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_collective)

    p = sub.add_parser("hardware", help="built-in hardware profiles")
    hw = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    q = hw.add_parser("list")
    q.add_argument("--kind", default="devices", choices=("devices", "links", "hosts", "storage", "clusters"))
    q.add_argument("--format", choices=("table", "json", "csv"), default="table")
    q.set_defaults(func=cmd_hardware_list)

    p = sub.add_parser("models", help="built-in models")
    ms = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    q = ms.add_parser("list")
    q.add_argument("--format", choices=("table", "json", "csv"), default="table")
    q.set_defaults(func=cmd_models_list)

    p = sub.add_parser("measure", help="measure kernels, transfers, collectives and steps on local GPUs (needs torch)")
    from plansim.validation.runner import EXTRA_SUITES, SUITES
    p.add_argument("--suite", choices=(*SUITES, "all", *EXTRA_SUITES), default="all",
                   help="gpt2021: Megatron-LM 2021 GPT operators and steps; parallel2: 2-GPU expert and context "
                        "parallelism; power: sustained clocks under the board power limit; powerkernels: the power "
                        "each kind of kernel draws; overlap: a GEMM beside an NCCL collective; profile: one GPU's "
                        "step time by kernel class (none part of all; see validation/MEASURING.md)")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.set_defaults(func=cmd_measure)

    from plansim.planner.cli_commands import add_search_parser
    from plansim.validation.cli_commands import add_parsers as add_validation_parsers
    add_search_parser(sub, _Parser)
    add_validation_parsers(sub, _Parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from plansim.simulator.hardware import ProfileError
    from plansim.simulator.units import UnitError
    from plansim.workloads.models import ModelError
    from plansim.workloads.plan import PlanError
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UserError, PlanError, ModelError, ProfileError, UnitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # an output file that cannot be written, an input that cannot be read
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
