"""Optimizer parameter groups that train the offset/mask branches at a reduced learning rate."""
from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn

__all__ = ["param_groups", "offset_parameters"]


def offset_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of every offset/mask branch: modules exposing ``offset_branch()`` (our deformable
    convolutions and RoI pooling layers) name the submodule that predicts their offsets."""
    found: Dict[int, nn.Parameter] = {}
    for module in model.modules():
        branch = getattr(module, "offset_branch", None)
        if callable(branch):
            for p in branch().parameters():
                found[id(p)] = p
    return list(found.values())


def param_groups(
    model: nn.Module,
    lr: float,
    offset_lr_mult: float = 0.1,
    weight_decay: Optional[float] = None,
) -> List[dict]:
    """Splits ``model``'s trainable parameters into two optimizer groups.

    Args:
        model: any module containing dcnv2 layers.
        lr: base learning rate.
        offset_lr_mult: learning-rate factor of the offset/mask branches (0.1 in the paper).
        weight_decay: if given, set on both groups.

    Returns:
        ``[{"params": regular, "lr": lr, "name": "base"}, {"params": offsets, "lr": lr * offset_lr_mult,
        "name": "offset"}]`` ready for ``torch.optim.SGD``; an empty group is left out. Each group also
        records ``lr_mult`` so schedulers that rescale ``lr`` can keep the ratio.
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not offset_lr_mult >= 0:
        raise ValueError(f"offset_lr_mult must be non-negative, got {offset_lr_mult!r}")
    offset_ids = {id(p) for p in offset_parameters(model)}
    base, offs = [], []
    for p in model.parameters():
        if p.requires_grad:
            (offs if id(p) in offset_ids else base).append(p)
    groups = []
    for name, params, mult in (("base", base, 1.0), ("offset", offs, offset_lr_mult)):
        if params:
            g = {"params": params, "lr": lr * mult, "lr_mult": mult, "name": name}
            if weight_decay is not None:
                g["weight_decay"] = weight_decay
            groups.append(g)
    return groups
