"""Modulated deformable convolution (DCNv2, eq. 1 of the paper); DCNv1 without the mask."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dcnv2.ops import _checks, _layout, reference
from dcnv2.ops import triton as _triton
from dcnv2.ops._native import HAS_NATIVE
from dcnv2.ops.trace_mode import in_torchvision_form

__all__ = ["deform_conv2d"]


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _checks.IntPair = (1, 1),
    padding: _checks.IntPair = (0, 0),
    dilation: _checks.IntPair = (1, 1),
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Deformable convolution, v1 (``mask=None``) or modulated v2, as ``torchvision.ops.deform_conv2d``.

    ``y(p) = sum_k w_k * x(p + p_k + dp_k) * dm_k`` with bilinear sampling, zero outside the map.

    Args:
        input: Tensor[N, C, H, W].
        offset: Tensor[N, 2 * OG * kh * kw, Ho, Wo]. For offset group og and tap k = i * kw + j,
            channel og * 2K + 2k is the row offset dy and og * 2K + 2k + 1 the column offset dx.
            The number of offset groups OG is inferred from the channel count.
        weight: Tensor[Cout, C / groups, kh, kw]; ``groups`` is inferred from C.
        bias: Tensor[Cout] or None.
        stride, padding, dilation: int or (int, int).
        mask: Tensor[N, OG * kh * kw, Ho, Wo] modulation scalars, or None for DCNv1.

    Returns:
        Tensor[N, Cout, Ho, Wo].

    Runs the C++ kernel on CPU; on CUDA the Triton kernel (``DCNV2_CUDA_BACKEND=triton``, the
    default), torchvision's kernel (``torchvision``) or the reference (``reference``); the pure-PyTorch
    reference elsewhere. NaN/inf sampling positions read as zero; NaN in the input or mask stays in the
    outputs it reaches.
    """
    stride = _checks.pair("stride", stride)
    padding = _checks.pair("padding", padding)
    dilation = _checks.pair("dilation", dilation)
    input, offset, weight, bias, mask = _autocast_inputs(input, offset, weight, bias, mask)
    groups, offset_groups = _validate(input, offset, weight, bias, stride, padding, dilation, mask)

    backend = "torchvision" if in_torchvision_form() else backend_for(input)
    if backend == "torchvision":
        import torchvision

        return torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    if backend in ("native", "triton"):  # the registered op: C++ on CPU, Triton on CUDA
        return torch.ops.dcnv2.deform_conv2d(
            input, weight, offset, mask, bias, list(stride), list(padding), list(dilation), groups, offset_groups
        )
    return reference.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)


def _device_type(t: Tensor) -> str:
    return t.device.type


def backend_for(input: Tensor) -> str:
    """Which implementation runs ``deform_conv2d`` on ``input``'s device.

    Returns:
        "native" (the C++ kernel, CPU), "triton" (CUDA; the Triton kernels are registered on the way),
        "torchvision" (CUDA, by choice or when Triton is unavailable) or "reference".
    """
    device = _device_type(input)
    if device == "cuda":
        return _triton.resolve_cuda_backend()
    return "native" if device == "cpu" and HAS_NATIVE else "reference"


