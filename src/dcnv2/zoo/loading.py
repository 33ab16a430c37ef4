"""Reading a peer's checkpoint file: torchvision / mmdetection ``.pth`` and detectron2 ``.pkl`` / ``.pth``.

``.pth`` files are read with ``torch.load(weights_only=True)``. detectron2's model-zoo ``.pkl`` files are
pickles of numpy arrays; they are read by an unpickler that admits numpy's array reconstruction and
nothing else, so a hostile pickle cannot run code.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Union

import torch

__all__ = ["PeerCheckpoint", "read_peer_checkpoint"]

StateDict = Dict[str, torch.Tensor]


class PeerCheckpoint:
    """A peer's state dict (name -> Tensor) and whatever it carried beside it (``meta``: mmdetection's
    ``CLASSES`` and config, detectron2's ``__author__`` ...)."""

    def __init__(self, state_dict: StateDict, meta: Dict[str, Any], path: str) -> None:
        self.state_dict = state_dict
        self.meta = meta
        self.path = path


_NUMPY_NAMES = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a weights file holds arrays only")


def _read_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(io.BufferedReader(f), encoding="latin1").load()


def _to_tensor(name: str, value: Any, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"{path}: {name!r} holds Python objects, not numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(f"{path}: {name!r} is a {type(value).__name__}, not a weight array")


def read_peer_checkpoint(path: Union[str, os.PathLike]) -> PeerCheckpoint:
    """Reads a checkpoint file of torchvision, mmdetection or detectron2.

    Unwraps ``{"state_dict": ...}`` (mmdetection, with ``meta``), ``{"model": ...}`` (detectron2) and
    DataParallel's ``module.`` prefix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or no name -> tensor dict inside (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        if path.suffix == ".pkl":
            obj = _read_pickle(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files, foreign pickles, refused classes
        if "Unsupported global" in str(exc):  # a class the weights-only unpickler does not admit
            raise ValueError(
                f"checkpoint {str(path)!r} holds Python objects besides its weights (e.g. mmengine's message hub "
                "or a training config), which dcnv2 does not unpickle: a pickle can run code. Where you trust "
                "the file, save its weights alone and convert that: python -c \"import torch; c = torch.load("
                f"'{path}', weights_only=False); torch.save({{'state_dict': c.get('state_dict', c.get('model', "
                "c)), 'meta': c.get('meta', {})}, 'weights.pth')\"") from None
        raise ValueError(f"checkpoint {str(path)!r} could not be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    meta: Dict[str, Any] = {}
    sd: Any = obj
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            sd = obj[key]
            meta = {k: v for k, v in obj.items() if k != key}
            if isinstance(meta.get("meta"), dict):  # mmdetection: {"meta": {...}, "state_dict": ...}
                meta = {**meta, **meta.pop("meta")}
            break
    if not sd:
        raise ValueError(f"checkpoint {str(path)!r} holds no weights")
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise ValueError(f"checkpoint {str(path)!r}: weight names must be strings, got {bad[:3]!r}")
    tensors = {k: _to_tensor(k, v, path) for k, v in sd.items()}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return PeerCheckpoint(tensors, meta, str(path))

