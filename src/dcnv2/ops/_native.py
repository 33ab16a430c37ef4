"""Loads the C++ extension that registers the ``torch.ops.dcnv2`` operators."""
import warnings

try:
    from dcnv2 import _C  # noqa: F401  (loading it registers the schemas and CPU kernels)

    HAS_NATIVE = True
except ImportError as exc:  # an uncompiled checkout: everything still works through the reference
    HAS_NATIVE = False
    warnings.warn(
        f"dcnv2: the C++ extension is not built ({exc}); falling back to the slow pure-PyTorch "
        "reference. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )
