"""Modulated deformable RoI pooling (DCNv2, eq. 2 of the paper); DCNv1 without the mask."""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from dcnv2.ops import _checks, reference
from dcnv2.ops import triton as _triton
from dcnv2.ops._native import HAS_NATIVE
from dcnv2.ops.trace_mode import in_torchvision_form

__all__ = ["deform_roi_pool"]

Rois = Union[Tensor, Sequence[Tensor]]


def deform_roi_pool(
    input: Tensor,
    rois: Rois,
    offset: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    output_size: _checks.IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    gamma: float = 0.1,
    aligned: bool = True,
) -> Tensor:
    """(Modulated) deformable RoI pooling; with ``offset=None`` and ``mask=None`` it is RoIAlign.

    Each bin (i, j) of a RoI averages a grid of bilinear samples exactly as
    ``torchvision.ops.roi_align`` does, after moving the whole bin by
    ``gamma * offset[k, 0, i, j] * roi_width`` in x and ``gamma * offset[k, 1, i, j] * roi_height``
    in y (mmcv's normalised layout); the mask then multiplies the bin's average.

    Args:
        input: Tensor[N, C, H, W].
        rois: Tensor[K, 5] rows (batch index, x1, y1, x2, y2) in input-image coordinates, or a list of
            N Tensor[L_n, 4] boxes (x1, y1, x2, y2), one per image. Coordinates must be finite; boxes
            of zero area or outside the map are fine.
        offset: Tensor[K, 2, ph, pw] normalised offsets, or None.
        mask: Tensor[K, 1, ph, pw] modulation scalars, or None (DCNv1).
        output_size: int or (ph, pw).
        spatial_scale: feature-map size / image size (e.g. 1/16).
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive,
            ``ceil(roi_size / output_size)``.
        gamma: offset scale (0.1 in the paper).
        aligned: shift box coordinates by -0.5 pixel (pixel-centre model), as in roi_align.

    Returns:
        Tensor[K, C, ph, pw].

    Runs the C++ kernel on CPU, the Triton kernel on CUDA (``DCNV2_CUDA_BACKEND=triton``, the
    default; ``torchvision`` and ``reference`` select the pure-PyTorch reference, torchvision having
    no deformable RoI pooling) and the reference elsewhere. NaN/inf sampling positions (from the
    offsets) read as zero.
    """
    output_size = _checks.pair("output_size", output_size)
    # no ONNX (or torchvision) op: export a decomposition into standard ops
    if torch.onnx.is_in_onnx_export() or in_torchvision_form():
        from dcnv2.ops import traceable

        return traceable.deform_roi_pool(input, rois_to_tensor(rois, input), offset, mask, output_size,
                                         float(spatial_scale), int(sampling_ratio), float(gamma), bool(aligned))
    rois = _validate(input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma, aligned)
    if backend_for(input) in ("native", "triton"):  # the registered op: C++ on CPU, Triton on CUDA
        return torch.ops.dcnv2.deform_roi_pool(
            input, rois, offset, mask, output_size[0], output_size[1], float(spatial_scale),
            int(sampling_ratio), float(gamma), bool(aligned),
        )
    return reference.deform_roi_pool(
        input, rois, offset, mask, output_size, float(spatial_scale), int(sampling_ratio), float(gamma), bool(aligned)
    )


def _device_type(t: Tensor) -> str:
    return t.device.type


def backend_for(input: Tensor) -> str:
    """Which implementation runs ``deform_roi_pool`` on ``input``'s device.

    Returns:
        "native" (the C++ kernel, CPU), "triton" (CUDA; the Triton kernels are registered on the way)
        or "reference" (other devices, or CUDA by choice or without Triton).
    """
    device = _device_type(input)
    if device == "cuda":
        return "triton" if _triton.resolve_cuda_backend() == "triton" else "reference"
    return "native" if device == "cpu" and HAS_NATIVE else "reference"


