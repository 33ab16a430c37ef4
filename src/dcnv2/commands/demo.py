"""``dcnv2 demo``: regular vs DCNv2 Faster R-CNN on the synthetic deformed-objects set, on a fixed schedule
with a time limit as its safety net."""
from __future__ import annotations

import argparse

from dcnv2.experiments.demo import DEMO_ITERS, DEMO_PRETRAIN_ITERS, DEMO_TIME_LIMIT_MINUTES

DEFAULT_PRESETS = ("regular", "mdconv-c3c5-mdpool")


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (checked before any data is written or any model trains)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="train regular and DCNv2 detectors on synthetic data on one fixed schedule, compare their AP",
        description="Generate the synthetic data set (the demo's difficulty: 6 classes, objects 20-70%% of the "
                    "side), pre-train each model's backbone on object crops, train a regular and a DCNv2 "
                    "(mdconv-c3c5-mdpool) Faster R-CNN on the same fixed schedule (240 crop + 400 detector "
                    "iterations: the same seed gives the same table on any machine of this kind, the machine's "
                    "speed changes only how long it takes), evaluate both with COCOeval and print their AP side "
                    "by side. --minutes is a safety net: a machine too slow for the schedule stops phases early "
                    "and says so. Plots (loss curves, detections, spatial support) go to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output directory (data, runs, plots, tables)")
    p.add_argument("--minutes", type=_positive_float, default=DEMO_TIME_LIMIT_MINUTES,
                   help="time limit of the whole demo (data, both trainings, evaluation, plots): phases that "
                        "would overrun it stop early and are reported (with --fit-budget: the budget the schedule "
                        "is fitted to)")
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), help="models to compare")
    p.add_argument("--iters", type=_at_least(1), default=None,
                   help="detector iterations per model (default: the demo's schedule, %d)" % DEMO_ITERS)
    p.add_argument("--pretrain-iters", type=_at_least(0), default=None,
                   help="crop pre-training iterations per model (default: the demo's schedule, %d; 0: detectors "
                        "from scratch)" % DEMO_PRETRAIN_ITERS)
    p.add_argument("--fit-budget", action="store_true",
                   help="instead of the fixed schedule, fit the iteration counts to --minutes as the models train "
                        "(results then depend on the machine's speed)")
    p.add_argument("--pretrain-fraction", type=float, default=0.3,
                   help="with --fit-budget: share of each model's training time spent pre-training its backbone "
                        "on object crops (0: detectors from scratch)")
    p.add_argument("--full-difficulty", action="store_true",
                   help="the full synthetic set of `dcnv2 data synth` (12 classes, 10x scale range) instead of "
                        "the demo's")
    p.add_argument("--classes", nargs="+", default=None, help="override the demo's classes (names from "
                   "`dcnv2 data synth`)")
    p.add_argument("--seed", type=int, default=0, help="training seed (initialisation, data order, sampling)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data set")
    p.add_argument("--num-train", type=_at_least(1), default=1600, help="synthetic training images")
    p.add_argument("--num-val", type=_at_least(1), default=400, help="synthetic validation images")
    p.add_argument("--image-size", type=_at_least(32), default=128)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=_at_least(1), default=None, help="default: the recipe's")
    p.add_argument("--lr", type=_positive_float, default=None, help="default: the recipe's")
    p.add_argument("--pretrain-batch-size", type=_at_least(1), default=None,
                   help="crop pre-training batch (default: the recipe's, 64)")
    p.add_argument("--threads", type=_at_least(1), default=None, help="torch threads (default: all cores)")
    p.add_argument("--examples", type=_at_least(0), default=6, help="validation images drawn in detections.png")
    p.add_argument("--score-threshold", type=float, default=0.5, help="detections drawn in detections.png")
    p.set_defaults(func=run)


def run(args) -> int:
    from dcnv2.experiments.demo import run_demo

    return run_demo(args)
