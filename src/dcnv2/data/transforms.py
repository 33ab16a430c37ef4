"""Detection transforms on ``(image, target)`` pairs that keep boxes and masks consistent with the image.

``image`` is a Tensor[3, H, W]; ``target`` a dict as :class:`dcnv2.data.CocoDetection` makes it (``boxes``
float Tensor[N, 4] xyxy in pixels, optional ``masks`` Tensor[N, H, W] and ``area`` Tensor[N]; other keys
pass through). Transforms return a new target dict and never modify their inputs. Random choices use the
global torch RNG, so the engine's per-sample seeding makes them reproducible.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Compose", "RandomHorizontalFlip", "ResizeShorterSide", "ToDtype"]

Target = Dict[str, Tensor]
Transform = Callable[[Tensor, Target], Tuple[Tensor, Target]]


class Compose:
    """Applies ``transforms`` one after another."""

    def __init__(self, transforms: Sequence[Transform]):
        transforms = list(transforms)
        for k, t in enumerate(transforms):
            if not callable(t):
                raise TypeError(f"Compose: transforms[{k}] is a {type(t).__name__}, not a callable "
                                f"(image, target) -> (image, target)")
        self.transforms = transforms

    def __call__(self, image: Tensor, target: Target) -> Tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomHorizontalFlip:
    """Mirrors the image left-right with probability ``p``: box x1' = W - x2, x2' = W - x1; masks mirrored."""

    def __init__(self, p: float = 0.5):
        if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise ValueError(f"RandomHorizontalFlip: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, image: Tensor, target: Target) -> Tuple[Tensor, Target]:
        if not bool(torch.rand(1) < self.p):
            return image, target
        width = image.shape[-1]
        target = dict(target)
        if "boxes" in target:
            boxes = target["boxes"]
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ResizeShorterSide:
    """Resizes so the shorter side is ``size`` (one of ``sizes`` at random: multi-scale training), with the
    longer side at most ``max_size``.

    Images are resampled bilinearly, masks by nearest neighbour (they stay 0/1); boxes and ``area`` are scaled
    by the same factors (the output size is rounded to whole pixels, so x and y factors may differ slightly).

    Args:
        sizes: a shorter-side length in pixels, or a sequence of them to pick from uniformly.
        max_size: cap on the longer side (None: no cap).
    """

    def __init__(self, sizes: Union[int, Sequence[int]], max_size: Optional[int] = None):
        sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ValueError(f"ResizeShorterSide: sizes must be a positive int or a non-empty sequence of them, "
                             f"got {sizes!r}")
        if max_size is not None and not (isinstance(max_size, int) and max_size > 0):
            raise ValueError(f"ResizeShorterSide: max_size must be a positive int or None, got {max_size!r}")
        self.sizes, self.max_size = sizes, max_size

    def output_size(self, height: int, width: int, size: int) -> Tuple[int, int]:
        """(new_height, new_width) for shorter side ``size`` under the ``max_size`` cap."""
        scale = size / min(height, width)
        if self.max_size is not None and max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))

    def __call__(self, image: Tensor, target: Target) -> Tuple[Tensor, Target]:
        size = self.sizes[int(torch.randint(len(self.sizes), (1,)))] if len(self.sizes) > 1 else self.sizes[0]
        height, width = image.shape[-2:]
        new_h, new_w = self.output_size(height, width, size)
        if (new_h, new_w) == (height, width):
            return image, target
        image = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear",
                              align_corners=False)[0].to(image.dtype)
        sx, sy = new_w / width, new_h / height
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
        if "masks" in target:
            m = target["masks"]
            # nearest-exact samples pixel centres, matching the bilinear (align_corners=False) image grid
            resized = F.interpolate(m[None].float(), size=(new_h, new_w), mode="nearest-exact")[0] if len(m) else \
                m.new_zeros((0, new_h, new_w))
            target["masks"] = resized.to(m.dtype)
        return image, target

    def __repr__(self) -> str:
        return f"ResizeShorterSide(sizes={self.sizes}, max_size={self.max_size})"


class ToDtype:
    """Casts the image to a floating ``dtype`` (values stay in [0, 1]); the target is unchanged."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"ToDtype: dtype must be a floating torch dtype, got {dtype!r}")
        self.dtype = dtype

    def __call__(self, image: Tensor, target: Target) -> Tuple[Tensor, Target]:
        return image.to(self.dtype), target

    def __repr__(self) -> str:
        return f"ToDtype({self.dtype})"
