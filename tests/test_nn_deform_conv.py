"""DeformConv2d / ModulatedDeformConv2d modules and param_groups."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d, offset_parameters, param_groups
from dcnv2.ops import deform_conv2d


@pytest.mark.parametrize("cls, per_tap", [(DeformConv2d, 2), (ModulatedDeformConv2d, 3)])
def test_initial_state_is_a_plain_conv(cls, per_tap):
    torch.manual_seed(0)
    layer = cls(8, 6, (3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2, offset_groups=4)
    assert layer.conv_offset.out_channels == per_tap * 4 * 6
    assert layer.conv_offset.kernel_size == (3, 2) and layer.conv_offset.stride == (2, 1)
    assert layer.conv_offset.padding == (1, 1) and layer.conv_offset.dilation == (1, 2)
    assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()
    x = torch.randn(2, 8, 9, 10)
    offset, mask = layer.offset_and_mask(x)
    assert offset.shape[1] == 2 * 4 * 6 and not offset.any()
    expected = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    if cls is ModulatedDeformConv2d:
        assert torch.equal(mask, torch.full_like(mask, 0.5))
        # mask 0.5 halves every tap: the output is the conv of x/2 (plus the full bias)
        expected = F.conv2d(x / 2, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, 2)
    else:
        assert mask is None
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_modulated_layer_splits_offsets_and_sigmoid_mask():
    torch.manual_seed(1)
    layer = ModulatedDeformConv2d(4, 4, 3, padding=1)
    nn.init.normal_(layer.conv_offset.weight, std=0.3)
    x = torch.randn(1, 4, 7, 7)
    raw = layer.conv_offset(x)
    offset, mask = layer.offset_and_mask(x)
    torch.testing.assert_close(offset, raw[:, :18])
    torch.testing.assert_close(mask, torch.sigmoid(raw[:, 18:]))
    expected = deform_conv2d(x, offset, layer.weight, layer.bias, padding=1, mask=mask)
    torch.testing.assert_close(layer(x), expected)
    # gradients reach the offset branch once it is non-zero
    layer(x).square().sum().backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0


def test_weights_load_from_a_regular_conv():
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=False)
    layer = ModulatedDeformConv2d(4, 5, 3, padding=1, bias=False)
    missing, unexpected = layer.load_state_dict(conv.state_dict(), strict=False)
    assert set(missing) == {"conv_offset.weight", "conv_offset.bias"} and not unexpected
    assert torch.equal(layer.weight, conv.weight)


def test_reset_parameters_and_repr():
    layer = DeformConv2d(4, 6, 3, padding=1, groups=2, bias=False, offset_groups=2)
    nn.init.normal_(layer.conv_offset.weight)
    layer.reset_parameters()
    assert not layer.conv_offset.weight.any()
    text = repr(layer)
    assert text.startswith("DeformConv2d(") and "4, 6, kernel_size=(3, 3)" in text
    assert "groups=2" in text and "offset_groups=2" in text and "bias=False" in text
    assert "conv_offset" in text
    assert layer.offset_branch() is layer.conv_offset


@pytest.mark.parametrize(
    "kwargs, word",
    [(dict(in_channels=0), "in_channels"), (dict(groups=3), "groups=3"), (dict(offset_groups=3), "offset_groups=3"),
     (dict(out_channels=2.5), "out_channels")],
)
def test_bad_module_arguments(kwargs, word):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        ModulatedDeformConv2d(**args)


def test_param_groups_give_offsets_a_tenth_of_the_lr():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), DeformConv2d(4, 4, 3), nn.ReLU(), ModulatedDeformConv2d(4, 4, 3))
    groups = param_groups(model, lr=0.02, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["base", "offset"]
    base, offs = groups
    assert base["lr"] == 0.02 and offs["lr"] == pytest.approx(0.002) and offs["lr_mult"] == 0.1
    offset_ids = {id(p) for m in (model[1], model[3]) for p in m.conv_offset.parameters()}
    assert {id(p) for p in offs["params"]} == offset_ids
    assert len(base["params"]) + len(offs["params"]) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    assert {id(p) for p in offset_parameters(model)} == offset_ids
    # usable as is
    opt = torch.optim.SGD(groups, lr=0.02, momentum=0.9)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.002)
    # frozen parameters are left out; a model without deformable layers gets one group
    model[0].weight.requires_grad_(False)
    assert all(p is not model[0].weight for g in param_groups(model, 0.1) for p in g["params"])
    assert [g["name"] for g in param_groups(nn.Linear(2, 2), 0.1)] == ["base"]
    with pytest.raises(ValueError, match="lr"):
        param_groups(model, lr=0)


@pytest.mark.parametrize("modulated", [True, False])
def test_layers_run_under_autocast_like_a_conv(modulated):
    # a mixed-precision model: float32 weights meet bfloat16 activations; the op runs in bfloat16 (float32
    # accumulation) and the gradients reach the float32 weights and the offset branch
    from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d

    torch.manual_seed(0)
    layer = (ModulatedDeformConv2d if modulated else DeformConv2d)(8, 6, 3, padding=1)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(2, 8, 10, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.conv_offset.weight.grad.abs().sum() > 0
    torch.testing.assert_close(y.float(), layer(x).detach(), atol=0.05, rtol=0.05)
