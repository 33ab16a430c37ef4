"""Effective sampling locations (composed through a 3x3 stack) and effective bin locations of RoI pooling."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

from dcnv2.analysis import ImageNode, RoINode, effective_bin_locations, effective_sampling_locations, stack_layers
from dcnv2.models.poolers import RoIPooler
from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d


def _stack(cls, dilation=(1, 1, 1)):
    torch.manual_seed(0)
    layers = []
    for i, d in enumerate(dilation):
        layers += [cls(3 if i == 0 else 4, 4, 3, padding=d, dilation=d), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _regular_grid(row, col, dilation=(1, 1, 1)):
    """Composed regular sampling points (x, y) of cell (row, col), in the order the tracer enumerates them."""
    pts = []
    taps = [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]
    for t3, t2, t1 in itertools.product(taps, taps, taps):
        y = row + sum(t[0] * d for t, d in zip((t3, t2, t1), dilation[::-1]))
        x = col + sum(t[1] * d for t, d in zip((t3, t2, t1), dilation[::-1]))
        pts.append((x + 0.5, y + 0.5))
    return np.array(pts)


def _set_constant_offset(layer, dy, dx):
    with torch.no_grad():
        layer.conv_offset.weight.zero_()
        layer.conv_offset.bias.zero_()
        layer.conv_offset.bias[:18].view(9, 2)[:] = torch.tensor([dy, dx])


def test_stack_layers_skips_offset_branches():
    net = _stack(DeformConv2d)
    assert stack_layers(net, "4") == ["0", "2", "4"]
    assert stack_layers(net, "2", n=5) == ["0", "2"]
    with pytest.raises(ValueError, match="not a module"):
        stack_layers(net, "9")


@pytest.mark.parametrize("cls", [DeformConv2d, ModulatedDeformConv2d, nn.Conv2d])
@pytest.mark.parametrize("dilation", [(1, 1, 1), (1, 2, 2)])
def test_zero_offset_stack_samples_the_regular_grid(cls, dilation):
    net = _stack(cls, dilation)
    x = torch.randn(1, 3, 24, 24)
    node = ImageNode(net, 12.5, 10.5, layer="4")
    loc = effective_sampling_locations(node, x)
    assert loc.points.shape == (729, 2) and loc.weights.shape == (729,)
    assert loc.layers == ["0", "2", "4"]
    np.testing.assert_allclose(loc.points, _regular_grid(10, 12, dilation), atol=1e-9)
    assert np.all(loc.weights >= 0) and loc.weights.max() > 0
    assert loc.center == (12.5, 10.5)


@pytest.mark.parametrize("cls", [DeformConv2d, ModulatedDeformConv2d])
def test_constant_offsets_move_the_composed_points(cls):
    net = _stack(cls)
    x = torch.randn(1, 3, 24, 24)
    node = ImageNode(net, 12.5, 10.5, layer="4")
    base = effective_sampling_locations(node, x).points
    offsets = [(0.5, -1.0), (1.0, 0.25), (-2.0, 1.5)]
    for layer, (dy, dx) in zip(net[::2], offsets):
        _set_constant_offset(layer, dy, dx)
    moved = effective_sampling_locations(node, x).points
    shift = np.array([sum(o[1] for o in offsets), sum(o[0] for o in offsets)])  # (x, y)
    np.testing.assert_allclose(moved - base, np.broadcast_to(shift, base.shape), atol=1e-9)


def test_strides_scale_the_sampling_points_to_pixels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), DeformConv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 3, 32, 32)
    node = ImageNode(net, 20.0, 9.0, layer="2")
    loc = effective_sampling_locations(node, x, num_layers=2)
    assert node.cell == (4, 10) and node.center == (21.0, 9.0)
    # layer 2 samples cells 9..11 (x) / 3..5 (y) of layer 0's output, which samples input pixels 2c-1..2c+1
    xs = sorted({round(v, 6) for v in loc.points[:, 0]})
    assert xs == [float(v) + 0.5 for v in range(17, 24)]


def test_gradient_weights_match_autograd_on_a_single_layer():
    torch.manual_seed(0)
    layer = DeformConv2d(3, 2, 3, padding=1)
    _set_constant_offset(layer, 0.3, -0.4)
    net = nn.Sequential(layer)
    x = torch.randn(1, 3, 10, 10)
    node = ImageNode(net, 4.5, 4.5, layer="0")
    loc = effective_sampling_locations(node, x, num_layers=1)
    # independent: the gradient of the node's summed response w.r.t. the offset map at the node's cell
    from dcnv2.ops import deform_conv2d

    offset = layer.conv_offset(x).detach().requires_grad_(True)
    out = deform_conv2d(x, offset, layer.weight, layer.bias, padding=(1, 1))
    out[0, :, 4, 4].sum().backward()
    g = offset.grad[0, :, 4, 4].view(9, 2)
    np.testing.assert_allclose(loc.weights, g.norm(dim=1).double().numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(loc.points[:, 1] - 4.5, [i + 0.3 for i in (-1, -1, -1, 0, 0, 0, 1, 1, 1)], atol=1e-6)


class _ToyDetector(nn.Module):
    def __init__(self, pool, channels=4, out=7):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.roi_heads = nn.Module()
        self.roi_heads.box_roi_pool = pool
        self.roi_heads.box_head = nn.Sequential(nn.Flatten(), nn.Linear(channels * out * out, 8), nn.ReLU())


def _align_grid(box, n=7):
    x1, y1, x2, y2 = box
    jj, ii = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5)
    return np.stack([(x1 + jj * (x2 - x1) / n).ravel(), (y1 + ii * (y2 - y1) / n).ravel()], 1)


BOX = (6.0, 4.0, 27.0, 18.0)


@pytest.mark.parametrize("pool", [
    lambda: RoIPooler(["0"], 7, 2, mode="align", aligned=True),
    lambda: _deform(0.1),
    lambda: _mdeform(0.1),
])
def test_zero_offset_bins_are_the_roialign_grid(pool):
    model = _ToyDetector(pool()).eval()
    x = torch.randn(1, 3, 32, 32)
    node = RoINode(model, BOX, (32, 32))
    bins = effective_bin_locations(node, x)
    np.testing.assert_allclose(bins.centers, _align_grid(BOX), atol=1e-9)
    assert bins.weights.shape == (49,) and np.all(bins.weights >= 0) and bins.weights.max() > 0
    assert np.all(bins.offsets == 0)
    # the traced pooling is the model's: the response is unchanged
    feats = model.backbone(x)
    ref = roi_align(feats, [torch.tensor([BOX])], 7, 1.0, 2, True)
    scale = 0.5 if "Modulated" in bins.kind else 1.0  # fresh modulated pooling: masks sigmoid(0)
    expected = model.roi_heads.box_head(ref * scale)
    assert torch.allclose(node.response(x), expected, atol=1e-5)


def _deform(gamma):
    from dcnv2.nn import DeformRoIPool

    return DeformRoIPool(4, 7, 2, gamma, featmap_names=["0"])


def _mdeform(gamma):
    from dcnv2.nn import ModulatedDeformRoIPool

    return ModulatedDeformRoIPool(4, 7, 2, gamma, 16, featmap_names=["0"])


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("gamma", [0.1, 0.3])
def test_known_offsets_shift_bins_by_gamma_offset_roi_size(modulated, gamma):
    pool = _mdeform(gamma) if modulated else _deform(gamma)
    last = pool.offset_fc[4] if modulated else pool.offset_fc
    ox = torch.linspace(-1, 1, 49)
    oy = torch.linspace(0.5, -0.5, 49)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[:49], last.bias[49:98] = ox, oy
    model = _ToyDetector(pool).eval()
    node = RoINode(model, BOX, (32, 32))
    bins = effective_bin_locations(node, torch.randn(1, 3, 32, 32))
    w, h = BOX[2] - BOX[0], BOX[3] - BOX[1]
    expected = _align_grid(BOX) + np.stack([gamma * ox.double().numpy() * w, gamma * oy.double().numpy() * h], 1)
    np.testing.assert_allclose(bins.centers, expected, atol=1e-6)
    assert bins.gamma == pytest.approx(gamma)


def test_multiscale_roialign_bins_are_unaligned():
    model = _ToyDetector(MultiScaleRoIAlign(["0"], 7, 2)).eval()
    bins = effective_bin_locations(RoINode(model, BOX, (32, 32)), torch.randn(1, 3, 32, 32))
    np.testing.assert_allclose(bins.centers, _align_grid(BOX) + 0.5, atol=1e-9)


def test_wrong_node_kinds_are_rejected():
    net = _stack(DeformConv2d)
    node = ImageNode(net, 3, 3, layer="4")
    with pytest.raises(TypeError, match="RoI-wise"):
        effective_bin_locations(node, torch.randn(1, 3, 8, 8))
    model = _ToyDetector(_deform(0.1))
    with pytest.raises(TypeError, match="image-wise"):
        effective_sampling_locations(RoINode(model, BOX, (32, 32)), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="box"):
        RoINode(model, (5, 5, 4, 9), (32, 32))


def test_paper_detector_dilated_conv5_and_dpool():
    """The paper's detector (no FPN, conv5 dilated, stride 16), DCNv1 preset: fresh offsets are zero, so the
    composed points are the dilated lattice and the bins the RoIAlign grid; the RoI node is rcnn_features."""
    from dcnv2.analysis import prepare_image, trunk_of
    from dcnv2.models import faster_rcnn

    torch.manual_seed(0)
    model = faster_rcnn(preset="dcnv1", backbone="resnet18", fpn=False, num_classes=3, min_size=64, max_size=64,
                        feature_channels=8, representation_size=16, mdpool_hidden=8).eval()
    prepared = prepare_image(model, torch.rand(3, 64, 64))
    x = prepared.tensor
    node = ImageNode(trunk_of(model), 40.0, 24.0)
    loc = effective_sampling_locations(node, x)
    assert node.layer == "layer4" and node.cell == (1, 2)
    assert loc.layers == ["layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    s = np.arange(-3, 4)
    assert sorted(set(np.round(loc.points[:, 0], 6))) == list((2 + 2 * s + 0.5) * 16)
    assert sorted(set(np.round(loc.points[:, 1], 6))) == list((1 + 2 * s + 0.5) * 16)
    box = (8.0, 10.0, 50.0, 40.0)
    rnode = RoINode(model, box, prepared.size)
    bins = effective_bin_locations(rnode, x)
    assert bins.kind == "DeformRoIPool"
    np.testing.assert_allclose(bins.centers, _align_grid(box), atol=1e-9)
    with torch.no_grad():
        feats = model.backbone(x)
        expected = model.rcnn_features(feats, [torch.tensor([box])], [prepared.size])
        assert torch.allclose(rnode.response(x), expected, atol=1e-6)
