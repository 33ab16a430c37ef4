"""torchvision's Faster / Mask R-CNN ResNet-50-FPN (``fasterrcnn_resnet50_fpn``, ``maskrcnn_resnet50_fpn``)
into dcnv2's ``regular`` FPN detector.

The state-dict names already are ours. What differs is configuration, written into the ``ModelSpec``:
FrozenBatchNorm2d, ``MultiScaleRoIAlign``'s ``aligned=False`` with 2 samples per bin, and the COCO label
layout (91 outputs, label = category id). The converted model computes what torchvision's does.
A checkpoint with BatchNorm step counters (a detector built without pretrained weights) keeps BatchNorm2d.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from torch import Tensor

from dcnv2.zoo.keymap import ConversionError, KeyMapper

__all__ = ["convert_torchvision"]

# names of torchvision < 0.13 (plain conv modules) -> current ones (Conv2dNormActivation)
_OLD_NAMES = {
    "rpn.head.conv.weight": "rpn.head.conv.0.0.weight",
    "rpn.head.conv.bias": "rpn.head.conv.0.0.bias",
    **{f"roi_heads.mask_head.mask_fcn{i}.{p}": f"roi_heads.mask_head.{i - 1}.0.{p}"
       for i in range(1, 5) for p in ("weight", "bias")},
}


def convert_torchvision(sd: Dict[str, Tensor], meta: Dict, origin: str) -> Tuple[Dict, KeyMapper, List[str]]:
    """Returns (ModelSpec fields, the filled KeyMapper, notes)."""
    if "roi_heads.box_head.fc6.weight" not in sd:
        if any(k.startswith("roi_heads.box_head.0.") for k in sd):
            raise ConversionError(f"{origin} is a torchvision *_v2 detector (conv box head with BatchNorm), which "
                                  "dcnv2 does not build; the v1 fasterrcnn/maskrcnn_resnet50_fpn are supported")
        raise ConversionError(f"{origin} is not a torchvision Faster/Mask R-CNN (no roi_heads.box_head.fc6.weight)")
    if not any(k.startswith("backbone.fpn.") for k in sd):
        raise ConversionError(f"{origin} has no FPN (backbone.fpn.*): only the ResNet-FPN detectors are supported")
    mapper = KeyMapper(sd, origin)
    for key in sd:
        mapper.move(key, _OLD_NAMES.get(key, key))
    masks = "roi_heads.mask_predictor.mask_fcn_logits.weight" in sd
    num_classes = int(sd["roi_heads.box_predictor.cls_score.weight"].shape[0])
    blocks = sum(1 for k in sd if k.startswith("backbone.body.layer3.") and k.endswith(".conv1.weight"))
    backbone = {6: "resnet50", 23: "resnet101"}.get(blocks)
    if backbone is None:
        raise ConversionError(f"{origin}: a ResNet with {blocks} blocks in layer3 is not ResNet-50/101")
    # torchvision's zoo detectors use FrozenBatchNorm2d (no step counters); one built without pretrained
    # weights has BatchNorm2d, whose counters the state dict carries
    batchnorm = any(k.startswith("backbone.body.") and k.endswith(".num_batches_tracked") for k in sd)
    fields = dict(arch="mask_rcnn" if masks else "faster_rcnn", preset="regular", backbone=backbone, fpn=True,
                  num_classes=num_classes,
                  kwargs=dict(frozen_bn=not batchnorm, roi_aligned=False, roi_sampling_ratio=2))
    notes = [f"torchvision {'Mask' if masks else 'Faster'} R-CNN {backbone} FPN -> preset regular, "
             f"{'BatchNorm2d (the checkpoint has BatchNorm step counters)' if batchnorm else 'FrozenBatchNorm2d'}"]
    if num_classes == 91:
        from dcnv2.zoo.coco_classes import torchvision_layout

        fields["class_names"], fields["label_to_category_id"] = torchvision_layout()
        notes.append("COCO labels: torchvision's 91 outputs, label = COCO category id")
    return fields, mapper, notes
