"""ResNet / ResNeXt backbones with deformable 3x3 convolutions in any subset of stages c2–c5.

Built on torchvision's ResNet: :func:`dcn_resnet` makes one (optionally with ImageNet or local weights),
:func:`dilate_conv5` turns conv5 into the paper's stride-16 dilated stage, and
:func:`convert_to_deformable` swaps every 3x3 conv of the chosen stages for a (modulated) deformable
conv that keeps the conv's weights, so a pretrained model becomes a DCN model in one call. The new
offset/mask convs are zero-initialised: a freshly converted network computes exactly what it did before.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d

__all__ = ["BACKBONES", "STAGES", "dcn_resnet", "convert_to_deformable", "dilate_conv5", "load_backbone_weights",
           "move_stride_to_1x1", "parse_stages"]

# name -> (torchvision builder, torchvision weights enum)
BACKBONES: Dict[str, Tuple[Callable[..., tv_resnet.ResNet], type]] = {
    "resnet18": (tv_resnet.resnet18, tv_resnet.ResNet18_Weights),
    "resnet34": (tv_resnet.resnet34, tv_resnet.ResNet34_Weights),
    "resnet50": (tv_resnet.resnet50, tv_resnet.ResNet50_Weights),
    "resnet101": (tv_resnet.resnet101, tv_resnet.ResNet101_Weights),
    "resnet152": (tv_resnet.resnet152, tv_resnet.ResNet152_Weights),
    "resnext50_32x4d": (tv_resnet.resnext50_32x4d, tv_resnet.ResNeXt50_32X4D_Weights),
    "resnext101_32x8d": (tv_resnet.resnext101_32x8d, tv_resnet.ResNeXt101_32X8D_Weights),
}

# the paper's stage names -> torchvision ResNet attributes
STAGES: Dict[str, str] = {"c2": "layer1", "c3": "layer2", "c4": "layer3", "c5": "layer4"}

Weights = Union[None, str, os.PathLike, "torchvision.models.WeightsEnum"]  # noqa: F821


def parse_stages(stages: Iterable[Union[str, int]]) -> Tuple[str, ...]:
    """Normalises stage names: ``"c3"``, ``3``, ``"layer2"`` all mean conv3. Returns sorted ``("c3", ...)``."""
    if isinstance(stages, (str, int)):
        stages = (stages,)
    out = set()
    for s in stages:
        if isinstance(s, bool):
            raise TypeError(f"stages must be names like 'c3' or ints 2..5, got {s!r}")
        if isinstance(s, int) and 2 <= s <= 5:
            out.add(f"c{s}")
        elif isinstance(s, str) and s.lower() in STAGES:
            out.add(s.lower())
        elif isinstance(s, str) and s in STAGES.values():
            out.add(next(k for k, v in STAGES.items() if v == s))
        else:
            raise ValueError(f"unknown stage {s!r}: expected one of {list(STAGES)} (or 2..5, or layer1..layer4)")
    return tuple(sorted(out))


def convert_to_deformable(
    resnet: nn.Module,
    stages: Iterable[Union[str, int]],
    modulated: bool = True,
    offset_groups: int = 1,
    preserve: bool = False,
) -> nn.Module:
    """Replaces every 3x3 ``nn.Conv2d`` of ``stages`` by a deformable conv carrying the same weights.

    Bottleneck blocks have one 3x3 conv (``conv2``), BasicBlocks two (``conv1``, ``conv2``). Stride,
    padding, dilation and groups are kept; the offset (and mask) conv is zero-initialised, so the converted
    network computes the same function (DCNv2 layers scale by the initial mask 0.5, see the note below).

    Args:
        resnet: a torchvision ``ResNet`` (or anything with ``layer1``..``layer4``), modified in place.
        stages: subset of ``"c2"``..``"c5"`` (or ints 2..5).
        modulated: DCNv2 ``ModulatedDeformConv2d`` if True, DCNv1 ``DeformConv2d`` otherwise.
        offset_groups: offset groups of each layer (must divide its input channels).
        preserve: make each modulated layer compute exactly what the conv did, by doubling its weight
            (0.5 x 2w = w). For fine-tuning a trained network (a COCO detector, frozen BN) into DCNv2 from its
            accuracy. Without it (the default, the paper's initialisation, for training from ImageNet), a
            modulated layer starts at half the conv's output. DCNv1 layers are exact either way.

    Returns:
        ``resnet`` itself. Convs that already are deformable are left alone.

    Note: a fresh modulated layer multiplies every tap by sigmoid(0) = 0.5, as the paper's initialisation
    prescribes, so under frozen BatchNorm ``preserve=False`` halves every converted conv's contribution.
    """
    cls = ModulatedDeformConv2d if modulated else DeformConv2d
    for stage in parse_stages(stages):
        layer = getattr(resnet, STAGES[stage], None)
        if layer is None:
            raise ValueError(f"the model has no {STAGES[stage]} ({stage}) to convert")
        for block in layer:
            for name, conv in list(block.named_children()):
                if not (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (3, 3)):
                    continue
                if conv.in_channels % offset_groups:
                    raise ValueError(f"offset_groups={offset_groups} must divide the {conv.in_channels} input "
                                     f"channels of {stage} {name}")
                dcn = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                          bias=conv.bias is not None, offset_groups=offset_groups)
                dcn = dcn.to(device=conv.weight.device, dtype=conv.weight.dtype)
                with torch.no_grad():
                    dcn.weight.copy_(conv.weight * 2 if preserve and modulated else conv.weight)
                    if conv.bias is not None:
                        dcn.bias.copy_(conv.bias)
                dcn.weight.requires_grad_(conv.weight.requires_grad)
                setattr(block, name, dcn)
    return resnet


def dilate_conv5(resnet: nn.Module, dilation: int = 2) -> nn.Module:
    """Makes conv5 (``layer4``) run at the stride of conv4 with dilated 3x3 convs, in place.

    As torchvision's ``replace_stride_with_dilation`` (which only Bottleneck supports): the strided conv
    and the downsample shortcut of the first block get stride 1, the first block's strided 3x3 conv keeps
    dilation 1 and every later 3x3 conv gets ``dilation`` (padding = dilation). Works for BasicBlock too.
    Weights are unchanged, so it can be applied to a pretrained network.
    """
    if not isinstance(dilation, int) or isinstance(dilation, bool) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")
    layer = resnet.layer4
    first_strided_seen = False
    for i, block in enumerate(layer):
        for name, conv in block.named_children():
            if isinstance(conv, (nn.Conv2d, DeformConv2d, ModulatedDeformConv2d)) and tuple(conv.kernel_size) == (3, 3):
                strided = i == 0 and not first_strided_seen and tuple(conv.stride) != (1, 1)
                if strided:
                    first_strided_seen = True
                    _set_geometry(conv, stride=1, dilation=1)
                else:
                    _set_geometry(conv, stride=None, dilation=dilation)
        if block.downsample is not None:
            for m in block.downsample.modules():
                if isinstance(m, nn.Conv2d):
                    m.stride = (1, 1)
    return resnet


def move_stride_to_1x1(resnet: nn.Module) -> nn.Module:
    """Puts each stage's downsampling stride on the first block's 1x1 ``conv1`` instead of its 3x3 ``conv2``,
    in place: the original MSRA ResNet that detectron2's ImageNet weights use (``RESNETS.STRIDE_IN_1X1``).

    Bottleneck blocks only; a stage whose 3x3 conv runs at stride 1 (a dilated conv5) is left alone. Weights
    are unchanged.
    """
    for stage in ("layer2", "layer3", "layer4"):
        block = getattr(resnet, stage)[0]
        if not hasattr(block, "conv3"):
            raise ValueError("stride_in_1x1 applies to Bottleneck ResNets (resnet50 and deeper), not BasicBlock ones")
        if tuple(block.conv2.stride) == (1, 1):
            continue
        stride = block.conv2.stride
        block.conv1.stride = stride
        for m in [block.conv2] + ([block.conv2.conv_offset] if hasattr(block.conv2, "conv_offset") else []):
            m.stride = (1, 1)
    return resnet


def _set_geometry(conv: nn.Module, stride: Optional[int], dilation: int) -> None:
    mods = [conv] + ([conv.conv_offset] if hasattr(conv, "conv_offset") else [])
    for m in mods:
        if stride is not None:
            m.stride = (stride, stride)
        m.dilation = (dilation, dilation)
        m.padding = (dilation, dilation)


def _state_dict_from_file(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict):
        for key in ("model", "state_dict"):  # common checkpoint wrappers
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> Tensor)")
    # DataParallel / DDP prefixes
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def resolve_weights(name: str, weights: Weights):
    """Returns a state dict for ``weights``: a torchvision weights enum (or its name, e.g.
    ``"IMAGENET1K_V1"`` / ``"DEFAULT"``), downloaded by torchvision, or the path of a local state dict."""
    if weights is None:
        return None
    _, enum = BACKBONES[name]
    if isinstance(weights, (str, os.PathLike)) and Path(weights).is_file():
        return _state_dict_from_file(weights)
    if isinstance(weights, str):
        try:
            weights = enum.verify(weights)
        except (ValueError, KeyError):
            looks_like_path = os.sep in weights or weights.endswith((".pt", ".pth", ".bin"))
            if looks_like_path:
                raise FileNotFoundError(f"backbone weights file {weights!r} not found") from None
            names = [w.name for w in enum] + ["DEFAULT"]
            raise ValueError(f"weights for {name} must be a state-dict path or one of {names}, got {weights!r}") from None
    elif isinstance(weights, os.PathLike):
        raise FileNotFoundError(f"backbone weights file {os.fspath(weights)!r} not found")
    else:
        weights = enum.verify(weights)
    return weights.get_state_dict(progress=True, check_hash=True)


def load_backbone_weights(resnet: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Loads a (regular or DCN) ResNet state dict; only offset/mask convs may be missing (they stay zero).

    Raises ValueError naming the offending keys on any other mismatch.
    """
    missing, unexpected = resnet.load_state_dict(state_dict, strict=False)
    bad_missing = [k for k in missing if ".conv_offset." not in k]
    if bad_missing or unexpected:
        raise ValueError(f"backbone state dict does not fit: missing {bad_missing[:5]}{'...' if len(bad_missing) > 5 else ''}, "
                         f"unexpected {list(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}")


def dcn_resnet(
    name: str = "resnet50",
    *,
    deform_stages: Sequence[Union[str, int]] = (),
    modulated: bool = True,
    offset_groups: int = 1,
    conv5_dilation: bool = False,
    weights: Weights = None,
    norm_layer: Optional[Callable[[int], nn.Module]] = None,
    stride_in_1x1: bool = False,
) -> tv_resnet.ResNet:
    """A torchvision ResNet/ResNeXt with deformable 3x3 convs in ``deform_stages``.

    Args:
        name: one of :data:`BACKBONES`.
        deform_stages: subset of ``"c2"``..``"c5"`` whose 3x3 convs become deformable.
        modulated: DCNv2 (True) or DCNv1 (False) layers.
        offset_groups: offset groups of every deformable layer.
        conv5_dilation: conv5 at stride 16 with dilation 2 (the paper's Faster R-CNN trunk).
        weights: torchvision weights enum / name (downloads) or a local state-dict path (a regular
            ResNet's loads unchanged; offset convs stay zero), or None.
        norm_layer: e.g. ``torchvision.ops.misc.FrozenBatchNorm2d``; default ``nn.BatchNorm2d``.
        stride_in_1x1: downsample in each stage's first 1x1 conv (:func:`move_stride_to_1x1`, detectron2's
            MSRA weights) instead of torchvision's 3x3.

    Returns:
        The ResNet (with its ``fc``; detectors only use ``conv1``..``layer4``).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
    builder, _ = BACKBONES[name]
    state_dict = resolve_weights(name, weights)
    model = builder(weights=None, norm_layer=norm_layer)
    if conv5_dilation:
        dilate_conv5(model)
    if stride_in_1x1:
        move_stride_to_1x1(model)
    convert_to_deformable(model, deform_stages, modulated=modulated, offset_groups=offset_groups)
    if state_dict is not None:
        load_backbone_weights(model, state_dict)
    return model
