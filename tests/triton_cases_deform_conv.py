"""Triton deformable convolution vs the reference and the CPU kernel, in Triton's CPU interpreter.

Run by tests/test_triton_deform_conv.py through tests/triton_support.py (TRITON_INTERPRET=1, a
subprocess). Float64 unless a case says otherwise: the interpreter runs ``tl.dot`` in float64 too,
so forward and every gradient must match the reference to rounding (1e-10).
"""
from __future__ import annotations

import torch

from dcnv2.ops import reference
from dcnv2.ops.triton import deform_conv as dc

D = torch.float64
TOL = 1e-10

# (N, C, H, W, Cout, G, OG, kh, kw, stride, padding, dilation, mask, bias)
CONFIGS = [
    (2, 4, 7, 8, 6, 2, 2, 3, 2, (1, 2), (1, 0), (2, 1), True, True),   # asymmetric everything
    (1, 6, 5, 6, 4, 2, 3, 2, 3, (2, 1), (0, 2), (1, 2), True, False),  # groups 2, offset groups 3: S = 1
    (2, 3, 6, 5, 5, 1, 1, 3, 3, (1, 1), (1, 1), (1, 1), False, True),  # DCNv1, odd channel counts
    (1, 20, 4, 5, 18, 1, 1, 1, 1, (1, 1), (0, 0), (1, 1), True, True),  # 1x1, several channel chunks
]


def _make(cfg, seed, dtype=D, scale=2.0):
    N, C, H, W, Cout, G, OG, kh, kw, stride, padding, dilation, has_mask, has_bias = cfg
    g = torch.Generator().manual_seed(seed)
    Ho = (H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    Wo = (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype)
    w = torch.randn(Cout, C // G, kh, kw, generator=g, dtype=dtype)
    off = torch.randn(N, 2 * OG * kh * kw, Ho, Wo, generator=g, dtype=dtype) * scale
    mask = torch.rand(N, OG * kh * kw, Ho, Wo, generator=g, dtype=dtype) if has_mask else None
    bias = torch.randn(Cout, generator=g, dtype=dtype) if has_bias else None
    return dict(x=x, w=w, off=off, mask=mask, bias=bias, stride=stride, padding=padding, dilation=dilation,
                G=G, OG=OG)


def _conf(a):
    return (a["stride"], a["padding"], a["dilation"], a["G"], a["OG"])


def _ours(a, grad=None, deterministic=False):
    out = dc.conv_forward(a["x"], a["w"], a["off"], a["mask"], a["bias"], *_conf(a))
    if grad is None:
        return out, None
    grads = dc.conv_backward(grad, a["x"], a["w"], a["off"], a["mask"], a["bias"], *_conf(a),
                             deterministic=deterministic)
    return out, grads  # (input, weight, offset, mask, bias)


def _reference(a, grad):
    leaves = {k: (a[k].clone().requires_grad_() if a[k] is not None else None)
              for k in ("x", "w", "off", "mask", "bias")}
    out = reference.deform_conv2d(leaves["x"].double(), leaves["off"].double(), leaves["w"].double(),
                                  leaves["bias"].double() if leaves["bias"] is not None else None,
                                  a["stride"], a["padding"], a["dilation"],
                                  leaves["mask"].double() if leaves["mask"] is not None else None)
    out.backward(grad.double())
    return out.detach(), [leaves[k].grad if leaves[k] is not None else None for k in ("x", "w", "off", "mask", "bias")]


def _close(name, a, b, tol=TOL):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.1g}"


NAMES = ("grad_input", "grad_weight", "grad_offset", "grad_mask", "grad_bias")


def _check(a, tag, deterministic=False, tol=TOL):
    ref_out = reference.deform_conv2d(a["x"].double(), a["off"].double(), a["w"].double(),
                                      a["bias"].double() if a["bias"] is not None else None, a["stride"],
                                      a["padding"], a["dilation"],
                                      a["mask"].double() if a["mask"] is not None else None)
    grad = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(3), dtype=a["x"].dtype)
    out, grads = _ours(a, grad, deterministic)
    ref_out, ref_grads = _reference(a, grad)
    _close(f"output {tag}", out, ref_out, tol)
    for name, ours, ref in zip(NAMES, grads, ref_grads):
        if ref is None:
            assert ours.numel() == 0, f"{name} {tag} must be empty"
        else:
            _close(f"{name} {tag}", ours, ref, tol)


def case_random_configs_match_reference():
    for i, cfg in enumerate(CONFIGS):
        _check(_make(cfg, seed=i), f"config {i}")


def case_deterministic_path_matches_reference():
    for i, cfg in enumerate(CONFIGS[:2]):
        _check(_make(cfg, seed=10 + i), f"config {i} deterministic", deterministic=True)


def case_batch_of_one_and_zero():
    cfg = CONFIGS[0]
    _check(_make((1,) + cfg[1:], seed=20), "batch 1")
    a = _make((0,) + cfg[1:], seed=21)
    out, grads = _ours(a, grad=torch.empty((0, 6, 5, 4), dtype=D))
    assert out.shape == (0, 6, 5, 4), out.shape
    assert grads[0].shape == a["x"].shape and grads[2].shape == a["off"].shape
    assert grads[1].shape == a["w"].shape and not grads[1].any(), "an empty batch has zero weight gradient"


