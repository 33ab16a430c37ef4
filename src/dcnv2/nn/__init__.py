"""nn.Module layers built on dcnv2.ops."""
from dcnv2.nn.deform_conv import DeformConv2d, ModulatedDeformConv2d
from dcnv2.nn.deform_roi_pool import DeformRoIPool, ModulatedDeformRoIPool
from dcnv2.nn.param_groups import offset_parameters, param_groups

__all__ = ["DeformConv2d", "ModulatedDeformConv2d", "DeformRoIPool", "ModulatedDeformRoIPool", "param_groups", "offset_parameters"]
