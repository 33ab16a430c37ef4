"""Inference over a data set (single- or multi-scale), conversion to COCO results and COCOeval metrics."""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["DEFAULT_TEST_SCALES", "METRIC_NAMES", "inference", "merge_detections", "to_coco_results",
           "coco_evaluate", "format_ap_table", "evaluate"]

DEFAULT_TEST_SCALES: Tuple[int, ...] = (400, 600, 800, 1000, 1200, 1400)  # the paper's multi-scale test
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@contextlib.contextmanager
def _test_scale(model: nn.Module, min_size: int, max_size: int):
    """Temporarily sets the detector's resize (torchvision's GeneralizedRCNNTransform) to one test scale."""
    t = model.transform
    saved = (t.min_size, t.max_size)
    t.min_size, t.max_size = (int(min_size),), int(max_size)
    try:
        yield
    finally:
        t.min_size, t.max_size = saved


def merge_detections(predictions: Sequence[Mapping[str, torch.Tensor]], *, iou_threshold: float = 0.5,
                     max_detections: int = 100) -> Dict[str, torch.Tensor]:
    """Merges detections of one image from several test scales: per-class NMS, then the top ``max_detections``."""
    from torchvision.ops import batched_nms

    keys = [k for k in predictions[0] if all(k in p for p in predictions)]
    cat = {k: torch.cat([p[k] for p in predictions]) for k in keys}
    keep = batched_nms(cat["boxes"].float(), cat["scores"].float(), cat["labels"], iou_threshold)[:max_detections]
    return {k: v[keep] for k, v in cat.items()}


@torch.no_grad()
def inference(model: nn.Module, dataset, *, device: Optional[torch.device] = None,
              scales: Optional[Sequence[int]] = None, max_size: Optional[int] = None,
              nms_iou: float = 0.5, max_detections: int = 100, progress: bool = True,
              ) -> Iterator[Tuple[int, torch.Tensor, Dict[str, torch.Tensor]]]:
    """Runs the detector over ``dataset`` (samples ``(image, target)`` with ``target["image_id"]``).

    Args:
        scales: test shorter sides; None tests at the model's own size. With several scales the detections
            are merged by :func:`merge_detections` (per-class NMS at ``nms_iou``).
        max_size: longer-side cap per scale; default scales the model's own ``max_size / min_size`` ratio.

    Yields:
        ``(image_id, image, prediction)`` per image, prediction on CPU in original image coordinates.
    """
    device = device or next(model.parameters()).device
    model.eval()
    t = model.transform
    ratio = t.max_size / max(t.min_size)
    iterator: Iterable = range(len(dataset))
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc="eval", unit="img", dynamic_ncols=True, mininterval=0.5)
    from dcnv2.engine.predict import degenerate_image

    for i in iterator:
        image, target = dataset[i]
        image_id = int(target["image_id"])
        x = [image.to(device)]
        sizes = [(s, max_size or int(math.ceil(s * ratio))) for s in scales] if scales else [(max(t.min_size),
                                                                                                  t.max_size)]
        runnable = []
        for s, cap in sizes:  # an image too elongated to resize at a scale gets no detections there, and says so
            reason = degenerate_image(image, s, cap)
            if reason:
                warnings.warn(f"eval: image {image_id} ({_image_name(dataset, image_id)}) gets no detections at "
                              f"test size {s}: {reason}", stacklevel=2)
            else:
                runnable.append((s, cap))
        if not runnable:
            pred = _no_detections(image, masks=getattr(model.roi_heads, "mask_roi_pool", None) is not None)
        elif not scales:
            pred = model(x)[0]
        else:
            per_scale = []
            for s, cap in runnable:
                with _test_scale(model, s, cap):
                    per_scale.append(model(x)[0])
            pred = per_scale[0] if len(per_scale) == 1 else merge_detections(
                per_scale, iou_threshold=nms_iou, max_detections=max_detections)
        yield image_id, image, {k: v.detach().cpu() for k, v in pred.items()}


def _image_name(dataset, image_id: int) -> str:
    coco = getattr(dataset, "coco", None)
    info = coco.imgs.get(image_id) if coco is not None and hasattr(coco, "imgs") else None
    return str(info.get("file_name")) if info else "?"


def _no_detections(image: torch.Tensor, masks: bool) -> Dict[str, torch.Tensor]:
    pred = {"boxes": image.new_zeros((0, 4)), "scores": image.new_zeros((0,)),
            "labels": torch.zeros((0,), dtype=torch.int64)}
    if masks:
        pred["masks"] = image.new_zeros((0, 1) + tuple(image.shape[-2:]))
    return pred


