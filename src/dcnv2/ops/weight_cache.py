"""Keep the CPU forward's packed weights across calls: ``with dcnv2.ops.packed_weights(): model(x)``.

Each deformable conv multiplies its column tiles by the layer's weight, which oneDNN's matmul wants
reordered into its blocked layout. Within one call that reorder costs about what it saves, so a call
packs only where many large tiles share the weight (a float32 weight of up to 1 MB runs in fused blocks
instead, which take it as rows of [9 * C, Cout]: that layout is what is kept for it). Inside
``packed_weights()`` the first call on a weight packs it and later calls reuse the packed copy while the
weight tensor is unchanged: the same tensor object, the same storage and the same version counter (every
in-place op on it or its views, an optimizer step included, counts as a change). On the 2-core AVX-512 machine this takes 2-5 % off the forward of
ResNet-50's c3-c5 layers and 5-10 % off the demo's small maps (docs/benchmarks.md); it is what a
compiled runtime (OpenVINO, ONNX Runtime) does with its constant weights.

Not seen, so not allowed inside the block: writes that bypass the version counter, through
``weight.data``, ``weight.numpy()`` or DLPack. Weights created under ``torch.inference_mode`` have no
version counter and are never cached. The packed copies cost the weights' memory again (at most 1 GiB,
least recently used dropped first) and are freed when the outermost block exits.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from dcnv2.ops._native import HAS_NATIVE

__all__ = ["packed_weights", "packed_weights_info", "PackedWeightsInfo"]

_lock = threading.Lock()
_depth = 0


@dataclass(frozen=True)
class PackedWeightsInfo:
    """The cache's state: whether it is enabled, its entries and their bytes, hits and misses so far."""

    enabled: bool
    entries: int
    bytes: int
    hits: int
    misses: int


def _control(enable: int) -> PackedWeightsInfo:
    if not HAS_NATIVE:
        return PackedWeightsInfo(False, 0, 0, 0, 0)
    v = torch.ops.dcnv2._deform_conv2d_weight_cache(torch.empty(0), enable).tolist()
    return PackedWeightsInfo(bool(v[0]), *v[1:])


def packed_weights_info() -> PackedWeightsInfo:
    """The packed-weight cache's state (see ``packed_weights``)."""
    return _control(-1)


@contextlib.contextmanager
def packed_weights() -> Iterator[None]:
    """Within the block, the CPU forward packs each weight once and reuses it while the weight is unchanged.

    Blocks nest; the cache empties when the outermost one exits. It is process-wide: other threads'
    calls inside the block use it too. CUDA and float64 calls are not affected.
    """
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1:
            _control(1)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _control(0)
