"""The model description stored in every checkpoint, and the builder that turns it back into a model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List

__all__ = ["ModelSpec", "build_model"]


@dataclass
class ModelSpec:
    """What it takes to rebuild a detector from a checkpoint alone (``eval`` and ``predict`` do).

    ``arch`` names a builder in :mod:`dcnv2.models` (``faster_rcnn``, ``mask_rcnn``, ``classifier`` or ``segmenter``); ``kwargs`` are
    passed through to it (and on to torchvision's FasterRCNN/MaskRCNN: rpn_*, box_*, ...).
    ``label_to_category_id`` maps the model's contiguous labels 1..K to the data set's category ids.
    """

    arch: str = "faster_rcnn"
    preset: str = "regular"
    backbone: str = "resnet50"
    fpn: bool = False
    num_classes: int = 81
    class_names: List[str] = field(default_factory=list)
    label_to_category_id: Dict[int, int] = field(default_factory=dict)
    min_size: int = 800
    max_size: int = 1333
    kwargs: Dict[str, Any] = field(default_factory=dict)
    # a preset that is not among dcnv2.models.presets.PRESETS (e.g. a converted mmdetection model's
    # mdconv@c3~c5 with RoIAlign): DetectorPreset fields, ``preset`` then being its name
    preset_fields: Dict[str, Any] = field(default_factory=dict)
    # how the backbone was initialised (dcnv2.models.transfer.TransferReport.to_dict()); a record, never
    # used to rebuild the model
    backbone_init: Dict[str, Any] = field(default_factory=dict)

    @property
    def has_masks(self) -> bool:
        return self.arch == "mask_rcnn"

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        # str keys / plain ints keep the checkpoint weights_only-loadable and JSON-serialisable
        d["label_to_category_id"] = {str(k): int(v) for k, v in self.label_to_category_id.items()}
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        spec = cls(**{k: v for k, v in d.items() if k in names})
        spec.label_to_category_id = {int(k): int(v) for k, v in spec.label_to_category_id.items()}
        spec.class_names = list(spec.class_names)
        return spec

    def class_name(self, label: int) -> str:
        # class_names may or may not include the background entry
        names = self.class_names
        if len(names) == self.num_classes:
            return str(names[label]) if 0 <= label < len(names) else str(label)
        if 1 <= label <= len(names):
            return str(names[label - 1])
        return str(label)


def build_model(spec: ModelSpec, *, inference: bool = False):
    """Builds the (untrained) detector described by ``spec`` with :mod:`dcnv2.models`.

    ``inference=True`` leaves out training-only parts (the R-CNN feature mimicking branch): the model that
    ``model_final.pth`` (:meth:`inference_state_dict`) loads into, for evaluation, prediction and export.
    """
    from dcnv2 import models  # the package's builders; spec.py is imported by dcnv2.models itself

    if spec.arch == "classifier":  # dcnv2.models.classification; fpn/min_size/max_size do not apply
        return models.classifier(preset=spec.preset, backbone=spec.backbone, num_classes=spec.num_classes,
                                 **spec.kwargs)
    if spec.arch == "segmenter":  # dcnv2.models.segmentation; fpn does not apply
        return models.segmenter(preset=spec.preset, backbone=spec.backbone, num_classes=spec.num_classes,
                                min_size=spec.min_size, max_size=spec.max_size, **spec.kwargs)
    builders = {"faster_rcnn": models.faster_rcnn, "mask_rcnn": models.mask_rcnn}
    if spec.arch not in builders:
        raise ValueError(f"ModelSpec.arch must be one of {sorted(builders) + ['classifier', 'segmenter']}, "
                         f"got {spec.arch!r}")
    preset = spec.preset
    if spec.preset_fields:
        from dcnv2.models.presets import DetectorPreset

        preset = DetectorPreset(**{**spec.preset_fields, "name": spec.preset})
    model = builders[spec.arch](preset=preset, backbone=spec.backbone, num_classes=spec.num_classes,
                                fpn=spec.fpn, min_size=spec.min_size, max_size=spec.max_size, **spec.kwargs)
    return models.strip_mimicking(model) if inference else model
