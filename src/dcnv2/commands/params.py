"""``dcnv2 params``: parameters and GFLOPs of every preset's detector, as a markdown table (cf. the paper's Table 1).

FLOPs are counted with ``torch.utils.flop_counter`` (formulas for our ops in ``dcnv2.models.flops``) over one
inference forward of a random image of the given size, with a fixed number of proposals and detections per
image (``dcnv2.models.flops.fixed_roi_counts``: an untrained model's own RoI counts depend on its random weights).
"""
from __future__ import annotations

import argparse

DETECTORS = {
    # name -> (builder, fpn)
    "faster-rcnn": ("faster_rcnn", False),
    "faster-rcnn-fpn": ("faster_rcnn", True),
    "mask-rcnn": ("mask_rcnn", False),
    "mask-rcnn-fpn": ("mask_rcnn", True),
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "params", help="parameters and GFLOPs of the presets' detectors (markdown table)",
        description="Print a markdown table of parameters, their difference against the `regular` preset and "
                    "inference GFLOPs (2 x multiply-adds) for each preset and detector.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None, help="default: every preset of dcnv2.models.presets")
    p.add_argument("--detectors", nargs="+", choices=list(DETECTORS), default=["faster-rcnn", "mask-rcnn-fpn"],
                   help="faster-rcnn / mask-rcnn: the paper's dilated-conv5 detectors; *-fpn: ResNet-FPN")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--num-classes", type=int, default=81, help="classes including the background")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=[800, 1333],
                   help="size of the (random) input image for the FLOP count")
    p.add_argument("--proposals", type=int, default=1000, help="RPN proposals per image reaching the box head")
    p.add_argument("--detections", type=int, default=100, help="detections per image reaching the mask head")
    p.add_argument("--no-flops", action="store_true", help="parameters only (fast)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=run)


def _fmt_delta(delta: int) -> str:
    return "—" if delta == 0 else f"{delta / 1e6:+.2f}"


def build_rows(args):
    """Yields one dict per (detector, preset): preset, detector, params, delta, gflops (or None)."""
    import torch

    from dcnv2 import models
    from dcnv2.models.flops import count_flops, count_parameters

    presets = args.presets or list(models.PRESETS)
    unknown = [p for p in presets if p not in models.PRESETS]
    if unknown:
        raise ValueError(f"unknown presets {unknown}; known: {list(models.PRESETS)}")
    h, w = args.image_size
    if h <= 0 or w <= 0:
        raise ValueError(f"--image-size must be positive, got {h} {w}")
    if args.proposals <= 0 or args.detections <= 0:
        raise ValueError(f"--proposals and --detections must be positive, got {args.proposals}, {args.detections}")
    kw = dict(min_size=min(h, w), max_size=max(h, w))
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=gen)
    for det in args.detectors:
        builder, fpn = DETECTORS[det]

        def build(name):
            torch.manual_seed(0)
            return getattr(models, builder)(preset=name, backbone=args.backbone, num_classes=args.num_classes,
                                            fpn=fpn, **kw)

        # the regular preset is the reference of the delta column
        base = count_parameters(build("regular"))
        for name in presets:
            model = build(name)
            n = count_parameters(model)
            gflops = None if args.no_flops else count_flops(model, [image], proposals=args.proposals, detections=args.detections)[0] / 1e9
            yield dict(preset=name, detector=det, params=n, delta=n - base, gflops=gflops)
            del model


def run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = args.image_size
    print(f"{args.backbone}, {args.num_classes} classes"
          + ("" if args.no_flops else f", GFLOPs at {h}x{w}, {args.proposals} proposals, "
                                      f"{args.detections} detections per image"))
    print()
    print("| preset | detector | params (M) | Δ vs regular (M) | GFLOPs |")
    print("|---|---|---:|---:|---:|")
    for r in build_rows(args):
        g = "—" if r["gflops"] is None else f"{r['gflops']:.{1 if r['gflops'] >= 100 else 2}f}"
        print(f"| {r['preset']} | {r['detector']} | {r['params'] / 1e6:.2f} | {_fmt_delta(r['delta'])} | {g} |",
              flush=True)
    return 0
