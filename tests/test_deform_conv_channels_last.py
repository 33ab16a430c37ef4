"""Channels-last tensors in the CPU kernel: read in place, results in the layout of their tensors.

A channels-last input gets a channels-last output and gradient, a channels-last weight / offset / mask a
gradient in that layout (torch's convolutions do the same), and the values are the bits of the NCHW call:
the kernel samples from channels-last rows either way, only the copies around it go away.
"""
from __future__ import annotations

import pytest
import torch

from dcnv2.nn import ModulatedDeformConv2d
from dcnv2.ops import _layout, deform_conv2d
from dcnv2.ops._native import HAS_NATIVE
from test_deform_conv import random_case

pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")

CL, PLAIN = torch.channels_last, torch.contiguous_format
NAMES = ("input", "offset", "weight", "bias", "mask")


def run(case, formats, go_format):
    """Output and the five gradients of one call, each leaf laid out as formats[name] says."""
    x, off, w, b, conf, mask = case
    leaves = {name: t.detach().contiguous(memory_format=formats.get(name, PLAIN) if t.dim() == 4 else PLAIN)
              .requires_grad_() for name, t in zip(NAMES, (x, off, w, b, mask))}
    out = deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"],
                        mask=leaves["mask"], **conf)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    out.backward(go.contiguous(memory_format=go_format))
    return out.detach(), {name: t.grad for name, t in leaves.items()}


