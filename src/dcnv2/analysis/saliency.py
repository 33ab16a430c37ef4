"""Error-bounded saliency regions (appendix A1 of the paper).

The saliency region of a node N on image I is the smallest image region that, alone, reproduces N's response
within an error bound: ``1 - cos(N(I), N(I ⊙ M)) < ε`` (ε = 0.1), where ``I ⊙ M`` keeps the pixels of the
region and sets the others to a fill value. Two steps, as in the paper:

1. A rectangle centred on the node (the image-wise node's cell, the RoI's centre) grows from area 0 in even
   increments of ``area_step`` × the image area until the bound holds. It is a square for image-wise nodes
   and has the RoI's aspect ratio for RoI-wise nodes (``aspect``); it is clipped to the image.
2. The image is cut into SLIC superpixels (``skimage.segmentation.slic``). Inside the region, the superpixel
   whose removal raises the error least is removed, as long as the bound still holds.

Masked pixels take ``fill``: ``"mean"`` (default) sets them to 0 after normalisation, i.e. the data set's
mean colour, the value a zero-mean input treats as "nothing"; ``"zero"`` makes them black (0 before
normalisation); a number is used as is (after normalisation). The padding of the model input is left alone.
All masked forward passes are batched (``batch_size`` masks per forward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SaliencyResult", "saliency_region", "slic_segments", "rectangle_mask", "masked_error"]


@dataclass
class SaliencyResult:
    """Outcome of the search.

    Attributes:
        mask: np.ndarray[h, w] bool, the saliency region.
        error: 1 - cos of the response on the region (< ε).
        rect: (x1, y1, x2, y2) the step-1 rectangle, clipped to the image.
        rect_mask: np.ndarray[h, w] bool, the step-1 region.
        rect_error: the error of the step-1 rectangle.
        rect_areas: the (unclipped) rectangle areas tried in step 1, in pixels, in order.
        rect_errors: their errors.
        removed: superpixel ids removed in step 2, in order; removed_errors: the error after each removal.
        forwards: masked forward passes run.
        eps, area_step, fill: the settings used.
    """

    mask: np.ndarray
    error: float
    rect: Tuple[float, float, float, float]
    rect_mask: np.ndarray
    rect_error: float
    rect_areas: List[float] = field(default_factory=list)
    rect_errors: List[float] = field(default_factory=list)
    removed: List[int] = field(default_factory=list)
    removed_errors: List[float] = field(default_factory=list)
    forwards: int = 0
    eps: float = 0.1
    area_step: float = 0.01
    fill: Union[str, float] = "mean"

    @property
    def area(self) -> int:
        """Pixels in the region."""
        return int(self.mask.sum())

    @property
    def area_fraction(self) -> float:
        """The region's share of the image."""
        return self.area / self.mask.size


def slic_segments(rgb: Tensor, n_segments: int = 100, compactness: float = 10.0) -> np.ndarray:
    """SLIC superpixels of ``rgb`` Tensor[3, h, w] in [0, 1]: np.ndarray[h, w] of ids 0..S-1."""
    from skimage.segmentation import slic

    img = rgb.detach().permute(1, 2, 0).double().cpu().numpy()
    return slic(img, n_segments=n_segments, compactness=compactness, start_label=0).astype(np.int64)


def rectangle_mask(size: Tuple[int, int], center: Tuple[float, float], width: float,
                   height: float) -> Tuple[np.ndarray, Tuple[float, float, float, float]]:
    """The pixels (centres at i + 0.5) of the ``width`` x ``height`` rectangle centred at ``center`` (x, y),
    clipped to an image of ``size`` (h, w). Returns (mask[h, w] bool, clipped (x1, y1, x2, y2))."""
    h, w = size
    cx, cy = center
    x1, x2 = max(cx - width / 2, 0.0), min(cx + width / 2, float(w))
    y1, y2 = max(cy - height / 2, 0.0), min(cy + height / 2, float(h))
    xs = np.arange(w) + 0.5
    ys = np.arange(h) + 0.5
    mask = ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]
    return mask, (x1, y1, x2, y2)


