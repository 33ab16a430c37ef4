"""Malformed calls to deform_conv2d raise clear errors; hostile values never crash the process."""
from __future__ import annotations

import pytest
import torch

from dcnv2.ops import deform_conv2d
from isolated import run_isolated_cases


def good():
    x = torch.randn(2, 4, 6, 7)
    w = torch.randn(6, 2, 3, 3)  # groups = 2
    off = torch.randn(2, 2 * 2 * 9, 6, 7)  # offset groups = 2
    mask = torch.rand(2, 2 * 9, 6, 7)
    b = torch.randn(6)
    return dict(input=x, offset=off, weight=w, bias=b, padding=1, mask=mask)


def call(**changes):
    kw = good()
    kw.update(changes)
    return deform_conv2d(**kw)


def test_good_call_works():
    assert call().shape == (2, 6, 6, 7)


@pytest.mark.parametrize(
    "changes, exc, words",
    [
        (dict(input=torch.randn(4, 6, 7)), ValueError, ["input", "4-D", "3-D"]),
        (dict(input=torch.randn(1, 2, 4, 6, 7)), ValueError, ["input", "4-D", "5-D"]),
        (dict(input=[[1.0]]), TypeError, ["input", "torch.Tensor", "list"]),
        (dict(input=torch.randint(0, 3, (2, 4, 6, 7))), TypeError, ["input", "floating", "int64"]),
        (dict(weight=torch.randn(6, 2, 3, 3, dtype=torch.float64)), TypeError, ["weight", "float64", "float32"]),
        (dict(mask=torch.rand(2, 18, 6, 7, dtype=torch.float64)), TypeError, ["mask", "float64"]),
        (dict(offset=torch.randn(2, 35, 6, 7)), ValueError, ["offset", "channels", "35"]),
        (dict(offset=torch.randn(2, 36, 5, 7)), ValueError, ["offset", "(2, 36, 6, 7)", "(2, 36, 5, 7)"]),
        (dict(offset=torch.randn(3, 36, 6, 7)), ValueError, ["offset", "(2, 36, 6, 7)", "(3, 36, 6, 7)"]),
        (dict(offset=torch.randn(2, 3 * 18, 6, 7), mask=None), ValueError, ["offset_groups=3", "4"]),
        (dict(mask=torch.rand(2, 9, 6, 7)), ValueError, ["mask", "(2, 18, 6, 7)", "(2, 9, 6, 7)"]),
        (dict(mask=torch.rand(2, 18, 6, 8)), ValueError, ["mask", "(2, 18, 6, 7)", "(2, 18, 6, 8)"]),
        (dict(weight=torch.randn(6, 3, 3, 3)), ValueError, ["weight.shape[1]=3", "4"]),
        (dict(weight=torch.randn(5, 2, 3, 3), bias=None), ValueError, ["groups=2", "out_channels 5"]),
        (dict(bias=torch.randn(5)), ValueError, ["bias", "(6,)", "(5,)"]),
        (dict(bias=torch.randn(6, 1)), ValueError, ["bias", "1-D", "2-D"]),
        (dict(input=torch.randn(2, 0, 6, 7)), ValueError, ["channels must be positive"]),
        (dict(stride=0), ValueError, ["stride", "positive", "(0, 0)"]),
        (dict(stride=(1, -1)), ValueError, ["stride", "(1, -1)"]),
        (dict(dilation=0), ValueError, ["dilation", "positive"]),
        (dict(padding=-1), ValueError, ["padding", "non-negative", "(-1, -1)"]),
        (dict(stride=1.5), TypeError, ["stride", "1.5"]),
        (dict(padding=(1, 1, 1)), TypeError, ["padding", "(1, 1, 1)"]),
        (dict(padding=0, input=torch.randn(2, 4, 2, 7), offset=torch.randn(2, 36, 0, 5)), ValueError,
         ["output size must be positive", "0x5"]),
    ],
)
def test_bad_arguments_are_named(changes, exc, words):
    with pytest.raises(exc) as info:
        call(**changes)
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="offset is on"):
        call(offset=good()["offset"].cuda())


def test_device_mismatch_meta():
    with pytest.raises(ValueError, match="offset is on meta but input is on cpu"):
        call(offset=good()["offset"].to("meta"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e30, -1e30])
