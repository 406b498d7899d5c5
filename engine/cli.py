"""The `tessera` command line. Each area adds its own subcommands through an `add_commands(subparsers)`
function, so a new command is one small module listed here."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ["engine.demo", "merge.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="tessera: MoE inference on fused kernels, "
                                     "FlexMerge model merging and LoRA routing")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        print(f"tessera {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
