"""Effective receptive fields: exact footprints of known convolutions, shifted by known deformable offsets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dcnv2.analysis import ImageNode, effective_receptive_field, mass_inside
from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d


def _ones_conv(k, dilation=1, padding=0):
    conv = nn.Conv2d(3, 2, k, dilation=dilation, padding=padding, bias=False)
    nn.init.ones_(conv.weight)
    return nn.Sequential(conv)


def _support(erf):
    ys, xs = np.nonzero(erf.map)
    return set(zip(ys.tolist(), xs.tolist()))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_erf_of_all_ones_conv_is_its_footprint(k):
    net = _ones_conv(k, padding=k // 2)
    x = torch.rand(1, 3, 16, 16) + 0.1
    node = ImageNode(net, 6.5, 5.5, layer="0")  # the output cell (5, 6): "same" padding, stride 1
    erf = effective_receptive_field(node, x)
    assert node.cell == (5, 6)
    r = k // 2
    assert _support(erf) == {(5 + i, 6 + j) for i in range(-r, r + 1) for j in range(-r, r + 1)}
    # every input pixel of the footprint feeds both output channels with weight 1, in each colour channel
    assert np.allclose(erf.map[erf.map > 0], 2 * 3)
    assert torch.allclose(erf.gradient[:, 5 - r:6 + r, 6 - r:7 + r], torch.full((3, k, k), 2.0))


@pytest.mark.parametrize("dilation", [2, 3])
def test_dilation_spreads_the_footprint(dilation):
    net = _ones_conv(3, dilation=dilation, padding=dilation)
    x = torch.rand(1, 3, 20, 20) + 0.1
    node = ImageNode(net, 10.5, 9.5, layer="0")
    erf = effective_receptive_field(node, x)
    expected = {(9 + dilation * i, 10 + dilation * j) for i in (-1, 0, 1) for j in (-1, 0, 1)}
    assert _support(erf) == expected
    cx, cy = erf.centroid()
    assert (cx, cy) == pytest.approx((10.5, 9.5))


def test_channel_selection_and_padding_crop():
    conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[1, :, 1, 1] = 1.0  # channel 1 sees the centre pixel only
        conv.weight[0] = 1.0
    node = ImageNode(nn.Sequential(conv), 4.5, 4.5, layer="0", channel=1)
    erf = effective_receptive_field(node, torch.rand(1, 3, 12, 12), size=(10, 11))
    assert erf.map.shape == (10, 11)
    assert _support(erf) == {(4, 4)}
    assert erf.response.shape == (1,)


@pytest.mark.parametrize("cls", [DeformConv2d, ModulatedDeformConv2d])
@pytest.mark.parametrize("dy,dx", [(2.0, -1.0), (-3.0, 2.0)])
def test_erf_of_deformable_conv_moves_by_its_constant_offset(cls, dy, dx):
    torch.manual_seed(0)
    layer = cls(3, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        bias = layer.conv_offset.bias
        bias.zero_()
        bias[:18].view(9, 2)[:] = torch.tensor([dy, dx])  # every tap: (Δy, Δx); masks stay sigmoid(0)
    net = nn.Sequential(layer)
    x = torch.rand(1, 3, 24, 24) + 0.1
    node = ImageNode(net, 12.5, 11.5, layer="0")
    erf = effective_receptive_field(node, x)
    shifted = {(11 + int(dy) + i, 12 + int(dx) + j) for i in (-1, 0, 1) for j in (-1, 0, 1)}
    assert _support(erf) == shifted
    cx, cy = erf.centroid()
    assert (cx, cy) == pytest.approx((12.5 + dx, 11.5 + dy))


def test_mass_inside():
    m = np.zeros((4, 4))
    m[1, 1], m[2, 2] = 3.0, 1.0
    region = np.zeros((4, 4), dtype=bool)
    region[1, 1] = True
    assert mass_inside(m, region) == pytest.approx(0.75)
    assert np.isnan(mass_inside(np.zeros((4, 4)), region))
    with pytest.raises(ValueError, match="shape"):
        mass_inside(m, region[:2])


def test_bad_node_arguments():
    net = _ones_conv(3)
    with pytest.raises(ValueError, match="not a module"):
        ImageNode(net, 1, 1, layer="nope")
    with pytest.raises(ValueError, match="channel"):
        ImageNode(net, 1, 1, layer="0", channel=-1)
    with pytest.raises(ValueError, match="Tensor\\[1"):
        effective_receptive_field(ImageNode(net, 1, 1, layer="0"), torch.rand(2, 3, 8, 8))
