"""COCO's class names and category ids in the layouts the peers' COCO detectors use.

torchvision's detectors predict COCO category ids directly (91 outputs with 'N/A' gaps, background 0);
mmdetection's and detectron2's predict the 80 classes contiguously, in ascending category-id order.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

__all__ = ["torchvision_layout", "contiguous_layout"]


def _categories() -> List[str]:
    from torchvision.models import _meta

    return list(_meta._COCO_CATEGORIES)  # index = COCO category id, 0 the background


def torchvision_layout() -> Tuple[List[str], Dict[int, int]]:
    """(91 class names, background first; label -> category id, the identity on the real classes)."""
    names = _categories()
    return names, {i: i for i, n in enumerate(names) if i > 0 and n != "N/A"}


def contiguous_layout() -> Tuple[List[str], Dict[int, int]]:
    """(the 80 class names; label 1..80 -> COCO category id)."""
    names = _categories()
    ids = [i for i, n in enumerate(names) if i > 0 and n != "N/A"]
    return [names[i] for i in ids], {label: cat for label, cat in enumerate(ids, start=1)}
