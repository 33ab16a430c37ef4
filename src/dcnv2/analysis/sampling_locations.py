"""Effective sampling locations (image-wise nodes) and effective bin locations (RoI-wise nodes), sec. 2.1.

**Sampling locations.** For the stack of 3x3 layers that ends at an image-wise node (default: the last three
3x3 convs of conv5), the node's cell samples ``p + p_k + Δp_k`` on the top layer's input; each of those
positions is a (fractional) location of the layer below, which samples its own nine points with its offset
field interpolated there, and so on: K^L composed points, mapped to image pixels. A regular ``nn.Conv2d`` is
a deformable conv with zero offsets, so both are traced the same way: while tracing, every layer of the
stack runs as ``deform_conv2d(x, offset + δ, ...)`` with a zero leaf ``δ`` (the function is unchanged), and
one backward pass gives ``∂N/∂δ`` — the gradient of the node with respect to every sampling location of every
layer. A composed point's weight is the magnitude of that gradient at the bottom layer's sampling location
it ends in (interpolated at the fractional output position it descends from).

**Bin locations.** For an RoI-wise node, the box head's pooling bins: bin ``(i, j)`` of a RoI ``(x1, y1, x2,
y2)`` is centred at ``x1 + (j + 1/2) w / pw + γ Δx w`` (and likewise in y) with the deformable pooling's
normalised offsets ``Δ`` (zero for RoIAlign); its weight is ``|∂N/∂(bin position)|`` in pixels. RoIPool
(quantised bins) is traced as RoIAlign over the same bins (its bins have no sub-pixel position).

Coordinates are input pixels, continuous: pixel ``i`` covers ``[i, i + 1)``, a stride-S feature cell ``c``
is centred at ``(c + 1/2) S``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d
from dcnv2.ops import deform_conv2d
from dcnv2.ops.deform_roi_pool import deform_roi_pool

__all__ = ["SamplingLocations", "BinLocations", "stack_layers", "effective_sampling_locations",
           "effective_bin_locations", "trace_sampling"]

_DEFORM = (DeformConv2d, ModulatedDeformConv2d)


@dataclass
class SamplingLocations:
    """Composed sampling points of an image-wise node.

    Attributes:
        points: np.ndarray[P, 2] (x, y) in input pixels, P = K^L (729 for three 3x3 layers).
        weights: np.ndarray[P] >= 0, |∂N/∂(sampling location)| at the bottom layer.
        layers: names of the traced layers, bottom to top.
        center: (x, y) of the node's cell.
    """

    points: np.ndarray
    weights: np.ndarray
    layers: List[str]
    center: Tuple[float, float]


@dataclass
class BinLocations:
    """Bins of the RoI pooling of an RoI-wise node.

    Attributes:
        centers: np.ndarray[ph * pw, 2] (x, y) bin centres in input pixels, row-major over (i, j).
        weights: np.ndarray[ph * pw] >= 0, |∂N/∂(bin position)| per pixel of displacement.
        offsets: np.ndarray[2, ph, pw] the normalised offsets (x, y) the pooling applied (zeros for RoIAlign).
        box: the RoI (x1, y1, x2, y2); gamma: the offset scale; kind: the pooling's class name.
    """

    centers: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    box: Tuple[float, float, float, float]
    gamma: float
    kind: str


def _is_3x3(name: str, module: nn.Module) -> bool:
    if isinstance(module, _DEFORM):
        return tuple(module.kernel_size) == (3, 3)
    if type(module) is nn.Conv2d and tuple(module.kernel_size) == (3, 3):
        return not name.endswith("conv_offset")  # a deformable layer's offset branch is not on the path
    return False


def stack_layers(trunk: nn.Module, layer: str, n: int = 3) -> List[str]:
    """Names of the last ``n`` 3x3 convs (regular or deformable) of ``trunk`` up to and inside ``layer``,
    bottom to top (module registration order, which is execution order in ResNets)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    names = [name for name, _ in trunk.named_modules()]
    inside = [i for i, name in enumerate(names) if name == layer or name.startswith(layer + ".")]
    if not inside:
        raise ValueError(f"layer {layer!r} is not a module of the trunk")
    modules = dict(trunk.named_modules())
    convs = [name for name in names[:inside[-1] + 1] if name and _is_3x3(name, modules[name])]
    if not convs:
        raise ValueError(f"no 3x3 convolution up to {layer!r}")
    return convs[-n:]


@dataclass
class _Record:
    name: str
    layer: nn.Module
    offset: Optional[Tensor] = None   # [N, 2*OG*K, Ho, Wo], detached
    delta: Optional[Tensor] = None    # the zero leaf added to it
    in_hw: Tuple[int, int] = (0, 0)
    out_hw: Tuple[int, int] = (0, 0)
    extra: Dict[str, object] = field(default_factory=dict)


