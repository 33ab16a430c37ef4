"""deform_roi_pool: equality with roi_align at zero offset, the reference, gradients, registration,
determinism, empty/degenerate RoIs and every malformed argument (crash-prone ones in a subprocess)."""
from __future__ import annotations

import pytest
import torch
import torchvision

from dcnv2.ops import deform_roi_pool, reference
from dcnv2.ops._native import HAS_NATIVE
from isolated import run_isolated_cases

native = pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")


def random_rois(g: torch.Generator, N: int, K: int, H: int, W: int, scale: float, dtype=torch.float32):
    """Boxes in image coordinates: mostly inside, some overhanging or outside the map, some degenerate."""
    img_h, img_w = H / scale, W / scale
    xy = torch.rand(K, 2, generator=g) * torch.tensor([img_w, img_h]) * 1.2 - torch.tensor([img_w, img_h]) * 0.1
    wh = torch.rand(K, 2, generator=g) * torch.tensor([img_w, img_h]) * 0.6
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([img_w * 0.3, img_h * 0.4, img_w * 0.3, img_h * 0.4])  # zero area
    boxes[1] = torch.tensor([-img_w, -img_h, -img_w / 2, -img_h / 2])  # entirely outside
    boxes[2] = torch.tensor([img_w * 0.5, img_h * 0.5, img_w * 0.2, img_h * 0.3])  # inverted corners
    boxes[3] = torch.tensor([-3.0, -2.0, img_w + 4.0, img_h + 1.0])  # overhanging every side
    batch = torch.randint(0, N, (K, 1), generator=g).float()
    return torch.cat([batch, boxes], 1).to(dtype)


def case(seed: int, N=3, C=5, H=11, W=13, K=12, out=(3, 4), scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype)
    rois = random_rois(g, N, K, H, W, scale, dtype)
    offset = (torch.randn(K, 2, *out, generator=g, dtype=dtype) * 0.7)
    mask = torch.rand(K, 1, *out, generator=g, dtype=dtype)
    return x, rois, offset, mask


# ---------------------------------------------------------------------------------------------- #
# zero offset == torchvision roi_align


@native
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0, -1, 1, 3])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0625])
def test_zero_offset_equals_roi_align(aligned, sampling_ratio, scale):
    x, rois, _, _ = case(1, N=3, C=6, H=14, W=17, K=20, out=(7, 7), scale=scale, dtype=torch.float32)
    expected = torchvision.ops.roi_align(x, rois, (7, 7), scale, sampling_ratio, aligned)
    for offset in (None, torch.zeros(20, 2, 7, 7)):
        got = deform_roi_pool(x, rois, offset, None, 7, scale, sampling_ratio, gamma=0.1, aligned=aligned)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@native
@pytest.mark.parametrize("aligned", [True, False])
def test_zero_offset_gradient_equals_roi_align(aligned):
    x, rois, _, _ = case(2, N=2, C=4, H=9, W=12, K=10, out=(3, 5), scale=0.5)
    go = torch.randn(10, 4, 3, 5, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torchvision.ops.roi_align(x1, rois, (3, 5), 0.5, 0, aligned).backward(go)
    deform_roi_pool(x2, rois, None, None, (3, 5), 0.5, 0, aligned=aligned).backward(go)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-12, rtol=1e-12)


