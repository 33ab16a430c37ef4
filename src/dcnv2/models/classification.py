"""Image classifiers on the DCN ResNets: the paper's Table 6 (ImageNet pre-training of DCN backbones).

:func:`classifier` builds a torchvision ResNet/ResNeXt whose 3x3 convs are deformable in the preset's stages
and whose ``fc`` has ``num_classes`` outputs, wrapped in :class:`DCNClassifier`:

=========  ============================================  ===========================
preset     Table 6 row                                   deformable 3x3 convs
=========  ============================================  ===========================
regular    ResNet-50 / ResNeXt (no deformation)          none
dcnv1      DCNv1 (dconv@c5)                              DCNv1 in conv5
dcnv2      DCNv2 (mdconv@c3~c5)                          modulated DCNv2 in conv3-conv5
=========  ============================================  ===========================

The wrapped ResNet is ``model.backbone``, so the state dict's keys are ``backbone.<torchvision key>``
(offset/mask convs included: ``backbone.layer4.0.conv2.conv_offset.weight``): a classification checkpoint
initialises a detector's trunk key for key (:mod:`dcnv2.models.transfer`).

The forward follows torchvision's detectors so that the detection engine (:func:`dcnv2.engine.train.train`)
trains it unchanged: in training with targets it returns ``{"loss_cls": cross entropy}``, otherwise logits.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcnv2.models.resnet import BACKBONES, dcn_resnet, parse_stages

__all__ = ["CLASSIFIER_PRESETS", "DCNClassifier", "classifier"]

# preset -> (deformable stages, modulated)
CLASSIFIER_PRESETS: Dict[str, Tuple[Tuple[str, ...], bool]] = {
    "regular": ((), False),
    "dcnv1": (("c5",), False),
    "dcnv2": (("c3", "c4", "c5"), True),
}

Targets = Union[Tensor, Sequence[Mapping[str, Tensor]]]


class DCNClassifier(nn.Module):
    """A (DCN) ResNet classifier.

    Attributes:
        backbone: the torchvision ``ResNet`` (``conv1`` .. ``layer4``, ``fc`` with ``num_classes`` outputs).
        preset: the preset's name (``"regular"``, ``"dcnv1"``, ``"dcnv2"``).
        stages: the stages whose 3x3 convs are deformable, e.g. ``("c3", "c4", "c5")``.
        modulated: DCNv2 modulated layers (True) or DCNv1 (False); False when ``stages`` is empty.
        num_classes: outputs of ``fc``.
        label_smoothing: of the training cross entropy (0.1 in the standard recipe).
    """

    def __init__(self, backbone: nn.Module, *, preset: str, stages: Sequence[str], modulated: bool,
                 label_smoothing: float = 0.1):
        super().__init__()
        if not (0.0 <= label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.backbone = backbone
        self.preset = preset
        self.stages = tuple(stages)
        self.modulated = bool(modulated) and bool(self.stages)
        self.num_classes = int(backbone.fc.out_features)
        self.label_smoothing = float(label_smoothing)

    def _batch(self, images: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images: expected a non-empty list of [3, H, W] tensors, got an empty list")
            shapes = {tuple(im.shape) for im in images}
            if len(shapes) != 1:
                raise ValueError(f"images: a list must hold equal-size tensors, got shapes {sorted(shapes)}")
            images = torch.stack(list(images))
        if not torch.is_tensor(images):
            raise TypeError(f"images must be a Tensor [B, 3, H, W] or a list of [3, H, W], got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {list(images.shape)}")
        return images

    def _labels(self, targets: Targets, batch: int, device: torch.device) -> Tensor:
        if torch.is_tensor(targets):
            labels = targets
        else:
            try:
                labels = torch.cat([torch.as_tensor(t["labels"]).reshape(-1) for t in targets])
            except (KeyError, TypeError) as exc:
                raise TypeError("targets must be a LongTensor [B] or a list of dicts with 'labels'") from exc
        labels = labels.reshape(-1).to(device=device)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.numel() != batch:
            raise ValueError(f"targets: expected {batch} integer labels, got {labels.numel()} of dtype {labels.dtype}")
        labels = labels.long()
        if labels.numel() and not bool(((labels >= 0) & (labels < self.num_classes)).all()):
            raise ValueError(f"targets: labels must be in [0, {self.num_classes}), got "
                             f"min {int(labels.min())}, max {int(labels.max())}")
        return labels

    def forward(self, images: Union[Tensor, Sequence[Tensor]],
                targets: Optional[Targets] = None) -> Union[Tensor, Dict[str, Tensor]]:
        """Classifies a batch.

        Args:
            images: Tensor [B, 3, H, W] or a list of B equal-size tensors [3, H, W] (normalised images).
            targets: in training, a LongTensor [B] of labels in [0, num_classes) or a list of B dicts
                with ``"labels"`` (one label each).

        Returns:
            ``{"loss_cls": Tensor []}`` in training mode with targets, otherwise logits [B, num_classes].
        """
        x = self._batch(images)
        logits = self.backbone(x)
        if self.training and targets is not None:
            labels = self._labels(targets, x.shape[0], logits.device)
            return {"loss_cls": F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)}
        return logits

    def deformable_layers(self) -> List[str]:
        """Names of the deformable convs (those with an offset branch), in module order."""
        return [name for name, m in self.backbone.named_modules() if callable(getattr(m, "offset_branch", None))]

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, stages={self.stages}, modulated={self.modulated}, num_classes={self.num_classes}"


def classifier(preset: str = "regular", backbone: str = "resnet50", num_classes: int = 1000, *,
               deform_stages: Optional[Sequence[Union[str, int]]] = None, modulated: Optional[bool] = None,
               offset_groups: int = 1, weights=None, label_smoothing: float = 0.1,
               norm_layer=None) -> DCNClassifier:
    """A ResNet/ResNeXt classifier with the deformable layers of ``preset``.

    Args:
        preset: ``"regular"``, ``"dcnv1"`` (DCNv1 in conv5, Table 6) or ``"dcnv2"`` (modulated c3-c5).
        backbone: any of :data:`dcnv2.models.resnet.BACKBONES` (resnet18 ... resnext101_32x8d).
        num_classes: outputs of the final fc layer.
        deform_stages, modulated: override the preset's stages / layer type (e.g. an ablation ``("c5",)``).
        offset_groups: offset groups of every deformable layer.
        weights: initial weights of the ResNet: a torchvision weights name/enum (downloads) or a local state
            dict of a regular or DCN ResNet (offset convs missing from it stay zero). An ``fc`` of another
            size than ``num_classes`` is replaced by a freshly initialised one.
        label_smoothing: of the training loss.
        norm_layer: e.g. FrozenBatchNorm2d; default BatchNorm2d.

    Returns:
        A :class:`DCNClassifier` (in training mode, on CPU).
    """
    if preset not in CLASSIFIER_PRESETS:
        raise ValueError(f"unknown classifier preset {preset!r}; choose one of {list(CLASSIFIER_PRESETS)}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    stages, mod = CLASSIFIER_PRESETS[preset]
    if deform_stages is not None:
        stages = parse_stages(deform_stages)
    if modulated is not None:
        mod = bool(modulated)
    net = dcn_resnet(backbone, deform_stages=stages, modulated=mod, offset_groups=offset_groups, weights=weights,
                     norm_layer=norm_layer)
    if net.fc.out_features != num_classes:
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    return DCNClassifier(net, preset=preset, stages=stages, modulated=mod, label_smoothing=label_smoothing)