def _tracing_forward(rec: _Record):
    layer = rec.layer

    def forward(x: Tensor) -> Tensor:
        if isinstance(layer, _DEFORM):
            offset, mask = layer.offset_and_mask(x)
        else:
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError(f"{rec.name}: only zero padding given as numbers can be traced, got "
                                 f"padding={layer.padding!r}, padding_mode={layer.padding_mode!r}")
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
            ho = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            wo = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            offset, mask = x.new_zeros(x.shape[0], 2 * kh * kw, ho, wo), None
        delta = torch.zeros_like(offset, requires_grad=True)
        rec.offset, rec.delta, rec.in_hw = offset.detach(), delta, tuple(x.shape[-2:])
        out = deform_conv2d(x, offset + delta, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                            mask)
        rec.out_hw = tuple(out.shape[-2:])
        return out

    return forward


@contextlib.contextmanager
def trace_sampling(trunk: nn.Module, names: Sequence[str]) -> Iterator[List[_Record]]:
    """Runs the named conv layers of ``trunk`` through ``deform_conv2d`` with a zero leaf added to their
    offsets (same outputs), recording offsets and leaves; restores the layers on exit."""
    modules = dict(trunk.named_modules())
    records = []
    for name in names:
        if name not in modules or not _is_3x3(name, modules[name]):
            raise ValueError(f"{name!r} is not a 3x3 (deformable) convolution of the trunk")
        records.append(_Record(name, modules[name]))
    try:
        for rec in records:
            rec.layer.forward = _tracing_forward(rec)
        yield records
    finally:
        for rec in records:
            rec.layer.__dict__.pop("forward", None)


