"""Deformable RoI pooling layers: DCNv1 (``DeformRoIPool``) and modulated DCNv2 (``ModulatedDeformRoIPool``).

Both pool each RoI twice: plain RoIAlign features feed an fc offset branch (zero-initialised, so a
fresh layer is RoIAlign, with masks 0.5 for the modulated one), whose normalised offsets (and masks)
then deform the second pooling. They are called like a single-map op, ``layer(x, rois)``, or like
``torchvision.ops.MultiScaleRoIAlign``, ``layer(features, proposals, image_shapes)``, so they drop
into torchvision's ``RoIHeads`` as ``box_roi_pool`` / ``mask_roi_pool``; with several FPN levels
each RoI is pooled from the level LevelMapper picks, and the offset branch is shared by all levels.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from dcnv2.ops import _checks
from dcnv2.ops.deform_roi_pool import deform_roi_pool, rois_to_tensor

__all__ = ["DeformRoIPool", "ModulatedDeformRoIPool", "pool_by_level", "every_level_pooling"]


def pool_by_level(levels: Tensor, num_levels: int, pool_level) -> Tensor:
    """Multi-level RoI pooling: ``pool_level(level, idx)`` pools the RoIs ``idx`` (all of whose level is
    ``level``) and the results come back in the RoIs' order.

    The levels' results are concatenated and put in order by one ``index_select`` (its backward one
    ``index_add``): filling a zeroed result level by level copies the whole result once per level, and
    autograd copies it again in the backward (at 512 RoIs x 128 x 7 x 7 that was 8 full copies of 13 MB
    per training step).
    """
    if _EVERY_LEVEL[0] or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return _pool_every_level(levels, num_levels, pool_level)
    parts, order = [], []
    for level in range(num_levels):
        idx = torch.where(levels == level)[0]
        if idx.numel():
            parts.append(pool_level(level, idx))
            order.append(idx)
    if not parts:  # no RoIs: the empty result, with its shape, from level 0
        return pool_level(0, levels.new_zeros((0,), dtype=torch.long))
    if len(parts) == 1:
        return parts[0]
    order_t = torch.cat(order)
    inverse = torch.empty_like(order_t)
    inverse[order_t] = torch.arange(order_t.numel(), device=order_t.device)
    return torch.cat(parts).index_select(0, inverse)


_EVERY_LEVEL = [False]


@contextlib.contextmanager
def every_level_pooling() -> Iterator[None]:
    """Within the block, :func:`pool_by_level` pools every level, branch-free (what exporters trace; also
    on whenever ``torch.jit`` traces or ONNX exports)."""
    saved = _EVERY_LEVEL[0]
    _EVERY_LEVEL[0] = True
    try:
        yield
    finally:
        _EVERY_LEVEL[0] = saved


def _pool_every_level(levels: Tensor, num_levels: int, pool_level) -> Tensor:
    """:func:`pool_by_level` without data-dependent branches, for traces (ONNX, OpenVINO): every level is
    pooled, empty or not, and the results always go back in the RoIs' order. A trace of the eager version keeps
    only the levels the traced image's RoIs fell on, so another image with RoIs on a further level would lose
    them (and fail a reshape downstream)."""
    parts, order = [], []
    for level in range(num_levels):
        idx = torch.where(levels == level)[0]
        parts.append(pool_level(level, idx))
        order.append(idx)
    order_t = torch.cat(order)
    inverse = torch.empty_like(order_t)
    inverse[order_t] = torch.ones_like(order_t).cumsum(0) - 1  # an arange of traced length
    return torch.cat(parts).index_select(0, inverse)


class _DeformRoIPoolBase(nn.Module):
    """Shared plumbing: argument checks, the two call forms and the per-level pooling."""

    def __init__(
        self,
        in_channels: int,
        output_size: _checks.IntPair,
        sampling_ratio: int,
        gamma: float,
        spatial_scale: Optional[float],
        featmap_names: Optional[Sequence[str]],
        aligned: bool,
        canonical_scale: int,
        canonical_level: int,
    ) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels <= 0:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        ph, pw = _checks.pair("output_size", output_size)
        if ph <= 0 or pw <= 0:
            raise ValueError(f"output_size must be positive, got {(ph, pw)}")
        if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
            raise TypeError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma):
            raise ValueError(f"gamma must be a finite number, got {gamma!r}")
        if spatial_scale is not None and not (
            isinstance(spatial_scale, (int, float)) and spatial_scale > 0 and math.isfinite(spatial_scale)
        ):
            raise ValueError(f"spatial_scale must be None or a positive finite number, got {spatial_scale!r}")
        if featmap_names is not None:
            if isinstance(featmap_names, str) or not all(isinstance(n, str) for n in featmap_names):
                raise TypeError(f"featmap_names must be a list of str, got {featmap_names!r}")
            if len(featmap_names) == 0:
                raise ValueError("featmap_names must name at least one feature map, got []")
            if spatial_scale is not None and len(featmap_names) > 1:
                raise ValueError(
                    f"spatial_scale={spatial_scale} fixes a single scale but featmap_names names "
                    f"{len(featmap_names)} maps; leave it None to infer one scale per map"
                )
        if not isinstance(aligned, bool):
            raise TypeError(f"aligned must be a bool, got {aligned!r}")
        self.in_channels = in_channels
        self.output_size: Tuple[int, int] = (ph, pw)
        self.sampling_ratio = sampling_ratio
        self.gamma = float(gamma)
        self.spatial_scale = spatial_scale
        self.featmap_names = list(featmap_names) if featmap_names is not None else None
        self.aligned = aligned
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    # -- to be provided by the subclasses ---------------------------------------------------------
    def offset_branch(self) -> nn.Module:
        """The submodule predicting offsets (and masks): trained at 0.1x lr by ``param_groups``."""
        return self.offset_fc

    def predict(self, pooled: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Offsets Tensor[K, 2, ph, pw] and masks Tensor[K, 1, ph, pw] (or None) from RoIAlign features."""
        raise NotImplementedError

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        x: Union[Tensor, Dict[str, Tensor]],
        rois: Union[Tensor, List[Tensor]],
        image_shapes: Optional[List[Tuple[int, int]]] = None,
    ) -> Tensor:
        """Pools ``rois`` from one map or, MultiScaleRoIAlign-style, from a dict of FPN levels.

        Args:
            x: Tensor[N, C, H, W], or a dict of feature maps (the maps named by ``featmap_names`` are
                used, each Tensor[N, C, H_l, W_l]).
            rois: with a Tensor ``x``, Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of N
                Tensor[L, 4]; with a dict, the list of N proposal Tensor[L, 4] in image coordinates.
            image_shapes: with a dict, the N (height, width) of the images, from which each level's
                scale is inferred (as MultiScaleRoIAlign does); unused with a Tensor.

        Returns:
            Tensor[K, C, ph, pw].
        """
        feats, scales, levels, roi_t = self._inputs(x, rois, image_shapes)
        return self._deform_pool(feats, scales, levels, roi_t)

    def pool_map(self, x: Tensor, rois: Tensor, spatial_scale: float) -> Tensor:
        """Pools Tensor[K, 5] ``rois`` from the one map ``x`` at ``spatial_scale`` (both passes: RoIAlign, the
        offset branch, the deformed pooling); what a per-level layer of a multi-level pooler runs."""
        _checks.tensor("input", x, 4)
        self._check_channels("input", x)
        return self._deform_pool([x], [float(spatial_scale)], None, _rois(rois, x))

    def _deform_pool(self, feats, scales, levels, roi_t) -> Tensor:
        out_dtype = feats[0].dtype
        if roi_t.dtype != out_dtype:
            # e.g. bfloat16 features (autocast) with float32 boxes: pool in the wider type rather than
            # round the box coordinates to the features' precision
            wide = torch.promote_types(roi_t.dtype, out_dtype)
            feats, roi_t = [f.to(wide) for f in feats], roi_t.to(wide)
        plain = self._pool(feats, scales, levels, roi_t, None, None)
        fc_dtype = next(self.offset_branch().parameters()).dtype  # autocast may still recast inside
        offset, mask = self.predict(plain.flatten(1).to(fc_dtype))
        dtype = feats[0].dtype  # the fc may also run in another dtype under autocast
        offset = offset.to(dtype)
        mask = mask.to(dtype) if mask is not None else None
        return self._pool(feats, scales, levels, roi_t, offset, mask).to(out_dtype)

    def _inputs(self, x, rois, image_shapes):
        """Returns (feature maps, their scales, per-RoI level or None, Tensor[K, 5] RoIs)."""
        if isinstance(x, Tensor):
            _checks.tensor("input", x, 4)
            self._check_channels("input", x)
            scale = 1.0 if self.spatial_scale is None else float(self.spatial_scale)
            return [x], [scale], None, _rois(rois, x)
        if not isinstance(x, dict):
            raise TypeError(f"x must be a Tensor[N, C, H, W] or a dict of feature maps, got {type(x).__name__}")
        names = self.featmap_names
        if names is None:
            if len(x) != 1:
                raise ValueError(
                    f"featmap_names is None but the feature dict has {len(x)} maps {list(x)}; "
                    "name the maps to pool from"
                )
            names = list(x)
        missing = [n for n in names if n not in x]
        if missing:
            raise ValueError(f"featmap_names {missing} not in the feature dict, which has {list(x)}")
        # torchvision only for the multi-level (FPN) call: the single-map layers work without it
        from torchvision.ops.poolers import _filter_input, _setup_scales

        feats = _filter_input(x, names)
        for n, f in zip([k for k in x if k in names], feats):
            _checks.tensor(f"features[{n!r}]", f, 4, like=feats[0])
            self._check_channels(f"features[{n!r}]", f)
        if not isinstance(rois, (list, tuple)):
            raise TypeError(f"with a feature dict, proposals must be a list of Tensor[L, 4], got {type(rois).__name__}")
        if image_shapes is None or len(image_shapes) == 0:
            raise ValueError("with a feature dict, image_shapes (the (height, width) of each image) is required")
        roi_t = _rois(list(rois), feats[0])
        if len(feats) == 1 and self.spatial_scale is not None:
            return feats, [float(self.spatial_scale)], None, roi_t
        scales, mapper = _setup_scales(feats, list(image_shapes), self.canonical_scale, self.canonical_level)
        levels = mapper(list(rois)) if len(feats) > 1 else None
        return feats, scales, levels, roi_t

    def _check_channels(self, name: str, x: Tensor) -> None:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name} must have in_channels={self.in_channels} channels, got shape {tuple(x.shape)}")

    def _pool(self, feats, scales, levels, rois, offset, mask) -> Tensor:
        kw = dict(output_size=self.output_size, sampling_ratio=self.sampling_ratio, gamma=self.gamma,
                  aligned=self.aligned)
        if levels is None:
            return deform_roi_pool(feats[0], rois, offset, mask, spatial_scale=scales[0], **kw)
        dtype = feats[0].dtype

        def pool_level(level: int, idx: Tensor) -> Tensor:
            return deform_roi_pool(
                feats[level], rois[idx], offset[idx] if offset is not None else None,
                mask[idx] if mask is not None else None, spatial_scale=scales[level], **kw,
            ).to(dtype)

        return pool_by_level(levels, len(feats), pool_level)

    def extra_repr(self) -> str:
        s = (f"in_channels={self.in_channels}, output_size={self.output_size}, "
             f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}, aligned={self.aligned}")
        if self.spatial_scale is not None:
            s += f", spatial_scale={self.spatial_scale}"
        if self.featmap_names is not None:
            s += f", featmap_names={self.featmap_names}"
        return s


