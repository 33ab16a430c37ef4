"""Pure-PyTorch reference implementations of the dcnv2 operators.

Written for clarity, not speed: they are the test oracle of the C++ kernels and the path on devices
without a native kernel. Autograd differentiates them, so they need no backward of their own.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def bilinear_gather(img: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Bilinearly samples ``img`` at real positions, zero outside the map.

    Args:
        img: Tensor[B, C, H, W].
        y, x: Tensor[B, S] sampling positions in pixels (row, column).

    Returns:
        Tensor[B, C, S]. A sample outside (-1, H) x (-1, W) (NaN included) is 0; inside it, corners
        that fall off the map count as 0 (torchvision's and mmcv's border rule).
    """
    B, C, H, W = img.shape
    inside = (y > -1) & (y < H) & (x > -1) & (x < W)
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    y0, x0 = y0.long(), x0.long()
    flat = img.reshape(B, C, H * W)
    out = img.new_zeros(B, C, y.shape[1])
    for dy, dx, w in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        ok = inside & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        idx = torch.where(ok, yy * W + xx, torch.zeros_like(yy))
        v = torch.gather(flat, 2, idx.unsqueeze(1).expand(B, C, -1))
        out = out + torch.where(ok.unsqueeze(1), v * w.unsqueeze(1), torch.zeros_like(v))
    return out


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: Tuple[int, int] = (1, 1),
    padding: Tuple[int, int] = (0, 0),
    dilation: Tuple[int, int] = (1, 1),
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Reference modulated deformable convolution (same contract as ``dcnv2.ops.deform_conv2d``).

    Args:
        input: Tensor[N, C, H, W].
        offset: Tensor[N, 2 * OG * kh * kw, Ho, Wo]; channel 2k is dy and 2k+1 is dx of tap
            k = i * kw + j of offset group og (channels og * 2K ...).
        weight: Tensor[Cout, C / groups, kh, kw].
        bias: Tensor[Cout] or None.
        stride, padding, dilation: pairs of ints.
        mask: Tensor[N, OG * kh * kw, Ho, Wo] or None (DCNv1).

    Returns:
        Tensor[N, Cout, Ho, Wo].
    """
    N, C, H, W = input.shape
    Cout, Cg, kh, kw = weight.shape
    G = C // Cg
    K = kh * kw
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    Ho = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    Wo = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    OG = offset.shape[1] // (2 * K)
    Cog = C // OG

    dev, dt = input.device, input.dtype
    i = torch.arange(kh, device=dev).repeat_interleave(kw)  # tap k = i * kw + j
    j = torch.arange(kw, device=dev).repeat(kh)
    base_y = (torch.arange(Ho, device=dev) * sh - ph).view(1, Ho, 1) + (i * dh).view(K, 1, 1)
    base_x = (torch.arange(Wo, device=dev) * sw - pw).view(1, 1, Wo) + (j * dw).view(K, 1, 1)
    off = offset.reshape(N, OG, K, 2, Ho, Wo)
    y = base_y.to(dt) + off[:, :, :, 0]  # [N, OG, K, Ho, Wo]
    x = base_x.to(dt) + off[:, :, :, 1]

    imgs = input.reshape(N * OG, Cog, H, W)
    S = K * Ho * Wo  # explicit sizes: -1 is ambiguous for an empty batch
    vals = bilinear_gather(imgs, y.reshape(N * OG, S), x.reshape(N * OG, S))  # [N*OG, Cog, K*Ho*Wo]
    vals = vals.reshape(N, OG, Cog, K, Ho * Wo)
    if mask is not None:
        vals = vals * mask.reshape(N, OG, 1, K, Ho * Wo)
    cols = vals.reshape(N, G, Cg * K, Ho * Wo)  # channel-major then tap, matching weight's layout
    w = weight.reshape(G, Cout // G, Cg * K)
    out = torch.einsum("gok,ngkl->ngol", w, cols).reshape(N, Cout, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, Cout, 1, 1)
    return out
