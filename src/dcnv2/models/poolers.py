"""RoI pooling layers for the detectors' box (7x7) and mask (14x14) heads, picked by a preset's pool type.

All are called like ``torchvision.ops.MultiScaleRoIAlign`` — ``pool(features, proposals, image_shapes)`` —
so they drop into torchvision's ``RoIHeads``. :class:`RoIPooler` covers the two regular rows of Table 1:
RoIPool (quantised bins) and aligned RoIAlign (``aligned=True``, the pixel-centre model our deformable
pooling uses, so that a deformable layer with zero offsets pools exactly what ``"align"`` pools).

On CPU, RoIAlign runs through our deformable RoI pooling kernel with no offsets: the same bins and samples
as ``torchvision.ops.roi_align`` (bit-identical results, tested), a deterministic backward and about 5x
faster forward+backward (torchvision's CPU backward is serial; it was 22 % of the demo's regular training
step). Exports and compiled graphs keep ``torchvision.ops.roi_align`` (ONNX ``RoiAlign``).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from dcnv2.nn import DeformRoIPool, ModulatedDeformRoIPool
from dcnv2.nn.deform_roi_pool import pool_by_level
from dcnv2.ops import deform_roi_pool
from dcnv2.ops._native import HAS_NATIVE

__all__ = ["RoIPooler", "LevelwiseRoIPool", "POOL_LAYOUTS", "make_roi_pool"]


class RoIPooler(nn.Module):
    """Multi-level RoIPool or RoIAlign over named feature maps (FPN level per RoI as MultiScaleRoIAlign).

    Args:
        featmap_names: the maps of the feature dict to pool from.
        output_size: int or (h, w).
        sampling_ratio: RoIAlign samples per bin along each axis (<= 0 adaptive); unused by RoIPool.
        mode: ``"align"`` (``torchvision.ops.roi_align``) or ``"roipool"`` (``torchvision.ops.roi_pool``).
        aligned: RoIAlign's half-pixel box model.
        canonical_scale, canonical_level: FPN level mapping.
    """

    def __init__(self, featmap_names: Sequence[str], output_size=7, sampling_ratio: int = 2, *, mode: str = "align",
                 aligned: bool = True, canonical_scale: int = 224, canonical_level: int = 4) -> None:
        super().__init__()
        if mode not in ("align", "roipool"):
            raise ValueError(f"mode must be 'align' or 'roipool', got {mode!r}")
        if isinstance(featmap_names, str) or not featmap_names:
            raise ValueError(f"featmap_names must be a non-empty list of names, got {featmap_names!r}")
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = list(featmap_names)
        self.output_size: Tuple[int, int] = tuple(output_size)
        self.sampling_ratio = sampling_ratio
        self.mode = mode
        self.aligned = aligned
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def _pool_level(self, x: Tensor, rois: Tensor, scale: float) -> Tensor:
        if self.mode == "roipool":
            return roi_pool(x, rois, self.output_size, scale)
        if _native_roi_align(x):
            return deform_roi_pool(x, rois, None, None, self.output_size, scale, self.sampling_ratio,
                                   aligned=self.aligned)
        return roi_align(x, rois, self.output_size, scale, self.sampling_ratio, self.aligned)

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        """Args: x dict of Tensor[N, C, H_l, W_l]; boxes N Tensor[L, 4] in image coordinates; image_shapes
        N (height, width). Returns Tensor[sum L, C, h, w]."""
        feats = _filter_input(x, self.featmap_names)
        scales, mapper = _setup_scales(feats, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(feats) == 1:
            return self._pool_level(feats[0], rois, scales[0])
        levels = mapper(boxes)
        dtype = feats[0].dtype
        return pool_by_level(levels, len(feats),
                             lambda level, idx: self._pool_level(feats[level], rois[idx], scales[level]).to(dtype))

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, mode={self.mode!r}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


def _native_roi_align(x: Tensor) -> bool:
    """RoIAlign through our C++ kernel: CPU tensors, eager mode (exports keep torchvision's op)."""
    return (HAS_NATIVE and x.device.type == "cpu" and not torch.onnx.is_in_onnx_export()
            and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.compiler.is_compiling())


class LevelwiseRoIPool(nn.Module):
    """Multi-level deformable RoI pooling with one layer (and so one offset branch) per feature map, as
    mmdetection's ``SingleRoIExtractor`` builds ``roi_layers``: each RoI is pooled by the layer of the level
    ``MultiScaleRoIAlign``'s rule picks. Called like ``MultiScaleRoIAlign``.

    Args:
        roi_layers: one single-map layer per name of ``featmap_names`` (each with ``pool_map``).
        featmap_names: the maps of the feature dict, finest first.
        canonical_scale, canonical_level: FPN level mapping.
    """

    def __init__(self, roi_layers: Sequence[nn.Module], featmap_names: Sequence[str], *, canonical_scale: int = 224,
                 canonical_level: int = 4) -> None:
        super().__init__()
        if len(roi_layers) != len(featmap_names) or not roi_layers:
            raise ValueError(f"one RoI layer per feature map is needed: {len(roi_layers)} layers for "
                             f"{len(featmap_names)} maps {list(featmap_names)}")
        self.roi_layers = nn.ModuleList(roi_layers)
        self.featmap_names = list(featmap_names)
        self.output_size: Tuple[int, int] = tuple(roi_layers[0].output_size)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        """Args: x dict of Tensor[N, C, H_l, W_l]; boxes N Tensor[L, 4] in image coordinates; image_shapes
        N (height, width). Returns Tensor[sum L, C, h, w]."""
        missing = [n for n in self.featmap_names if n not in x]
        if missing:
            raise ValueError(f"featmap_names {missing} not in the feature dict, which has {list(x)}")
        feats = _filter_input(x, self.featmap_names)
        scales, mapper = _setup_scales(feats, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(feats) == 1:
            return self.roi_layers[0].pool_map(feats[0], rois, scales[0])
        levels = mapper(boxes)
        dtype = feats[0].dtype
        return pool_by_level(levels, len(feats), lambda level, idx: self.roi_layers[level].pool_map(
            feats[level], rois[idx], scales[level]).to(dtype))

    def extra_repr(self) -> str:
        return f"featmap_names={self.featmap_names}, output_size={self.output_size}"


POOL_LAYOUTS = ("shared", "mmdet")


def make_roi_pool(kind: str, featmap_names: Sequence[str], output_size: int, in_channels: int, *,
                  sampling_ratio: int = 2, gamma: float = 0.1, hidden_channels: int = 1024,
                  canonical_scale: int = 224, aligned: bool = True, layout: str = "shared") -> nn.Module:
    """The RoI pooling layer of a preset's pool type (see :data:`dcnv2.models.presets.POOL_TYPES`).

    ``"dpool"`` / ``"mdpool"`` own an offset branch that reads ``in_channels * output_size**2`` pooled
    features (so their parameter count depends on the pooled map's channels and size). With several feature
    maps a RoI of size ``canonical_scale`` is pooled from level 4, one half that size from level 3 and so on
    (``MultiScaleRoIAlign``'s rule; 224 suits ~800 px images).

    ``layout="shared"`` (ours, the paper's) shares one offset branch between the levels, DCNv1's being one fc;
    ``layout="mmdet"`` is mmcv's ``(Modulated)DeformRoIPoolPack`` inside mmdetection's ``SingleRoIExtractor``:
    one layer per level, DCNv1 offsets from 3 fc, DCNv2 masks from their own 2-fc ``mask_fc``. ``aligned``
    and ``sampling_ratio`` (<= 0: adaptive, mmdetection's and detectron2's 0) apply to every kind but RoIPool.
    """
    if layout not in POOL_LAYOUTS:
        raise ValueError(f"RoI pool layout must be one of {POOL_LAYOUTS}, got {layout!r}")
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be a bool, got {aligned!r}")
    lv = dict(canonical_scale=canonical_scale, canonical_level=4)
    names = list(featmap_names)
    if kind == "roipool":
        return RoIPooler(names, output_size, mode="roipool", **lv)
    if kind == "align":
        return RoIPooler(names, output_size, sampling_ratio, mode="align", aligned=aligned, **lv)
    if kind not in ("dpool", "mdpool"):
        raise ValueError(f"unknown RoI pooling kind {kind!r}; expected 'roipool', 'align', 'dpool' or 'mdpool'")

    def layer(featmap: Sequence[str] = None) -> nn.Module:
        if kind == "dpool":
            return DeformRoIPool(in_channels, output_size, sampling_ratio, gamma, featmap_names=featmap,
                                 aligned=aligned, hidden_channels=hidden_channels if layout == "mmdet" else None, **lv)
        return ModulatedDeformRoIPool(in_channels, output_size, sampling_ratio, gamma, hidden_channels,
                                      featmap_names=featmap, aligned=aligned,
                                      mask_branch="separate" if layout == "mmdet" else "shared", **lv)

    if layout == "mmdet":
        return LevelwiseRoIPool([layer() for _ in names], names, **lv)
    return layer(names)

