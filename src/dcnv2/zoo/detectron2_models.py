"""detectron2's R-CNN ResNet-FPN checkpoints (the ``configs/Misc/*dconv_c3-c5*`` DCN models among them) into
dcnv2 detectors.

Names follow detectron2 (``modeling/backbone/resnet.py`` ``BasicStem`` / ``BottleneckBlock`` /
``DeformBottleneckBlock``, ``backbone/fpn.py``, ``proposal_generator/rpn.py`` ``StandardRPNHead``,
``roi_heads/box_head.py`` ``FastRCNNConvFCHead``, ``fast_rcnn.py`` ``FastRCNNOutputLayers``,
``mask_head.py`` ``MaskRCNNConvUpsampleHead``):

* ``backbone.bottom_up.stem.conv1`` (+ ``.norm``), ``resN.i.convJ`` (+ ``.norm``), ``resN.i.shortcut``
  (+ ``.norm``), deformable blocks' ``resN.i.conv2_offset`` ([offsets 2GK | mask logits GK] for the modulated
  ones: ``chunk(3) -> cat(offset_x, offset_y)``, sigmoid), FrozenBN;
* ``backbone.fpn_lateralK`` / ``fpn_outputK`` (K = 2..5);
* ``proposal_generator.rpn_head.conv`` / ``objectness_logits`` / ``anchor_deltas``;
* ``roi_heads.box_head.fc1/fc2``, ``box_predictor.cls_score`` (background **last**), ``bbox_pred`` (4 C);
* ``roi_heads.mask_head.mask_fcn1..4``, ``deconv``, ``predictor`` (C).

The MSRA ResNets of detectron2's zoo downsample in the 1x1 conv (``RESNETS.STRIDE_IN_1X1``), read BGR
0..255 images with pixel std 1 (``pixel_mean`` / ``pixel_std``, stored as buffers). Ours reads RGB 0..1: conv1's
input channels are reversed and the transform's mean / std are the pixel values / 255. Pooling is ROIAlignV2
(aligned, adaptive sampling) and anchors are unrounded.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from torch import Tensor

from dcnv2.zoo.keymap import (ConversionError, KeyMapper, background_last_to_first, class_masks_to_torchvision,
                              class_regression_to_torchvision)
from dcnv2.zoo.structure import match_preset, read_trunk

__all__ = ["convert_detectron2"]

_BODY = "backbone.bottom_up."
# detectron2's MSRA R-50 defaults (BGR), used when the checkpoint lacks the pixel_mean/pixel_std buffers
_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
_PIXEL_STD_BGR = (1.0, 1.0, 1.0)


def convert_detectron2(sd: Dict[str, Tensor], meta: Dict, origin: str,
                       stride_in_1x1: bool = True) -> Tuple[Dict, KeyMapper, List[str]]:
    """Returns (ModelSpec fields, the filled KeyMapper, notes). ``stride_in_1x1`` is the config's
    ``MODEL.RESNETS.STRIDE_IN_1X1`` (True for the MSRA-initialised zoo models)."""
    if f"{_BODY}stem.conv1.weight" not in sd:
        raise ConversionError(f"{origin} is not a detectron2 ResNet model (no {_BODY}stem.conv1.weight)")
    if any(k.startswith("roi_heads.res5.") for k in sd):
        raise ConversionError(f"{origin} is a C4 model (roi_heads.res5); only ResNet-FPN detectors are supported")
    if any(k.startswith("roi_heads.box_head.conv") for k in sd):
        raise ConversionError(f"{origin} has a conv box head (NUM_CONV > 0); dcnv2's box head is 2 fc layers")
    if any(k.startswith("roi_heads.box_predictor.") and ".0." in k for k in sd) or any(
            k.startswith("roi_heads.box_head.0.") for k in sd):
        raise ConversionError(f"{origin} is a Cascade R-CNN (several box heads), which dcnv2 does not build")
    if "proposal_generator.rpn_head.conv.weight" not in sd or "roi_heads.box_predictor.cls_score.weight" not in sd:
        raise ConversionError(f"{origin} is not a detectron2 Faster/Mask R-CNN (no RPN head or box predictor)")
    if any(k.endswith(".norm.num_groups") or ".norm.gn" in k for k in sd):
        raise ConversionError(f"{origin} uses GroupNorm, which dcnv2 does not build")
    trunk = read_trunk(sd, lambda s, i: f"{_BODY}res{s + 1}.{i}.", "conv2_offset.weight", origin)
    masks = "roi_heads.mask_head.predictor.weight" in sd
    preset, preset_fields = match_preset(trunk, "align", "align")
    num_classes = int(sd["roi_heads.box_predictor.cls_score.weight"].shape[0])  # C + 1
    C = num_classes - 1

    m = KeyMapper(sd, origin)
    m.move_prefix(f"{_BODY}stem.conv1.norm.", "backbone.body.bn1.")
    m.put("backbone.body.conv1.weight", m.take(f"{_BODY}stem.conv1.weight").flip(1))  # BGR -> RGB
    for s in range(2, 6):
        m.move_prefix(f"{_BODY}res{s}.", f"backbone.body.layer{s - 1}.", rename={
            ".conv1.norm.": ".bn1.", ".conv2.norm.": ".bn2.", ".conv3.norm.": ".bn3.",
            ".shortcut.norm.": ".downsample.1.", ".shortcut.weight": ".downsample.0.weight",
            ".conv2_offset.": ".conv2.conv_offset."})
    for level in range(2, 6):
        for p in ("weight", "bias"):
            m.move(f"backbone.fpn_lateral{level}.{p}", f"backbone.fpn.inner_blocks.{level - 2}.0.{p}")
            m.move(f"backbone.fpn_output{level}.{p}", f"backbone.fpn.layer_blocks.{level - 2}.0.{p}")
    for src, dst in (("conv", "conv.0.0"), ("objectness_logits", "cls_logits"), ("anchor_deltas", "bbox_pred")):
        for p in ("weight", "bias"):
            m.move(f"proposal_generator.rpn_head.{src}.{p}", f"rpn.head.{dst}.{p}")
    for src, dst in (("fc1", "fc6"), ("fc2", "fc7")):
        for p in ("weight", "bias"):
            m.move(f"roi_heads.box_head.{src}.{p}", f"roi_heads.box_head.{dst}.{p}")
    for p in ("weight", "bias"):
        m.put(f"roi_heads.box_predictor.cls_score.{p}",
              background_last_to_first(m.take(f"roi_heads.box_predictor.cls_score.{p}")))
        m.put(f"roi_heads.box_predictor.bbox_pred.{p}",
              class_regression_to_torchvision(m.take(f"roi_heads.box_predictor.bbox_pred.{p}"), C))
    if masks:
        for i in range(1, 5):
            for p in ("weight", "bias"):
                m.move(f"roi_heads.mask_head.mask_fcn{i}.{p}", f"roi_heads.mask_head.{i - 1}.0.{p}")
        for p in ("weight", "bias"):
            m.move(f"roi_heads.mask_head.deconv.{p}", f"roi_heads.mask_predictor.conv5_mask.{p}")
            m.put(f"roi_heads.mask_predictor.mask_fcn_logits.{p}",
                  class_masks_to_torchvision(m.take(f"roi_heads.mask_head.predictor.{p}")))
    mean_bgr = _pixel(m, "pixel_mean", _PIXEL_MEAN_BGR)
    std_bgr = _pixel(m, "pixel_std", _PIXEL_STD_BGR)
    kwargs = dict(frozen_bn=True, stride_in_1x1=stride_in_1x1, roi_sampling_ratio=0, roi_aligned=True,
                  anchor_rounding=False, image_mean=[v / 255 for v in reversed(mean_bgr)],
                  image_std=[v / 255 for v in reversed(std_bgr)],
                  feature_channels=int(sd["backbone.fpn_lateral2.weight"].shape[0]),
                  representation_size=int(sd["roi_heads.box_head.fc1.weight"].shape[0]))
    notes = [f"detectron2 {('Mask' if masks else 'Faster')} R-CNN {trunk.backbone} FPN -> preset {preset}"
             f"{' (custom)' if preset_fields else ''}",
             f"BGR 0..255 input (mean {list(mean_bgr)}, std {list(std_bgr)}) -> RGB 0..1: conv1's input channels "
             "reversed, mean/std divided by 255",
             f"stride in the 1x1 conv: {stride_in_1x1}",
             "classes: background moved from last to first"]
    fields = dict(arch="mask_rcnn" if masks else "faster_rcnn", preset=preset, preset_fields=preset_fields,
                  backbone=trunk.backbone, fpn=True, num_classes=num_classes, kwargs=kwargs)
    if C == 80:
        from dcnv2.zoo.coco_classes import contiguous_layout

        fields["class_names"], fields["label_to_category_id"] = contiguous_layout()
    else:
        fields["class_names"] = [f"class_{i}" for i in range(1, C + 1)]
        fields["label_to_category_id"] = {i: i for i in range(1, C + 1)}
    return fields, m, notes


def _pixel(m: KeyMapper, key: str, default) -> Tuple[float, ...]:
    if not m.has(key):
        return tuple(default)
    value = m.take(key).flatten()
    if value.numel() != 3:
        raise ConversionError(f"{m.origin}: {key} has {value.numel()} values; expected 3 (B, G, R)")
    return tuple(float(v) for v in value)
