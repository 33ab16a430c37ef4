"""Triton kernels of the modulated deformable convolution as an implicit GEMM, forward and backward.

Semantics of the CPU kernel (``csrc/cpu/deform_conv2d.cpp``) and torchvision's layout: tap
k = i * kw + j of offset group og reads dy at offset channel og * 2K + 2k and dx at og * 2K + 2k + 1;
a sample outside (-1, H) x (-1, W), NaN/inf included, reads 0; inside it, corners off the map read 0.

The reduction axis of the GEMM (input channel c of the group, tap k) is walked tap by tap and, within
a tap, in channel chunks that never cross a group or an offset-group boundary (chunks of a
"segment" of S = gcd(C / G, C / OG) channels). A chunk therefore shares one sampling position per
output pixel: the bilinear corners and weights are computed once per (pixel, tap, segment) and the
chunk's [pixels, channels] tile is gathered and interpolated straight into the ``tl.dot`` operand.
No column buffer exists.

Kernels (rows = the flattened (image, output pixel) index, so any batch size is one launch and a
row's result never depends on the other rows):
- forward: program per (row block, output-channel block of one group): out = col @ W^T.
- backward data: program per (row block, offset group), owning that group's offset/mask gradients
  (no atomics): grad_col = grad_out @ W per chunk, then the four corner dot products give d/dy,
  d/dx, d/dmask, and grad_col scatters into grad_input with ``tl.atomic_add``.
- backward weight: program per (output-channel block, reduction chunk, row split):
  grad_W = grad_out^T @ col, the splits summed by torch in a fixed order.
Under ``torch.use_deterministic_algorithms(True)`` grad_input is not scattered with atomics: the data
kernel writes grad_col and the (destination, weight) of every corner, torch sorts the corners by
destination (stable sort), and a gather kernel sums each input pixel's contributions in that fixed
order. Two runs are bit-identical; the cost is one column buffer per chunk of images.

Precision: float16/bfloat16 operands with float32 accumulation, float32 with IEEE products unless
torch allows TF32 (``torch.backends.cuda.matmul`` precision flags), float64 in float64.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from dcnv2.ops.triton import allow_tf32, interpreting

COLUMN_BUDGET = 1 << 27  # elements of grad_col held at once on the deterministic path


@triton.jit
def _tap_sample(off_ptr, mask_ptr, n, p, ho, wo, rmask, og, k, OG, K, L, H, W, kw, sh, sw, ph, pw, dh, dw,
                HAS_MASK: tl.constexpr, CDT: tl.constexpr):
    """Sampling position of tap k, offset group og at rows (n, p) ([BM]): validity of the four
    corners, their pixel indices, bilinear weights and derivatives, and the mask."""
    i = k // kw
    j = k % kw
    ob = (n * (2 * OG * K) + og * 2 * K + 2 * k) * L + p
    dy = tl.load(off_ptr + ob, mask=rmask, other=0.0).to(CDT)
    dx = tl.load(off_ptr + ob + L, mask=rmask, other=0.0).to(CDT)
    y = (ho * sh - ph + i * dh).to(CDT) + dy
    x = (wo * sw - pw + j * dw).to(CDT) + dx
    if HAS_MASK:
        m = tl.load(mask_ptr + (n * (OG * K) + og * K + k) * L + p, mask=rmask, other=0.0).to(CDT)
    else:
        m = tl.full(p.shape, 1.0, CDT)
    inside = (y > -1.0) & (y < H) & (x > -1.0) & (x < W) & rmask  # NaN fails every comparison
    y = tl.where(inside, y, 0.0)
    x = tl.where(inside, x, 0.0)
    yf = tl.floor(y)
    xf = tl.floor(x)
    y0 = yf.to(tl.int64)
    x0 = xf.to(tl.int64)
    ly = y - yf
    lx = x - xf
    hy = 1.0 - ly
    hx = 1.0 - lx
    top = inside & (y0 >= 0)
    bottom = inside & (y0 + 1 <= H - 1)
    left = x0 >= 0
    right = x0 + 1 <= W - 1
    v0 = top & left
    v1 = top & right
    v2 = bottom & left
    v3 = bottom & right
    q0 = tl.where(v0, y0 * W + x0, 0)
    q1 = tl.where(v1, y0 * W + x0 + 1, 0)
    q2 = tl.where(v2, (y0 + 1) * W + x0, 0)
    q3 = tl.where(v3, (y0 + 1) * W + x0 + 1, 0)
    return (v0, v1, v2, v3, q0, q1, q2, q3, hy * hx, hy * lx, ly * hx, ly * lx,
            -hx, -lx, hx, lx, -hy, hy, -ly, ly, m)


@triton.jit
def _gather(x_ptr, cb, q, v, w, cmask):
    """w[:, None] * x[n, c, pixel q] over a [BM, BK] tile (0 where the corner is invalid)."""
    m2 = v[:, None] & cmask[None, :]
    val = tl.load(x_ptr + cb + q[:, None], mask=m2, other=0.0)
    return val, m2


@triton.jit
def _col_tile(x_ptr, cb, cmask, v0, v1, v2, v3, q0, q1, q2, q3, w0, w1, w2, w3, m, CDT: tl.constexpr):
    """The modulated bilinear samples [BM, BK] of one chunk: the implicit GEMM's operand."""
    a0, _m0 = _gather(x_ptr, cb, q0, v0, w0, cmask)
    a1, _m1 = _gather(x_ptr, cb, q1, v1, w1, cmask)
    a2, _m2 = _gather(x_ptr, cb, q2, v2, w2, cmask)
    a3, _m3 = _gather(x_ptr, cb, q3, v3, w3, cmask)
    c0 = tl.where(v0, w0 * m, 0.0)
    c1 = tl.where(v1, w1 * m, 0.0)
    c2 = tl.where(v2, w2 * m, 0.0)
    c3 = tl.where(v3, w3 * m, 0.0)
    return (c0[:, None] * a0.to(CDT) + c1[:, None] * a1.to(CDT) + c2[:, None] * a2.to(CDT)
            + c3[:, None] * a3.to(CDT))


