"""``dcnv2 convert``: a torchvision / mmdetection / detectron2 detector checkpoint into a dcnv2 checkpoint."""
from __future__ import annotations

import argparse

from dcnv2.commands.train import _bool  # true/false option values, as train --strict reads them


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="import a torchvision / mmdetection / detectron2 detector checkpoint",
        description="Read a peer's Faster/Mask R-CNN ResNet-FPN checkpoint, work out the detector it describes "
                    "(depth, deformable stages, DCNv1/DCNv2, RoI pooling, masks, classes) and write a dcnv2 "
                    "checkpoint that `dcnv2 eval`, `predict`, `analyze`, `export` and `train --init` take. Every "
                    "weight of the checkpoint is used and every weight of ours filled, or the keys that are not "
                    "are named. --to-preset converts into a more deformable preset on the way, keeping the "
                    "detector's function (fine-tune it into DCNv2 from its accuracy).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="the peer's checkpoint (.pth; detectron2's .pkl too)")
    p.add_argument("--from", dest="source", required=True, choices=("torchvision", "mmdet", "detectron2"),
                   help="which library wrote it")
    p.add_argument("--out", required=True, help="the dcnv2 checkpoint to write (.pth)")
    p.add_argument("--preset", default=None,
                   help="the preset the checkpoint should be (refused, naming the difference, if it is not)")
    p.add_argument("--to-preset", default=None, help="convert into this more deformable preset, e.g. mdconv-c3c5-mdpool")
    p.add_argument("--no-preserve", action="store_true",
                   help="with --to-preset: the paper's init (new masks 0.5 halve the converted convs) instead of "
                        "doubling their weights so that the detector computes what it did")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes including the background; another count than the checkpoint's gives fresh "
                        "predictors for fine-tuning on another data set")
    p.add_argument("--min-size", type=int, default=None, help="test shorter side (default 800)")
    p.add_argument("--max-size", type=int, default=None, help="test longer-side cap (default 1333)")
    p.add_argument("--stride-in-1x1", type=_bool, default=None, metavar="true|false",
                   help="detectron2's MODEL.RESNETS.STRIDE_IN_1X1 (default true, the MSRA zoo models)")
    p.add_argument("--roi-sampling-ratio", type=int, default=None,
                   help="RoI pooling samples per bin and axis instead of the checkpoint's (mmdetection's and "
                        "detectron2's 0 = adaptive); a fixed count lets (m)dpool models export to ONNX, at a "
                        "small change of what they compute")
    p.set_defaults(func=run)


def run(args) -> int:
    from dcnv2.zoo import convert_checkpoint

    conversion = convert_checkpoint(args.checkpoint, args.source, num_classes=args.num_classes,
                                    min_size=args.min_size, max_size=args.max_size, to_preset=args.to_preset,
                                    preserve=not args.no_preserve, stride_in_1x1=args.stride_in_1x1)
    if args.roi_sampling_ratio is not None:
        conversion.spec.kwargs["roi_sampling_ratio"] = args.roi_sampling_ratio
        conversion.build()  # the options still make a model
        conversion.notes.append(f"RoI pooling: {args.roi_sampling_ratio} samples per bin and axis (--roi-sampling-ratio)")
    if args.preset is not None and args.to_preset is None and args.preset != conversion.spec.preset:
        raise ValueError(f"{args.checkpoint} is a {conversion.spec.preset} detector, not {args.preset}"
                         f"{' (' + conversion.spec.preset_fields.get('description', '') + ')' if conversion.spec.preset_fields else ''}"
                         "; drop --preset, or convert into it with --to-preset")
    path = conversion.save(args.out)
    spec = conversion.spec
    n = sum(v.numel() for v in conversion.state_dict.values() if v.is_floating_point())
    print(f"wrote {path}: {spec.arch} {spec.preset} {spec.backbone} FPN, {spec.num_classes} classes "
          f"(background included), {n / 1e6:.1f} M weights")
    for note in conversion.notes:
        print(f"  - {note}")
    return 0
