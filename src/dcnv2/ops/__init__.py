"""Functional operators: deformable convolution and deformable RoI pooling."""
from dcnv2.ops import reference
from dcnv2.ops.deform_conv import deform_conv2d
from dcnv2.ops.deform_roi_pool import deform_roi_pool

__all__ = ["deform_conv2d", "deform_roi_pool", "reference"]
