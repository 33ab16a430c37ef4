"""Triton deformable RoI pooling vs the reference and the CPU kernel, in Triton's CPU interpreter.

Run by tests/test_triton_roi_pool.py through tests/triton_support.py (TRITON_INTERPRET=1, a subprocess).
Float64 throughout unless a case says otherwise: the interpreter computes in float64 exactly as
written, so the kernels must match the reference to rounding (1e-10).
"""
from __future__ import annotations

import torch

from dcnv2.ops import reference
from dcnv2.ops.triton import roi_pool as rp

D = torch.float64
TOL = 1e-10


def _inputs(seed=0, N=2, C=5, H=9, W=11, ph=3, pw=2, dtype=D):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype)
    rois = torch.tensor([
        [0, 1.0, 1.0, 7.0, 6.0],      # inside
        [1, -3.0, 2.0, 4.5, 12.0],    # partly outside, samples in [-1, 0)
        [0, 3.0, 3.0, 3.0, 3.0],      # empty (zero area)
        [1, 20.0, 20.0, 30.0, 30.0],  # wholly outside the image
        [1, 8.6, -0.9, 10.4, 2.2],    # touching the last column and the first row
    ], dtype=dtype)
    K = rois.shape[0]
    off = torch.randn(K, 2, ph, pw, generator=g, dtype=dtype)
    mask = torch.rand(K, 1, ph, pw, generator=g, dtype=dtype)
    return x, rois, off, mask


def _reference(x, rois, off, mask, ph, pw, scale, sr, gamma, aligned, grad):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, off, mask)]
    out = reference.deform_roi_pool(leaves[0], rois, leaves[1], leaves[2], (ph, pw), scale, sr, gamma, aligned)
    out.backward(grad)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _close(name, a, b, tol=TOL):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.1g}"


def _check_config(x, rois, off, mask, ph, pw, scale, sr, gamma, aligned, deterministic=False):
    ref_out, ref_grads = None, None
    out = rp.roi_pool_forward(x, rois, off, mask, ph, pw, scale, sr, gamma, aligned)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    ref_out, ref_grads = _reference(x, rois, off, mask, ph, pw, scale, sr, gamma, aligned, grad)
    tag = f"(sr={sr}, aligned={aligned}, offset={off is not None}, mask={mask is not None}, det={deterministic})"
    _close(f"output {tag}", out, ref_out)
    gin, goff, gmask = rp.roi_pool_backward(grad, x, rois, off, mask, ph, pw, scale, sr, gamma, aligned,
                                            deterministic=deterministic)
    _close(f"grad_input {tag}", gin, ref_grads[0])
    if off is not None:
        _close(f"grad_offset {tag}", goff, ref_grads[1])
    else:
        assert goff.numel() == 0
    if mask is not None:
        _close(f"grad_mask {tag}", gmask, ref_grads[2])
    else:
        assert gmask.numel() == 0


def case_modulated_matches_reference():
    x, rois, off, mask = _inputs()
    _check_config(x, rois, off, mask, 3, 2, 0.9, 2, 0.3, True)


def case_adaptive_grid_unaligned_matches_reference():
    x, rois, off, mask = _inputs(seed=1)
    _check_config(x, rois, off, mask, 3, 2, 0.7, 0, 0.1, False)


def case_dcnv1_and_roialign_match_reference():
    x, rois, off, mask = _inputs(seed=2)
    _check_config(x, rois, off, None, 3, 2, 1.0, 2, 0.2, True)  # DCNv1: offsets, no mask
    _check_config(x, rois, None, None, 3, 2, 0.5, 1, 0.1, True)  # RoIAlign
    _check_config(x, rois, None, mask, 3, 2, 0.5, 0, 0.1, True)  # mask only


def case_matches_roi_align_without_offsets():
    import torchvision

    x, rois, _, _ = _inputs(seed=3)
    out = rp.roi_pool_forward(x, rois, None, None, 3, 2, 0.8, 2, 0.1, True)
    ref = torchvision.ops.roi_align(x, rois, (3, 2), 0.8, 2, True)
    _close("output vs roi_align", out, ref)


def case_deterministic_path_matches_reference():
    x, rois, off, mask = _inputs(seed=4, C=3, ph=2, pw=2)
    _check_config(x, rois[:3], off[:3], mask[:3], 2, 2, 0.9, 2, 0.3, True, deterministic=True)


def case_deterministic_mode_avoids_atomics_and_repeats_bitwise():
    x, rois, off, mask = _inputs(seed=5, C=3, ph=2, pw=2)
    rois, off, mask = rois[:3], off[:3], mask[:3]
    out = rp.roi_pool_forward(x, rois, off, mask, 2, 2, 1.0, 2, 0.2, True)
    grad = torch.randn_like(out)
    launched = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    saved = rp._roi_bwd_atomic_kernel, rp._roi_bwd_ordered_kernel
    rp._roi_bwd_atomic_kernel = Spy("atomic", saved[0])
    rp._roi_bwd_ordered_kernel = Spy("ordered", saved[1])
    try:
        torch.use_deterministic_algorithms(True)
        try:
            first = rp.roi_pool_backward(grad, x, rois, off, mask, 2, 2, 1.0, 2, 0.2, True)
            second = rp.roi_pool_backward(grad, x, rois, off, mask, 2, 2, 1.0, 2, 0.2, True)
        finally:
            torch.use_deterministic_algorithms(False)
        assert launched == ["ordered", "ordered"], f"deterministic mode launched {launched}"
        rp.roi_pool_backward(grad, x, rois, off, mask, 2, 2, 1.0, 2, 0.2, True)
        assert launched[-1] == "atomic", f"default mode launched {launched[-1]}"
    finally:
        rp._roi_bwd_atomic_kernel, rp._roi_bwd_ordered_kernel = saved
    for a, b in zip(first, second):
        assert torch.equal(a, b), "two deterministic backward runs differ"


