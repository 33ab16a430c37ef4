"""Focus metrics (beyond the paper): how much of what a node looks at lies on its object, over a data split.

For every ground-truth object analysed (the first ``objects_per_image`` of each image with a box of at least
``min_size`` pixels a side), two nodes: the image-wise node at the box centre (last layer of conv5 by
default) and the RoI-wise node of the box (the 2fc feature). For each:

* ``erf_in_box`` / ``erf_in_mask``: the fraction of the ERF's mass (|gradient| summed) inside the object's
  box / mask;
* ``sal_area``: the saliency region's share of the image; ``sal_iou_box`` / ``sal_iou_mask``: its IoU with
  the box (as a pixel region) / the mask.

Averaged per model and node kind, these turn "DCNv2 focuses better" into numbers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcnv2.analysis.figures import AnalysisOptions, NodeSpec, analyze_node
from dcnv2.analysis.nodes import prepare_image
from dcnv2.analysis.receptive_field import mass_inside
from dcnv2.analysis.saliency import slic_segments

__all__ = ["FocusRecord", "METRICS", "box_region", "iou", "focus_records", "summarize", "format_focus_table"]

METRICS = ("erf_in_box", "erf_in_mask", "sal_area", "sal_iou_box", "sal_iou_mask")


@dataclass
class FocusRecord:
    """The metrics of one node (one model, one object, one node kind); NaN where not computed."""

    model: str
    image_id: int
    object_index: int
    kind: str
    box_area: float
    erf_in_box: float
    erf_in_mask: float
    sal_area: float = float("nan")
    sal_iou_box: float = float("nan")
    sal_iou_mask: float = float("nan")
    sal_error: float = float("nan")


def box_region(box: Sequence[float], size) -> np.ndarray:
    """The pixels (centres at i + 0.5) inside ``box`` (x1, y1, x2, y2): bool np.ndarray[h, w]."""
    h, w = size
    x1, y1, x2, y2 = box
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    return ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean regions (NaN when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


def _resize_masks(masks: torch.Tensor, size) -> np.ndarray:
    if masks.shape[-2:] == tuple(size):
        return masks.bool().numpy()
    return F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")[:, 0].bool().numpy()


def focus_records(model: nn.Module, name: str, dataset, *, num_images: int, objects_per_image: int = 1,
                  min_size: float = 4.0, kinds: Sequence[str] = ("image", "roi"),
                  options: Optional[AnalysisOptions] = None,
                  progress: Optional[Callable[[Iterable], Iterable]] = None) -> List[FocusRecord]:
    """Focus metrics of ``model`` over the first ``num_images`` images of ``dataset``.

    Args:
        model: a detector (eval mode) of :mod:`dcnv2.models` (or torchvision-style).
        name: the model's name in the records.
        dataset: ``(image Tensor[3, H, W], target)`` samples with ``boxes`` and ``masks`` (a
            :class:`dcnv2.data.CocoDetection` loaded ``with_masks=True``); the image id comes from
            ``target["image_id"]`` when present.
        num_images: images analysed (the first ones, in order).
        objects_per_image: objects per image, the first ones with both sides >= ``min_size`` pixels.
        kinds: node kinds, ``"image"`` and/or ``"roi"``.
        options: :class:`~dcnv2.analysis.figures.AnalysisOptions` (``saliency=False`` skips saliency).
        progress: wraps the image iterator (e.g. tqdm).
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    if isinstance(objects_per_image, bool) or not isinstance(objects_per_image, int) or objects_per_image < 1:
        raise ValueError(f"objects_per_image must be a positive int, got {objects_per_image!r}")
    bad = [k for k in kinds if k not in ("image", "roi")]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of ('image', 'roi'), got {list(kinds)!r}")
    options = options or AnalysisOptions()
    indices = range(min(num_images, len(dataset)))
    records: List[FocusRecord] = []
    for idx in (progress(indices) if progress else indices):
        image, target = dataset[idx]
        if "masks" not in target:
            raise ValueError("focus metrics need object masks: load the data set with masks")
        image_id = int(target.get("image_id", idx))
        prepared = prepare_image(model, image)
        size = prepared.size
        boxes = [prepared.box_to_input(b) for b in target["boxes"].tolist()]
        masks = _resize_masks(target["masks"], size) if len(boxes) else np.zeros((0,) + size, dtype=bool)
        chosen = [i for i, b in enumerate(boxes) if b[2] - b[0] >= min_size and b[3] - b[1] >= min_size]
        chosen = chosen[:objects_per_image]
        if not chosen:
            continue
        segments = slic_segments(prepared.rgb, options.n_segments, options.compactness) \
            if options.saliency and options.refine else None
        for i in chosen:
            box, mask = boxes[i], masks[i]
            breg = box_region(box, size)
            for kind in kinds:
                spec = NodeSpec("object", kind, xy=((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), box=tuple(box)) \
                    if kind == "image" else NodeSpec("object", kind, box=tuple(box))
                a = analyze_node(model, prepared, spec, options, segments=segments, views=("erf", "saliency"))
                rec = FocusRecord(model=name, image_id=image_id, object_index=i, kind=kind,
                                  box_area=float((box[2] - box[0]) * (box[3] - box[1])),
                                  erf_in_box=mass_inside(a.erf.map, breg), erf_in_mask=mass_inside(a.erf.map, mask))
                if a.saliency is not None:
                    s = a.saliency
                    rec.sal_area, rec.sal_error = s.area_fraction, s.error
                    rec.sal_iou_box, rec.sal_iou_mask = iou(s.mask, breg), iou(s.mask, mask)
                records.append(rec)
    return records


def summarize(records: Sequence[FocusRecord]) -> List[Dict[str, object]]:
    """Mean of each metric per (model, kind), in first-seen order: rows with ``model``, ``kind``, ``nodes``
    and one entry per name in :data:`METRICS` (NaN-aware means; NaN when nothing was computed)."""
    groups: Dict[tuple, List[FocusRecord]] = {}
    for r in records:
        groups.setdefault((r.model, r.kind), []).append(r)
    rows = []
    for (model, kind), recs in groups.items():
        row: Dict[str, object] = {"model": model, "kind": kind, "nodes": len(recs)}
        for m in METRICS:
            vals = np.array([getattr(r, m) for r in recs], dtype=np.float64)
            vals = vals[~np.isnan(vals)]
            row[m] = float(vals.mean()) if len(vals) else float("nan")
        rows.append(row)
    return rows


_HEADERS = {"erf_in_box": "ERF in box", "erf_in_mask": "ERF in mask", "sal_area": "saliency area",
            "sal_iou_box": "saliency IoU box", "sal_iou_mask": "saliency IoU mask"}


def format_focus_table(rows: Sequence[Dict[str, object]]) -> str:
    """A Markdown table of :func:`summarize`'s rows (metrics in %)."""
    head = "| model | node | nodes | " + " | ".join(_HEADERS[m] + " (%)" for m in METRICS) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(METRICS)]
    for row in rows:
        vals = ["–" if math.isnan(row[m]) else f"{100 * row[m]:.1f}" for m in METRICS]
        kind = "image-wise" if row["kind"] == "image" else "RoI-wise"
        lines.append(f"| {row['model']} | {kind} | {row['nodes']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def records_to_dicts(records: Sequence[FocusRecord]) -> List[Dict[str, object]]:
    return [asdict(r) for r in records]
