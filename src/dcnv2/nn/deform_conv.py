"""Deformable convolution layers: DCNv1 (``DeformConv2d``) and modulated DCNv2 (``ModulatedDeformConv2d``).

Each layer owns the sibling convolution that predicts its offsets (and masks) from the same input,
with the same kernel size, stride, padding and dilation, zero-initialised so that a fresh layer is a
plain convolution (offsets 0; for DCNv2 masks sigmoid(0) = 0.5).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from dcnv2.ops import deform_conv2d

__all__ = ["DeformConv2d", "ModulatedDeformConv2d"]

_size = Union[int, Tuple[int, int]]


class _DeformConvBase(nn.Module):
    """Holds ``weight``/``bias`` exactly like ``nn.Conv2d`` so regular conv weights load unchanged."""

    offset_channels_per_tap: int  # 2 for DCNv1 (dy, dx), 3 for DCNv2 (dy, dx, mask)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size,
        stride: _size = 1,
        padding: _size = 0,
        dilation: _size = 1,
        groups: int = 1,
        bias: bool = True,
        offset_groups: int = 1,
    ) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups),
                        ("offset_groups", offset_groups)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if in_channels % offset_groups:
            raise ValueError(f"offset_groups={offset_groups} must divide in_channels={in_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.offset_groups = offset_groups
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(
            in_channels,
            self.offset_channels_per_tap * offset_groups * taps,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Main weights as ``nn.Conv2d``; the offset/mask conv at zero (offsets 0, masks 0.5)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_branch(self) -> nn.Module:
        """The submodule predicting offsets/masks (trained at 0.1x lr by ``dcnv2.nn.param_groups``)."""
        return self.conv_offset

    def offset_and_mask(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Returns the predicted offsets Tensor[N, 2*OG*K, Ho, Wo] and masks Tensor[N, OG*K, Ho, Wo] (or None)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Args: x Tensor[N, in_channels, H, W]. Returns Tensor[N, out_channels, Ho, Wo]."""
        offset, mask = self.offset_and_mask(x)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class DeformConv2d(_DeformConvBase):
    """DCNv1 deformable convolution with its own zero-initialised offset conv (``conv_offset``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``.
        offset_groups: number of offset groups OG; each group of in_channels/OG channels gets its own offsets.
    """

    offset_channels_per_tap = 2

    def offset_and_mask(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        return self.conv_offset(x), None


class ModulatedDeformConv2d(_DeformConvBase):
    """DCNv2 modulated deformable convolution.

    ``conv_offset`` produces 3*OG*K channels: the first 2*OG*K are offsets (the layout of
    ``dcnv2.ops.deform_conv2d``), the last OG*K pass through a sigmoid to become the masks.
    Zero-initialised, so a fresh layer samples the regular grid with masks 0.5.
    """

    offset_channels_per_tap = 3

    def offset_and_mask(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        out = self.conv_offset(x)
        split = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        return out[:, :split], torch.sigmoid(out[:, split:])