def test_reference_zero_offset_equals_roi_align():
    x, rois, _, _ = case(3, scale=0.5)
    for aligned in (True, False):
        for sr in (2, 0):
            got = reference.deform_roi_pool(x, rois, None, None, (3, 4), 0.5, sr, 0.1, aligned)
            expected = torchvision.ops.roi_align(x, rois, (3, 4), 0.5, sr, aligned)
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@native
def test_list_of_boxes_equals_tensor_rois():
    x, rois, offset, mask = case(4, N=3, K=9, dtype=torch.float32)
    order = torch.argsort(rois[:, 0], stable=True)
    rois, offset, mask = rois[order], offset[order], mask[order]
    boxes = [rois[rois[:, 0] == n, 1:] for n in range(3)]
    a = deform_roi_pool(x, rois, offset, mask, (3, 4))
    b = deform_roi_pool(x, boxes, offset, mask, (3, 4))
    assert torch.equal(a, b)
    torch.testing.assert_close(deform_roi_pool(x, boxes, output_size=(3, 4)),
                               torchvision.ops.roi_align(x, boxes, (3, 4), 1.0, 2, True), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- #
# offsets and masks: the C++ kernel against the reference


@native
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("with_mask", [True, False])
def test_kernel_matches_reference_with_offsets(aligned, sampling_ratio, with_mask):
    x, rois, offset, mask = case(5, scale=0.5)
    mask = mask if with_mask else None
    args = (rois, offset, mask, (3, 4), 0.5, sampling_ratio, 0.3, aligned)
    leaves = [x, offset] + ([mask] if with_mask else [])
    a_leaves = [t.clone().requires_grad_() for t in leaves]
    b_leaves = [t.clone().requires_grad_() for t in leaves]

    def call(fn, ls):
        return fn(ls[0], rois, ls[1], ls[2] if with_mask else None, *args[3:])

    a = call(deform_roi_pool, a_leaves)
    b = call(reference.deform_roi_pool, b_leaves)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert a.abs().sum() > 0
    go = torch.randn_like(a)
    ga = torch.autograd.grad(a, a_leaves, go)
    gb = torch.autograd.grad(b, b_leaves, go)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=1e-11, rtol=1e-9)
        assert u.abs().sum() > 0


@native
def test_offset_moves_bins_by_roi_size():
    # a whole-bin shift by exactly one bin width equals pooling the shifted box
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    rois = torch.tensor([[0, 2.0, 3.0, 10.0, 9.0]], dtype=torch.float64)
    gamma, out = 0.1, (2, 2)
    offset = torch.empty(1, 2, *out, dtype=torch.float64)
    offset[:, 0] = 0.5 / gamma  # 0.5 * roi width (8) = 4 px right
    offset[:, 1] = -0.25 / gamma  # 0.25 * roi height (6) = 1.5 px up
    shifted = torch.tensor([[0, 6.0, 1.5, 14.0, 7.5]], dtype=torch.float64)
    got = deform_roi_pool(x, rois, offset, None, out, gamma=gamma)
    torch.testing.assert_close(got, torchvision.ops.roi_align(x, shifted, out, 1.0, 2, True))
    mask = torch.rand(1, 1, *out, dtype=torch.float64)
    torch.testing.assert_close(deform_roi_pool(x, rois, offset, mask, out, gamma=gamma), got * mask)


@native
def test_mask_without_offset_scales_roi_align():
    x, rois, _, mask = case(6, dtype=torch.float32)
    got = deform_roi_pool(x, rois, None, mask, (3, 4))
    torch.testing.assert_close(got, torchvision.ops.roi_align(x, rois, (3, 4), 1.0, 2, True) * mask)


@native
@pytest.mark.parametrize("with_mask", [True, False])
def test_gradcheck(with_mask):
    x, rois, offset, mask = case(7, N=2, C=2, H=6, W=7, K=4, out=(2, 3))
    rois[:, 1:] += 0.123  # keep samples off integer positions (kinks of the bilinear weights)
    leaves = [x.requires_grad_(), offset.requires_grad_()] + ([mask.requires_grad_()] if with_mask else [])

    def fn(x, offset, *m):
        return deform_roi_pool(x, rois, offset, m[0] if m else None, (2, 3), 1.0, 2, gamma=0.2)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda x: deform_roi_pool(x, rois, None, None, (2, 3), 1.0, 0), (x,))


# ---------------------------------------------------------------------------------------------- #
# registration, compile, determinism, dtypes, layouts


@native
def test_opcheck():
    x, rois, offset, mask = case(8, N=2, C=3, H=6, W=7, K=5, out=(2, 3), dtype=torch.float32)
    op = torch.ops.dcnv2.deform_roi_pool.default
    for off, m in ((offset, mask), (offset, None), (None, None)):
        args = (x.clone().requires_grad_(), rois, off.clone().requires_grad_() if off is not None else None,
                m.clone().requires_grad_() if m is not None else None, 2, 3, 0.5, 2, 0.1, True)
        torch.library.opcheck(op, args)
    torch.library.opcheck(op, (x, rois[:0], offset[:0], mask[:0], 2, 3, 1.0, 0, 0.1, False))


