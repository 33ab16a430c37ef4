"""``dcnv2 train-cls`` / ``dcnv2 eval-cls``: DCN ResNet classifiers on ImageFolder data (the paper's Table 6).

Training runs the detection engine (:func:`dcnv2.engine.train.train`): SGD with warm-up and cosine or step
decay, the 0.1x lr of offset/mask branches, AMP, JSON-lines log, atomic checkpoints, exact ``--resume`` and
``torchrun`` data parallelism.
"""
from __future__ import annotations

import argparse
import os

from dcnv2.commands.train_options import (add_optimizer_options, add_output_options, add_run_options,
                                          train_config_kwargs)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train-cls", help="train a regular / DCNv1 / DCNv2 ResNet classifier on ImageFolder data",
        description="Train a classifier (preset regular, dcnv1 = deformable conv5, dcnv2 = modulated c3-c5) on "
                    "DATA/TRAIN_SPLIT/<class>/*.png with the standard recipe: random resized crop + flip, SGD "
                    "(momentum 0.9, wd 1e-4), linear warm-up, cosine (or step) decay, label smoothing 0.1, offset/"
                    "mask branches at 0.1x lr; then evaluate on DATA/VAL_SPLIT. Data parallel: "
                    "`torchrun --nproc_per_node N -m dcnv2.cli train-cls ...`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=["regular", "dcnv1", "dcnv2"], default="dcnv2")
    g.add_argument("--backbone", default="resnet50", help="resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d")
    g.add_argument("--weights", default=None,
                   help="initial ResNet weights: a torchvision name (IMAGENET1K_V1, DEFAULT; downloads) or a state-dict "
                        "file of a regular or DCN ResNet (offset convs it lacks stay zero)")
    g.add_argument("--offset-groups", type=int, default=1)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="ImageFolder root: DATA/<split>/<class>/*.png (`dcnv2 data synth-cls`)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val", help="evaluated at the end (skipped if the folder is absent)")
    g.add_argument("--image-size", type=int, default=64, help="training crop / test centre-crop side")
    g.add_argument("--min-crop-scale", type=float, default=0.08, help="RandomResizedCrop's smallest area fraction")
    g.add_argument("--no-flip", action="store_true")
    g.add_argument("--workers", type=int, default=2, help="data loader processes per training process")
    g.add_argument("--decode", action="store_true",
                   help="the data check before training decodes every image (default: headers only)")
    g.add_argument("--skip-check", action="store_true", help="skip the data check before training")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=float, default=30)
    g.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=32, help="images per process")
    g.add_argument("--lr", type=float, default=None, help="default: 0.1 x global batch / 256 (linear scaling rule)")
    g.add_argument("--lr-schedule", choices=["cosine", "step"], default="cosine")
    g.add_argument("--lr-steps", type=float, nargs="*", default=[30, 60, 80], help="step decay: epochs of x --gamma")
    g.add_argument("--gamma", type=float, default=0.1)
    g.add_argument("--min-lr-factor", type=float, default=0.0, help="cosine: final lr / initial lr")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length (epochs)")
    g.add_argument("--warmup-iters", type=int, default=None, help="warm-up length in iterations (overrides epochs)")
    g.add_argument("--warmup-factor", type=float, default=0.1, help="lr multiplier at the first iteration")
    add_optimizer_options(g)
    g = p.add_argument_group("run")
    add_run_options(g, out_help="run directory (log.jsonl, checkpoints, loss.png, eval_cls_VAL/)", checkpoint_every=500)
    g.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    add_output_options(g, evaluation="the evaluation's top-1/top-5 and confusion matrix")
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "eval-cls", help="top-1/top-5, per-class accuracy and a confusion matrix of a train-cls checkpoint",
        description="Rebuild the classifier from its checkpoint, run it over DATA/SPLIT (resize + centre crop) and "
                    "write metrics.json, metrics.md and confusion.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--checkpoint", required=True, help="model_final.pth or checkpoint_last.pth of `dcnv2 train-cls`")
    e.add_argument("--data", required=True, help="ImageFolder root: DATA/<split>/<class>/*.png")
    e.add_argument("--split", default="val")
    e.add_argument("--image-size", type=int, default=None, help="centre-crop side (default: the training size)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--out", default=None, help="output directory (default: CHECKPOINT_DIR/eval_cls_SPLIT)")
    e.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run_eval)


