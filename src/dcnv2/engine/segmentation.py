"""Semantic segmentation metrics: a confusion matrix over all pixels, per-class IoU, mIoU, pixel accuracy.

mIoU is the mean IoU over the classes that occur in the ground truth or in the prediction (a class absent
from both has no IoU and is left out), background included, as the VOC protocol counts it. Pixels labelled
255 in the ground truth are ignored.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["IGNORE_INDEX", "confusion_matrix", "segmentation_metrics", "evaluate_segmentation",
           "format_miou_table", "print_segmentation_eval"]

IGNORE_INDEX = 255


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """int64 Tensor[C, C]: entry (i, j) counts pixels of ground-truth class i predicted as j.

    Args:
        pred: integer Tensor[...] of predicted classes in [0, C).
        target: integer Tensor of the same shape; ``ignore_index`` pixels are left out.
        num_classes: C.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {list(pred.shape)} and {list(target.shape)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    bad = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"classes must lie in [0, {num_classes}) (ground truth may also be {ignore_index}); "
                         f"found ground truth {sorted(set(t[bad].tolist()))[:5]}, prediction {sorted(set(p[bad].tolist()))[:5]}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu()


def segmentation_metrics(conf: Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Metrics of a confusion matrix (rows: ground truth, columns: prediction).

    Returns:
        ``{"mIoU", "pixel_accuracy", "mean_accuracy", "iou": {class: IoU or None}, "classes": [present ...],
        "pixels"}``; ``mIoU`` averages the classes present in the ground truth or the prediction (NaN if none).
    """
    conf = conf.double()
    tp = conf.diag()
    gt = conf.sum(1)
    pr = conf.sum(0)
    union = gt + pr - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    names = list(class_names) if class_names is not None else [str(i) for i in range(conf.shape[0])]
    if len(names) != conf.shape[0]:
        raise ValueError(f"class_names has {len(names)} names for {conf.shape[0]} classes")
    total = conf.sum()
    has_gt = gt > 0
    return {
        "mIoU": float(iou[present].mean()) if bool(present.any()) else math.nan,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
        "mean_accuracy": float((tp[has_gt] / gt[has_gt]).mean()) if bool(has_gt.any()) else math.nan,
        "iou": {n: (float(v) if bool(p) else None) for n, v, p in zip(names, iou, present)},
        "classes": [n for n, p in zip(names, present) if bool(p)],
        "pixels": int(total),
    }


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset, *, num_classes: Optional[int] = None,
                          class_names: Optional[Sequence[str]] = None, device: Optional[torch.device] = None,
                          progress: bool = True, out_dir: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """Runs a segmenter over ``dataset`` (samples ``(image, {"semantic": [H, W]})``) one image at a time and
    scores the argmax of its logits.

    Args:
        num_classes: default ``model.num_classes``. class_names: default ``["background"] + dataset.class_names``.
        out_dir: if given, writes ``metrics.json`` and ``confusion.json`` there.

    Returns:
        ``{"metrics": segmentation_metrics(...), "confusion": Tensor[C, C]}``.
    """
    device = device or next(model.parameters()).device
    num_classes = num_classes or int(model.num_classes)
    if class_names is None:
        names = list(getattr(dataset, "class_names", []))
        class_names = ["background"] + names if len(names) == num_classes - 1 else None
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    iterator = range(len(dataset))
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc="eval seg", unit="img", dynamic_ncols=True, mininterval=0.5)
    for i in iterator:
        image, target = dataset[i]
        logits = model([image.to(device)])[0]
        conf += confusion_matrix(logits.argmax(0).cpu(), target["semantic"], num_classes)
    metrics = segmentation_metrics(conf, class_names)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out_dir / "confusion.json").write_text(json.dumps(conf.tolist()))
    return {"metrics": metrics, "confusion": conf}


def format_miou_table(rows: Dict[str, Dict[str, Any]]) -> str:
    """Markdown: one row per model, mIoU / pixel accuracy / mean accuracy (%) then per-class IoU."""
    classes: List[str] = []
    for m in rows.values():
        classes += [c for c in m["iou"] if c not in classes]
    head = "| model | mIoU | pixel acc | mean acc | " + " | ".join(classes) + " |"
    lines = [head, "|---|" + "---:|" * (3 + len(classes))]

    def pct(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    for name, m in rows.items():
        cells = [pct(m["mIoU"]), pct(m["pixel_accuracy"]), pct(m["mean_accuracy"])]
        cells += [pct(m["iou"].get(c)) for c in classes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_segmentation_eval(model: nn.Module, spec, data_dir: Union[str, Path], split: str, *,
                            device: Optional[torch.device] = None, progress: bool = True,
                            out_dir: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """``dcnv2 eval`` / ``dcnv2 train --eval-split`` for a segmenter: scores ``split`` of a COCO-format folder
    (instance masks as semantic labels) or of a VOC folder (``SegmentationClass/``), prints the mIoU table and
    writes ``metrics.json``, ``confusion.json`` and ``miou_table.md`` to ``out_dir``. Returns the metrics."""
    from dcnv2.engine.datasets import load_segmentation_dataset

    dataset = load_segmentation_dataset(data_dir, split, train=False)
    if dataset.num_classes != spec.num_classes:
        raise ValueError(f"the checkpoint segments {spec.num_classes} classes (background included), the data set "
                         f"{data_dir} split {split!r} has {dataset.num_classes}")
    names = list(spec.class_names)
    names = ["background"] + names if len(names) == spec.num_classes - 1 else None
    result = evaluate_segmentation(model, dataset, num_classes=spec.num_classes, class_names=names, device=device,
                                   progress=progress, out_dir=out_dir)
    m = result["metrics"]
    table = format_miou_table({f"{spec.preset} {spec.backbone} ({spec.min_size} px)": m})
    print(table)
    print(f"mIoU {100 * m['mIoU']:.1f}, pixel accuracy {100 * m['pixel_accuracy']:.1f} on {len(dataset)} images "
          f"({m['pixels']} pixels)" + (f"; written to {out_dir}/{{metrics.json, confusion.json, miou_table.md}}"
                                        if out_dir is not None else ""))
    if out_dir is not None:
        (Path(out_dir) / "miou_table.md").write_text(table + "\n")
    return m
