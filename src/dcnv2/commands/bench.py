"""``dcnv2 bench``: run the op benchmarks (ours vs torchvision vs dense conv, ratios in one process)."""
from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = ("deform_conv", "deform_roi_pool")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark our ops against torchvision and dense conv (prints ratios)")
    p.add_argument("--op", choices=[*BENCHMARKS, "all"], default="all")
    p.add_argument("--repeats", type=int, default=5, help="repetitions; the best is reported")
    p.set_defaults(func=run)


def run(args) -> int:
    import runpy

    root = Path(__file__).resolve().parents[3] / "benchmarks"
    names = BENCHMARKS if args.op == "all" else (args.op,)
    for name in names:
        path = root / f"{name}.py"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (benchmarks ship with the source checkout)")
        saved = sys.argv
        sys.argv = [str(path), "--repeats", str(args.repeats)]
        try:
            runpy.run_path(str(path), run_name="__main__")
        finally:
            sys.argv = saved
    return 0
