"""The bfloat16 fast path of the CPU kernel (bf16 column tiles, oneDNN bf16 GEMM with float32 accumulation).

Forward and every gradient are compared with the float64 reference evaluated on the same bf16-rounded
inputs. Tolerance (stated once, here): the largest error of each result is at most BF16_TOL = 2e-2 of
that result's largest magnitude, and the mean error at most BF16_MEAN_TOL = 5e-3 of its mean magnitude
(measured on the random cases: at most 5.3e-3 and 2.8e-3). bf16 keeps 8 significant bits (a relative rounding step of 2^-8 = 3.9e-3): the columns, the GEMM result
and the returned tensors are each rounded once, and grad_weight sums one rounded GEMM result per tile.
"""
from __future__ import annotations

import pytest
import torch

from dcnv2.ops import deform_conv2d, reference
from dcnv2.ops._native import HAS_NATIVE
from isolated import results_under_env
from test_deform_conv import random_case, tiled_case

pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")

D = torch.float64
BF = torch.bfloat16
BF16_TOL = 2e-2
BF16_MEAN_TOL = 5e-3
NAMES = ("output", "input", "offset", "weight", "bias", "mask")


def bf16_leaves(x, off, w, b, mask):
    return [t.detach().to(BF).requires_grad_() for t in (x, off, w, b, mask)]


def run(leaves, conf, go):
    x, off, w, b, mask = leaves
    out = deform_conv2d(x, off, w, b, mask=mask, **conf)
    out.backward(go.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def assert_bf16_close(x, off, w, b, mask, conf, seed=1):
    leaves = bf16_leaves(x, off, w, b, mask)
    ref_leaves = [t.detach().to(D).requires_grad_() for t in leaves]  # the same bf16 values, in float64
    out_ref = reference.deform_conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[3],
                                      mask=ref_leaves[4], **conf)
    go = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(seed), dtype=D).to(BF)
    out_ref.backward(go.to(D))
    got = run(leaves, conf, go)
    expected = [out_ref.detach()] + [t.grad for t in ref_leaves]
    for name, a, e in zip(NAMES, got, expected):
        assert a.dtype == BF, f"{name} is {a.dtype}"
        err = (a.to(D) - e).abs()
        assert err.max() <= BF16_TOL * e.abs().max(), f"{name}: max error {err.max():.3g} vs {e.abs().max():.3g}"
        assert err.mean() <= BF16_MEAN_TOL * e.abs().mean(), f"{name}: mean error {err.mean():.3g}"
    return leaves, go, got


@pytest.mark.parametrize("seed", range(8))
def test_bf16_matches_float64_reference(seed):
    """Random grouped/offset-grouped configurations: strides, dilations, padding, odd kernels."""
    x, off, w, b, conf, mask = random_case(500 + seed, dtype=D)
    assert_bf16_close(x, off, w, b, mask, conf)


@pytest.mark.parametrize("groups", [1, 2])
def test_bf16_several_column_tiles_and_repeat_runs_bit_identical(groups):
    """An output larger than one bf16 column tile (4 MB = 3640 pixels of 9 x 64 channels), ending with a
    partial tile, and larger than one weight-gradient tile (16 MB = 14563 pixels: 2 tiles of 7500); a second
    run gives bit-identical output and gradients."""
    x, off, w, b, mask = tiled_case(11, 1, 64, 32, 125, 120, groups)
    conf = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    leaves, go, first = assert_bf16_close(x, off, w, b, mask, conf)
    for t in leaves:
        t.grad = None
    counts = torch.ops.dcnv2._deform_conv2d_backward_counts
    counts(x, True)
    second = run(leaves, conf, go)
    # bf16 columns: 2 weight tiles, 5 scatter tiles; a CPU without oneDNN's bf16 GEMM computes in float32,
    # whose columns take twice the bytes (3 weight tiles of 5000 rows, 9 scatter tiles of up to 1820)
    fills, w_gemms, col_gemms, scatters = counts(x, True).tolist()[:4]
    assert (fills, w_gemms, col_gemms, scatters) in [(2, 2 * groups, 5 * groups, 5), (3, 3 * groups, 9 * groups, 9)]
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), f"{name} differs between two runs"


