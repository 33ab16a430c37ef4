"""``dcnv2 analyze``: the paper's spatial-support analysis of trained detectors.

* ``dcnv2 analyze figure --checkpoint A --checkpoint B --image I [--node x,y | --box x1,y1,x2,y2] --out fig.png``
  draws Fig. 1/2-style figures: effective sampling (or bin) locations, effective receptive fields and
  error-bounded saliency regions of the same nodes in each model, side by side.
* ``dcnv2 analyze focus --checkpoint A --checkpoint B --data DIR --split val --num-images N`` prints the focus
  metrics of image-wise and RoI-wise nodes on the split's objects, per model.
"""
from __future__ import annotations

import argparse
import math

__all__ = ["add_parser", "parse_point", "parse_box"]


def parse_point(text: str):
    """``"x,y"`` -> (x, y) floats."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 2:
        raise argparse.ArgumentTypeError(f"--node must be x,y (two numbers), got {text!r}")
    return tuple(vals)


def parse_box(text: str):
    """``"x1,y1,x2,y2"`` -> a box with x2 > x1 and y2 > y1."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals) or not (vals[2] > vals[0] and vals[3] > vals[1]):
        raise argparse.ArgumentTypeError(f"--box must be x1,y1,x2,y2 (finite) with x2 > x1 and y2 > y1, got {text!r}")
    return tuple(vals)


def check_nodes(nodes, boxes, width: int, height: int):
    """``--node`` points and ``--box`` boxes against an image of ``width`` x ``height`` pixels: a point must lie
    inside it and a box must overlap it. Returns ``(boxes clipped to the image, labels)``; a clipped box's
    label says so. Raises ValueError with the valid ranges."""
    for x, y in nodes or ():
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"--node {x:g},{y:g} is outside the image: x must be in [0, {width}) and y in "
                             f"[0, {height}) ({width}x{height} pixels)")
    clipped, labels = [], []
    for box in boxes or ():
        x1, y1, x2, y2 = box
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
        if not (cx2 > cx1 and cy2 > cy1):
            raise ValueError(f"--box {x1:g},{y1:g},{x2:g},{y2:g} does not overlap the image: it must intersect "
                             f"[0, {width}] x [0, {height}] ({width}x{height} pixels)")
        label = "box (" + ", ".join(f"{v:g}" for v in box) + ")"
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            label = "box (" + ", ".join(f"{v:g}" for v in (cx1, cy1, cx2, cy2)) + ", clipped to the image)"
        clipped.append((cx1, cy1, cx2, cy2))
        labels.append(label)
    return clipped, labels


def _common(p) -> None:
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a `dcnv2 train` checkpoint (model_final.pth / checkpoint_last.pth); repeat for several models")
    p.add_argument("--name", action="append", default=None,
                   help="a display name per --checkpoint, in order; none: the run folder's name")
    p.add_argument("--layer", default=None, help="trunk layer of image-wise nodes; none: layer4, the last of conv5")
    p.add_argument("--channel", type=int, default=None, help="one channel of the node's response; none: the whole vector")
    p.add_argument("--eps", type=float, default=0.1, help="saliency error bound: 1 - cos < eps (paper: 0.1)")
    p.add_argument("--area-step", type=float, default=0.01,
                   help="saliency step 1: area increment of the centred rectangle, a fraction of the image")
    p.add_argument("--n-segments", type=int, default=100, help="SLIC superpixels of saliency step 2")
    p.add_argument("--compactness", type=float, default=10.0, help="SLIC compactness")
    p.add_argument("--fill", default="mean",
                   help="value of masked pixels: 'mean' (0 after normalisation: the mean colour), 'zero' (black), "
                        "or a number (after normalisation)")
    p.add_argument("--greedy", choices=("exact", "lazy"), default="lazy",
                   help="saliency step 2: 'exact' tries every superpixel left in the region each round (the "
                        "paper's search, several times slower); 'lazy' re-tries only the --batch-size superpixels "
                        "that were cheapest to remove last round")
    p.add_argument("--batch-size", type=int, default=8, help="masked images per forward pass")
    p.add_argument("--no-refine", action="store_true",
                   help="saliency step 1 only: the centred rectangle, without removing superpixels (fast)")
    p.add_argument("--no-saliency", action="store_true", help="skip the saliency regions (the slow part)")
    p.add_argument("--threads", type=int, default=None, help="torch threads; none: torch's default")
    p.add_argument("--device", default="cpu")


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="spatial-support analysis: ERFs, sampling locations, saliency, focus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    asub = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    asub.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter

    f = asub.add_parser("figure", help="Fig. 1/2-style figure of a few nodes in one image, models side by side",
                        formatter_class=fmt)
    _common(f)
    f.add_argument("--image", required=True, help="an image file (PNG, JPEG)")
    f.add_argument("--node", action="append", type=parse_point, default=None,
                   help="image-wise node x,y in the image's pixels (repeatable)")
    f.add_argument("--box", action="append", type=parse_box, default=None,
                   help="RoI-wise node x1,y1,x2,y2 in the image's pixels (repeatable)")
    f.add_argument("--roi", action="store_true",
                   help="with nodes picked from the ground truth: RoI-wise nodes (Fig. 2) instead of image-wise")
    f.add_argument("--data", default=None,
                   help="COCO-layout folder holding the image (ground truth for picking nodes); default: guessed "
                        "from the image's path DIR/<split>/<file>")
    f.add_argument("--split", default=None, help="split of --data (default: the image's folder name)")
    f.add_argument("--num-layers", type=int, default=3, help="3x3 layers composed for the sampling locations")
    f.add_argument("--out", default="outputs/analyze/figure.png", help="output PNG")
    f.add_argument("--dpi", type=int, default=100)
    f.set_defaults(func=run_figure)

    q = asub.add_parser("focus", help="focus metrics of image-wise and RoI-wise nodes on a split's objects",
                        formatter_class=fmt)
    _common(q)
    q.add_argument("--data", required=True, help="COCO-layout folder (annotations/instances_<split>.json, <split>/)")
    q.add_argument("--split", default="val")
    q.add_argument("--num-images", type=int, default=50, help="the first N images of the split")
    q.add_argument("--objects-per-image", type=int, default=1, help="objects analysed per image")
    q.add_argument("--kinds", nargs="+", choices=("image", "roi"), default=["image", "roi"], help="node kinds")
    q.add_argument("--out", default=None, help="folder for focus.md and focus.json (default: print only)")
    q.set_defaults(func=run_focus)


