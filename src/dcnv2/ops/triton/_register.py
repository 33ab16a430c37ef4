"""Registers the Triton launch wrappers as the CUDA kernels of the ``torch.ops.dcnv2`` operators.

The schemas, fake kernels and autograd formulas are the ones every device shares (``csrc/ops.cpp``,
``dcnv2/ops/deform_conv.py``, ``dcnv2/ops/deform_roi_pool.py``): autograd calls
``dcnv2::_deform_conv2d_backward`` / ``dcnv2::_deform_roi_pool_backward``, which the dispatcher
then routes to the Triton backward on CUDA tensors.
"""
from __future__ import annotations

import torch

from dcnv2.ops import _layout
from dcnv2.ops.triton import deform_conv, roi_pool

_lib = None  # the Library object must stay alive for the registrations to last


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _conv_fwd(input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups):
    with _device_guard(input):
        out = deform_conv.conv_forward(input, weight, offset, mask, bias, stride, padding, dilation, groups,
                                       offset_groups)
    return _layout.like(out, input)  # the op's layout rule, which the fake kernel states (dcnv2.ops._layout)


def _conv_bwd(grad, input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups,
              output_mask=(True, True, True)):
    # the Triton backward computes every gradient; autograd drops those output_mask leaves out
    with _device_guard(input):
        g_in, g_w, g_off, g_mask, g_b = deform_conv.conv_backward(grad, input, weight, offset, mask, bias, stride,
                                                                  padding, dilation, groups, offset_groups)
    return (_layout.like(g_in, input), _layout.like(g_w, weight), _layout.like(g_off, offset),
            _layout.like(g_mask, mask) if mask is not None else g_mask, g_b)


def _roi_fwd(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma,
             aligned):
    with _device_guard(input):
        return roi_pool.roi_pool_forward(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale,
                                         sampling_ratio, gamma, aligned)


def _roi_bwd(grad, input, rois, offset, mask, pooled_height, pooled_width, spatial_scale, sampling_ratio,
             gamma, aligned):
    with _device_guard(input):
        return roi_pool.roi_pool_backward(grad, input, rois, offset, mask, pooled_height, pooled_width,
                                          spatial_scale, sampling_ratio, gamma, aligned)


KERNELS = {
    "deform_conv2d": _conv_fwd,
    "_deform_conv2d_backward": _conv_bwd,
    "deform_roi_pool": _roi_fwd,
    "_deform_roi_pool_backward": _roi_bwd,
}


def register_cuda_kernels() -> None:
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("dcnv2", "IMPL")
    for name, fn in KERNELS.items():
        lib.impl(name, fn, "CUDA")
    _lib = lib
