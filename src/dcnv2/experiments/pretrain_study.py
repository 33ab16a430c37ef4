"""The paper's Table 6 and Table 7 in miniature: classification pre-training of regular / DCNv1 / DCNv2 ResNets
on the synthetic classification set, then detection and semantic segmentation fine-tuned from them with
pretrained vs zeroed offsets. ``benchmarks/pretrain.py`` is its command line (its docstring describes the
study); :func:`run` takes its parsed options.

Finished runs are reused when the study is run again with the same ``args.out``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

__all__ = ["CLS_TO_DET", "SEG_BATCH", "run"]

CLS_TO_DET = {"regular": "regular", "dcnv1": "dconv-c5", "dcnv2": "mdconv-c3c5-mdpool"}
SEG_BATCH = 8  # images per segmenter training step (the detectors' batch)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def _spread(values: List[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f}"


# ---------------------------------------------------------------------------------------------------------
# speed probes (for the plan printed before anything trains)


def _cls_seconds_per_iter(preset, args, num_classes) -> float:
    import torch

    from dcnv2.models import classifier

    model = classifier(preset, args.backbone, num_classes=num_classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    x = torch.randn(args.cls_batch_size, 3, args.cls_image_size, args.cls_image_size)
    y = torch.randint(0, num_classes, (args.cls_batch_size,))
    times = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(6):  # the fastest of 5 (after a warm-up step): a neighbour's burst must not set the plan
            t0 = time.perf_counter()
            loss = model(x, y)["loss_cls"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return min(times[1:])


# ---------------------------------------------------------------------------------------------------------
# runs


def _train_classifier(preset, seed, args, data_dir, run_dir: Path) -> Dict:
    import torch

    from dcnv2.engine import ModelSpec, TrainConfig, train
    from dcnv2.engine.classification import collate_train, evaluate_classifier, load_image_folder
    from dcnv2.engine.train import ResumableBatchSampler
    from dcnv2.models import classifier

    done = run_dir / "eval_cls_val" / "metrics.json"
    if done.is_file() and (run_dir / "model_final.pth").is_file():
        _log(f"classifier {preset} seed {seed}: reusing {run_dir}")
        return json.loads(done.read_text())
    train_set = load_image_folder(data_dir, "train", train=True, image_size=args.cls_image_size,
                                  min_crop_scale=args.cls_min_crop_scale)
    val_set = load_image_folder(data_dir, "val", train=False, image_size=args.cls_image_size)
    classes = list(train_set.classes)
    ipe = ResumableBatchSampler.batches_per_epoch(len(train_set), args.cls_batch_size, 1)
    spec = ModelSpec(arch="classifier", preset=preset, backbone=args.backbone, num_classes=len(classes),
                     class_names=classes, min_size=args.cls_image_size, max_size=args.cls_image_size,
                     kwargs={"label_smoothing": 0.1})
    config = TrainConfig(out=str(run_dir), epochs=args.cls_epochs, batch_size=args.cls_batch_size, lr=args.cls_lr,
                         optimizer=args.cls_optimizer, weight_decay=args.cls_weight_decay, warmup_iters=ipe, warmup_factor=0.1, lr_schedule="cosine",
                         checkpoint_every=max(50, ipe * 5), log_every=10, seed=seed, num_workers=0,
                         progress=not args.no_progress)
    torch.manual_seed(seed)
    model = classifier(preset, args.backbone, num_classes=len(classes), label_smoothing=0.1)
    t0 = time.perf_counter()
    run = train(model, train_set, config, model_spec=spec, resume=(run_dir / "checkpoint_last.pth").is_file() or None,
                collate_fn=collate_train)
    t1 = time.perf_counter()
    ev = evaluate_classifier(model, val_set, class_names=classes, progress=not args.no_progress,
                             out_dir=run_dir / "eval_cls_val", title=f"{preset} {args.backbone} seed {seed}")
    m = ev["metrics"]
    m["train_s"], m["iterations"] = t1 - t0, int(run["iteration"])
    done.write_text(json.dumps(m, indent=2))
    _log(f"classifier {preset} seed {seed}: top-1 {100 * m['top1']:.1f}, top-5 {100 * m['top5']:.1f} "
         f"({m['iterations']} iterations in {_fmt_s(t1 - t0)})")
    return m


def _train_detector(det_preset, init, offsets, seed, args, train_set, val_set, run_dir: Path) -> Dict:
    """``init``: a classifier checkpoint, or None (from scratch)."""
    import torch

    from dcnv2 import data
    from dcnv2.engine import build_model, evaluate, train
    from dcnv2.experiments.recipes import SyntheticRecipe
    from dcnv2.engine.train import ResumableBatchSampler
    from dcnv2.models.transfer import load_backbone_checkpoint

    done = run_dir / "result.json"
    if done.is_file():
        _log(f"detector {run_dir.name}: reusing {run_dir}")
        return json.loads(done.read_text())
    recipe = SyntheticRecipe(image_size=args.det_image_size, backbone=args.backbone)
    spec = recipe.model_spec(det_preset, train_set)
    torch.manual_seed(seed)
    model = build_model(spec)
    if init is not None:
        report = load_backbone_checkpoint(model, init, offsets=offsets, strict=True)
        spec.backbone_init = report.to_dict()
    ipe = ResumableBatchSampler.batches_per_epoch(len(train_set), recipe.batch_size, 1)
    config = recipe.train_config(str(run_dir), args.det_iters, ipe, seed=seed, progress=not args.no_progress)
    t0 = time.perf_counter()
    train(model, train_set, config, model_spec=spec, collate_fn=data.collate_fn)
    t1 = time.perf_counter()
    ev = evaluate(model, val_set, label_to_category_id=spec.label_to_category_id, progress=not args.no_progress,
                  out_dir=run_dir / "eval_val")
    bbox = {k: float(v) for k, v in ev["metrics"]["bbox"].items()}
    result = {"bbox": bbox, "train_s": t1 - t0, "iterations": args.det_iters}
    done.write_text(json.dumps(result, indent=2))
    _log(f"detector {run_dir.name}: AP {100 * bbox['AP']:.1f}, AP50 {100 * bbox['AP50']:.1f} "
         f"(trained in {_fmt_s(t1 - t0)})")
    return result


def _det_runs(args):
    """(name, detector preset, classifier preset or None, offsets) of every detector run per seed."""
    runs = []
    for preset in (args.det_presets or args.presets):
        det = CLS_TO_DET[preset]
        if args.det_scratch:
            runs.append((f"{det}-scratch", det, None, "zero"))
        for offsets in _offset_variants(preset):
            runs.append((f"{det}-from-{preset}-{offsets}", det, preset, offsets))
    return runs


def _offset_variants(preset: str):
    """Offsets of the fine-tuning runs from a classifier: a regular one has none to zero."""
    return ("pretrained",) if preset == "regular" else ("pretrained", "zero")


def _seg_runs(args):
    """(name, classifier preset = segmenter preset, offsets) of every segmenter run per seed."""
    return [(f"deeplabv3-{preset}-{offsets}", preset, offsets)
            for preset in (args.det_presets or args.presets) for offsets in _offset_variants(preset)]


def _seg_spec(preset: str, dataset, args):
    """ModelSpec of a segmenter with the classifier preset's deformable layers, at the detection set's size.

    ``dataset``: a :class:`dcnv2.data.semantic.SemanticSegmentation` (classes with the background)."""
    from dcnv2.engine import ModelSpec

    return ModelSpec(arch="segmenter", preset=preset, backbone=args.backbone, num_classes=dataset.num_classes,
                     class_names=list(dataset.class_names), label_to_category_id=dict(dataset.label_to_category_id),
                     min_size=args.det_image_size, max_size=args.det_image_size,
                     kwargs={"head": "deeplabv3", "output_stride": args.seg_output_stride,
                             "atrous_rates": list(args.seg_atrous_rates)})


def _seg_config(run_dir: Path, seed: int, args):
    """AdamW ``--seg-lr``, 10 % linear warm-up from 0.1x, cosine to 0, batch 8, offsets at 0.1x lr, gradient
    norm clipped at 10 (the detector recipe's), ``--seg-iters`` iterations."""
    from dcnv2.engine import TrainConfig

    iters = args.seg_iters
    return TrainConfig(out=str(run_dir), max_iters=iters, epochs=0, batch_size=SEG_BATCH, lr=args.seg_lr,
                       optimizer="adamw", weight_decay=1e-4, warmup_iters=max(1, iters // 10), warmup_factor=0.1,
                       lr_schedule="cosine", clip_grad_norm=10.0, checkpoint_every=max(50, iters // 4), log_every=5,
                       seed=seed, num_workers=0, progress=not args.no_progress)


def _seg_data(det_dir: Path):
    """The detection set's train (random flip) and val splits, instance masks as semantic labels."""
    from dcnv2.data.semantic import load_semantic_split

    train_set = load_semantic_split(det_dir, "train", train=True)
    val_set = load_semantic_split(det_dir, "val", train=False)
    if len(train_set) % SEG_BATCH == 1:
        raise SystemExit(f"the segmentation training set has {len(train_set)} images: each epoch would end in a "
                         f"batch of one image, on which the ASPP head's BatchNorm (over a 1x1 pooled map) cannot "
                         f"train; pick a --det-num-train that is not 1 more than a multiple of {SEG_BATCH}")
    return train_set, val_set


def _seg_plan(args, train_set, val_set) -> float:
    """Times a few training steps and evaluated images of each segmenter preset, logs each segmenter run's cost
    per seed and returns the cost of them all over all seeds (seconds)."""
    from dcnv2.engine import build_model
    from dcnv2.experiments.recipes import seconds_per_image_eval, seconds_per_iteration

    speed = {}
    for _, preset, _ in _seg_runs(args):
        if preset not in speed:
            model = build_model(_seg_spec(preset, train_set, args))
            speed[preset] = (seconds_per_iteration(model, train_set, SEG_BATCH),
                             seconds_per_image_eval(model, val_set))
    total = 0.0
    for name, preset, _ in _seg_runs(args):
        s, e = speed[preset]
        cost = s * args.seg_iters + e * len(val_set) * 1.15 + 5
        total += len(args.seeds) * cost
        _log(f"  segmenter {name:>39}: {args.seg_iters} iterations x {s:.2f} s + eval = {_fmt_s(cost)} per seed")
    return total


def _train_segmenter(preset, init, offsets, seed, args, train_set, val_set, run_dir: Path) -> Dict:
    """Fine-tunes a segmenter from the classifier checkpoint ``init`` and scores it (mIoU) on ``val_set``."""
    import torch

    from dcnv2 import data
    from dcnv2.engine import build_model, train
    from dcnv2.engine.segmentation import evaluate_segmentation
    from dcnv2.models.transfer import load_backbone_checkpoint

    done = run_dir / "result.json"
    if done.is_file():
        _log(f"segmenter {run_dir.name}: reusing {run_dir}")
        return json.loads(done.read_text())
    spec = _seg_spec(preset, train_set, args)
    torch.manual_seed(seed)
    model = build_model(spec)
    report = load_backbone_checkpoint(model, init, offsets=offsets, strict=True)
    spec.backbone_init = report.to_dict()
    config = _seg_config(run_dir, seed, args)
    t0 = time.perf_counter()
    train(model, train_set, config, model_spec=spec, collate_fn=data.collate_fn)
    t1 = time.perf_counter()
    ev = evaluate_segmentation(model, val_set, progress=not args.no_progress, out_dir=run_dir / "eval_val")
    m = ev["metrics"]
    result = {"mIoU": m["mIoU"], "pixel_accuracy": m["pixel_accuracy"], "mean_accuracy": m["mean_accuracy"],
              "iou": m["iou"], "train_s": t1 - t0, "iterations": args.seg_iters}
    done.write_text(json.dumps(result, indent=2))
    _log(f"segmenter {run_dir.name}: mIoU {100 * m['mIoU']:.1f}, pixel accuracy {100 * m['pixel_accuracy']:.1f} "
         f"(trained in {_fmt_s(t1 - t0)})")
    return result


# ---------------------------------------------------------------------------------------------------------
# tables


def _seed_cells(values: List[float]) -> List[str]:
    """Each seed's value, then the mean ± half range."""
    return [f"{v:.1f}" for v in values] + [_spread(values)]


def _table7(args, det_results, seg_results, det_train, det_val, seg_train, seg_val) -> List[str]:
    """Table 7 in miniature (markdown lines): one row per classifier init and offsets, detection AP / AP50 and
    segmentation mIoU side by side; a task that did not run has no columns (detectors from scratch: no mIoU)."""
    seeds = args.seeds
    parts, head, align = [], "| init | offsets |", "|---|---|"
    if det_results:
        parts.append(f"{args.backbone}-FPN Faster R-CNN on the synthetic detection set ({len(det_train)} train / "
                     f"{len(det_val)} val images, {args.det_image_size} px), {args.det_iters} iterations x batch 8 "
                     f"(the demo's recipe), COCO bbox AP (%)")
        head += (" detector | " + " | ".join(f"AP s{s}" for s in seeds)
                 + " | AP mean ± half range | AP50 mean ± half range |")
        align += "---|" + "---:|" * (len(seeds) + 2)
    if seg_results:
        parts.append(f"{args.backbone} DeepLabV3 (output stride {args.seg_output_stride}, ASPP rates "
                     f"{tuple(args.seg_atrous_rates)}) on the same set's instance masks as semantic labels "
                     f"({len(seg_train)} train / {len(seg_val)} val images, {seg_train.num_classes} classes with the "
                     f"background), {args.seg_iters} iterations x batch {SEG_BATCH}, AdamW lr {args.seg_lr:g} "
                     f"(warm-up 10 %, cosine), val mIoU (%)")
        head += " " + " | ".join(f"mIoU s{s}" for s in seeds) + " | mIoU mean ± half range |"
        align += "---:|" * (len(seeds) + 1)
    lines = ["Table 7 in miniature: each classifier (its seed's) initialises the same deformable layers with its "
             "offset/mask convs pretrained or zeroed (offsets 0, masks 0.5); " + "; ".join(parts) + ".", "", head, align]
    seg_names = {(preset, offsets): name for name, preset, offsets in _seg_runs(args)}
    for name, det, preset, offsets in _det_runs(args):
        if preset is None and not det_results:  # a detector from scratch has no segmenter beside it
            continue
        cells = [preset or "scratch", offsets if preset not in (None, "regular") else "-"]
        if det_results:
            per_seed = det_results[name]
            ap50 = [100 * per_seed[s]["bbox"]["AP50"] for s in seeds]
            cells += [det] + _seed_cells([100 * per_seed[s]["bbox"]["AP"] for s in seeds]) + [_spread(ap50)]
        if seg_results:
            per_seed = seg_results.get(seg_names.get((preset, offsets)))
            cells += _seed_cells([100 * per_seed[s]["mIoU"] for s in seeds]) if per_seed else ["-"] * (len(seeds) + 1)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------------------------


def run(args) -> int:
    """Runs the study that ``args`` (``benchmarks/pretrain.py``'s options) describe: the plan and its cost, then
    every classifier, detector and segmenter not finished under ``args.out``, and writes the tables."""
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from dcnv2.data import synthetic_cls
    from dcnv2.engine.classification import load_image_folder
    from dcnv2.engine.train import ResumableBatchSampler

    if args.det_presets and not set(args.det_presets) <= set(args.presets):
        raise SystemExit(f"--det-presets {args.det_presets} must be among --presets {args.presets}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    cls_data = out / "cls_data"
    difficulty = {}
    if args.demo_difficulty:
        from dcnv2.experiments.demo import DEMO_DATA

        difficulty = {k: (list(v) if isinstance(v, tuple) else v) for k, v in DEMO_DATA.items()}
    params = {"seed": args.data_seed, "num_train": args.cls_num_train, "num_val": args.cls_num_val,
              "image_size": args.cls_image_size, **{k: v for k, v in difficulty.items() if k != "max_objects"}}
    stamp = cls_data / "params.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params):
        synthetic_cls.generate(cls_data, overwrite=True, progress=not args.no_progress, **params)
        stamp.write_text(json.dumps(params))
    num_classes = len(load_image_folder(cls_data, "train", train=False, image_size=args.cls_image_size).classes)

    det_train = det_val = seg_train = seg_val = None
    if {"det", "seg"} & set(args.tasks):
        from dcnv2.engine.datasets import load_dataset
        from dcnv2.experiments.demo import ensure_synthetic_data

        det_dir = Path(args.det_data) if args.det_data else ensure_synthetic_data(
            out / "det_data", seed=args.data_seed, num_train=args.det_num_train, num_val=args.det_num_val,
            image_size=args.det_image_size, log=_log, **difficulty)
        if "det" in args.tasks:
            det_train = load_dataset(det_dir, "train", train=True, with_masks=False)
            det_val = load_dataset(det_dir, "val", train=False, with_masks=False)
        if "seg" in args.tasks:
            seg_train, seg_val = _seg_data(det_dir)

    # the plan and its cost, from a few timed steps of every model on this machine
    cls_ipe = ResumableBatchSampler.batches_per_epoch(args.cls_num_train, args.cls_batch_size, 1)
    cls_iters = max(1, int(args.cls_epochs * cls_ipe + 0.999))
    est = 0.0
    _log(f"plan ({torch.get_num_threads()} threads), seeds {args.seeds}:")
    for preset in args.presets:
        s = _cls_seconds_per_iter(preset, args, num_classes)
        est += len(args.seeds) * s * cls_iters
        _log(f"  classifier {preset:>8}: {cls_iters} iterations x {s:.2f} s = {_fmt_s(s * cls_iters)} per seed")
    if "det" in args.tasks:
        from dcnv2.engine import build_model
        from dcnv2.experiments.recipes import SyntheticRecipe, seconds_per_image_eval, seconds_per_iteration

        recipe = SyntheticRecipe(image_size=args.det_image_size, backbone=args.backbone)
        speed = {}
        for _, det, _, _ in _det_runs(args):
            if det not in speed:
                model = build_model(recipe.model_spec(det, det_train))
                speed[det] = (seconds_per_iteration(model, det_train, recipe.batch_size),
                              seconds_per_image_eval(model, det_val))
        for name, det, _, _ in _det_runs(args):
            s, e = speed[det]
            cost = s * args.det_iters + e * len(det_val) * 1.15 + 5
            est += len(args.seeds) * cost
            _log(f"  detector {name:>40}: {args.det_iters} iterations x {s:.2f} s + eval = {_fmt_s(cost)} per seed")
    if "seg" in args.tasks:
        est += _seg_plan(args, seg_train, seg_val)
    _log(f"  expected total: ~{_fmt_s(est)} (a shared machine runs slower; finished runs are reused on a rerun)")
    if args.dry_run:
        return 0

    cls_results: Dict[str, Dict[int, Dict]] = {p: {} for p in args.presets}
    det_results: Dict[str, Dict[int, Dict]] = {}
    seg_results: Dict[str, Dict[int, Dict]] = {}
    for seed in args.seeds:
        for preset in args.presets:
            cls_results[preset][seed] = _train_classifier(preset, seed, args, cls_data,
                                                          out / "cls" / f"seed{seed}" / preset)
        if "det" in args.tasks:
            for name, det, preset, offsets in _det_runs(args):
                init = None if preset is None else out / "cls" / f"seed{seed}" / preset / "model_final.pth"
                det_results.setdefault(name, {})[seed] = _train_detector(
                    det, init, offsets, seed, args, det_train, det_val, out / "det" / f"seed{seed}" / name)
        if "seg" in args.tasks:
            for name, preset, offsets in _seg_runs(args):
                init = out / "cls" / f"seed{seed}" / preset / "model_final.pth"
                seg_results.setdefault(name, {})[seed] = _train_segmenter(
                    preset, init, offsets, seed, args, seg_train, seg_val, out / "seg" / f"seed{seed}" / name)

    seeds = args.seeds
    lines = [f"Table 6 in miniature: {args.backbone} classifiers from scratch on the synthetic classification set "
             f"({args.cls_num_train} train / {args.cls_num_val} val images, {num_classes} classes, "
             f"{args.cls_image_size} px), {cls_iters} iterations x batch {args.cls_batch_size}, {args.cls_optimizer} lr "
             f"{args.cls_lr:g} (warm-up 1 epoch, cosine, label smoothing 0.1), "
             f"{torch.get_num_threads()} CPU threads; top-1 / top-5 accuracy (%), seeds {seeds}.", "",
             "| classifier | " + " | ".join(f"top-1 s{s}" for s in seeds) + " | top-1 mean ± half range | top-5 mean |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for preset, per_seed in cls_results.items():
        top1 = [100 * per_seed[s]["top1"] for s in seeds]
        top5 = [100 * per_seed[s]["top5"] for s in seeds]
        lines.append(f"| {preset} | " + " | ".join(f"{v:.1f}" for v in top1) + f" | {_spread(top1)} | {_spread(top5)} |")
    if det_results or seg_results:
        lines += [""] + _table7(args, det_results, seg_results, det_train, det_val, seg_train, seg_val)
    lines += ["", f"Total wall time {_fmt_s(time.perf_counter() - t_start)} (runs reused from an earlier call "
              "count as 0). The machine is shared with other jobs: times are indicative only."]
    table = "\n".join(lines)
    print(table)
    (out / "pretrain.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "classification": cls_results,
                                                  "detection": det_results, "segmentation": seg_results},
                                                 indent=2, default=str))
    return 0
