// Operator schemas of the dcnv2 library. Kernels live in cpu/*.cpp (TORCH_LIBRARY_IMPL);
// fake (meta) kernels and autograd formulas are registered from Python (dcnv2/ops/*.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dcnv2, m) {
  // Modulated deformable convolution (DCNv2); mask=None is DCNv1.
  m.def(
      "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor? mask, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int offset_groups) -> Tensor");
  // Returns (grad_input, grad_weight, grad_offset, grad_mask, grad_bias); grad_mask / grad_bias
  // are empty tensors when mask / bias is None. output_mask = which of (input, weight, offset and
  // mask) autograd needs: the others are returned as zeros of their shape without being computed.
  m.def(
      "_deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor offset, "
      "Tensor? mask, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "int offset_groups, bool[3] output_mask=[True, True, True]) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The CPU backward's pass counters (column fills, grad_w GEMMs, grad_col GEMMs, scatter passes,
  // offset-only passes): tests check which passes a pruned backward ran.
  m.def("_deform_conv2d_backward_counts(Tensor device_of, bool reset=False) -> Tensor");
  // The CPU float32/float64 forward's counters (tile-parallel calls, tile-serial calls, tiles run).
  m.def("_deform_conv2d_forward_counts(Tensor device_of, bool reset=False) -> Tensor");
  // The CPU forward's cache of packed weights (dcnv2.ops.packed_weights): enable > 0 enables it, 0 disables
  // and empties it, < 0 only reads; returns [enabled, entries, bytes, hits, misses].
  m.def("_deform_conv2d_weight_cache(Tensor device_of, int enable=-1) -> Tensor");
  // Modulated deformable RoI pooling (DCNv2); offset=None and mask=None is RoIAlign.
  m.def(
      "deform_roi_pool(Tensor input, Tensor rois, Tensor? offset, Tensor? mask, int pooled_height, "
      "int pooled_width, float spatial_scale, int sampling_ratio, float gamma, bool aligned) -> Tensor");
  // Returns (grad_input, grad_offset, grad_mask); the last two are empty when not given.
  m.def(
      "_deform_roi_pool_backward(Tensor grad_output, Tensor input, Tensor rois, Tensor? offset, "
      "Tensor? mask, int pooled_height, int pooled_width, float spatial_scale, int sampling_ratio, "
      "float gamma, bool aligned) -> (Tensor, Tensor, Tensor)");
}

// `import dcnv2._C` loads this library and so runs the registrations above.
static PyModuleDef dcnv2_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dcnv2_module); }
