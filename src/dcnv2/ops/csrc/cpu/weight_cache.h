// Packed forward weights kept across calls, while the user asks for it (dcnv2.ops.packed_weights()).
//
// The forward multiplies every column tile by the layer's weight. oneDNN's matmul runs fastest on a weight
// reordered into its blocked layout, which costs about what it saves within one call, so a call on its own
// packs only where many large tiles share the weight. Inference calls a layer again and again with the
// same weight: while the cache is enabled, the first call's packed weight serves the later ones.
//
// An entry belongs to one weight tensor as it is: the same TensorImpl (held by a weak reference, so a new
// tensor at a reused address is never taken for it), the same storage pointer (`w.data = other`) and the
// same version counter (every in-place op through the tensor or its views, an optimizer step included,
// bumps it). A write that bypasses the version counter (through `w.data`, numpy, DLPack) is not seen:
// the cache is off unless enabled, and the Python context manager says so.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace dcnv2 {

struct PackedWeightKey {
  at::ScalarType type;  // the packed copies' element type
  int64_t rows;         // the GEMM's row count the copies were packed for
  int64_t variant;      // the caller's own tag (the forward: its group count)
};

// Whether the cache is enabled and can hold `weight` (an inference tensor has no version counter, and can
// change in place inside inference_mode unseen, so it is never cached).
bool weight_cache_applies(const at::Tensor& weight);

// The packed copies stored for `weight` under `key`, if the tensor is unchanged since they were stored.
std::optional<std::vector<at::Tensor>> weight_cache_find(const at::Tensor& weight, const PackedWeightKey& key);

// Stores `packed` for `weight` under `key` (replacing older copies of the same tensor and key), evicting
// the least recently used entries beyond the cache's bounds. No-op while disabled.
void weight_cache_insert(const at::Tensor& weight, const PackedWeightKey& key, std::vector<at::Tensor> packed);

// enable > 0 enables, enable == 0 disables and empties, enable < 0 only reads. Returns
// [enabled, entries, bytes, hits, misses] (hits and misses since the last enable).
at::Tensor weight_cache_control(const at::Tensor& device_of, int64_t enable);

}  // namespace dcnv2
