"""dcnv2: Deformable ConvNets v2 for PyTorch.

Modulated deformable convolution and RoI pooling with fast CPU kernels (``dcnv2.ops``, ``dcnv2.nn``),
DCN backbones and detectors (``dcnv2.models``), training/evaluation (``dcnv2.engine``), the
paper's spatial-support analysis (``dcnv2.analysis``) and its experiments (``dcnv2.experiments``).
"""
from dcnv2 import _compat, ops, nn

_compat.install()

__version__ = "0.1.0"
__all__ = ["ops", "nn", "__version__"]
