"""PASCAL VOC detection metrics: per-class AP at IoU 0.5, VOC2007's 11-point and the area under the curve.

The devkit's algorithm (``voc_eval.py`` of py-faster-rcnn / detectron2): per class, detections of every image
sorted by score; each is a true positive when its best-overlapping ground-truth box of that class has
IoU > ``iou_threshold`` and was not matched before, a false positive otherwise, and ignored when that box is
``difficult``. Difficult boxes do not count as positives. Precision/recall over the sorted list give:

* ``AP07``: the VOC2007 11-point metric, the mean over recall r in {0, 0.1, ..., 1} of the highest precision
  at recall >= r;
* ``AP``: the area under the precision envelope (VOC2010 onwards).

Boxes are continuous pixel coordinates (:mod:`dcnv2.data.voc` shifts VOC's 1-based corners), where the plain
IoU equals the devkit's ``+ 1`` IoU on the XML values. ``mAP07``/``mAP`` average the classes that have at
least one non-difficult box (a class without any has no AP: None).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["voc_ap", "voc_class_ap", "voc_evaluate", "format_voc_table"]


def voc_ap(recall: Sequence[float], precision: Sequence[float], *, use_07_metric: bool) -> float:
    """AP of one precision/recall curve (points in detection order): 11-point or area under the envelope."""
    rec, prec = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            ap += (float(np.max(prec[rec >= t])) if np.any(rec >= t) else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ix1, iy1 = np.maximum(boxes[:, 0], box[0]), np.maximum(boxes[:, 1], box[1])
    ix2, iy2 = np.minimum(boxes[:, 2], box[2]), np.minimum(boxes[:, 3], box[3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def voc_class_ap(detections: Sequence[tuple], ground_truth: Mapping[Any, tuple], *,
                 iou_threshold: float = 0.5) -> Dict[str, Any]:
    """AP of one class.

    Args:
        detections: ``(image_id, score, box [4])`` of this class, any order.
        ground_truth: ``{image_id: (boxes ndarray [G, 4], difficult bool ndarray [G])}`` of this class.

    Returns:
        ``{"AP07", "AP", "positives", "detections", "tp", "fp"}`` (APs None without positives).
    """
    npos = int(sum(int((~d).sum()) for _, d in ground_truth.values()))
    matched = {i: np.zeros(len(b), dtype=bool) for i, (b, _) in ground_truth.items()}
    order = sorted(range(len(detections)), key=lambda k: -float(detections[k][1]))  # stable: ties keep order
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, k in enumerate(order):
        image_id, _, box = detections[k]
        boxes, difficult = ground_truth.get(image_id, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        ious = _iou(np.asarray(box, dtype=np.float64), boxes)
        j = int(np.argmax(ious))
        if ious[j] > iou_threshold:
            if difficult[j]:
                continue
            if not matched[image_id][j]:
                tp[rank], matched[image_id][j] = 1, True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    out = {"positives": npos, "detections": len(order), "tp": int(ctp[-1]) if len(order) else 0,
           "fp": int(cfp[-1]) if len(order) else 0, "AP07": None, "AP": None}
    if npos == 0:
        return out
    rec = ctp / npos
    prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    out["AP07"] = voc_ap(rec, prec, use_07_metric=True)
    out["AP"] = voc_ap(rec, prec, use_07_metric=False)
    return out


def voc_evaluate(predictions: Mapping[int, Mapping[str, Tensor]], ground_truth: Mapping[int, Mapping[str, Tensor]],
                 class_names: Sequence[str], *, iou_threshold: float = 0.5) -> Dict[str, Any]:
    """VOC AP of a detector's predictions.

    Args:
        predictions: ``{image_id: {"boxes" [D, 4], "scores" [D], "labels" [D] (1..K)}}``; images without an
            entry have no detections.
        ground_truth: ``{image_id: {"boxes" [G, 4], "labels" [G], "difficult" bool [G]}}`` of every evaluated
            image (:meth:`dcnv2.data.voc.VOCDetection.ground_truth`).
        class_names: the K class names (label ``i`` is ``class_names[i - 1]``).

    Returns:
        ``{"mAP07", "mAP", "iou_threshold", "per_class": {name: voc_class_ap(...)}}`` (fractions in [0, 1];
        the means NaN when no class has a positive).

    Raises:
        ValueError: a prediction for an image not in ``ground_truth``, or a label outside 1..K.
    """
    unknown = sorted(set(predictions) - set(ground_truth))
    if unknown:
        raise ValueError(f"voc_evaluate: predictions for image ids {unknown[:5]} that the ground truth does not have")
    k = len(class_names)
    per_class: Dict[str, Any] = {}
    for label, name in enumerate(class_names, start=1):
        gt = {}
        for image_id, t in ground_truth.items():
            sel = t["labels"] == label
            gt[image_id] = (t["boxes"][sel].double().numpy().reshape(-1, 4), t["difficult"][sel].bool().numpy())
        dets: List[tuple] = []
        for image_id, p in predictions.items():
            labels = p["labels"]
            if labels.numel() and not bool(((labels >= 1) & (labels <= k)).all()):
                raise ValueError(f"voc_evaluate: image {image_id} has labels {sorted(set(labels.tolist()))}, "
                                 f"expected 1..{k}")
            sel = (labels == label).nonzero().flatten().tolist()
            boxes, scores = p["boxes"].double(), p["scores"].double()
            dets += [(image_id, float(scores[i]), boxes[i].numpy()) for i in sel]
        per_class[name] = voc_class_ap(dets, gt, iou_threshold=iou_threshold)
    scored = [c for c in per_class.values() if c["AP"] is not None]
    mean = (lambda key: float(np.mean([c[key] for c in scored])) if scored else math.nan)
    return {"mAP07": mean("AP07"), "mAP": mean("AP"), "iou_threshold": iou_threshold, "per_class": per_class}


def format_voc_table(rows: Mapping[str, Mapping[str, Any]], *, per_class: bool = True) -> str:
    """Markdown: one row per model, VOC07 11-point mAP and area mAP at IoU 0.5 (%), then per-class area AP."""
    def pct(v: Optional[float]) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    classes: List[str] = []
    if per_class:
        for m in rows.values():
            classes += [c for c in m["per_class"] if c not in classes]
    head = ["model", "mAP (VOC07 11-point)", "mAP (area)"] + classes
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|" + "---:|" * len(classes)]
    for name, m in rows.items():
        cells = [pct(m["mAP07"]), pct(m["mAP"])] + [pct(m["per_class"].get(c, {}).get("AP")) for c in classes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
