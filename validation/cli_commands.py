"""``plansim calibrate`` and ``plansim validate``: parsers and handlers, registered by plansim/cli.py.

Thin: each handler calls one function (``calibrate.calibrate``, ``compare.validate`` and
``compare.summarize``) and formats its result.  Bad input ends with one line on stderr and
exit code 2, as every plansim command does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
SUITES = ("kernels", "transfers", "collectives", "steps", "vidur")  # compare.SUITES


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_calibrate(args: argparse.Namespace) -> int:
    from plansim.validation.calibrate import calibrate
    from plansim.validation.compare import CALIBRATED_DIR, data_folders

    if args.from_vidur:
        from plansim.validation.compare import DATA_DIR
        from plansim.validation.vidur import calibrate_from_vidur
        data = Path(args.data) if args.data else DATA_DIR
        try:
            path = calibrate_from_vidur(data / "vidur", CALIBRATED_DIR, Path(args.out) if args.out else None)
        except (ValueError, OSError) as exc:
            return _fail(f"plansim calibrate: {str(exc).splitlines()[0]}")
        print(f"{path.stem}: {path}")
        return 0

    data = Path(args.data) if args.data else None
    try:
        from plansim.validation.compare import DATA_DIR
        data = data or DATA_DIR
        if not data_folders(data):
            return _fail(f"plansim calibrate: no measurements under {data} (run plansim measure first)")
        written = calibrate(data, devices=args.device or None, out_dir=Path(args.out) if args.out else CALIBRATED_DIR)
    except (ValueError, OSError) as exc:
        return _fail(f"plansim calibrate: {str(exc).splitlines()[0]}")
    for device, path in written.items():
        print(f"{device}: {path}")
    return 0


def _fmt_value(metric: str, value: float) -> str:
    if metric == "peak_memory_bytes":
        return f"{value / 2**30:.2f} GiB"
    if value >= 1:
        return f"{value:.3f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3f} ms"
    return f"{value * 1e6:.2f} us"


def cmd_validate(args: argparse.Namespace) -> int:
    from plansim.validation.compare import CALIBRATED_DIR, DATA_DIR, SplitError, summarize, validate

    if args.profiles and not Path(args.profiles).is_dir():
        return _fail(f"profiles: {args.profiles}: no such directory")
    try:
        frame = validate(args.suite, Path(args.data) if args.data else DATA_DIR,
                         profiles_dir=Path(args.profiles) if args.profiles else CALIBRATED_DIR,
                         calibrated=not args.no_calibration)
    except SplitError as exc:
        return _fail(f"plansim validate: {exc}")
    except (ValueError, OSError) as exc:
        return _fail(f"plansim validate: {str(exc).splitlines()[0]}")
    if frame.empty:
        return _fail(f"plansim validate: no held-out cases for suite {args.suite} under {args.data or DATA_DIR}")
    summary = summarize(frame)
    if args.format == "json":
        print(json.dumps({"cases": json.loads(frame.to_json(orient="records")),
                          "summary": json.loads(summary.to_json(orient="records"))}, indent=1))
        return 0
    if args.format == "csv":
        frame.to_csv(sys.stdout, index=False)
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not args.summary_only:
        table = Table(title=f"plansim validate --suite {args.suite}: held-out cases")
        for col in ("suite", "source", "case", "metric", "measured", "predicted", "error"):
            table.add_column(col, justify="right" if col in ("measured", "predicted", "error") else "left")
        for r in frame.itertuples():
            table.add_row(r.suite, r.source, r.case_id, r.metric, _fmt_value(r.metric, r.measured),
                          _fmt_value(r.metric, r.predicted), f"{r.error:+.1%}")
        console.print(table)
    table = Table(title="summary: median / p90 of |error|, mean signed error; error = (pred - meas) / meas")
    for col in ("suite", "metric", "count", "median", "p90", "mean"):
        table.add_column(col, justify="left" if col in ("suite", "metric") else "right", no_wrap=True)
    for r in summary.itertuples():
        table.add_row(r.suite, r.metric, str(r.count), f"{r.median_abs_error:.1%}", f"{r.p90_abs_error:.1%}",
                      f"{r.mean_error:+.1%}")
    console.print(table)
    return 0


def add_parsers(subparsers, parser_class=argparse.ArgumentParser) -> None:
    """Register ``calibrate`` and ``validate`` on the CLI's subparsers (imports nothing heavy:
    pandas and scipy load only when a command runs)."""
    p = subparsers.add_parser("calibrate", help="fit calibrated hardware profiles to the calibration split")
    p.add_argument("--data", help="measurement folder (default: validation/data)")
    p.add_argument("--device", action="append", default=[], help="fit only this device (repeatable)")
    p.add_argument("--out", help="where to write <device>.yaml (default: hardware_profiles/calibrated)")
    p.add_argument("--from-vidur", action="store_true",
                   help="fit the A100's GEMM rate (never measured here) to Vidur's A100 GEMM times")
    p.set_defaults(func=cmd_calibrate)

    p = subparsers.add_parser("validate", help="predict every held-out measured case and report the error")
    p.add_argument("--suite", choices=SUITES + ("all",), default="all")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--data", help="measurement folder (default: validation/data)")
    p.add_argument("--profiles", help="calibrated profiles folder (default: hardware_profiles/calibrated)")
    p.add_argument("--no-calibration", action="store_true", help="score the datasheet profiles instead")
    p.add_argument("--summary-only", action="store_true", help="print only the per-suite summary (table format)")
    p.set_defaults(func=cmd_validate)


__all__ = ["add_parsers", "cmd_calibrate", "cmd_validate"]
