"""dcnv2.ops.deform_conv2d: checked against torchvision's op, the pure-PyTorch reference and gradcheck."""
from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
import torchvision

from dcnv2.ops import deform_conv2d, reference
from dcnv2.ops._native import HAS_NATIVE
from isolated import results_under_env

D = torch.float64


def random_case(seed: int, N: int | None = None, with_mask: bool = True, dtype=D, scale: float = 2.5):
    """A random asymmetric configuration with non-integer offsets reaching outside the map."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    groups = rng.choice([1, 2, 3])
    og = rng.choice([1, 2, 4]) if groups != 3 else rng.choice([1, 3])
    Cg = rng.choice([1, 2, 4])
    C = Cg * groups * og // __import__("math").gcd(groups, og)  # divisible by groups and offset groups
    Cout = groups * rng.choice([1, 2, 3])
    kh, kw = rng.choice([1, 2, 3]), rng.choice([1, 3, 4])
    stride = (rng.choice([1, 2]), rng.choice([1, 3]))
    padding = (rng.choice([0, 1, 2]), rng.choice([0, 1]))
    dilation = (rng.choice([1, 2]), rng.choice([1, 3]))
    H, W = rng.randint(kh * dilation[0] + 1, 12), rng.randint(kw * dilation[1] + 2, 16)
    N = rng.choice([1, 2, 3]) if N is None else N
    Ho = (H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    Wo = (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    K = kh * kw
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype)
    w = torch.randn(Cout, C // groups, kh, kw, generator=g, dtype=dtype)
    b = torch.randn(Cout, generator=g, dtype=dtype)
    off = (torch.rand(N, 2 * og * K, Ho, Wo, generator=g, dtype=dtype) - 0.5) * 2 * scale
    mask = torch.rand(N, og * K, Ho, Wo, generator=g, dtype=dtype) if with_mask else None
    return x, off, w, b, dict(stride=stride, padding=padding, dilation=dilation), mask


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("with_mask", [True, False])
def test_matches_torchvision_and_reference(seed, with_mask):
    x, off, w, b, conf, mask = random_case(seed, with_mask=with_mask)
    ours = deform_conv2d(x, off, w, b, mask=mask, **conf)
    tv = torchvision.ops.deform_conv2d(x, off, w, b, mask=mask, **conf)
    ref = reference.deform_conv2d(x, off, w, b, mask=mask, **conf)
    torch.testing.assert_close(ours, tv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(8))
def test_gradients_match_torchvision(seed):
    x, off, w, b, conf, mask = random_case(100 + seed)
    grads = []
    for fn in (deform_conv2d, torchvision.ops.deform_conv2d):
        leaves = [t.clone().requires_grad_() for t in (x, off, w, b, mask)]
        out = fn(leaves[0], leaves[1], leaves[2], leaves[3], mask=leaves[4], **conf)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=D)).view_as(out))
        grads.append([t.grad for t in leaves])
    for name, a, e in zip(("input", "offset", "weight", "bias", "mask"), *grads):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("N", [0, 1, 33])
def test_batch_sizes(N):
    x, off, w, b, conf, mask = random_case(7, N=N)
    ours = deform_conv2d(x, off, w, b, mask=mask, **conf)
    ref = reference.deform_conv2d(x, off, w, b, mask=mask, **conf)
    assert ours.shape == ref.shape and ours.shape[0] == N
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    if N == 0:
        leaves = [t.clone().requires_grad_() for t in (x, off, w, b, mask)]
        deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], mask=leaves[4], **conf).sum().backward()
        assert all(t.grad is not None and not t.grad.any() for t in leaves)


def test_zero_offset_unit_mask_is_conv2d():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 12, generator=g, dtype=D)
    w = torch.randn(4, 3, 3, 2, generator=g, dtype=D)
    b = torch.randn(4, generator=g, dtype=D)
    conf = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    expected = F.conv2d(x, w, b, groups=2, **conf)
    Ho, Wo = expected.shape[-2:]
    off = torch.zeros(2, 2 * 6, Ho, Wo, dtype=D)
    mask = torch.ones(2, 6, Ho, Wo, dtype=D)
    torch.testing.assert_close(deform_conv2d(x, off, w, b, mask=mask, **conf), expected)
    torch.testing.assert_close(deform_conv2d(x, off, w, b, **conf), expected)


def test_integer_offsets_shift_the_image():
    """An offset of exactly (+1, -2) everywhere samples the shifted map (zero outside)."""
    x = torch.randn(1, 3, 8, 9, dtype=D)
    w = torch.zeros(3, 3, 1, 1, dtype=D)
    w[:, :, 0, 0] = torch.eye(3, dtype=D)
    off = torch.zeros(1, 2, 8, 9, dtype=D)
    off[:, 0], off[:, 1] = 1.0, -2.0
    out = deform_conv2d(x, off, w)
    expected = torch.zeros_like(x)
    expected[:, :, :7, 2:] = x[:, :, 1:, :7]
    torch.testing.assert_close(out, expected)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 6, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=D, requires_grad=True)
    # offsets kept away from integers (where bilinear sampling is not differentiable)
    off = (torch.randint(-3, 3, (2, 2 * 2 * 6, 5, 2), generator=g).to(D) + 0.3
           + 0.4 * torch.rand(2, 24, 5, 2, generator=g, dtype=D)).requires_grad_()
    mask = torch.rand(2, 2 * 6, 5, 2, generator=g, dtype=D, requires_grad=True)
    fn = lambda *t: deform_conv2d(t[0], t[1], t[2], t[3], stride=(1, 2), padding=(1, 0), dilation=(1, 2), mask=t[4])
    assert torch.autograd.gradcheck(fn, (x, off, w, b, mask), eps=1e-6, atol=1e-5)


def test_layouts_channels_last_and_noncontiguous():
    x, off, w, b, conf, mask = random_case(11, N=2)
    expected = deform_conv2d(x, off, w, b, mask=mask, **conf)
    cl = deform_conv2d(x.to(memory_format=torch.channels_last), off.to(memory_format=torch.channels_last),
                       w.to(memory_format=torch.channels_last), b, mask=mask.to(memory_format=torch.channels_last),
                       **conf)
    torch.testing.assert_close(cl, expected, rtol=1e-12, atol=1e-12)
    # non-contiguous: every tensor a strided view into a larger buffer
    big = lambda t: torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]  # noqa: E731
    nc = deform_conv2d(big(x), big(off), big(w), big(b), mask=big(mask), **conf)
    assert not big(x).is_contiguous()
    torch.testing.assert_close(nc, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_low_precision(dtype, tol):
    x, off, w, b, conf, mask = random_case(5, N=2, dtype=torch.float64)
    expected = reference.deform_conv2d(*(t.to(dtype).to(D) for t in (x, off, w, b)), mask=mask.to(dtype).to(D),
                                       **conf)
    out = deform_conv2d(x.to(dtype), off.to(dtype), w.to(dtype), b.to(dtype), mask=mask.to(dtype), **conf)
    assert out.dtype == dtype
    scale = expected.abs().max()
    assert (out.to(D) - expected).abs().max() <= tol * scale
    leaves = [t.to(dtype).requires_grad_() for t in (x, off, w, b, mask)]
    deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], mask=leaves[4], **conf).sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in leaves)


def _float32_vs_float64(x, off, w, b, mask, conf):
    leaves64 = [t.detach().to(D).clone().requires_grad_() for t in (x, off, w, b, mask)]
    leaves32 = [t.detach().to(torch.float32).requires_grad_() for t in (x, off, w, b, mask)]
    out64 = deform_conv2d(leaves64[0], leaves64[1], leaves64[2], leaves64[3], mask=leaves64[4], **conf)
    out32 = deform_conv2d(leaves32[0], leaves32[1], leaves32[2], leaves32[3], mask=leaves32[4], **conf)
    go = torch.randn(out64.shape, generator=torch.Generator().manual_seed(1), dtype=D)
    out64.backward(go)
    out32.backward(go.float())
    for name, a, e in [("output", out32, out64)] + [(n, l32.grad, l64.grad) for n, l32, l64 in
                                                    zip(("input", "offset", "weight", "bias", "mask"),
                                                        leaves32, leaves64)]:
        err = (a.to(D) - e).abs().max().item()
        assert err <= 2e-5 * max(e.abs().max().item(), 1.0), f"{name}: float32 is off by {err}"


@pytest.mark.parametrize("seed", range(12))
def test_float32_matches_float64(seed):
    """float32 runs its own GEMM path (oneDNN where torch has it): forward and every gradient agree with
    float64 on random grouped configurations."""
    x, off, w, b, conf, mask = random_case(300 + seed)
    _float32_vs_float64(x, off, w, b, mask, conf)


def tiled_case(seed, N, C, Cout, H, W, groups):
    """A 3x3 layer (stride 1, padding 1) in float64, large enough to span several of the kernel's column tiles:
    (x, off, w, b, mask)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=D)
    w = torch.randn(Cout, C // groups, 3, 3, generator=g, dtype=D) * 0.1
    b = torch.randn(Cout, generator=g, dtype=D)
    off = torch.randn(N, 18, H, W, generator=g, dtype=D) * 2
    mask = torch.rand(N, 9, H, W, generator=g, dtype=D)
    return x, off, w, b, mask


@pytest.mark.parametrize("groups", [1, 2])
def test_float32_several_column_tiles(groups):
    """An output larger than one column tile (4 MB), ending with a partial tile."""
    x, off, w, b, mask = tiled_case(7, 2, 64, 48, 52, 50, groups)
    conf = dict(stride=1, padding=1, dilation=1)
    _float32_vs_float64(x, off, w, b, mask, conf)


@pytest.mark.parametrize("groups", [1, 2])
def test_backward_weight_gradient_tiles_are_16mb_the_scatter_tiles_4mb(groups):
    """The backward's weight gradient runs over tiles of up to 16 MB of columns, cut into equal tiles; its
    grad_col GEMM and scatter pass keep 4 MB tiles. 7688 pixels of 9 x 64 float32 channels (2304 bytes a
    pixel): 2 weight-gradient tiles of 3844 rows and 5 scatter tiles (4 of 1820, one partial); every gradient
    agrees with float64 and the kernel's counters show those tiles."""
    x, off, w, b, mask = tiled_case(8, 2, 64, 32, 62, 62, groups)
    conf = dict(stride=1, padding=1, dilation=1)
    counts = torch.ops.dcnv2._deform_conv2d_backward_counts
    leaves = [t.float().requires_grad_() for t in (x, off, w, b, mask)]
    out = deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], mask=leaves[4], **conf)
    counts(x, True)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)))
    fills, w_gemms, col_gemms, scatters, dot_only, scatter_only = counts(x, True).tolist()
    assert (fills, w_gemms, col_gemms, scatters, dot_only, scatter_only) == (2, 2 * groups, 5 * groups, 5, 0, 0)
    _float32_vs_float64(x, off, w, b, mask, conf)