def masked_error(reference: Tensor, responses: Tensor) -> Tensor:
    """``1 - cos(reference, response)`` per row: reference Tensor[D], responses Tensor[B, D] -> Tensor[B].
    A zero response (nothing left) has cos 0, error 1."""
    cos = F.cosine_similarity(responses.double(), reference.double()[None], dim=1, eps=1e-12)
    return 1.0 - cos


class _Evaluator:
    """Batched errors of masked inputs."""

    def __init__(self, response: Callable[[Tensor], Tensor], x: Tensor, size: Tuple[int, int], fill: Tensor,
                 batch_size: int) -> None:
        self.response, self.x, self.size, self.batch_size = response, x.detach(), size, batch_size
        self.fill = fill.to(x.device, x.dtype).view(1, -1, 1, 1)
        with torch.no_grad():
            self.reference = response(self.x)[0].detach()
        self.forwards = 0

    @torch.no_grad()
    def errors(self, masks: Sequence[np.ndarray]) -> np.ndarray:
        h, w = self.size
        out = []
        for start in range(0, len(masks), self.batch_size):
            chunk = masks[start:start + self.batch_size]
            keep = torch.ones(len(chunk), 1, *self.x.shape[-2:], dtype=self.x.dtype, device=self.x.device)
            keep[:, 0, :h, :w] = torch.from_numpy(np.stack(chunk)).to(keep)
            # channels-last: oneDNN's faster convolution layout on CPU (same values)
            batch = (self.x * keep + self.fill * (1 - keep)).contiguous(memory_format=torch.channels_last)
            out.append(masked_error(self.reference, self.response(batch)).cpu().numpy())
            self.forwards += len(chunk)
        return np.concatenate(out) if out else np.zeros(0)


