"""The dcnv2 ops on a CUDA device (the Triton kernels), checked against the pure-PyTorch reference at real sizes.

Marked ``cuda``; skipped without a GPU. ``scripts/gpu_check.sh`` runs them on a lent GPU machine
(``pytest -m cuda tests/test_cuda.py``). ``DCNV2_CUDA_TESTS_ON_CPU=1`` runs the same checks on the CPU kernels
at small sizes, which rehearses the tests themselves where there is no GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

import dcnv2
from dcnv2.ops import reference

ON_GPU = torch.cuda.is_available()
REHEARSAL = os.environ.get("DCNV2_CUDA_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not (ON_GPU or REHEARSAL), reason="no CUDA device")]
DEV = "cuda" if ON_GPU else "cpu"
# (N, C, H, W, Cout): real layer sizes on a GPU, small ones in the CPU rehearsal
CONV = (2, 64, 32, 40, 64) if ON_GPU else (2, 8, 7, 9, 6)
ROI = dict(C=64, H=38, W=50, K=256) if ON_GPU else dict(C=8, H=9, W=11, K=12)


def _conv_inputs(dtype=torch.float64, scale=2.0, seed=0):
    N, C, H, W, Cout = CONV
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype)
    w = torch.randn(Cout, C, 3, 3, generator=g, dtype=dtype) / (3 * C ** 0.5)
    off = torch.randn(N, 18, H, W, generator=g, dtype=dtype) * scale
    mask = torch.rand(N, 9, H, W, generator=g, dtype=dtype)
    b = torch.randn(Cout, generator=g, dtype=dtype)
    return [t.to(DEV).requires_grad_() for t in (x, w, off, mask, b)]


def _conv(fn, x, w, off, mask, b):
    return fn(x, off, w, b, stride=(1, 1), padding=(1, 1), dilation=(1, 1), mask=mask)


def _grads(out, leaves, grad):
    return torch.autograd.grad(out, leaves, grad)


def test_conv_float64_forward_and_every_gradient_match_the_reference():
    leaves = _conv_inputs()
    out = _conv(dcnv2.ops.deform_conv2d, *leaves)
    grad = torch.randn_like(out)
    ref_leaves = [t.detach().cpu().requires_grad_() for t in leaves]
    ref = _conv(reference.deform_conv2d, *ref_leaves)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-9, atol=1e-9)
    names = ("input", "weight", "offset", "mask", "bias")
    for name, ours, theirs in zip(names, _grads(out, leaves, grad), _grads(ref, ref_leaves, grad.cpu())):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-8, atol=1e-8, msg=lambda m: f"grad {name}: {m}")


def test_conv_nan_and_inf_offsets_do_not_crash_and_stay_local():
    x, w, off, mask, b = (t.detach() for t in _conv_inputs(torch.float32))
    off = off.clone()
    off[0, :, 0, 0] = float("nan")
    off[0, :, 1, 1] = float("inf")
    out = _conv(dcnv2.ops.deform_conv2d, x, w, off, mask, b)
    if DEV == "cuda":
        torch.cuda.synchronize()
    finite = torch.isfinite(out)
    assert finite[1].all(), "a non-finite offset of image 0 reached image 1"
    assert finite[0, :, 2:, 2:].all(), "non-finite offsets at two pixels spread to others"


def test_conv_images_of_a_batch_are_independent():
    x, w, off, mask, b = (t.detach() for t in _conv_inputs(torch.float32))
    both = _conv(dcnv2.ops.deform_conv2d, x, w, off, mask, b)
    one = _conv(dcnv2.ops.deform_conv2d, x[1:], w, off[1:], mask[1:], b)
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)


def test_deterministic_mode_backward_is_bit_identical():
    leaves = _conv_inputs(torch.float32)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = _conv(dcnv2.ops.deform_conv2d, *leaves)
            runs.append(_grads(out, leaves, torch.ones_like(out)))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _roi_inputs(dtype=torch.float64, K=None):
    C, H, W = ROI["C"], ROI["H"], ROI["W"]
    K = ROI["K"] if K is None else K
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, C, H, W, generator=g, dtype=dtype)
    xy = torch.rand(K, 2, generator=g, dtype=dtype) * torch.tensor([W * 8.0, H * 8.0], dtype=dtype) * 0.7
    wh = 8 + torch.rand(K, 2, generator=g, dtype=dtype) * 40
    rois = torch.cat([torch.randint(0, 2, (K, 1), generator=g).to(dtype), xy, xy + wh], 1)
    off = torch.randn(K, 2, 7, 7, generator=g, dtype=dtype) * 0.1
    mask = torch.rand(K, 1, 7, 7, generator=g, dtype=dtype)
    return x.to(DEV).requires_grad_(), rois.to(DEV), off.to(DEV).requires_grad_(), mask.to(DEV).requires_grad_()


def test_roi_pool_float64_forward_and_gradients_match_the_reference():
    x, rois, off, mask = _roi_inputs()
    out = dcnv2.ops.deform_roi_pool(x, rois, off, mask, 7, 1 / 8, 2, 0.1, True)
    ref_leaves = [t.detach().cpu().requires_grad_() for t in (x, off, mask)]
    ref = reference.deform_roi_pool(ref_leaves[0], rois.cpu(), ref_leaves[1], ref_leaves[2], (7, 7), 1 / 8, 2, 0.1,
                                    True)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-9, atol=1e-9)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, off, mask), grad)
    theirs = torch.autograd.grad(ref, ref_leaves, grad.cpu())
    for name, a, b in zip(("input", "offset", "mask"), ours, theirs):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-8, msg=lambda m: f"grad {name}: {m}")


def test_roi_pool_with_no_rois_gives_an_empty_result_and_zero_gradient():
    x, rois, off, mask = _roi_inputs(torch.float32, K=0)
    out = dcnv2.ops.deform_roi_pool(x, rois, off, mask, 7, 1 / 8, 2, 0.1, True)
    assert out.shape == (0, ROI["C"], 7, 7)
    (gx,) = torch.autograd.grad(out.sum(), (x,), allow_unused=True)
    assert gx is None or not gx.any()