def _rois(rois, feature: Tensor) -> Tensor:
    """RoIs as Tensor[K, 5]; unlike the op, any floating dtype is accepted (kept, not rounded)."""
    first = rois if isinstance(rois, Tensor) else (rois[0] if len(rois) else None)
    if isinstance(first, Tensor) and first.is_floating_point() and first.dtype != feature.dtype:
        return rois_to_tensor(rois, feature.new_empty((feature.shape[0], 0, 0, 0), dtype=first.dtype))
    return rois_to_tensor(rois, feature)


class DeformRoIPool(_DeformRoIPoolBase):
    """DCNv1 deformable RoI pooling: RoIAlign -> one fc (zero-initialised) -> 2 * ph * pw offsets.

    Args:
        in_channels: channels C of the pooled feature maps.
        output_size: int or (ph, pw); exposed as the tuple ``output_size`` like MultiScaleRoIAlign.
        sampling_ratio: samples per bin along each axis, <= 0 adaptive.
        gamma: offset scale (0.1).
        spatial_scale: map size / image size for the Tensor call (1.0 if None); with a dict of one
            map it overrides the inferred scale.
        featmap_names: the maps used in the dict call (None: the dict's only map).
        aligned: pixel-centre box model of roi_align (``aligned=True``).
        canonical_scale, canonical_level: FPN level mapping, as in MultiScaleRoIAlign.
        hidden_channels: None for the paper's single fc; a width for mmcv's ``DeformRoIPoolPack`` layout
            (``offset_fc`` = fc -> ReLU -> fc -> ReLU -> fc 2 * ph * pw, the last zero-initialised), which
            converted mmdetection ``dpool`` checkpoints load into.
    """

    def __init__(
        self,
        in_channels: int,
        output_size: _checks.IntPair = 7,
        sampling_ratio: int = 2,
        gamma: float = 0.1,
        spatial_scale: Optional[float] = None,
        featmap_names: Optional[Sequence[str]] = None,
        aligned: bool = True,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        hidden_channels: Optional[int] = None,
    ) -> None:
        super().__init__(in_channels, output_size, sampling_ratio, gamma, spatial_scale, featmap_names, aligned,
                         canonical_scale, canonical_level)
        ph, pw = self.output_size
        if hidden_channels is None:
            self.offset_fc = nn.Linear(in_channels * ph * pw, 2 * ph * pw)
            last = self.offset_fc
        else:
            _check_width("hidden_channels", hidden_channels)
            self.offset_fc = _mlp(in_channels * ph * pw, hidden_channels, 2 * ph * pw, hidden_layers=2)
            last = self.offset_fc[-1]
        self.hidden_channels = hidden_channels
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def predict(self, pooled: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        return self.offset_fc(pooled).view(-1, 2, *self.output_size), None


class ModulatedDeformRoIPool(_DeformRoIPoolBase):
    """DCNv2 modulated deformable RoI pooling (eq. 2 of the paper).

    RoIAlign -> fc ``hidden_channels`` -> ReLU -> fc ``hidden_channels`` -> ReLU (weights N(0, 0.01))
    -> fc 3 * ph * pw (zero-initialised): 2 * ph * pw normalised offsets (x then y), ph * pw ->
    sigmoid -> masks. A fresh layer is RoIAlign times 0.5.

    Args:
        hidden_channels: width of the two hidden fc layers (1024).
        mask_branch: ``"shared"`` (the paper's: one MLP predicts offsets and masks) or ``"separate"``
            (mmcv's ``ModulatedDeformRoIPoolPack``: ``offset_fc`` = 3 fc -> 2 * ph * pw offsets, ``mask_fc`` =
            fc -> ReLU -> fc ph * pw -> sigmoid, each last fc zero-initialised), which converted
            mmdetection ``mdpool`` checkpoints load into. Both compute RoIAlign x 0.5 when fresh.
        Others: as in :class:`DeformRoIPool`.
    """

    def __init__(
        self,
        in_channels: int,
        output_size: _checks.IntPair = 7,
        sampling_ratio: int = 2,
        gamma: float = 0.1,
        hidden_channels: int = 1024,
        spatial_scale: Optional[float] = None,
        featmap_names: Optional[Sequence[str]] = None,
        aligned: bool = True,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        mask_branch: str = "shared",
    ) -> None:
        super().__init__(in_channels, output_size, sampling_ratio, gamma, spatial_scale, featmap_names, aligned,
                         canonical_scale, canonical_level)
        _check_width("hidden_channels", hidden_channels)
        if mask_branch not in ("shared", "separate"):
            raise ValueError(f"mask_branch must be 'shared' or 'separate', got {mask_branch!r}")
        self.hidden_channels = hidden_channels
        self.mask_branch = mask_branch
        ph, pw = self.output_size
        n_in, K = in_channels * ph * pw, ph * pw
        if mask_branch == "shared":
            self.offset_fc = _mlp(n_in, hidden_channels, 3 * K, hidden_layers=2)
        else:
            self.offset_fc = _mlp(n_in, hidden_channels, 2 * K, hidden_layers=2)
            self.mask_fc = _mlp(n_in, hidden_channels, K, hidden_layers=1)
        for branch in (self.offset_fc, getattr(self, "mask_fc", None)):
            if branch is None:
                continue
            for layer in list(branch)[:-1:2]:
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
            nn.init.zeros_(branch[-1].weight)
            nn.init.zeros_(branch[-1].bias)

    def offset_branch(self) -> nn.Module:
        if self.mask_branch == "separate":  # both MLPs (not registered twice: a plain container)
            return nn.ModuleList([self.offset_fc, self.mask_fc])
        return self.offset_fc

    def predict(self, pooled: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        ph, pw = self.output_size
        out = self.offset_fc(pooled)
        offset = out[:, : 2 * ph * pw].reshape(-1, 2, ph, pw)
        logits = self.mask_fc(pooled) if self.mask_branch == "separate" else out[:, 2 * ph * pw :]
        mask = torch.sigmoid(logits).reshape(-1, 1, ph, pw)
        return offset, mask

    def extra_repr(self) -> str:
        return super().extra_repr() + f", hidden_channels={self.hidden_channels}, mask_branch={self.mask_branch!r}"


def _check_width(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _mlp(n_in: int, hidden: int, n_out: int, hidden_layers: int) -> nn.Sequential:
    """fc -> ReLU, ``hidden_layers`` times, then the output fc (indices 0, 2, ... are the fc layers)."""
    layers: List[nn.Module] = []
    width = n_in
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)
