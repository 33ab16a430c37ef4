"""Faster R-CNN and Mask R-CNN with DCN backbones and (modulated) deformable RoI pooling.

Everything but the backbone trunk and the RoI pooling is torchvision's detection framework
(GeneralizedRCNNTransform, AnchorGenerator, RegionProposalNetwork, RoIHeads, TwoMLPHead, predictors).

* ``fpn=False`` — the paper's detector: conv1–conv5 over the whole image with conv5 dilated (stride 16),
  the RPN on conv4 (5 scales x 3 aspect ratios), a 1x1 conv 2048 -> 256 (+ ReLU) on conv5, 7x7 RoI
  pooling on it, 2fc 1024 (``roi_heads.box_head``), classifier and box regressor; Mask R-CNN adds the
  14x14 mask pooling on the same 256-channel map and torchvision's 4-conv mask head.
* ``fpn=True`` — torchvision's ResNet-FPN detectors (what detectron2 / mmdetection users run).

The preset (:mod:`dcnv2.models.presets`) picks the deformable stages and the box/mask RoI pooling.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN as _TVFasterRCNN
from torchvision.models.detection import MaskRCNN as _TVMaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _validate_trainable_layers
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops.misc import FrozenBatchNorm2d

from dcnv2.models.anchors import anchor_generator
from dcnv2.models.mimic import FeatureMimicking, MimicConfig, MimicRoIHeads, inference_state_dict
from dcnv2.models.poolers import make_roi_pool
from dcnv2.models.presets import DetectorPreset, get_preset
from dcnv2.models.resnet import dcn_resnet
from dcnv2.models.targets import num_classes_of, validate_targets
from dcnv2.nn import offset_parameters

__all__ = ["PaperBackbone", "FeatureSelectingRPN", "DCNFasterRCNN", "DCNMaskRCNN", "faster_rcnn", "mask_rcnn",
           "PAPER_ANCHOR_SIZES", "PAPER_ASPECT_RATIOS"]

PAPER_ANCHOR_SIZES = (32, 64, 128, 256, 512)
PAPER_ASPECT_RATIOS = (0.5, 1.0, 2.0)


class PaperBackbone(nn.Module):
    """conv1–conv5 of a (DCN) ResNet with conv5 dilated; returns ``{"c4": conv4, "c5": relu(1x1 conv(conv5))}``.

    ``c4`` (stride 16, ``c4_channels``) feeds the RPN, ``c5`` (stride 16, ``out_channels`` = 256) the RoI heads.
    """

    def __init__(self, resnet: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer3": "c4", "layer4": "c5"})
        self.c4_channels = _stage_channels(resnet.layer3)
        self.c5_channels = _stage_channels(resnet.layer4)
        self.reduce = nn.Conv2d(self.c5_channels, out_channels, 1)
        nn.init.kaiming_uniform_(self.reduce.weight, a=1)
        nn.init.zeros_(self.reduce.bias)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        feats = self.body(x)
        return OrderedDict([("c4", feats["c4"]), ("c5", torch.relu(self.reduce(feats["c5"])))])


def _stage_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    conv = last.conv3 if hasattr(last, "conv3") else last.conv2  # Bottleneck or BasicBlock
    return conv.out_channels


class FeatureSelectingRPN(RegionProposalNetwork):
    """torchvision's RPN run on the named feature maps only (the paper's RPN sees conv4, not conv5)."""

    def __init__(self, *args, in_features: List[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_features = list(in_features)

    @classmethod
    def from_rpn(cls, rpn: RegionProposalNetwork, in_features: List[str]) -> "FeatureSelectingRPN":
        """The same RPN (same head and anchor generator modules, same settings) restricted to ``in_features``."""
        new = cls(rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                  rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                  rpn.fg_bg_sampler.positive_fraction, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n),
                  rpn.nms_thresh, rpn.score_thresh, in_features=in_features)
        new.min_size = rpn.min_size
        return new

    def forward(self, images, features: Dict[str, Tensor], targets=None):
        missing = [k for k in self.in_features if k not in features]
        if missing:
            raise ValueError(f"RPN features {missing} not among the backbone's outputs {list(features)}")
        return super().forward(images, OrderedDict((k, features[k]) for k in self.in_features), targets)


class _DetectorMixin:
    """Target validation before any compute, the 2fc RoI feature, and the training-only R-CNN feature
    mimicking branch (``mimic``, None unless the preset or the builder turns it on)."""

    preset: DetectorPreset
    has_masks = False

    @property
    def num_classes(self) -> int:
        return num_classes_of(self)

    def forward(self, images, targets=None):
        if targets is not None or self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode (a list of dicts with boxes and labels)")
            validate_targets(images, targets, self.num_classes, masks=self.has_masks)
        if self.training and getattr(self, "mimic", None) is not None:
            return self._forward_with_mimicking(images, targets)
        return super().forward(images, targets)

    def _forward_with_mimicking(self, images, targets) -> Dict[str, Tensor]:
        """torchvision's training forward (transform, backbone, RPN, RoI heads) plus the mimicking losses on
        the RoIs the heads sampled."""
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(images, features, targets)
        self.roi_heads.last_training_samples = None
        _, detector_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        sampled = self.roi_heads.last_training_samples
        self.roi_heads.last_training_samples = None
        if sampled is None:
            raise RuntimeError("the RoI heads did not record their training samples (roi_heads must be a "
                               "MimicRoIHeads for feature mimicking)")
        mimic_losses = self.mimic(self, images.tensors, images.image_sizes, features, *sampled,
                                  rpn_proposals=proposals, targets=targets)
        return {**detector_losses, **proposal_losses, **mimic_losses}

    def inference_state_dict(self) -> Dict[str, Tensor]:
        """``state_dict()`` without training-only parts: what the base preset's detector loads."""
        return inference_state_dict(self.state_dict())

    def rcnn_features(self, features: Dict[str, Tensor], boxes: List[Tensor],
                      image_shapes: List[Tuple[int, int]]) -> Tensor:
        """The 1024-d 2fc feature of ``boxes``: box RoI pooling then ``roi_heads.box_head``.

        Args:
            features: the backbone's output for the (transformed) image batch.
            boxes: N Tensor[L, 4] boxes in the transformed images' coordinates.
            image_shapes: N (height, width) of the transformed images (``ImageList.image_sizes``).

        Returns:
            Tensor[sum L, representation size].
        """
        pooled = self.roi_heads.box_roi_pool(features, boxes, image_shapes)
        return self.roi_heads.box_head(pooled)


