"""The data sets the CLI trains and evaluates on: COCO format, or PASCAL VOC (built from :mod:`dcnv2.data`).

A folder with the VOC layout (``ImageSets/`` + ``Annotations/`` or ``SegmentationClass/``, or a parent with one
``VOCdevkit/VOC20xx``) is read as VOC, anything else as COCO format (``annotations/instances_SPLIT.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

__all__ = ["load_dataset", "load_segmentation_dataset"]


def _train_transforms(train: bool, flip: bool):
    from dcnv2 import data

    return data.transforms.Compose([data.transforms.RandomHorizontalFlip(0.5)]) if train and flip else None


def load_dataset(data_dir: Union[str, Path], split: str, *, train: bool, with_masks: bool, flip: bool = True):
    """A detection split: ``DIR/annotations/instances_{split}.json`` + ``DIR/{split}/`` as a
    :class:`dcnv2.data.CocoDetection`, or ``ImageSets/Main/{split}.txt`` of a VOC folder as a
    :class:`dcnv2.data.voc.VOCDetection`.

    Training sets get a random horizontal flip and drop images without annotations; the detector resizes
    internally (its ``min_size``/``max_size``), so evaluation sets are left at their original size and the
    predictions come out in original image coordinates, as COCOeval needs.

    Raises:
        ValueError: ``with_masks`` for a VOC folder (VOC detection has boxes only).
    """
    from dcnv2 import data
    from dcnv2.data import voc

    transforms = _train_transforms(train, flip)
    if voc.is_voc_layout(data_dir):
        if with_masks:
            raise ValueError(f"{data_dir} is a PASCAL VOC folder: its detection annotations have boxes only, so "
                             "Mask R-CNN (--arch mask_rcnn) cannot train or evaluate on it; use --arch faster_rcnn, "
                             "or --arch segmenter for SegmentationClass/")
        return voc.VOCDetection(data_dir, split, transforms=transforms, drop_empty=train)
    return data.load_split(data_dir, split, transforms=transforms, drop_empty=train, with_masks=with_masks)


def load_segmentation_dataset(data_dir: Union[str, Path], split: str, *, train: bool, flip: bool = True):
    """A semantic segmentation split: VOC's ``ImageSets/Segmentation/{split}.txt`` with ``SegmentationClass/``
    PNGs (:class:`dcnv2.data.voc.VOCSegmentation`), or a COCO-format split's instance masks as labels
    (:func:`dcnv2.data.semantic.load_semantic_split`). Training sets get a random horizontal flip."""
    from dcnv2.data import voc

    if voc.is_voc_layout(data_dir):
        return voc.VOCSegmentation(data_dir, split, transforms=_train_transforms(train, flip))
    from dcnv2.data.semantic import load_semantic_split

    return load_semantic_split(data_dir, split, train=train, flip=flip)
