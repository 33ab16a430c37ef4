"""The nodes the spatial-support analysis looks at, and the model input they are measured on.

Two kinds of node (sec. 2.1 of the paper):

* :class:`ImageNode` — one location of a feature map (by default the output of the last layer of conv5,
  ``layer4`` of the ResNet trunk). Its response is the channel vector at that location, or one channel.
* :class:`RoINode` — the box head's 2fc feature (``rcnn_features``) of one box. Its response is that
  1024-d (or ``representation_size``) vector, or one of its entries.

Both expose ``response(x)``: a batch of model inputs Tensor[B, 3, H, W] (normalised, padded, as the
detector's ``GeneralizedRCNNTransform`` produces them) -> Tensor[B, D]. Every view of the analysis (ERF,
sampling locations, saliency) is a function of that callable, so regular and deformable, paper and FPN
detectors are handled alike. Coordinates are pixels of the transformed image (:class:`PreparedImage`),
``(x, y)`` with pixel ``i`` covering ``[i, i + 1)``.

:func:`load_analysis_model` rebuilds a detector from a ``dcnv2 train`` checkpoint of any preset; the
training-only feature-mimicking branch (``mimic.*``) is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["PreparedImage", "prepare_image", "ImageNode", "RoINode", "load_analysis_model", "trunk_of",
           "default_layer", "MIMIC_PREFIX"]

from dcnv2.models.mimic import TRAINING_ONLY_PREFIX as MIMIC_PREFIX  # the training-only mimicking branch


def load_analysis_model(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """The detector of a ``dcnv2 train`` checkpoint, in eval mode, without its training-only mimicking branch.

    Returns:
        (model, spec): the detector and its :class:`dcnv2.engine.config.ModelSpec`.

    Raises:
        FileNotFoundError / ValueError: as :func:`dcnv2.engine.checkpoint.load_checkpoint`; ValueError when
            the checkpoint has no ``model_spec``.
    """
    from dcnv2.engine.predict import load_model

    return load_model(checkpoint, device)  # rebuilds the inference model: no mimicking branch


@dataclass
class PreparedImage:
    """An image as the detector sees it.

    Attributes:
        tensor: Tensor[1, 3, H, W], resized, normalised and padded by the detector's transform.
        size: (h, w) of the resized image inside ``tensor`` (the rest is padding).
        scale: (sy, sx), resized size / original size: multiply original coordinates by it.
        rgb: Tensor[3, h, w] in [0, 1], the resized image (for display and superpixels).
        mean, std: Tensor[3], the transform's normalisation.
    """

    tensor: Tensor
    size: Tuple[int, int]
    scale: Tuple[float, float]
    rgb: Tensor
    mean: Tensor
    std: Tensor

    def to_input(self, x: float, y: float) -> Tuple[float, float]:
        """Original-image pixel coordinates -> this tensor's."""
        return x * self.scale[1], y * self.scale[0]

    def box_to_input(self, box: Sequence[float]) -> Tuple[float, float, float, float]:
        sy, sx = self.scale
        x1, y1, x2, y2 = (float(v) for v in box)
        return x1 * sx, y1 * sy, x2 * sx, y2 * sy

    def fill_value(self, fill: Union[str, float]) -> Tensor:
        """The normalised value Tensor[3] that masked pixels take: ``"mean"`` (0 after normalisation, i.e. the
        data set's mean colour), ``"zero"`` (a black pixel, ``-mean / std``), or a number (after normalisation)."""
        if isinstance(fill, str):
            if fill == "mean":
                return torch.zeros(3, dtype=self.tensor.dtype)
            if fill == "zero":
                return (-self.mean / self.std).to(self.tensor.dtype)
            raise ValueError(f"fill must be 'mean', 'zero' or a number, got {fill!r}")
        if isinstance(fill, bool) or not isinstance(fill, (int, float)):
            raise TypeError(f"fill must be 'mean', 'zero' or a number, got {type(fill).__name__}")
        return torch.full((3,), float(fill), dtype=self.tensor.dtype)