class DCNFasterRCNN(_DetectorMixin, _TVFasterRCNN):
    """torchvision ``FasterRCNN`` that validates its targets and exposes :meth:`rcnn_features`."""


class DCNMaskRCNN(_DetectorMixin, _TVMaskRCNN):
    """torchvision ``MaskRCNN`` that validates its targets (masks included) and exposes :meth:`rcnn_features`."""

    has_masks = True


def _backbone_resnet(name: str, preset: DetectorPreset, conv5_dilation: bool, weights_backbone,
                     trainable_backbone_layers: Optional[int], frozen_bn: Optional[bool], stride_in_1x1: bool):
    # a trunk with frozen BatchNorm is a trained one (a converted COCO detector): torchvision's freezing rule
    is_trained = weights_backbone is not None or bool(frozen_bn)
    trainable = _validate_trainable_layers(is_trained, trainable_backbone_layers, 5, 3)
    if frozen_bn is None:
        frozen_bn = is_trained
    if not isinstance(frozen_bn, bool) or not isinstance(stride_in_1x1, bool):
        raise TypeError(f"frozen_bn and stride_in_1x1 must be bools, got {frozen_bn!r} and {stride_in_1x1!r}")
    norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    resnet = dcn_resnet(name, deform_stages=preset.deform_stages, modulated=preset.modulated,
                        offset_groups=preset.offset_groups, conv5_dilation=conv5_dilation, weights=weights_backbone,
                        norm_layer=norm_layer, stride_in_1x1=stride_in_1x1)
    return resnet, trainable


def _freeze(resnet: nn.Module, trainable_layers: int) -> None:
    """torchvision's rule (train the last ``trainable_layers`` of conv1, layer1..layer4), except that offset
    branches, which pretrained weights never initialise, always train."""
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, p in resnet.named_parameters():
        if not any(name.startswith(layer) for layer in layers_to_train):
            p.requires_grad_(False)
    _unfreeze_offsets(resnet)


