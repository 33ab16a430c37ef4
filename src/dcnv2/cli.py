"""The ``dcnv2`` command line: ``dcnv2 <command> --help`` describes each command."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark our ops against torchvision and dense conv (ratios)")
    p.add_argument("--op", choices=["deform_conv", "deform_roi_pool", "all"], default="all")
    p.add_argument("--repeats", type=int, default=5, help="repetitions; the best is reported")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    names = ["deform_conv", "deform_roi_pool"] if args.op == "all" else [args.op]
    for name in names:
        path = root / f"{name}.py"
        if not path.exists():
            print(f"dcnv2 bench: {path} not found (benchmarks ship with the source checkout)", file=sys.stderr)
            return 2
        sys.argv = [str(path), "--repeats", str(args.repeats)]
        runpy.run_path(str(path), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcnv2", description="Deformable ConvNets v2: train, evaluate, analyse.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_bench(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"dcnv2 {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
