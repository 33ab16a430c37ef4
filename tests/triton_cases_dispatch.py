"""Backend selection on CUDA and the registration of the Triton kernels, without a GPU.

Run by tests/test_triton_dispatch.py through tests/triton_support.py (TRITON_INTERPRET=1, a
subprocess). The device check of the functional ops (``_device_type``) is mocked to say "cuda";
the CUDA dispatch key is reached with ``OpOverload.redispatch``, so the registered CUDA kernels run
on CPU tensors through the interpreter.
"""
from __future__ import annotations

import importlib
import os
import warnings
from contextlib import contextmanager

import torch

import dcnv2
from dcnv2.ops import reference
from dcnv2.ops import triton as tri

conv_mod = importlib.import_module("dcnv2.ops.deform_conv")
roi_mod = importlib.import_module("dcnv2.ops.deform_roi_pool")
CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
OPS = ("deform_conv2d", "_deform_conv2d_backward", "deform_roi_pool", "_deform_roi_pool_backward")


@contextmanager
def patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextmanager
def env(value):
    saved = os.environ.get(tri.ENV)
    if value is None:
        os.environ.pop(tri.ENV, None)
    else:
        os.environ[tri.ENV] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(tri.ENV, None)
        else:
            os.environ[tri.ENV] = saved


@contextmanager
def on_cuda():
    """Makes the functional ops believe their tensors are on a CUDA device."""
    with patched(conv_mod, "_device_type", lambda t: "cuda"), patched(roi_mod, "_device_type", lambda t: "cuda"):
        yield


def _fail(*args, **kwargs):
    raise AssertionError("this implementation must not be called")


def _conv_args(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 5, generator=g, dtype=dtype)
    w = torch.randn(6, 2, 3, 3, generator=g, dtype=dtype)
    off = torch.randn(2, 2 * 2 * 9, 6, 5, generator=g, dtype=dtype)
    mask = torch.rand(2, 2 * 9, 6, 5, generator=g, dtype=dtype)
    b = torch.randn(6, generator=g, dtype=dtype)
    return x, w, off, mask, b


def case_cuda_device_selects_triton_and_registers_cuda_kernels():
    with env(None), on_cuda():
        x = torch.zeros(1, 1, 2, 2)
        assert conv_mod.backend_for(x) == "triton"
        assert roi_mod.backend_for(x) == "triton"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dcnv2::{op}", "CUDA"), f"no CUDA kernel for {op}"
    assert conv_mod.backend_for(torch.zeros(1)) == "native", "CPU tensors keep the C++ kernel"


def case_cuda_call_goes_to_the_registered_op_not_torchvision_or_reference():
    import torchvision

    x, w, off, mask, b = _conv_args()
    with env(None), on_cuda(), patched(torchvision.ops, "deform_conv2d", _fail), \
            patched(reference, "deform_conv2d", _fail), patched(reference, "deform_roi_pool", _fail):
        y = dcnv2.ops.deform_conv2d(x, off, w, b, padding=1, mask=mask)
        rois = torch.tensor([[0, 0.0, 0.0, 4.0, 3.0]], dtype=x.dtype)
        p = dcnv2.ops.deform_roi_pool(x, rois, output_size=2)
    assert y.shape == (2, 6, 6, 5) and p.shape == (1, 4, 2, 2)


