"""``torch.export`` of the dcnv2 layers and detectors, and saving / loading the exported programs.

The ops are registered with fake kernels, so ``torch.export.export`` traces them as
``torch.ops.dcnv2.deform_conv2d`` / ``deform_roi_pool`` nodes; the program runs with the C++ kernels
(``dcnv2`` must be imported where it is loaded). Detectors export through
:class:`~dcnv2.export.detector.ExportableDetector` (one image in, boxes/scores/labels out) with:

* torchvision's ``batched_nms`` swapped, while tracing, for the same computation without its
  ``numel() == 0`` branch (:func:`~dcnv2.export.detector.exportable_nms`), the only data-dependent branch
  torch.export cannot decide in a Faster R-CNN;
* a fixed image size by default. ``dynamic=True`` frees H and W, but the model's resize branches on which
  side limits the scale (``min_size / short side`` vs ``max_size / long side``), so the program keeps
  torch.export's guard for the traced image's branch and refuses (AssertionError naming the guard) an image
  that takes the other one; e.g. with the demo's ``min_size == max_size`` only square images.
* Mask R-CNN does not export: torchvision pastes masks with a Python loop over the detections
  (``paste_masks_in_image``); export it to ONNX instead (torchvision has an ONNX path for it).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from dcnv2.export.detector import (ExportableDetector, default_image_size, example_image, exportable_nms,
                                   has_masks, is_detector)

__all__ = ["export_program", "save_program", "load_program"]

PathLike = Union[str, os.PathLike]


def export_program(
    model: nn.Module,
    *,
    example_inputs: Optional[Tuple[Any, ...]] = None,
    image_size: Optional[Sequence[int]] = None,
    dynamic: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a detector (one image in) or a layer (``example_inputs`` required).

    Args:
        model: a dcnv2 Faster R-CNN (any preset) or a module of dcnv2 layers.
        example_inputs: inputs to trace with; detectors default to a random Tensor[3, H, W].
        image_size: the detector's (height, width), default its test size, square.
        dynamic: detectors: free H and W (see the module doc for the guard it keeps); layers: free batch,
            height and width of every 4-d input.

    Returns:
        the ExportedProgram (``.module()`` runs it).

    Raises:
        ValueError: a Mask R-CNN, or a layer without ``example_inputs``.
    """
    if is_detector(model):
        wrapped = model if isinstance(model, ExportableDetector) else ExportableDetector(model)
        if has_masks(wrapped.detector):
            raise ValueError("Mask R-CNN cannot be torch.export-ed: torchvision pastes its masks with a Python loop "
                             "over the detections (paste_masks_in_image); export it to ONNX instead")
        if example_inputs is None:
            example_inputs = (example_image(image_size or default_image_size(wrapped)),)
        shapes = None
        if dynamic:
            h = torch.export.Dim("height", min=32, max=8192)
            w = torch.export.Dim("width", min=32, max=8192)
            shapes = ({1: h, 2: w},)
        with exportable_nms(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)  # torchvision's nms fake kernel: create_unbacked_symint
            return torch.export.export(wrapped, tuple(example_inputs), dynamic_shapes=shapes, strict=False)
    if example_inputs is None:
        raise ValueError(f"example_inputs are required to export a {type(model).__name__} (not a detector)")
    model = model.eval()
    shapes = None
    if dynamic:
        n, hh, ww = torch.export.Dim("n", min=1), torch.export.Dim("h", min=4), torch.export.Dim("w", min=4)
        shapes = tuple({0: n, 2: hh, 3: ww} if isinstance(x, torch.Tensor) and x.dim() == 4 else None
                       for x in example_inputs)
    return torch.export.export(model, tuple(example_inputs), dynamic_shapes=shapes, strict=False)


def save_program(program: torch.export.ExportedProgram, path: PathLike) -> Path:
    """Writes ``program`` with ``torch.export.save`` (a ``.pt2`` archive); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


def load_program(path: PathLike) -> torch.export.ExportedProgram:
    """Loads a program written by :func:`save_program` (registers the dcnv2 ops first)."""
    import dcnv2.ops  # noqa: F401  (the program calls torch.ops.dcnv2.*)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported program {str(path)!r} not found")
    return torch.export.load(str(path))
