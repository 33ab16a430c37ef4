"""FLOP formulas for ``torch.utils.flop_counter`` and a detector FLOP/parameter count.

``FlopCounterMode`` only knows aten ops; :func:`register_flop_formulas` teaches it our registered ops
(``torch.ops.dcnv2.deform_conv2d``, ``torch.ops.dcnv2.deform_roi_pool``) and torchvision's RoI pooling ops,
so a regular and a deformable model are counted alike. Convention: FLOPs = 2 x multiply-adds, as
``FlopCounterMode`` counts convolutions and matmuls.

* deformable conv: the conv (2 * N * Cout * Ho * Wo * Cin/groups * kh * kw) plus its bilinear sampling
  (4 multiply-adds per sampled input value, one more multiply for the DCNv2 mask);
* RoI pooling: RoIAlign / deformable RoI pooling 4 multiply-adds per bilinear sample, sampling_ratio^2
  samples per bin (2 x 2 assumed where the grid is adaptive, since it depends on RoI sizes); RoIPool one
  max per input cell of a bin, 2 x 2 cells per bin assumed likewise.
"""
from __future__ import annotations

import contextlib
from math import prod
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

__all__ = ["register_flop_formulas", "count_flops", "count_parameters", "fixed_roi_counts"]

_ADAPTIVE_SAMPLES = 2  # per axis, where sampling_ratio <= 0


def _deform_conv2d_flop(input_shape, weight_shape, offset_shape, mask_shape, bias_shape, stride, padding,
                        dilation, groups, offset_groups, *args, out_shape=None, **kwargs) -> int:
    n, c_in = input_shape[0], input_shape[1]
    c_out, c_per_group, kh, kw = weight_shape
    ho, wo = out_shape[2], out_shape[3]
    conv = 2 * n * c_out * ho * wo * c_per_group * kh * kw
    samples = n * c_in * kh * kw * ho * wo
    sampling = samples * (2 * 4 + (1 if mask_shape is not None else 0))
    return conv + sampling


def _roi_bins(out_shape) -> int:
    return prod(out_shape)  # K * C * ph * pw


def _deform_roi_pool_flop(input_shape, rois_shape, offset_shape, mask_shape, pooled_height, pooled_width,
                          spatial_scale, sampling_ratio, gamma, aligned, *args, out_shape=None, **kwargs) -> int:
    s = sampling_ratio if sampling_ratio > 0 else _ADAPTIVE_SAMPLES
    per_bin = s * s * 2 * 4 + 1 + (1 if mask_shape is not None else 0)  # samples, average, mask
    return _roi_bins(out_shape) * per_bin


def _roi_align_flop(input_shape, rois_shape, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                    *args, out_shape=None, **kwargs) -> int:
    s = sampling_ratio if sampling_ratio > 0 else _ADAPTIVE_SAMPLES
    return _roi_bins(out_shape) * (s * s * 2 * 4 + 1)


def _roi_pool_flop(input_shape, rois_shape, spatial_scale, pooled_height, pooled_width, *args, out_shape=None,
                   **kwargs) -> int:
    out = out_shape[0] if isinstance(out_shape, (tuple, list)) and isinstance(out_shape[0], (tuple, list)) else out_shape
    return _roi_bins(out) * _ADAPTIVE_SAMPLES ** 2


def register_flop_formulas() -> None:
    """Registers the formulas above with ``torch.utils.flop_counter`` (idempotent)."""
    import torchvision  # noqa: F401  (loads torch.ops.torchvision)

    import dcnv2.ops  # noqa: F401  (loads torch.ops.dcnv2)

    table = [("dcnv2", "deform_conv2d", _deform_conv2d_flop), ("dcnv2", "deform_roi_pool", _deform_roi_pool_flop),
             ("torchvision", "roi_align", _roi_align_flop), ("torchvision", "roi_pool", _roi_pool_flop)]
    for namespace, name, formula in table:
        try:
            packet = getattr(getattr(torch.ops, namespace), name)
        except (AttributeError, RuntimeError):
            continue  # the op is not built here (e.g. no native extension): its aten fallback is counted
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of the inference model: training-only parts (the feature mimicking branch) not counted."""
    from dcnv2.models.mimic import TRAINING_ONLY_PREFIX

    return sum(p.numel() for name, p in model.named_parameters()
               if (p.requires_grad or not trainable_only) and not name.startswith(TRAINING_ONLY_PREFIX))


def _random_boxes(n: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    wh = torch.rand(n, 2, generator=gen) * 0.5 + 0.05  # 5%..55% of the image side
    xy = torch.rand(n, 2, generator=gen) * (1 - wh)
    size = torch.tensor([width, height], dtype=torch.float32)
    return torch.cat([xy * size, (xy + wh) * size], dim=1)


@contextlib.contextmanager
def fixed_roi_counts(model: nn.Module, proposals: Optional[int], detections: Optional[int], seed: int = 0):
    """Within the context, a torchvision detector sees exactly ``proposals`` RPN proposals and keeps exactly
    ``detections`` detections per image (the mask head's RoIs), whatever its (untrained) weights predict.

    The RPN and the box head still run in full; only their outputs are replaced: fixed random boxes for the
    proposals, the first ``detections`` proposals as detections. An untrained model's RoI counts otherwise
    depend on its random predictions (boxes clipped to nothing, NMS), and so would its FLOPs.
    """
    handles, patched = [], False
    gen = torch.Generator().manual_seed(seed)
    if proposals is not None:
        def replace_proposals(module, args, output):
            images = args[0]
            boxes = [_random_boxes(proposals, h, w, gen).to(images.tensors) for h, w in images.image_sizes]
            return boxes, output[1]

        handles.append(model.rpn.register_forward_hook(replace_proposals))
    if detections is not None:
        def first_proposals(class_logits, box_regression, props, image_shapes):
            boxes = [p[:detections] for p in props]
            scores = [torch.ones(len(b), dtype=b.dtype, device=b.device) for b in boxes]
            labels = [torch.ones(len(b), dtype=torch.int64, device=b.device) for b in boxes]
            return boxes, scores, labels

        model.roi_heads.postprocess_detections = first_proposals
        patched = True
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if patched:
            del model.roi_heads.postprocess_detections


def count_flops(model: nn.Module, images: Sequence[torch.Tensor], *, proposals: Optional[int] = None,
                detections: Optional[int] = None) -> Tuple[int, Dict[str, int]]:
    """FLOPs of one inference forward of ``model`` (eval mode, no grad) on ``images``.

    Args:
        model: any module taking a list of images; for a torchvision detector ``proposals`` and
            ``detections`` fix the RoIs per image of the box and mask heads (see :func:`fixed_roi_counts`).
        images: list of Tensor[3, H, W].

    Returns:
        (total, per-operator counts).
    """
    register_flop_formulas()
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), fixed_roi_counts(model, proposals, detections), counter:
            model(list(images))
    finally:
        model.train(was_training)
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), per_op