@native
def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    x, rois, offset, mask = case(9, dtype=torch.float32)

    def fn(x, offset, mask):
        return (deform_roi_pool(x, rois, offset, mask, (3, 4), 0.5, 2).sin()).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    lc = [t.clone().requires_grad_() for t in (x, offset, mask)]
    le = [t.clone().requires_grad_() for t in (x, offset, mask)]
    out_c, out_e = compiled(*lc), fn(*le)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(lc, le):
        torch.testing.assert_close(a.grad, b.grad)


@native
def test_backward_is_bit_identical_across_runs_and_thread_counts():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 96, 20, 24, generator=g)  # several channel blocks
    rois = random_rois(g, 2, 64, 20, 24, 0.5)
    offset = torch.randn(64, 2, 7, 7, generator=g)
    mask = torch.rand(64, 1, 7, 7, generator=g)
    go = torch.randn(64, 96, 7, 7, generator=g)
    op = torch.ops.dcnv2._deform_roi_pool_backward

    def grads():
        return op(go, x, rois, offset, mask, 7, 7, 0.5, 2, 0.1, True)

    threads = torch.get_num_threads()
    first = grads()
    try:
        torch.set_num_threads(1)
        single = grads()
    finally:
        torch.set_num_threads(threads)
    for other in (grads(), single):
        for a, b in zip(first, other):
            assert torch.equal(a, b)


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computes_in_float32(dtype):
    x, rois, offset, mask = case(11, dtype=torch.float32)
    x, rois, offset, mask = (t.to(dtype) for t in (x, rois, offset, mask))
    got = deform_roi_pool(x, rois, offset, mask, (3, 4))
    assert got.dtype == dtype
    expected = deform_roi_pool(*(t.float() for t in (x, rois, offset, mask)), (3, 4))
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    deform_roi_pool(leaves[0], rois, leaves[1], leaves[2], (3, 4)).sum().backward()
    assert all(t.grad.dtype == dtype for t in leaves)


@native
def test_channels_last_and_non_contiguous_inputs():
    x, rois, offset, mask = case(12, dtype=torch.float32)
    expected = deform_roi_pool(x, rois, offset, mask, (3, 4))
    xs = x.contiguous(memory_format=torch.channels_last)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    offt = offset.transpose(2, 3).contiguous().transpose(2, 3)
    for xi, oi in ((xs, offset), (xt, offt)):
        assert torch.equal(deform_roi_pool(xi, rois, oi, mask, (3, 4)), expected)


# ---------------------------------------------------------------------------------------------- #
# empty and degenerate input


@pytest.mark.parametrize("use_reference", [False, True])
def test_empty_rois_give_empty_output_and_zero_gradients(use_reference):
    if not use_reference and not HAS_NATIVE:
        pytest.skip("the C++ extension is not built")
    fn = reference.deform_roi_pool if use_reference else deform_roi_pool
    x = torch.randn(2, 4, 8, 9, requires_grad=True)
    offset = torch.zeros(0, 2, 3, 3, requires_grad=True)
    mask = torch.zeros(0, 1, 3, 3, requires_grad=True)
    out = fn(x, torch.zeros(0, 5), offset, mask, (3, 3))
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert offset.grad.shape == (0, 2, 3, 3) and mask.grad.shape == (0, 1, 3, 3)
    if not use_reference:
        assert deform_roi_pool(x, [torch.zeros(0, 4), torch.zeros(0, 4)], output_size=5).shape == (0, 4, 5, 5)


