"""The detector as exporters see it: one image tensor in, plain tensors out.

torchvision's detectors take a list of images and return a list of dicts; exporters want tensors. The
wrapper :class:`ExportableDetector` takes one image Tensor[3, H, W] (float, 0..1, any size: the model's own
transform normalises and resizes it) and returns ``(boxes, scores, labels)`` (Mask R-CNN: ``+ masks``)
for that image, in its pixel coordinates. The number of detections D is data-dependent (at most the
model's ``box_detections_per_img``); nothing in the graph pads it to a fixed count.

The wrapped model is an inference copy: eval mode and, for the feature-mimicking presets, without the
training-only ``mimic`` branch (it never runs at inference, and ``torch.export`` would otherwise carry
its parameters).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

__all__ = ["ExportableDetector", "is_detector", "inference_copy", "output_names", "example_image",
           "exportable_nms", "traceable_level_pooling"]


def is_detector(model: nn.Module) -> bool:
    """True for torchvision-style detectors (dcnv2's Faster / Mask R-CNN included)."""
    return isinstance(model, (GeneralizedRCNN, ExportableDetector))


def inference_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode without training-only submodules (the feature-mimicking ``mimic``)."""
    model = copy.deepcopy(model).eval()
    try:
        from dcnv2.models import strip_mimicking
    except ImportError:  # a models package without feature mimicking
        return model
    return strip_mimicking(model)


def has_masks(model: nn.Module) -> bool:
    heads = getattr(model, "roi_heads", None)
    return heads is not None and getattr(heads, "mask_roi_pool", None) is not None


def output_names(model: nn.Module) -> Tuple[str, ...]:
    """The names of :class:`ExportableDetector`'s outputs for ``model``."""
    if isinstance(model, ExportableDetector):
        model = model.detector
    return ("boxes", "scores", "labels", "masks") if has_masks(model) else ("boxes", "scores", "labels")


class ExportableDetector(nn.Module):
    """One image in, ``(boxes Tensor[D, 4] (x1, y1, x2, y2), scores Tensor[D], labels Tensor[D] int64
    [, masks Tensor[D, 1, H, W]])`` out.

    Args:
        detector: a torchvision-style detector; an inference copy of it is kept (the argument is not
            changed).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if isinstance(detector, ExportableDetector):
            detector = detector.detector
        if not isinstance(detector, GeneralizedRCNN):
            raise TypeError(f"detector must be a torchvision GeneralizedRCNN (dcnv2.models.faster_rcnn / mask_rcnn), "
                            f"got {type(detector).__name__}")
        self.detector = inference_copy(detector)
        self.names = output_names(self.detector)
        self.eval()

    def train(self, mode: bool = True) -> "ExportableDetector":
        """Always eval: an inference wrapper (exporters switch modes and restore them afterwards)."""
        return super().train(False)

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        """Args: image Tensor[3, H, W] float in [0, 1]. Returns the tensors named by :attr:`names`."""
        out = self.detector([image])[0]
        return tuple(out[k] for k in self.names)


def example_image(image_size: Sequence[int], *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """A deterministic random image Tensor[3, H, W] to trace with (the traced graph does not depend on its
    values)."""
    h, w = _size(image_size)
    g = torch.Generator().manual_seed(seed)
    return torch.rand((3, h, w), generator=g, dtype=dtype)


def _size(image_size: Sequence[int]) -> Tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 32 for v in image_size)):
        raise ValueError(f"image_size must be (height, width), two ints >= 32, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def default_image_size(model: nn.Module) -> Tuple[int, int]:
    """A square image of the model's test size (``transform.min_size``) — the size it resizes to anyway."""
    if isinstance(model, ExportableDetector):
        model = model.detector
    min_size = model.transform.min_size
    s = int(min_size[-1] if isinstance(min_size, (tuple, list)) else min_size)
    return (s, s)


def _batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's ``batched_nms`` coordinate trick without its ``if boxes.numel() == 0`` branch, which
    ``torch.export`` cannot decide for a data-dependent box count; a zero appended to the max keeps the
    empty case defined (the NMS of no boxes is empty, as before)."""
    max_coordinate = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_threshold)


@contextlib.contextmanager
def exportable_nms() -> Iterator[None]:
    """While tracing for ``torch.export``, routes torchvision's RPN and RoI heads to :func:`_batched_nms`
    (the same result for every input, without the data-dependent branch). Restored on exit."""
    from torchvision.ops import boxes as box_ops

    saved = box_ops.batched_nms
    box_ops.batched_nms = _batched_nms
    try:
        yield
    finally:
        box_ops.batched_nms = saved


@contextlib.contextmanager
def traceable_level_pooling() -> Iterator[None]:
    """While tracing (ONNX, OpenVINO), multi-level RoI pooling (FPN) pools every level, empty or not
    (:func:`dcnv2.nn.deform_roi_pool.every_level_pooling`): a trace of the eager loop keeps only the levels the
    traced image's RoIs fell on."""
    from dcnv2.nn.deform_roi_pool import every_level_pooling

    with every_level_pooling():
        yield