@pytest.mark.parametrize("groups", [1, 2])
def test_float32_fused_blocks_and_float64_tile_parallel_forward(groups):
    """With two threads: the float32 forward of a small weight runs in fused blocks, the float64 one in tiles, each
    thread filling and multiplying tiles of its own (one equal share each, the last tile partial); the two agree,
    and every gradient too."""
    torch.set_num_threads(2)  # conftest puts the session's count back
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 64, 83, 79, generator=g, dtype=D)  # 13114 pixels: float64 makes 30 tiles of 438
    w = torch.randn(48, 64 // groups, 3, 3, generator=g, dtype=D) * 0.1
    b = torch.randn(48, generator=g, dtype=D)
    off = torch.randn(2, 18, 83, 79, generator=g, dtype=D) * 2
    mask = torch.rand(2, 9, 83, 79, generator=g, dtype=D)
    counts = torch.ops.dcnv2._deform_conv2d_forward_counts
    counts(x, True)
    _float32_vs_float64(x, off, w, b, mask, dict(stride=1, padding=1, dilation=1))
    tile_parallel, tile_serial, tiles, fused = counts(x, True).tolist()
    assert (tile_parallel, tile_serial, fused) == (1, 0, 1) and tiles >= 2  # float64: each thread its tiles


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")
@pytest.mark.parametrize("threads, pixels, split", [(1, 40 * 40, "serial"), (2, 40 * 40, "parallel"),
                                                    (2, 20 * 20, "serial")])
def test_forward_split_follows_the_thread_count_and_the_size(threads, pixels, split):
    """The tile path (float64 here): one thread, or fewer than 4 * 64 output pixels per thread, runs the tiles one
    after another (parallel inside each tile); otherwise each thread runs its own tiles. Both give the same
    output."""
    torch.set_num_threads(threads)  # conftest puts the session's count back
    side = int(pixels ** 0.5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, side, side, generator=g, dtype=D)
    w = torch.randn(4, 8, 3, 3, generator=g, dtype=D)
    off = torch.randn(1, 18, side, side, generator=g, dtype=D)
    counts = torch.ops.dcnv2._deform_conv2d_forward_counts
    counts(x, True)
    out = deform_conv2d(x, off, w, padding=1)
    assert counts(x, True).tolist()[:2] == ([1, 0] if split == "parallel" else [0, 1])
    torch.testing.assert_close(out, reference.deform_conv2d(x, off, w, padding=(1, 1)), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")
@pytest.mark.parametrize("channels, side, tiles", [(64, 40, 4), (512, 20, 2), (512, 24, 3)])
def test_forward_tiles_are_2mb_and_at_least_256_rows(channels, side, tiles):
    """One thread, the tile path (float64 here): columns of 64 channels (4608 bytes a pixel) make 2 MB tiles of
    455 rows, so 1600 pixels take 4 tiles; 512 channels (36 KB a pixel) would make 56-row tiles, and the 256-row
    floor gives 2 tiles for 400 pixels and 3 for 576."""
    torch.set_num_threads(1)  # conftest puts the session's count back
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, channels, side, side, generator=g, dtype=D)
    w = torch.randn(8, channels, 3, 3, generator=g, dtype=D) * 0.05
    off = torch.randn(1, 18, side, side, generator=g, dtype=D)
    counts = torch.ops.dcnv2._deform_conv2d_forward_counts
    counts(x, True)
    out = deform_conv2d(x, off, w, padding=1)
    assert counts(x, True).tolist() == [0, 1, tiles, 0]
    torch.testing.assert_close(out, reference.deform_conv2d(x, off, w, padding=(1, 1)), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype, C, Cout, fused", [(torch.float32, 128, 128, True), (torch.float32, 512, 64, False),
                                                   (torch.bfloat16, 128, 128, False), (D, 128, 128, False)])