def to_coco_results(image_id: int, prediction: Mapping[str, torch.Tensor], label_to_category_id: Mapping[int, int],
                    *, mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
    """One image's detections as COCO result dicts (bbox xywh; RLE segmentation when masks are present)."""
    boxes = prediction["boxes"].detach().float().cpu()
    if boxes.numel() == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = prediction["scores"].detach().float().cpu().tolist()
    labels = prediction["labels"].detach().cpu().tolist()
    unknown = sorted({l for l in labels if l not in label_to_category_id})
    if unknown:
        raise ValueError(f"to_coco_results: labels {unknown} have no category id "
                         f"(label_to_category_id has {sorted(label_to_category_id)})")
    rles = None
    if "masks" in prediction:
        from pycocotools import mask as mask_util

        m = prediction["masks"].detach().cpu()
        m = m[:, 0] if m.dim() == 4 else m
        binary = (m.float() >= mask_threshold).numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
    results = []
    for j, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        r = {"image_id": int(image_id), "category_id": int(label_to_category_id[label]),
             "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)}
        if rles is not None:
            r["segmentation"] = rles[j]
        results.append(r)
    return results


def coco_evaluate(coco_gt, results: List[Dict[str, Any]], iou_types: Sequence[str] = ("bbox",),
                  img_ids: Optional[Sequence[int]] = None, verbose: bool = False) -> Dict[str, Dict[str, float]]:
    """COCOeval of ``results`` against ``coco_gt`` (a pycocotools ``COCO``) for each IoU type.

    Returns:
        ``{iou_type: {"AP": .., "AP50": .., "AP75": .., "APs": .., "APm": .., "APl": .., "AR1": .., ...}}``;
        entries are -1 where COCOeval has no ground truth in that area range.
    """
    from pycocotools.cocoeval import COCOeval

    img_ids = list(img_ids) if img_ids is not None else sorted(coco_gt.getImgIds())
    metrics: Dict[str, Dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type == "segm" and results and "segmentation" not in results[0]:
            raise ValueError("coco_evaluate: iou type 'segm' needs results with 'segmentation' (a mask model)")
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink) if not verbose else contextlib.nullcontext():
            if results:
                # loadRes mutates its input (adds area/id); give it copies
                coco_dt = coco_gt.loadRes([dict(r) for r in results])
            else:  # loadRes cannot take an empty list; no detections still score 0 (or -1 without GT)
                from pycocotools.coco import COCO

                coco_dt = COCO()
                coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                                   "categories": list(coco_gt.dataset.get("categories", []))}
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.imgIds = img_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[iou_type] = {k: float(v) for k, v in zip(METRIC_NAMES, ev.stats)}
    return metrics


def format_ap_table(metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
                    columns: Sequence[str] = ("AP", "AP50", "AP75", "APs", "APm", "APl")) -> str:
    """A markdown table, one row per (model, IoU type): ``metrics = {row name: {iou_type: {metric: value}}}``."""
    lines = ["| model | type | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for name, per_type in metrics.items():
        for iou_type, vals in per_type.items():
            cells = []
            for c in columns:
                v = vals.get(c, float("nan"))
                cells.append("–" if v < 0 else f"{100 * v:.1f}")
            lines.append(f"| {name} | {iou_type} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(model: nn.Module, dataset, *, label_to_category_id: Optional[Mapping[int, int]] = None,
             iou_types: Optional[Sequence[str]] = None, scales: Optional[Sequence[int]] = None,
             max_size: Optional[int] = None, device: Optional[torch.device] = None, progress: bool = True,
             out_dir: Optional[Path] = None, keep_predictions: int = 0) -> Dict[str, Any]:
    """Inference + COCOeval over a COCO-format data set (``dataset.coco``, ``dataset.ids``); for a PASCAL VOC
    set (:class:`dcnv2.data.voc.VOCDetection`, which has ``ground_truth()``) also the VOC07 11-point and area mAP
    at IoU 0.5 (:func:`dcnv2.engine.voc_eval.voc_evaluate`).

    Args:
        label_to_category_id: model label -> category id; default ``dataset.label_to_category_id``.
        iou_types: default ``("bbox", "segm")`` when the model predicts masks, else ``("bbox",)``.
        out_dir: if given, writes ``results.json`` (COCO results) and ``metrics.json`` there (and for VOC
            ``voc_metrics.json``).
        keep_predictions: also return the first N ``(image, prediction)`` pairs (for drawing).

    Returns:
        ``{"metrics": {iou_type: {...}}, "results": [...], "predictions": [...], "voc": {...} or None}``.
    """
    mapping = dict(label_to_category_id if label_to_category_id is not None else dataset.label_to_category_id)
    results: List[Dict[str, Any]] = []
    kept: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = []
    voc_gt = dataset.ground_truth() if callable(getattr(dataset, "ground_truth", None)) else None
    boxes_by_image: Dict[int, Dict[str, torch.Tensor]] = {}
    has_masks = None
    for image_id, image, pred in inference(model, dataset, device=device, scales=scales, max_size=max_size,
                                           progress=progress):
        has_masks = "masks" in pred if has_masks is None else has_masks
        results.extend(to_coco_results(image_id, pred, mapping))
        if voc_gt is not None:
            boxes_by_image[image_id] = {k: pred[k] for k in ("boxes", "scores", "labels")}
        if len(kept) < keep_predictions:
            kept.append((image, pred))
    if iou_types is None:
        iou_types = ("bbox", "segm") if has_masks else ("bbox",)
    metrics = coco_evaluate(dataset.coco, results, iou_types, img_ids=list(dataset.ids))
    voc = None
    if voc_gt is not None:
        from dcnv2.engine.voc_eval import voc_evaluate

        voc = voc_evaluate(boxes_by_image, voc_gt, dataset.class_names)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results))
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if voc is not None:
            (out_dir / "voc_metrics.json").write_text(json.dumps(voc, indent=2))
    return {"metrics": metrics, "results": results, "predictions": kept, "voc": voc}