def _options(args):
    from dcnv2.analysis.figures import AnalysisOptions

    fill = args.fill
    if fill not in ("mean", "zero"):
        try:
            fill = float(fill)
        except ValueError:
            raise ValueError(f"--fill must be 'mean', 'zero' or a number, got {args.fill!r}") from None
    checks = [("--eps", args.eps, 0 < args.eps <= 1), ("--area-step", args.area_step, 0 < args.area_step <= 1),
              ("--n-segments", args.n_segments, args.n_segments >= 1), ("--batch-size", args.batch_size, args.batch_size >= 1)]
    for name, value, ok in checks:
        if not ok:
            raise ValueError(f"{name}: invalid value {value!r}")
    return AnalysisOptions(layer=args.layer, num_layers=getattr(args, "num_layers", 3), channel=args.channel,
                           eps=args.eps, area_step=args.area_step, n_segments=args.n_segments,
                           compactness=args.compactness, fill=fill, batch_size=args.batch_size,
                           saliency=not args.no_saliency, refine=not args.no_refine, greedy=args.greedy)


def _models(args):
    """[(name, model, spec)] of the --checkpoint arguments."""
    from pathlib import Path

    import torch

    from dcnv2.analysis.nodes import load_analysis_model

    torch.set_num_threads(args.threads or torch.get_num_threads())
    names = args.name or []
    if names and len(names) != len(args.checkpoint):
        raise ValueError(f"give one --name per --checkpoint ({len(args.checkpoint)}), got {len(names)}")
    out = []
    for i, ckpt in enumerate(args.checkpoint):
        model, spec = load_analysis_model(ckpt, device=args.device)
        name = names[i] if names else (Path(ckpt).resolve().parent.name or f"model{i}")
        if any(name == n for n, _, _ in out):
            name = f"{name}#{i}"
        out.append((name, model, spec))
    return out


def _ground_truth(image_path, data, split):
    """(boxes, masks) of the image in its COCO split, or None when no annotation file is found."""
    from pathlib import Path

    from dcnv2 import data as data_mod

    path = Path(image_path).resolve()
    root = Path(data) if data else path.parent.parent
    split = split or path.parent.name
    if not (root / "annotations" / f"instances_{split}.json").is_file():
        if data:
            raise FileNotFoundError(f"{root}/annotations/instances_{split}.json not found")
        return None
    ds = data_mod.load_split(root, split, with_masks=True)
    for idx, image_id in enumerate(ds.ids):
        if Path(ds.coco.imgs[image_id]["file_name"]).name == path.name:
            _, target = ds[idx]
            return target["boxes"], target["masks"]
    if data:
        raise ValueError(f"image {path.name!r} is not in split {split!r} of {root}")
    return None


