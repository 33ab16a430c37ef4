"""ONNX symbolic functions for the ``torch.ops.dcnv2`` operators (TorchScript-based exporter).

* ``dcnv2::deform_conv2d`` becomes the standard ONNX ``DeformConv`` (opset >= 19), which ONNX Runtime
  (>= 1.20 on CPU) runs. No layout conversion is needed, and this module states why: ONNX reshapes the
  offset input to ``(N, offset_group, kH, kW, 2, oH, oW)`` with the last-but-two axis ``(h, w)`` and the
  mask to ``(N, offset_group, kH, kW, oH, oW)`` (``onnx.reference.ops.op_deform_conv``), which is
  torchvision's and our layout (channel ``og * 2K + 2k`` is dy, ``+ 1`` dx, tap ``k = i * kW + j``). Its
  bilinear sampling is ``GridSample(align_corners=1, padding_mode='zeros')`` on pixel positions: zero
  outside the map, corners off the map count as zero, our border rule. The round-trip tests check both.
* ``dcnv2::deform_roi_pool`` has no ONNX counterpart: under ``torch.onnx.export`` the Python op
  dispatches to :mod:`dcnv2.ops.traceable`, a decomposition into Gather / arithmetic that traces into
  standard ONNX ops, so the symbolic registered here is only reached by a direct ``torch.ops`` call and
  says so.

:func:`register` is idempotent and called by every export entry point.
"""
from __future__ import annotations

import torch
from torch.onnx import symbolic_helper

__all__ = ["MIN_OPSET", "register", "check_opset"]

#: The first ONNX opset with DeformConv.
MIN_OPSET = 19

_registered = False


def check_opset(opset: int) -> int:
    """Returns ``opset`` if it has DeformConv, else raises ValueError naming the minimum."""
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise TypeError(f"opset must be an int, got {opset!r}")
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is too old: deform_conv2d exports to the standard ONNX DeformConv, which needs "
            f"opset >= {MIN_OPSET}; pass opset={MIN_OPSET} or newer"
        )
    return opset


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "is", "is", "is", "i", "i")
def _deform_conv2d(g, input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups):
    inputs = [input, weight, offset]
    has_bias = not symbolic_helper._is_none(bias)
    has_mask = not symbolic_helper._is_none(mask)
    if has_bias:
        inputs.append(bias)
    elif has_mask:  # DeformConv's optional inputs are positional (B before mask): give a zero bias
        cout = g.op("Slice", g.op("Shape", weight), g.op("Constant", value_t=torch.tensor([0])),
                    g.op("Constant", value_t=torch.tensor([1])))
        zero = g.op("Mul", g.op("ReduceSum", weight, keepdims_i=0), g.op("Constant", value_t=torch.tensor(0.0)))
        inputs.append(g.op("Expand", g.op("CastLike", zero, input), cout))
    if has_mask:
        inputs.append(mask)
    attrs = dict(strides_i=list(stride), pads_i=[padding[0], padding[1], padding[0], padding[1]],
                 dilations_i=list(dilation), group_i=groups, offset_group_i=offset_groups)
    sizes = symbolic_helper._get_tensor_sizes(weight)
    if sizes is not None and len(sizes) == 4 and all(isinstance(s, int) for s in sizes[2:]):
        attrs["kernel_shape_i"] = list(sizes[2:])
    return g.op("DeformConv", *inputs, **attrs)


def _too_old(g, *args):
    raise ValueError(
        f"opset {g.opset} is too old for deform_conv2d: it exports to the standard ONNX DeformConv, which needs "
        f"opset >= {MIN_OPSET}"
    )


def _roi_pool_direct(g, *args):
    raise RuntimeError(
        "torch.ops.dcnv2.deform_roi_pool called directly has no ONNX form; call dcnv2.ops.deform_roi_pool "
        "(or the dcnv2.nn layers), which export as a decomposition into standard ONNX ops"
    )


def register() -> None:
    """Registers the symbolic functions with ``torch.onnx`` (once per process)."""
    global _registered
    if _registered:
        return
    from dcnv2.ops import _native  # noqa: F401  (the schemas must exist before symbolics refer to them)

    torch.onnx.register_custom_op_symbolic("dcnv2::deform_conv2d", _too_old, 9)
    torch.onnx.register_custom_op_symbolic("dcnv2::deform_conv2d", _deform_conv2d, MIN_OPSET)
    torch.onnx.register_custom_op_symbolic("dcnv2::deform_roi_pool", _roi_pool_direct, 9)
    _registered = True