def wide_case(dtype, seed=0, N=2, C=24, Cout=16, groups=1, og=1, H=9, W=11):
    """A case wide enough in C and the map that both layouts are unambiguous (random_case has C = 1 cases)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g).to(dtype)
    w = torch.randn(Cout, C // groups, 3, 3, generator=g).to(dtype)
    b = torch.randn(Cout, generator=g).to(dtype)
    off = (torch.randn(N, 2 * og * 9, H, W, generator=g) * 2).to(dtype)
    mask = torch.rand(N, og * 9, H, W, generator=g).to(dtype)
    return x, off, w, b, dict(padding=(1, 1)), mask


FORMATS = {
    "input": {"input": CL},
    "input+weight": {"input": CL, "weight": CL},
    "all": {"input": CL, "weight": CL, "offset": CL, "mask": CL},
    "weight+mask": {"weight": CL, "mask": CL},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(), dict(groups=2, og=3, Cout=8), dict(N=1, C=32, Cout=40, og=2)])
@pytest.mark.parametrize("which", sorted(FORMATS))
def test_channels_last_gives_the_bits_of_the_nchw_call_in_the_tensors_layouts(dtype, shape, which):
    case = wide_case(dtype, **shape)
    out0, grads0 = run(case, {}, PLAIN)
    formats = FORMATS[which]
    out1, grads1 = run(case, formats, formats.get("input", PLAIN))
    assert torch.equal(out0, out1)
    assert out1.is_contiguous(memory_format=formats.get("input", PLAIN))
    for name in NAMES:
        assert torch.equal(grads0[name], grads1[name]), name
        if grads1[name].dim() == 4:
            assert grads1[name].is_contiguous(memory_format=formats.get(name, PLAIN)), name


def test_a_channels_last_grad_output_on_an_nchw_call_changes_no_bits():
    case = wide_case(torch.float32)
    out0, grads0 = run(case, {}, PLAIN)
    out1, grads1 = run(case, {}, CL)
    for name in NAMES:
        assert torch.equal(grads0[name], grads1[name]), name


@pytest.mark.parametrize("seed", range(6))
def test_random_geometries_agree_across_layouts(seed):
    """Strides, dilations, kernels 1-3 and C = 1 (where a tensor is both layouts and counts as plain)."""
    case = random_case(seed, dtype=torch.float64)
    out0, grads0 = run(case, {}, PLAIN)
    out1, grads1 = run(case, FORMATS["all"], CL)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    assert out1.is_contiguous(memory_format=_layout.format_of(case[0].contiguous(memory_format=CL)))
    for name in NAMES:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=0)


def test_a_channels_last_call_makes_no_layout_copies():
    """Input, weight, offsets, masks and the output gradient channels-last: nothing is copied or cloned."""
    x, off, w, b, conf, mask = wide_case(torch.float32, N=2, C=32, Cout=32, H=12, W=12)
    args = [t.contiguous(memory_format=CL).requires_grad_() for t in (x, off, w)] + [b.requires_grad_()]
    m = mask.contiguous(memory_format=CL).requires_grad_()
    out = deform_conv2d(*args[:3], args[3], mask=m, **conf)
    go = torch.randn_like(out)
    assert go.is_contiguous(memory_format=CL)
    copies = ("aten::copy_", "aten::clone", "aten::contiguous")
    with torch.profiler.profile() as prof:
        deform_conv2d(*args[:3], args[3], mask=m, **conf).backward(go)
    names = [e.name for e in prof.events()]
    assert "dcnv2::deform_conv2d" in names and "dcnv2::_deform_conv2d_backward" in names
    assert not [n for n in names if n in copies], sorted(set(names))
    # the same call on NCHW tensors does copy (the offset rows): the check above can see a copy
    with torch.profiler.profile() as prof:
        deform_conv2d(x, off, w, b, mask=mask, **conf)
    assert [e.name for e in prof.events() if e.name in copies]


@pytest.mark.parametrize("formats", [FORMATS["all"], FORMATS["weight+mask"]], ids=["all", "weight+mask"])
def test_opcheck_with_channels_last_tensors(formats):
    """The fake kernels state the same layouts as the CPU kernel (torch.compile relies on them)."""
    x, off, w, b, conf, mask = wide_case(torch.float32)
    lay = dict(zip(NAMES, (x, off, w, b, mask)))
    t = {n: v.contiguous(memory_format=formats.get(n, PLAIN) if v.dim() == 4 else PLAIN).requires_grad_()
         for n, v in lay.items()}
    args = (t["input"], t["weight"], t["offset"], t["mask"], t["bias"], [1, 1], [1, 1], [1, 1], 1, 1)
    torch.library.opcheck(torch.ops.dcnv2.deform_conv2d.default, args)


def test_a_channels_last_module_matches_its_nchw_self():
    torch.manual_seed(0)
    layer = ModulatedDeformConv2d(16, 24, 3, padding=1)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(2, 16, 10, 12)
    ref = layer(x)
    layer_cl = ModulatedDeformConv2d(16, 24, 3, padding=1)
    layer_cl.load_state_dict(layer.state_dict())
    layer_cl = layer_cl.to(memory_format=CL)
    out = layer_cl(x.contiguous(memory_format=CL))
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # the offset conv is torch's, in its own layout


def test_the_cuda_wrapper_applies_the_same_layout_rule(monkeypatch):
    """The Triton kernels return NCHW tensors; their registered wrappers hand them back in the op's layouts
    (checked here with stand-ins for the kernels: no GPU is needed to see the rule applied)."""
    from dcnv2.ops.triton import _register

    x, off, w, b, conf, mask = wide_case(torch.float32)
    xc, offc, wc, maskc = (t.contiguous(memory_format=CL) for t in (x, off, w, mask))
    monkeypatch.setattr(_register.deform_conv, "conv_forward", lambda *a: torch.zeros(2, 16, 9, 11))
    monkeypatch.setattr(_register.deform_conv, "conv_backward", lambda grad, i, wt, o, m, *rest: (
        torch.zeros(i.shape), torch.zeros(wt.shape), torch.zeros(o.shape), torch.zeros(m.shape), torch.zeros(16)))
    out = _register._conv_fwd(xc, w, off, mask, b, [1, 1], [1, 1], [1, 1], 1, 1)
    assert out.is_contiguous(memory_format=CL)
    assert _register._conv_fwd(x, wc, off, mask, b, [1, 1], [1, 1], [1, 1], 1, 1).is_contiguous()
    grads = _register._conv_bwd(out, xc, w, offc, maskc, b, [1, 1], [1, 1], [1, 1], 1, 1)
    assert [g.is_contiguous(memory_format=CL) for g in grads[:4]] == [True, False, True, True]
    assert grads[1].is_contiguous()