def _unfreeze_offsets(module: nn.Module) -> None:
    for p in offset_parameters(module):
        p.requires_grad_(True)


def _check_anchor_sizes(sizes, fpn: bool) -> Tuple[int, ...]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
        raise ValueError(f"anchor_sizes must be a non-empty sequence of positive sizes in pixels, got {sizes!r}")
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a > 0
               for a in sizes):
        raise ValueError(f"anchor_sizes must be positive finite numbers (pixels), got {list(sizes)!r}")
    if fpn and len(sizes) != 5:
        raise ValueError(f"an FPN detector needs one anchor size per level P2..P6 (5), got {len(sizes)}: "
                         f"{list(sizes)!r}")
    return tuple(sizes)


def _build(cls, *, preset, backbone, num_classes, fpn, weights_backbone, trainable_backbone_layers,
           feature_channels: int, representation_size: int, mdpool_hidden: Optional[int],
           anchor_sizes: Optional[Sequence[float]], roi_canonical_scale: int, mimic, frozen_bn: Optional[bool],
           stride_in_1x1: bool, roi_sampling_ratio: int, roi_aligned: bool, roi_pool_layout: str,
           anchor_rounding: bool, kwargs: Dict[str, Any]):
    preset = get_preset(preset)
    mimic_config = MimicConfig.resolve(preset.mimic, mimic)
    if anchor_sizes is not None:
        anchor_sizes = _check_anchor_sizes(anchor_sizes, fpn)
        if "rpn_anchor_generator" in kwargs:
            raise ValueError("give anchor_sizes or rpn_anchor_generator, not both")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
    for name, value in (("feature_channels", feature_channels), ("representation_size", representation_size),
                        ("roi_canonical_scale", roi_canonical_scale),
                        ("mdpool_hidden", 1 if mdpool_hidden is None else mdpool_hidden)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(roi_sampling_ratio, int) or isinstance(roi_sampling_ratio, bool):
        raise TypeError(f"roi_sampling_ratio must be an int (<= 0: adaptive), got {roi_sampling_ratio!r}")
    if not isinstance(anchor_rounding, bool):
        raise TypeError(f"anchor_rounding must be a bool, got {anchor_rounding!r}")
    masks = cls is DCNMaskRCNN
    resnet, trainable = _backbone_resnet(backbone, preset, not fpn, weights_backbone, trainable_backbone_layers,
                                         frozen_bn, stride_in_1x1)
    kw = dict(kwargs)
    if fpn:
        _freeze(resnet, trainable)  # torchvision's rule
        c2 = _stage_channels(resnet.layer1)
        body = BackboneWithFPN(resnet, {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
                               [c2, 2 * c2, 4 * c2, 8 * c2], feature_channels, extra_blocks=LastLevelMaxPool())
        names = ["0", "1", "2", "3"]
        rpn_in = None
        if anchor_sizes is not None or not anchor_rounding:  # one size per level P2..P6, three aspect ratios each
            sizes = anchor_sizes or PAPER_ANCHOR_SIZES
            kw.setdefault("rpn_anchor_generator", anchor_generator(tuple((a,) for a in sizes),
                                                                   ((0.5, 1.0, 2.0),) * len(sizes),
                                                                   rounding=anchor_rounding))
    else:
        _freeze(resnet, trainable)
        body = PaperBackbone(resnet, feature_channels)
        names = ["c5"]
        rpn_in = ["c4"]
        kw.setdefault("rpn_anchor_generator",
                      anchor_generator((tuple(anchor_sizes or PAPER_ANCHOR_SIZES),), (PAPER_ASPECT_RATIOS,),
                                       rounding=anchor_rounding))
        kw.setdefault("rpn_head", RPNHead(body.c4_channels, kw["rpn_anchor_generator"].num_anchors_per_location()[0]))
    c = body.out_channels
    pool_kw = dict(gamma=preset.gamma, hidden_channels=mdpool_hidden or preset.mdpool_hidden,
                   canonical_scale=roi_canonical_scale, sampling_ratio=roi_sampling_ratio, aligned=roi_aligned,
                   layout=roi_pool_layout)
    # torchvision only admits MultiScaleRoIAlign here: build with its default, then put ours in place
    box_pool = kw.pop("box_roi_pool", None) or make_roi_pool(preset.box_pool, names, 7, c, **pool_kw)
    mask_pool = kw.pop("mask_roi_pool", None) or make_roi_pool(preset.mask_pool, names, 14, c, **pool_kw)
    if "box_head" not in kw:
        out = box_pool.output_size
        out = out[0] if isinstance(out, (tuple, list)) else out
        kw["box_head"] = TwoMLPHead(c * out ** 2, representation_size)
    own_predictor = "box_predictor" in kw
    model = cls(body, num_classes=None if own_predictor else num_classes, **kw)
    if not own_predictor:  # torchvision sizes its default predictor for a 1024-wide box head
        model.roi_heads.box_predictor = FastRCNNPredictor(representation_size, num_classes)
    model.roi_heads.box_roi_pool = box_pool
    if masks:
        model.roi_heads.mask_roi_pool = mask_pool
    if rpn_in is not None:
        model.rpn = FeatureSelectingRPN.from_rpn(model.rpn, rpn_in)
    if mimic_config.enabled:
        if mimic_config.level is not None and mimic_config.level not in names:
            raise ValueError(f"mimic level {mimic_config.level!r} is not a pooled feature map; choose one of {names}")
        model.roi_heads = MimicRoIHeads.from_roi_heads(model.roi_heads)
        model.mimic = FeatureMimicking(representation_size, num_classes, mimic_config)
    model.preset = preset
    model.backbone_name = backbone
    return model


_DOC_ARGS = """
    Args:
        preset: a name of :data:`dcnv2.models.presets.PRESETS` or a :class:`DetectorPreset`.
        backbone: one of :data:`dcnv2.models.resnet.BACKBONES` (resnet18/34/50/101/152, resnext50_32x4d,
            resnext101_32x8d).
        num_classes: classes including the background (81 for COCO).
        fpn: torchvision's ResNet-FPN detector instead of the paper's dilated-conv5 detector.
        weights_backbone: torchvision weights enum / name (downloaded) or the path of a local ResNet state
            dict. With weights, BatchNorm is frozen and only the last ``trainable_backbone_layers`` (default
            3) train, as in torchvision; offset convs always train. Without, everything trains with BatchNorm.
        trainable_backbone_layers: 0..5, see above.
        feature_channels: channels of the FPN levels / of the paper's 1x1 conv on conv5 (256 in the paper);
            the RPN and RoI heads work on them.
        representation_size: width of the box head's two fc layers (1024 in the paper).
        mdpool_hidden: width of the modulated RoI pooling offset branch's fc layers (default: the preset's,
            1024 as in the paper). The last three are for small models on small images (the demo's CPU
            recipe); the defaults are the paper's detector.
        anchor_sizes: RPN anchor sizes in pixels, aspect ratios 0.5/1/2: with FPN one per level P2..P6
            (torchvision's default 32, 64, 128, 256, 512), without FPN all on conv4 (the paper's 5 scales,
            32..512). Small images with small objects want smaller anchors (the demo uses 8..128).
        roi_canonical_scale: FPN RoI level mapping: a box of this size (sqrt of area, pixels) is pooled
            from P4, half of it from P3 ... (``MultiScaleRoIAlign``'s 224 for ~800 px images; the demo's
            128 px images use 56).
        mimic: R-CNN feature mimicking settings laid over the preset's (a
            :class:`dcnv2.models.mimic.MimicConfig` or a dict of its fields, e.g. ``{"patch_size": 64,
            "rois_per_image": 8}``; ``{"regions": "fg"}`` turns it on for any preset). Training only: the
            branch is ``model.mimic``, dropped by ``strip_mimicking`` / ``model.inference_state_dict()``.
        frozen_bn: FrozenBatchNorm2d in the backbone (default: only with ``weights_backbone``); what
            torchvision's, mmdetection's and detectron2's COCO detectors use.
        stride_in_1x1: downsample in each stage's first 1x1 conv (detectron2's MSRA ResNets), not the 3x3.
        roi_sampling_ratio: RoIAlign / deformable RoI pooling samples per bin and axis (2, torchvision's;
            <= 0 adaptive, mmdetection's and detectron2's 0).
        roi_aligned: the half-pixel box model (True: ours, mmdetection's, detectron2's ROIAlignV2; False:
            torchvision's ``MultiScaleRoIAlign``).
        roi_pool_layout: ``"shared"`` (one offset branch over all FPN levels) or ``"mmdet"`` (mmcv's
            ``(Modulated)DeformRoIPoolPack``, one per level), see :func:`dcnv2.models.poolers.make_roi_pool`.
        anchor_rounding: torchvision's rounded base anchors (True) or mmdetection's / detectron2's exact
            ones (:mod:`dcnv2.models.anchors`).
        **kwargs: passed to torchvision's detector (min_size, max_size, rpn_*, box_*, ...); a given
            ``rpn_anchor_generator``, ``rpn_head``, ``box_roi_pool``, ``box_head``, ``mask_roi_pool`` ...
            replaces the preset's.
"""


def faster_rcnn(*, preset: Union[str, DetectorPreset] = "regular", backbone: str = "resnet50",
                num_classes: int = 81, fpn: bool = False, weights_backbone=None,
                trainable_backbone_layers: Optional[int] = None, feature_channels: int = 256,
                representation_size: int = 1024, mdpool_hidden: Optional[int] = None,
                anchor_sizes: Optional[Sequence[float]] = None, roi_canonical_scale: int = 224,
                mimic=None, frozen_bn: Optional[bool] = None, stride_in_1x1: bool = False,
                roi_sampling_ratio: int = 2, roi_aligned: bool = True, roi_pool_layout: str = "shared",
                anchor_rounding: bool = True, **kwargs) -> DCNFasterRCNN:
    return _build(DCNFasterRCNN, preset=preset, backbone=backbone, num_classes=num_classes, fpn=fpn,
                  weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers,
                  feature_channels=feature_channels, representation_size=representation_size,
                  mdpool_hidden=mdpool_hidden, anchor_sizes=anchor_sizes,
                  roi_canonical_scale=roi_canonical_scale, mimic=mimic, frozen_bn=frozen_bn,
                  stride_in_1x1=stride_in_1x1, roi_sampling_ratio=roi_sampling_ratio, roi_aligned=roi_aligned,
                  roi_pool_layout=roi_pool_layout, anchor_rounding=anchor_rounding, kwargs=kwargs)


def mask_rcnn(*, preset: Union[str, DetectorPreset] = "regular", backbone: str = "resnet50",
              num_classes: int = 81, fpn: bool = True, weights_backbone=None,
              trainable_backbone_layers: Optional[int] = None, feature_channels: int = 256,
              representation_size: int = 1024, mdpool_hidden: Optional[int] = None,
              anchor_sizes: Optional[Sequence[float]] = None, roi_canonical_scale: int = 224,
              mimic=None, frozen_bn: Optional[bool] = None, stride_in_1x1: bool = False,
              roi_sampling_ratio: int = 2, roi_aligned: bool = True, roi_pool_layout: str = "shared",
              anchor_rounding: bool = True, **kwargs) -> DCNMaskRCNN:
    return _build(DCNMaskRCNN, preset=preset, backbone=backbone, num_classes=num_classes, fpn=fpn,
                  weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers,
                  feature_channels=feature_channels, representation_size=representation_size,
                  mdpool_hidden=mdpool_hidden, anchor_sizes=anchor_sizes,
                  roi_canonical_scale=roi_canonical_scale, mimic=mimic, frozen_bn=frozen_bn,
                  stride_in_1x1=stride_in_1x1, roi_sampling_ratio=roi_sampling_ratio, roi_aligned=roi_aligned,
                  roi_pool_layout=roi_pool_layout, anchor_rounding=anchor_rounding, kwargs=kwargs)


faster_rcnn.__doc__ = ("Faster R-CNN: the paper's (``fpn=False``) or ResNet-FPN, with a preset's deformable "
                       "convs and box RoI pooling.\n" + _DOC_ARGS)
mask_rcnn.__doc__ = ("Mask R-CNN: ResNet-FPN (``fpn=True``, default) or on the paper's dilated-conv5 trunk, with "
                     "a preset's deformable convs and box (7x7) and mask (14x14) RoI pooling.\n" + _DOC_ARGS)
