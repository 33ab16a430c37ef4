"""dcnv2.zoo: torchvision, mmdetection and detectron2 checkpoints into dcnv2 detectors, and the
function-preserving conversion to DCNv2."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from dcnv2.zoo import ConversionError, convert_checkpoint, convert_state_dict
from dcnv2.zoo.loading import PeerCheckpoint, read_peer_checkpoint
from zoo_fixtures import (detectron2_state_dict, layer_state, mmdet_modulated_conv, mmdet_modulated_roi_pool,
                          mmdet_state_dict, tiny_image)

SIZE = dict(min_size=96, max_size=128)


def _convert(sd, source, **kw):
    return convert_state_dict(PeerCheckpoint(sd, {}, "fixture"), source, **{**SIZE, **kw})


def _detect(model, image):
    with torch.no_grad():
        return model([image])[0]


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if hasattr(m, "running_var") and m.running_var is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


# -- torchvision -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["faster-frozenbn", "mask-batchnorm"])
def test_torchvision_detector_converted_gives_identical_detections(kind):
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    if kind == "faster-frozenbn":  # the zoo's layout (what weights=DEFAULT builds), without the download
        tv = FasterRCNN(_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=91, **SIZE)
    else:
        tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **SIZE)
    _randomise_bn(tv)
    with torch.no_grad():  # peaked class scores, so that detections pass the 0.05 score threshold
        tv.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.5)
    tv.eval()
    conversion = _convert(tv.state_dict(), "torchvision")
    assert conversion.spec.kwargs["frozen_bn"] is (kind == "faster-frozenbn")
    assert conversion.spec.label_to_category_id[1] == 1 and conversion.spec.class_names[1] == "person"
    ours = conversion.build()
    image = tiny_image()
    a, b = _detect(tv, image), _detect(ours, image)
    assert len(a["boxes"]) > 0
    assert a["boxes"].shape == b["boxes"].shape
    assert (a["boxes"] - b["boxes"]).abs().max() <= 1e-4
    assert torch.equal(a["labels"], b["labels"])
    if "masks" in a:
        assert (a["masks"] - b["masks"]).abs().max() <= 1e-4


def test_torchvision_v2_detector_is_refused_by_name():
    sd = {"roi_heads.box_head.0.0.weight": torch.zeros(1), "backbone.fpn.inner_blocks.0.0.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match="_v2"):
        _convert(sd, "torchvision")


# -- mmdetection -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mmdet_mdconv_mdpool_mask():
    sd = mmdet_state_dict(dcn="v2", box_pool="mdpool", masks=True, classes=5)
    return sd, _convert(sd, "mmdet")


def test_mmdet_structure_is_read_from_the_names(mmdet_mdconv_mdpool_mask):
    _, conversion = mmdet_mdconv_mdpool_mask
    spec = conversion.spec
    assert spec.arch == "mask_rcnn" and spec.backbone == "resnet50" and spec.fpn and spec.num_classes == 6
    assert spec.preset_fields["deform_stages"] == ["c3", "c4", "c5"] and spec.preset_fields["modulated"]
    assert spec.preset_fields["box_pool"] == "mdpool" and spec.preset_fields["mask_pool"] == "align"
    assert spec.kwargs["roi_pool_layout"] == "mmdet" and spec.kwargs["roi_sampling_ratio"] == 0
    assert spec.kwargs["anchor_rounding"] is False


def test_mmdet_classes_and_regression_rows_land_by_value(mmdet_mdconv_mdpool_mask):
    sd, conversion = mmdet_mdconv_mdpool_mask
    ours = conversion.state_dict
    cls_w, reg_w = sd["roi_head.bbox_head.fc_cls.weight"], sd["roi_head.bbox_head.fc_reg.weight"]
    C = 5
    # mmdet row i (class i + 1 of ours), background last -> ours row 0
    assert torch.equal(ours["roi_heads.box_predictor.cls_score.weight"][0], cls_w[C])
    for i in range(C):
        assert torch.equal(ours["roi_heads.box_predictor.cls_score.weight"][i + 1], cls_w[i])
        assert torch.equal(ours["roi_heads.box_predictor.bbox_pred.weight"][4 * (i + 1):4 * (i + 2)],
                           reg_w[4 * i:4 * (i + 1)])
    assert torch.count_nonzero(ours["roi_heads.box_predictor.bbox_pred.weight"][:4]) == 0
    logits = sd["roi_head.mask_head.conv_logits.weight"]
    assert torch.equal(ours["roi_heads.mask_predictor.mask_fcn_logits.weight"][3], logits[2])
    assert torch.count_nonzero(ours["roi_heads.mask_predictor.mask_fcn_logits.weight"][0]) == 0


def test_mmdet_dcn_layer_computes_what_mmcv_does(mmdet_mdconv_mdpool_mask):
    sd, conversion = mmdet_mdconv_mdpool_mask
    model = conversion.build()
    layer = model.backbone.body.layer3[1].conv2
    p = "backbone.layer3.1.conv2."
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 256, 9, 11, generator=g)
    with torch.no_grad():
        sd_off_w = sd[p + "conv_offset.weight"] * 50  # offsets of a few pixels, masks away from 0.5
        layer.conv_offset.weight.copy_(sd_off_w)
        expected = mmdet_modulated_conv(x, sd[p + "weight"], sd_off_w, sd[p + "conv_offset.bias"],
                                        layer.stride, layer.padding, layer.dilation)
        got = layer(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_mmdet_mdpool_level_layer_computes_what_mmcv_does(mmdet_mdconv_mdpool_mask):
    sd, conversion = mmdet_mdconv_mdpool_mask
    model = conversion.build()
    level = 1  # P3, stride 8
    layer = model.roi_heads.box_roi_pool.roi_layers[level]
    peer = layer_state(sd, f"roi_head.bbox_roi_extractor.roi_layers.{level}.")
    peer = {k: (v * 20 if k in ("offset_fc.4.weight", "mask_fc.2.weight") else v) for k, v in peer.items()}
    with torch.no_grad():
        layer.offset_fc[4].weight.copy_(peer["offset_fc.4.weight"])
        layer.mask_fc[2].weight.copy_(peer["mask_fc.2.weight"])
        g = torch.Generator().manual_seed(4)
        x = torch.randn(2, 256, 12, 16, generator=g)
        rois = torch.tensor([[0, 3.0, 4.0, 60.0, 50.0], [1, 10.0, 2.0, 90.0, 80.0], [0, 0.0, 0.0, 127.0, 95.0]])
        expected = mmdet_modulated_roi_pool(x, rois, peer, spatial_scale=1 / 8)
        got = layer.pool_map(x, rois, 1 / 8)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_mmdet_missing_and_extra_keys_are_named():
    sd = mmdet_state_dict(dcn="v1", classes=2)
    del sd["neck.fpn_convs.2.conv.bias"]
    sd["roi_head.bbox_head.extra_fc.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError) as err:
        _convert(sd, "mmdet")
    assert "neck.fpn_convs.2.conv.bias" in str(err.value)
    sd["neck.fpn_convs.2.conv.bias"] = torch.zeros(256)
    with pytest.raises(ConversionError, match="roi_head.bbox_head.extra_fc.weight"):
        _convert(sd, "mmdet")


def test_mmdet_dpool_loads_into_mmcvs_three_fc_layout():
    conversion = _convert(mmdet_state_dict(dcn="v1", box_pool="dpool", classes=2), "mmdet")
    assert conversion.spec.preset == "dconv-c3c5-dpool" and conversion.spec.kwargs["roi_pool_layout"] == "mmdet"
    offset_fc = [k for k in conversion.state_dict if k.startswith("roi_heads.box_roi_pool.roi_layers.3.offset_fc.")]
    assert len(offset_fc) == 6 and "roi_heads.box_roi_pool.roi_layers.3.offset_fc.4.weight" in offset_fc


@pytest.mark.slow  # an R-101 model (~45 M weights) built twice
def test_mmdet_dconv_r101_dpool_faster():
    conversion = _convert(mmdet_state_dict(depth=101, dcn="v1", box_pool="dpool", classes=3), "mmdet")
    assert conversion.spec.backbone == "resnet101" and conversion.spec.arch == "faster_rcnn"
    assert conversion.spec.preset == "dconv-c3c5-dpool" and not conversion.spec.preset_fields
    model = conversion.build()
    assert len(model.roi_heads.box_roi_pool.roi_layers[0].offset_fc) == 5  # mmcv's 3-fc DeformRoIPoolPack
    assert _detect(model, tiny_image())["boxes"].shape[1] == 4


@pytest.mark.parametrize("key, what", [
    ("backbone.layer1.0.gn1.weight", "GroupNorm"),
    ("roi_head.bbox_head.0.fc_cls.weight", "Cascade"),
    ("backbone.layer1.0.conv2.conv_offset.weight", "c2"),
    ("neck.fpn_convs.4.conv.weight", "extra convs"),
])
def test_mmdet_unsupported_features_are_refused_by_name(key, what):
    sd = {key: torch.zeros(1), "rpn_head.rpn_conv.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match=what):
        _convert(sd, "mmdet")


# -- detectron2 --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def d2_mask_dconv():
    sd = detectron2_state_dict(classes=4)
    return sd, _convert(sd, "detectron2")


def test_detectron2_dconv_mask_rcnn(d2_mask_dconv):
    sd, conversion = d2_mask_dconv
    spec = conversion.spec
    assert spec.preset == "dconv-c3c5" and spec.arch == "mask_rcnn" and spec.num_classes == 5
    model = conversion.build()
    block = model.backbone.body.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)  # STRIDE_IN_1X1
    assert block.conv2.conv_offset.stride == (1, 1)
    from torchvision.ops.misc import FrozenBatchNorm2d

    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    ours = conversion.state_dict
    cls_w = sd["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(ours["roi_heads.box_predictor.cls_score.weight"][0], cls_w[-1])
    assert torch.equal(ours["roi_heads.box_predictor.cls_score.weight"][2], cls_w[1])
    assert torch.equal(ours["roi_heads.mask_predictor.mask_fcn_logits.weight"][4],
                       sd["roi_heads.mask_head.predictor.weight"][3])
    assert torch.equal(ours["backbone.body.layer3.2.conv2.conv_offset.weight"],
                       sd["backbone.bottom_up.res4.2.conv2_offset.weight"])
    assert _detect(model, tiny_image())["boxes"].shape[1] == 4


def test_detectron2_bgr_input_is_computed_on_rgb(d2_mask_dconv):
    """detectron2 runs conv1 on (BGR * 255 - pixel_mean) / pixel_std; ours on an RGB 0..1 image."""
    sd, conversion = d2_mask_dconv
    model = conversion.build()
    image = tiny_image(1)
    bgr = image[[2, 1, 0]] * 255
    normalised = (bgr - sd["pixel_mean"]) / sd["pixel_std"]
    expected = torch.nn.functional.conv2d(normalised[None], sd["backbone.bottom_up.stem.conv1.weight"], stride=2,
                                          padding=3)
    with torch.no_grad():
        ours = model.backbone.body.conv1(model.transform.normalize(image)[None])
    assert (ours - expected).abs().max() <= 1e-3 * expected.abs().max()


def test_detectron2_pkl_is_read_and_hostile_pickles_are_refused(tmp_path):
    sd = detectron2_state_dict(classes=2, masks=False)
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "Detectron2 Model Zoo"}, f)
    ckpt = read_peer_checkpoint(path)
    assert set(ckpt.state_dict) == set(sd) and ckpt.meta["__author__"] == "Detectron2 Model Zoo"
    assert torch.equal(ckpt.state_dict["roi_heads.box_head.fc1.weight"], sd["roi_heads.box_head.fc1.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        read_peer_checkpoint(bad)
    (tmp_path / "torn.pth").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="could not be read"):
        read_peer_checkpoint(tmp_path / "torn.pth")
    with pytest.raises(FileNotFoundError):
        read_peer_checkpoint(tmp_path / "missing.pth")


# -- function-preserving conversion to DCNv2 ---------------------------------------------------------------
@pytest.mark.slow  # an R-50-FPN detector converted and run twice (~15 s)
def test_to_mdconv_c3c5_mdpool_preserves_the_detector_and_default_init_halves():
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    from dcnv2.models import convert_to_deformable

    torch.manual_seed(0)
    tv = FasterRCNN(_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=91, **SIZE)
    _randomise_bn(tv)
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.5)
    sd = tv.state_dict()
    regular = _convert(sd, "torchvision").build()
    preserved = _convert(sd, "torchvision", to_preset="mdconv-c3c5-mdpool")
    assert preserved.spec.preset == "mdconv-c3c5-mdpool"
    dcn = preserved.build()
    assert type(dcn.backbone.body.layer2[0].conv2).__name__ == "ModulatedDeformConv2d"
    image = tiny_image()
    a, b = _detect(regular, image), _detect(dcn, image)
    assert len(a["boxes"]) > 0 and a["boxes"].shape == b["boxes"].shape
    # the same function up to float rounding (zero-offset deformable convs run other GEMMs than dense ones)
    with torch.no_grad():
        x = regular.transform([image])[0].tensors
        fa, fb = regular.backbone(x), dcn.backbone(x)
    for k in fa:
        assert (fa[k] - fb[k]).abs().max() <= 1e-4 * fa[k].abs().max()
    # the same detections, matched one to one (features agree to 1e-4, so two detections of near-equal score
    # may swap places in the sorted output)
    dist = (a["boxes"][:, None, :] - b["boxes"][None, :, :]).abs().amax(-1)
    dist[a["labels"][:, None] != b["labels"][None, :]] = float("inf")
    match = dist.argmin(1)
    assert sorted(match.tolist()) == list(range(len(b["boxes"])))
    assert dist.min(1).values.max() <= 0.1
    assert (a["scores"] - b["scores"][match]).abs().max() <= 5e-3
    paper = _convert(sd, "torchvision", to_preset="mdconv-c3c5-mdpool", preserve=False).build()
    c = _detect(paper, image)
    assert c["boxes"].shape != a["boxes"].shape or (c["boxes"] - a["boxes"]).abs().max() > 1e-2

    # the layer itself: the paper's init halves a bias-free conv, preserve=True keeps it
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    x = torch.randn(1, 8, 6, 6)
    for preserve, factor in ((False, 0.5), (True, 1.0)):
        net = torch.nn.Module()
        net.layer2 = torch.nn.Sequential(torch.nn.Module())
        net.layer2[0].conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        net.layer2[0].conv2.weight.data.copy_(conv.weight)
        convert_to_deformable(net, ["c3"], modulated=True, preserve=preserve)
        with torch.no_grad():
            assert torch.allclose(net.layer2[0].conv2(x), factor * conv(x), atol=1e-5)


def test_to_preset_refuses_dropping_deformable_parts():
    sd = mmdet_state_dict(dcn="v1", classes=2)
    with pytest.raises(ValueError, match="DCNv1"):
        _convert(sd, "mmdet", to_preset="mdconv-c3c5-mdpool")


def test_new_class_count_gives_fresh_predictors():
    sd = detectron2_state_dict(classes=4, masks=False)
    conversion = _convert(sd, "detectron2", num_classes=3)
    assert conversion.spec.num_classes == 3
    assert conversion.state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3
    assert torch.equal(conversion.state_dict["backbone.body.layer3.0.conv2.weight"],
                       sd["backbone.bottom_up.res4.0.conv2.weight"])


# -- the command line: convert, then predict / export with the converted checkpoint ---------------------------
@pytest.mark.slow  # exports and runs a 170 MB R-50-FPN ONNX model (~30 s)
def test_convert_cli_then_export_onnx_and_run_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    sd = mmdet_state_dict(dcn="v2", classes=3)  # mmdetection's faster_rcnn_r50_fpn_mdconv_c3-c5 layout
    # proposals near the anchors and peaked class scores, so that the random detector detects something
    for key, factor in (("rpn_head.rpn_reg.weight", 1e-3), ("roi_head.bbox_head.fc_reg.weight", 1e-3),
                        ("roi_head.bbox_head.fc_cls.weight", 3e-3)):
        sd[key] = sd[key] * factor
    src = tmp_path / "mmdet.pth"
    torch.save({"meta": {"CLASSES": ["cat", "dog", "bird"]}, "state_dict": sd}, src)
    out = tmp_path / "dcnv2.pth"
    run = lambda *a: subprocess.run([sys.executable, "-m", "dcnv2.cli", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=600)
    r = run("convert", str(src), "--from", "mmdet", "--out", str(out), "--min-size", "96", "--max-size", "128")
    assert r.returncode == 0, r.stderr
    assert "mdconv-c3c5" in r.stdout and "4 classes" in r.stdout
    state = torch.load(out, weights_only=True)  # the few top detections, whose scores are well apart
    state["model_spec"]["kwargs"]["box_score_thresh"] = 0.39
    torch.save(state, out)
    r = run("export", "--checkpoint", str(out), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
            "--image-size", "96", "128")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-> same" in r.stdout
    n = int(r.stdout.split("verified on a random 96x128 image against PyTorch: ")[1].split("/")[0])
    assert n > 0
    r = run("convert", str(src), "--from", "detectron2", "--out", str(out))
    assert r.returncode == 2 and "not a detectron2" in r.stderr and "Traceback" not in r.stderr


def test_convert_cli_names_a_wrong_source_without_a_traceback(tmp_path, capsys):
    from dcnv2.cli import main

    src = tmp_path / "mmdet.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}}, src)
    assert main(["convert", str(src), "--from", "detectron2", "--out", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert "not a detectron2" in err and "Traceback" not in err
    assert not (tmp_path / "o.pth").exists()


def test_convert_checkpoint_reads_files_and_names_the_format(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"state_dict": {"foo.weight": torch.zeros(1)}}, path)
    with pytest.raises(ConversionError, match="not an mmdetection two-stage detector"):
        convert_checkpoint(path, "mmdet")
    with pytest.raises(ValueError, match="source must be one of"):
        convert_checkpoint(path, "timm")


@pytest.mark.slow  # an R-50-FPN detector through five commands (~15 s)
def test_converted_checkpoint_fine_tunes_evaluates_predicts_and_analyzes(tmp_path):
    """`dcnv2 convert` (detectron2 DCNv1 model) -> `train --init` on another data set (fresh predictors) ->
    `eval` / `predict` / `analyze figure` with the converted checkpoint."""
    from dcnv2.cli import main
    from dcnv2.data import synthetic

    data = tmp_path / "data"
    synthetic.generate(data, seed=1, num_train=4, num_val=2, image_size=64)
    src = tmp_path / "d2.pth"
    torch.save({"model": detectron2_state_dict(classes=7, masks=False)}, src)
    converted = tmp_path / "converted.pth"
    assert main(["convert", str(src), "--from", "detectron2", "--out", str(converted), "--min-size", "64",
                 "--max-size", "64"]) == 0
    image = next((data / "val").iterdir())
    assert main(["predict", "--checkpoint", str(converted), str(image), "--out", str(tmp_path / "pred"),
                 "--score-threshold", "0.0"]) == 0
    assert main(["analyze", "figure", "--checkpoint", str(converted), "--image", str(image), "--node", "32,32",
                 "--no-saliency", "--out", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").is_file()
    run = tmp_path / "run"
    argv = ["train", "--init", str(converted), "--data", str(data), "--out", str(run), "--min-size", "64",
            "--max-size", "64", "--max-iters", "1", "--batch-size", "2", "--warmup-iters", "1", "--lr-steps",
            "--workers", "0", "--no-progress", "--no-tensorboard", "--lr", "0.001"]
    assert main(argv) == 0
    state = torch.load(run / "model_final.pth", weights_only=True)
    assert state["model_spec"]["preset"] == "dconv-c3c5" and state["model_spec"]["kwargs"]["stride_in_1x1"]
    assert state["model_spec"]["num_classes"] != 8  # the data set's classes, fresh predictors
    before = torch.load(converted, weights_only=True)["model"]
    key = "backbone.body.layer1.0.conv1.weight"  # conv1 and c2 stay frozen (torchvision's rule for trained trunks)
    assert torch.equal(state["model"][key], before[key])
    assert not torch.equal(state["model"]["roi_heads.box_head.fc6.weight"], before["roi_heads.box_head.fc6.weight"])
    assert main(["eval", "--checkpoint", str(run / "model_final.pth"), "--data", str(data), "--out",
                 str(tmp_path / "eval"), "--no-progress"]) == 0
    assert main(["train", "--init", str(converted), "--preset", "regular", "--data", str(data), "--out",
                 str(tmp_path / "bad")]) == 2


class _MessageHub:  # stands for mmengine's objects inside an mmdetection 3.x checkpoint
    def __init__(self):
        self.scalars = [1.0]


def test_checkpoint_with_python_objects_is_refused_with_the_way_out(tmp_path):
    path = tmp_path / "mmdet3.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "message_hub": _MessageHub()}, path)
    with pytest.raises(ValueError, match="holds Python objects besides its weights") as err:
        read_peer_checkpoint(path)
    assert "weights_only=False" in str(err.value) and str(path) in str(err.value)
