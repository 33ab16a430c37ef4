// The forward's cache of packed weights: see weight_cache.h.
#include "weight_cache.h"

#include <torch/library.h>

#include <atomic>
#include <list>
#include <mutex>

namespace dcnv2 {
namespace {

using ImplRef = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Entry {
  ImplRef impl;                // keeps the TensorImpl's memory from being reused while the entry lives
  const c10::TensorImpl* raw;  // its address, compared with the caller's
  const void* data;
  int64_t version;
  PackedWeightKey key;
  std::vector<at::Tensor> packed;
  int64_t bytes;
};

// Bounds: the R-50 detectors' 13 deformable layers pack to about 50 MB in float32.
constexpr size_t kMaxEntries = 256;
constexpr int64_t kMaxBytes = int64_t(1) << 30;

std::mutex g_mutex;
std::list<Entry> g_entries;  // most recently used first
int64_t g_bytes = 0;
std::atomic<bool> g_enabled{false};
std::atomic<int64_t> g_hits{0}, g_misses{0};

bool same_key(const PackedWeightKey& a, const PackedWeightKey& b) {
  return a.type == b.type && a.rows == b.rows && a.variant == b.variant;
}

// Drops entries whose tensor is gone, then the oldest ones beyond the bounds (the caller holds g_mutex).
void trim() {
  for (auto it = g_entries.begin(); it != g_entries.end();) {
    if (it->impl.expired()) {
      g_bytes -= it->bytes;
      it = g_entries.erase(it);
    } else {
      ++it;
    }
  }
  while (!g_entries.empty() && (g_entries.size() > kMaxEntries || g_bytes > kMaxBytes)) {
    g_bytes -= g_entries.back().bytes;
    g_entries.pop_back();
  }
}

void clear() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_entries.clear();
  g_bytes = 0;
}

}  // namespace

bool weight_cache_applies(const at::Tensor& weight) {
  return g_enabled.load(std::memory_order_relaxed) && !weight.is_inference();
}

std::optional<std::vector<at::Tensor>> weight_cache_find(const at::Tensor& weight, const PackedWeightKey& key) {
  if (!weight_cache_applies(weight)) return std::nullopt;
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto it = g_entries.begin(); it != g_entries.end(); ++it) {
    if (it->raw != weight.unsafeGetTensorImpl() || !same_key(it->key, key)) continue;
    if (!it->impl.expired() && it->data == weight.data_ptr() && it->version == weight._version()) {
      g_entries.splice(g_entries.begin(), g_entries, it);
      ++g_hits;
      return g_entries.front().packed;
    }
    break;  // the tensor changed: the caller packs again and replaces the entry
  }
  ++g_misses;
  return std::nullopt;
}

void weight_cache_insert(const at::Tensor& weight, const PackedWeightKey& key, std::vector<at::Tensor> packed) {
  if (!weight_cache_applies(weight)) return;
  int64_t bytes = 0;
  for (const at::Tensor& t : packed) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto it = g_entries.begin(); it != g_entries.end(); ++it) {
    if (it->raw == weight.unsafeGetTensorImpl() && same_key(it->key, key)) {
      g_bytes -= it->bytes;
      g_entries.erase(it);
      break;
    }
  }
  g_entries.push_front(Entry{ImplRef(weight.getIntrusivePtr()), weight.unsafeGetTensorImpl(), weight.data_ptr(),
                             weight._version(), key, std::move(packed), bytes});
  g_bytes += bytes;
  trim();
}

at::Tensor weight_cache_control(const at::Tensor& device_of, int64_t enable) {
  if (enable > 0 && !g_enabled.exchange(true)) {
    g_hits = 0;
    g_misses = 0;
  } else if (enable == 0) {
    g_enabled = false;
    clear();
  }
  int64_t entries, bytes;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    entries = static_cast<int64_t>(g_entries.size());
    bytes = g_bytes;
  }
  at::Tensor out = at::empty({5}, device_of.options().dtype(at::kLong));
  out[0] = int64_t(g_enabled.load());
  out[1] = entries;
  out[2] = bytes;
  out[3] = g_hits.load();
  out[4] = g_misses.load();
  return out;
}

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) { m.impl("_deform_conv2d_weight_cache", &weight_cache_control); }

}  // namespace dcnv2
