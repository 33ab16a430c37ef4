"""``dcnv2 predict``: draw a checkpoint's detections (boxes, masks, labels, scores) on images."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="draw a checkpoint's detections on images (PNG)",
        description="Rebuild the detector from its checkpoint and write one PNG per input image with boxes, "
                    "masks, class names and scores drawn.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG)")
    p.add_argument("--checkpoint", required=True, help="checkpoint_last.pth or model_final.pth of `dcnv2 train`")
    p.add_argument("--out", default="outputs/predict", help="output directory")
    p.add_argument("--score-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    p.add_argument("--json", action="store_true", help="also write detections.json")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    import torch

    from dcnv2.engine import load_model, predict_images

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, spec = load_model(args.checkpoint, device=device)
    import sys

    report = predict_images(model, spec, args.images, args.out, score_threshold=args.score_threshold, device=device)
    failed = [item for item in report if "error" in item]
    for item in report:
        if "error" in item:
            print(f"dcnv2 predict: {item['error']}", file=sys.stderr)
            continue
        dets = ", ".join(f"{d['class']} {d['score']:.2f}" for d in item["detections"][:8])
        more = f" (+{len(item['detections']) - 8})" if len(item["detections"]) > 8 else ""
        print(f"{item['image']} -> {item['output']}: {len(item['detections'])} detections{': ' if dets else ''}{dets}{more}")
    if args.json:
        (Path(args.out) / "detections.json").write_text(json.dumps(report, indent=1))
    if failed:
        print(f"dcnv2 predict: {len(failed)} of {len(report)} images failed (listed above); the others were "
              f"written to {args.out}", file=sys.stderr)
        return 1
    return 0
