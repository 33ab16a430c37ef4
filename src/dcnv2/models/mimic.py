"""R-CNN feature mimicking (sec. 3.3, Fig. 3 of the paper): a training-only branch that makes the Fast R-CNN
RoI features resemble those of an R-CNN that sees only the RoI's image patch.

For the RoIs the Fast R-CNN head trains on (``regions``: positives by default, up to ``rois_per_image`` per
image), the branch crops each RoI's patch from the normalised, resized input batch, resizes it to
``patch_size`` x ``patch_size``, runs the **shared** backbone on the patches, pools each whole patch with the
**shared** box RoI pooling (deformable or not) and feeds the **shared** 2fc box head: ``f_RCNN``. Against the
Fast R-CNN 2fc feature of the same RoIs, ``f_FRCNN``:

* ``loss_mimic = mimic_weight * sum_{b in Ω} (1 - cos(f_RCNN(b), f_FRCNN(b)))`` — the paper's sum over an
  image's Ω, averaged over the images of the batch like the detector's other losses (``reduction="image"``);
  ``reduction="roi"`` averages over the RoIs instead, which makes the weight independent of the RoI count;
* ``loss_rcnn_cls = cls_weight * cross_entropy(rcnn_classifier(f_RCNN), label)`` — an **unshared**
  (C+1)-way classifier.

The branch owns only ``rcnn_classifier``; it lives under the detector's ``mimic`` attribute and is dropped for
inference (:func:`strip_mimicking`, :func:`inference_state_dict`): the deployed detector has exactly the
base preset's parameters, FLOPs and state-dict keys.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import roi_align

__all__ = ["MIMIC_REGIONS", "MIMIC_GRADIENTS", "MIMIC_ROI_SOURCES", "MimicConfig", "FeatureMimicking", "MimicRoIHeads", "crop_patches", "mimic_loss",
           "select_mimic_rois", "strip_mimicking", "inference_state_dict", "TRAINING_ONLY_PREFIX"]

MIMIC_REGIONS = ("fg", "fg+bg", "bg", "none")
MIMIC_GRADIENTS = ("both", "rcnn", "frcnn")
MIMIC_ROI_SOURCES = ("sampled", "proposals")
TRAINING_ONLY_PREFIX = "mimic."


@dataclass(frozen=True)
class MimicConfig:
    """Settings of the feature-mimicking branch (the paper's defaults).

    Attributes:
        regions: which of the head's sampled RoIs are mimicked: ``"fg"`` (positives, the paper's choice),
            ``"fg+bg"``, ``"bg"`` or ``"none"`` (no branch).
        rois_per_image: at most this many RoIs per image, drawn at random from the region set (32).
        patch_size: side of the square patch each RoI is resized to (224: a 14x14 conv5 map at stride 16).
        mimic_weight: weight of the cosine loss (0.1).
        cls_weight: weight of the R-CNN classifier's cross-entropy (0.1).
        level: FPN detectors only: the feature map the whole patch is pooled from (e.g. ``"2"`` for P4);
            None picks it with the box pooling's usual level mapping.
        reduction: ``"image"``: the paper's sum of ``1 - cos`` over an image's RoIs, averaged over the images;
            ``"roi"``: the mean over all mimicked RoIs.
        gradient: where the cosine loss's gradient flows: ``"both"`` (the paper's joint training: into the
            Fast R-CNN feature and the R-CNN branch), ``"rcnn"`` (the R-CNN branch only: the Fast R-CNN 2fc
            feature is a fixed target) or ``"frcnn"`` (the Fast R-CNN feature only: the R-CNN branch's feature
            is a fixed teacher). The classifier's cross-entropy always trains the R-CNN branch.
        roi_source: the RoIs mimicked: ``"sampled"`` (the Fast R-CNN head's sampled RoIs, which torchvision
            draws from the proposals plus the ground-truth boxes) or ``"proposals"`` (the RPN's proposals alone,
            labelled by the head's matcher, as the paper's "positive proposals"; ignored IoUs left out).
        patch_bn: how the shared backbone's BatchNorm treats the patch batch: ``"batch"`` (train mode: the
            patches are normalised with their own statistics, which also move the running statistics the
            detector uses at inference) or ``"running"`` (the patches are normalised with the running
            statistics, which they leave alone: what a frozen-BN trunk, as in the paper's ImageNet-pretrained
            ResNets, does). No effect on FrozenBatchNorm2d trunks.
    """

    regions: str = "fg"
    rois_per_image: int = 32
    patch_size: int = 224
    mimic_weight: float = 0.1
    cls_weight: float = 0.1
    level: Optional[str] = None
    reduction: str = "image"
    gradient: str = "both"
    roi_source: str = "sampled"
    patch_bn: str = "batch"

    def __post_init__(self) -> None:
        if self.patch_bn not in ("batch", "running"):
            raise ValueError(f"MimicConfig.patch_bn must be 'batch' or 'running', got {self.patch_bn!r}")
        if self.reduction not in ("image", "roi"):
            raise ValueError(f"MimicConfig.reduction must be 'image' or 'roi', got {self.reduction!r}")
        if self.gradient not in MIMIC_GRADIENTS:
            raise ValueError(f"MimicConfig.gradient must be one of {MIMIC_GRADIENTS}, got {self.gradient!r}")
        if self.roi_source not in MIMIC_ROI_SOURCES:
            raise ValueError(f"MimicConfig.roi_source must be one of {MIMIC_ROI_SOURCES}, got {self.roi_source!r}")
        if self.regions not in MIMIC_REGIONS:
            raise ValueError(f"MimicConfig.regions must be one of {MIMIC_REGIONS}, got {self.regions!r}")
        for name in ("rois_per_image", "patch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not v >= 1:
                raise ValueError(f"MimicConfig.{name} must be a positive int, got {v!r}")
        for name in ("mimic_weight", "cls_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and v < float("inf")):
                raise ValueError(f"MimicConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.level is not None and not isinstance(self.level, str):
            raise ValueError(f"MimicConfig.level must be a feature map name or None, got {self.level!r}")

    @property
    def enabled(self) -> bool:
        return self.regions != "none"

    def replace(self, **changes) -> "MimicConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def resolve(cls, base: Union[str, "MimicConfig", None],
                override: Union["MimicConfig", Mapping[str, Any], None]) -> "MimicConfig":
        """A preset's regions (``base``) with a builder's ``mimic=`` argument laid over it (a config, or a
        dict of the fields to change, e.g. ``{"patch_size": 64}``)."""
        config = base if isinstance(base, MimicConfig) else cls(regions=base or "none")
        if override is None:
            return config
        if isinstance(override, MimicConfig):
            return override
        if not isinstance(override, Mapping):
            raise TypeError(f"mimic must be a MimicConfig or a dict of its fields, got {type(override).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(override) - names)
        if unknown:
            raise ValueError(f"unknown mimic settings {unknown}; expected some of {sorted(names)}")
        return config.replace(**dict(override))


@torch.no_grad()
def crop_patches(images: Tensor, boxes: Tensor, batch_index: Tensor, patch_size: int) -> Tensor:
    """Crops ``boxes`` out of an image batch and resizes each to ``patch_size`` x ``patch_size``.

    Bilinear sampling at the patch pixels' centres (RoIAlign with ``aligned=True``: a box covering pixels
    x1..x2 exactly, resized to its own size, returns those pixels unchanged); boxes larger than the patch
    average ceil(box / patch) samples per pixel along each axis. Outside the image (beyond the half-pixel
    border) the patch reads 0, which is the mean of a normalised image.

    Args:
        images: Tensor[N, 3, H, W] (the detector's normalised, padded batch).
        boxes: Tensor[K, 4] (x1, y1, x2, y2) in the batch's pixel coordinates.
        batch_index: Tensor[K] image of each box.
        patch_size: side of the output patches.

    Returns:
        Tensor[K, 3, patch_size, patch_size], same dtype as ``images``.
    """
    if boxes.numel() == 0:
        return images.new_zeros((0, images.shape[1], patch_size, patch_size))
    rois = torch.cat([batch_index.to(boxes.dtype)[:, None], boxes], dim=1).to(torch.float32)
    return roi_align(images.float(), rois, (patch_size, patch_size), spatial_scale=1.0, sampling_ratio=0,
                     aligned=True).to(images.dtype)


def mimic_loss(f_rcnn: Tensor, f_frcnn: Tensor, reduction: str = "mean") -> Tensor:
    """``1 - cos(f_rcnn, f_frcnn)`` per RoI (0 for parallel features, 2 for opposite ones), reduced.

    Args:
        f_rcnn, f_frcnn: Tensor[K, D]. With K = 0 the result is a zero connected to both inputs' graphs.
        reduction: ``"mean"`` or ``"sum"`` over the K RoIs.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if f_rcnn.shape != f_frcnn.shape:
        raise ValueError(f"f_rcnn and f_frcnn must have the same shape, got {tuple(f_rcnn.shape)} and "
                         f"{tuple(f_frcnn.shape)}")
    if f_rcnn.shape[0] == 0:
        return (f_rcnn.sum() + f_frcnn.sum()) * 0.0
    cos = F.cosine_similarity(f_rcnn.float(), f_frcnn.float(), dim=1, eps=1e-6)
    return (1.0 - cos).mean() if reduction == "mean" else (1.0 - cos).sum()


def select_mimic_rois(proposals: List[Tensor], labels: List[Tensor], regions: str,
                      rois_per_image: int) -> Tuple[List[Tensor], List[Tensor]]:
    """Per image, up to ``rois_per_image`` of the head's sampled RoIs in ``regions``, drawn at random
    (global torch RNG, like torchvision's samplers, so that a resumed run draws the same).

    Args:
        proposals: N Tensor[L_i, 4], the RoIs the Fast R-CNN head trains on.
        labels: N Tensor[L_i] their labels (0 = background).

    Returns:
        (N Tensor[M_i, 4] boxes, N Tensor[M_i] labels), M_i <= rois_per_image.
    """
    if regions not in MIMIC_REGIONS:
        raise ValueError(f"regions must be one of {MIMIC_REGIONS}, got {regions!r}")
    boxes_out, labels_out = [], []
    for boxes, lab in zip(proposals, labels):
        if regions == "fg":
            keep = torch.where(lab > 0)[0]
        elif regions == "bg":
            keep = torch.where(lab == 0)[0]
        elif regions == "fg+bg":
            keep = torch.arange(lab.numel(), device=lab.device)
        else:
            keep = lab.new_zeros(0, dtype=torch.long)
        if keep.numel() > rois_per_image:
            keep = keep[torch.randperm(keep.numel(), device=keep.device)[:rois_per_image]]
        boxes_out.append(boxes[keep])
        labels_out.append(lab[keep])
    return boxes_out, labels_out


@torch.no_grad()
def label_proposals(heads: RoIHeads, proposals: List[Tensor],
                    targets: List[Dict[str, Tensor]]) -> Tuple[List[Tensor], List[Tensor]]:
    """The RPN's proposals with the Fast R-CNN head's labels (its matcher: IoU >= fg threshold -> the box's
    class, below the bg threshold -> 0), without the ground-truth boxes torchvision's sampler adds; proposals
    between the thresholds are left out.

    Returns:
        (N Tensor[L_i, 4] proposals, N Tensor[L_i] labels).
    """
    gt_boxes = [t["boxes"].to(p.dtype) for t, p in zip(targets, proposals)]
    gt_labels = [t["labels"] for t in targets]
    _, labels = heads.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
    out_boxes, out_labels = [], []
    for boxes, lab in zip(proposals, labels):
        keep = lab >= 0
        out_boxes.append(boxes[keep].detach())
        out_labels.append(lab[keep])
    return out_boxes, out_labels


class MimicRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` that keeps the RoIs (and labels) it sampled for training in
    ``last_training_samples``, for the mimicking branch. Same parameters and behaviour otherwise."""

    last_training_samples: Optional[Tuple[List[Tensor], List[Tensor]]] = None

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads) -> "MimicRoIHeads":
        """The same heads (same modules and settings) as a :class:`MimicRoIHeads`."""
        new = cls(heads.box_roi_pool, heads.box_head, heads.box_predictor,
                  heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
                  heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
                  heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                  mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
                  keypoint_roi_pool=heads.keypoint_roi_pool, keypoint_head=heads.keypoint_head,
                  keypoint_predictor=heads.keypoint_predictor)
        new.proposal_matcher.allow_low_quality_matches = heads.proposal_matcher.allow_low_quality_matches
        return new

    def select_training_samples(self, proposals, targets):
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        self.last_training_samples = (proposals, labels)
        return proposals, matched_idxs, labels, regression_targets


@contextlib.contextmanager
def _batchnorm_running(module: nn.Module, enabled: bool):
    """Temporarily puts ``module``'s BatchNorm layers in eval mode: normalise with the running statistics and
    leave them unchanged (gradients still flow through the affine transform)."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training] \
        if enabled else []
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


@contextlib.contextmanager
def _pool_from(pool: nn.Module, level: Optional[str]):
    """Temporarily restricts a multi-level RoI pooling to one named feature map."""
    if level is None:
        yield
        return
    names = getattr(pool, "featmap_names", None)
    if names is None or level not in names:
        raise ValueError(f"mimic level {level!r} is not one of the box pooling's feature maps {names}")
    scales = getattr(pool, "scales", None)
    pool.featmap_names = [level]
    if scales is not None:  # torchvision's MultiScaleRoIAlign caches its level scales
        pool.scales, pool.map_levels = None, None
    try:
        yield
    finally:
        pool.featmap_names = names
        if scales is not None:
            pool.scales, pool.map_levels = None, None


class FeatureMimicking(nn.Module):
    """The training-only branch: holds the unshared R-CNN classifier and computes both losses.

    Args:
        representation_size: width of the box head's 2fc feature.
        num_classes: classes including the background (the classifier is (C+1)-way).
        config: :class:`MimicConfig`.
    """

    def __init__(self, representation_size: int, num_classes: int, config: MimicConfig) -> None:
        super().__init__()
        if not config.enabled:
            raise ValueError("FeatureMimicking needs regions other than 'none'")
        self.config = config
        self.rcnn_classifier = nn.Linear(representation_size, num_classes)
        nn.init.normal_(self.rcnn_classifier.weight, std=0.01)
        nn.init.zeros_(self.rcnn_classifier.bias)

    def forward(self, detector: nn.Module, images: Tensor, image_sizes: List[Tuple[int, int]],
                features: Dict[str, Tensor], proposals: List[Tensor], labels: List[Tensor],
                rpn_proposals: Optional[List[Tensor]] = None,
                targets: Optional[List[Dict[str, Tensor]]] = None) -> Dict[str, Tensor]:
        """Args:
            detector: the Faster/Mask R-CNN whose backbone, box pooling and box head are shared.
            images: Tensor[N, 3, H, W] the transformed (normalised, resized, padded) batch.
            image_sizes: N (height, width) of the transformed images.
            features: the backbone's output for ``images``.
            proposals, labels: the RoIs the Fast R-CNN head trained on, and their labels.
            rpn_proposals, targets: the RPN's proposals and the (transformed) targets, which
                ``roi_source="proposals"`` needs.

        Returns:
            ``{"loss_mimic", "loss_rcnn_cls"}``, already weighted.
        """
        cfg = self.config
        if cfg.roi_source == "proposals":
            if rpn_proposals is None or targets is None:
                raise ValueError("MimicConfig.roi_source='proposals' needs the RPN proposals and the targets")
            proposals, labels = label_proposals(detector.roi_heads, rpn_proposals, targets)
        boxes, roi_labels = select_mimic_rois(proposals, labels, cfg.regions, cfg.rois_per_image)
        flat_boxes = torch.cat(boxes) if boxes else images.new_zeros((0, 4))
        flat_labels = torch.cat(roi_labels) if roi_labels else images.new_zeros((0,), dtype=torch.long)
        if flat_boxes.shape[0] == 0:  # nothing to mimic: zero losses that still reach the classifier
            logits = self.rcnn_classifier(images.new_zeros((0, self.rcnn_classifier.in_features)))
            zero = logits.sum() * 0.0
            return {"loss_mimic": zero, "loss_rcnn_cls": zero.clone()}
        heads = detector.roi_heads
        f_frcnn = heads.box_head(heads.box_roi_pool(features, boxes, image_sizes))
        batch_index = torch.cat([torch.full((len(b),), i, device=flat_boxes.device) for i, b in enumerate(boxes)])
        p = cfg.patch_size
        patches = crop_patches(images, flat_boxes.detach(), batch_index, p)
        with _batchnorm_running(detector.backbone, cfg.patch_bn == "running"):
            patch_features = detector.backbone(patches)
        if isinstance(patch_features, Tensor):
            patch_features = {"0": patch_features}
        whole = [flat_boxes.new_tensor([[0.0, 0.0, p, p]]) for _ in range(patches.shape[0])]
        with _pool_from(heads.box_roi_pool, cfg.level):
            pooled = heads.box_roi_pool(patch_features, whole, [(p, p)] * patches.shape[0])
        f_rcnn = heads.box_head(pooled)
        loss_cls = F.cross_entropy(self.rcnn_classifier(f_rcnn.to(self.rcnn_classifier.weight.dtype)).float(),
                                   flat_labels)
        if cfg.gradient == "rcnn":  # the Fast R-CNN feature is a fixed target
            f_frcnn = f_frcnn.detach()
        elif cfg.gradient == "frcnn":  # the R-CNN feature is a fixed teacher (its classifier still trains it)
            f_rcnn_target = f_rcnn.detach()
        if cfg.reduction == "image":  # the paper's sum over each image's Ω, averaged over the batch
            loss = mimic_loss(f_rcnn_target if cfg.gradient == "frcnn" else f_rcnn, f_frcnn, "sum") / len(boxes)
        else:
            loss = mimic_loss(f_rcnn_target if cfg.gradient == "frcnn" else f_rcnn, f_frcnn, "mean")
        return {"loss_mimic": cfg.mimic_weight * loss, "loss_rcnn_cls": cfg.cls_weight * loss_cls}

    def extra_repr(self) -> str:
        c = self.config
        return (f"regions={c.regions!r}, rois_per_image={c.rois_per_image}, patch_size={c.patch_size}, "
                f"mimic_weight={c.mimic_weight}, cls_weight={c.cls_weight}, level={c.level!r}, "
                f"reduction={c.reduction!r}, gradient={c.gradient!r}, roi_source={c.roi_source!r}, "
                f"patch_bn={c.patch_bn!r}")


def strip_mimicking(model: nn.Module) -> nn.Module:
    """Removes the training-only mimicking branch in place (the inference model); returns ``model``."""
    if getattr(model, "mimic", None) is not None:
        del model.mimic
    return model


def inference_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """A detector state dict without the training-only mimicking branch (loads into the base preset)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIX)}