def case_border_samples_match_reference():
    # samples placed at y, x in [-1, 0), exactly -1, exactly on the last row/column and past it
    cfg = (1, 2, 4, 5, 3, 1, 1, 2, 2, (1, 1), (0, 0), (1, 1), True, True)
    a = _make(cfg, seed=30)
    Ho, Wo = a["off"].shape[2:]
    vals = torch.tensor([-0.5, -1.0, -0.999, 3.0, 3.25, 4.0, -1.25, 0.75], dtype=D)
    for k in range(4):
        i, j = divmod(k, 2)
        for ho in range(Ho):
            for wo in range(Wo):
                ty = vals[(ho + k) % len(vals)]
                tx = vals[(wo + 2 * k) % len(vals)]
                a["off"][0, 2 * k, ho, wo] = ty - (ho + i)  # sample lands exactly at (ty, tx)
                a["off"][0, 2 * k + 1, ho, wo] = tx - (wo + j)
    _check(a, "border samples")


def case_nan_inf_offsets_match_cpu_kernel():
    import dcnv2  # noqa: F401  (registers the CPU kernel)

    a = _make(CONFIGS[0], seed=40)
    a["off"][0, 0, 0, 0] = float("nan")
    a["off"][1, 3, 2, 1] = float("inf")
    a["off"][1, 4, 1, 2] = float("-inf")
    a["off"][0, 7, :, 0] = 1e30
    out, grads = _ours(a, grad=torch.ones((2, 6, 5, 4), dtype=D))
    cpu = torch.ops.dcnv2.deform_conv2d(a["x"], a["w"], a["off"], a["mask"], a["bias"], *_conf(a))
    assert torch.isfinite(out).all(), "NaN/inf offsets must read as zero"
    _close("output vs CPU kernel", out, cpu)
    cpu_grads = torch.ops.dcnv2._deform_conv2d_backward(torch.ones_like(out), a["x"], a["w"], a["off"], a["mask"],
                                                        a["bias"], *_conf(a))
    for name, ours, theirs in zip(NAMES, grads, cpu_grads):
        assert torch.isfinite(ours).all(), f"{name} has non-finite values"
        _close(f"{name} vs CPU kernel", ours, theirs)


def case_batch_independent_bitwise():
    cfg = (3, 4, 5, 6, 4, 2, 2, 3, 2, (1, 2), (1, 1), (1, 1), True, True)
    a = _make(cfg, seed=50)
    grad = torch.randn((3, 4) + tuple(a["off"].shape[2:]), dtype=D)
    one = {k: (v[1:2] if k in ("x", "off", "mask") else v) for k, v in a.items()}
    for det in (False, True):
        out, grads = _ours(a, grad, det)
        out1, grads1 = _ours(one, grad[1:2], det)
        assert torch.equal(out[1:2], out1), "the output of a sample depends on the batch"
        for name, idx in (("grad_input", 0), ("grad_offset", 2), ("grad_mask", 3)):
            assert torch.equal(grads[idx][1:2], grads1[idx]), f"{name} of a sample depends on the batch (det={det})"


def case_deterministic_mode_avoids_atomics_and_repeats_bitwise():
    a = _make(CONFIGS[0], seed=60)
    grad = torch.randn((2, 6, 5, 4), dtype=D)
    modes = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                modes.append("atomic" if kw["ATOMIC"] else "ordered")
                return self.kernel[grid](*args, **kw)
            return launch

    saved = dc._dcn_bwd_data_kernel
    dc._dcn_bwd_data_kernel = Spy(saved)
    try:
        torch.use_deterministic_algorithms(True)
        try:
            first = dc.conv_backward(grad, a["x"], a["w"], a["off"], a["mask"], a["bias"], *_conf(a))
            second = dc.conv_backward(grad, a["x"], a["w"], a["off"], a["mask"], a["bias"], *_conf(a))
        finally:
            torch.use_deterministic_algorithms(False)
        assert modes == ["ordered", "ordered"], f"deterministic mode ran {modes}"
        dc.conv_backward(grad, a["x"], a["w"], a["off"], a["mask"], a["bias"], *_conf(a))
        assert modes[-1] == "atomic", f"default mode ran {modes[-1]}"
    finally:
        dc._dcn_bwd_data_kernel = saved
    for name, x, y in zip(NAMES, first, second):
        assert torch.equal(x, y), f"{name}: two deterministic backward runs differ"


def case_float32_half_bfloat16_accumulate_in_float32():
    cfg = CONFIGS[0]
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 3e-2), (torch.bfloat16, 2.5e-1)):
        a = _make(cfg, seed=70, dtype=dtype)
        ref_out = reference.deform_conv2d(a["x"].double(), a["off"].double(), a["w"].double(), a["bias"].double(),
                                          a["stride"], a["padding"], a["dilation"], a["mask"].double())
        out, grads = _ours(a, torch.ones(ref_out.shape, dtype=dtype))
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
        _, ref_grads = _reference(a, torch.ones(ref_out.shape, dtype=dtype))
        scale = ref_out.abs().max().item()
        _close(f"{dtype} output", out, ref_out, tol * scale)
        for name, ours, ref in zip(NAMES, grads, ref_grads):
            _close(f"{dtype} {name}", ours, ref, tol * max(1.0, ref.abs().max().item()))


def case_tf32_only_when_torch_allows_it():
    m = torch.backends.cuda.matmul
    saved = (getattr(m, "fp32_precision", None), torch.get_float32_matmul_precision())
    try:
        assert dc._types(torch.float32)[2] == "ieee", "float32 must not use TF32 by default"
        torch.set_float32_matmul_precision("high")
        if saved[0] is not None:
            m.fp32_precision = "none"
        assert dc._types(torch.float32)[2] == "tf32", "set_float32_matmul_precision('high') allows TF32"
        if saved[0] is not None:
            m.fp32_precision = "ieee"
            assert dc._types(torch.float32)[2] == "ieee", "fp32_precision='ieee' forbids TF32"
        assert dc._types(torch.float16)[2] == "ieee" and dc._types(torch.float64)[2] == "ieee"
    finally:
        torch.set_float32_matmul_precision(saved[1])
        if saved[0] is not None:
            m.fp32_precision = saved[0]
