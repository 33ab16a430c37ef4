"""Semantic segmentation on a DCN ResNet trunk: torchvision's DeepLabV3 / FCN head (the paper's Table 7).

:func:`segmenter` builds a ResNet/ResNeXt whose last stages are dilated as torchvision's segmentation models
do (output stride 8: conv4 and conv5 dilated; 16: conv5 only), whose 3x3 convs are deformable in the
preset's stages, and puts torchvision's ``DeepLabHead`` (ASPP) or ``FCNHead`` on conv5. The trunk is
``model.backbone`` (an ``IntermediateLayerGetter`` with torchvision's names ``conv1`` .. ``layer4``), so a
classification checkpoint loads into it with :func:`dcnv2.models.transfer.load_backbone_checkpoint`.

The forward follows torchvision's detectors, so the detection engine (:func:`dcnv2.engine.train.train`)
trains it unchanged: the model normalises, resizes (shorter side ``min_size``, longer side at most
``max_size``) and pads the batch itself; in training it takes one target dict per image with
``"semantic"`` (int64 [H, W], class per pixel, 255 = ignore) and returns ``{"loss_seg": cross entropy}``;
otherwise it returns logits upsampled to each input image's size.
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from dcnv2.models.presets import DetectorPreset, get_preset
from dcnv2.models.resnet import BACKBONES, convert_to_deformable, dcn_resnet
from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d

__all__ = ["DCNSegmenter", "SegmentationTransform", "segmenter", "HEADS", "IGNORE_INDEX"]

HEADS = ("deeplabv3", "fcn")
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentationTransform(nn.Module):
    """Normalise, resize and pad a list of images (and their label maps) into one batch.

    ``min_size`` is a tuple like torchvision's ``GeneralizedRCNNTransform.min_size``: in training one of its
    sizes is drawn per batch (multi-scale training), in evaluation the last one is used.
    """

    def __init__(self, min_size: Union[int, Sequence[int]], max_size: int,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ValueError(f"min_size must be a positive int or a sequence of them, got {min_size!r}")
        if not (isinstance(max_size, int) and not isinstance(max_size, bool) and max_size > 0):
            raise ValueError(f"max_size must be a positive int, got {max_size!r}")
        self.min_size, self.max_size = sizes, max_size
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def _size(self, h: int, w: int, size: int) -> Tuple[int, int]:
        scale = size / min(h, w)
        if max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        return max(1, int(round(h * scale))), max(1, int(round(w * scale)))

    def forward(self, images: List[Tensor], labels: Optional[List[Tensor]] = None
                ) -> Tuple[Tensor, Optional[Tensor], List[Tuple[int, int]]]:
        """Returns the padded batch [N, 3, Hp, Wp], the padded label maps [N, Hp, Wp] (padding 255) or None,
        and each image's size inside the batch."""
        mean = torch.tensor(self.image_mean, dtype=images[0].dtype, device=images[0].device)[:, None, None]
        std = torch.tensor(self.image_std, dtype=images[0].dtype, device=images[0].device)[:, None, None]
        resized, maps, sizes = [], [], []
        size = random.choice(self.min_size) if self.training else self.min_size[-1]  # one per batch
        for i, im in enumerate(images):
            h, w = self._size(*im.shape[-2:], size)
            x = (im - mean) / std
            if (h, w) != tuple(im.shape[-2:]):
                x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            resized.append(x)
            sizes.append((h, w))
            if labels is not None:
                m = labels[i]
                if (h, w) != tuple(m.shape):
                    m = F.interpolate(m[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0].long()
                maps.append(m)
        hp, wp = max(s[0] for s in sizes), max(s[1] for s in sizes)
        batch = resized[0].new_zeros((len(images), 3, hp, wp))
        for i, x in enumerate(resized):
            batch[i, :, : x.shape[1], : x.shape[2]] = x
        target = None
        if labels is not None:
            target = torch.full((len(images), hp, wp), IGNORE_INDEX, dtype=torch.int64, device=batch.device)
            for i, m in enumerate(maps):
                target[i, : m.shape[0], : m.shape[1]] = m
        return batch, target, sizes

    def extra_repr(self) -> str:
        return f"min_size={self.min_size}, max_size={self.max_size}"


class DCNSegmenter(nn.Module):
    """A DCN ResNet trunk + torchvision's DeepLabV3 / FCN head (+ optional FCN auxiliary head on conv4).

    Attributes:
        backbone: ``IntermediateLayerGetter`` over the ResNet (``conv1`` .. ``layer4``), returning
            ``{"out": conv5}`` (and ``"aux": conv4`` with the auxiliary head).
        classifier: the head (conv5 features -> ``num_classes`` logits).
        aux_classifier: FCNHead on conv4 or None; its loss ``loss_aux`` is weighted ``aux_weight``.
        transform: :class:`SegmentationTransform` (normalisation, resizing, padding).
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, transform: SegmentationTransform, *,
                 num_classes: int, aux_classifier: Optional[nn.Module] = None, aux_weight: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.transform = transform
        self.num_classes = num_classes
        self.aux_weight = float(aux_weight)

    def _images(self, images) -> List[Tensor]:
        if torch.is_tensor(images):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be a Tensor [N, 3, H, W] or a list of [3, H, W], got shape "
                                 f"{list(images.shape)}")
            return list(images.unbind(0))
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError(f"images must be a Tensor [N, 3, H, W] or a non-empty list of [3, H, W] tensors, got "
                            f"{type(images).__name__}{' (empty)' if isinstance(images, (list, tuple)) else ''}")
        for i, im in enumerate(images):
            if not torch.is_tensor(im) or im.dim() != 3 or im.shape[0] != 3 or not im.is_floating_point():
                what = f"shape {list(im.shape)}, {im.dtype}" if torch.is_tensor(im) else type(im).__name__
                raise ValueError(f"images[{i}] must be a float Tensor [3, H, W], got {what}")
        return list(images)

    def _labels(self, images: List[Tensor], targets) -> List[Tensor]:
        if targets is None or len(targets) != len(images):
            n = None if targets is None else len(targets)
            raise ValueError(f"targets: training needs one dict with 'semantic' per image ({len(images)}), got {n}")
        out = []
        for i, (im, t) in enumerate(zip(images, targets)):
            m = t.get("semantic") if isinstance(t, dict) else None
            if not torch.is_tensor(m):
                raise ValueError(f"targets[{i}] needs 'semantic': an int64 Tensor [H, W] of class ids "
                                 f"(255 = ignore), got {type(m).__name__}")
            if m.dtype.is_floating_point or m.dtype == torch.bool or tuple(m.shape) != tuple(im.shape[-2:]):
                raise ValueError(f"targets[{i}]['semantic'] must be an integer Tensor of the image's size "
                                 f"{list(im.shape[-2:])}, got {list(m.shape)} {m.dtype}")
            m = m.long()
            bad = (m != IGNORE_INDEX) & ((m < 0) | (m >= self.num_classes))
            if bool(bad.any()):
                raise ValueError(f"targets[{i}]['semantic'] has class ids outside [0, {self.num_classes}) "
                                 f"(and not {IGNORE_INDEX}): {sorted(set(m[bad].tolist()))[:5]}")
            out.append(m)
        return out

    def forward(self, images: Union[Tensor, Sequence[Tensor]], targets: Optional[Sequence[Dict[str, Tensor]]] = None):
        """Segments a batch.

        Args:
            images: Tensor [N, 3, H, W] or a list of N float tensors [3, H_i, W_i] in [0, 1] (not normalised).
            targets: training only: N dicts with ``"semantic"`` int64 [H_i, W_i] (0 background, 255 ignore).

        Returns:
            training: ``{"loss_seg": Tensor []}`` (+ ``"loss_aux"`` with the auxiliary head); otherwise logits
            upsampled to each input's size: Tensor [N, num_classes, H, W] for a tensor input, a list of
            [num_classes, H_i, W_i] for a list.
        """
        tensor_input = torch.is_tensor(images)
        ims = self._images(images)
        labels = self._labels(ims, targets) if self.training else None
        batch, target, sizes = self.transform(ims, labels)
        feats = self.backbone(batch)
        logits = F.interpolate(self.classifier(feats["out"]), size=batch.shape[-2:], mode="bilinear",
                               align_corners=False)
        if self.training:
            losses = {"loss_seg": _cross_entropy(logits, target)}
            if self.aux_classifier is not None:
                aux = F.interpolate(self.aux_classifier(feats["aux"]), size=batch.shape[-2:], mode="bilinear",
                                    align_corners=False)
                losses["loss_aux"] = self.aux_weight * _cross_entropy(aux, target)
            return losses
        out = [F.interpolate(logits[i:i + 1, :, :h, :w], size=tuple(im.shape[-2:]), mode="bilinear",
                             align_corners=False)[0] for i, ((h, w), im) in enumerate(zip(sizes, ims))]
        return torch.stack(out) if tensor_input else out


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    if not bool((target != IGNORE_INDEX).any()):  # every pixel ignored: zero loss (CE's mean would be NaN)
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)


def _dilate_stage(layer: nn.Sequential, first: int, rest: int) -> None:
    """torchvision's ``replace_stride_with_dilation`` for one stage (any block type), in place: stride 1, the
    first block's 3x3 convs at dilation ``first``, the others at ``rest`` (padding = dilation)."""
    for i, block in enumerate(layer):
        d = first if i == 0 else rest
        for conv in block.children():
            if isinstance(conv, (nn.Conv2d, DeformConv2d, ModulatedDeformConv2d)) and tuple(conv.kernel_size) == (3, 3):
                conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            for m in block.downsample.modules():
                if isinstance(m, nn.Conv2d):
                    m.stride = (1, 1)


def _stage_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def segmenter(*, preset: Union[str, DetectorPreset] = "regular", backbone: str = "resnet50", num_classes: int = 21,
              head: str = "deeplabv3", output_stride: int = 8, aux_loss: bool = False, aux_weight: float = 0.5,
              atrous_rates: Sequence[int] = (12, 24, 36), min_size: Union[int, Sequence[int]] = 520,
              max_size: int = 1024, weights_backbone=None, norm_layer=None) -> DCNSegmenter:
    """A semantic segmenter: DCN ResNet trunk + torchvision's DeepLabV3 (ASPP) or FCN head.

    Args:
        preset: any name of :data:`dcnv2.models.presets.PRESETS` (or a DetectorPreset); only its deformable
            stages, modulation and offset groups matter: ``regular``, ``dcnv1`` (DCNv1 conv5, as the
            classifier's), ``dcnv2`` / ``mdconv-c3c5-mdpool`` (modulated c3-c5), ``dconv-c3c5`` ...
        backbone: one of :data:`dcnv2.models.resnet.BACKBONES`.
        num_classes: classes including the background (0).
        head: ``"deeplabv3"`` (torchvision's ``DeepLabHead``) or ``"fcn"`` (``FCNHead``).
        output_stride: 8 (conv4 and conv5 dilated, torchvision's), 16 (conv5 dilated) or 32 (no dilation).
        aux_loss: add torchvision's auxiliary FCN head on conv4 (loss ``loss_aux`` x ``aux_weight``).
        atrous_rates: ASPP rates of the DeepLabV3 head (torchvision's default 12, 24, 36 for ~520 px images;
            small images want smaller ones).
        min_size, max_size: the model's resize (shorter side; a tuple draws one per training batch).
        weights_backbone: torchvision weights name or a local ResNet state dict for the trunk (offset convs
            start at zero); for a dcnv2 classification checkpoint use
            :func:`dcnv2.models.transfer.load_backbone_checkpoint` after building.
        norm_layer: e.g. ``FrozenBatchNorm2d``; default ``nn.BatchNorm2d``.

    Note: the ASPP pooling branch has a BatchNorm over a 1x1 map, so training needs at least 2 images per
    batch (torchvision's restriction).
    """
    p = get_preset(preset)
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
    resnet = dcn_resnet(backbone, weights=weights_backbone, norm_layer=norm_layer)  # regular first: dilate, then
    if output_stride == 8:                                                          # convert (copies geometry)
        _dilate_stage(resnet.layer3, 1, 2)
        _dilate_stage(resnet.layer4, 2, 4)
    elif output_stride == 16:
        _dilate_stage(resnet.layer4, 1, 2)
    convert_to_deformable(resnet, p.deform_stages, modulated=p.modulated, offset_groups=p.offset_groups)
    layers = {"layer4": "out"}
    if aux_loss:
        layers["layer3"] = "aux"
    body = IntermediateLayerGetter(resnet, return_layers=layers)
    c5 = _stage_channels(resnet.layer4)
    cls_head = DeepLabHead(c5, num_classes, tuple(atrous_rates)) if head == "deeplabv3" else FCNHead(c5, num_classes)
    aux = FCNHead(_stage_channels(resnet.layer3), num_classes) if aux_loss else None
    model = DCNSegmenter(body, cls_head, SegmentationTransform(min_size, max_size), num_classes=num_classes,
                         aux_classifier=aux, aux_weight=aux_weight)
    model.preset = p
    model.backbone_name = backbone
    model.head = head
    model.output_stride = output_stride
    return model
