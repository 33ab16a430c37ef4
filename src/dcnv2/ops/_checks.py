"""Argument checks shared by the functional ops: each error names the argument, expected and got."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

IntPair = Union[int, Sequence[int]]


def pair(name: str, value: IntPair) -> Tuple[int, int]:
    """Normalises an int or a pair of ints; bools, floats and other lengths are rejected."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in value
    ):
        return (value[0], value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def tensor(name: str, value, ndim: int, like: Tensor | None = None) -> Tensor:
    """Checks that ``value`` is a floating tensor with ``ndim`` dims, on ``like``'s device and dtype."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {value.dim()}-D with shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if like is not None:
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but input is on {like.device}; move both to one device")
        if value.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but input has dtype {like.dtype}")
    return value


def shape(name: str, value: Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({meaning}), got {tuple(value.shape)}")