def test_fused_blocks_take_float32_weights_up_to_1mb(dtype, C, Cout, fused):
    """The fused blocks run the float32 forward where the weight fits in 1 MB (128 x 128 x 3 x 3: 590 KB); a
    larger weight (512 -> 64: 1.2 MB), bfloat16 and float64 keep the tiles."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, C, 6, 7, generator=g).to(dtype)
    w = (torch.randn(Cout, C, 3, 3, generator=g) * 0.05).to(dtype)
    off = torch.randn(2, 18, 6, 7, generator=g).to(dtype)
    counts = torch.ops.dcnv2._deform_conv2d_forward_counts
    counts(x, True)
    deform_conv2d(x, off, w, padding=1)
    tile_parallel, tile_serial, _, in_blocks = counts(x, True).tolist()
    assert (in_blocks, tile_parallel + tile_serial) == ((1, 0) if fused else (0, 1))


def _fused_cases():
    """float32 forwards that the fused blocks take: NCHW and channels-last, groups and offset groups, bias, stride and
    dilation, a batch whose last block is partial, NaN and far-out offsets."""
    outs = []
    confs = [dict(groups=1, og=1, stride=1, dilation=1), dict(groups=2, og=2, stride=2, dilation=1),
             dict(groups=1, og=4, stride=1, dilation=2)]
    for i, (conf, layout) in enumerate(itertools.product(confs, (torch.contiguous_format, torch.channels_last))):
        g = torch.Generator().manual_seed(40 + i)
        N, C, Cout, H, W = 3, 64, 48, 13, 11
        s, d, og = conf["stride"], conf["dilation"], conf["og"]
        Ho, Wo = (H + 2 - d * 2 - 1) // s + 1, (W + 2 - d * 2 - 1) // s + 1
        x = torch.randn(N, C, H, W, generator=g).contiguous(memory_format=layout)
        w = torch.randn(Cout, C // conf["groups"], 3, 3, generator=g) * 0.1
        b = torch.randn(Cout, generator=g)
        off = torch.randn(N, og * 18, Ho, Wo, generator=g) * 2
        off[0, 0, 1, 1], off[1, 3, 0, 2], off[2, 5, 2, 0] = float("nan"), float("inf"), -1e9
        mask = torch.rand(N, og * 9, Ho, Wo, generator=g)
        off, mask = off.contiguous(memory_format=layout), mask.contiguous(memory_format=layout)
        outs.append(deform_conv2d(x, off, w, b, stride=s, padding=1, dilation=d, mask=mask))
    return outs


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")
def test_fused_blocks_agree_with_the_tile_path():
    """DCNV2_FWD_GEMM=tiles (read once per process) sends the same forwards through the tiles: the same numbers
    up to float32 rounding (the GEMMs sum in another order), in the same layout."""
    fused = _fused_cases()
    tiles = results_under_env(__file__, "_fused_cases", {"DCNV2_FWD_GEMM": "tiles"})
    for a, t in zip(fused, tiles):
        assert a.is_contiguous(memory_format=torch.channels_last) == t.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")
def test_fused_blocks_same_bits_whatever_the_batch_and_the_threads():
    """The blocks of 64 output pixels straddle images (63 pixels an image), and the last one is partial: each
    image alone gives the bits it gets inside the batch, with one thread or two."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 128, 7, 9, generator=g)
    w = torch.randn(128, 128, 3, 3, generator=g) * 0.05
    b = torch.randn(128, generator=g)
    off = torch.randn(5, 18, 7, 9, generator=g) * 2
    mask = torch.rand(5, 9, 7, 9, generator=g)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # conftest puts the session's count back
        runs.append(deform_conv2d(x, off, w, b, padding=1, mask=mask))
        for i in range(5):
            assert torch.equal(deform_conv2d(x[i:i + 1], off[i:i + 1], w, b, padding=1, mask=mask[i:i + 1]),
                               runs[-1][i:i + 1])
    assert torch.equal(runs[0], runs[1])