@torch.no_grad()
def prepare_image(model: nn.Module, image: Tensor) -> PreparedImage:
    """Runs the detector's own transform (resize, normalise, pad) on ``image`` Tensor[3, H0, W0] in [0, 1]."""
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a Tensor[3, H, W] in [0, 1], got {got}")
    device = next(model.parameters()).device
    transform = model.transform
    was_training = transform.training
    transform.eval()
    try:
        images, _ = transform([image.to(device)])
    finally:
        transform.train(was_training)
    h, w = images.image_sizes[0]
    mean = torch.as_tensor(transform.image_mean, dtype=torch.float32)
    std = torch.as_tensor(transform.image_std, dtype=torch.float32)
    tensor = images.tensors.detach()
    rgb = (tensor[0, :, :h, :w].cpu() * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
    scale = (h / image.shape[1], w / image.shape[2])
    return PreparedImage(tensor, (int(h), int(w)), scale, rgb, mean, std)


def trunk_of(model: nn.Module) -> nn.Module:
    """The convolutional trunk of a detector: ``backbone.body`` (ResNet, paper or FPN) or the backbone itself."""
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "body", backbone)


def default_layer(trunk: nn.Module) -> str:
    """``"layer4"`` (conv5's last block output) when the trunk has it, else its last child with parameters."""
    names = dict(trunk.named_children())
    if "layer4" in names:
        return "layer4"
    with_params = [n for n, m in trunk.named_children() if any(True for _ in m.parameters())]
    if not with_params:
        raise ValueError("the trunk has no layer with parameters to place an image-wise node on")
    return with_params[-1]


class _Stop(Exception):
    """Raised by the capture hook: nothing after the node's layer needs computing."""


