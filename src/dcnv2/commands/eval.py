"""``dcnv2 eval``: COCO AP of a trained checkpoint on a COCO-format split (single- or multi-scale test)."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="COCO AP (bbox, and segm for Mask R-CNN) of a checkpoint, mIoU of a segmenter's",
        description="Rebuild the detector from its checkpoint, run it over a split, score it with pycocotools "
                    "COCOeval, print the AP table and write metrics.json + results.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint_last.pth or model_final.pth of `dcnv2 train`")
    p.add_argument("--data", required=True, help="data set root: DIR/annotations/instances_SPLIT.json + DIR/SPLIT/, "
                   "or a PASCAL VOC folder (VOC07 11-point and area mAP besides COCO AP; mIoU for a segmenter)")
    p.add_argument("--split", default="val")
    p.add_argument("--multi-scale", action="store_true",
                   help="test at every --scales shorter side and merge the detections by per-class NMS")
    p.add_argument("--scales", type=int, nargs="+", default=[400, 600, 800, 1000, 1200, 1400],
                   help="shorter sides of the multi-scale test")
    p.add_argument("--max-size", type=int, default=None,
                   help="longer-side cap per test scale (default: the model's max/min size ratio x scale)")
    p.add_argument("--nms-iou", type=float, default=0.5, help="IoU of the per-class NMS merging scales")
    p.add_argument("--iou-types", nargs="+", choices=["bbox", "segm"], default=None,
                   help="default: bbox, plus segm for mask models")
    p.add_argument("--out", default=None, help="output directory (default: CHECKPOINT_DIR/eval_SPLIT)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import torch

    from dcnv2.engine import evaluate, format_ap_table, load_model
    from dcnv2.engine.datasets import load_dataset

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, spec = load_model(args.checkpoint, device=device)
    if spec.arch == "segmenter":  # mIoU: VOC's SegmentationClass, or COCO instance masks as semantic labels
        from dcnv2.engine.segmentation import print_segmentation_eval

        out_dir = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{args.split}"
        print_segmentation_eval(model, spec, args.data, args.split, device=device, progress=not args.no_progress,
                                out_dir=out_dir)
        return 0
    dataset = load_dataset(args.data, args.split, train=False, with_masks=spec.has_masks)
    _check_categories(spec, dataset)
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{args.split}"
    result = evaluate(model, dataset, label_to_category_id=spec.label_to_category_id, iou_types=args.iou_types,
                      scales=args.scales if args.multi_scale else None, max_size=args.max_size,
                      device=device, progress=not args.no_progress, out_dir=out_dir)
    name = f"{spec.preset} ({'multi-scale ' + '/'.join(map(str, args.scales)) if args.multi_scale else f'{spec.min_size} px'})"
    table = format_ap_table({name: result["metrics"]})
    written = "metrics.json, results.json, ap_table.md"
    if result.get("voc"):
        from dcnv2.engine.voc_eval import format_voc_table

        table += "\n\n" + format_voc_table({name: result["voc"]})
        written += ", voc_metrics.json"
    print(table)
    (out_dir / "ap_table.md").write_text(table + "\n")
    print(f"{len(result['results'])} detections on {len(dataset)} images; written to {out_dir}/{{{written}}}")
    return 0


def _check_categories(spec, dataset) -> None:
    """The model's labels must map onto categories the data set knows."""
    known = set(dataset.coco.getCatIds())
    missing = sorted(set(spec.label_to_category_id.values()) - known)
    if missing:
        raise ValueError(f"the checkpoint predicts category ids {missing} that the data set's annotation file "
                         f"does not define (it has {sorted(known)})")