def case_nan_inf_offsets_match_cpu_kernel():
    import dcnv2  # noqa: F401  (registers the CPU kernels)

    x, rois, off, mask = _inputs(seed=6)
    off[0, 0, 0, 0] = float("nan")
    off[1, 1, 1, 1] = float("inf")
    off[4, 0, 2, 1] = float("-inf")
    off[3, :, 0, :] = float("nan")
    args = (3, 2, 0.9, 2, 0.3, True)
    out = rp.roi_pool_forward(x, rois, off, mask, *args)
    cpu = torch.ops.dcnv2.deform_roi_pool(x, rois, off, mask, *args)
    assert torch.isfinite(out).all(), "NaN/inf offsets must read as zero"
    _close("output vs CPU kernel", out, cpu)
    grad = torch.randn_like(out)
    ours = rp.roi_pool_backward(grad, x, rois, off, mask, *args)
    theirs = torch.ops.dcnv2._deform_roi_pool_backward(grad, x, rois, off, mask, *args)
    for name, a, b in zip(("grad_input", "grad_offset", "grad_mask"), ours, theirs):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        _close(f"{name} vs CPU kernel", a, b)


def case_no_rois_and_empty_channels():
    x, rois, off, mask = _inputs(seed=7)
    none = rois[:0]
    out = rp.roi_pool_forward(x, none, off[:0], mask[:0], 3, 2, 1.0, 2, 0.1, True)
    assert out.shape == (0, x.shape[1], 3, 2)
    gin, goff, gmask = rp.roi_pool_backward(out, x, none, off[:0], mask[:0], 3, 2, 1.0, 2, 0.1, True)
    assert gin.shape == x.shape and not gin.any() and goff.shape == (0, 2, 3, 2) and gmask.shape == (0, 1, 3, 2)


def case_huge_adaptive_grid_walks_only_the_map():
    import dcnv2  # noqa: F401

    x = torch.randn(1, 3, 6, 7, dtype=D)
    rois = torch.tensor([[0, -400.0, -300.0, 600.0, 500.0], [0, 1.0, 1.0, 5.0, 4.0]], dtype=D)
    off = torch.randn(2, 2, 2, 2, dtype=D) * 0.05
    mask = torch.rand(2, 1, 2, 2, dtype=D)
    args = (2, 2, 1.0, 0, 0.1, True)  # adaptive: 500 x 400 samples per bin, > 64 per axis
    out = rp.roi_pool_forward(x, rois, off, mask, *args)
    _close("output vs CPU kernel", out, torch.ops.dcnv2.deform_roi_pool(x, rois, off, mask, *args))
    grad = torch.randn_like(out)
    ours = rp.roi_pool_backward(grad, x, rois, off, mask, *args)
    theirs = torch.ops.dcnv2._deform_roi_pool_backward(grad, x, rois, off, mask, *args)
    for name, a, b in zip(("grad_input", "grad_offset", "grad_mask"), ours, theirs):
        _close(f"{name} vs CPU kernel", a, b, 1e-9)


def case_batch_independent_bitwise():
    x, rois, off, mask = _inputs(seed=8, ph=2, pw=2)
    sel = rois[:, 0] == 1
    alone_rois = rois[sel].clone()
    alone_rois[:, 0] = 0
    args = (2, 2, 0.9, 2, 0.3, True)
    full = rp.roi_pool_forward(x, rois, off, mask, *args)
    alone = rp.roi_pool_forward(x[1:], alone_rois, off[sel], mask[sel], *args)
    assert torch.equal(full[sel], alone), "a RoI's output depends on the rest of the batch"
    grad = torch.randn_like(full)
    for det in (False, True):
        g_full = rp.roi_pool_backward(grad, x, rois, off, mask, *args, deterministic=det)
        g_alone = rp.roi_pool_backward(grad[sel], x[1:], alone_rois, off[sel], mask[sel], *args, deterministic=det)
        assert torch.equal(g_full[0][1:], g_alone[0]), f"grad_input depends on the batch (det={det})"
        assert torch.equal(g_full[1][sel], g_alone[1]), f"grad_offset depends on the batch (det={det})"
        assert torch.equal(g_full[2][sel], g_alone[2]), f"grad_mask depends on the batch (det={det})"


def case_float32_and_half_precision():
    x, rois, off, mask = _inputs(seed=9)
    args = (3, 2, 0.9, 2, 0.3, True)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        xs, os_, ms = x.to(dtype), off.to(dtype), mask.to(dtype)
        out = rp.roi_pool_forward(xs, rois.to(dtype), os_, ms, *args)
        assert out.dtype == dtype
        ref, grads = _reference(xs.double(), rois.to(dtype).double(), os_.double(), ms.double(), *args,
                                torch.ones(out.shape, dtype=D))
        _close(f"{dtype} output", out, ref, tol)
        g = rp.roi_pool_backward(torch.ones_like(out), xs, rois.to(dtype), os_, ms, *args)
        assert all(t.dtype == dtype for t in g)
        _close(f"{dtype} grad_input", g[0], grads[0], tol)
        _close(f"{dtype} grad_mask", g[2], grads[2], tol * 4)