class ImageNode:
    """A location of the feature map output by ``layer`` of ``trunk``.

    Args:
        trunk: the module run on the input (a detector's :func:`trunk_of`, or any CNN).
        x, y: the location in input pixels; the node is the feature cell containing it.
        layer: a module name of ``trunk`` (``dict(trunk.named_modules())``); default :func:`default_layer`.
        channel: respond with this channel only (default: the whole channel vector).
    """

    kind = "image"

    def __init__(self, trunk: nn.Module, x: float, y: float, *, layer: Optional[str] = None,
                 channel: Optional[int] = None) -> None:
        self.trunk = trunk
        self.layer = layer or default_layer(trunk)
        modules = dict(trunk.named_modules())
        if self.layer not in modules:
            raise ValueError(f"layer {self.layer!r} is not a module of the trunk; some of its modules: "
                             f"{[n for n in modules if n and '.' not in n]}")
        self.module = modules[self.layer]
        self.x, self.y = float(x), float(y)
        if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 0):
            raise ValueError(f"channel must be None or a non-negative int, got {channel!r}")
        self.channel = channel
        self.cell: Optional[Tuple[int, int]] = None        # (row, col) on the feature map, set by response()
        self.stride: Optional[Tuple[float, float]] = None  # input pixels per feature cell (y, x)

    @property
    def center(self) -> Tuple[float, float]:
        """The centre (x, y) of the node's feature cell in input pixels (the given point before a response)."""
        if self.cell is None:
            return self.x, self.y
        return (self.cell[1] + 0.5) * self.stride[1], (self.cell[0] + 0.5) * self.stride[0]

    def feature_map(self, x: Tensor) -> Tensor:
        """The output Tensor[B, C, h, w] of the node's layer (the trunk is run only up to it)."""
        captured = {}

        def hook(_module, _inputs, output):
            captured["out"] = output
            raise _Stop

        handle = self.module.register_forward_hook(hook)
        try:
            self.trunk(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "out" not in captured:
            raise RuntimeError(f"layer {self.layer!r} was not run by the trunk's forward")
        out = captured["out"]
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise ValueError(f"layer {self.layer!r} must output a Tensor[B, C, h, w], got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        return out

    def response(self, x: Tensor) -> Tensor:
        """Args: x Tensor[B, 3, H, W]. Returns Tensor[B, C] (or Tensor[B, 1] with ``channel``)."""
        fmap = self.feature_map(x)
        h, w = fmap.shape[-2:]
        self.stride = (x.shape[-2] / h, x.shape[-1] / w)
        if not (0 <= self.x < x.shape[-1] and 0 <= self.y < x.shape[-2]):
            # never move a node elsewhere silently: the figure would be labelled with the requested place
            raise ValueError(f"image node ({self.x:g}, {self.y:g}) is outside the {x.shape[-1]}x{x.shape[-2]} input: "
                             f"x must be in [0, {x.shape[-1]}) and y in [0, {x.shape[-2]}) (the {self.layer!r} "
                             f"map is {w}x{h} cells)")
        row = min(int(self.y // self.stride[0]), h - 1)
        col = min(int(self.x // self.stride[1]), w - 1)
        self.cell = (row, col)
        vec = fmap[:, :, row, col]
        if self.channel is not None:
            if self.channel >= vec.shape[1]:
                raise ValueError(f"channel {self.channel} out of range: layer {self.layer!r} has {vec.shape[1]}")
            vec = vec[:, self.channel:self.channel + 1]
        return vec

    def describe(self) -> str:
        return f"image node ({self.x:.0f}, {self.y:.0f}) of {self.layer}"


class RoINode:
    """The box head's 2fc feature of ``box`` (x1, y1, x2, y2 in input pixels) in a torchvision-style detector.

    Args:
        model: a detector with ``backbone``, ``roi_heads.box_roi_pool`` and ``roi_heads.box_head`` (all of
            ``dcnv2.models``'; ``rcnn_features`` is used when the model has it).
        box: the RoI in input pixels.
        image_size: (h, w) of the resized image (``PreparedImage.size``): the pooling's scale reference.
        channel: respond with this entry of the feature only.
    """

    kind = "roi"

    def __init__(self, model: nn.Module, box: Sequence[float], image_size: Tuple[int, int], *,
                 channel: Optional[int] = None) -> None:
        box = tuple(float(v) for v in box)
        if len(box) != 4 or not all(torch.isfinite(torch.tensor(box))) or not (box[2] > box[0] and box[3] > box[1]):
            raise ValueError(f"box must be 4 finite numbers x1, y1, x2, y2 with x2 > x1 and y2 > y1, got {box!r}")
        for attr in ("backbone", "roi_heads"):
            if not hasattr(model, attr):
                raise TypeError(f"an RoI node needs a detector with {attr!r}, got {type(model).__name__}")
        self.model = model
        self.box = box
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 0):
            raise ValueError(f"channel must be None or a non-negative int, got {channel!r}")
        self.channel = channel

    @property
    def center(self) -> Tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def aspect(self) -> float:
        """Width / height of the box."""
        x1, y1, x2, y2 = self.box
        return (x2 - x1) / (y2 - y1)

    def boxes(self, batch: int, like: Tensor) -> list:
        return [torch.tensor([self.box], dtype=like.dtype, device=like.device)] * batch

    def head(self, pooled: Tensor) -> Tensor:
        """Box head on pooled RoI features, then the channel selection."""
        vec = self.model.roi_heads.box_head(pooled)
        if self.channel is not None:
            if self.channel >= vec.shape[1]:
                raise ValueError(f"channel {self.channel} out of range: the box head has {vec.shape[1]} outputs")
            vec = vec[:, self.channel:self.channel + 1]
        return vec

    def response(self, x: Tensor) -> Tensor:
        """Args: x Tensor[B, 3, H, W]. Returns Tensor[B, D] (or Tensor[B, 1] with ``channel``)."""
        features = self.model.backbone(x)
        if isinstance(features, Tensor):
            features = {"0": features}
        pooled = self.model.roi_heads.box_roi_pool(features, self.boxes(x.shape[0], x), [self.image_size] * x.shape[0])
        return self.head(pooled)

    def describe(self) -> str:
        return "RoI node (" + ", ".join(f"{v:.0f}" for v in self.box) + ")"


Node = Union[ImageNode, RoINode]


def scalar_response(node: Any, x: Tensor) -> Tensor:
    """The scalar whose gradient the ERF and the sampling/bin locations show: the sum of the response vector
    (Luo et al.'s unit gradient at the node on every channel; post-ReLU features make it the L1 norm)."""
    return node.response(x).sum()
