"""Fine-tuning a whole trained detector (``dcnv2 train --init``): a checkpoint of ``dcnv2 train`` or of
``dcnv2 convert`` (a torchvision / mmdetection / detectron2 detector) starts the run.

The model is the checkpoint's (``ModelSpec``: preset, backbone, options), with the new data set's classes.
Every weight is loaded; the box predictor (and the mask logits) are kept only when the classes are the
same (count and names), and start fresh otherwise. Training-only branches (R-CNN feature mimicking) that
the checkpoint lacks keep their initialisation.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

from torch import Tensor, nn

from dcnv2.engine.checkpoint import load_checkpoint
from dcnv2.engine.config import ModelSpec

__all__ = ["read_init_checkpoint", "finetune_spec", "load_init_weights"]

_HEADS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


def read_init_checkpoint(path: Union[str, Path]) -> Tuple[ModelSpec, Dict[str, Tensor]]:
    """(the detector's ModelSpec, its weights). Raises ValueError for a checkpoint without a detector spec."""
    state = load_checkpoint(path)
    if not state.get("model_spec"):
        raise ValueError(f"--init {str(path)!r} has no model_spec: give a checkpoint of `dcnv2 train` "
                         "(model_final.pth) or of `dcnv2 convert`")
    spec = ModelSpec.from_dict(state["model_spec"])
    if spec.arch not in ("faster_rcnn", "mask_rcnn"):
        raise ValueError(f"--init {str(path)!r} holds a {spec.arch}, not a detector")
    return spec, state["model"]


def finetune_spec(init: ModelSpec, *, num_classes: int, class_names: Sequence[str],
                  label_to_category_id: Dict[int, int], min_size: int, max_size: int,
                  model_args: Dict) -> ModelSpec:
    """The checkpoint's spec with the data set's classes, the run's image sizes and extra detector arguments."""
    kwargs = {**init.kwargs, **model_args}
    kwargs.pop("weights_backbone", None)  # the checkpoint holds every weight
    return dataclasses.replace(init, num_classes=num_classes, class_names=list(class_names),
                               label_to_category_id=dict(label_to_category_id), min_size=min_size,
                               max_size=max_size, kwargs=kwargs, backbone_init={})


def load_init_weights(model: nn.Module, weights: Dict[str, Tensor], init: ModelSpec, spec: ModelSpec) -> List[str]:
    """Loads ``weights`` into ``model`` (built from ``spec``); returns what was kept fresh, for the log.

    Raises:
        ValueError: a weight of the checkpoint that the model lacks, or one of another shape (named).
    """
    same_classes = init.num_classes == spec.num_classes and (
        not init.class_names or not spec.class_names or list(init.class_names) == list(spec.class_names))
    own = model.state_dict()
    load = {k: v for k, v in weights.items() if same_classes or not k.startswith(_HEADS)}
    unknown = [k for k in load if k not in own]
    if unknown:
        raise ValueError(f"--init: the model has no {unknown[:4]} of the checkpoint")
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in load.items() if v.shape != own[k].shape]
    if shapes:
        raise ValueError(f"--init: weights of another shape: {shapes[:4]}")
    result = model.load_state_dict(load, strict=False)
    notes = [f"--init: {len(load)} weights loaded"]
    if not same_classes:
        notes.append(f"classes differ ({init.num_classes} -> {spec.num_classes}, background included): "
                     "fresh box predictor" + (" and mask logits" if spec.has_masks else ""))
    fresh = [k for k in result.missing_keys if not k.startswith(_HEADS)]
    if fresh:
        notes.append(f"{len(fresh)} weights not in the checkpoint start fresh (e.g. {fresh[0]})")
    return notes
