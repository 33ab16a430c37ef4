"""Classification checkpoint -> detector / segmenter trunk, offset and mask convs included (Table 7)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dcnv2.models import classifier, faster_rcnn, mask_rcnn, segmenter
from dcnv2.models.resnet import dcn_resnet
from dcnv2.models.transfer import TransferError, find_trunk, load_backbone_checkpoint

SMALL = dict(num_classes=3, min_size=48, max_size=48, feature_channels=16, representation_size=32, mdpool_hidden=16)


def _checkpoint(path, preset="dcnv2", backbone="resnet18", seed=1):
    """A classifier's checkpoint (``model_final.pth`` layout: backbone.<torchvision key>) with trained-looking
    (random, non-default) weights everywhere, offset/mask convs included."""
    torch.manual_seed(seed)
    model = classifier(preset=preset, backbone=backbone, num_classes=5)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.01 + (1.0 if "running_var" in name else 0.0))
    state = {"model": model.state_dict(),
             "model_spec": {"arch": "classifier", "preset": preset, "backbone": backbone, "num_classes": 5}}
    torch.save(state, path)
    return state["model"]


def _trunk_keys(sd, prefix="backbone."):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.startswith(prefix + "fc.")}


def _detector(kind: str, preset: str = "mdconv-c3c5-mdpool", backbone: str = "resnet18"):
    torch.manual_seed(0)
    if kind == "paper":
        return faster_rcnn(preset=preset, backbone=backbone, fpn=False, **SMALL)
    if kind == "fpn":
        return faster_rcnn(preset=preset, backbone=backbone, fpn=True, **SMALL)
    if kind == "mask-paper":
        return mask_rcnn(preset=preset, backbone=backbone, fpn=False, **SMALL)
    return segmenter(preset="dcnv2" if preset == "mdconv-c3c5-mdpool" else preset, backbone=backbone, num_classes=3,
                     min_size=48, max_size=48, output_stride=16, atrous_rates=(1, 2, 3))


@pytest.mark.parametrize("kind", ["paper", "fpn", "mask-paper", "segmenter"])
def test_pretrained_offsets_arrive_unchanged(tmp_path, kind):
    ckpt = _trunk_keys(_checkpoint(tmp_path / "cls.pth"))
    model = _detector(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_backbone_checkpoint(model, tmp_path / "cls.pth")
    prefix, _ = find_trunk(model)
    assert prefix == ("backbone." if kind == "segmenter" else "backbone.body.")
    after = model.state_dict()
    offset_keys = [k for k in ckpt if ".conv_offset." in k]
    assert len(offset_keys) == 24  # resnet18 c3-c5: 12 modulated 3x3 convs, weight + bias each
    for k, v in ckpt.items():
        assert torch.equal(after[prefix + k], v), k  # every trunk tensor, offsets and masks included
    assert all(ckpt[k].abs().sum() > 0 for k in offset_keys)
    assert sorted(report.loaded_offsets) == sorted(offset_keys) and report.complete and not report.zeroed
    assert report.skipped_head == ["fc.bias", "fc.weight"]
    # nothing outside the trunk moved (heads, FPN, RPN ...), and the classifier's fc went nowhere
    outside = [k for k in before if not k.startswith(prefix)]
    assert outside and all(torch.equal(before[k], after[k]) for k in outside)
    assert not any(k.endswith("fc.weight") and k.startswith(prefix) for k in after)


@pytest.mark.parametrize("kind", ["paper", "fpn"])
def test_offsets_zero_zeroes_exactly_the_offset_branches(tmp_path, kind):
    ckpt = _trunk_keys(_checkpoint(tmp_path / "cls.pth"))
    model = _detector(kind)
    report = load_backbone_checkpoint(model, tmp_path / "cls.pth", offsets="zero")
    prefix, trunk = find_trunk(model)
    after = model.state_dict()
    differs = sorted(k for k, v in ckpt.items() if not torch.equal(after[prefix + k], v))
    offset_keys = sorted(k for k in ckpt if ".conv_offset." in k)
    assert differs == offset_keys  # exactly the offset/mask convs differ from the checkpoint ...
    assert all(not after[prefix + k].any() for k in offset_keys)  # ... and they are zero
    assert sorted(report.zeroed) == offset_keys
    # the DCNv2 initialisation: offsets 0, masks sigmoid(0) = 0.5
    layer = trunk.layer2[0].conv1
    offset, mask = layer.offset_and_mask(torch.randn(1, layer.in_channels, 8, 8))
    assert not offset.any() and torch.all(mask == 0.5)


def test_dcnv1_checkpoint_refused_by_mdconv_detector_with_the_keys(tmp_path):
    _checkpoint(tmp_path / "cls.pth", preset="dcnv1")
    model = _detector("paper")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TransferError) as err:
        load_backbone_checkpoint(model, tmp_path / "cls.pth")
    msg = str(err.value)
    assert "c5 DCNv1" in msg and "c3 DCNv2, c4 DCNv2, c5 DCNv2" in msg  # both trunks described
    assert "shape mismatch" in msg and "layer4.0.conv1.conv_offset" in msg and "[18" in msg and "[27" in msg
    assert "missing from the checkpoint" in msg and "c3 (layer2), offset/mask convs" in msg
    assert "layer2.0.conv1.conv_offset" in msg and "--strict false" in msg
    report = err.value.report
    assert {k for k, _, _ in report.mismatched} == {f"layer4.{b}.conv{c}.conv_offset.{p}" for b in (0, 1)
                                                   for c in (1, 2) for p in ("weight", "bias")}
    assert all(k.startswith(("layer2.", "layer3.")) and ".conv_offset." in k for k in report.missing)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing loaded


def test_resnet18_checkpoint_refused_by_resnet50_detector(tmp_path):
    _checkpoint(tmp_path / "cls.pth", preset="regular")
    torch.manual_seed(0)
    model = faster_rcnn(preset="regular", backbone="resnet50", fpn=True, **SMALL)
    with pytest.raises(TransferError) as err:
        load_backbone_checkpoint(model, tmp_path / "cls.pth")
    msg = str(err.value)
    assert "(2, 2, 2, 2) basic" in msg and "(3, 4, 6, 3) bottleneck" in msg
    assert "layer1.0.conv3.weight" in msg and "layer1.0.conv1.weight [64, 64, 3, 3] vs [64, 64, 1, 1]" in msg
    assert "missing from the checkpoint" in msg and "c4 (layer3), weights and BatchNorm" in msg


def test_strict_false_loads_the_matching_part_and_reports_the_rest(tmp_path):
    ckpt = _trunk_keys(_checkpoint(tmp_path / "cls.pth", preset="dcnv2"))
    model = _detector("fpn", preset="dcnv1")  # DCNv1 in conv5 only
    init = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_backbone_checkpoint(model, tmp_path / "cls.pth", strict=False)
    after = model.state_dict()
    p = "backbone.body."
    left = report.left_at_init
    assert left == sorted(left) and set(left) == {k for k, _, _ in report.mismatched}  # c5 offsets: 27 vs 18 ch
    assert len(left) == 8 and all(k.startswith("layer4.") and ".conv_offset." in k for k in left)
    assert len(report.unexpected) == 16 and all(k.startswith(("layer2.", "layer3.")) for k in report.unexpected)
    for k in left:
        assert torch.equal(after[p + k], init[p + k])  # left at its initial value
    loaded = [k for k in ckpt if k not in report.unexpected and k not in left]
    assert sorted(report.loaded) == sorted(k for k in loaded if not k.endswith("num_batches_tracked"))
    assert all(torch.equal(after[p + k], ckpt[k]) for k in loaded)
    summary = report.summary()
    assert "strict=False: 8 model tensors left at their initial values, 16 checkpoint tensors unused" in summary


def test_bad_arguments(tmp_path):
    _checkpoint(tmp_path / "cls.pth")
    model = _detector("paper")
    with pytest.raises(ValueError, match="offsets must be one of"):
        load_backbone_checkpoint(model, tmp_path / "cls.pth", offsets="random")
    with pytest.raises(FileNotFoundError):
        load_backbone_checkpoint(model, tmp_path / "nope.pth")
    torch.save({"model": {"head.weight": torch.zeros(2)}, "model_spec": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="holds no ResNet trunk"):
        load_backbone_checkpoint(model, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="has no ResNet trunk"):
        load_backbone_checkpoint(nn.Linear(2, 2), tmp_path / "cls.pth")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from dcnv2.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=0, num_train=2, num_val=2, image_size=48)
    return root


def _cli(*argv):
    from dcnv2.cli import main

    return main([str(a) for a in argv])


def test_cli_weights_backbone_offsets_zero_and_strict(tiny_set, tmp_path, capsys):
    _checkpoint(tmp_path / "cls.pth")
    common = ["train", "--backbone", "resnet18", "--data", tiny_set, "--max-iters", 1, "--batch-size", 2,
              "--min-size", 48, "--max-size", 48, "--workers", 0, "--no-progress", "--warmup-iters", 1,
              "--model-arg", "feature_channels=16", "--model-arg", "representation_size=32",
              "--model-arg", "mdpool_hidden=16", "--weights-backbone", tmp_path / "cls.pth"]
    assert _cli(*common, "--preset", "mdconv-c3c5-mdpool", "--offsets", "zero", "--out", tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "24 of offset/mask convs" in out and "24 offset/mask tensors re-zeroed" in out
    record = json.loads((tmp_path / "run" / "config.json").read_text())["model"]["backbone_init"]
    assert record["offsets"] == "zero" and len(record["zeroed"]) == 24 and record["strict"] is True
    assert "weights_backbone" not in json.loads((tmp_path / "run" / "config.json").read_text())["model"]["kwargs"]
    # a mismatch is a clean error listing the keys; --strict false trains on what matches
    assert _cli(*common, "--preset", "dcnv1", "--out", tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "layer4.0.conv1.conv_offset" in err
    assert _cli(*common, "--preset", "dcnv1", "--strict", "false", "--out", tmp_path / "loose") == 0
    assert "8 model tensors left at their initial values" in capsys.readouterr().out
    # --offsets without a classification checkpoint
    plain = tmp_path / "plain.pth"
    torch.save(dcn_resnet("resnet18").state_dict(), plain)
    args = [a if a != tmp_path / "cls.pth" else plain for a in common]
    assert _cli(*args, "--preset", "regular", "--offsets", "zero", "--out", tmp_path / "plain") == 2
    assert "apply to a dcnv2 classification checkpoint" in capsys.readouterr().err
