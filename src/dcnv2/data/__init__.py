"""COCO-format detection data: the loader and its checks, transforms, and the synthetic deformed-objects set;
PASCAL VOC detection and segmentation (``voc``); ImageFolder classification sets: their check and image loader
(``image_folder``).

Attributes resolve lazily, so ``import dcnv2.data.synthetic`` does not pull in pycocotools.
"""
from __future__ import annotations

import importlib

__all__ = ["AnnotationError", "CocoDetection", "load_split", "collate_fn", "coco", "transforms", "synthetic",
           "semantic", "image_folder", "voc"]

_FROM_COCO = ("AnnotationError", "CocoDetection", "load_split", "collate_fn")
_SUBMODULES = ("coco", "transforms", "synthetic", "semantic", "image_folder", "voc")


def __getattr__(name: str):
    if name in _FROM_COCO:
        return getattr(importlib.import_module(f"{__name__}.coco"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