def writable_dir(path, what: str):
    """Creates ``path`` (a directory) if needed and checks it can be written to, before any work is done."""
    import os
    from pathlib import Path

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{what} {str(path)!r} cannot be created: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OSError(f"{what} {str(path)!r} is not writable")
    return path


def figure(args, log=print):
    """Runs ``analyze figure``; returns (output path, {model: [NodeAnalysis]})."""
    import time
    from pathlib import Path

    writable_dir(Path(args.out).resolve().parent, "--out's folder")
    from tqdm import tqdm

    from dcnv2.analysis.figures import NodeSpec, figure_for_models
    from dcnv2.analysis.nodes import prepare_image
    from dcnv2.engine.predict import read_image

    t0 = time.perf_counter()
    options = _options(args)
    image = read_image(args.image)
    boxes_in, box_labels = check_nodes(args.node, args.box, int(image.shape[2]), int(image.shape[1]))
    for label in box_labels:
        if "clipped" in label:
            log(f"note: {label}")
    models = _models(args)
    first = prepare_image(models[0][1], image)
    sy, sx = first.scale
    specs = [NodeSpec(f"node ({x:g}, {y:g})", "image", xy=(x * sx, y * sy)) for x, y in (args.node or [])]
    specs += [NodeSpec(label, "roi", box=first.box_to_input(b)) for b, label in zip(boxes_in, box_labels)]
    boxes = masks = None
    if not specs:
        gt = _ground_truth(args.image, args.data, args.split)
        if gt is None:
            raise ValueError("give --node x,y or --box x1,y1,x2,y2, or --data DIR so that nodes can be picked from "
                             "the image's ground truth")
        boxes, masks = gt
    with tqdm(desc="analyze", unit="node") as bar:
        def progress(done, total, label):
            bar.total = total
            bar.set_postfix_str(label)
            bar.update(done - bar.n)

        out, results = figure_for_models({name: model for name, model, _ in models}, image, args.out,
                                         specs=specs or None, boxes=boxes, masks=masks, roi=args.roi,
                                         options=options, progress=progress, dpi=args.dpi)
    log(_figure_table(results))
    log(f"\nfigure: {out} ({time.perf_counter() - t0:.0f} s)")
    return out, results


def _figure_table(results) -> str:
    lines = ["| model | node | ERF centroid (x, y) | locations | saliency area (%) | error |",
             "|---|---|---|---:|---:|---:|"]
    for name, analyses in results.items():
        for a in analyses:
            cx, cy = a.erf.centroid()
            n = len(a.locations.weights)
            s = a.saliency
            area = f"{100 * s.area_fraction:.1f}" if s else "–"
            err = f"{s.error:.3f}" if s and math.isfinite(s.error) else "–"
            centroid = (f"({cx:.1f}, {cy:.1f})" if math.isfinite(cx) and math.isfinite(cy)
                        else "– (no gradient reaches the image)")
            lines.append(f"| {name} | {a.spec.label} | {centroid} | {n} | {area} | {err} |")
    return "\n".join(lines)


def run_figure(args) -> int:
    figure(args)
    return 0


def focus(args, log=print):
    """Runs ``analyze focus``; returns (summary rows, records)."""
    import json
    import time
    from pathlib import Path

    from tqdm import tqdm

    from dcnv2 import data as data_mod
    from dcnv2.analysis.focus import focus_records, format_focus_table, records_to_dicts, summarize

    t0 = time.perf_counter()
    if args.out:
        writable_dir(args.out, "--out")
    if args.num_images < 1 or args.objects_per_image < 1:
        raise ValueError(f"--num-images and --objects-per-image must be >= 1, got {args.num_images}, "
                         f"{args.objects_per_image}")
    options = _options(args)
    dataset = data_mod.load_split(args.data, args.split, with_masks=True)
    models = _models(args)
    records = []
    for name, model, _ in models:
        records += focus_records(model, name, dataset, num_images=args.num_images,
                                 objects_per_image=args.objects_per_image, kinds=args.kinds, options=options,
                                 progress=lambda it, n=name: tqdm(it, desc=f"focus {n}", unit="img"))
    rows = summarize(records)
    table = format_focus_table(rows)
    elapsed = time.perf_counter() - t0
    log(f"\nfocus of nodes on objects: {min(args.num_images, len(dataset))} images of {args.split}, "
        f"{args.objects_per_image} object(s) each, eps {args.eps:g} ({elapsed:.0f} s)\n")
    log(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "focus.md").write_text(table + "\n")
        (out / "focus.json").write_text(json.dumps({"summary": rows, "records": records_to_dicts(records),
                                                    "seconds": elapsed}, indent=1))
        log(f"\nwritten: {out / 'focus.md'}, {out / 'focus.json'}")
    return rows, records


def run_focus(args) -> int:
    focus(args)
    return 0