def test_hostile_offsets_read_zero(value):
    kw = good()
    kw["offset"].fill_(value)
    out = deform_conv2d(**kw)
    # every sample falls off the map (or is NaN) and reads 0: only the bias remains
    torch.testing.assert_close(out, kw["bias"].view(1, -1, 1, 1).expand_as(out).contiguous())
    leaves = {k: kw[k].clone().requires_grad_() for k in ("input", "offset", "weight", "mask")}
    deform_conv2d(**{**kw, **leaves}).sum().backward()
    for name, t in leaves.items():
        assert torch.isfinite(t.grad).all(), name


def test_nan_stays_local():
    kw = good()
    kw["offset"][1, 0, 2, 3] = float("nan")  # one coordinate of one tap at one pixel of image 1
    out = deform_conv2d(**kw)
    assert torch.isfinite(out).all()  # a NaN position reads zero rather than poisoning the output
    # a NaN mask value of offset group 0 (input channels 0-1) reaches only the outputs of conv group 0
    # (outputs 0-2, which read input channels 0-1) at that pixel
    kw["mask"][0, 4, 1, 1] = float("nan")
    out = deform_conv2d(**kw)
    bad = ~torch.isfinite(out)
    assert bad[0, :3, 1, 1].all() and bad.sum() == 3
    kw["mask"][0, 4, 1, 1] = 0.5
    kw["input"][1, 0, 3, 3] = float("inf")
    out = deform_conv2d(**kw)
    assert torch.isfinite(out[0]).all()  # the other image is untouched
    assert not torch.isfinite(out[1]).all()


CRASHERS = {
    "all-NaN offsets": """
        x = torch.randn(2, 8, 16, 16); w = torch.randn(8, 8, 3, 3)
        off = torch.full((2, 18, 16, 16), float('nan')); mask = torch.rand(2, 9, 16, 16)
        y = deform_conv2d(x, off, w, padding=1, mask=mask)
        assert torch.equal(y, torch.zeros_like(y)), 'NaN samples must read zero'
        xs = [t.requires_grad_() for t in (x, off, w, mask)]
        deform_conv2d(x, off, w, padding=1, mask=mask).sum().backward()
        print('ok')
    """,
    "stride=0": """
        try:
            deform_conv2d(torch.randn(1, 2, 5, 5), torch.randn(1, 18, 5, 5), torch.randn(2, 2, 3, 3), stride=0)
        except ValueError as e:
            assert 'stride' in str(e); print('ok')
    """,
    "huge offsets": """
        x = torch.randn(1, 4, 9, 9); w = torch.randn(4, 4, 3, 3)
        for v in (1e30, -1e30, float('inf'), -float('inf'), 3e9):
            y = deform_conv2d(x, torch.full((1, 18, 9, 9), v), w, padding=1)
            assert torch.equal(y, torch.zeros_like(y))
        print('ok')
    """,
    "native op called directly with bad shapes": """
        try:
            torch.ops.dcnv2.deform_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), torch.randn(1, 17, 5, 5),
                                          None, None, [1, 1], [1, 1], [1, 1], 1, 1)
        except (RuntimeError, ValueError) as e:
            print('ok')
    """,
    "native op called directly with stride 0": """
        try:
            torch.ops.dcnv2.deform_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), torch.randn(1, 18, 5, 5),
                                          None, None, [0, 0], [1, 1], [1, 1], 1, 1)
        except (RuntimeError, ValueError) as e:
            assert 'stride' in str(e); print('ok')
    """,
}


@pytest.fixture(scope="module")
def crasher_outcomes():
    """All the crash-prone snippets in one child process (a crash fails only its own snippet)."""
    return run_isolated_cases(CRASHERS, prelude="import torch\nfrom dcnv2.ops import deform_conv2d\n")


@pytest.mark.parametrize("name", list(CRASHERS))
def test_crash_prone_inputs_exit_cleanly(name, crasher_outcomes):
    outcome = crasher_outcomes[name]
    assert outcome.ok, f"{name}: {outcome.error}"
    assert outcome.stdout.strip().endswith("ok"), outcome.stdout
