"""Moving a peer's state dict into ours key by key, with every key accounted for.

A :class:`KeyMapper` hands out the peer's tensors (``take``) and collects ours (``put``). At the end every
peer key must have been taken (or be one of the bookkeeping buffers that carry no weights) and every key of
our model must have been filled with a tensor of its shape; anything else is reported by name.
Class-layout helpers put the background class where torchvision expects it (index 0).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["KeyMapper", "ConversionError", "background_last_to_first", "class_regression_to_torchvision",
           "class_masks_to_torchvision"]

# buffers without weights: BatchNorm's step counter (our FrozenBatchNorm2d has none)
IGNORED_SUFFIXES = (".num_batches_tracked",)


class ConversionError(ValueError):
    """The peer's checkpoint does not fit the model it describes (keys missing, extra or misshapen)."""


class KeyMapper:
    """Tracks which of the peer's keys were used and which of ours were filled.

    Args:
        source: the peer's state dict.
        origin: a name for messages ("mmdetection checkpoint model.pth").
    """

    def __init__(self, source: Dict[str, Tensor], origin: str) -> None:
        self.source = source
        self.origin = origin
        self.taken: set = set()
        self.out: Dict[str, Tensor] = {}

    def has(self, key: str) -> bool:
        return key in self.source

    def take(self, key: str) -> Tensor:
        if key not in self.source:
            raise ConversionError(f"{self.origin} has no {key!r}, which the model it describes needs")
        self.taken.add(key)
        return self.source[key]

    def put(self, key: str, value: Tensor) -> None:
        if key in self.out:
            raise ConversionError(f"internal: {key!r} written twice")
        self.out[key] = value

    def move(self, src: str, dst: str) -> None:
        self.put(dst, self.take(src))

    def move_prefix(self, src_prefix: str, dst_prefix: str, rename: Optional[Dict[str, str]] = None) -> int:
        """Moves every peer key under ``src_prefix`` (not yet taken) to ``dst_prefix`` + the rest of its name,
        after replacing name parts by ``rename`` (e.g. ``{".conv2_offset.": ".conv2.conv_offset."}``).
        Returns how many moved."""
        n = 0
        for key in list(self.source):
            if key.startswith(src_prefix) and key not in self.taken:
                rest = key[len(src_prefix):]
                for a, b in (rename or {}).items():
                    rest = rest.replace(a, b)
                self.move(key, dst_prefix + rest)
                n += 1
        return n

    def keys_under(self, prefix: str) -> List[str]:
        return [k for k in self.source if k.startswith(prefix)]

    def finish(self, model: nn.Module) -> Dict[str, Tensor]:
        """Checks completeness against ``model``'s state dict and returns the converted one (``model`` is
        not modified; only its names, shapes and dtypes are read, so a model on the meta device will do).

        Raises:
            ConversionError: naming unused peer keys, keys of ours left unfilled, unknown keys produced
                or shape mismatches.
        """
        unused = sorted(k for k in self.source if k not in self.taken and not k.endswith(IGNORED_SUFFIXES))
        target = model.state_dict()
        wanted = {k: v for k, v in target.items() if not k.endswith(IGNORED_SUFFIXES)}
        missing = sorted(k for k in wanted if k not in self.out)
        unknown = sorted(k for k in self.out if k not in target and not k.endswith(IGNORED_SUFFIXES))
        shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in self.out.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
        problems = []
        if unused:
            problems.append(f"{len(unused)} key(s) of the checkpoint not used: {_names(unused)}")
        if missing:
            problems.append(f"{len(missing)} weight(s) of the model not in the checkpoint: {_names(missing)}")
        if unknown:
            problems.append(f"internal: {len(unknown)} converted key(s) the model lacks: {_names(unknown)}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es): {_names(shapes)}")
        if problems:
            raise ConversionError(f"{self.origin} does not fit: " + "; ".join(problems))
        out = {k: v for k, v in self.out.items() if k in target}
        for k, v in target.items():  # bookkeeping buffers (BatchNorm's step count) start at a fresh model's 0
            if k not in out:
                out[k] = torch.zeros(v.shape, dtype=v.dtype)
        return {k: out[k].to(target[k].dtype) if out[k].is_floating_point() else out[k] for k in target}


def _names(keys: Iterable[str], limit: int = 6) -> str:
    keys = list(keys)
    text = ", ".join(keys[:limit])
    return text + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def background_last_to_first(t: Tensor) -> Tensor:
    """Rows [class 1 .. C, background] -> [background, class 1 .. C] (classifier weight or bias)."""
    return torch.cat([t[-1:], t[:-1]], dim=0)


def class_regression_to_torchvision(t: Tensor, num_classes: int) -> Tensor:
    """Box regression rows of the C foreground classes (4 C rows, mmdetection's / detectron2's, or 4 rows
    class-agnostic) -> torchvision's 4 (C + 1) rows, the background's zero (never used at inference)."""
    rows = t.shape[0]
    if rows == 4:  # class-agnostic: every class regresses the same
        t = t.repeat((num_classes,) + (1,) * (t.dim() - 1))
    elif rows != 4 * num_classes:
        raise ConversionError(f"box regression has {rows} rows; expected 4 x {num_classes} classes or 4")
    return torch.cat([torch.zeros_like(t[:4]), t], dim=0)


def class_masks_to_torchvision(t: Tensor) -> Tensor:
    """Mask logits of the C foreground classes -> torchvision's C + 1 (background first, zero)."""
    return torch.cat([torch.zeros_like(t[:1]), t], dim=0)
