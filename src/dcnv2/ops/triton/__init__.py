"""Triton kernels of the dcnv2 ops for CUDA: compiled at run time on the user's GPU, no build step.

This module is cheap to import: it never imports Triton itself. The kernels
(:mod:`dcnv2.ops.triton.roi_pool`, :mod:`dcnv2.ops.triton.deform_conv`) are imported, and
registered as the ``CUDA`` implementations of ``dcnv2::deform_conv2d``,
``dcnv2::_deform_conv2d_backward``, ``dcnv2::deform_roi_pool`` and
``dcnv2::_deform_roi_pool_backward``, by :func:`register` (called on the first CUDA use).

Backend selection on CUDA: ``DCNV2_CUDA_BACKEND=triton|torchvision|reference`` (default ``triton``).
When Triton cannot be imported, ``triton`` falls back (with one warning saying why) to torchvision's
kernel for the convolution and to the pure-PyTorch reference for the RoI pooling.

The launch wrappers accept CPU tensors when ``TRITON_INTERPRET=1`` was set before this package's
kernels were imported: Triton's interpreter then runs the very same kernels on the CPU (the tests).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings
from typing import Optional

import torch

__all__ = ["BACKENDS", "available", "unavailable_reason", "requested_backend", "cuda_backend",
           "resolve_cuda_backend", "register", "interpreting", "allow_tf32", "describe"]

BACKENDS = ("triton", "torchvision", "reference")
ENV = "DCNV2_CUDA_BACKEND"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """None when Triton can be used, else a sentence saying why not."""
    try:
        missing = importlib.util.find_spec("triton") is None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        missing = True
    if missing:
        return "the `triton` package is not installed (it ships with the Linux CUDA wheels of torch)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install must not break the library
        return f"importing triton failed: {type(exc).__name__}: {exc}"
    return None


def available() -> bool:
    """Whether the Triton kernels can run (Triton importable)."""
    return unavailable_reason() is None


def requested_backend() -> str:
    """The CUDA backend asked for by ``DCNV2_CUDA_BACKEND`` (default ``triton``).

    Raises:
        ValueError: the variable holds something other than triton, torchvision or reference.
    """
    value = os.environ.get(ENV, "").strip().lower() or "triton"
    if value not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {', '.join(BACKENDS)}, got {os.environ.get(ENV)!r}")
    return value


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    warnings.warn(
        f"dcnv2: the Triton CUDA kernels are unavailable ({reason}); deform_conv2d falls back to "
        f"torchvision's CUDA kernel and deform_roi_pool to the pure-PyTorch reference. Set {ENV}="
        "torchvision or reference to choose explicitly and silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


def cuda_backend() -> str:
    """The backend that runs the ops on CUDA tensors: ``triton``, ``torchvision`` or ``reference``.

    ``triton`` is the default; a missing Triton gives ``torchvision`` (one warning says why), which
    the RoI pooling, having no torchvision counterpart, treats as ``reference``.
    """
    wanted = requested_backend()
    if wanted == "triton":
        reason = unavailable_reason() or _schemas_missing()
        if reason is not None:
            _warn_fallback(reason)
            return "torchvision"
    return wanted


def _schemas_missing() -> Optional[str]:
    from dcnv2.ops import _native

    return None if _native.HAS_NATIVE else "the C++ extension dcnv2._C that defines the op schemas is not built"


def describe() -> str:
    """One line for ``dcnv2 tour``: which backend CUDA tensors get, and why."""
    wanted = requested_backend()
    reason = unavailable_reason() or _schemas_missing()
    if wanted == "triton" and reason is not None:
        return f"torchvision conv / reference RoI pooling (Triton unavailable: {reason})"
    src = f"set by {ENV}" if os.environ.get(ENV) else "the default"
    return f"{wanted} ({src}; choose with {ENV}=triton|torchvision|reference)"


def allow_tf32() -> bool:
    """Whether float32 products may use TF32, following torch's matmul precision flags.

    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee") decides when set; otherwise
    ``torch.set_float32_matmul_precision`` ("highest", the default, means no TF32).
    """
    p = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if p == "tf32":
        return True
    if p == "ieee":
        return False
    return torch.get_float32_matmul_precision() != "highest"


CONSTANT_MARK = "_dynamo_marked_constant"  # what torch._dynamo.assume_constant_result sets (tested)


def _constant(fn):
    """Under torch.compile the choice is made once, at trace time, like a constant.

    Marked as ``torch._dynamo.assume_constant_result`` marks a function, without importing ``torch._dynamo``
    (2 s on a 2-core machine, at every ``import dcnv2``) when nothing has imported it yet.
    """
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        return dynamo.assume_constant_result(fn)
    setattr(fn, CONSTANT_MARK, True)
    return fn


@_constant
def resolve_cuda_backend() -> str:
    """:func:`cuda_backend`, with the Triton kernels registered when it is ``triton``."""
    backend = cuda_backend()
    if backend == "triton":
        register()
    return backend


_registered = False


def register() -> None:
    """Imports the kernels and registers them as the CUDA kernels of the dcnv2 ops (idempotent).

    Raises:
        RuntimeError: Triton is unavailable, or the C++ extension that defines the op schemas is not built.
    """
    global _registered
    if _registered:
        return
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"dcnv2: cannot register the Triton kernels: {reason}")
    from dcnv2.ops import _native

    if not _native.HAS_NATIVE:
        raise RuntimeError("dcnv2: the op schemas live in the C++ extension dcnv2._C, which is not built")
    from dcnv2.ops.triton import _register

    _register.register_cuda_kernels()
    _registered = True