def saliency_region(response: Callable[[Tensor], Tensor], x: Tensor, *, size: Tuple[int, int],
                    center: Tuple[float, float], aspect: float = 1.0, eps: float = 0.1, area_step: float = 0.01,
                    segments: Optional[np.ndarray] = None, rgb: Optional[Tensor] = None, n_segments: int = 100,
                    compactness: float = 10.0, fill: Union[Tensor, float] = 0.0, fill_name: Union[str, float] = "mean",
                    batch_size: int = 8, refine: bool = True, greedy: str = "exact") -> SaliencyResult:
    """The error-bounded saliency region of a node.

    Args:
        response: the node's ``response`` (Tensor[B, 3, H, W] -> Tensor[B, D]).
        x: Tensor[1, 3, H, W], the model input.
        size: (h, w) of the image inside ``x``; the region lives there.
        center: (x, y) centre of the step-1 rectangle in input pixels.
        aspect: width / height of the rectangle (1: square, the image-wise node's; the box's for RoI nodes).
        eps: the error bound ε (paper: 0.1), in (0, 1].
        area_step: the rectangle's area increment, a fraction of the image area, in (0, 1].
        segments: np.ndarray[h, w] superpixel ids (default: SLIC of ``rgb``).
        rgb: Tensor[3, h, w] in [0, 1] for SLIC (needed unless ``segments`` is given).
        n_segments, compactness: SLIC settings.
        fill: the normalised value masked pixels take, a number or Tensor[3] (see the module docstring and
            ``PreparedImage.fill_value``); fill_name: how it is reported.
        batch_size: masked images per forward pass.
        refine: run step 2 (superpixel removal); False stops after the rectangle.
        greedy: ``"exact"`` (the paper's): every round tries every superpixel left in the region;
            ``"lazy"``: after the first round, only the ``batch_size`` superpixels whose removal cost least
            when last tried are re-tried (one forward batch per round; errors change little from round to
            round, so it mostly removes the same superpixels at a fraction of the cost). Either way every
            accepted removal is checked against the bound.

    Returns:
        :class:`SaliencyResult`; its ``error`` is always below ``eps``.
    """
    if not (isinstance(eps, (int, float)) and 0 < eps <= 1):
        raise ValueError(f"eps must be in (0, 1], got {eps!r}")
    if not (isinstance(area_step, (int, float)) and 0 < area_step <= 1):
        raise ValueError(f"area_step must be a fraction of the image area in (0, 1], got {area_step!r}")
    if not (isinstance(aspect, (int, float)) and math.isfinite(aspect) and aspect > 0):
        raise ValueError(f"aspect must be a positive width/height ratio, got {aspect!r}")
    if greedy not in ("exact", "lazy"):
        raise ValueError(f"greedy must be 'exact' or 'lazy', got {greedy!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    h, w = int(size[0]), int(size[1])
    fill_t = fill if isinstance(fill, Tensor) else torch.full((x.shape[1],), float(fill))
    ev = _Evaluator(response, x, (h, w), fill_t, batch_size)

    # step 1: a centred rectangle growing by even area increments until the bound holds
    cx, cy = center
    mx, my = max(cx, w - cx, 1.0), max(cy, h - cy, 1.0)  # the rectangle covers the image at this area
    full = math.ceil(max(4 * mx * mx / aspect, 4 * my * my * aspect) / (area_step * h * w)) + 1
    areas, errors = [], []
    found = None
    t = 1
    while found is None:
        ts = list(range(t, t + batch_size))
        rects = []
        for ti in ts:
            area = ti * area_step * h * w
            rw, rh = math.sqrt(area * aspect), math.sqrt(area / aspect)
            rects.append(rectangle_mask((h, w), (cx, cy), rw, rh))
        errs = ev.errors([m for m, _ in rects])
        for ti, (m, box), e in zip(ts, rects, errs):
            areas.append(ti * area_step * h * w)
            errors.append(float(e))
            if e < eps:
                found = (m, box, float(e))
                break
            if m.all():  # the whole image: the unmasked response, error 0 up to rounding
                found = (m, box, float(e))
                break
        t += batch_size
        if t > full + batch_size:  # cannot happen (the image itself satisfies the bound); guard all the same
            break
    if found is None:
        raise RuntimeError("the rectangle covered the image without meeting the error bound")
    rect_mask, rect, rect_error = found
    result = SaliencyResult(mask=rect_mask.copy(), error=rect_error, rect=rect, rect_mask=rect_mask,
                            rect_error=rect_error, rect_areas=areas, rect_errors=errors, eps=float(eps),
                            area_step=float(area_step), fill=fill_name)
    if not rect_error < eps:  # only when even the whole image misses the bound (non-deterministic model)
        result.forwards = ev.forwards
        return result

    # step 2: greedily remove the superpixel (inside the region) that raises the error least
    if refine:
        if segments is None:
            if rgb is None:
                raise ValueError("rgb (Tensor[3, h, w]) is needed for SLIC superpixels when segments is None")
            segments = slic_segments(rgb, n_segments, compactness)
        if segments.shape != (h, w):
            raise ValueError(f"segments must have the image's shape {(h, w)}, got {segments.shape}")
        mask = rect_mask.copy()
        last: dict = {}  # superpixel id -> its removal error when last evaluated (lazy greedy)
        while True:
            ids = np.unique(segments[mask])
            if len(ids) == 0:
                break
            if greedy == "lazy" and last:  # re-evaluate only the previously most removable candidates
                ids = np.array(sorted(ids, key=lambda s: last.get(int(s), -1.0))[:batch_size])
            candidates = [mask & (segments != s) for s in ids]
            errs = ev.errors(candidates)
            last.update({int(s): float(e) for s, e in zip(ids, errs)})
            best = int(np.argmin(errs))
            if not errs[best] < eps:
                break
            mask = candidates[best]
            result.removed.append(int(ids[best]))
            result.removed_errors.append(float(errs[best]))
        result.mask = mask
        result.error = result.removed_errors[-1] if result.removed else rect_error
    result.forwards = ev.forwards
    return result
