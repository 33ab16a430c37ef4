"""DCN classifiers: every depth and preset builds with the right deformable layers, the forward contract that
the detection engine relies on, state-dict keys shared with torchvision's ResNet, clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcnv2.engine import ModelSpec, build_model
from dcnv2.models import BACKBONES, CLASSIFIER_PRESETS, DCNClassifier, classifier, dcn_resnet
from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d

STAGE_LAYERS = {"c2": "layer1", "c3": "layer2", "c4": "layer3", "c5": "layer4"}


def _count_3x3(resnet: nn.Module, stages) -> int:
    """3x3 convs of ``stages`` in a plain torchvision ResNet: the oracle for the deformable layer count."""
    return sum(1 for s in stages for m in getattr(resnet, STAGE_LAYERS[s]).modules()
               if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3))


# the three deepest (4-8 s each, every preset built at full size) add no block kind that resnet18/34 (basic),
# resnet50 (bottleneck) and resnext50_32x4d (grouped) don't have: they run in `make test-slow`
DEEP = ("resnet101", "resnet152", "resnext101_32x8d")


@pytest.mark.parametrize("backbone", [pytest.param(b, marks=pytest.mark.slow) if b in DEEP else b for b in BACKBONES])
def test_every_depth_and_preset_builds_with_its_deformable_layers(backbone):
    plain = BACKBONES[backbone][0](weights=None)
    x = torch.randn(1, 3, 32, 32)
    for preset, (stages, modulated) in CLASSIFIER_PRESETS.items():
        model = classifier(preset, backbone, num_classes=7)
        assert isinstance(model, DCNClassifier) and model.preset == preset
        assert model.stages == stages and model.modulated == (modulated and bool(stages))
        layers = [m for m in model.backbone.modules() if isinstance(m, (DeformConv2d, ModulatedDeformConv2d))]
        assert len(layers) == len(model.deformable_layers()) == _count_3x3(plain, stages)
        kind = ModulatedDeformConv2d if modulated else DeformConv2d
        assert all(type(m) is kind for m in layers)
        # the deformable layers sit exactly in the preset's stages
        for stage, attr in STAGE_LAYERS.items():
            inside = any(isinstance(m, (DeformConv2d, ModulatedDeformConv2d)) for m in getattr(model.backbone, attr).modules())
            assert inside == (stage in stages), (preset, stage)
        assert model.backbone.fc.out_features == 7 == model.num_classes
    model.eval()  # the last (dcnv2) model runs on a tiny input
    with torch.no_grad():
        assert model(x).shape == (1, 7)


def test_known_layer_counts_of_the_paper():
    # ResNet-50: dconv@c5 is 3 layers, mdconv@c3~c5 4 + 6 + 3 = 13; ResNet-18 (BasicBlock: two 3x3 per block) 4 / 12
    assert len(classifier("dcnv1", "resnet50").deformable_layers()) == 3
    assert len(classifier("dcnv2", "resnet50").deformable_layers()) == 13
    assert len(classifier("dcnv1", "resnet18").deformable_layers()) == 4
    assert len(classifier("dcnv2", "resnet18").deformable_layers()) == 12
    assert classifier("regular", "resnet18").deformable_layers() == []


def test_state_dict_is_the_torchvision_resnet_under_backbone_with_offset_convs():
    model = classifier("dcnv2", "resnet18", num_classes=5)
    ref = dcn_resnet("resnet18", deform_stages=("c3", "c4", "c5"), modulated=True)
    ref.fc = nn.Linear(ref.fc.in_features, 5)
    keys = set(model.state_dict())
    assert keys == {f"backbone.{k}" for k in ref.state_dict()}
    offsets = [k for k in keys if ".conv_offset." in k]
    assert "backbone.layer4.1.conv2.conv_offset.weight" in offsets and len(offsets) == 2 * 12
    # 3K channels (2K offsets + K masks) and zero-initialised: a fresh model starts from offsets 0, masks 0.5
    w = model.state_dict()["backbone.layer2.0.conv1.conv_offset.weight"]
    assert w.shape[0] == 27 and torch.count_nonzero(w) == 0
    v1 = classifier("dcnv1", "resnet18").state_dict()["backbone.layer4.0.conv1.conv_offset.weight"]
    assert v1.shape[0] == 18


def test_fresh_dcnv1_classifier_computes_the_regular_one():
    torch.manual_seed(0)
    regular = classifier("regular", "resnet18", num_classes=4).eval()
    dcn = classifier("dcnv1", "resnet18", num_classes=4).eval()
    missing, unexpected = dcn.load_state_dict(regular.state_dict(), strict=False)
    assert not unexpected and missing and all(".conv_offset." in k for k in missing)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(dcn(x), regular(x), rtol=1e-4, atol=1e-5)


def test_training_forward_returns_label_smoothed_cross_entropy():
    torch.manual_seed(0)
    model = classifier("dcnv2", "resnet18", num_classes=6, label_smoothing=0.1)
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([0, 5, 2])
    model.train()
    out = model(x, y)
    assert set(out) == {"loss_cls"}
    expected = F.cross_entropy(model.backbone(x), y, label_smoothing=0.1)  # BN in train mode: batch statistics
    torch.testing.assert_close(out["loss_cls"], expected)
    as_dicts = model(list(x), [{"labels": torch.tensor([int(v)])} for v in y])
    torch.testing.assert_close(as_dicts["loss_cls"], expected)
    out["loss_cls"].backward()
    assert model.backbone.layer4[0].conv1.conv_offset.weight.grad is not None
    # no targets, or eval mode: logits
    assert model(x).shape == (3, 6)
    model.eval()
    assert model(x, y).shape == (3, 6)


def test_build_model_builds_the_classifier_of_a_spec():
    spec = ModelSpec(arch="classifier", preset="dcnv1", backbone="resnet18", num_classes=3,
                     class_names=["a", "b", "c"], kwargs={"label_smoothing": 0.2})
    model = build_model(spec)
    assert isinstance(model, DCNClassifier) and model.preset == "dcnv1" and model.label_smoothing == 0.2
    assert model.num_classes == 3 and model.stages == ("c5",)
    model2 = build_model(ModelSpec.from_dict(spec.to_dict()), inference=True)
    assert set(model2.state_dict()) == set(model.state_dict())


def test_overrides_of_stages_and_layer_type():
    model = classifier("dcnv2", "resnet18", deform_stages=("c5",), modulated=False)
    assert model.stages == ("c5",) and not model.modulated and len(model.deformable_layers()) == 4


def test_bad_arguments_and_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="unknown classifier preset 'dcnv3'"):
        classifier("dcnv3")
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'"):
        classifier("regular", "resnet7")
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        classifier("regular", "resnet18", num_classes=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        classifier("regular", "resnet18", label_smoothing=1.5)
    model = classifier("regular", "resnet18", num_classes=3)
    with pytest.raises(ValueError, match=r"equal-size tensors"):
        model([torch.zeros(3, 32, 32), torch.zeros(3, 40, 32)])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        model(torch.zeros(2, 3, 32, 32), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="expected 2 integer labels"):
        model(torch.zeros(2, 3, 32, 32), torch.tensor([0]))
    with pytest.raises(TypeError, match="list of dicts with 'labels'"):
        model(torch.zeros(2, 3, 32, 32), [{"boxes": torch.zeros(1, 4)}] * 2)