def _interp(field_: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of field_[C, H, W] at pos[N, 2] (row, col), clamped to the map: [N, C]."""
    _, h, w = field_.shape
    y = np.clip(pos[:, 0], 0, h - 1)
    x = np.clip(pos[:, 1], 0, w - 1)
    y0 = np.minimum(np.floor(y).astype(int), h - 1)
    x0 = np.minimum(np.floor(x).astype(int), w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    ly, lx = (y - y0)[:, None], (x - x0)[:, None]
    f = lambda yy, xx: field_[:, yy, xx].T  # noqa: E731
    return (f(y0, x0) * (1 - ly) * (1 - lx) + f(y0, x1) * (1 - ly) * lx
            + f(y1, x0) * ly * (1 - lx) + f(y1, x1) * ly * lx)


def effective_sampling_locations(node, x: Tensor, layers: Optional[Sequence[str]] = None,
                                 num_layers: int = 3) -> SamplingLocations:
    """The composed sampling points of an :class:`~dcnv2.analysis.nodes.ImageNode` and their gradients.

    Args:
        node: the image-wise node (its ``trunk`` is traced).
        x: Tensor[1, 3, H, W], the model input.
        layers: names of the 3x3 conv layers to compose, bottom to top (default: :func:`stack_layers` of the
            node's layer, the last ``num_layers``).
        num_layers: stack depth when ``layers`` is None.
    """
    if getattr(node, "kind", None) != "image":
        raise TypeError(f"sampling locations need an image-wise node, got {type(node).__name__}")
    names = list(layers) if layers is not None else stack_layers(node.trunk, node.layer, num_layers)
    inp = x.detach()
    with trace_sampling(node.trunk, names) as records, torch.enable_grad():
        vec = node.response(inp)
        missing = [r.name for r in records if r.delta is None]
        if missing:
            raise ValueError(f"layers {missing} were not run on the way to the node")
        vec.sum().backward()
    row, col = node.cell
    pos = np.array([[row, col]], dtype=np.float64)
    weights = np.ones((1,), dtype=np.float64)
    for idx in range(len(records) - 1, -1, -1):
        rec = records[idx]
        layer = rec.layer
        (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
        (ph, pw), (dh, dw) = layer.padding, layer.dilation
        k = kh * kw
        og = rec.offset.shape[1] // (2 * k)
        off = rec.offset[0].double().cpu().numpy().reshape(og, k, 2, *rec.out_hw).mean(0)  # [K, 2(dy, dx), Ho, Wo]
        off_at = _interp(off.reshape(2 * k, *rec.out_hw), pos).reshape(-1, k, 2)
        taps = np.array([[i * dh, j * dw] for i in range(kh) for j in range(kw)], dtype=np.float64)
        new = pos[:, None, :] * np.array([sh, sw]) - np.array([ph, pw]) + taps[None] + off_at  # [N, K, 2]
        if idx == 0:  # the bottom layer: weights are the node's gradient w.r.t. these sampling locations
            g = rec.delta.grad[0].double().cpu().numpy().reshape(og, k, 2, *rec.out_hw)
            gnorm = np.sqrt((g ** 2).sum(2)).sum(0)  # [K, Ho, Wo]
            weights = _interp(gnorm, pos).reshape(-1)
        pos = new.reshape(-1, 2)
        if idx > 0:  # this layer's input coordinates -> the output coordinates of the layer below
            below = records[idx - 1]
            ratio = np.array(below.out_hw, dtype=np.float64) / np.array(rec.in_hw, dtype=np.float64)
            pos = (pos + 0.5) * ratio - 0.5
    stride = np.array(inp.shape[-2:], dtype=np.float64) / np.array(records[0].in_hw, dtype=np.float64)
    pix = (pos + 0.5) * stride  # (y, x)
    return SamplingLocations(points=pix[:, ::-1].copy(), weights=weights, layers=names, center=node.center)


def _pool_setup(pool: nn.Module, features: Dict[str, Tensor], boxes: List[Tensor], image_size):
    """(feature map, scale) the pooling reads the box from: the FPN level of the box, or the only map."""
    from torchvision.ops.poolers import _filter_input, _setup_scales

    names = getattr(pool, "featmap_names", None) or list(features)
    feats = _filter_input(features, names)
    scales, mapper = _setup_scales(feats, [image_size], getattr(pool, "canonical_scale", 224),
                                   getattr(pool, "canonical_level", 4))
    if getattr(pool, "spatial_scale", None) is not None and len(feats) == 1:
        scales = [float(pool.spatial_scale)]
    level = int(mapper(boxes)[0]) if len(feats) > 1 else 0
    return feats[level], float(scales[level])


def effective_bin_locations(node, x: Tensor) -> BinLocations:
    """Bin centres of an :class:`~dcnv2.analysis.nodes.RoINode`'s box pooling and the node's gradient w.r.t. them.

    Handles ``dcnv2.nn`` (modulated) deformable RoI pooling, :class:`dcnv2.models.poolers.RoIPooler` and
    ``torchvision.ops.MultiScaleRoIAlign``. The traced pooling equals the model's (RoIPool excepted, see the
    module docstring), so ``node.response`` and the traced response agree.
    """
    if getattr(node, "kind", None) != "roi":
        raise TypeError(f"bin locations need an RoI-wise node, got {type(node).__name__}")
    model = node.model
    pool = model.roi_heads.box_roi_pool
    x1, y1, x2, y2 = node.box
    with torch.enable_grad():
        features = model.backbone(x.detach())
        if isinstance(features, Tensor):
            features = {"0": features}
        boxes = node.boxes(1, x)
        feat, scale = _pool_setup(pool, features, boxes, node.image_size)
        out_size = pool.output_size
        out_size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        rois = torch.cat([boxes[0].new_zeros(1, 1), boxes[0]], 1)
        mask = None
        if hasattr(pool, "predict"):  # dcnv2.nn deformable RoI pooling: its own offsets (and masks)
            gamma, aligned, ratio = pool.gamma, pool.aligned, pool.sampling_ratio
            plain = deform_roi_pool(feat, rois, None, None, out_size, scale, ratio, gamma, aligned)
            fc_dtype = next(pool.offset_branch().parameters()).dtype
            offset, mask = pool.predict(plain.flatten(1).to(fc_dtype))
            offset = offset.to(feat.dtype)
        else:  # RoIAlign (aligned or not) / RoIPool: zero offsets with unit gamma
            gamma = 1.0
            aligned = bool(getattr(pool, "aligned", False)) and getattr(pool, "mode", "align") == "align"
            ratio = getattr(pool, "sampling_ratio", 2)
            offset = feat.new_zeros(1, 2, *out_size)
        delta = torch.zeros_like(offset, requires_grad=True)
        pooled = deform_roi_pool(feat, rois, offset + delta, mask, out_size, scale, ratio, gamma, aligned)
        node.head(pooled).sum().backward()
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0 / scale), max(roi_h, 1.0 / scale)  # roi_align's minimum size of 1 cell
    ph, pw = out_size
    off = offset[0].detach().double().cpu().numpy()  # [2 (x, y), ph, pw]
    jj, ii = np.meshgrid(np.arange(pw) + 0.5, np.arange(ph) + 0.5)
    shift = 0.0 if aligned else 0.5 / scale  # unaligned roi_align samples half a cell further on
    cx = x1 + jj * roi_w / pw + gamma * off[0] * roi_w + shift
    cy = y1 + ii * roi_h / ph + gamma * off[1] * roi_h + shift
    g = delta.grad[0].double().cpu().numpy()
    gx, gy = g[0] / (gamma * roi_w), g[1] / (gamma * roi_h)  # per pixel of bin displacement
    return BinLocations(centers=np.stack([cx.reshape(-1), cy.reshape(-1)], 1), weights=np.hypot(gx, gy).reshape(-1),
                        offsets=off, box=node.box, gamma=float(gamma), kind=type(pool).__name__)