@native
def test_degenerate_boxes_are_valid():
    x = torch.randn(1, 3, 10, 10)
    rois = torch.tensor([[0, 4.0, 4.0, 4.0, 4.0], [0, 50, 50, 80, 90], [0, -30, -30, -20, -10]])
    out = deform_roi_pool(x, rois, torch.randn(3, 2, 2, 2), torch.rand(3, 1, 2, 2), 2)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))  # outside the map: zeros
    torch.testing.assert_close(deform_roi_pool(x, rois, output_size=2),
                               torchvision.ops.roi_align(x, rois, 2, 1.0, 2, True), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- #
# malformed arguments


def good():
    x, rois, offset, mask = case(13, N=2, C=3, H=8, W=9, K=4, out=(2, 3), dtype=torch.float32)
    return dict(input=x, rois=rois, offset=offset, mask=mask, output_size=(2, 3), spatial_scale=1.0,
                sampling_ratio=2, gamma=0.1, aligned=True)


def call(**changes):
    kw = good()
    kw.update(changes)
    return deform_roi_pool(**kw)


def with_roi_value(k, c, v):
    rois = good()["rois"].clone()
    rois[k, c] = v
    return rois


def test_good_call_works():
    assert call().shape == (4, 3, 2, 3)


@pytest.mark.parametrize(
    "changes, exc, words",
    [
        (dict(input=torch.randn(3, 8, 9)), ValueError, ["input", "4-D", "3-D"]),
        (dict(input=torch.randint(0, 3, (2, 3, 8, 9))), TypeError, ["input", "floating", "int64"]),
        (dict(input="x"), TypeError, ["input", "torch.Tensor", "str"]),
        (dict(rois=torch.rand(4, 4)), ValueError, ["rois", "(K, 5)", "(4, 4)"]),
        (dict(rois=torch.rand(4, 5, 1)), ValueError, ["rois", "2-D", "3-D"]),
        (dict(rois=torch.rand(5)), ValueError, ["rois", "2-D", "1-D"]),
        (dict(rois=torch.zeros(4, 5, dtype=torch.int64)), TypeError, ["rois", "floating", "int64"]),
        (dict(rois=torch.zeros(4, 5, dtype=torch.float64)), TypeError, ["rois", "float64", "float32"]),
        (dict(rois=(1, 2, 3, 4, 5)), ValueError, ["rois", "one Tensor[L, 4] per image", "expected 2", "got 5"]),
        (dict(rois="boxes"), TypeError, ["rois", "Tensor[K, 5]", "str"]),
        (dict(rois=[torch.rand(2, 4)]), ValueError, ["rois", "expected 2", "got 1"]),
        (dict(rois=[torch.rand(2, 4), torch.rand(2, 5)]), ValueError, ["rois[1]", "(L, 4)", "(2, 5)"]),
        (dict(rois=[torch.rand(2, 4), torch.rand(2, 4).double()]), TypeError, ["rois[1]", "float64"]),
        (dict(rois=with_roi_value(2, 3, float("nan"))), ValueError, ["rois", "finite", "nan", "row 2"]),
        (dict(rois=with_roi_value(1, 1, float("inf"))), ValueError, ["rois", "finite", "inf", "row 1"]),
        (dict(rois=with_roi_value(0, 4, -float("inf"))), ValueError, ["rois", "finite", "-inf"]),
        (dict(rois=with_roi_value(3, 0, 2.0)), ValueError, ["rois[3, 0]", "batch index", "[0, 2)", "2.0"]),
        (dict(rois=with_roi_value(1, 0, -1.0)), ValueError, ["rois[1, 0]", "[0, 2)", "-1.0"]),
        (dict(rois=with_roi_value(1, 0, 0.5)), ValueError, ["rois[1, 0]", "integer", "0.5"]),
        (dict(rois=with_roi_value(1, 0, float("nan"))), ValueError, ["rois", "nan"]),
        (dict(offset=torch.randn(3, 2, 2, 3)), ValueError, ["offset", "(4, 2, 2, 3)", "(3, 2, 2, 3)"]),
        (dict(offset=torch.randn(4, 2, 3, 2)), ValueError, ["offset", "(4, 2, 2, 3)", "(4, 2, 3, 2)"]),
        (dict(offset=torch.randn(4, 1, 2, 3)), ValueError, ["offset", "(4, 2, 2, 3)", "(4, 1, 2, 3)"]),
        (dict(offset=torch.randn(4, 12)), ValueError, ["offset", "4-D", "2-D"]),
        (dict(offset=torch.randn(4, 2, 2, 3).double()), TypeError, ["offset", "float64", "float32"]),
        (dict(mask=torch.rand(4, 2, 2, 3)), ValueError, ["mask", "(4, 1, 2, 3)", "(4, 2, 2, 3)"]),
        (dict(mask=torch.rand(5, 1, 2, 3)), ValueError, ["mask", "(4, 1, 2, 3)", "(5, 1, 2, 3)"]),
        (dict(mask=torch.rand(4, 1, 2, 3).half()), TypeError, ["mask", "float16", "float32"]),
        (dict(output_size=0), ValueError, ["output_size", "positive", "(0, 0)"]),
        (dict(output_size=(2, 3, 4)), TypeError, ["output_size", "(2, 3, 4)"]),
        (dict(output_size=2.5), TypeError, ["output_size", "2.5"]),
        (dict(spatial_scale=0.0), ValueError, ["spatial_scale", "positive", "0.0"]),
        (dict(spatial_scale=float("nan")), ValueError, ["spatial_scale", "nan"]),
        (dict(spatial_scale="1"), ValueError, ["spatial_scale", "'1'"]),
        (dict(sampling_ratio=2.0), TypeError, ["sampling_ratio", "int", "2.0"]),
        (dict(sampling_ratio=True), TypeError, ["sampling_ratio", "True"]),
        (dict(gamma=float("inf")), ValueError, ["gamma", "finite", "inf"]),
        (dict(aligned=1), TypeError, ["aligned", "bool", "1"]),
    ],
)
def test_bad_arguments_are_named(changes, exc, words):
    with pytest.raises(exc) as info:
        call(**changes)
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="offset is on meta but input is on cpu"):
        call(offset=good()["offset"].to("meta"))
    with pytest.raises(ValueError, match="rois is on meta but input is on cpu"):
        call(rois=good()["rois"].to("meta"))


