"""``sgr-ext``: the command line. Each subcommand lives in its own module with ``register(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = ("sgr_ext.demo", "sgr_ext.trainer.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgr-ext", description="Local learning with Successive Gradient Reconciliation")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Bad arguments or input: one line, not a traceback (SGR_EXT_DEBUG=1: the traceback,
        # for telling a library bug from bad input).
        if os.environ.get("SGR_EXT_DEBUG") == "1":
            raise
        print(f"sgr-ext {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
