"""Trace-friendly decompositions of the dcnv2 operators, for exporters that have no kernel of ours.

``torch.onnx.export`` (TorchScript-based) records the Python ops it sees. ``deform_conv2d`` has a standard
ONNX counterpart (``DeformConv``, see :mod:`dcnv2.export.onnx_ops`); ``deform_roi_pool`` does not, so under
ONNX export :func:`dcnv2.ops.deform_roi_pool` calls :func:`deform_roi_pool` here instead of the C++ kernel.
Unlike :func:`dcnv2.ops.reference.deform_roi_pool` it has no data-dependent Python control flow: one
vectorised pass over a fixed ``sampling_ratio x sampling_ratio`` grid per bin, sizes taken from tensors so a
traced graph generalises over input sizes and RoI counts (zero RoIs included). It computes exactly what the
kernel computes (torchvision's roi_align border rule), in the input's dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["deform_roi_pool"]


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor],
    mask: Optional[Tensor],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool,
) -> Tensor:
    """(Modulated) deformable RoI pooling with a fixed sample grid, written for tracing.

    Args:
        input: Tensor[N, C, H, W].
        rois: Tensor[K, 5] (batch index, x1, y1, x2, y2).
        offset: Tensor[K, 2, ph, pw] normalised offsets (x then y) or None.
        mask: Tensor[K, 1, ph, pw] or None.
        output_size: (ph, pw).
        spatial_scale, gamma, aligned: as :func:`dcnv2.ops.deform_roi_pool`.
        sampling_ratio: samples per bin along each axis; must be positive (the adaptive grid,
            ``ceil(roi size / bins)``, depends on the RoI values and has no fixed-graph form).

    Returns:
        Tensor[K, C, ph, pw].

    Raises:
        ValueError: ``sampling_ratio <= 0``.
    """
    if not sampling_ratio > 0:
        raise ValueError(
            f"sampling_ratio must be positive to export deform_roi_pool (the adaptive grid, sampling_ratio <= 0, "
            f"depends on each RoI's size), got {sampling_ratio}"
        )
    PH, PW = output_size
    s = int(sampling_ratio)
    C, H, W = input.shape[1], input.shape[2], input.shape[3]
    dt = input.dtype
    rois = rois.to(dt)
    shift = 0.5 if aligned else 0.0
    batch = rois[:, 0].to(torch.int64)
    x1 = rois[:, 1] * spatial_scale - shift
    y1 = rois[:, 2] * spatial_scale - shift
    roi_w = rois[:, 3] * spatial_scale - shift - x1
    roi_h = rois[:, 4] * spatial_scale - shift - y1
    if not aligned:  # legacy mode: malformed RoIs become 1x1
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_w, bin_h = roi_w / PW, roi_h / PH

    i = torch.arange(PH, dtype=dt, device=input.device).view(1, PH, 1)
    j = torch.arange(PW, dtype=dt, device=input.device).view(1, 1, PW)
    oy = y1.view(-1, 1, 1) + i * bin_h.view(-1, 1, 1)  # [K, PH, 1]
    ox = x1.view(-1, 1, 1) + j * bin_w.view(-1, 1, 1)  # [K, 1, PW]
    if offset is not None:
        ox = ox + gamma * offset[:, 0] * roi_w.view(-1, 1, 1)
        oy = oy + gamma * offset[:, 1] * roi_h.view(-1, 1, 1)
    g = (torch.arange(s, dtype=dt, device=input.device) + 0.5) / s
    y = oy.unsqueeze(-1).unsqueeze(-1) + g.view(1, 1, 1, s, 1) * bin_h.view(-1, 1, 1, 1, 1)
    x = ox.unsqueeze(-1).unsqueeze(-1) + g.view(1, 1, 1, 1, s) * bin_w.view(-1, 1, 1, 1, 1)
    y, x = y + torch.zeros_like(x), x + torch.zeros_like(y)  # broadcast both to [K, PH, PW, s, s]

    img = input.permute(0, 2, 3, 1).reshape(-1, C)  # [N*H*W, C] channels-last rows
    vals = _roi_bilinear(img, batch, y, x, H, W)  # [K, PH, PW, s, s, C]
    out = vals.sum(dim=(3, 4)) / float(s * s)
    if mask is not None:
        out = out * mask.permute(0, 2, 3, 1)
    return out.permute(0, 3, 1, 2)


def _roi_bilinear(img: Tensor, batch: Tensor, y: Tensor, x: Tensor, H, W) -> Tensor:
    """torchvision roi_align's bilinear sample, vectorised: Tensor[K, ...] positions -> Tensor[K, ..., C].

    Outside [-1, H] x [-1, W] (NaN included) reads 0; coordinates below 0 clamp to 0, those at or past the
    last row/column clamp to it. ``H`` and ``W`` may be ints or (when traced) 0-d tensors.
    """
    valid = (y >= -1) & (y <= H) & (x >= -1) & (x <= W)
    zero = torch.zeros_like(y)
    y = torch.where(valid & (y > 0), y, zero)
    x = torch.where(valid & (x > 0), x, zero)
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    y_last = y0 >= H - 1
    x_last = x0 >= W - 1
    y0 = torch.where(y_last, zero + (H - 1), y0)
    x0 = torch.where(x_last, zero + (W - 1), x0)
    y = torch.where(y_last, y0, y)
    x = torch.where(x_last, x0, x)
    y1 = torch.where(y_last, y0, y0 + 1)
    x1 = torch.where(x_last, x0, x0 + 1)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    base = (batch * (H * W)).view((-1,) + (1,) * (y.dim() - 1))
    y0, y1, x0, x1 = y0.to(torch.int64), y1.to(torch.int64), x0.to(torch.int64), x1.to(torch.int64)
    C = img.shape[1]
    out = None
    for yy, xx, w in ((y0, x0, hy * hx), (y0, x1, hy * lx), (y1, x0, ly * hx), (y1, x1, ly * lx)):
        idx = (base + yy * W + xx).reshape(-1)
        v = _gather_rows(img, idx, y, C)
        term = v * w.unsqueeze(-1)
        out = term if out is None else out + term
    return torch.where(valid.unsqueeze(-1), out, torch.zeros_like(out))


def _gather_rows(img: Tensor, idx: Tensor, like: Tensor, C) -> Tensor:
    """``img[idx]`` reshaped to ``like.shape + (C,)``; -1 for the RoI axis so zero RoIs trace too."""
    rows = img.index_select(0, idx)
    return rows.reshape((-1,) + tuple(like.shape[1:]) + (C,))
