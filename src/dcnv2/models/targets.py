"""Checks of detection inputs before any compute.

torchvision's detectors crash on an inf box (the anchor matcher indexes out of range) and silently train on
NaN boxes (NaN compares false in its degenerate-box check). :func:`validate_targets` rejects such targets
with a ValueError naming the image index, the field and the offending value.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import Tensor

__all__ = ["validate_images", "validate_targets", "num_classes_of"]


def validate_images(images: Any) -> None:
    """``images`` must be a list/tuple of Tensor[C, H, W] of a floating dtype with H, W > 0."""
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of Tensor[C, H, W], got {type(images).__name__}")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor):
            raise TypeError(f"images[{i}] must be a Tensor[C, H, W], got {type(img).__name__}")
        if img.dim() != 3 or img.shape[-1] == 0 or img.shape[-2] == 0:
            raise ValueError(f"images[{i}] must be a non-empty Tensor[C, H, W], got shape {tuple(img.shape)}")
        if not img.is_floating_point():
            raise TypeError(f"images[{i}] must have a floating dtype (values in [0, 1]), got {img.dtype}")


def validate_targets(images: Sequence[Tensor], targets: Any, num_classes: int, *, masks: bool = False) -> None:
    """Validates detection targets, as torchvision's detectors take them.

    Args:
        images: the N input images, Tensor[C, H, W] each (mask sizes are checked against them).
        targets: list of N dicts with ``boxes`` Tensor[K, 4] (x1, y1, x2, y2, floating, finite,
            x2 > x1 and y2 > y1), ``labels`` Tensor[K] int64 in [1, num_classes) and, when ``masks``,
            ``masks`` Tensor[K, H, W] (uint8, bool or floating) of the image's size.
        num_classes: number of classes including the background (label 0, never a target).
        masks: whether masks are required (Mask R-CNN).

    Raises:
        TypeError: a field of the wrong type; ValueError: a bad value. Both name the image index, the field and
            the bad value.
    """
    validate_images(images)
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of dicts, got {type(targets).__name__}")
    if len(targets) != len(images):
        raise ValueError(f"got {len(targets)} targets for {len(images)} images")
    for i, t in enumerate(targets):
        _validate_one(i, images[i], t, num_classes, masks)


def _validate_one(i: int, image: Tensor, t: Dict[str, Any], num_classes: int, masks: bool) -> None:
    where = f"targets[{i}]"
    if not isinstance(t, dict):
        raise TypeError(f"{where} must be a dict with 'boxes' and 'labels', got {type(t).__name__}")
    for key in ("boxes", "labels") + (("masks",) if masks else ()):
        if key not in t:
            raise ValueError(f"{where} has no {key!r} (keys: {sorted(t)})")
        if not isinstance(t[key], Tensor):
            raise TypeError(f"{where}[{key!r}] must be a Tensor, got {type(t[key]).__name__}")
    boxes, labels = t["boxes"], t["labels"]
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}['boxes'] must be a Tensor[K, 4], got shape {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{where}['boxes'] must have a floating dtype, got {boxes.dtype}")
    k = boxes.shape[0]
    if labels.shape != (k,):
        raise ValueError(f"{where}['labels'] must be a Tensor[{k}] (one per box), got shape {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{where}['labels'] must be int64, got {labels.dtype}")
    if k:
        finite = torch.isfinite(boxes).all(dim=1)
        if not bool(finite.all()):
            j = int((~finite).nonzero()[0])
            raise ValueError(f"{where}['boxes'][{j}] is not finite: {boxes[j].tolist()}")
        # positive form: NaN already rejected above, this catches zero/negative width or height
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not bool(ok.all()):
            j = int((~ok).nonzero()[0])
            raise ValueError(f"{where}['boxes'][{j}] is degenerate (needs x2 > x1 and y2 > y1): {boxes[j].tolist()}")
        ok = (labels >= 1) & (labels < num_classes)
        if not bool(ok.all()):
            j = int((~ok).nonzero()[0])
            raise ValueError(f"{where}['labels'][{j}] = {int(labels[j])} is out of range [1, {num_classes}) "
                             f"(0 is the background, num_classes={num_classes} includes it)")
    if "masks" in t:
        m = t["masks"]
        if not isinstance(m, Tensor):
            raise TypeError(f"{where}['masks'] must be a Tensor, got {type(m).__name__}")
        h, w = image.shape[-2:]
        if tuple(m.shape) != (k, h, w):
            raise ValueError(f"{where}['masks'] must be a Tensor[{k}, {h}, {w}] (one mask per box, image size), "
                             f"got shape {tuple(m.shape)}")
        if not (m.dtype in (torch.uint8, torch.bool) or m.is_floating_point()):
            raise TypeError(f"{where}['masks'] must be uint8, bool or floating, got {m.dtype}")
        if m.is_floating_point() and m.numel() and not bool(torch.isfinite(m).all()):
            raise ValueError(f"{where}['masks'] contains non-finite values")


def num_classes_of(model) -> int:
    """Classes (background included) of a torchvision-style detector, read from its box predictor."""
    return int(model.roi_heads.box_predictor.cls_score.out_features)