@native
@pytest.mark.parametrize(
    "rois, words",
    [
        ([[0, 1, 1, float("nan"), 4]], ["finite", "nan", "rois[0, 3]"]),
        ([[2, 1, 1, 3, 4]], ["rois[0, 0]", "batch index", "[0, 2)", "2"]),
        ([[0, 1, 1, 3]], ["rois", "[K, 5]", "[1, 4]"]),
    ],
)
def test_native_op_checks_its_arguments(rois, words):
    # the registered op validates on its own, for callers that bypass the Python wrapper
    x = torch.randn(2, 3, 8, 9)
    with pytest.raises(ValueError) as info:
        torch.ops.dcnv2.deform_roi_pool(x, torch.tensor(rois, dtype=torch.float32), None, None, 2, 2, 1.0, 2, 0.1, True)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


# crash-prone calls, run in one child process (a crash fails only its own snippet: tests/isolated.py)
ISOLATED = {
    "NaN and infinite boxes": """
        import torch
        from dcnv2.ops import deform_roi_pool
        x = torch.randn(1, 4, 16, 16)
        for sr in (2, 0):
            for bad in (float("nan"), float("inf"), -float("inf"), 1e38):
                rois = torch.tensor([[0, 1.0, 2.0, bad, 9.0]])
                try:
                    deform_roi_pool(x, rois, output_size=7, sampling_ratio=sr)
                except ValueError as e:
                    assert "finite" in str(e), e
                    print("rejected", sr, bad)
                else:
                    assert bad == 1e38, bad  # finite but huge: valid, pooled as zeros
                    print("pooled", sr, bad)
        for bad_index in (float("nan"), 7.0, -1.0):
            try:
                torch.ops.dcnv2.deform_roi_pool(x, torch.tensor([[bad_index, 1.0, 2.0, 3.0, 4.0]]), None, None,
                                                7, 7, 1.0, 2, 0.1, True)
            except ValueError as e:
                print("rejected index", bad_index)
        print("clean exit")
        """,
    "hostile offsets and masks": """
        import torch
        from dcnv2.ops import deform_roi_pool, reference
        torch.manual_seed(0)
        x = torch.randn(2, 5, 12, 12)
        rois = torch.tensor([[0, 1.0, 2.0, 9.0, 10.0], [1, 0.0, 0.0, 11.0, 11.0]])
        for bad in (float("nan"), float("inf"), -float("inf"), 1e30, -1e30):
            offset = torch.randn(2, 2, 3, 3)
            offset[0, 0, 1, 1] = bad
            offset[1, 1, 0, 2] = bad
            leaves = [x.clone().requires_grad_(), offset.requires_grad_(), torch.rand(2, 1, 3, 3).requires_grad_()]
            for fn in (deform_roi_pool, reference.deform_roi_pool):
                out = fn(leaves[0], rois, leaves[1], leaves[2], (3, 3))
                assert out[0, :, 1, 1].eq(0).all() and out[1, :, 0, 2].eq(0).all(), (bad, out)
                assert torch.isfinite(out).all()
                out.sum().backward()
                assert all(torch.isfinite(t.grad).all() for t in leaves), bad
                for t in leaves:
                    t.grad = None
        mask = torch.rand(2, 1, 3, 3)
        mask[0, 0, 0, 0] = float("nan")
        out = deform_roi_pool(x, rois, None, mask, 3)
        assert out[0, :, 0, 0].isnan().all() and torch.isfinite(out[1]).all()
        print("clean exit")
        """,
    "coordinates overflowing after scaling": """
        import torch
        from dcnv2.ops import deform_roi_pool
        x = torch.randn(1, 3, 8, 8, requires_grad=True)
        for box in ([-3e38, -3e38, 3e38, 3e38], [3e38, 1, 3.3e38, 4], [-3.3e38, -3e38, 3.3e38, 3e38]):
            for sr in (0, 2):
                y = deform_roi_pool(x, torch.tensor([[0.0] + box]), output_size=2, spatial_scale=8.0,
                                    sampling_ratio=sr)
                assert torch.isfinite(y).all(), (box, sr, y)
                y.sum().backward()
                assert torch.isfinite(x.grad).all()
        print("clean exit")
        """,
}