@triton.jit
def _dcn_fwd_kernel(x_ptr, w_ptr, off_ptr, mask_ptr, b_ptr, out_ptr,
                    NL, C, H, W, Cout, Cg, Coutg, Cog, OG, K, L, Wo, kw, sh, sw, ph, pw, dh, dw, S, NSEG, NBN,
                    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr,
                    DOT: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(1)
    g = (pid_n // NBN).to(tl.int64)
    co = (pid_n % NBN).to(tl.int64) * BN + tl.arange(0, BN)
    comask = co < Coutg
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < NL
    n = rows // L
    p = rows % L
    ho = p // Wo
    wo = p % Wo
    HW = H * W
    acc = tl.zeros((BM, BN), CDT)
    for k in range(0, K):
        for s in range(0, NSEG):
            c0 = g * Cg + s * S  # first input channel of the segment
            og = c0 // Cog
            (v0, v1, v2, v3, q0, q1, q2, q3, w0, w1, w2, w3,
             _a, _b, _c, _d, _e, _f, _g, _h, m) = _tap_sample(
                off_ptr, mask_ptr, n, p, ho, wo, rmask, og, k, OG, K, L, H, W, kw, sh, sw, ph, pw, dh, dw,
                HAS_MASK, CDT)
            for cc in range(0, S, BK):
                cl = cc + tl.arange(0, BK)
                cmask = cl < S
                cb = ((n * C + c0)[:, None] + cl[None, :]) * HW
                col = _col_tile(x_ptr, cb, cmask, v0, v1, v2, v3, q0, q1, q2, q3, w0, w1, w2, w3, m, CDT)
                # weight[g * Coutg + co, s * S + cl, k] as a [BK, BN] tile
                wp = w_ptr + (((g * Coutg + co)[None, :] * Cg + (s * S + cl)[:, None]) * K + k)
                wt = tl.load(wp, mask=cmask[:, None] & comask[None, :], other=0.0)
                acc += tl.dot(col.to(DOT), wt.to(DOT), input_precision=PREC, out_dtype=CDT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + g * Coutg + co, mask=comask, other=0.0).to(CDT)[None, :]
    o = out_ptr + ((n * Cout)[:, None] + (g * Coutg + co)[None, :]) * L + p[:, None]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & comask[None, :])


@triton.jit
def _dcn_bwd_data_kernel(x_ptr, w_ptr, off_ptr, mask_ptr, go_ptr, gin_ptr, goff_ptr, gmask_ptr,
                         gcol_ptr, dest_ptr, cw_ptr,
                         row0, NL, C, H, W, Cout, Cg, Coutg, Cog, OG, K, L, Wo, kw, sh, sw, ph, pw, dh, dw,
                         S, NSEG,
                         HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr,
                    DOT: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    og = tl.program_id(1).to(tl.int64)
    lrows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # rows of this launch's chunk
    rows = row0 + lrows
    rmask = rows < NL
    n = rows // L
    p = rows % L
    ho = p // Wo
    wo = p % Wo
    HW = H * W
    for k in range(0, K):
        (v0, v1, v2, v3, q0, q1, q2, q3, w0, w1, w2, w3,
         dy0, dy1, dy2, dy3, dx0, dx1, dx2, dx3, m) = _tap_sample(
            off_ptr, mask_ptr, n, p, ho, wo, rmask, og, k, OG, K, L, H, W, kw, sh, sw, ph, pw, dh, dw,
            HAS_MASK, CDT)
        gy = tl.zeros((BM,), CDT)
        gx = tl.zeros((BM,), CDT)
        gm = tl.zeros((BM,), CDT)
        for s in range(0, NSEG):  # segments of this offset group's channels
            c0 = og * Cog + s * S
            g = c0 // Cg
            cl0 = c0 - g * Cg
            for cc in range(0, S, BK):
                cl = cc + tl.arange(0, BK)
                cmask = cl < S
                gc = tl.zeros((BM, BK), CDT)
                for co0 in range(0, Coutg, BN):
                    co = co0 + tl.arange(0, BN)
                    comask = co < Coutg
                    gp = go_ptr + ((n * Cout)[:, None] + (g * Coutg + co)[None, :]) * L + p[:, None]
                    got = tl.load(gp, mask=rmask[:, None] & comask[None, :], other=0.0)
                    wp = w_ptr + (((g * Coutg + co)[:, None] * Cg + (cl0 + cc + cl)[None, :]) * K + k)
                    wt = tl.load(wp, mask=comask[:, None] & cmask[None, :], other=0.0)
                    gc += tl.dot(got.to(DOT), wt.to(DOT), input_precision=PREC, out_dtype=CDT)
                cb = ((n * C + c0)[:, None] + (cc + cl)[None, :]) * HW
                for t in tl.static_range(4):
                    if t == 0:
                        v, q, w, wy, wx = v0, q0, w0, dy0, dx0
                    elif t == 1:
                        v, q, w, wy, wx = v1, q1, w1, dy1, dx1
                    elif t == 2:
                        v, q, w, wy, wx = v2, q2, w2, dy2, dx2
                    else:
                        v, q, w, wy, wx = v3, q3, w3, dy3, dx3
                    val, m2 = _gather(x_ptr, cb, q, v, w, cmask)
                    d = tl.sum(tl.where(m2, gc * val.to(CDT), 0.0), axis=1)
                    gy += d * wy
                    gx += d * wx
                    gm += d * w
                    if ATOMIC:
                        tl.atomic_add(gin_ptr + cb + q[:, None], gc * (w * m)[:, None], mask=m2)
                if not ATOMIC:  # grad_col for the ordered scatter: [rows, OG, K, Cog] of this chunk
                    gcp = gcol_ptr + ((lrows * OG + og) * K + k)[:, None] * Cog + (s * S + cc + cl)[None, :]
                    tl.store(gcp, gc, mask=rmask[:, None] & cmask[None, :])
        if not ATOMIC:  # destination and weight of every corner, in a fixed (row, og, k, corner) order
            e = ((lrows * OG + og) * K + k) * 4
            okey = (n * OG + og) * HW
            tl.store(dest_ptr + e + 0, tl.where(v0, okey + q0, -1), mask=rmask)
            tl.store(dest_ptr + e + 1, tl.where(v1, okey + q1, -1), mask=rmask)
            tl.store(dest_ptr + e + 2, tl.where(v2, okey + q2, -1), mask=rmask)
            tl.store(dest_ptr + e + 3, tl.where(v3, okey + q3, -1), mask=rmask)
            tl.store(cw_ptr + e + 0, w0 * m, mask=rmask)
            tl.store(cw_ptr + e + 1, w1 * m, mask=rmask)
            tl.store(cw_ptr + e + 2, w2 * m, mask=rmask)
            tl.store(cw_ptr + e + 3, w3 * m, mask=rmask)
        ob = (n * (2 * OG * K) + og * 2 * K + 2 * k) * L + p
        tl.store(goff_ptr + ob, gy * m, mask=rmask)
        tl.store(goff_ptr + ob + L, gx * m, mask=rmask)
        if HAS_MASK:
            tl.store(gmask_ptr + (n * (OG * K) + og * K + k) * L + p, gm, mask=rmask)


@triton.jit
def _ordered_scatter_kernel(gin_ptr, gcol_ptr, cw_ptr, order_ptr, keys_ptr, starts_ptr, Cog, HW,
                            CDT: tl.constexpr, BK: tl.constexpr):
    """grad_input[key] += sum over the key's corners, in sorted order, of weight * grad_col row."""
    u = tl.program_id(0).to(tl.int64)
    cl = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    cmask = cl < Cog
    key = tl.load(keys_ptr + u)
    j0 = tl.load(starts_ptr + u)
    j1 = tl.load(starts_ptr + u + 1)
    acc = tl.zeros((BK,), CDT)
    for jj in range(j0, j1):
        e = tl.load(order_ptr + jj)
        w = tl.load(cw_ptr + e)
        acc += w * tl.load(gcol_ptr + (e // 4) * Cog + cl, mask=cmask, other=0.0)
    no = key // HW  # n * OG + og
    pix = key % HW
    gp = gin_ptr + (no * Cog + cl) * HW + pix
    cur = tl.load(gp, mask=cmask, other=0.0)
    tl.store(gp, cur + acc, mask=cmask)


@triton.jit
def _dcn_bwd_weight_kernel(x_ptr, off_ptr, mask_ptr, go_ptr, part_ptr,
                           NL, C, H, W, Cout, Cg, Coutg, Cog, OG, K, L, Wo, kw, sh, sw, ph, pw, dh, dw,
                           S, NSEG, NBN, NCK, ROWS_PER_SPLIT,
                           HAS_MASK: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr,
                    DOT: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(1)
    g = (pid_n // NBN).to(tl.int64)
    co = (pid_n % NBN).to(tl.int64) * BN + tl.arange(0, BN)
    comask = co < Coutg
    pid_r = tl.program_id(0).to(tl.int64)  # (k, segment, chunk): the long axis, first (no 65535 limit)
    k = pid_r // (NSEG * NCK)
    s = (pid_r // NCK) % NSEG
    cc = (pid_r % NCK) * BK
    cl = cc + tl.arange(0, BK)
    cmask = cl < S
    c0 = g * Cg + s * S
    og = c0 // Cog
    split = tl.program_id(2).to(tl.int64)
    r_begin = split * ROWS_PER_SPLIT
    r_end = tl.minimum(r_begin + ROWS_PER_SPLIT, NL)
    HW = H * W
    acc = tl.zeros((BN, BK), CDT)
    for r0 in range(r_begin, r_end, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < r_end
        n = rows // L
        p = rows % L
        ho = p // Wo
        wo = p % Wo
        (v0, v1, v2, v3, q0, q1, q2, q3, w0, w1, w2, w3,
         _a, _b, _c, _d, _e, _f, _g, _h, m) = _tap_sample(
            off_ptr, mask_ptr, n, p, ho, wo, rmask, og, k, OG, K, L, H, W, kw, sh, sw, ph, pw, dh, dw,
            HAS_MASK, CDT)
        cb = ((n * C + c0)[:, None] + cl[None, :]) * HW
        col = _col_tile(x_ptr, cb, cmask, v0, v1, v2, v3, q0, q1, q2, q3, w0, w1, w2, w3, m, CDT)
        gp = go_ptr + ((n * Cout)[None, :] + (g * Coutg + co)[:, None]) * L + p[None, :]
        got = tl.load(gp, mask=comask[:, None] & rmask[None, :], other=0.0)  # [BN, BM]
        acc += tl.dot(got.to(DOT), col.to(DOT), input_precision=PREC, out_dtype=CDT)
    # part[split, g * Coutg + co, s * S + cl, k]
    pp = part_ptr + ((split * Cout + (g * Coutg + co)[:, None]) * Cg + (s * S + cl)[None, :]) * K + k
    tl.store(pp, acc, mask=comask[:, None] & cmask[None, :])


class _Geometry:
    def __init__(self, input: Tensor, weight: Tensor, offset: Tensor, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int, offset_groups: int):
        self.N, self.C, self.H, self.W = input.shape
        self.Cout, self.Cg, self.kh, self.kw = weight.shape
        self.K = self.kh * self.kw
        self.sh, self.sw = stride
        self.ph, self.pw = padding
        self.dh, self.dw = dilation
        self.G, self.OG = groups, offset_groups
        self.Ho = (self.H + 2 * self.ph - (self.dh * (self.kh - 1) + 1)) // self.sh + 1
        self.Wo = (self.W + 2 * self.pw - (self.dw * (self.kw - 1) + 1)) // self.sw + 1
        self.L = self.Ho * self.Wo
        self.NL = self.N * self.L
        self.Coutg = self.Cout // self.G
        self.Cog = self.C // self.OG
        self.S = math.gcd(self.Cg, self.Cog)  # chunks never cross a group or an offset group

    def args(self):
        return (self.NL, self.C, self.H, self.W, self.Cout, self.Cg, self.Coutg, self.Cog, self.OG, self.K,
                self.L, self.Wo, self.kw, self.sh, self.sw, self.ph, self.pw, self.dh, self.dw)


_DOT_TYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def _types(dtype: torch.dtype):
    """(compute torch dtype, its tl dtype, tl.dot input precision, tl.dot operand dtype) for an input dtype.

    Half and bfloat16 operands go to ``tl.dot`` as they are, accumulating in float32. Triton's CPU
    interpreter multiplies bfloat16 operands wrongly (it has no numpy bfloat16), so under
    ``TRITON_INTERPRET=1`` they are widened to float32 first; GPUs run the bfloat16 product.
    """
    dot = _DOT_TYPES[dtype]
    if dtype == torch.bfloat16 and interpreting():
        dot = tl.float32
    if dtype == torch.float64:
        return torch.float64, tl.float64, "ieee", dot
    if dtype == torch.float32 and allow_tf32():
        return torch.float32, tl.float32, "tf32", dot
    return torch.float32, tl.float32, "ieee", dot


def _stages(dtype: torch.dtype) -> int:
    """Software-pipelining depth. Compiled ahead of time for sm_80/sm_90 (no GPU needed), the
    default 3 stages buffer the four corner gathers and take up to 180 KB of shared memory (float64)
    or 108 KB (float32), more than many GPUs have; 2 stages (1 for float64) stay under 64 KB."""
    return 1 if dtype == torch.float64 else 2


def _blocks(geo: _Geometry) -> Tuple[int, int, int]:
    """(BM, BN, BK): rows, output channels, reduction channels per tile (tl.dot needs >= 16)."""
    np2 = triton.next_power_of_2
    if interpreting():  # the interpreter's cost is per program and per loop step: few, large tiles
        return max(16, min(64, np2(geo.NL))), max(16, min(64, np2(geo.Coutg))), max(16, min(64, np2(geo.S)))
    return 64, max(16, min(64, np2(geo.Coutg))), max(16, min(32, np2(geo.S)))


def _check_device(input: Tensor, geo: _Geometry) -> None:
    if input.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"dcnv2 Triton deform_conv2d runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
            f"got a tensor on {input.device}"
        )


def conv_forward(input: Tensor, weight: Tensor, offset: Tensor, mask: Optional[Tensor], bias: Optional[Tensor],
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                 offset_groups: int) -> Tensor:
    """Forward of ``dcnv2::deform_conv2d`` (arguments as its schema). Returns Tensor[N, Cout, Ho, Wo]."""
    geo = _Geometry(input, weight, offset, stride, padding, dilation, groups, offset_groups)
    _check_device(input, geo)
    out = input.new_empty((geo.N, geo.Cout, geo.Ho, geo.Wo))
    if geo.NL == 0:
        return out
    _, CDT, PREC, DOT = _types(input.dtype)
    BM, BN, BK = _blocks(geo)
    NBN = triton.cdiv(geo.Coutg, BN)
    x, w, off = input.contiguous(), weight.contiguous(), offset.contiguous()
    msk = mask.contiguous() if mask is not None else off
    b = bias.contiguous() if bias is not None else off
    _dcn_fwd_kernel[(triton.cdiv(geo.NL, BM), geo.G * NBN)](
        x, w, off, msk, b, out, *geo.args(), geo.S, geo.Cg // geo.S, NBN,
        HAS_MASK=mask is not None, HAS_BIAS=bias is not None, CDT=CDT, PREC=PREC, DOT=DOT, BM=BM, BN=BN, BK=BK,
        num_stages=_stages(input.dtype),
    )
    return out


def _weight_splits(geo: _Geometry, BM: int, BN: int, BK: int) -> int:
    """Row splits of the weight-gradient reduction: enough programs to fill a GPU, from the shapes only."""
    if interpreting():
        return 1
    tiles = geo.G * triton.cdiv(geo.Coutg, BN) * geo.K * (geo.Cg // geo.S) * triton.cdiv(geo.S, BK)
    blocks = triton.cdiv(geo.NL, BM)
    return max(1, min(blocks, triton.cdiv(1024, tiles), 64))


def conv_backward(grad_output: Tensor, input: Tensor, weight: Tensor, offset: Tensor, mask: Optional[Tensor],
                  bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, offset_groups: int,
                  deterministic: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``dcnv2::deform_conv2d``: (grad_input, grad_weight, grad_offset, grad_mask, grad_bias),
    grad_mask / grad_bias empty when mask / bias is None.

    ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``) selects the ordered,
    atomic-free grad_input scatter.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    geo = _Geometry(input, weight, offset, stride, padding, dilation, groups, offset_groups)
    _check_device(input, geo)
    ct, CDT, PREC, DOT = _types(input.dtype)
    dev = input.device
    gin = torch.zeros((geo.N, geo.C, geo.H, geo.W), dtype=ct, device=dev)
    goff = torch.zeros(offset.shape, dtype=ct, device=dev)
    gmask = torch.zeros(mask.shape, dtype=ct, device=dev) if mask is not None else None
    gw = torch.zeros(weight.shape, dtype=ct, device=dev)
    if geo.NL > 0:
        BM, BN, BK = _blocks(geo)
        x, w, off = input.contiguous(), weight.contiguous(), offset.contiguous()
        go = grad_output.contiguous()
        msk = mask.contiguous() if mask is not None else off
        gm_arg = gmask if gmask is not None else goff
        common = dict(HAS_MASK=mask is not None, CDT=CDT, PREC=PREC, DOT=DOT, BM=BM, BN=BN, BK=BK,
                      num_stages=_stages(input.dtype))
        nseg_og = geo.Cog // geo.S
        if not deterministic:
            _dcn_bwd_data_kernel[(triton.cdiv(geo.NL, BM), geo.OG)](
                x, w, off, msk, go, gin, goff, gm_arg, goff, goff, goff, 0, *geo.args(), geo.S, nseg_og,
                ATOMIC=True, **common,
            )
        else:
            for r0, r1 in _row_chunks(geo):
                rows = r1 - r0
                gcol = torch.empty((rows, geo.OG, geo.K, geo.Cog), dtype=ct, device=dev)
                dest = torch.empty((rows * geo.OG * geo.K * 4,), dtype=torch.int64, device=dev)
                cw = torch.empty((rows * geo.OG * geo.K * 4,), dtype=ct, device=dev)
                _dcn_bwd_data_kernel[(triton.cdiv(rows, BM), geo.OG)](
                    x, w, off, msk, go, gin, goff, gm_arg, gcol, dest, cw, r0, r0 + rows, *geo.args()[1:],
                    geo.S, nseg_og, ATOMIC=False, **common,
                )
                _ordered_scatter(gin, gcol, dest, cw, geo, CDT)
        NBN = triton.cdiv(geo.Coutg, BN)
        NCK = triton.cdiv(geo.S, BK)
        splits = _weight_splits(geo, BM, BN, BK)
        rows_per_split = triton.cdiv(triton.cdiv(geo.NL, splits), BM) * BM
        splits = triton.cdiv(geo.NL, rows_per_split)
        part = torch.zeros((splits,) + tuple(weight.shape), dtype=ct, device=dev)
        _dcn_bwd_weight_kernel[(geo.K * (geo.Cg // geo.S) * NCK, geo.G * NBN, splits)](
            x, off, msk, go, part, *geo.args(), geo.S, geo.Cg // geo.S, NBN, NCK, rows_per_split, **common,
        )
        gw = part.sum(dim=0) if splits > 1 else part[0]
    dt = input.dtype
    empty = input.new_empty((0,))
    g_bias = grad_output.to(ct).sum((0, 2, 3)).to(dt) if bias is not None else empty
    return gin.to(dt), gw.to(dt), goff.to(dt), gmask.to(dt) if gmask is not None else empty, g_bias


def _row_chunks(geo: _Geometry):
    """Row ranges of the deterministic path: whole images while grad_col fits the budget, else fixed
    pieces of one image, so the summation grouping never depends on the batch size."""
    per_row = geo.K * geo.C
    if geo.L * per_row <= COLUMN_BUDGET:
        imgs = max(1, COLUMN_BUDGET // (geo.L * per_row))
        for n0 in range(0, geo.N, imgs):
            yield n0 * geo.L, min(geo.N, n0 + imgs) * geo.L
    else:
        piece = max(1, COLUMN_BUDGET // per_row)
        for n in range(geo.N):
            for p0 in range(0, geo.L, piece):
                yield n * geo.L + p0, n * geo.L + min(geo.L, p0 + piece)


def _ordered_scatter(gin: Tensor, gcol: Tensor, dest: Tensor, cw: Tensor, geo: _Geometry, CDT) -> None:
    """grad_input += the corners' weighted grad_col rows, each input pixel summing its corners in
    (row, offset group, tap, corner) order: a stable sort by destination, then a gather."""
    keys, order = torch.sort(dest, stable=True)
    first = int(torch.searchsorted(keys, torch.zeros((), dtype=keys.dtype, device=keys.device)))
    keys, order = keys[first:], order[first:]  # -1: corners off the map
    if keys.numel() == 0:
        return
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=keys.device)
    starts[1:] = torch.cumsum(counts, 0)
    BK = min(64, triton.next_power_of_2(geo.Cog)) if not interpreting() else triton.next_power_of_2(geo.Cog)
    _ordered_scatter_kernel[(uniq.numel(), triton.cdiv(geo.Cog, BK))](
        gin, gcol, cw, order.contiguous(), uniq.contiguous(), starts, geo.Cog, geo.H * geo.W, CDT=CDT, BK=BK,
    )
