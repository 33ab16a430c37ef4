"""Semantic segmentation labels from COCO-format instance masks (the synthetic set's, or any COCO set's).

Every pixel gets the contiguous label (1..K, categories sorted by id) of the instance covering it, 0 where
none does; where instance masks overlap, the later annotation (in file order) wins: the synthetic set
draws objects in annotation order, so the later one is the visible one. Transforms are the detection
transforms of :mod:`dcnv2.data.transforms` (flip, resize), applied to the image and its instance masks
before the label map is formed, so image and labels stay aligned.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["semantic_labels", "SemanticSegmentation", "load_semantic_split", "IGNORE_INDEX"]

IGNORE_INDEX = 255


def semantic_labels(masks: Tensor, labels: Tensor, height: int, width: int) -> Tensor:
    """Instance masks -> one label map.

    Args:
        masks: Tensor[N, H, W] (0/1, any dtype), in drawing order.
        labels: Tensor[N] class of each instance (1..K).
        height, width: the map's size (used when N = 0).

    Returns:
        int64 Tensor[H, W]: 0 background, else the label of the last instance covering the pixel.
    """
    if masks.dim() != 3 or masks.shape[0] != labels.numel():
        raise ValueError(f"masks must be [N, H, W] with N = len(labels) = {labels.numel()}, got {list(masks.shape)}")
    out = torch.zeros((height, width), dtype=torch.int64)
    if masks.shape[0] and tuple(masks.shape[1:]) != (height, width):
        raise ValueError(f"masks are {list(masks.shape[1:])}, the map is [{height}, {width}]")
    for m, lab in zip(masks, labels.tolist()):
        out[m.bool()] = int(lab)
    return out


class SemanticSegmentation(torch.utils.data.Dataset):
    """A COCO-format instance set as ``(image [3, H, W], {"semantic": int64 [H, W], "image_id": int64 []})``.

    Args:
        dataset: a :class:`dcnv2.data.CocoDetection` loaded ``with_masks=True`` (its ``transforms`` are
            applied to image and masks first).

    Attributes (from ``dataset``): ``num_classes`` (K + 1, background 0), ``class_names``,
    ``label_to_category_id``, ``ids``, ``coco``.
    """

    def __init__(self, dataset):
        if not getattr(dataset, "with_masks", False):
            raise ValueError("SemanticSegmentation needs a CocoDetection loaded with with_masks=True")
        self.dataset = dataset
        self.num_classes = dataset.num_classes
        self.class_names = list(dataset.class_names)
        self.label_to_category_id = dict(dataset.label_to_category_id)
        self.ids = list(dataset.ids)
        self.coco = dataset.coco

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        image, target = self.dataset[index]
        h, w = image.shape[-2:]
        sem = semantic_labels(target["masks"], target["labels"], h, w)
        return image, {"semantic": sem, "image_id": target["image_id"]}


def load_semantic_split(data_dir: Union[str, Path], split: str, *, train: bool, flip: bool = True,
                        sizes: Optional[Sequence[int]] = None, max_size: Optional[int] = None,
                        transforms: Optional[Callable] = None) -> SemanticSegmentation:
    """``DIR/annotations/instances_{split}.json`` + ``DIR/{split}/`` as semantic labels.

    Training sets get a random horizontal flip (``flip``) and, with ``sizes``, a random shorter-side resize
    (:class:`~dcnv2.data.transforms.ResizeShorterSide`); evaluation sets stay at their original size (the
    segmenter resizes internally and returns logits at the input size). ``transforms`` replaces both.
    Images without annotations are kept (all background).
    """
    from dcnv2.data import coco, transforms as T

    if transforms is None and train:
        steps = []
        if sizes:
            steps.append(T.ResizeShorterSide(tuple(sizes), max_size))
        if flip:
            steps.append(T.RandomHorizontalFlip(0.5))
        transforms = T.Compose(steps) if steps else None
    return SemanticSegmentation(coco.load_split(data_dir, split, transforms=transforms, with_masks=True))
