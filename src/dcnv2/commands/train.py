"""``dcnv2 train``: train a Faster/Mask R-CNN preset on a COCO-format or PASCAL VOC data set (``torchrun`` for
several processes)."""
from __future__ import annotations

import argparse
import json

from dcnv2.commands.train_options import (add_optimizer_options, add_output_options, add_run_options,
                                          train_config_kwargs)


def _kv(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a detector preset on a COCO-format data set",
        description="Train a Faster R-CNN / Mask R-CNN preset (SGD, warm-up, step decay, 0.1x lr on offsets). "
                    "For data-parallel training launch with torchrun, e.g. "
                    "`torchrun --nproc_per_node 8 -m dcnv2.cli train ...` (add --nnodes/--node_rank/"
                    "--rdzv_endpoint for several machines).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, help="model preset (see dcnv2.models.presets.PRESETS; default regular)")
    g.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="fine-tune a whole detector: a model_final.pth of `dcnv2 train` or a checkpoint of "
                        "`dcnv2 convert` (torchvision / mmdetection / detectron2) gives the model (preset, "
                        "backbone, options) and every weight; predictors start fresh when the classes differ")
    g.add_argument("--arch", choices=["faster_rcnn", "mask_rcnn", "segmenter"], default="faster_rcnn",
                   help="segmenter: DeepLabV3 head (--model-arg head=fcn for FCN) on the preset's DCN ResNet, "
                        "trained on the instance masks as semantic labels")
    g.add_argument("--backbone", default="resnet50", help="resnet18/34/50/101, resnext101_32x4d ...")
    g.add_argument("--fpn", action="store_true", help="FPN variant instead of the paper's conv4/conv5 head")
    g.add_argument("--weights-backbone", default=None,
                   help="backbone initialisation: a dcnv2 classification checkpoint (model_final.pth of a "
                        "classifier, offset/mask convs included: see --offsets, --strict), or a torchvision ResNet "
                        "state dict (offset convs start at zero, BatchNorm frozen)")
    g.add_argument("--offsets", choices=["pretrained", "zero"], default=None,
                   help="with a classification checkpoint: keep its offset/mask convs (default) or re-zero them "
                        "(offsets 0, masks 0.5), the paper's Table 7 comparison")
    g.add_argument("--strict", type=_bool, default=None, metavar="true|false",
                   help="with a classification checkpoint: refuse any trunk mismatch listing the keys (default "
                        "true), or load what matches and report what stays at its initial value")
    g.add_argument("--min-size", type=int, default=800, help="test shorter side (and training side unless --train-sizes)")
    g.add_argument("--max-size", type=int, default=1333, help="longer-side cap")
    g.add_argument("--train-sizes", type=int, nargs="+", default=None, help="multi-scale training shorter sides")
    g.add_argument("--model-arg", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra detector argument, e.g. rpn_post_nms_top_n_train=1000 (repeatable)")
    g = p.add_argument_group("R-CNN feature mimicking (training only; default: the preset's, e.g. fg for dcnv2)")
    g.add_argument("--mimic-regions", choices=["fg", "fg+bg", "bg", "none"], default=None,
                   help="which of the box head's sampled RoIs are mimicked (turns the branch on for any preset)")
    g.add_argument("--mimic-rois", type=int, default=None, help="RoIs mimicked per image (paper: 32)")
    g.add_argument("--mimic-patch-size", type=int, default=None, help="side of the resized RoI patch (paper: 224)")
    g.add_argument("--mimic-weight", type=float, default=None, help="weight of the cosine mimic loss (paper: 0.1)")
    g.add_argument("--rcnn-cls-weight", type=float, default=None,
                   help="weight of the R-CNN classifier's cross-entropy (paper: 0.1)")
    g.add_argument("--mimic-level", default=None,
                   help="FPN: pool the whole patch from this feature map (e.g. 2 = P4) instead of the level mapping")
    g.add_argument("--mimic-reduction", choices=["image", "roi"], default=None,
                   help="image: the paper's sum over each image's RoIs (averaged over images); roi: mean over RoIs")
    g.add_argument("--mimic-gradient", choices=["both", "rcnn", "frcnn"], default=None,
                   help="where the cosine loss's gradient flows: both branches (paper), the R-CNN branch only "
                        "(the Fast R-CNN feature a fixed target) or the Fast R-CNN feature only (a fixed teacher)")
    g.add_argument("--mimic-roi-source", choices=["sampled", "proposals"], default=None,
                   help="mimic the head's sampled RoIs (torchvision adds the ground-truth boxes) or the RPN's "
                        "proposals labelled by the head's matcher (the paper's positive proposals)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="data set root: DIR/annotations/instances_SPLIT.json + DIR/SPLIT/ "
                   "(COCO format), or a PASCAL VOC folder (Annotations/, ImageSets/Main/SPLIT.txt, JPEGImages/; "
                   "SegmentationClass/ for --arch segmenter)")
    g.add_argument("--split", default="train")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    g.add_argument("--workers", type=int, default=2, help="data loader processes per training process")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=float, default=16)
    g.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=2, help="images per process")
    g.add_argument("--lr", type=float, default=0.02)
    g.add_argument("--lr-steps", type=float, nargs="*", default=[10, 14], help="epochs where lr is multiplied by --gamma")
    g.add_argument("--gamma", type=float, default=0.1)
    g.add_argument("--warmup-iters", type=int, default=500)
    g.add_argument("--warmup-factor", type=float, default=1 / 3)
    add_optimizer_options(g, optimizer_help="SGD is the paper's; AdamW (lr ~1e-3) learns faster in short "
                                            "from-scratch runs")
    g = p.add_argument_group("run")
    add_run_options(g, out_help="run directory (log.jsonl, checkpoints, loss.png)", checkpoint_every=1000)
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP option")
    add_output_options(g, evaluation="the evaluation's AP and an image of its detections")
    g.add_argument("--eval-split", default=None, help="evaluate the final model on this split (rank 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import torch

    from dcnv2.engine import ModelSpec, TrainConfig, build_model, train
    from dcnv2.engine import distributed as D
    from dcnv2.engine.datasets import load_dataset

    init = None
    if args.init:
        from dcnv2.engine.finetune import read_init_checkpoint

        given = [f"--{n.replace('_', '-')}" for n in ("preset", "weights_backbone") if getattr(args, n)]
        if given:
            raise ValueError(f"--init takes the model from its checkpoint; drop {' and '.join(given)}")
        init = read_init_checkpoint(args.init)
        args.arch, args.preset, args.backbone, args.fpn = init[0].arch, init[0].preset, init[0].backbone, init[0].fpn
    args.preset = args.preset or "regular"
    if args.arch == "segmenter":
        from dcnv2.engine.datasets import load_segmentation_dataset

        dataset = load_segmentation_dataset(args.data, args.split, train=True, flip=not args.no_flip)
    else:
        dataset = load_dataset(args.data, args.split, train=True, with_masks=args.arch == "mask_rcnn",
                               flip=not args.no_flip)
    spec = ModelSpec(arch=args.arch, preset=args.preset, backbone=args.backbone, fpn=args.fpn,
                     num_classes=dataset.num_classes, class_names=list(dataset.class_names),
                     label_to_category_id=dict(dataset.label_to_category_id), min_size=args.min_size,
                     max_size=args.max_size, kwargs=dict(args.model_arg))
    if init is not None:
        from dcnv2.engine.finetune import finetune_spec

        spec = finetune_spec(init[0], num_classes=spec.num_classes, class_names=spec.class_names,
                             label_to_category_id=spec.label_to_category_id, min_size=args.min_size,
                             max_size=args.max_size, model_args=dict(args.model_arg))
    transfer = _transfer_options(args)
    if args.weights_backbone and transfer is None:
        spec.kwargs["weights_backbone"] = args.weights_backbone
    mimic = mimic_options(args)
    if mimic:
        spec.kwargs["mimic"] = {**spec.kwargs.get("mimic", {}), **mimic}
    config = TrainConfig(**train_config_kwargs(args), lr=args.lr, warmup_iters=args.warmup_iters,
                         find_unused_parameters=args.find_unused_parameters)
    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(spec)
    if init is not None and not args.resume:  # a resumed run takes every weight from its own checkpoint
        from dcnv2.engine.finetune import load_init_weights

        notes = load_init_weights(model, init[1], init[0], spec)
        if D.is_main_process():
            print("; ".join(notes))
    if transfer is not None and not args.resume:  # a resumed run takes every weight from its checkpoint
        from dcnv2.models.transfer import load_backbone_checkpoint

        report = load_backbone_checkpoint(model, args.weights_backbone, **transfer)
        spec.backbone_init = report.to_dict()  # recorded in config.json and every checkpoint
        if D.is_main_process():
            print(report.summary())
    elif transfer is not None:  # resumed: keep the first run's record of the initialisation
        previous = Path(args.out) / "config.json"
        if previous.is_file():
            spec.backbone_init = (json.loads(previous.read_text()).get("model") or {}).get("backbone_init") or {}
    if args.train_sizes:
        model.transform.min_size = tuple(args.train_sizes)  # torchvision picks one per batch while training
    try:
        result = train(model, dataset, config, model_spec=spec, resume=args.resume, collate_fn=_collate())
        if D.is_main_process():
            print(f"trained {result['iteration']} iterations, last loss {result['loss']:.4f}; "
                  f"model: {result['final_model']}, log: {result['log']}")
            if args.eval_split:
                _evaluate(args, model, spec, result["iteration"])
    finally:
        D.cleanup_distributed()
    return 0


def _evaluate(args, model, spec, iteration: int) -> None:
    """``--eval-split``: scores the final model, prints the table and adds the metrics (and for detectors an
    image of the first validation image's detections) to the TensorBoard events at the trained iteration."""
    from pathlib import Path

    from dcnv2.engine import evaluate, format_ap_table
    from dcnv2.engine.datasets import load_dataset
    from dcnv2.engine.tensorboard import log_evaluation

    out_dir = Path(args.out) / f"eval_{args.eval_split}"
    prefix = f"eval_{args.eval_split}"
    model.transform.min_size = (args.min_size,)
    if spec.arch == "segmenter":
        from dcnv2.engine.segmentation import print_segmentation_eval

        metrics = print_segmentation_eval(model, spec, args.data, args.eval_split, progress=not args.no_progress,
                                          out_dir=out_dir)
        log_evaluation(args.out, iteration, {k: metrics[k] for k in ("mIoU", "pixel_accuracy", "mean_accuracy")},
                       prefix=prefix, enabled=args.tensorboard)
        return
    val = load_dataset(args.data, args.eval_split, train=False, with_masks=spec.has_masks)
    out = evaluate(model, val, label_to_category_id=spec.label_to_category_id, progress=not args.no_progress,
                   out_dir=out_dir, keep_predictions=1)
    print(format_ap_table({args.preset: out["metrics"]}))
    metrics = dict(out["metrics"])
    if out.get("voc"):
        from dcnv2.engine.voc_eval import format_voc_table

        print(format_voc_table({args.preset: out["voc"]}))
        metrics["voc"] = {k: out["voc"][k] for k in ("mAP07", "mAP")}
    image = None
    if out["predictions"] and args.tensorboard:
        from dcnv2.engine.plots import save_detections

        first, pred = out["predictions"][0]
        image = out_dir / "detections.png"
        save_detections(first, pred, image, class_name=spec.class_name, score_threshold=0.3)
    log_evaluation(args.out, iteration, metrics, prefix=prefix, image=image, enabled=args.tensorboard)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _transfer_options(args):
    """``{"offsets", "strict"}`` when --weights-backbone is a dcnv2 checkpoint (a classifier's), else None;
    --offsets / --strict only apply to such a checkpoint."""
    from dcnv2.models.transfer import is_dcnv2_checkpoint

    given = [f"--{n}" for n in ("offsets", "strict") if getattr(args, n) is not None]
    if not args.weights_backbone:
        if given:
            raise ValueError(f"{' and '.join(given)} need --weights-backbone CLS_CKPT")
        return None
    if not is_dcnv2_checkpoint(args.weights_backbone):
        if given:
            raise ValueError(f"{' and '.join(given)} apply to a dcnv2 classification checkpoint; "
                             f"{args.weights_backbone} is not one (a torchvision state dict or weights name "
                             "loads with zero offsets)")
        return None
    return {"offsets": args.offsets or "pretrained", "strict": True if args.strict is None else args.strict}


def mimic_options(args) -> dict:
    """The feature-mimicking settings given on the command line (the rest stay the preset's)."""
    given = {"regions": args.mimic_regions, "rois_per_image": args.mimic_rois, "patch_size": args.mimic_patch_size,
             "mimic_weight": args.mimic_weight, "cls_weight": args.rcnn_cls_weight, "level": args.mimic_level,
             "reduction": args.mimic_reduction, "gradient": args.mimic_gradient,
             "roi_source": args.mimic_roi_source}
    return {k: v for k, v in given.items() if v is not None}


def _collate():
    try:
        from dcnv2.data import collate_fn
    except ImportError:
        return None
    return collate_fn
