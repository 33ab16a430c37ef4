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


def roi_bilinear(img_cl: Tensor, batch: Tensor, y: Tensor, x: Tensor, H: int, W: int) -> Tensor:
    """Bilinear samples with torchvision's roi_align border rule.

    Args:
        img_cl: Tensor[N * H * W, C], the input in channels-last rows.
        batch: Tensor[K] (long) image of each RoI.
        y, x: Tensor[K, ...] sampling positions in pixels.

    Returns:
        Tensor[K, ..., C]. A sample outside [-1, H] x [-1, W] (NaN included) is 0; coordinates below 0
        clamp to 0 and those past the last row/column clamp to it (zero gradient along a clamped axis).
    """
    valid = (y >= -1) & (y <= H) & (x >= -1) & (x <= W) & (H > 0) & (W > 0)
    zero = torch.zeros_like(y)
    y = torch.where(valid & (y > 0), y, zero)
    x = torch.where(valid & (x > 0), x, zero)
    y0 = torch.floor(y).long()
    x0 = torch.floor(x).long()
    y_last, x_last = y0 >= H - 1, x0 >= W - 1
    y0 = torch.where(y_last, torch.full_like(y0, max(H - 1, 0)), y0)
    x0 = torch.where(x_last, torch.full_like(x0, max(W - 1, 0)), x0)
    y1 = torch.where(y_last, y0, y0 + 1)
    x1 = torch.where(x_last, x0, x0 + 1)
    y = torch.where(y_last, y0.to(y.dtype), y)
    x = torch.where(x_last, x0.to(x.dtype), x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    base = batch.view((-1,) + (1,) * (y.dim() - 1)) * (H * W)
    out = 0
    for yy, xx, w in ((y0, x0, hy * hx), (y0, x1, hy * lx), (y1, x0, ly * hx), (y1, x1, ly * lx)):
        out = out + img_cl[base + yy * W + xx] * w.unsqueeze(-1)
    return torch.where(valid.unsqueeze(-1), out, torch.zeros_like(out))


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    output_size: Tuple[int, int] = (7, 7),
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    gamma: float = 0.1,
    aligned: bool = True,
) -> Tensor:
    """Reference (modulated) deformable RoI pooling (same contract as ``dcnv2.ops.deform_roi_pool``).

    Args:
        input: Tensor[N, C, H, W].
        rois: Tensor[K, 5] rows (batch index, x1, y1, x2, y2), finite, batch index in [0, N).
        offset: Tensor[K, 2, ph, pw] or None; bin (i, j) moves by gamma * offset[:, 0, i, j] * roi
            width in x and gamma * offset[:, 1, i, j] * roi height in y.
        mask: Tensor[K, 1, ph, pw] or None; multiplies each bin's average.
        output_size: (ph, pw).
        spatial_scale, sampling_ratio, aligned: as in ``torchvision.ops.roi_align`` (sampling_ratio
            <= 0: adaptive, ceil(roi size / bins) samples per bin).
        gamma: offset scale.

    Returns:
        Tensor[K, C, ph, pw].
    """
    N, C, H, W = input.shape
    PH, PW = output_size
    K = rois.shape[0]
    dt, dev = input.dtype, input.device
    rois = rois.to(dt)
    shift = 0.5 if aligned else 0.0
    batch = rois[:, 0].long()
    x1 = rois[:, 1] * spatial_scale - shift
    y1 = rois[:, 2] * spatial_scale - shift
    roi_w = rois[:, 3] * spatial_scale - shift - x1
    roi_h = rois[:, 4] * spatial_scale - shift - y1
    if not aligned:  # legacy mode: malformed RoIs become 1x1
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_w, bin_h = roi_w / PW, roi_h / PH
    if sampling_ratio > 0:
        gh = gw = torch.full((K,), sampling_ratio, dtype=torch.long, device=dev)
    else:
        gh, gw = torch.ceil(roi_h / PH).long(), torch.ceil(roi_w / PW).long()
    count = (gh * gw).clamp(min=1).to(dt)
    gh, gw = gh.clamp(min=0), gw.clamp(min=0)

    # bin origins [K, PH, PW], shifted by the offsets
    i = torch.arange(PH, device=dev, dtype=dt).view(1, PH, 1)
    j = torch.arange(PW, device=dev, dtype=dt).view(1, 1, PW)
    oy = (y1.view(K, 1, 1) + i * bin_h.view(K, 1, 1)).expand(K, PH, PW)
    ox = (x1.view(K, 1, 1) + j * bin_w.view(K, 1, 1)).expand(K, PH, PW)
    if offset is not None:
        ox = ox + gamma * offset[:, 0] * roi_w.view(K, 1, 1)
        oy = oy + gamma * offset[:, 1] * roi_h.view(K, 1, 1)

    img_cl = input.permute(0, 2, 3, 1).reshape(N * H * W, C)
    # zeros tied to the input's graph, so bins without samples (or no RoIs) still give zero gradients
    out = input.new_zeros(K, PH, PW, C) + img_cl[:0].sum() + ox[:0].sum() + oy[:0].sum()
    grids = torch.stack([gh, gw], 1).unique(dim=0).tolist() if K else []
    for g_h, g_w in grids:  # one pass per distinct sample grid (a single one unless adaptive)
        sel = torch.nonzero((gh == g_h) & (gw == g_w)).flatten()
        if g_h == 0 or g_w == 0:
            continue  # no samples: the bins are 0
        sy = (torch.arange(g_h, device=dev, dtype=dt) + 0.5).view(1, 1, 1, g_h, 1) / g_h
        sx = (torch.arange(g_w, device=dev, dtype=dt) + 0.5).view(1, 1, 1, 1, g_w) / g_w
        y = oy[sel].unsqueeze(-1).unsqueeze(-1) + sy * bin_h[sel].view(-1, 1, 1, 1, 1)
        x = ox[sel].unsqueeze(-1).unsqueeze(-1) + sx * bin_w[sel].view(-1, 1, 1, 1, 1)
        y, x = torch.broadcast_tensors(y, x)  # [k, PH, PW, gh, gw]
        vals = roi_bilinear(img_cl, batch[sel], y, x, H, W)  # [k, PH, PW, gh, gw, C]
        pooled = vals.sum(dim=(3, 4)) / count[sel].view(-1, 1, 1, 1)
        out = out.index_copy(0, sel, pooled)
    if mask is not None:
        out = out * mask.permute(0, 2, 3, 1)
    return out.permute(0, 3, 1, 2).contiguous()
