"""What a peer's ResNet-FPN detector is made of, read from its state dict's names and shapes.

Shared by the mmdetection and detectron2 importers: the ResNet depth and width (blocks per stage, groups
of the 3x3 convs), which stages are deformable (DCNv1 or modulated, offset groups), and the preset of ours
that has the same structure (a named one of :data:`dcnv2.models.presets.PRESETS` when one matches, else a
custom :class:`DetectorPreset` stored in the checkpoint's ``ModelSpec.preset_fields``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

from torch import Tensor

from dcnv2.models.presets import PRESETS, DetectorPreset
from dcnv2.zoo.keymap import ConversionError

__all__ = ["Trunk", "read_trunk", "match_preset"]

# (blocks per stage, groups, width of layer1's 3x3 conv) -> our backbone name
_BACKBONES = {
    ((3, 4, 6, 3), 1, 64): "resnet50",
    ((3, 4, 23, 3), 1, 64): "resnet101",
    ((3, 8, 36, 3), 1, 64): "resnet152",
    ((3, 4, 6, 3), 32, 128): "resnext50_32x4d",
    ((3, 4, 23, 3), 32, 256): "resnext101_32x8d",
}
STAGE_NAMES = ("c2", "c3", "c4", "c5")


@dataclasses.dataclass
class Trunk:
    backbone: str
    deform_stages: Tuple[str, ...]
    modulated: bool
    offset_groups: int


def read_trunk(sd: Dict[str, Tensor], block_key: Callable[[int, int], str], offset_suffix: str,
               origin: str, dcn_type: Optional[str] = None) -> Trunk:
    """Reads the trunk's structure.

    Args:
        sd: the peer's state dict.
        block_key: (stage 1..4, block index) -> the block's key prefix, e.g. ``backbone.layer2.0.``.
        offset_suffix: the block's offset conv weight under that prefix (``conv2.conv_offset.weight`` /
            ``conv2_offset.weight``).
        origin: for messages.
        dcn_type: "v1" / "v2" when the checkpoint's config says so; otherwise inferred from the offset conv's
            channels (2 x 9 G for DCNv1, 3 x 9 G for DCNv2; a count that fits both takes the power-of-two G).
    """
    blocks = []
    for stage in range(1, 5):
        n = 0
        while any(k.startswith(block_key(stage, n)) for k in sd):
            n += 1
        if n == 0:
            raise ConversionError(f"{origin} has no ResNet stage {stage} ({block_key(stage, 0)}...)")
        blocks.append(n)
    conv2 = sd.get(block_key(1, 0) + "conv2.weight")
    if conv2 is None or conv2.dim() != 4:
        raise ConversionError(f"{origin}: {block_key(1, 0)}conv2.weight is missing: only Bottleneck ResNets "
                              "(ResNet-50 and deeper, ResNeXt) are supported")
    width, groups = int(conv2.shape[0]), int(conv2.shape[0] // conv2.shape[1])
    key = (tuple(blocks), groups, width)
    if key not in _BACKBONES:
        raise ConversionError(f"{origin}: a ResNet with {blocks} blocks, {groups} groups and width {width} is not "
                              f"among dcnv2's backbones ({sorted(set(_BACKBONES.values()))})")
    stages: List[str] = []
    kinds = set()
    for stage in range(1, 5):
        has = [block_key(stage, i) + offset_suffix in sd for i in range(blocks[stage - 1])]
        if any(has) and not all(has):
            raise ConversionError(f"{origin}: only some blocks of stage {STAGE_NAMES[stage - 1]} are deformable; "
                                  "dcnv2 makes every 3x3 conv of a stage deformable")
        if all(has):
            stages.append(STAGE_NAMES[stage - 1])
            out = int(sd[block_key(stage, 0) + offset_suffix].shape[0])
            kinds.add(_dcn_kind(out, dcn_type, origin))
    if len(kinds) > 1:
        raise ConversionError(f"{origin}: its deformable stages mix DCNv1 and DCNv2 or offset groups {kinds}; "
                              "dcnv2's presets use one kind throughout")
    modulated, offset_groups = kinds.pop() if kinds else (False, 1)
    return Trunk(_BACKBONES[key], tuple(stages), modulated, offset_groups)


def _dcn_kind(channels: int, dcn_type: Optional[str], origin: str) -> Tuple[bool, int]:
    fits = {True: channels // 27 if channels % 27 == 0 else 0, False: channels // 18 if channels % 18 == 0 else 0}
    if dcn_type in ("v1", "v2"):
        modulated = dcn_type == "v2"
        if not fits[modulated]:
            raise ConversionError(f"{origin}: an offset conv with {channels} channels is not DCN{dcn_type}'s")
        return modulated, fits[modulated]
    candidates = [m for m in (True, False) if fits[m]]
    if len(candidates) == 2:  # e.g. 54 = 3 x 18 = 2 x 27: the power-of-two group count wins
        candidates = [m for m in candidates if fits[m] & (fits[m] - 1) == 0] or [True]
    if not candidates:
        raise ConversionError(f"{origin}: an offset conv with {channels} output channels is neither DCNv1's "
                              "(18 per offset group) nor DCNv2's (27 per group)")
    return candidates[0], fits[candidates[0]]


def match_preset(trunk: Trunk, box_pool: str, mask_pool: str, mdpool_hidden: int = 1024) -> Tuple[str, Dict]:
    """Our preset with this structure: (name, {}) for a built-in preset, else (a descriptive name, the
    DetectorPreset fields to store in ``ModelSpec.preset_fields``)."""
    wanted = DetectorPreset("converted", deform_stages=trunk.deform_stages, modulated=trunk.modulated,
                            offset_groups=trunk.offset_groups, box_pool=box_pool, mask_pool=mask_pool,
                            mdpool_hidden=mdpool_hidden)
    same = ("deform_stages", "modulated", "offset_groups", "box_pool", "mask_pool", "mdpool_hidden", "gamma")
    for name, preset in PRESETS.items():
        if preset.mimic == "none" and all(getattr(preset, f) == getattr(wanted, f) for f in same):
            return name, {}
    if trunk.deform_stages:
        ids = [int(s[1]) for s in trunk.deform_stages]
        contiguous = ids == list(range(ids[0], ids[-1] + 1))
        span = f"c{ids[0]}c{ids[-1]}" if contiguous and len(ids) > 1 else "+".join(trunk.deform_stages)
        name = ("mdconv-" if trunk.modulated else "dconv-") + span
        if trunk.offset_groups > 1:
            name += f"-g{trunk.offset_groups}"
    else:
        name = "regular"
    pools = box_pool if box_pool == mask_pool else f"{box_pool}+{mask_pool}"
    if pools != "align":
        name += f"-{pools}"
    fields = {f.name: getattr(wanted, f.name) for f in dataclasses.fields(DetectorPreset) if f.name not in ("name", "base")}
    fields["deform_stages"] = list(fields["deform_stages"])
    fields["description"] = f"converted: {name}"
    return name, fields
