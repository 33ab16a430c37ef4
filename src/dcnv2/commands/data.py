"""``dcnv2 data synth | synth-cls | check``: write the synthetic detection or classification set, or check a COCO-format,
PASCAL VOC or ImageFolder data set before training."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="generate the synthetic data set or check a COCO-format one",
                       description="Data sets in COCO format: DIR/annotations/instances_{split}.json + DIR/{split}/.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    s = actions.add_parser(
        "synth", help="write the synthetic deformed-objects data set (COCO format, boxes + masks)",
        description="Render 12 classes of shapes with a 10x range of scales, rotation, shear, non-rigid warps, "
                    "clutter and occlusion into DIR/{train,val}/ with COCO annotations (RLE masks) in "
                    "DIR/annotations/. Deterministic for a seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-train", type=int, default=1600)
    s.add_argument("--num-val", type=int, default=400)
    s.add_argument("--image-size", type=int, default=128)
    s.add_argument("--min-objects", type=int, default=1)
    s.add_argument("--max-objects", type=int, default=4)
    s.add_argument("--classes", nargs="+", default=None, help="a subset of the 12 classes (default: all)")
    s.add_argument("--min-scale", type=float, default=0.08, help="smallest object extent / image side")
    s.add_argument("--max-scale", type=float, default=0.8, help="largest object extent / image side")
    s.add_argument("--clutter-lines", type=int, nargs=2, default=(2, 6), metavar=("MIN", "MAX"))
    s.add_argument("--occluding-strokes", type=int, nargs=2, default=(0, 2), metavar=("MIN", "MAX"))
    s.add_argument("--demo-difficulty", action="store_true",
                   help="the settings `dcnv2 demo` uses (6 classes, objects 20-70%% of the side, up to 3, lighter "
                        "clutter); overrides the options above")
    s.add_argument("--no-preview", action="store_true", help="skip writing DIR/preview.png")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_synth)

    k = actions.add_parser(
        "synth-cls", help="write the synthetic classification set (ImageFolder layout, one glyph per image)",
        description="Render one deformed glyph per image with the detection set's generator (same classes, "
                    "scales, rotation, shear, warps, clutter), crop it roughly centred and write "
                    "DIR/{train,val}/<class>/*.png for torchvision's ImageFolder (`dcnv2 train-cls`). "
                    "Classes are balanced; deterministic for a seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    k.add_argument("--out", required=True, help="output directory")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--num-train", type=int, default=2400)
    k.add_argument("--num-val", type=int, default=600)
    k.add_argument("--image-size", type=int, default=64, help="side of the written images")
    k.add_argument("--canvas-size", type=int, default=None, help="side of the rendered scene (default 2x image size)")
    k.add_argument("--classes", nargs="+", default=None, help="a subset of the 12 shape classes (default: all)")
    k.add_argument("--overwrite", action="store_true", help="replace existing DIR/train and DIR/val")
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(func=run_synth_cls)

    c = actions.add_parser(
        "check", help="validate a COCO-format or PASCAL VOC set, or an ImageFolder classification set",
        description="COCO format (DIR/annotations/instances_{split}.json): load it with every check the loader "
                    "runs (JSON, ids, boxes, categories, segmentations, image files), print per-class counts and "
                    "the COCO size ranges. ImageFolder (DIR/<split>/<class>/*.png): every split holds images, the "
                    "class folders agree between splits, every file is an image whose header opens in a mode "
                    "with an RGB form, no file is there twice; every problem is listed by path (exit status 1). "
                    "PASCAL VOC (Annotations/*.xml, ImageSets/Main|Segmentation/*.txt, JPEGImages/, "
                    "SegmentationClass/*.png): every XML parses, names known classes and has boxes and a size, every "
                    "listed image and label PNG exists; per-class counts per split; every problem is listed by file "
                    "(exit status 1). --decode also decodes every image (and mask / label PNG).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("data", help="data set directory")
    c.add_argument("--splits", nargs="+", default=None,
                   help="default: every annotations/instances_*.json (COCO) or every split folder (ImageFolder)")
    c.add_argument("--decode", action="store_true", help="also decode every image and mask")
    c.set_defaults(func=run_check)


def run_synth(args) -> int:
    import time

    from dcnv2.data import synthetic

    config = dict(min_objects=args.min_objects, max_objects=args.max_objects, classes=args.classes,
                  min_scale=args.min_scale, max_scale=args.max_scale, clutter_lines=tuple(args.clutter_lines),
                  occluding_strokes=tuple(args.occluding_strokes))
    if args.demo_difficulty:
        from dcnv2.experiments.demo import DEMO_DATA

        config.update(DEMO_DATA)
    t0 = time.perf_counter()
    try:
        written = synthetic.generate(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                                     image_size=args.image_size, progress=not args.no_progress, **config)
    except ValueError as exc:
        raise SystemExit(f"dcnv2 data synth: {exc}")
    classes = config["classes"] or synthetic.CLASSES
    print(f"wrote {args.num_train} train + {args.num_val} val images ({args.image_size} px, "
          f"{len(classes)} classes) to {args.out} in {time.perf_counter() - t0:.1f} s")
    for split, path in written.items():
        print(f"  {split}: {path}")
    if not args.no_preview and args.num_train > 0:
        preview = write_preview(Path(args.out), "train", Path(args.out) / "preview.png")
        print(f"  preview: {preview}")
    return 0


def run_synth_cls(args) -> int:
    import time

    from dcnv2.data import synthetic_cls

    t0 = time.perf_counter()
    written = synthetic_cls.generate(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                                     image_size=args.image_size, canvas_size=args.canvas_size, classes=args.classes,
                                     overwrite=args.overwrite, progress=not args.no_progress)
    classes = sorted(p.name for p in written["train"].iterdir() if p.is_dir())
    print(f"wrote {args.num_train} train + {args.num_val} val images ({args.image_size} px, {len(classes)} classes) "
          f"to {args.out} in {time.perf_counter() - t0:.1f} s")
    for split, path in written.items():
        print(f"  {split}: {path}/<class>/*.png")
    return 0


def write_preview(data_dir: Path, split: str, out: Path, count: int = 12) -> Path:
    """A grid of the first images of a split with their masks and boxes drawn."""
    import torch

    from dcnv2.data import load_split
    from dcnv2.engine.plots import draw_detections, pyplot, save_figure

    plt = pyplot()

    dataset = load_split(data_dir, split)
    count = min(count, len(dataset))
    cols = min(count, 6)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(count):
        image, target = dataset[i]
        shown = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["labels"])),
                 "masks": target["masks"][:, None].float()}
        draw_detections(axes.flat[i], image, shown, class_name=lambda lab: dataset.class_names[lab - 1],
                        score_threshold=0.0)
    return save_figure(fig, out, dpi=100)


def run_check(args) -> int:
    from dcnv2.data import load_split
    from dcnv2.data.image_folder import check_image_folder, looks_like_image_folder

    from dcnv2.data.voc import check_voc, is_voc_layout

    root = Path(args.data)
    if is_voc_layout(root):
        report = check_voc(root, args.splits, decode=args.decode)
        print(report.format())
        return 0 if report.ok else 1
    if looks_like_image_folder(root):
        report = check_image_folder(root, args.splits, decode=args.decode, progress=True)
        print(report.format())
        return 0 if report.ok else 1
    splits = args.splits or sorted(p.name[len("instances_"):-len(".json")]
                                   for p in (root / "annotations").glob("instances_*.json"))
    if not splits:
        raise FileNotFoundError(f"no annotation files {root}/annotations/instances_<split>.json and no split "
                                f"folders with class folders: a COCO-format detection set has "
                                f"DIR/annotations/instances_<split>.json and DIR/<split>/, a PASCAL VOC set "
                                f"DIR/Annotations/ and DIR/ImageSets/, an ImageFolder classification set "
                                f"DIR/<split>/<class>/*.png")
    for split in splits:
        dataset = load_split(root, split)  # segmentations are checked, not decoded
        print(_summary(dataset, split, root))
        if args.decode:
            _decode_all(dataset, split)
    return 0


def _summary(dataset, split: str, root: Path) -> str:
    coco = dataset.coco
    anns = [a for a in coco.dataset["annotations"] if not a.get("iscrowd", 0)]
    per_image = {}
    for a in anns:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    empty = sum(1 for i in dataset.ids if i not in per_image)
    sizes = {"small": 0, "medium": 0, "large": 0}
    for a in anns:  # COCO's ranges: area < 32², < 96², else large
        area = a.get("area") or a["bbox"][2] * a["bbox"][3]
        sizes["small" if area < 32 ** 2 else "medium" if area < 96 ** 2 else "large"] += 1
    lines = [f"{root} [{split}]: {len(dataset)} images ({empty} without annotations), {len(anns)} objects, "
             f"{dataset.num_classes - 1} classes; small/medium/large objects: "
             f"{sizes['small']}/{sizes['medium']}/{sizes['large']}",
             "", "| label | category id | class | objects |", "|---:|---:|---|---:|"]
    counts = {}
    for a in anns:
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    for label, name in enumerate(dataset.class_names, start=1):
        cat = dataset.label_to_category_id[label]
        lines.append(f"| {label} | {cat} | {name} | {counts.get(cat, 0)} |")
    return "\n".join(lines) + "\n"


def _decode_all(dataset, split: str) -> None:
    from tqdm import tqdm

    for i in tqdm(range(len(dataset)), desc=f"decoding {split}", unit="img", dynamic_ncols=True):
        dataset[i]
    print(f"{split}: every image and mask decodes")
