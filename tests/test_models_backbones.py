"""DCN ResNet/ResNeXt backbones: every backbone builds and runs, stage conversion keeps weights, dilated conv5,
weights from a local state dict or a (mocked) torchvision weights enum, presets."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from dcnv2.models import PRESETS, DetectorPreset, convert_to_deformable, dcn_resnet, dilate_conv5, get_preset
from dcnv2.models.resnet import BACKBONES, load_backbone_weights, parse_stages, resolve_weights
from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d

# 3x3 convs in conv3..conv5: Bottleneck has one per block, BasicBlock two
C3C5_LAYERS = {"resnet18": 2 * 6, "resnet34": 2 * 13, "resnet50": 13, "resnet101": 30, "resnet152": 47,
               "resnext50_32x4d": 13, "resnext101_32x8d": 30}


def _trunk(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


# the three deepest add no block kind that resnet18/34 (basic), resnet50 (bottleneck) and resnext50_32x4d
# (grouped) don't have: they run in `make test-slow`
DEEP = ("resnet101", "resnet152", "resnext101_32x8d")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in BACKBONES])
def test_every_backbone_builds_and_runs_with_deformable_c3_c5(name):
    torch.manual_seed(0)
    model = dcn_resnet(name, deform_stages=("c3", "c4", "c5"), modulated=True, conv5_dilation=True).eval()
    dcn = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(dcn) == C3C5_LAYERS[name]
    assert not any(isinstance(m, ModulatedDeformConv2d) for m in model.layer1.modules())
    # offset/mask convs start at zero
    assert all(not m.conv_offset.weight.detach().any() for m in dcn)
    with torch.no_grad():
        out = _trunk(model, torch.rand(1, 3, 64, 64))
    expected_channels = 512 if name in ("resnet18", "resnet34") else 2048
    assert out.shape == (1, expected_channels, 4, 4)  # stride 16: conv5 dilated
    assert torch.isfinite(out).all()


def test_stage_names_and_errors():
    assert parse_stages(["c5", 3, "layer3"]) == ("c3", "c4", "c5")
    assert parse_stages("c2") == ("c2",)
    with pytest.raises(ValueError, match="unknown stage 'c6'"):
        parse_stages(["c6"])
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        dcn_resnet("resnet19")
    with pytest.raises(ValueError, match="offset_groups=3 must divide"):
        convert_to_deformable(tv_resnet.resnet18(), ["c3"], offset_groups=3)


@pytest.mark.parametrize("stages", [("c2",), ("c5",), ("c2", "c3", "c4", "c5")])
def test_convert_to_deformable_dcnv1_keeps_weights_and_outputs(stages):
    torch.manual_seed(0)
    ref = tv_resnet.resnet18().eval()
    model = convert_to_deformable(tv_resnet.resnet18(), stages, modulated=False)
    model.load_state_dict(ref.state_dict(), strict=False)
    model.eval()
    converted = {n for n, m in model.named_modules() if isinstance(m, DeformConv2d)}
    expected = {f"{layer}.{b}.conv{c}" for s in stages for layer in [{"c2": "layer1", "c3": "layer2", "c4": "layer3",
                                                                      "c5": "layer4"}[s]] for b in (0, 1) for c in (1, 2)}
    assert converted == expected
    # every regular weight carried over, nothing else changed
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert set(sd) - set(ref_sd) == {f"{n}.conv_offset.{p}" for n in converted for p in ("weight", "bias")}
    for k, v in ref_sd.items():
        assert torch.equal(sd[k], v), k
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_convert_to_deformable_copies_weights_from_a_pretrained_model():
    torch.manual_seed(0)
    ref = tv_resnet.resnext50_32x4d()
    conv = ref.layer3[1].conv2
    model = convert_to_deformable(ref, ["c4"], modulated=True, offset_groups=2)
    dcn = model.layer3[1].conv2
    assert isinstance(dcn, ModulatedDeformConv2d) and dcn.groups == 32 and dcn.offset_groups == 2
    assert dcn.weight.data_ptr() != conv.weight.data_ptr() and torch.equal(dcn.weight, conv.weight)
    assert dcn.conv_offset.out_channels == 3 * 2 * 9
    # a fresh modulated layer is the conv scaled by the initial mask sigmoid(0) = 0.5
    x = torch.rand(1, conv.in_channels, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(dcn(x), 0.5 * conv(x), rtol=1e-4, atol=1e-5)
    # already deformable layers are left alone by a second conversion
    assert convert_to_deformable(model, ["c4"], modulated=False).layer3[1].conv2 is dcn


def test_dilate_conv5_matches_torchvision_and_handles_basic_blocks():
    torch.manual_seed(0)
    ours = dilate_conv5(tv_resnet.resnet50()).eval()
    theirs = tv_resnet.resnet50(replace_stride_with_dilation=[False, False, True]).eval()
    theirs.load_state_dict(ours.state_dict())
    for (n1, m1), (_, m2) in zip(ours.named_modules(), theirs.named_modules()):
        if isinstance(m1, nn.Conv2d):
            assert (m1.stride, m1.padding, m1.dilation) == (m2.stride, m2.padding, m2.dilation), n1
    basic = dilate_conv5(tv_resnet.resnet18()).eval()
    assert basic.layer4[0].conv1.stride == (1, 1) and basic.layer4[0].conv1.dilation == (1, 1)
    assert basic.layer4[0].conv2.dilation == (2, 2) and basic.layer4[1].conv1.dilation == (2, 2)
    assert basic.layer4[0].downsample[0].stride == (1, 1)
    with torch.no_grad():
        assert _trunk(basic, torch.rand(1, 3, 64, 64)).shape == (1, 512, 4, 4)
    # dilating after conversion moves the offset conv along with the deformable conv
    model = dilate_conv5(convert_to_deformable(tv_resnet.resnet18(), ["c5"], modulated=False))
    dcn = model.layer4[1].conv2
    assert dcn.dilation == dcn.conv_offset.dilation == (2, 2) and dcn.padding == dcn.conv_offset.padding == (2, 2)
    with torch.no_grad():
        assert _trunk(model, torch.rand(1, 3, 64, 64)).shape == (1, 512, 4, 4)


def test_weights_from_local_state_dict_files(tmp_path):
    torch.manual_seed(0)
    ref = tv_resnet.resnet18()
    sd = ref.state_dict()
    plain, wrapped, ddp = tmp_path / "r18.pth", tmp_path / "ckpt.pth", tmp_path / "ddp.pt"
    torch.save(sd, plain)
    torch.save({"model": sd, "epoch": 3}, wrapped)
    torch.save({f"module.{k}": v for k, v in sd.items()}, ddp)
    for path in (plain, str(wrapped), ddp):
        model = dcn_resnet("resnet18", deform_stages=("c3", "c4", "c5"), modulated=True, weights=path)
        got = model.state_dict()
        for k, v in sd.items():
            assert torch.equal(got[k], v), k
        offsets = [v for k, v in got.items() if ".conv_offset." in k]
        assert len(offsets) == 2 * 12 and all(float(v.abs().sum()) == 0 for v in offsets)
    # a DCN state dict (offsets included) round-trips
    dcn = dcn_resnet("resnet18", deform_stages=("c5",), modulated=False)
    with torch.no_grad():
        dcn.layer4[0].conv1.conv_offset.weight.normal_()
    torch.save(dcn.state_dict(), tmp_path / "dcn.pth")
    again = dcn_resnet("resnet18", deform_stages=("c5",), modulated=False, weights=tmp_path / "dcn.pth")
    assert torch.equal(again.layer4[0].conv1.conv_offset.weight, dcn.layer4[0].conv1.conv_offset.weight)


def test_bad_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        dcn_resnet("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing"):
        dcn_resnet("resnet18", weights=tmp_path / "missing")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        dcn_resnet("resnet18", weights="IMAGENET_V9")
    torch.save(tv_resnet.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="does not fit: missing .*unexpected"):
        dcn_resnet("resnet18", weights=tmp_path / "r34.pth")
    torch.save([1, 2], tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        dcn_resnet("resnet18", weights=tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone_weights(tv_resnet.resnet18(), {"conv1.weight": torch.zeros(64, 3, 7, 7), "extra": torch.zeros(1)})


def test_torchvision_weights_enum_path(monkeypatch):
    """`weights=` takes torchvision's enum (or its name) and gets the state dict from it; the download is
    replaced by a local state dict here (no network)."""
    from torchvision.models._api import WeightsEnum

    torch.manual_seed(1)
    sd = tv_resnet.resnet18().state_dict()
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return sd

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    for w in ("IMAGENET1K_V1", "DEFAULT", tv_resnet.ResNet18_Weights.IMAGENET1K_V1):
        model = dcn_resnet("resnet18", deform_stages=("c5",), weights=w)
        assert torch.equal(model.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    assert calls == [tv_resnet.ResNet18_Weights.IMAGENET1K_V1] * 3
    assert resolve_weights("resnet18", None) is None


def test_presets_are_the_table_1_rows():
    assert list(PRESETS) == ["regular-roipool", "regular", "dcnv1", "dconv-c5", "dconv-c4c5", "dconv-c3c5",
                             "dconv-c3c5-dpool", "mdconv-c3c5", "mdconv-c3c5-mdpool",
                             "regular-mimic", "dcnv2", "dcnv2-fgbg", "dcnv2-bg"]  # + Table 3's mimicking
    p = PRESETS["dcnv1"]
    assert p.deform_stages == ("c5",) and not p.modulated and p.box_pool == p.mask_pool == "dpool"
    p = PRESETS["mdconv-c3c5-mdpool"]
    assert p.deform_stages == ("c3", "c4", "c5") and p.modulated and p.box_pool == "mdpool"
    p = PRESETS["mdconv-c3c5"]
    assert p.deform_stages == ("c3", "c4", "c5") and p.modulated and p.box_pool == p.mask_pool == "align"


def test_the_ablation_tables_name_existing_presets():
    from dcnv2.experiments.ablation import TABLE1_PRESETS, TABLE3_PRESETS

    assert set(TABLE1_PRESETS) <= set(PRESETS) and set(TABLE3_PRESETS) <= set(PRESETS)
    assert len(TABLE1_PRESETS) == 8
    assert PRESETS["regular-roipool"].box_pool == "roipool" and PRESETS["regular"].box_pool == "align"
    assert PRESETS["dconv-c4c5"].deform_stages == ("c4", "c5") and PRESETS["dconv-c4c5"].box_pool == "align"
    custom = PRESETS["dconv-c3c5"].replace(name="og4", offset_groups=4)
    assert custom.offset_groups == 4 and get_preset(custom) is custom
    with pytest.raises(ValueError, match="box_pool must be one of"):
        DetectorPreset("x", box_pool="maxpool")
    with pytest.raises(ValueError, match="unknown preset 'dcnv3'"):
        get_preset("dcnv3")
    with pytest.raises(ValueError, match="unknown stage"):
        DetectorPreset("x", deform_stages=("c1",))
