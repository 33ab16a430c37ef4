"""The memory-format rule of the ``dcnv2::deform_conv2d`` op, shared by its fake kernels and its CUDA wrapper.

A channels-last input gets a channels-last output, and each gradient takes the layout of the tensor it
belongs to, as torch's convolutions do; the CPU kernel applies the same rule (``is_channels_last`` in
``csrc/cpu/deform_conv2d.cpp``), so a channels-last model runs without layout copies around each layer.
"""
from __future__ import annotations

import torch
from torch import Tensor


def is_channels_last(t: Tensor) -> bool:
    """Laid out channels-last and not also plain contiguous (a 1-channel tensor or a 1x1 map is both)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def format_of(t: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def like(result: Tensor, t: Tensor) -> Tensor:
    """result (a 4-D tensor shaped like t, or the empty placeholder of a gradient not computed) in t's layout."""
    return result.contiguous(memory_format=format_of(t)) if result.dim() == 4 else result
