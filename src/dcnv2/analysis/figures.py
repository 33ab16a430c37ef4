"""Figures like Fig. 1 (image-wise nodes) and Fig. 2 (RoI-wise nodes) of the paper, through matplotlib.

Rows: (a) effective sampling locations (image nodes) or bin locations (RoI nodes), (b) effective receptive
field, (c) error-bounded saliency region. Columns: nodes (by default one on a small object, one on a large
object and one on the background, picked from the ground truth), grouped by model, so several checkpoints
(regular, DCNv1, DCNv2) sit side by side on the same nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from dcnv2.analysis.nodes import ImageNode, PreparedImage, RoINode, prepare_image, trunk_of
from dcnv2.analysis.receptive_field import ERF, effective_receptive_field
from dcnv2.analysis.saliency import SaliencyResult, saliency_region, slic_segments
from dcnv2.analysis.sampling_locations import (BinLocations, SamplingLocations, effective_bin_locations,
                                               effective_sampling_locations)

__all__ = ["NodeSpec", "AnalysisOptions", "NodeAnalysis", "pick_nodes", "make_node", "analyze_node",
           "draw_figure", "figure_for_models"]


@dataclass(frozen=True)
class NodeSpec:
    """A node to analyse, in the prepared (model input) image's pixels.

    Attributes:
        label: column title, e.g. "small object".
        kind: "image" (a point ``xy``) or "roi" (a ``box``).
        xy: (x, y) for image nodes; box: (x1, y1, x2, y2) for RoI nodes.
    """

    label: str
    kind: str
    xy: Optional[Tuple[float, float]] = None
    box: Optional[Tuple[float, float, float, float]] = None


@dataclass
class AnalysisOptions:
    """Settings of every view (the paper's defaults).

    Attributes:
        layer: trunk layer of image-wise nodes (None: ``layer4``, the last of conv5).
        num_layers: 3x3 layers composed for the sampling locations (3: the last three of conv5).
        channel: respond with one channel only (None: the whole vector).
        eps: saliency error bound ε; area_step: step-1 area increment (fraction of the image).
        n_segments, compactness: SLIC settings; fill: masked pixel value ("mean", "zero" or a number).
        batch_size: masked images per forward; saliency: compute saliency regions at all; refine: step 2;
        greedy: step 2's search, "exact" (the paper's) or "lazy" (see :func:`~dcnv2.analysis.saliency.saliency_region`).
    """

    layer: Optional[str] = None
    num_layers: int = 3
    channel: Optional[int] = None
    eps: float = 0.1
    area_step: float = 0.01
    n_segments: int = 100
    compactness: float = 10.0
    fill: Union[str, float] = "mean"
    batch_size: int = 8
    saliency: bool = True
    refine: bool = True
    greedy: str = "exact"


@dataclass
class NodeAnalysis:
    """The three views of one node of one model."""

    spec: NodeSpec
    node: Union[ImageNode, RoINode]
    erf: ERF
    locations: Union[SamplingLocations, BinLocations]
    saliency: Optional[SaliencyResult] = None
    extra: Dict[str, float] = field(default_factory=dict)


def pick_nodes(boxes: Tensor, size: Tuple[int, int], *, roi: bool = False,
               masks: Optional[Tensor] = None) -> List[NodeSpec]:
    """Nodes on the smallest object, the largest object and the background, from ground truth.

    Args:
        boxes: Tensor[N, 4] ground-truth boxes (x1, y1, x2, y2) in the prepared image's pixels.
        size: (h, w) of the prepared image.
        roi: RoI-wise nodes (the objects' boxes, and a background box of the median object size) instead of
            image-wise nodes (the boxes' centres, and a background point).
        masks: optional Tensor[N, h, w] object masks; the background point avoids them as well as the boxes.

    Returns:
        1-3 :class:`NodeSpec` (the large object is left out when the image has a single object).
    """
    h, w = size
    boxes = boxes.reshape(-1, 4).double()
    specs: List[NodeSpec] = []
    occupied = np.zeros((h, w), dtype=bool)
    if len(boxes):
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = [int(areas.argmin())] + ([int(areas.argmax())] if len(boxes) > 1 else [])
        for label, i in zip(("small object", "large object"), order):
            b = tuple(float(v) for v in boxes[i])
            if roi:
                specs.append(NodeSpec(label, "roi", box=b))
            else:
                specs.append(NodeSpec(label, "image", xy=((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)))
        for b in boxes.tolist():
            occupied[int(max(b[1], 0)):int(np.ceil(min(b[3], h))), int(max(b[0], 0)):int(np.ceil(min(b[2], w)))] = True
        if masks is not None and len(masks):
            occupied |= masks.bool().any(0).cpu().numpy()[:h, :w]
    from scipy.ndimage import distance_transform_edt

    # the background point farthest from every object (and from the image border, to keep its view inside)
    free = ~occupied
    free[[0, -1], :] = False
    free[:, [0, -1]] = False
    dist = distance_transform_edt(free)
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    cx, cy = float(x) + 0.5, float(y) + 0.5
    if roi:
        side = float(np.median(np.sqrt(areas.numpy()))) if len(boxes) else min(h, w) / 4
        half = max(side, 4.0) / 2
        specs.append(NodeSpec("background", "roi", box=(max(cx - half, 0.0), max(cy - half, 0.0),
                                                        min(cx + half, float(w)), min(cy + half, float(h)))))
    else:
        specs.append(NodeSpec("background", "image", xy=(cx, cy)))
    return specs


def make_node(model: nn.Module, prepared: PreparedImage, spec: NodeSpec, options: AnalysisOptions):
    """The :class:`ImageNode` / :class:`RoINode` of ``spec`` in ``model``."""
    if spec.kind == "image":
        return ImageNode(trunk_of(model), *spec.xy, layer=options.layer, channel=options.channel)
    if spec.kind == "roi":
        return RoINode(model, spec.box, prepared.size, channel=options.channel)
    raise ValueError(f"NodeSpec.kind must be 'image' or 'roi', got {spec.kind!r}")


def analyze_node(model: nn.Module, prepared: PreparedImage, spec: NodeSpec, options: AnalysisOptions, *,
                 segments: Optional[np.ndarray] = None, views: Sequence[str] = ("locations", "erf", "saliency")
                 ) -> NodeAnalysis:
    """Computes the views of one node (``views`` ⊆ locations, erf, saliency; saliency also needs
    ``options.saliency``). ``segments``: precomputed SLIC superpixels of the image (shared by all nodes)."""
    node = make_node(model, prepared, spec, options)
    x = prepared.tensor
    erf = effective_receptive_field(node, x, prepared.size)  # also fixes an image node's cell
    locations = None
    if "locations" in views:
        if node.kind == "image":
            locations = effective_sampling_locations(node, x, num_layers=options.num_layers)
        else:
            locations = effective_bin_locations(node, x)
    sal = None
    if "saliency" in views and options.saliency:
        aspect = node.aspect if node.kind == "roi" else 1.0
        if segments is None and options.refine:
            segments = slic_segments(prepared.rgb, options.n_segments, options.compactness)
        sal = saliency_region(node.response, x, size=prepared.size, center=node.center, aspect=aspect,
                              eps=options.eps, area_step=options.area_step, segments=segments,
                              fill=prepared.fill_value(options.fill), fill_name=options.fill,
                              batch_size=options.batch_size, refine=options.refine, greedy=options.greedy)
    return NodeAnalysis(spec=spec, node=node, erf=erf, locations=locations, saliency=sal)


def _show(ax, rgb: np.ndarray, title: Optional[str] = None) -> None:
    ax.imshow(rgb, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _draw_locations(ax, rgb: np.ndarray, a: NodeAnalysis) -> None:
    from matplotlib.patches import Rectangle

    _show(ax, rgb * 0.6 + 0.2)
    loc = a.locations
    h, w = rgb.shape[:2]
    if isinstance(loc, SamplingLocations):
        pts, wts = loc.points, loc.weights
        cx, cy = loc.center
    else:
        pts, wts = loc.centers, loc.weights
        x1, y1, x2, y2 = loc.box
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1.2))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    order = np.argsort(wts)
    rel = wts[order] / wts.max() if wts.max() > 0 else np.zeros_like(wts)
    # imshow puts pixel i's centre at i: continuous coordinates shift by -0.5
    ax.scatter(pts[order, 0] - 0.5, pts[order, 1] - 0.5, c=rel, cmap="autumn_r", vmin=0, vmax=1,
               s=2 + 14 * rel, linewidths=0, alpha=0.9)
    ax.plot([cx - 0.5], [cy - 0.5], marker="*", color="cyan", markersize=9, markeredgecolor="k", markeredgewidth=0.5)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def _draw_erf(ax, rgb: np.ndarray, a: NodeAnalysis) -> None:
    gray = rgb.mean(2, keepdims=True)
    heat = a.erf.heatmap_rgb()
    _show(ax, np.clip(0.35 * gray + 0.65 * heat, 0, 1))
    cx, cy = a.node.center
    ax.plot([cx - 0.5], [cy - 0.5], marker="*", color="white", markersize=8, markeredgecolor="k", markeredgewidth=0.5)


def _draw_saliency(ax, rgb: np.ndarray, a: NodeAnalysis) -> None:
    from matplotlib.patches import Rectangle

    if a.saliency is None:
        _show(ax, rgb * 0.3)
        ax.text(0.5, 0.5, "not computed", transform=ax.transAxes, ha="center", va="center", color="w", fontsize=7)
        return
    s = a.saliency
    shown = rgb * np.where(s.mask[..., None], 1.0, 0.2)
    _show(ax, shown)
    x1, y1, x2, y2 = s.rect
    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="yellow", lw=0.8, ls="--"))
    ax.text(0.02, 0.02, f"{100 * s.area_fraction:.0f}% of image, err {s.error:.3f}", transform=ax.transAxes,
            fontsize=6, color="w", va="bottom", bbox=dict(facecolor="k", alpha=0.5, pad=1, lw=0))


def draw_figure(results: Dict[str, List[NodeAnalysis]], images: Dict[str, PreparedImage], out: Union[str, Path], *,
                dpi: int = 100, title: Optional[str] = None) -> Path:
    """Writes the figure: 3 rows (locations, ERF, saliency) x (models x nodes) columns, to ``out`` (PNG).

    Args:
        results: model name -> its analyses (the same nodes for every model, in the same order).
        images: model name -> the prepared image the analyses ran on.
    """
    from dcnv2.engine.plots import pyplot, save_figure

    plt = pyplot()

    names = list(results)
    if not names or not all(results[n] for n in names):
        raise ValueError("results must hold at least one analysed node per model")
    cols = [(n, a) for n in names for a in results[n]]
    fig, axes = plt.subplots(3, len(cols), figsize=(1.9 * len(cols) + 0.6, 6.1), squeeze=False)
    for c, (name, a) in enumerate(cols):
        rgb = images[name].rgb.permute(1, 2, 0).numpy()
        _draw_locations(axes[0, c], rgb, a)
        axes[0, c].set_title(f"{name}\n{a.spec.label}", fontsize=7)
        _draw_erf(axes[1, c], rgb, a)
        _draw_saliency(axes[2, c], rgb, a)
    kinds = {a.node.kind for _, a in cols}
    first = "sampling locations" if kinds == {"image"} else ("bin locations" if kinds == {"roi"} else "locations")
    for r, label in enumerate((first, "effective receptive field", "saliency region")):
        axes[r, 0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, out, dpi=dpi)


def figure_for_models(models: Dict[str, nn.Module], image: Tensor, out: Union[str, Path], *,
                      specs: Optional[Sequence[NodeSpec]] = None, boxes: Optional[Tensor] = None,
                      masks: Optional[Tensor] = None, roi: bool = False,
                      options: Optional[AnalysisOptions] = None, progress=None, dpi: int = 100,
                      title: Optional[str] = None) -> Tuple[Path, Dict[str, List[NodeAnalysis]]]:
    """Analyses the same nodes in each model and draws the figure.

    Args:
        models: name -> detector (eval mode); all must resize ``image`` alike.
        image: Tensor[3, H, W] in [0, 1], original size.
        out: PNG path.
        specs: nodes in the *prepared* image's pixels; default: :func:`pick_nodes` from ``boxes`` / ``masks``
            (ground truth in original-image pixels).
        roi: with picked nodes, RoI-wise ones.
        options: :class:`AnalysisOptions`.
        progress: optional callable ``(done, total, label)`` called after each node.

    Returns:
        (out, {name: [NodeAnalysis]}).
    """
    options = options or AnalysisOptions()
    if not models:
        raise ValueError("models must name at least one detector")
    prepared = {name: prepare_image(m, image) for name, m in models.items()}
    first = next(iter(prepared.values()))
    if any(p.size != first.size for p in prepared.values()):
        raise ValueError("the models resize the image differently; analyse them in separate figures")
    if specs is None:
        if boxes is None:
            raise ValueError("give the nodes (specs) or the ground truth (boxes) to pick them from")
        sb = torch.tensor([first.box_to_input(b) for b in boxes.reshape(-1, 4).tolist()]).reshape(-1, 4)
        sm = None
        if masks is not None and len(masks):
            sm = torch.nn.functional.interpolate(masks[:, None].float(), size=first.size, mode="nearest")[:, 0]
        specs = pick_nodes(sb, first.size, roi=roi, masks=sm)
    segments = slic_segments(first.rgb, options.n_segments, options.compactness) \
        if options.saliency and options.refine else None
    results: Dict[str, List[NodeAnalysis]] = {}
    total, done = len(models) * len(specs), 0
    for name, model in models.items():
        results[name] = []
        for spec in specs:
            results[name].append(analyze_node(model, prepared[name], spec, options, segments=segments))
            done += 1
            if progress:
                progress(done, total, f"{name}: {spec.label}")
    return draw_figure(results, prepared, out, dpi=dpi, title=title), results