def rois_to_tensor(rois: Rois, input: Tensor) -> Tensor:
    """Checks ``rois`` (Tensor[K, 5] or a list of N Tensor[L, 4]) and returns Tensor[K, 5]."""
    N = input.shape[0]
    if isinstance(rois, Tensor):
        _checks.tensor("rois", rois, 2, like=input)
        if rois.shape[1] != 5:
            raise ValueError(
                f"rois must have shape (K, 5) (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}"
            )
        return rois
    if not isinstance(rois, (list, tuple)):
        raise TypeError(f"rois must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(rois).__name__}")
    if len(rois) != N:
        raise ValueError(f"rois as a list must hold one Tensor[L, 4] per image: expected {N}, got {len(rois)}")
    rows: List[Tensor] = []
    for n, boxes in enumerate(rois):
        _checks.tensor(f"rois[{n}]", boxes, 2, like=input)
        if boxes.shape[1] != 4:
            raise ValueError(f"rois[{n}] must have shape (L, 4) (x1, y1, x2, y2), got {tuple(boxes.shape)}")
        rows.append(torch.cat([torch.full_like(boxes[:, :1], n), boxes], dim=1))
    return torch.cat(rows, dim=0) if rows else input.new_zeros((0, 5))


def _validate(input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma, aligned) -> Tensor:
    """Checks every argument and returns the RoIs as Tensor[K, 5]."""
    _checks.tensor("input", input, 4)
    rois = rois_to_tensor(rois, input)
    ph, pw = output_size
    if ph <= 0 or pw <= 0:
        raise ValueError(f"output_size must be positive, got {output_size}")
    if not _real(spatial_scale) or not (spatial_scale > 0 and math.isfinite(spatial_scale)):
        raise ValueError(f"spatial_scale must be a positive finite number, got {spatial_scale!r}")
    if not isinstance(sampling_ratio, (int, torch.SymInt)) or isinstance(sampling_ratio, bool):
        raise TypeError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    if not _real(gamma) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be a bool, got {aligned!r}")
    K = rois.shape[0]
    if offset is not None:
        _checks.tensor("offset", offset, 4, like=input)
        _checks.shape("offset", offset, (K, 2, ph, pw), "rois, xy, pooled height, pooled width")
    if mask is not None:
        _checks.tensor("mask", mask, 4, like=input)
        _checks.shape("mask", mask, (K, 1, ph, pw), "rois, 1, pooled height, pooled width")
    if not torch.compiler.is_compiling() and K > 0:  # value checks (the C++ kernel repeats them)
        _check_roi_values(rois, input.shape[0])
    return rois


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_roi_values(rois: Tensor, N: int) -> None:
    bad = ~torch.isfinite(rois[:, 1:]).all(dim=1)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(f"rois must have finite coordinates, got {rois[k].tolist()} in row {k}")
    idx = rois[:, 0]
    bad = ~((idx >= 0) & (idx < N) & (idx == idx.floor()))
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(
            f"rois[{k}, 0] (batch index) must be an integer in [0, {N}) (input batch size), got {idx[k].item()}"
        )


if HAS_NATIVE:

    @torch.library.register_fake("dcnv2::deform_roi_pool")
    def _fake(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma, aligned):
        return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))

    @torch.library.register_fake("dcnv2::_deform_roi_pool_backward")
    def _fake_backward(grad, input, rois, offset, mask, *conf):
        empty = input.new_empty((0,))
        return (
            torch.empty_like(input, memory_format=torch.contiguous_format),
            torch.empty_like(offset, memory_format=torch.contiguous_format) if offset is not None else empty,
            torch.empty_like(mask, memory_format=torch.contiguous_format) if mask is not None else empty,
        )

    def _setup_context(ctx, inputs, output):
        input, rois, offset, mask, *conf = inputs
        ctx.save_for_backward(input, rois, offset, mask)
        ctx.conf = conf

    def _backward(ctx, grad):
        input, rois, offset, mask = ctx.saved_tensors
        g_in, g_off, g_mask = torch.ops.dcnv2._deform_roi_pool_backward(grad, input, rois, offset, mask, *ctx.conf)
        return (
            g_in,
            None,  # the RoI coordinates get no gradient, as in roi_align
            g_off if offset is not None else None,
            g_mask if mask is not None else None,
            None, None, None, None, None, None,
        )

    torch.library.register_autograd("dcnv2::deform_roi_pool", _backward, setup_context=_setup_context)
