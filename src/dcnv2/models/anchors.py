"""RPN anchors as mmdetection and detectron2 place them: torchvision's generator without its rounding.

torchvision rounds each base anchor's corners to whole pixels (a 32-pixel anchor of aspect 0.5 becomes
46 x 22 instead of 45.25 x 22.63); mmdetection (``AnchorGenerator``, ``center_offset=0``) and detectron2
(``DefaultAnchorGenerator``, ``offset=0``) keep them exact. A converted peer checkpoint's RPN was trained on
the exact anchors, so its detector uses these.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator

__all__ = ["ExactAnchorGenerator", "anchor_generator"]


class ExactAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` (same arguments, order and grid) with unrounded base anchors."""

    def generate_anchors(self, scales: List[int], aspect_ratios: List[float], dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales_t[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales_t[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


def anchor_generator(sizes, aspect_ratios, *, rounding: bool = True) -> AnchorGenerator:
    """torchvision's generator (``rounding=True``) or :class:`ExactAnchorGenerator`."""
    cls = AnchorGenerator if rounding else ExactAnchorGenerator
    return cls(sizes=sizes, aspect_ratios=aspect_ratios)