def case_cuda_dispatch_key_runs_the_triton_kernels():
    from dcnv2.ops.triton import deform_conv as tdc
    from dcnv2.ops.triton import roi_pool as trp

    tri.register()
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapped

    x, w, off, mask, b = _conv_args()
    conf = ([1, 1], [1, 1], [1, 1], 2, 2)
    with patched(tdc, "conv_forward", spy("conv_forward", tdc.conv_forward)), \
            patched(tdc, "conv_backward", spy("conv_backward", tdc.conv_backward)), \
            patched(trp, "roi_pool_forward", spy("roi_pool_forward", trp.roi_pool_forward)), \
            patched(trp, "roi_pool_backward", spy("roi_pool_backward", trp.roi_pool_backward)):
        y = torch.ops.dcnv2.deform_conv2d.default.redispatch(CUDA, x, w, off, mask, b, *conf)
        go = torch.ones_like(y)
        grads = torch.ops.dcnv2._deform_conv2d_backward.default.redispatch(CUDA, go, x, w, off, mask, b, *conf)
        rois = torch.tensor([[1, 0.5, 1.0, 4.0, 5.5]], dtype=x.dtype)
        roff = torch.randn(1, 2, 2, 2, dtype=x.dtype)
        rargs = (2, 2, 1.0, 2, 0.1, True)
        p = torch.ops.dcnv2.deform_roi_pool.default.redispatch(CUDA, x, rois, roff, None, *rargs)
        pg = torch.ops.dcnv2._deform_roi_pool_backward.default.redispatch(CUDA, torch.ones_like(p), x, rois, roff,
                                                                           None, *rargs)
    assert calls == ["conv_forward", "conv_backward", "roi_pool_forward", "roi_pool_backward"], calls
    leaves = [t.clone().requires_grad_() for t in (x, off, w, mask, b)]
    ref = reference.deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[4], (1, 1), (1, 1), (1, 1), leaves[3])
    ref.backward(go)
    assert (y - ref).abs().max() < 1e-10
    for ours, leaf in zip((grads[0], grads[2], grads[1], grads[3], grads[4]), leaves):
        assert (ours - leaf.grad).abs().max() < 1e-10
    xr, offr = x.clone().requires_grad_(), roff.clone().requires_grad_()
    pr = reference.deform_roi_pool(xr, rois, offr, None, (2, 2), 1.0, 2, 0.1, True)
    pr.backward(torch.ones_like(pr))
    assert (p - pr).abs().max() < 1e-10
    assert (pg[0] - xr.grad).abs().max() < 1e-10 and (pg[1] - offr.grad).abs().max() < 1e-10
    assert pg[2].numel() == 0


def case_env_var_switches_the_backend():
    import torchvision

    x, w, off, mask, b = _conv_args()
    with on_cuda():
        with env("torchvision"):
            assert conv_mod.backend_for(x) == "torchvision"
            assert roi_mod.backend_for(x) == "reference", "torchvision has no deformable RoI pooling"
            called = []
            tv = torchvision.ops.deform_conv2d
            with patched(torchvision.ops, "deform_conv2d", lambda *a, **k: called.append(1) or tv(*a, **k)):
                dcnv2.ops.deform_conv2d(x, off, w, b, padding=1, mask=mask)
            assert called == [1], "DCNV2_CUDA_BACKEND=torchvision must call torchvision's op"
        with env("reference"):
            assert conv_mod.backend_for(x) == "reference" and roi_mod.backend_for(x) == "reference"
        with env(" Triton "):
            assert conv_mod.backend_for(x) == "triton"
        with env("cudnn"):
            try:
                conv_mod.backend_for(x)
            except ValueError as exc:
                assert "DCNV2_CUDA_BACKEND" in str(exc) and "cudnn" in str(exc), str(exc)
            else:
                raise AssertionError("an unknown backend name must raise ValueError")


def case_missing_triton_falls_back_with_a_clear_warning():
    tri._warn_fallback.cache_clear()
    with env(None), on_cuda(), patched(tri, "unavailable_reason", lambda: "test: triton is gone"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = torch.zeros(1, 1, 2, 2)
            assert conv_mod.backend_for(x) == "torchvision"
            assert roi_mod.backend_for(x) == "reference"
        text = " ".join(str(w.message) for w in caught)
        assert "test: triton is gone" in text and "torchvision" in text and "reference" in text, text
        assert "Triton unavailable" in tri.describe()


def case_cuda_backend_choice_compiles_fullgraph():
    """The backend choice (environment, registration) is a trace-time constant for torch.compile."""
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(3, 2, 3, 3)
    off = torch.randn(1, 18, 3, 3)
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]])
    torch._dynamo.reset()
    with env(None), on_cuda():
        y = torch.compile(dcnv2.ops.deform_conv2d, fullgraph=True, backend="eager")(x, off, w)
        p = torch.compile(dcnv2.ops.deform_roi_pool, fullgraph=True, backend="eager")(x, rois, output_size=2)
    (y.sum() + p.sum()).backward()
    assert y.shape == (1, 3, 3, 3) and p.shape == (1, 2, 2, 2) and x.grad is not None
