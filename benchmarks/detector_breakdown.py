"""Where a deformable detector's extra CPU time goes: ``regular`` against ``mdconv-c3c5-mdpool``, part by part.

Both detectors run one image each, turn by turn (float32 eager, no grad); forward hooks time the 3x3 convs of
stages c3-c5 (the deformable layers with their offset convs, against the regular 3x3 convs), the RoI pooling
(mdpool with its offset fc branch, against RoIAlign) and the box head, and each part's row is the run with
the smallest total. ``--channels-last`` converts both models to torch.channels_last first. The paper's
architecture adds the offset convs and the offset fc branch whatever the deformable op costs; the table
shows how much of the gap they are.

    python benchmarks/detector_breakdown.py --threads 2 --repeats 4
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference  # noqa: E402  (the detectors and the synthetic image of the latency benchmark)

from dcnv2.nn import ModulatedDeformConv2d, ModulatedDeformRoIPool  # noqa: E402

CONVS = "3x3 convs of c3-c5 (deformable: with their offset convs)"
OFFSET_CONVS = "... of which the offset convs"
POOL = "RoI pooling (mdpool: with its offset fc branch)"
OFFSET_FC = "... of which the offset fc branch"
HEAD = "box head (fc6, fc7)"
TOTAL = "whole detector"
PARTS = (CONVS, OFFSET_CONVS, POOL, OFFSET_FC, HEAD, TOTAL)


def instrument(model: torch.nn.Module) -> dict:
    """Adds timing hooks; returns the dict that each forward adds its parts' seconds to."""
    spent: dict = collections.defaultdict(float)
    started: dict = {}

    def timed(module, part):
        module.register_forward_pre_hook(lambda m, a: started.__setitem__(id(m), time.perf_counter()))
        module.register_forward_hook(
            lambda m, a, o: spent.__setitem__(part, spent[part] + time.perf_counter() - started[id(m)]))

    for name, module in model.named_modules():
        if isinstance(module, ModulatedDeformConv2d):
            timed(module, CONVS)
            timed(module.conv_offset, OFFSET_CONVS)
        elif re.fullmatch(r"backbone\.body\.layer[234]\.\d+\.conv2", name):  # a regular bottleneck's 3x3
            timed(module, CONVS)
        elif name == "roi_heads.box_roi_pool":
            timed(module, POOL)
            if isinstance(module, ModulatedDeformRoIPool):
                timed(module.offset_fc, OFFSET_FC)
        elif name == "roi_heads.box_head":
            timed(module, HEAD)
    return spent


@torch.no_grad()
def breakdown(kind: str, repeats: int, channels_last: bool) -> dict:
    """{preset: {part: seconds}} of the run with the smallest total, per preset."""
    runs = {}
    for preset in inference.PRESETS:
        model, image = inference.build(kind, preset)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        runs[preset] = (model, image, instrument(model))
    best: dict = {}
    for model, image, _ in runs.values():
        model([image])  # warm-up
    for _ in range(repeats):
        for preset, (model, image, spent) in runs.items():
            spent.clear()
            t0 = time.perf_counter()
            model([image])
            spent[TOTAL] = time.perf_counter() - t0
            if preset not in best or spent[TOTAL] < best[preset][TOTAL]:
                best[preset] = {part: spent.get(part, 0.0) for part in PARTS}
    return best


def table(best: dict) -> list:
    regular, deformable = (best[p] for p in inference.PRESETS)
    total = regular[TOTAL]
    lines = [f"| part | {inference.PRESETS[0]} | {inference.PRESETS[1]} | difference | difference / {inference.PRESETS[0]}'s total |",
             "|---|---:|---:|---:|---:|"]
    for part in PARTS:
        r, d = regular[part] * 1e3, deformable[part] * 1e3
        lines.append(f"| {part} | {r:.0f} ms | {d:.0f} ms | {d - r:+.0f} ms | {(d - r) / (total * 1e3):+.1%} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", choices=("paper", "demo"), default="paper",
                   help="paper: R-50 Faster R-CNN at 800x1333; demo: the demo's detectors")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--channels-last", action="store_true", help="both models in torch.channels_last")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.models} detectors, "
          f"{'channels-last' if args.channels_last else 'NCHW'}, float32 eager; best of {args.repeats}")
    print("\n".join(table(breakdown(args.models, args.repeats, args.channels_last))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
