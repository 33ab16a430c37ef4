"""The ``dcnv2`` command line: ``dcnv2 <command> --help`` describes each command.

Each command lives in its own module ``dcnv2.commands.<name>`` exposing ``add_parser(subparsers)``,
which registers the sub-parser and sets ``func`` (called with the parsed args, returns an exit code).
Command modules import heavy dependencies inside ``func`` so that ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Order shown in --help. A module listed here that does not exist yet is skipped.
COMMANDS = ("demo", "tour", "data", "train", "eval", "train_cls", "predict", "params", "analyze", "export", "convert",
            "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcnv2", description="Deformable ConvNets v2: train, evaluate, analyse.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dcnv2.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"dcnv2.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"dcnv2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as exc:
        text = str(exc)
        if "Original Traceback" in text:  # raised in a DataLoader worker: its message, not the worker's traceback
            from dcnv2.engine.train import exception_message

            text = exception_message(exc)
        print(f"dcnv2 {args.command}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
