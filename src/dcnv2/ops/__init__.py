"""Functional operators: deformable convolution and deformable RoI pooling."""
from dcnv2.ops import reference
from dcnv2.ops.deform_conv import deform_conv2d

__all__ = ["deform_conv2d", "reference"]
