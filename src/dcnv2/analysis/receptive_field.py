"""Effective receptive field (Luo et al. 2016; sec. 2.1 of the paper): the gradient of a node's response with
respect to the input pixels, as a map and as a heat map."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["ERF", "effective_receptive_field", "mass_inside"]


@dataclass
class ERF:
    """An effective receptive field.

    Attributes:
        gradient: Tensor[3, h, w], d(response) / d(input pixel), signed, per colour channel (normalised input).
        map: np.ndarray[h, w] float, ``|gradient|`` summed over the colour channels: the ERF.
        response: Tensor[D], the node's response on the unmasked image.
    """

    gradient: Tensor
    map: np.ndarray
    response: Tensor

    @property
    def heat(self) -> np.ndarray:
        """np.ndarray[h, w] in [0, 1]: the map divided by its maximum (all zeros when the map is)."""
        peak = float(self.map.max()) if self.map.size else 0.0
        return self.map / peak if peak > 0 else np.zeros_like(self.map)

    def heatmap_rgb(self, cmap: str = "jet") -> np.ndarray:
        """np.ndarray[h, w, 3] in [0, 1]: the heat map through a matplotlib colour map."""
        from matplotlib import colormaps

        return colormaps[cmap](self.heat)[..., :3]

    def centroid(self) -> Tuple[float, float]:
        """The ERF's centre of mass (x, y) in input pixels (pixel i's centre at i + 0.5)."""
        total = float(self.map.sum())
        if total <= 0:
            return float("nan"), float("nan")
        ys, xs = np.mgrid[0:self.map.shape[0], 0:self.map.shape[1]]
        return float((self.map * (xs + 0.5)).sum() / total), float((self.map * (ys + 0.5)).sum() / total)


def effective_receptive_field(node, x: Tensor, size: Optional[Tuple[int, int]] = None) -> ERF:
    """The ERF of ``node`` on the input ``x``.

    Args:
        node: an :class:`~dcnv2.analysis.nodes.ImageNode` / :class:`~dcnv2.analysis.nodes.RoINode` (anything
            with ``response(x) -> Tensor[B, D]``).
        x: Tensor[1, 3, H, W], the model input (``PreparedImage.tensor``).
        size: (h, w) of the image inside the padded input; the maps are cropped to it (default: all of x).

    Returns:
        :class:`ERF` of the scalar ``response.sum()`` (one channel's gradient if the node selects one).
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"x must be a Tensor[1, C, H, W], got {tuple(x.shape) if isinstance(x, Tensor) else x!r}")
    h, w = size or tuple(x.shape[-2:])
    inp = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        vec = node.response(inp)
        vec.sum().backward()
    grad = inp.grad[0, :, :h, :w].detach().cpu()
    return ERF(gradient=grad, map=grad.abs().sum(0).double().numpy(), response=vec[0].detach().cpu())


def mass_inside(erf_map: np.ndarray, region: np.ndarray) -> float:
    """Fraction of the ERF's mass (sum of ``erf_map``) inside the boolean ``region`` [h, w]; NaN for a zero map."""
    if erf_map.shape != region.shape:
        raise ValueError(f"region must have the ERF's shape {erf_map.shape}, got {region.shape}")
    total = float(erf_map.sum())
    if total <= 0:
        return float("nan")
    return float(erf_map[region.astype(bool)].sum() / total)

