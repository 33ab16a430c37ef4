"""The paper's ablation configurations (Table 1 rows) as dataclasses, and the ``PRESETS`` dict the CLI reads.

A preset says which backbone stages get deformable convs (DCNv1 or modulated DCNv2) and which RoI pooling
the box head (7x7) and the mask head (14x14) use:

=====================  ==================================  ===============================
preset                 Table 1 row                         convs / RoI pooling
=====================  ==================================  ===============================
regular-roipool        regular (RoIpooling)                none / RoIPool
regular                regular (aligned RoIpooling)        none / RoIAlign
dcnv1                  DCNv1 (dconv@c5 + dpool)            DCNv1 c5 / deformable RoI pooling
dconv-c5               dconv@c5                            DCNv1 c5 / RoIAlign
dconv-c4c5             dconv@c4~c5                         DCNv1 c4–c5 / RoIAlign
dconv-c3c5             dconv@c3~c5                         DCNv1 c3–c5 / RoIAlign
dconv-c3c5-dpool       dconv@c3~c5 + dpool                 DCNv1 c3–c5 / deformable RoI pooling
mdconv-c3c5            mdconv@c3~c5                        DCNv2 c3–c5 / RoIAlign
mdconv-c3c5-mdpool     mdconv@c3~c5 + mdpool               DCNv2 c3–c5 / modulated deformable RoI pooling
=====================  ==================================  ===============================

and Table 3's R-CNN feature mimicking (training only; inference is the base preset's detector):

=====================  ==================================  ===============================
preset                 Table 3 row                         base preset + mimicked regions
=====================  ==================================  ===============================
regular-mimic          regular + FG only                   regular + fg
dcnv2                  DCNv2 (mdconv + mdpool, FG only)    mdconv-c3c5-mdpool + fg
dcnv2-fgbg             DCNv2, FG + BG                      mdconv-c3c5-mdpool + fg+bg
dcnv2-bg               DCNv2, BG only                      mdconv-c3c5-mdpool + bg
=====================  ==================================  ===============================
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Tuple, Union

from dcnv2.models.mimic import MIMIC_REGIONS
from dcnv2.models.resnet import parse_stages

__all__ = ["POOL_TYPES", "DetectorPreset", "PRESETS", "get_preset"]

# "roipool": torchvision roi_pool; "align": roi_align (aligned=True); "dpool" / "mdpool": dcnv2.nn layers
POOL_TYPES = ("roipool", "align", "dpool", "mdpool")


@dataclass(frozen=True)
class DetectorPreset:
    """Everything a preset changes in a detector (the rest comes from the builder's arguments).

    Attributes:
        name: the preset's name (a key of :data:`PRESETS` for the built-in ones).
        description: the Table 1 row it reproduces.
        deform_stages: backbone stages (``"c2"``..``"c5"``) whose 3x3 convs are deformable.
        modulated: DCNv2 modulated deformable convs (True) or DCNv1 (False).
        offset_groups: offset groups of the deformable convs.
        box_pool: 7x7 box RoI pooling, one of :data:`POOL_TYPES`.
        mask_pool: 14x14 mask RoI pooling (Mask R-CNN), one of :data:`POOL_TYPES`.
        mdpool_hidden: width of the two hidden fc layers of the modulated RoI pooling offset branch.
        gamma: offset scale of the deformable RoI pooling (0.1 in the paper).
        mimic: R-CNN feature mimicking on the head's ``"fg"``, ``"fg+bg"`` or ``"bg"`` RoIs, or ``"none"``
            (:mod:`dcnv2.models.mimic`; patch size, RoI count and loss weights are builder options).
        base: the preset whose inference model this one trains (itself when it adds no training-only part).
    """

    name: str
    description: str = ""
    deform_stages: Tuple[str, ...] = ()
    modulated: bool = False
    offset_groups: int = 1
    box_pool: str = "align"
    mask_pool: str = "align"
    mdpool_hidden: int = 1024
    gamma: float = 0.1
    mimic: str = "none"
    base: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "deform_stages", parse_stages(self.deform_stages))
        if self.mimic not in MIMIC_REGIONS:
            raise ValueError(f"mimic must be one of {MIMIC_REGIONS}, got {self.mimic!r}")
        if not self.base:
            object.__setattr__(self, "base", self.name)
        for field in ("box_pool", "mask_pool"):
            if getattr(self, field) not in POOL_TYPES:
                raise ValueError(f"{field} must be one of {POOL_TYPES}, got {getattr(self, field)!r}")
        if not isinstance(self.offset_groups, int) or isinstance(self.offset_groups, bool) or self.offset_groups < 1:
            raise ValueError(f"offset_groups must be a positive int, got {self.offset_groups!r}")

    def replace(self, **changes) -> "DetectorPreset":
        """A copy with some fields changed, e.g. ``PRESETS["dconv-c3c5"].replace(offset_groups=4)``."""
        return dataclasses.replace(self, **changes)


def _p(name, description, stages=(), modulated=False, pool="align"):
    return DetectorPreset(name, description, tuple(stages), modulated, 1, pool, pool)


def _mimic(name, description, base, regions):
    return PRESETS[base].replace(name=name, description=description, mimic=regions, base=base)


PRESETS: Dict[str, DetectorPreset] = {p.name: p for p in (
    _p("regular-roipool", "regular (RoIpooling)", pool="roipool"),
    _p("regular", "regular (aligned RoIpooling)"),
    _p("dcnv1", "DCNv1: dconv@c5 + dpool", ("c5",), pool="dpool"),
    _p("dconv-c5", "dconv@c5", ("c5",)),
    _p("dconv-c4c5", "dconv@c4~c5", ("c4", "c5")),
    _p("dconv-c3c5", "dconv@c3~c5", ("c3", "c4", "c5")),
    _p("dconv-c3c5-dpool", "dconv@c3~c5 + dpool", ("c3", "c4", "c5"), pool="dpool"),
    _p("mdconv-c3c5", "mdconv@c3~c5", ("c3", "c4", "c5"), modulated=True),
    _p("mdconv-c3c5-mdpool", "mdconv@c3~c5 + mdpool", ("c3", "c4", "c5"), modulated=True, pool="mdpool"),
)}
PRESETS.update({p.name: p for p in (
    _mimic("regular-mimic", "regular + R-CNN feature mimicking on FG", "regular", "fg"),
    _mimic("dcnv2", "DCNv2: mdconv@c3~c5 + mdpool + R-CNN feature mimicking on FG", "mdconv-c3c5-mdpool", "fg"),
    _mimic("dcnv2-fgbg", "DCNv2 with feature mimicking on FG + BG", "mdconv-c3c5-mdpool", "fg+bg"),
    _mimic("dcnv2-bg", "DCNv2 with feature mimicking on BG only", "mdconv-c3c5-mdpool", "bg"),
)})


def get_preset(preset: Union[str, DetectorPreset]) -> DetectorPreset:
    """Looks a preset up by name (or passes a :class:`DetectorPreset` through)."""
    if isinstance(preset, DetectorPreset):
        return preset
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a name or a DetectorPreset, got {type(preset).__name__}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    return PRESETS[preset]
