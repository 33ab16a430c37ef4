"""Reduced-precision CPU inference of the detectors: bfloat16 through autocast.

``Bfloat16Detector(model)`` runs a detector under ``torch.autocast("cpu", dtype=torch.bfloat16)``: convs,
linear layers and our deformable convs (which follow autocast: bfloat16 in and out, float32 accumulation
inside the kernel) run in bfloat16; autocast keeps its float32 ops (softmax, losses, ...) in float32, and the
outputs (boxes, scores, masks) come back as float32. It is called like the detector (a list of images), so
``dcnv2.engine.evaluate`` can score it.

Converting the weights instead (``model.to(torch.bfloat16)``) does not run: torchvision's CPU ``nms`` kernel
has no bfloat16 implementation, and box decoding in bfloat16 would round coordinates to 8 bits of mantissa
(±2 px at 512 px). Autocast leaves the box arithmetic and NMS in float32.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["Bfloat16Detector"]


class Bfloat16Detector(nn.Module):
    """A detector run under CPU bfloat16 autocast, outputs in float32.

    Args:
        detector: a torchvision-style detector (e.g. ``dcnv2.models.faster_rcnn``), kept as is (not copied).
        dtype: the autocast dtype (``torch.bfloat16``; ``torch.float16`` also works on recent CPUs).
    """

    def __init__(self, detector: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        self.detector = detector
        self.dtype = dtype

    @property
    def transform(self):
        """The wrapped detector's transform (evaluation code reads its sizes)."""
        return self.detector.transform

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        """Args: images, a list of Tensor[3, H, W] (float32). Returns the detector's outputs, floats as float32."""
        device = images[0].device.type if images else "cpu"
        with torch.autocast(device, dtype=self.dtype):
            out = self.detector(images, targets)
        if isinstance(out, list):
            return [{k: v.float() if v.is_floating_point() else v for k, v in d.items()} for d in out]
        return {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in out.items()}
