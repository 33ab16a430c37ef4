"""The COCO-format data sets the CLI trains and evaluates on (built from :mod:`dcnv2.data`)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

__all__ = ["load_dataset"]


def load_dataset(data_dir: Union[str, Path], split: str, *, train: bool, with_masks: bool, flip: bool = True):
    """``DIR/annotations/instances_{split}.json`` + ``DIR/{split}/`` as a :class:`dcnv2.data.CocoDetection`.

    Training sets get a random horizontal flip and drop images without annotations; the detector resizes
    internally (its ``min_size``/``max_size``), so evaluation sets are left at their original size and the
    predictions come out in original image coordinates, as COCOeval needs.
    """
    from dcnv2 import data

    transforms = data.transforms.Compose([data.transforms.RandomHorizontalFlip(0.5)]) if train and flip else None
    return data.load_split(data_dir, split, transforms=transforms, drop_empty=train, with_masks=with_masks)
