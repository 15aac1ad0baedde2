"""Run ``plansim`` with ``search`` registered, whether or not plansim/cli.py registers it yet."""
from __future__ import annotations

import argparse

from plansim import cli
from plansim.planner.cli_commands import add_search_parser


def run(argv: list[str]) -> int:
    original = cli.build_parser

    def build_parser() -> argparse.ArgumentParser:
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "search" not in sub.choices:
            add_search_parser(sub, cli._Parser)
        return parser

    cli.build_parser = build_parser
    try:
        return cli.main(argv)
    finally:
        cli.build_parser = original