def run_train(args) -> int:
    import torch

    from dcnv2 import models
    from dcnv2.engine import ModelSpec, TrainConfig, train
    from dcnv2.engine import distributed as D
    from dcnv2.engine.classification import (check_classes, collate_train, evaluate_classifier, format_metrics,
                                             load_image_folder)
    from dcnv2.engine.train import ResumableBatchSampler

    dataset = load_image_folder(args.data, args.train_split, train=True, image_size=args.image_size,
                                min_crop_scale=args.min_crop_scale, flip=not args.no_flip)
    classes = list(dataset.classes)
    val = None
    if not args.no_eval and os.path.isdir(os.path.join(args.data, args.val_split)):
        val = load_image_folder(args.data, args.val_split, train=False, image_size=args.image_size)
        check_classes(classes, val, f"{args.val_split} split")
    if not args.skip_check:
        from dcnv2.data.image_folder import check_image_folder

        report = check_image_folder(args.data, [args.train_split] + ([args.val_split] if val is not None else []),
                                    decode=args.decode)
        if not report.ok:
            listed = "\n  ".join(report.problems[:50])
            more = f"\n  ... and {len(report.problems) - 50} more" if len(report.problems) > 50 else ""
            raise ValueError(f"{len(report.problems)} problem(s) in {args.data} (`dcnv2 data check {args.data}` "
                             f"lists them; --skip-check trains anyway):\n  {listed}{more}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    iters_per_epoch = ResumableBatchSampler.batches_per_epoch(len(dataset), args.batch_size, world)
    warmup = args.warmup_iters if args.warmup_iters is not None else int(round(args.warmup_epochs * iters_per_epoch))
    lr = args.lr if args.lr is not None else 0.1 * args.batch_size * world / 256
    kwargs = {"label_smoothing": args.label_smoothing}
    if args.offset_groups != 1:
        kwargs["offset_groups"] = args.offset_groups
    spec = ModelSpec(arch="classifier", preset=args.preset, backbone=args.backbone, num_classes=len(classes),
                     class_names=classes, min_size=args.image_size, max_size=args.image_size, kwargs=kwargs)
    config = TrainConfig(**train_config_kwargs(args), lr=lr, warmup_iters=warmup, lr_schedule=args.lr_schedule,
                         min_lr_factor=args.min_lr_factor)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    # the weights are an initialisation, not part of the spec: rebuilding for eval must not load them again
    model = models.classifier(preset=args.preset, backbone=args.backbone, num_classes=len(classes),
                              weights=args.weights, **kwargs)
    try:
        result = train(model, dataset, config, model_spec=spec, resume=args.resume, collate_fn=collate_train)
        if D.is_main_process():
            print(f"trained {result['iteration']} iterations (lr {lr:.4g}, {iters_per_epoch} per epoch), last loss "
                  f"{result['loss']:.4f}; model: {result['final_model']}, log: {result['log']}")
            if val is not None:
                from dcnv2.engine.tensorboard import log_evaluation

                out_dir = os.path.join(args.out, f"eval_cls_{args.val_split}")
                out = evaluate_classifier(model, val, class_names=classes, batch_size=max(args.batch_size, 64),
                                          progress=not args.no_progress, out_dir=out_dir,
                                          title=f"{args.preset} {args.backbone}")
                print(format_metrics(out["metrics"], f"{args.preset} {args.backbone}"))
                m = out["metrics"]
                log_evaluation(args.out, result["iteration"],
                               {k: m[k] for k in ("top1", "top5", "mean_class_accuracy", "loss")},
                               prefix=f"eval_{args.val_split}", image=os.path.join(out_dir, "confusion.png"),
                               image_tag="confusion", enabled=args.tensorboard)
    finally:
        D.cleanup_distributed()
    return 0


def run_eval(args) -> int:
    from pathlib import Path

    import torch

    from dcnv2.engine.classification import check_classes, evaluate_classifier, format_metrics, load_classifier, \
        load_image_folder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, spec = load_classifier(args.checkpoint, device=device)
    dataset = load_image_folder(args.data, args.split, train=False, image_size=args.image_size or spec.min_size)
    check_classes(spec.class_names, dataset, f"{Path(args.data) / args.split}")
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_cls_{args.split}"
    name = f"{spec.preset} {spec.backbone}"
    result = evaluate_classifier(model, dataset, class_names=spec.class_names, batch_size=args.batch_size,
                                 num_workers=args.workers, device=device, progress=not args.no_progress,
                                 out_dir=out_dir, title=name)
    print(format_metrics(result["metrics"], name))
    print(f"written to {out_dir}/{{metrics.json, metrics.md, confusion.png}}")
    return 0
