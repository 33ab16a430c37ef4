"""mmdetection's Faster / Mask R-CNN ResNet-FPN checkpoints (the ``configs/dcn`` and ``configs/dcnv2`` zoo
among them) into dcnv2 detectors.

Names follow mmdetection 2.x/3.x (``mmdet/models/backbones/resnet.py``, ``necks/fpn.py``,
``dense_heads/rpn_head.py``, ``roi_heads/bbox_heads/convfc_bbox_head.py`` ``Shared2FCBBoxHead``,
``roi_heads/mask_heads/fcn_mask_head.py``, ``roi_extractors/single_level_roi_extractor.py``) and mmcv's
``ops/deform_conv.py`` / ``modulated_deform_conv.py`` / ``deform_roi_pool.py``:

* trunk ``backbone.layerN.i.*`` as torchvision's ResNet; DCN layers add ``conv2.conv_offset`` whose output is
  [offsets 2GK | mask logits GK] (mmcv ``chunk(3) -> cat(o1, o2), sigmoid(mask)``), the layout of ours;
* ``neck.lateral_convs.i.conv`` / ``neck.fpn_convs.i.conv``; ``rpn_head.rpn_conv`` / ``rpn_cls`` / ``rpn_reg``;
* ``roi_head.bbox_head.shared_fcs.0/1``, ``fc_cls`` (C + 1 rows, background **last**), ``fc_reg`` (4 C rows,
  no background; target stds 0.1 / 0.2 = torchvision's weights 10 / 5);
* ``roi_head.bbox_roi_extractor.roi_layers.L.offset_fc`` (+ ``mask_fc``): mmcv's ``(Modulated)DeformRoIPoolPack``,
  one per FPN level, loaded into our ``roi_pool_layout="mmdet"``;
* ``roi_head.mask_head.convs.i.conv``, ``upsample`` (2x deconv), ``conv_logits`` (C rows).

mmdetection's RoIAlign samples adaptively (``sampling_ratio=0``), aligned, and its anchors are unrounded;
the ``ModelSpec`` says so. Input normalisation is torchvision's ImageNet mean/std (mmdetection's
``img_norm_cfg`` for ``style='pytorch'``); ``style='caffe'`` checkpoints (stride in the 1x1 conv, BGR, std 1)
are recognised from the config stored in the checkpoint.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from torch import Tensor

from dcnv2.zoo.keymap import (ConversionError, KeyMapper, background_last_to_first, class_masks_to_torchvision,
                              class_regression_to_torchvision)
from dcnv2.zoo.structure import match_preset, read_trunk

__all__ = ["convert_mmdet"]

# features that change the architecture, found by name: refused with what they are
_UNSUPPORTED = (
    (r"^roi_head\.bbox_head\.\d+\.", "Cascade R-CNN (several bbox heads)"),
    (r"^roi_head\.semantic_head\.", "Hybrid Task Cascade (semantic head)"),
    (r"\.gn\d?\.|\.gn\.", "GroupNorm (the GN / GN+WS configs)"),
    (r"^backbone\.stem\.", "a deep-stem ResNet (ResNetV1d)"),
    (r"^backbone\.layer1\.\d+\.conv2\.conv_offset\.", "deformable convs in c2 (stage_with_dcn[0])"),
    (r"^roi_head\.bbox_head\.shared_convs\.", "a conv box head (4conv1fc)"),
    (r"^neck\.fpn_convs\.4\.", "FPN extra convs (add_extra_convs, RetinaNet-style P6)"),
    (r"^bbox_head\.", "a single-stage detector (RetinaNet, FCOS ...)"),
    (r"\.rfp_", "recursive FPN (DetectoRS)"),
    (r"\.conv_offset_mask\.", "an old mmdet 1.x DCN layout (conv_offset_mask)"),
)


def convert_mmdet(sd: Dict[str, Tensor], meta: Dict, origin: str) -> Tuple[Dict, KeyMapper, List[str]]:
    """Returns (ModelSpec fields, the filled KeyMapper, notes)."""
    for pattern, what in _UNSUPPORTED:
        hit = next((k for k in sd if re.search(pattern, k)), None)
        if hit is not None:
            raise ConversionError(f"{origin} uses {what} (e.g. {hit!r}), which dcnv2 does not build; supported: "
                                  "Faster/Mask R-CNN ResNet-FPN with regular / dconv / mdconv c3-c5 and "
                                  "RoIAlign / dpool / mdpool")
    if "rpn_head.rpn_conv.weight" not in sd or "roi_head.bbox_head.fc_cls.weight" not in sd:
        raise ConversionError(f"{origin} is not an mmdetection two-stage detector (no rpn_head.rpn_conv.weight / "
                              "roi_head.bbox_head.fc_cls.weight)")
    if not any(k.startswith("neck.lateral_convs.") for k in sd):
        raise ConversionError(f"{origin} has no FPN neck (a C4 model): only ResNet-FPN detectors are supported")
    config = str(meta.get("config") or "")
    dcn_type = "v2" if "type='DCNv2'" in config else ("v1" if "type='DCN'" in config else None)
    trunk = read_trunk(sd, lambda s, i: f"backbone.layer{s}.{i}.", "conv2.conv_offset.weight", origin, dcn_type)
    masks = "roi_head.mask_head.conv_logits.weight" in sd
    box_pool, hidden = _pool_kind(sd, "roi_head.bbox_roi_extractor.")
    mask_pool, mask_hidden = _pool_kind(sd, "roi_head.mask_roi_extractor.") if masks else ("align", None)
    if hidden and mask_hidden and hidden != mask_hidden:
        raise ConversionError(f"{origin}: box and mask RoI pooling branches of different widths ({hidden}, "
                              f"{mask_hidden}); dcnv2 uses one width")
    preset, preset_fields = match_preset(trunk, box_pool, mask_pool if masks else box_pool,
                                         hidden or mask_hidden or 1024)
    num_classes = int(sd["roi_head.bbox_head.fc_cls.weight"].shape[0])  # C + 1
    C = num_classes - 1
    representation = int(sd["roi_head.bbox_head.shared_fcs.0.weight"].shape[0])
    channels = int(sd["neck.lateral_convs.0.conv.weight"].shape[0])
    caffe = "style='caffe'" in config

    m = KeyMapper(sd, origin)
    m.move_prefix("backbone.", "backbone.body.")
    n_levels = len({k.split(".")[2] for k in sd if k.startswith("neck.lateral_convs.")})
    if n_levels != 4:
        raise ConversionError(f"{origin}: an FPN over {n_levels} stages; dcnv2's FPN takes c2-c5 (4)")
    for i in range(4):
        for p in ("weight", "bias"):
            m.move(f"neck.lateral_convs.{i}.conv.{p}", f"backbone.fpn.inner_blocks.{i}.0.{p}")
            m.move(f"neck.fpn_convs.{i}.conv.{p}", f"backbone.fpn.layer_blocks.{i}.0.{p}")
    for src, dst in (("rpn_conv", "conv.0.0"), ("rpn_cls", "cls_logits"), ("rpn_reg", "bbox_pred")):
        for p in ("weight", "bias"):
            m.move(f"rpn_head.{src}.{p}", f"rpn.head.{dst}.{p}")
    if m.source["rpn_head.rpn_cls.weight"].shape[0] != 3:
        raise ConversionError(f"{origin}: its RPN predicts {m.source['rpn_head.rpn_cls.weight'].shape[0]} scores per "
                              "location; dcnv2's FPN RPN has 3 anchors (one scale, ratios 0.5 / 1 / 2) with a "
                              "sigmoid objectness (use_sigmoid=True)")
    for i, name in ((0, "fc6"), (1, "fc7")):
        for p in ("weight", "bias"):
            m.move(f"roi_head.bbox_head.shared_fcs.{i}.{p}", f"roi_heads.box_head.{name}.{p}")
    for p in ("weight", "bias"):
        m.put(f"roi_heads.box_predictor.cls_score.{p}", background_last_to_first(m.take(f"roi_head.bbox_head.fc_cls.{p}")))
        m.put(f"roi_heads.box_predictor.bbox_pred.{p}",
              class_regression_to_torchvision(m.take(f"roi_head.bbox_head.fc_reg.{p}"), C))
    m.move_prefix("roi_head.bbox_roi_extractor.", "roi_heads.box_roi_pool.")
    if masks:
        n_convs = len({k.split(".")[3] for k in sd if k.startswith("roi_head.mask_head.convs.")})
        if n_convs != 4:
            raise ConversionError(f"{origin}: a mask head with {n_convs} convs; dcnv2's (torchvision's) has 4")
        for i in range(4):
            for p in ("weight", "bias"):
                m.move(f"roi_head.mask_head.convs.{i}.conv.{p}", f"roi_heads.mask_head.{i}.0.{p}")
        for p in ("weight", "bias"):
            m.move(f"roi_head.mask_head.upsample.{p}", f"roi_heads.mask_predictor.conv5_mask.{p}")
            m.put(f"roi_heads.mask_predictor.mask_fcn_logits.{p}",
                  class_masks_to_torchvision(m.take(f"roi_head.mask_head.conv_logits.{p}")))
        m.move_prefix("roi_head.mask_roi_extractor.", "roi_heads.mask_roi_pool.")

    kwargs = dict(frozen_bn=True, roi_sampling_ratio=0, roi_aligned=True, anchor_rounding=False,
                  feature_channels=channels, representation_size=representation)
    if box_pool in ("dpool", "mdpool") or mask_pool in ("dpool", "mdpool"):
        kwargs["roi_pool_layout"] = "mmdet"
    notes = [f"mmdetection {('Mask' if masks else 'Faster')} R-CNN {trunk.backbone} FPN -> preset {preset}"
             f"{' (custom: ' + preset_fields['description'] + ')' if preset_fields else ''}",
             "classes: background moved from last to first; box regression rows gain torchvision's background rows"]
    if caffe:
        kwargs.update(stride_in_1x1=True, image_mean=[123.675 / 255, 116.28 / 255, 103.53 / 255],
                      image_std=[1 / 255] * 3)
        m.out["backbone.body.conv1.weight"] = m.out["backbone.body.conv1.weight"].flip(1)
        notes.append("style='caffe': stride in the 1x1 convs; BGR input with std 1 -> conv1's input channels "
                     "reversed for RGB, pixel std 1/255 on 0..1 images")
    fields = dict(arch="mask_rcnn" if masks else "faster_rcnn", preset=preset, preset_fields=preset_fields,
                  backbone=trunk.backbone, fpn=True, num_classes=num_classes, kwargs=kwargs)
    fields.update(_class_names(meta, C))
    return fields, m, notes


def _pool_kind(sd: Dict[str, Tensor], prefix: str) -> Tuple[str, Optional[int]]:
    """("align" | "dpool" | "mdpool", width of the offset branch's hidden fc or None)."""
    first = f"{prefix}roi_layers.0."
    if f"{first}mask_fc.0.weight" in sd:
        return "mdpool", int(sd[f"{first}offset_fc.0.weight"].shape[0])
    if f"{first}offset_fc.0.weight" in sd:
        return "dpool", int(sd[f"{first}offset_fc.0.weight"].shape[0])
    return "align", None


def _class_names(meta: Dict, C: int) -> Dict:
    classes = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
    if classes is not None and len(classes) == C:
        names = [str(c) for c in classes]
    else:
        names = None
    if C == 80:
        from dcnv2.zoo.coco_classes import contiguous_layout

        coco_names, label_to_id = contiguous_layout()
        return {"class_names": names or coco_names, "label_to_category_id": label_to_id}
    return {"class_names": names or [f"class_{i}" for i in range(1, C + 1)],
            "label_to_category_id": {i: i for i in range(1, C + 1)}}