def test_backward_is_deterministic():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 20, 24, requires_grad=True)
    w = torch.randn(32, 64, 3, 3, requires_grad=True)
    off = (torch.randn(2, 18, 20, 24) * 3).requires_grad_()
    mask = torch.rand(2, 9, 20, 24, requires_grad=True)
    go = torch.randn(2, 32, 20, 24)
    runs = []
    for _ in range(2):
        for t in (x, w, off, mask):
            t.grad = None
        deform_conv2d(x, off, w, padding=1, mask=mask).backward(go)
        runs.append([t.grad.clone() for t in (x, w, off, mask)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")
@pytest.mark.parametrize("channels", [64, 128])  # 32- and 64-channel blocks in the scatter pass
def test_same_bits_with_one_and_two_threads(channels):
    """The backward's channel blocks come from the shapes alone, so the output and every gradient have the
    same bits whatever the thread count."""
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # conftest puts the session's count back
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, channels, 20, 24, generator=g).requires_grad_()
        w = (torch.randn(32, channels, 3, 3, generator=g) * 0.1).requires_grad_()
        off = (torch.randn(2, 18, 20, 24, generator=g) * 3).requires_grad_()
        mask = torch.rand(2, 9, 20, 24, generator=g).requires_grad_()
        out = deform_conv2d(x, off, w, padding=1, mask=mask)
        out.backward(torch.randn(2, 32, 20, 24, generator=g))
        runs.append([out.detach()] + [t.grad for t in (x, w, off, mask)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _scatter_cases():
    """Every gradient of the backward op, float32 and bfloat16, under each output mask, on blocks of 64, 32 and 16
    channels (C = 128, 64, 48) and a block the four-corner loops do not take (C = 21), offsets reaching past the
    border (taps with fewer than four corners)."""
    outs = []
    for dtype, C in itertools.product((torch.float32, torch.bfloat16), (128, 64, 48, 21)):
        g = torch.Generator().manual_seed(C)
        x = torch.randn(2, C, 7, 9, generator=g).to(dtype)
        w = (torch.randn(8, C, 3, 3, generator=g) * 0.1).to(dtype)
        off = (torch.randn(2, 18, 7, 9, generator=g) * 3).to(dtype)
        m = torch.rand(2, 9, 7, 9, generator=g).to(dtype)
        go = torch.randn(2, 8, 7, 9, generator=g).to(dtype)
        for need in itertools.product((True, False), repeat=3):
            if any(need):
                outs += torch.ops.dcnv2._deform_conv2d_backward(go, x, w, off, m, None, [1, 1], [1, 1], [1, 1], 1, 1,
                                                                list(need))[:4]
    return outs


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")
def test_four_corner_scatter_bit_identical_to_the_per_corner_loops():
    """The scatter pass reads a tap's run of grad_col once for its four corners; DCNV2_SCATTER=per-corner (read
    once per process) keeps the loops of one corner at a time. Every gradient must have the same bits."""
    per_corner = results_under_env(__file__, "_scatter_cases", {"DCNV2_SCATTER": "per-corner"})
    ours = _scatter_cases()
    assert len(ours) == len(per_corner) == 2 * 4 * 7 * 4
    for a, b in zip(ours, per_corner, strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.int16), b.view(-1).view(torch.int16))
    assert any(a.abs().sum() > 0 for a in ours)


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")
def test_opcheck():
    x, off, w, b, conf, mask = random_case(21, N=2, dtype=torch.float32)
    for m, bias in ((mask, b), (None, None)):
        args = (x.requires_grad_(), w.requires_grad_(), off.requires_grad_(),
                m.requires_grad_() if m is not None else None, bias, list(conf["stride"]),
                list(conf["padding"]), list(conf["dilation"]), x.shape[1] // w.shape[1], off.shape[1] // (2 * w.shape[2] * w.shape[3]))
        torch.library.opcheck(torch.ops.dcnv2.deform_conv2d.default, args)


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")
def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    x, off, w, b, conf, mask = random_case(9, N=2, dtype=torch.float32)

    def fn(x, off, w, b, mask):
        return (deform_conv2d(x, off, w, b, mask=mask, **conf).relu() * 2).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves_c = [t.clone().requires_grad_() for t in (x, off, w, b, mask)]
    leaves_e = [t.clone().requires_grad_() for t in (x, off, w, b, mask)]
    out_c, out_e = compiled(*leaves_c), fn(*leaves_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for a, e in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, e.grad)


def test_reference_path_on_meta_device_shapes():
    """On a device without a native kernel the op runs the reference (meta gives shapes only)."""
    x, off, w, b, conf, mask = random_case(2, N=2)
    out = deform_conv2d(x.to("meta"), off.to("meta"), w.to("meta"), b.to("meta"), mask=mask.to("meta"), **conf)
    assert out.shape == deform_conv2d(x, off, w, b, mask=mask, **conf).shape


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("output_mask", [(True, False, False), (False, True, False), (False, False, True)])
def test_backward_op_returns_zeros_for_gradients_not_asked_for(output_mask, layout):
    """Called directly, the backward op returns every gradient with its tensor's shape, dtype and layout; the ones
    output_mask leaves out are zeros, the others equal the full backward's."""
    g = torch.Generator().manual_seed(5)
    x, w, off, mask = (t.contiguous(memory_format=layout) for t in (
        torch.randn(2, 8, 7, 6, generator=g), torch.randn(4, 8, 3, 3, generator=g),
        torch.randn(2, 18, 7, 6, generator=g), torch.rand(2, 9, 7, 6, generator=g)))
    go = torch.randn(2, 4, 7, 6, generator=g).contiguous(memory_format=layout)
    conf = ([1, 1], [1, 1], [1, 1], 1, 1)
    op = torch.ops.dcnv2._deform_conv2d_backward
    full = op(go, x, w, off, mask, None, *conf, [True, True, True])
    part = op(go, x, w, off, mask, None, *conf, list(output_mask))
    asked = (output_mask[0], output_mask[1], output_mask[2], output_mask[2])
    for name, f, p, t, a in zip(("input", "weight", "offset", "mask"), full, part, (x, w, off, mask), asked):
        assert p.shape == t.shape and p.dtype == t.dtype, name
        assert p.is_contiguous(memory_format=layout), name
        assert torch.equal(p, f) if a else torch.equal(p, torch.zeros_like(t)), name


@pytest.mark.parametrize("dtype, C", [(torch.float32, 16), (torch.float32, 21), (torch.bfloat16, 21)])
@pytest.mark.parametrize("req", [r for r in __import__("itertools").product((False, True), repeat=4) if any(r)])
def test_backward_computes_only_the_gradients_autograd_asks_for(req, dtype, C):
    """Every subset of (input, weight, offset, mask) requiring grad: the gradients computed equal the full
    backward's bit for bit, the others are None, and the kernel's pass counters show the skipped passes
    (columns + grad_w GEMM only for the weight; grad_col + scatter only for input/offset/mask; the scatter
    without its input writes when only offset/mask are asked for, without its corner dot products when only
    the input is). C = 21 runs the scatter's vector loop and its tail."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, C, 9, 8, generator=g).to(dtype)
    w = torch.randn(8, C, 3, 3, generator=g).to(dtype)
    off = (torch.randn(2, 18, 9, 8, generator=g) * 2).to(dtype)
    mask = torch.rand(2, 9, 9, 8, generator=g).to(dtype)
    go = torch.randn(2, 8, 9, 8, generator=g).to(dtype)
    counts = torch.ops.dcnv2._deform_conv2d_backward_counts

    def run(flags):
        ts = [t.clone().requires_grad_(f) for t, f in zip((x, w, off, mask), flags)]
        counts(x, True)
        deform_conv2d(ts[0], ts[2], ts[1], padding=1, mask=ts[3]).backward(go)
        return [t.grad for t in ts], counts(x, True).tolist()

    full, _ = run((True,) * 4)
    grads, (fills, w_gemms, col_gemms, scatters, dot_only, scatter_only) = run(req)
    for got, want, asked in zip(grads, full, req):
        assert (got is None) != asked
        if asked:
            assert torch.equal(got, want)
    need_in, need_w, need_off = req[0], req[1], req[2] or req[3]
    assert (fills > 0, w_gemms > 0) == (need_w, need_w)
    assert (col_gemms > 0) == (need_in or need_off)
    assert (scatters > 0, dot_only > 0, scatter_only > 0) == (need_in, need_off and not need_in,
                                                              need_in and not need_off)
