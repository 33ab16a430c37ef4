"""A regular (or partly deformable) detector's weights into a more deformable preset, keeping its function.

:func:`to_preset` builds the target preset's detector and loads every weight the source has; what only the
target has (offset / mask convs, the RoI pooling offset branches) keeps its zero-offset initialisation.
With ``preserve=True`` the converted detector computes exactly what the source did (eval mode, frozen
BatchNorm): each new modulated conv doubles its weight, since its masks start at sigmoid(0) = 0.5, and a new
modulated RoI pooling (masks 0.5 too) doubles the first layer that reads it (the box head's ``fc6``, the
mask head's first conv). ``preserve=False`` keeps the paper's initialisation (masks 0.5 times the weights,
what training from ImageNet uses), which halves those layers of a trained detector.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from torch import Tensor, nn

from dcnv2.models.presets import get_preset
from dcnv2.nn import ModulatedDeformConv2d, ModulatedDeformRoIPool

__all__ = ["to_preset", "check_more_deformable"]


def to_preset(model: nn.Module, state_dict: Dict[str, Tensor], target: nn.Module, *,
              preserve: bool = True) -> Tuple[Dict[str, Tensor], List[str]]:
    """Weights of ``model`` (whose state is ``state_dict``) for ``target``, a detector of a more deformable
    preset with otherwise the same configuration.

    Returns:
        (``target``'s state dict, notes saying what was added and scaled).

    Raises:
        ValueError: the target lacks a weight of the source, a shape differs, or the target drops a
            deformable part the source has.
    """
    own = target.state_dict()
    unexpected = [k for k in state_dict if k not in own and not k.endswith(".num_batches_tracked")]
    if unexpected:
        raise ValueError(f"the target preset does not hold {len(unexpected)} weight(s) of the source, e.g. "
                         f"{unexpected[:4]}: convert to a preset that keeps every deformable part of the source")
    shapes = [k for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise ValueError(f"the target preset's weights differ in shape from the source's: {shapes[:4]}")
    out = dict(own)
    out.update({k: v for k, v in state_dict.items() if k in own})
    added = sorted({k.rsplit(".conv_offset.", 1)[0] for k in own if k not in state_dict and ".conv_offset." in k})
    notes = [f"{len(added)} conv(s) became deformable (offsets 0)"] if added else []
    if not preserve:
        if any(isinstance(target.get_submodule(k), ModulatedDeformConv2d) for k in added):
            notes.append("paper init: new modulated convs start at 0.5x the conv (masks sigmoid(0))")
        return out, notes
    doubled = []
    for name in added:
        if isinstance(target.get_submodule(name), ModulatedDeformConv2d):
            out[name + ".weight"] = out[name + ".weight"] * 2
            doubled.append(name)
    roi_heads = target.roi_heads
    for pool_name, reader in (("box_roi_pool", "box_head.fc6"), ("mask_roi_pool", "mask_head.0.0")):
        pool = getattr(roi_heads, pool_name, None)
        was_modulated = any(k.startswith(f"roi_heads.{pool_name}.") for k in state_dict)
        layers = getattr(pool, "roi_layers", [pool])  # LevelwiseRoIPool holds one layer per level
        if any(isinstance(p, ModulatedDeformRoIPool) for p in layers) and not was_modulated:
            key = f"roi_heads.{reader}.weight"
            if key in out:
                out[key] = out[key] * 2
                doubled.append(f"roi_heads.{reader} (reads the new mdpool)")
    if doubled:
        notes.append(f"function kept (preserve): weight doubled in {len(doubled)} layer(s) whose input the new "
                     "masks (0.5) scale")
    return out, notes


def check_more_deformable(source_preset, target_preset) -> None:
    """Refuses a target that drops the source's deformable stages or changes its RoI pooling to another kind
    than a deformable one."""
    s, t = get_preset(source_preset), get_preset(target_preset)
    lost = [st for st in s.deform_stages if st not in t.deform_stages]
    if lost:
        raise ValueError(f"preset {t.name!r} drops the deformable stages {lost} of {s.name!r}")
    if s.deform_stages and s.modulated != t.modulated:
        raise ValueError(f"{s.name!r} has {'DCNv2' if s.modulated else 'DCNv1'} layers; {t.name!r} the other kind")
    for field in ("box_pool", "mask_pool"):
        a, b = getattr(s, field), getattr(t, field)
        if a != b and not (a == "align" and b in ("dpool", "mdpool")):
            raise ValueError(f"{field}: {a!r} -> {b!r} does not keep the source's function (from 'align' only to "
                             "'dpool' / 'mdpool')")
