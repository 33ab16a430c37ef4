"""The form the ops take while an exporter without a dcnv2 kernel traces them.

``torch.jit.trace`` records ``torch.ops.dcnv2.*`` as custom nodes that only our library can run. Frontends that
know torchvision's ops (OpenVINO's PyTorch frontend maps ``torchvision::deform_conv2d`` to its
``DeformableConvolution``) need the op in that form instead: inside :func:`torchvision_form`,
:func:`dcnv2.ops.deform_conv2d` calls ``torchvision.ops.deform_conv2d`` (the same op: argument order, offset
layout and bilinear zero-padded sampling are torchvision's) and :func:`dcnv2.ops.deform_roi_pool`, which has
no torchvision counterpart, the decomposition into standard ops of :mod:`dcnv2.ops.traceable`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["torchvision_form", "in_torchvision_form"]

_depth = 0  # a plain counter, not a context variable: a frontend may trace on a thread of its own


@contextlib.contextmanager
def torchvision_form() -> Iterator[None]:
    """While active, the ops trace as torchvision's ``deform_conv2d`` and standard-op RoI pooling."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def in_torchvision_form() -> bool:
    return _depth > 0