@pytest.fixture(scope="module")
def isolated_outcomes():
    return run_isolated_cases(ISOLATED)


def test_nan_box_fails_cleanly_where_roi_align_crashes(isolated_outcomes):
    # torchvision's roi_align segfaults (or reads garbage) on a NaN box with a fixed sampling ratio
    out = isolated_outcomes["NaN and infinite boxes"]
    assert out.ok, out.error
    assert out.stdout.count("rejected ") == 9 and "clean exit" in out.stdout, out.stdout


def test_hostile_offsets_and_masks_do_not_crash(isolated_outcomes):
    out = isolated_outcomes["hostile offsets and masks"]
    assert out.ok, out.error
    assert "clean exit" in out.stdout


@native
def test_huge_adaptive_grid_skips_only_off_map_samples():
    # 300 x 300 samples per bin, of which only those on the 10 x 12 map are visited
    g = torch.Generator().manual_seed(14)
    x = torch.randn(1, 2, 10, 12, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, -290.3, -287.9, 310.1, 312.4], [0, 3.1, 2.2, 8.3, 7.9]], dtype=torch.float64)
    offset = torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 2, 2, generator=g, dtype=torch.float64)
    for off in (None, offset):
        got = deform_roi_pool(x, rois, off, mask, 2, sampling_ratio=0, gamma=0.01)
        expected = reference.deform_roi_pool(x, rois, off, mask, (2, 2), 1.0, 0, 0.01, True)
        torch.testing.assert_close(got, expected, atol=1e-14, rtol=1e-12)
    assert got[0].abs().sum() > 0


def test_coordinates_overflowing_after_scaling_do_not_crash(isolated_outcomes):
    # finite boxes whose scaled coordinates overflow float32 to inf: valid input, pooled as zeros
    out = isolated_outcomes["coordinates overflowing after scaling"]
    assert out.ok, out.error
    assert "clean exit" in out.stdout
