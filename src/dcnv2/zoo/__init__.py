"""Importing the checkpoints people already have: torchvision, mmdetection and detectron2 detectors.

:func:`convert_checkpoint` reads a peer's checkpoint, works out the detector it describes (ResNet depth,
deformable stages, DCNv1 or DCNv2, RoI pooling, masks, classes), maps every weight onto a dcnv2 detector
(each peer key used, each of ours filled, or an error naming the keys) and returns a :class:`Conversion`
whose :meth:`~Conversion.save` writes a dcnv2 checkpoint (weights + ``ModelSpec``) that ``dcnv2 eval``,
``predict``, ``analyze``, ``export`` and ``train --init`` take. ``to_preset`` turns it into a more deformable
preset on the way, keeping its function (:mod:`dcnv2.zoo.deformable`).

This package sits above the engine (it writes the engine's checkpoints) and below the commands.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from dcnv2.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from dcnv2.engine.config import ModelSpec, build_model
from dcnv2.zoo.keymap import ConversionError
from dcnv2.zoo.loading import PeerCheckpoint, read_peer_checkpoint

__all__ = ["SOURCES", "Conversion", "ConversionError", "convert_checkpoint", "convert_state_dict"]

SOURCES = ("torchvision", "mmdet", "detectron2")


@dataclasses.dataclass
class Conversion:
    """A converted detector: its ``ModelSpec``, its state dict, and what the conversion did."""

    spec: ModelSpec
    state_dict: Dict[str, Tensor]
    notes: List[str]
    source: str = ""
    origin: str = ""

    def build(self) -> nn.Module:
        """The converted detector, in eval mode."""
        model = build_model(self.spec, inference=True)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Writes a dcnv2 checkpoint (atomically), loadable by ``dcnv2.engine.load_model``."""
        return save_checkpoint({"format": CHECKPOINT_FORMAT, "model": self.state_dict,
                                "model_spec": self.spec.to_dict(), "iteration": 0,
                                "converted_from": {"source": self.source, "file": self.origin,
                                                   "notes": list(self.notes)}}, path)


def convert_state_dict(checkpoint: PeerCheckpoint, source: str, *, num_classes: Optional[int] = None,
                       min_size: Optional[int] = None, max_size: Optional[int] = None,
                       to_preset: Optional[str] = None, preserve: bool = True,
                       stride_in_1x1: Optional[bool] = None) -> Conversion:
    """:func:`convert_checkpoint` on a checkpoint already read."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    origin = f"{source} checkpoint {checkpoint.path!r}"
    sd, meta = checkpoint.state_dict, checkpoint.meta
    if source == "torchvision":
        from dcnv2.zoo.torchvision_models import convert_torchvision

        fields, mapper, notes = convert_torchvision(sd, meta, origin)
    elif source == "mmdet":
        from dcnv2.zoo.mmdet_models import convert_mmdet

        fields, mapper, notes = convert_mmdet(sd, meta, origin)
    else:
        from dcnv2.zoo.detectron2_models import convert_detectron2

        fields, mapper, notes = convert_detectron2(sd, meta, origin,
                                                   stride_in_1x1=True if stride_in_1x1 is None else stride_in_1x1)
    if stride_in_1x1 is not None and source != "detectron2":
        fields["kwargs"]["stride_in_1x1"] = stride_in_1x1
    spec = ModelSpec(**fields)
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            setattr(spec, name, value)
    with torch.device("meta"):  # the names and shapes to fill: no weights allocated or initialised
        template = build_model(spec, inference=True)
    state = mapper.finish(template)
    if to_preset is not None:
        state, spec, more = _to_preset(template, state, spec, to_preset, preserve)
        notes += more
    if num_classes is not None and num_classes != spec.num_classes:
        state, spec, more = _new_classes(state, spec, num_classes)
        notes += more
    return Conversion(spec, state, notes, source, checkpoint.path)


def convert_checkpoint(path: Union[str, os.PathLike], source: str, **options) -> Conversion:
    """Converts a torchvision / mmdetection / detectron2 detector checkpoint into a dcnv2 detector.

    Args:
        path: the peer's checkpoint (``.pth``; detectron2's ``.pkl`` too).
        source: ``"torchvision"``, ``"mmdet"`` or ``"detectron2"``.
        num_classes: classes including the background; a count other than the checkpoint's gives fresh box
            (and mask) predictors for fine-tuning on another data set.
        min_size, max_size: test image sizes (default 800 / 1333, what all three use for COCO).
        to_preset: a more deformable preset of ours (e.g. ``"mdconv-c3c5-mdpool"``) to convert into.
        preserve: with ``to_preset``: the converted detector computes exactly what the checkpoint's did
            (:mod:`dcnv2.zoo.deformable`); False keeps the paper's initialisation (masks 0.5).
        stride_in_1x1: override where the stride sits (detectron2's ``STRIDE_IN_1X1``, default True).

    Returns:
        a :class:`Conversion`; ``.save(path)`` writes the dcnv2 checkpoint.

    Raises:
        FileNotFoundError, ValueError (:class:`ConversionError`): unreadable file, an architecture dcnv2 does
            not build (named), or weights that do not fit (named).
    """
    return convert_state_dict(read_peer_checkpoint(path), source, **options)


def _to_preset(model, state, spec: ModelSpec, target: str, preserve: bool):
    from dcnv2.models.presets import DetectorPreset, get_preset
    from dcnv2.zoo.deformable import check_more_deformable, to_preset

    source_preset = DetectorPreset(**{**spec.preset_fields, "name": spec.preset}) if spec.preset_fields \
        else get_preset(spec.preset)
    target_preset = get_preset(target)
    if target_preset.mimic != "none":
        target_preset = get_preset(target_preset.base)  # training-only parts are added by `train`, not stored
    check_more_deformable(source_preset, target_preset)
    new_spec = dataclasses.replace(spec, preset=target_preset.name, preset_fields={},
                                   kwargs=dict(spec.kwargs))
    target_model = build_model(new_spec, inference=True)
    out, notes = to_preset(model, state, target_model, preserve=preserve)
    return out, new_spec, [f"preset {spec.preset} -> {target_preset.name}"] + notes


def _new_classes(state, spec: ModelSpec, num_classes: int):
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
    new_spec = dataclasses.replace(spec, num_classes=num_classes, class_names=[], label_to_category_id={})
    fresh = build_model(new_spec, inference=True).state_dict()
    heads = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
    out = {k: (fresh[k] if k.startswith(heads) else v) for k, v in state.items()}
    return out, new_spec, [f"{spec.num_classes} -> {num_classes} classes: fresh box predictor"
                           f"{' and mask logits' if spec.has_masks else ''} (for fine-tuning)"]
