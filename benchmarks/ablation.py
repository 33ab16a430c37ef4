"""The paper's Table 1 (and Table 3) in miniature: presets trained with one schedule on the synthetic set, COCO AP.

    python benchmarks/ablation.py --minutes 30 [--out outputs/ablation] [--presets regular dconv-c5 ...]
    python benchmarks/ablation.py --iters 376 --seeds 0 1 --presets mdconv-c3c5-mdpool dcnv2 regular regular-mimic
    python benchmarks/ablation.py --recipe pretrained --table 3 --seeds 0 1 2 --threads 1
    python benchmarks/ablation.py --recipe pretrained --presets dcnv2 --mimic cls_weight=0 --seeds 0 1 2 --threads 1

``--recipe pretrained`` runs the demo's recipe (:mod:`dcnv2.experiments.ablation`): its data, each trunk
crop-pre-trained, then the detector on the demo's fixed schedule; every finished (preset, seed) run is kept
under OUT/runs and reused by the next call, so the table grows across sessions. ``--mimic key=value``
changes the mimicking branch (:class:`dcnv2.models.mimic.MimicConfig` fields) of the mimicking presets.

With several ``--seeds`` every preset is trained once per seed (seed = weights, data order and samplers; the data
set stays the same) and the table shows each seed's AP50 and the mean ± half the range over seeds.

Every preset gets the same number of iterations (fitted so that all of them together take about
--minutes on this machine), the same data, seed and recipe as ``dcnv2 demo``. Prints a markdown table
(and writes it to OUT/ablation.md). With a few minutes per model on a CPU the numbers are noisy: read
them as a smoke test of every configuration, not as the paper's deltas.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget for all presets together")
    p.add_argument("--out", default="outputs/ablation")
    p.add_argument("--presets", nargs="+", default=None, help="default: every preset in dcnv2.models.presets")
    p.add_argument("--iters", type=int, default=None, help="iterations per preset (default: fitted to --minutes)")
    p.add_argument("--data", default=None, help="existing synthetic data set (default: generate under OUT/data)")
    p.add_argument("--seed", type=int, default=0, help="data set seed (and training seed without --seeds)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (one run per preset each)")
    p.add_argument("--num-train", type=int, default=1600)
    p.add_argument("--num-val", type=int, default=400)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--recipe", choices=("scratch", "pretrained"), default="scratch",
                   help="scratch: detectors from scratch on the full synthetic set; pretrained: the demo's recipe")
    p.add_argument("--table", choices=("1", "3"), default=None, help="the presets of the paper's Table 1 or 3")
    p.add_argument("--pretrain-iters", type=int, default=None, help="pretrained recipe: crop iterations "
                   "(default: the demo's)")
    p.add_argument("--mimic", nargs="+", default=[], metavar="KEY=VALUE",
                   help="pretrained recipe: mimicking-branch overrides, e.g. cls_weight=0 mimic_weight=0.3")
    p.add_argument("--report", action="store_true", help="pretrained recipe: table of the finished runs only, "
                   "train nothing")
    args = p.parse_args(argv)
    if args.table:
        from dcnv2.experiments.ablation import TABLE1_PRESETS, TABLE3_PRESETS

        if args.presets:
            p.error("give --table or --presets, not both")
        args.presets = list(TABLE1_PRESETS if args.table == "1" else TABLE3_PRESETS)
    if args.recipe == "pretrained":
        return _pretrained(p, args)

    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from dcnv2.experiments.ablation_tables import run_scratch_ablation
    from dcnv2.models.presets import PRESETS

    presets = args.presets or list(PRESETS)
    unknown = [x for x in presets if x not in PRESETS]
    if unknown:
        p.error(f"unknown presets {unknown}; known: {list(PRESETS)}")
    out = Path(args.out)
    table = run_scratch_ablation(presets, out, minutes=args.minutes, iters=args.iters, data=args.data, seed=args.seed,
                                 seeds=args.seeds, num_train=args.num_train, num_val=args.num_val,
                                 image_size=args.image_size, progress=not args.no_progress,
                                 log=lambda s: print(s, file=sys.stderr), t_start=t_start)
    return _write(table, out, t_start)


def _parse_mimic(p, items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--mimic takes KEY=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _pretrained(p, args) -> int:
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from dcnv2.experiments.ablation import run_pretrained_ablation
    from dcnv2.experiments.ablation_tables import pretrained_table
    from dcnv2.models.mimic import MimicConfig

    mimic = _parse_mimic(p, args.mimic)
    try:
        MimicConfig.resolve("fg", mimic)
    except (TypeError, ValueError) as exc:
        p.error(f"--mimic: {exc}")
    out = Path(args.out if args.out != "outputs/ablation" else "outputs/ablation-pretrained")
    presets = args.presets or ["regular", "mdconv-c3c5-mdpool"]
    try:
        results = run_pretrained_ablation(presets, args.seeds or [args.seed], out, iters=args.iters,
                                          pretrain_iters=args.pretrain_iters, num_train=args.num_train,
                                          num_val=args.num_val, image_size=args.image_size, mimic=mimic or None,
                                          progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr),
                                          train_missing=not args.report)
    except ValueError as exc:
        p.error(str(exc))
    table = pretrained_table(results, presets, mimic, num_train=args.num_train, num_val=args.num_val,
                             image_size=args.image_size)
    if table is None:
        print(f"no finished runs under {out}/runs yet", file=sys.stderr)
        return 1
    return _write(table, out, t_start)


def _write(table: str, out: Path, t_start: float) -> int:
    print(table)
    (out / "ablation.md").write_text(table + "\n")
    print(f"\nwritten to {out / 'ablation.md'} ({(time.perf_counter() - t_start) / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
