"""Triton kernels of (modulated) deformable RoI pooling, forward and backward.

Same semantics as the CPU kernel (``csrc/cpu/deform_roi_pool.cpp``): torchvision's roi_align
sampling grid and border rule (samples outside [-1, H] x [-1, W], NaN included, read 0;
coordinates below 0 clamp to 0, past the last row/column clamp to it, with zero derivative along a
clamped axis); every sample of bin (i, j) moves by (gamma * offset[k, 0, i, j] * roi_w,
gamma * offset[k, 1, i, j] * roi_h); the mask multiplies the bin average. Huge adaptive grids are
walked only where samples can land on the map (the CPU kernel's ``range``).

Forward: one program per (RoI, block of bins, block of channels), a [bins, channels] tile.

Backward: the offset/mask gradients are per-(channel block, RoI, bin) partial sums written by
their owner program and reduced in block order by torch: deterministic. grad_input is a scatter:
- default: the forward's grid, ``tl.atomic_add`` into grad_input (summation order varies run to run);
- under ``torch.use_deterministic_algorithms(True)``: one program per (image, channel block) walks
  that image's RoIs, bins and samples in a fixed order with plain loads and stores. It owns its
  slice of grad_input, so there are no atomics and two runs are bit-identical; it has less
  parallelism (N * C / 32 programs), the price of determinism.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from dcnv2.ops.triton import interpreting

GEO = 9  # per-RoI geometry row: start_h, start_w, roi_h, roi_w, bin_h, bin_w, count, batch index, gamma
WALK_WHOLE = 64  # grids up to this many samples per axis are walked whole (as the CPU kernel)


@triton.jit
def _range(origin, bin_size, g, size, WALK: tl.constexpr):
    """Sample indices [lo, hi) of bins starting at ``origin`` whose positions can lie in [-1, size]."""
    step = bin_size / tl.maximum(g, 1)
    a = (-1.0 - origin) / step - 2.5
    b = (size - origin) / step + 2.0
    finite = (a == a) & (b == b) & (tl.abs(a) < float("inf")) & (tl.abs(b) < float("inf"))
    finite = finite & ((tl.zeros_like(a) + step) > 0)
    gf = g.to(a.dtype)
    lo = tl.where(a > 0, tl.minimum(tl.where(finite, a, 0.0), gf), 0.0).to(tl.int64)
    hi = tl.where(b > 0, tl.minimum(tl.where(finite, b, 0.0), gf), 0.0).to(tl.int64)
    hi = tl.maximum(hi, lo)
    origin_ok = (origin == origin) & (tl.abs(origin) < float("inf"))
    lo = tl.where(finite, lo, 0)
    hi = tl.where(finite, hi, tl.where(origin_ok, g, 0))
    small = g <= WALK
    lo = tl.where(small, 0, lo)
    hi = tl.where(small, g, hi)
    return lo, hi


@triton.jit
def _corners(y, x, H, W):
    """roi_align's bilinear corners of samples y, x ([B]): validity, 4 pixel indices, weights and
    their derivatives w.r.t. y and x."""
    valid = (y >= -1.0) & (y <= H) & (x >= -1.0) & (x <= W)
    y = tl.where(valid & (y > 0), y, 0.0)
    x = tl.where(valid & (x > 0), x, 0.0)
    cy = y <= 0
    cx = x <= 0
    yl = y.to(tl.int64)
    xl = x.to(tl.int64)
    ylast = yl >= H - 1
    xlast = xl >= W - 1
    yl = tl.where(ylast, H - 1, yl)
    xl = tl.where(xlast, W - 1, xl)
    yh = tl.where(ylast, yl, yl + 1)
    xh = tl.where(xlast, xl, xl + 1)
    y = tl.where(ylast, yl.to(y.dtype), y)
    x = tl.where(xlast, xl.to(x.dtype), x)
    ky = tl.where(cy | ylast, 0.0, 1.0)
    kx = tl.where(cx | xlast, 0.0, 1.0)
    ly = y - yl.to(y.dtype)
    lx = x - xl.to(x.dtype)
    hy = 1.0 - ly
    hx = 1.0 - lx
    return (valid, yl * W + xl, yl * W + xh, yh * W + xl, yh * W + xh,
            hy * hx, hy * lx, ly * hx, ly * lx,
            -hx * ky, -lx * ky, hx * ky, lx * ky,
            -hy * kx, hy * kx, -ly * kx, ly * kx)


@triton.jit
def _bin_setup(geo_ptr, grid_ptr, off_ptr, k, bins, bmask, PW, PP, H, W,
               HAS_OFF: tl.constexpr, CDT: tl.constexpr, WALK: tl.constexpr):
    """Per-RoI geometry and per-bin origins and sample ranges of RoI k's bins ([BB])."""
    g = geo_ptr + k * 9
    start_h = tl.load(g + 0)
    start_w = tl.load(g + 1)
    roi_h = tl.load(g + 2)
    roi_w = tl.load(g + 3)
    bin_h = tl.load(g + 4)
    bin_w = tl.load(g + 5)
    count = tl.load(g + 6)
    b = tl.load(g + 7).to(tl.int64)
    gamma = tl.load(g + 8)  # in the compute dtype (a float argument would be float32)
    gh = tl.load(grid_ptr + k * 2)
    gw = tl.load(grid_ptr + k * 2 + 1)
    i = (bins // PW).to(CDT)
    j = (bins % PW).to(CDT)
    if HAS_OFF:
        sx = gamma * tl.load(off_ptr + (k * 2) * PP + bins, mask=bmask, other=0.0).to(CDT) * roi_w
        sy = gamma * tl.load(off_ptr + (k * 2 + 1) * PP + bins, mask=bmask, other=0.0).to(CDT) * roi_h
    else:
        sx = tl.zeros(bins.shape, CDT)
        sy = tl.zeros(bins.shape, CDT)
    oy = start_h + sy + i * bin_h
    ox = start_w + sx + j * bin_w
    ylo, yhi = _range(oy, bin_h, gh, H, WALK)
    xlo, xhi = _range(ox, bin_w, gw, W, WALK)
    # each bin walks its own range: step t of the loops is sample lo + t of every bin
    ny = tl.where(bmask, yhi - ylo, 0)
    nx = tl.where(bmask, xhi - xlo, 0)
    return (b, start_h, start_w, bin_h, bin_w, count, gh, gw, sy, sx, i, j, ylo, ny, xlo, nx,
            tl.max(ny, axis=0), tl.max(nx, axis=0))


@triton.jit
def _roi_fwd_kernel(x_ptr, geo_ptr, grid_ptr, off_ptr, mask_ptr, out_ptr,
                    C, H, W, PW, PP,
                    HAS_OFF: tl.constexpr, HAS_MASK: tl.constexpr, CDT: tl.constexpr,
                    BB: tl.constexpr, BC: tl.constexpr, WALK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    bins = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
    chans = tl.program_id(2).to(tl.int64) * BC + tl.arange(0, BC)
    bmask = bins < PP
    cmask = chans < C
    (b, start_h, start_w, bin_h, bin_w, count, gh, gw, sy, sx, i, j,
     ylo, ny, xlo, nx, ty_end, tx_end) = _bin_setup(geo_ptr, grid_ptr, off_ptr, k, bins, bmask, PW, PP,
                                                   H, W, HAS_OFF, CDT, WALK)
    HW = H * W
    cbase = (b * C + chans) * HW  # [BC]
    acc = tl.zeros((BB, BC), CDT)
    for ty in range(0, ty_end):
        y = start_h + sy + i * bin_h + ((ylo + ty) + 0.5) * bin_h / gh.to(CDT)
        for tx in range(0, tx_end):
            x = start_w + sx + j * bin_w + ((xlo + tx) + 0.5) * bin_w / gw.to(CDT)
            (valid, p0, p1, p2, p3, w0, w1, w2, w3,
             _a, _b, _c, _d, _e, _f, _g, _h) = _corners(y, x, H, W)
            live = valid & bmask & (ty < ny) & (tx < nx)
            m2 = live[:, None] & cmask[None, :]
            v0 = tl.load(x_ptr + cbase[None, :] + p0[:, None], mask=m2, other=0.0).to(CDT)
            v1 = tl.load(x_ptr + cbase[None, :] + p1[:, None], mask=m2, other=0.0).to(CDT)
            v2 = tl.load(x_ptr + cbase[None, :] + p2[:, None], mask=m2, other=0.0).to(CDT)
            v3 = tl.load(x_ptr + cbase[None, :] + p3[:, None], mask=m2, other=0.0).to(CDT)
            s = w0[:, None] * v0 + w1[:, None] * v1 + w2[:, None] * v2 + w3[:, None] * v3
            acc += tl.where(m2, s, 0.0)
    res = acc / count
    if HAS_MASK:
        m = tl.load(mask_ptr + k * PP + bins, mask=bmask, other=0.0).to(CDT)
        res = res * m[:, None]
    o = out_ptr + (k * C + chans[None, :]) * PP + bins[:, None]
    tl.store(o, res.to(out_ptr.dtype.element_ty), mask=bmask[:, None] & cmask[None, :])


@triton.jit
def _roi_bwd_bins(x_ptr, go_ptr, gin_ptr, part_ptr, geo_ptr, grid_ptr, off_ptr, mask_ptr,
                  k, bins, chans, cblock, K, C, H, W, PW, PP,
                  HAS_OFF: tl.constexpr, HAS_MASK: tl.constexpr, NEED_POS: tl.constexpr,
                  ATOMIC: tl.constexpr, CDT: tl.constexpr, WALK: tl.constexpr):
    """Backward of RoI k's bins ([BB]) over channels ``chans`` ([BC]): scatters into grad_input and
    writes the (d/dx, d/dy, d/dmask) partials of this channel block."""
    bmask = bins < PP
    cmask = chans < C
    (b, start_h, start_w, bin_h, bin_w, count, gh, gw, sy, sx, i, j,
     ylo, ny, xlo, nx, ty_end, tx_end) = _bin_setup(geo_ptr, grid_ptr, off_ptr, k, bins, bmask, PW, PP,
                                                   H, W, HAS_OFF, CDT, WALK)
    HW = H * W
    cbase = (b * C + chans) * HW
    inv = 1.0 / count
    g = tl.load(go_ptr + (k * C + chans[None, :]) * PP + bins[:, None],
                mask=bmask[:, None] & cmask[None, :], other=0.0).to(CDT) * inv
    if HAS_MASK:
        m = tl.load(mask_ptr + k * PP + bins, mask=bmask, other=0.0).to(CDT)
    else:
        m = tl.full(bins.shape, 1.0, CDT)
    gm_ = g * m[:, None]
    px = tl.zeros(bins.shape, CDT)
    py = tl.zeros(bins.shape, CDT)
    pm = tl.zeros(bins.shape, CDT)
    for ty in range(0, ty_end):
        y = start_h + sy + i * bin_h + ((ylo + ty) + 0.5) * bin_h / gh.to(CDT)
        for tx in range(0, tx_end):
            x = start_w + sx + j * bin_w + ((xlo + tx) + 0.5) * bin_w / gw.to(CDT)
            (valid, p0, p1, p2, p3, w0, w1, w2, w3,
             dy0, dy1, dy2, dy3, dx0, dx1, dx2, dx3) = _corners(y, x, H, W)
            live = valid & bmask & (ty < ny) & (tx < nx)
            m2 = live[:, None] & cmask[None, :]
            for t in tl.static_range(4):
                if t == 0:
                    p, w, dwy, dwx = p0, w0, dy0, dx0
                elif t == 1:
                    p, w, dwy, dwx = p1, w1, dy1, dx1
                elif t == 2:
                    p, w, dwy, dwx = p2, w2, dy2, dx2
                else:
                    p, w, dwy, dwx = p3, w3, dy3, dx3
                addr = cbase[None, :] + p[:, None]
                contrib = w[:, None] * gm_
                if ATOMIC:
                    tl.atomic_add(gin_ptr + addr, contrib, mask=m2)
                else:  # this program owns these channels of the image: plain read-modify-write
                    cur = tl.load(gin_ptr + addr, mask=m2, other=0.0)
                    tl.store(gin_ptr + addr, cur + contrib, mask=m2)
                    tl.debug_barrier()
                if NEED_POS:
                    v = tl.load(x_ptr + addr, mask=m2, other=0.0).to(CDT)
                    dot = tl.sum(tl.where(m2, g * v, 0.0), axis=1)
                    px += dwx * dot
                    py += dwy * dot
                    pm += w * dot
    if NEED_POS:
        q = part_ptr + ((cblock * K + k) * PP + bins) * 3
        tl.store(q + 0, px, mask=bmask)
        tl.store(q + 1, py, mask=bmask)
        tl.store(q + 2, pm, mask=bmask)


@triton.jit
def _roi_bwd_atomic_kernel(x_ptr, go_ptr, gin_ptr, part_ptr, geo_ptr, grid_ptr, off_ptr, mask_ptr,
                           K, C, H, W, PW, PP,
                           HAS_OFF: tl.constexpr, HAS_MASK: tl.constexpr, NEED_POS: tl.constexpr,
                           CDT: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr, WALK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    bins = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
    cblock = tl.program_id(2).to(tl.int64)
    chans = cblock * BC + tl.arange(0, BC)
    _roi_bwd_bins(x_ptr, go_ptr, gin_ptr, part_ptr, geo_ptr, grid_ptr, off_ptr, mask_ptr,
                  k, bins, chans, cblock, K, C, H, W, PW, PP,
                  HAS_OFF, HAS_MASK, NEED_POS, True, CDT, WALK)


@triton.jit
def _roi_bwd_ordered_kernel(x_ptr, go_ptr, gin_ptr, part_ptr, geo_ptr, grid_ptr, off_ptr, mask_ptr,
                            order_ptr, start_ptr, K, C, H, W, PW, PP,
                            HAS_OFF: tl.constexpr, HAS_MASK: tl.constexpr, NEED_POS: tl.constexpr,
                            CDT: tl.constexpr, BC: tl.constexpr, WALK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cblock = tl.program_id(1).to(tl.int64)
    chans = cblock * BC + tl.arange(0, BC)
    r0 = tl.load(start_ptr + n)
    r1 = tl.load(start_ptr + n + 1)
    for r in range(r0, r1):  # this image's RoIs, in RoI order
        k = tl.load(order_ptr + r)
        for bin in range(0, PP):  # one bin at a time: a bin's samples may share pixels with the next
            bins = bin + tl.arange(0, 1).to(tl.int64)
            _roi_bwd_bins(x_ptr, go_ptr, gin_ptr, part_ptr, geo_ptr, grid_ptr, off_ptr, mask_ptr,
                          k, bins, chans, cblock, K, C, H, W, PW, PP,
                          HAS_OFF, HAS_MASK, NEED_POS, False, CDT, WALK)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def roi_geometry(rois: Tensor, pooled_height: int, pooled_width: int, spatial_scale: float,
                 sampling_ratio: int, aligned: bool, dtype: torch.dtype,
                 gamma: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Per-RoI geometry, computed in the CPU kernel's operation order.

    Returns:
        geo: Tensor[K, 9] (start_h, start_w, roi_h, roi_w, bin_h, bin_w, count, batch index, gamma) in
            ``dtype``; grid: Tensor[K, 2] int64 samples per bin along y and x (>= 0).
    """
    r = rois.to(dtype)
    scale = torch.tensor(spatial_scale, dtype=dtype).item()  # the scale rounded as the kernel's T
    off = 0.5 if aligned else 0.0
    start_w = r[:, 1] * scale - off
    start_h = r[:, 2] * scale - off
    roi_w = (r[:, 3] * scale - off) - start_w
    roi_h = (r[:, 4] * scale - off) - start_h
    if not aligned:
        roi_w = roi_w.clamp(min=1)
        roi_h = roi_h.clamp(min=1)
    bin_h = roi_h / pooled_height
    bin_w = roi_w / pooled_width
    if sampling_ratio > 0:
        gh = torch.full_like(roi_h, sampling_ratio, dtype=torch.float64)
        gw = gh.clone()
    else:
        cap = float(1 << 40)
        gh = torch.ceil((roi_h / pooled_height).double()).nan_to_num(0.0).clamp(-cap, cap)
        gw = torch.ceil((roi_w / pooled_width).double()).nan_to_num(0.0).clamp(-cap, cap)
    count = (gh * gw).clamp(min=1.0).to(dtype)
    grid = torch.stack([gh.clamp(min=0), gw.clamp(min=0)], 1).to(torch.int64).contiguous()
    geo = torch.stack([start_h, start_w, roi_h, roi_w, bin_h, bin_w, count, r[:, 0],
                       torch.full_like(count, gamma)], 1).contiguous()
    return geo, grid


def _blocks(C: int, PP: int) -> Tuple[int, int]:
    if interpreting():  # few, large programs: the interpreter's cost is per program
        return triton.next_power_of_2(max(PP, 1)), triton.next_power_of_2(max(C, 1))
    return min(16, triton.next_power_of_2(max(PP, 1))), min(32, triton.next_power_of_2(max(C, 1)))


def _opt(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype).contiguous()


def roi_pool_forward(input: Tensor, rois: Tensor, offset: Optional[Tensor], mask: Optional[Tensor],
                     pooled_height: int, pooled_width: int, spatial_scale: float, sampling_ratio: int,
                     gamma: float, aligned: bool) -> Tensor:
    """Forward of ``dcnv2::deform_roi_pool`` (arguments as its schema). Returns Tensor[K, C, ph, pw]."""
    N, C, H, W = input.shape
    K, PP = rois.shape[0], pooled_height * pooled_width
    out = input.new_empty((K, C, pooled_height, pooled_width))
    if K == 0 or C == 0:
        return out
    ct = _compute_dtype(input.dtype)
    if H == 0 or W == 0:
        return out.zero_()
    geo, grid = roi_geometry(rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned, ct, gamma)
    x = input.contiguous()
    off, msk = _opt(offset, ct), _opt(mask, ct)
    BB, BC = _blocks(C, PP)
    launch = (K, triton.cdiv(PP, BB), triton.cdiv(C, BC))
    _roi_fwd_kernel[launch](
        x, geo, grid, off if off is not None else geo, msk if msk is not None else geo, out,
        C, H, W, pooled_width, PP,
        HAS_OFF=off is not None, HAS_MASK=msk is not None, CDT=_tl_dtype(ct), BB=BB, BC=BC, WALK=WALK_WHOLE,
    )
    return out


def roi_pool_backward(grad_output: Tensor, input: Tensor, rois: Tensor, offset: Optional[Tensor],
                      mask: Optional[Tensor], pooled_height: int, pooled_width: int, spatial_scale: float,
                      sampling_ratio: int, gamma: float, aligned: bool,
                      deterministic: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of ``dcnv2::deform_roi_pool``: (grad_input, grad_offset, grad_mask), the last two
    empty when offset / mask is None.

    ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``) selects the
    atomic-free grad_input scatter.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    N, C, H, W = input.shape
    K, PP = rois.shape[0], pooled_height * pooled_width
    ct = _compute_dtype(input.dtype)
    gin = torch.zeros((N, C, H, W), dtype=ct, device=input.device)
    goff = torch.zeros((K, 2, PP), dtype=ct, device=input.device) if offset is not None else None
    gmask = torch.zeros((K, 1, PP), dtype=ct, device=input.device) if mask is not None else None
    need_pos = offset is not None or mask is not None
    if K > 0 and C > 0 and H > 0 and W > 0:
        geo, grid = roi_geometry(rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned, ct, gamma)
        x = input.contiguous()
        go = grad_output.contiguous()
        off, msk = _opt(offset, ct), _opt(mask, ct)
        BB, BC = _blocks(C, PP)
        NCB = triton.cdiv(C, BC)
        part = torch.empty((NCB, K, PP, 3), dtype=ct, device=input.device) if need_pos else geo
        common = dict(HAS_OFF=off is not None, HAS_MASK=msk is not None, NEED_POS=need_pos,
                      CDT=_tl_dtype(ct), WALK=WALK_WHOLE)
        off_arg = off if off is not None else geo
        msk_arg = msk if msk is not None else geo
        if deterministic:
            batch = rois[:, 0].to(torch.int64)
            order = torch.argsort(batch, stable=True)
            starts = torch.zeros(N + 1, dtype=torch.int64, device=input.device)
            starts[1:] = torch.cumsum(torch.bincount(batch, minlength=N), 0)
            _roi_bwd_ordered_kernel[(N, NCB)](
                x, go, gin, part, geo, grid, off_arg, msk_arg, order, starts,
                K, C, H, W, pooled_width, PP, BC=BC, num_stages=1, **common,
            )
        else:
            _roi_bwd_atomic_kernel[(K, triton.cdiv(PP, BB), NCB)](
                x, go, gin, part, geo, grid, off_arg, msk_arg,
                K, C, H, W, pooled_width, PP, BB=BB, BC=BC, **common,
            )
        if need_pos:
            sums = part.sum(dim=0)  # [K, PP, 3], channel blocks reduced in block order
            m = msk.view(K, PP) if msk is not None else 1.0
            if goff is not None:
                goff[:, 0] = sums[..., 0] * m * float(gamma) * geo[:, 3:4]
                goff[:, 1] = sums[..., 1] * m * float(gamma) * geo[:, 2:3]
            if gmask is not None:
                gmask[:, 0] = sums[..., 2]
    empty = input.new_empty((0,))
    dt = input.dtype
    return (
        gin.to(dt),
        goff.view(K, 2, pooled_height, pooled_width).to(dt) if goff is not None else empty,
        gmask.view(K, 1, pooled_height, pooled_width).to(dt) if gmask is not None else empty,
    )
