"""Functional operators: deformable convolution and deformable RoI pooling."""
from dcnv2.ops import reference
from dcnv2.ops.deform_conv import deform_conv2d
from dcnv2.ops.deform_roi_pool import deform_roi_pool
from dcnv2.ops.weight_cache import PackedWeightsInfo, packed_weights, packed_weights_info

__all__ = [
    "PackedWeightsInfo",
    "deform_conv2d",
    "deform_roi_pool",
    "packed_weights",
    "packed_weights_info",
    "reference",
]