def test_bf16_batch_independent_and_layout_independent():
    """Each image's output is bit-identical whether it runs alone or in a batch, and with a channels-last
    input and offset."""
    x, off, w, b, conf, mask = random_case(7, N=3, dtype=D)
    x, off, w, b, mask = (t.to(BF) for t in (x, off, w, b, mask))
    with torch.no_grad():
        batch = deform_conv2d(x, off, w, b, mask=mask, **conf)
        for i in range(3):
            alone = deform_conv2d(x[i:i + 1], off[i:i + 1], w, b, mask=mask[i:i + 1], **conf)
            assert torch.equal(alone, batch[i:i + 1])
        cl = torch.channels_last
        assert torch.equal(deform_conv2d(x.to(memory_format=cl), off.to(memory_format=cl), w, b, mask=mask,
                                         **conf), batch)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch's note when the oneDNN flags are set
def test_bf16_without_onednn():
    """With oneDNN switched off the tile GEMMs fall back to at::mm on bf16: still bf16 accurate."""
    x, off, w, b, conf, mask = random_case(9, dtype=D)
    with torch.backends.mkldnn.flags(enabled=False):
        assert_bf16_close(x, off, w, b, mask, conf)


def test_bf16_hostile_offsets_read_zero():
    """NaN/inf/huge offsets read zero (only the bias remains); a NaN at one tap stays local."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 9, 9, generator=g).to(BF)
    w = torch.randn(6, 8, 3, 3, generator=g).to(BF)
    b = torch.randn(6, generator=g).to(BF)
    mask = torch.rand(2, 9, 9, 9, generator=g).to(BF)
    for value in (float("nan"), float("inf"), -float("inf"), 1e30):
        off = torch.full((2, 18, 9, 9), value, dtype=BF)
        out = deform_conv2d(x, off, w, b, padding=1, mask=mask)
        assert torch.equal(out, b.view(1, -1, 1, 1).expand_as(out))
    off = torch.zeros(2, 18, 9, 9, dtype=BF)
    off[1, 0, 2, 3] = float("nan")
    out = deform_conv2d(x, off, w, b, padding=1, mask=mask)
    assert torch.isfinite(out).all()
    leaves = [t.clone().requires_grad_() for t in (x, off, w, mask)]
    deform_conv2d(leaves[0], leaves[1], leaves[2], b, padding=1, mask=leaves[3]).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_bf16_zero_offsets_match_dense_bf16_conv():
    """Zero offsets and a unit mask: the layer is a dense convolution, computed to bf16 accuracy."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 32, 12, 10, generator=g).to(BF)
    w = (torch.randn(16, 32, 3, 3, generator=g) * 0.1).to(BF)
    off = torch.zeros(2, 18, 12, 10, dtype=BF)
    out = deform_conv2d(x, off, w, padding=1, mask=torch.ones(2, 9, 12, 10, dtype=BF))
    expected = torch.nn.functional.conv2d(x.to(D), w.to(D), padding=1)
    assert out.dtype == BF
    assert (out.to(D) - expected).abs().max() <= BF16_TOL * expected.abs().max()


def _wide_fill_cases():
    """bf16 forward and gradients on channel counts that leave tails (C = 13, 40) and output sizes that leave
    the 8 x 8 transposes' edges, with and without bias."""
    outs = []
    for N, C, Co, H, W, bias in ((2, 13, 20, 11, 9, True), (1, 40, 33, 7, 10, False), (3, 64, 24, 6, 6, True)):
        g = torch.Generator().manual_seed(C)
        x = torch.randn(N, C, H, W, generator=g).to(BF).requires_grad_()
        w = (torch.randn(Co, C, 3, 3, generator=g) * 0.1).to(BF).requires_grad_()
        off = (torch.randn(N, 18, H, W, generator=g) * 2).to(BF).requires_grad_()
        m = torch.rand(N, 9, H, W, generator=g).to(BF).requires_grad_()
        b = torch.randn(Co, generator=g).to(BF) if bias else None
        y = deform_conv2d(x, off, w, b, padding=1, mask=m)
        y.backward(torch.randn(y.shape, generator=g).to(BF))
        outs += [y.detach(), x.grad, w.grad, off.grad, m.grad]
    return outs


def test_bf16_wide_fill_and_transposes_bit_identical_to_the_avx2_loops():
    """On an AVX-512 CPU the bf16 columns are sampled by 16-lane loops (masked tails); DCNV2_FILL=avx2 (read
    once per process) keeps the 8-lane ones. Both must give the same bits, forward and backward."""
    narrow = results_under_env(__file__, "_wide_fill_cases", {"DCNV2_FILL": "avx2"})
    for a, b in zip(_wide_fill_cases(), narrow, strict=True):
        assert a.dtype == BF and torch.equal(a.view(torch.int16), b.view(torch.int16))