def _validate(input, offset, weight, bias, stride, padding, dilation, mask):
    """Checks every argument and returns (groups, offset_groups)."""
    _checks.tensor("input", input, 4)
    _checks.tensor("weight", weight, 4, like=input)
    _checks.tensor("offset", offset, 4, like=input)
    if mask is not None:
        _checks.tensor("mask", mask, 4, like=input)
    if bias is not None:
        _checks.tensor("bias", bias, 1, like=input)
    if min(stride) <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(dilation) <= 0:
        raise ValueError(f"dilation must be positive, got {dilation}")
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")

    N, C, H, W = input.shape
    Cout, Cg, kh, kw = weight.shape
    if C == 0 or Cout == 0 or Cg == 0:
        raise ValueError(f"channels must be positive: input has {C}, weight has shape {tuple(weight.shape)}")
    if kh == 0 or kw == 0:
        raise ValueError(f"kernel size must be positive, weight has shape {tuple(weight.shape)}")
    if C % Cg != 0:
        raise ValueError(f"weight.shape[1]={Cg} (in_channels / groups) must divide input channels {C}")
    groups = C // Cg
    if Cout % groups != 0:
        raise ValueError(f"groups={groups} (input channels {C} / weight.shape[1] {Cg}) must divide out_channels {Cout}")
    if bias is not None and bias.shape[0] != Cout:
        raise ValueError(f"bias must have shape ({Cout},) (out_channels), got {tuple(bias.shape)}")

    Ho = (H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    Wo = (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError(
            f"output size must be positive, got {Ho}x{Wo} for input {H}x{W}, kernel {kh}x{kw}, "
            f"stride {stride}, padding {padding}, dilation {dilation}"
        )
    K = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * K) != 0:
        raise ValueError(
            f"offset must have 2 * offset_groups * kh * kw channels, a positive multiple of {2 * K}, "
            f"got {offset.shape[1]} (shape {tuple(offset.shape)})"
        )
    offset_groups = offset.shape[1] // (2 * K)
    if C % offset_groups != 0:
        raise ValueError(f"offset_groups={offset_groups} (from offset channels {offset.shape[1]}) must divide input channels {C}")
    _checks.shape("offset", offset, (N, 2 * offset_groups * K, Ho, Wo), "batch, 2*offset_groups*kh*kw, Ho, Wo")
    if mask is not None:
        _checks.shape("mask", mask, (N, offset_groups * K, Ho, Wo), "batch, offset_groups*kh*kw, Ho, Wo")
    return groups, offset_groups


if HAS_NATIVE:

    @torch.library.register_fake("dcnv2::deform_conv2d")
    def _fake(input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups):
        N, _, H, W = input.shape
        _, _, kh, kw = weight.shape
        Ho = (H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
        Wo = (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
        return input.new_empty((N, weight.shape[0], Ho, Wo)).contiguous(memory_format=_layout.format_of(input))

    @torch.library.register_fake("dcnv2::_deform_conv2d_backward")
    def _fake_backward(grad, input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups,
                       output_mask=(True, True, True)):
        empty = input.new_empty((0,))
        return (  # each gradient in its tensor's layout
            torch.empty_like(input, memory_format=_layout.format_of(input)),
            torch.empty_like(weight, memory_format=_layout.format_of(weight)),
            torch.empty_like(offset, memory_format=_layout.format_of(offset)),
            torch.empty_like(mask, memory_format=_layout.format_of(mask)) if mask is not None else empty,
            input.new_empty((weight.shape[0],)) if bias is not None else empty,
        )

    def _setup_context(ctx, inputs, output):
        input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups = inputs
        ctx.save_for_backward(input, weight, offset, mask, bias)
        ctx.conf = (stride, padding, dilation, groups, offset_groups)

    def _backward(ctx, grad):
        input, weight, offset, mask, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        # only what autograd asks for: a frozen layer (input only), an ERF pass, fixed offsets (weight only)
        output_mask = [bool(need[0]), bool(need[1]), bool(need[2] or need[3])]
        g_in, g_w, g_off, g_mask, g_b = torch.ops.dcnv2._deform_conv2d_backward(
            grad, input, weight, offset, mask, bias, *ctx.conf, output_mask
        )
        return (
            g_in if need[0] else None,
            g_w if need[1] else None,
            g_off if need[2] else None,
            g_mask if mask is not None and need[3] else None,
            g_b if bias is not None and need[4] else None,
            None, None, None, None, None,
        )

    torch.library.register_autograd("dcnv2::deform_conv2d", _backward, setup_context=_setup_context)


# devices with an autocast mode (meta and other backends have none: asking raises)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla")


def _autocast_inputs(input, offset, weight, bias, mask):
    """Under autocast, the op runs like a conv in the autocast dtype (bfloat16 / float16, accumulating in
    float32): a float32 weight meets the low-precision activations of a mixed-precision model."""
    device = input.device.type if isinstance(input, Tensor) else "cpu"
    if device not in _AUTOCAST_DEVICES or not (isinstance(input, Tensor) and input.is_floating_point()
                                                and torch.is_autocast_enabled(device)):
        return input, offset, weight, bias, mask
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

    return cast(input), cast(offset), cast(weight), cast(bias), cast(mask)
