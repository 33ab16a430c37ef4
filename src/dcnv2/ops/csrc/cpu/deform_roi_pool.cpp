// CPU kernel of (modulated) deformable RoI pooling (DCNv2 eq. 2; DCNv1 without mask; RoIAlign
// without offset and mask).
//
// Sampling grid and border rule are torchvision's roi_align: bin (i, j) of a RoI averages a
// gh x gw grid of bilinear samples; samples outside [-1, H] x [-1, W] read 0, coordinates below 0
// clamp to 0 and those past the last row/column clamp to it. The offset shifts every sample of a
// bin by (gamma * offset[k, 0, i, j] * roi_width, gamma * offset[k, 1, i, j] * roi_height); the
// mask multiplies the bin average.
//
// The input is read channels-last ([N, H, W, C]) so each bilinear corner is a contiguous channel
// vector. Forward is parallel over RoIs. Backward is parallel over fixed channel blocks: each block
// owns its channels of grad_input (no atomics), and per-block partials of the offset/mask gradients
// are reduced in block order. The partition depends on C only, never on the thread count, so two
// runs are bit-identical.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

// No fused multiply-add contraction: with zero offsets the result then matches torchvision's
// roi_align (built without FMA) to the last bit or so, instead of drifting by several ulps.
#pragma GCC optimize("fp-contract=off")

namespace dcnv2 {
namespace {

constexpr int64_t kMaxGrid = int64_t(1) << 40;  // samples per bin and axis, adaptive mode
constexpr int64_t kWalkWhole = 64;             // grids up to this size are walked whole

struct Pool {
  int64_t N, C, H, W, K, PH, PW, PP;
  double spatial_scale, gamma;
  int64_t sampling_ratio;
  bool aligned;
};

// Geometry of one RoI, computed exactly as torchvision's roi_align does (same operation order), so
// that zero offsets reproduce it bit for bit up to FMA contraction.
template <typename T>
struct Roi {
  int64_t b;
  T start_h, start_w, roi_h, roi_w, bin_h, bin_w, count;
  int64_t gh, gw;  // samples per bin, >= 0

  inline void init(const T* r, const Pool& p) {
    b = static_cast<int64_t>(r[0]);
    const T scale = static_cast<T>(p.spatial_scale);
    const T off = p.aligned ? T(0.5) : T(0);
    start_w = r[1] * scale - off;
    start_h = r[2] * scale - off;
    const T end_w = r[3] * scale - off, end_h = r[4] * scale - off;
    roi_w = end_w - start_w;
    roi_h = end_h - start_h;
    if (!p.aligned) {  // legacy mode: force malformed RoIs to be 1x1
      roi_w = std::max(roi_w, T(1));
      roi_h = std::max(roi_h, T(1));
    }
    bin_h = roi_h / static_cast<T>(p.PH);
    bin_w = roi_w / static_cast<T>(p.PW);
    // coordinates are finite (checked); the cap only keeps absurd boxes from overflowing int64
    gh = p.sampling_ratio > 0 ? p.sampling_ratio : adaptive_grid(roi_h, p.PH);
    gw = p.sampling_ratio > 0 ? p.sampling_ratio : adaptive_grid(roi_w, p.PW);
    count = static_cast<T>(std::max(static_cast<double>(gh) * static_cast<double>(gw), 1.0));
    gh = std::max<int64_t>(gh, 0);
    gw = std::max<int64_t>(gw, 0);
  }
  static int64_t adaptive_grid(T size, int64_t bins) {
    const double g = std::ceil(static_cast<double>(size / static_cast<T>(bins)));
    const double cap = static_cast<double>(kMaxGrid);
    if (!(g == g)) return 0;  // NaN size (coordinates * spatial_scale overflowed): no samples
    return static_cast<int64_t>(std::max(-cap, std::min(g, cap)));
  }
  // Sample indices [lo, hi) of a bin starting at `origin` (extent `bin`, `g` samples) whose position
  // can lie in [-1, size]; the others read 0 and are skipped, so a huge RoI with an adaptive grid
  // costs about one sample per map pixel instead of ceil(roi size / bins)^2. Small grids are
  // walked whole (every sample still gets the exact per-sample test), as are non-finite origins
  // (NaN/inf offsets), whose samples all fail that test.
  static void range(T origin, T bin, int64_t g, int64_t size, int64_t& lo, int64_t& hi) {
    lo = 0;
    hi = g;
    if (g <= kWalkWhole) return;
    const double step = static_cast<double>(bin) / static_cast<double>(g);
    const double a = (-1.0 - origin) / step - 2.5, b = (static_cast<double>(size) - origin) / step + 2.0;
    if (!(std::isfinite(a) && std::isfinite(b) && step > 0)) {
      hi = std::isfinite(origin) ? g : 0;
      return;
    }
    lo = a > 0 ? static_cast<int64_t>(std::min(a, static_cast<double>(g))) : 0;
    hi = b > 0 ? static_cast<int64_t>(std::min(b, static_cast<double>(g))) : 0;
    hi = std::max(hi, lo);
  }
  inline T sample_y(int64_t i, int64_t iy, T shift) const {
    return start_h + shift + static_cast<T>(i) * bin_h +
           static_cast<T>(iy + .5f) * bin_h / static_cast<T>(gh);
  }
  inline T sample_x(int64_t j, int64_t ix, T shift) const {
    return start_w + shift + static_cast<T>(j) * bin_w +
           static_cast<T>(ix + .5f) * bin_w / static_cast<T>(gw);
  }
};

// The four bilinear corners of one sample (torchvision's roi_align rule) and the derivatives of
// their weights w.r.t. the sample position (zero along an axis where the position was clamped).
template <typename T>
struct Sample {
  bool valid;
  int64_t pos[4];  // y * W + x
  T w[4], dwdy[4], dwdx[4];

  inline void set(T y, T x, int64_t H, int64_t W) {
    // positive form: NaN fails it and reads as zero
    valid = H > 0 && W > 0 && y >= T(-1) && y <= T(H) && x >= T(-1) && x <= T(W);
    if (!valid) return;
    bool cy = false, cx = false;
    if (y <= 0) { y = 0; cy = true; }
    if (x <= 0) { x = 0; cx = true; }
    int64_t yl = static_cast<int64_t>(y), xl = static_cast<int64_t>(x), yh, xh;
    if (yl >= H - 1) { yh = yl = H - 1; y = static_cast<T>(yl); cy = true; } else { yh = yl + 1; }
    if (xl >= W - 1) { xh = xl = W - 1; x = static_cast<T>(xl); cx = true; } else { xh = xl + 1; }
    const T ly = y - static_cast<T>(yl), lx = x - static_cast<T>(xl);
    const T hy = T(1) - ly, hx = T(1) - lx;
    pos[0] = yl * W + xl; pos[1] = yl * W + xh; pos[2] = yh * W + xl; pos[3] = yh * W + xh;
    w[0] = hy * hx; w[1] = hy * lx; w[2] = ly * hx; w[3] = ly * lx;
    const T ky = cy ? T(0) : T(1), kx = cx ? T(0) : T(1);
    dwdy[0] = -hx * ky; dwdy[1] = -lx * ky; dwdy[2] = hx * ky; dwdy[3] = lx * ky;
    dwdx[0] = -hy * kx; dwdx[1] = hy * kx; dwdx[2] = -ly * kx; dwdx[3] = ly * kx;
  }
};

// Per-bin shift and mask of RoI k.
template <typename T>
struct Deform {
  const T* offset;  // [K, 2, PP] or nullptr
  const T* mask;    // [K, 1, PP] or nullptr
  T gamma;
  int64_t PP;
  inline T dx(int64_t k, int64_t bin, const Roi<T>& r) const {
    return offset ? gamma * offset[(k * 2) * PP + bin] * r.roi_w : T(0);
  }
  inline T dy(int64_t k, int64_t bin, const Roi<T>& r) const {
    return offset ? gamma * offset[(k * 2 + 1) * PP + bin] * r.roi_h : T(0);
  }
  inline T m(int64_t k, int64_t bin) const { return mask ? mask[k * PP + bin] : T(1); }
};

// A vectorised dot product; its summation order is fixed at compile time, so it is deterministic.
template <typename T>
inline T dot_product(const T* a, const T* b, int64_t n) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t c = 0; c < n; ++c) dot += a[c] * b[c];
  return dot;
}

at::ScalarType compute_type(at::ScalarType t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t), "deform_roi_pool: input must be floating-point, got ", t);
  return (t == at::kDouble) ? at::kDouble : at::kFloat;  // half/bfloat16 computed in float32
}

Pool make_pool(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
               const std::optional<at::Tensor>& mask, int64_t pooled_height, int64_t pooled_width,
               double spatial_scale, int64_t sampling_ratio, double gamma, bool aligned) {
  TORCH_CHECK_VALUE(input.dim() == 4, "deform_roi_pool: input must be 4-D [N, C, H, W], got ",
                    input.dim(), "-D with shape ", input.sizes());
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5,
                    "deform_roi_pool: rois must have shape [K, 5] (batch index, x1, y1, x2, y2), got ",
                    rois.sizes());
  TORCH_CHECK_VALUE(pooled_height > 0 && pooled_width > 0,
                    "deform_roi_pool: output size must be positive, got ", pooled_height, "x", pooled_width);
  TORCH_CHECK_VALUE(spatial_scale > 0 && std::isfinite(spatial_scale),
                    "deform_roi_pool: spatial_scale must be positive and finite, got ", spatial_scale);
  TORCH_CHECK_VALUE(std::isfinite(gamma), "deform_roi_pool: gamma must be finite, got ", gamma);
  compute_type(input.scalar_type());
  TORCH_CHECK_TYPE(rois.scalar_type() == input.scalar_type(), "deform_roi_pool: rois dtype ",
                   rois.scalar_type(), " differs from input dtype ", input.scalar_type());
  Pool p;
  p.N = input.size(0); p.C = input.size(1); p.H = input.size(2); p.W = input.size(3);
  p.K = rois.size(0); p.PH = pooled_height; p.PW = pooled_width; p.PP = p.PH * p.PW;
  p.spatial_scale = spatial_scale; p.gamma = gamma; p.sampling_ratio = sampling_ratio; p.aligned = aligned;
  if (offset) {
    TORCH_CHECK_VALUE(offset->sizes() == at::IntArrayRef({p.K, 2, p.PH, p.PW}),
                      "deform_roi_pool: offset must have shape [", p.K, ", 2, ", p.PH, ", ", p.PW,
                      "] (rois, xy, pooled height, pooled width), got ", offset->sizes());
    TORCH_CHECK_TYPE(offset->scalar_type() == input.scalar_type(), "deform_roi_pool: offset dtype ",
                     offset->scalar_type(), " differs from input dtype ", input.scalar_type());
  }
  if (mask) {
    TORCH_CHECK_VALUE(mask->sizes() == at::IntArrayRef({p.K, 1, p.PH, p.PW}),
                      "deform_roi_pool: mask must have shape [", p.K, ", 1, ", p.PH, ", ", p.PW,
                      "] (rois, 1, pooled height, pooled width), got ", mask->sizes());
    TORCH_CHECK_TYPE(mask->scalar_type() == input.scalar_type(), "deform_roi_pool: mask dtype ",
                     mask->scalar_type(), " differs from input dtype ", input.scalar_type());
  }
  // RoI values: finite coordinates and an integer batch index in [0, N). torchvision reads out of
  // bounds (or crashes) on these; the checks are cheap next to the pooling.
  const at::Tensor r = rois.to(at::kDouble).contiguous();
  const double* rp = r.data_ptr<double>();
  for (int64_t k = 0; k < p.K; ++k) {
    const double* row = rp + 5 * k;
    for (int c = 1; c < 5; ++c) {
      TORCH_CHECK_VALUE(std::isfinite(row[c]), "deform_roi_pool: rois must have finite coordinates, got ",
                        row[c], " in rois[", k, ", ", c, "]");
    }
    TORCH_CHECK_VALUE(row[0] >= 0 && row[0] < static_cast<double>(p.N) && row[0] == std::floor(row[0]),
                      "deform_roi_pool: rois[", k, ", 0] (batch index) must be an integer in [0, ", p.N,
                      "), got ", row[0]);
  }
  return p;
}

at::Tensor deform_roi_pool_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                       const std::optional<at::Tensor>& offset,
                                       const std::optional<at::Tensor>& mask, int64_t pooled_height,
                                       int64_t pooled_width, double spatial_scale, int64_t sampling_ratio,
                                       double gamma, bool aligned) {
  const Pool p = make_pool(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale,
                           sampling_ratio, gamma, aligned);
  const auto ct = compute_type(input.scalar_type());
  at::Tensor out = at::empty({p.K, p.C, p.PH, p.PW}, input.options().dtype(ct));
  if (p.K == 0 || p.C == 0) return out.to(input.scalar_type());
  const at::Tensor x_cl = input.to(ct).permute({0, 2, 3, 1}).contiguous();  // [N, H, W, C]
  const at::Tensor rois_c = rois.to(ct).contiguous();
  const at::Tensor off_c = offset ? offset->to(ct).contiguous() : at::Tensor();
  const at::Tensor mask_c = mask ? mask->to(ct).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(ct, "dcnv2_deform_roi_pool_forward", [&] {
    using T = scalar_t;
    const Deform<T> def{offset ? off_c.data_ptr<T>() : nullptr, mask ? mask_c.data_ptr<T>() : nullptr,
                        static_cast<T>(gamma), p.PP};
    const T* img = x_cl.data_ptr<T>();
    const T* rp = rois_c.data_ptr<T>();
    T* outp = out.data_ptr<T>();
    const int64_t C = p.C, PP = p.PP, HW = p.H * p.W;
    at::parallel_for(0, p.K, 1, [&](int64_t k0, int64_t k1) {
      std::vector<T> acc(PP * C);  // one RoI's bins, channels-last
      Roi<T> r;
      Sample<T> s;
      for (int64_t k = k0; k < k1; ++k) {
        r.init(rp + 5 * k, p);
        const T* base = img + r.b * HW * C;
        for (int64_t i = 0; i < p.PH; ++i) {
          for (int64_t j = 0; j < p.PW; ++j) {
            const int64_t bin = i * p.PW + j;
            T* a = acc.data() + bin * C;
            std::fill(a, a + C, T(0));
            const T sy = def.dy(k, bin, r), sx = def.dx(k, bin, r);
            int64_t y0, y1, x0, x1;
            Roi<T>::range(r.start_h + sy + static_cast<T>(i) * r.bin_h, r.bin_h, r.gh, p.H, y0, y1);
            Roi<T>::range(r.start_w + sx + static_cast<T>(j) * r.bin_w, r.bin_w, r.gw, p.W, x0, x1);
            for (int64_t iy = y0; iy < y1; ++iy) {
              const T y = r.sample_y(i, iy, sy);
              for (int64_t ix = x0; ix < x1; ++ix) {
                s.set(y, r.sample_x(j, ix, sx), p.H, p.W);
                if (!s.valid) continue;
                const T *v0 = base + s.pos[0] * C, *v1 = base + s.pos[1] * C;
                const T *v2 = base + s.pos[2] * C, *v3 = base + s.pos[3] * C;
                const T w0 = s.w[0], w1 = s.w[1], w2 = s.w[2], w3 = s.w[3];
                for (int64_t c = 0; c < C; ++c) a[c] += w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
              }
            }
            const T m = def.m(k, bin);
            if (def.mask) {
              for (int64_t c = 0; c < C; ++c) a[c] = a[c] / r.count * m;
            } else {
              for (int64_t c = 0; c < C; ++c) a[c] /= r.count;
            }
          }
        }
        T* o = outp + k * C * PP;  // [C, PP]
        for (int64_t c = 0; c < C; ++c)
          for (int64_t bin = 0; bin < PP; ++bin) o[c * PP + bin] = acc[bin * C + c];
      }
    });
  });
  return out.to(input.scalar_type());
}

// Channel block width of the backward partition: a function of C only (determinism), at least 16
// floats (a cache line, so blocks don't share lines), aiming at 8 or more blocks for parallelism.
int64_t channel_block(int64_t C) {
  const int64_t target = (C + 7) / 8;
  return std::min<int64_t>(64, std::max<int64_t>(16, (target + 15) / 16 * 16));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_roi_pool_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask, int64_t pooled_height,
    int64_t pooled_width, double spatial_scale, int64_t sampling_ratio, double gamma, bool aligned) {
  const Pool p = make_pool(input, rois, offset, mask, pooled_height, pooled_width, spatial_scale,
                           sampling_ratio, gamma, aligned);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({p.K, p.C, p.PH, p.PW}),
                    "deform_roi_pool backward: grad_output must have shape [", p.K, ", ", p.C, ", ", p.PH,
                    ", ", p.PW, "], got ", grad_output.sizes());
  const auto ct = compute_type(input.scalar_type());
  const auto opts = input.options().dtype(ct);
  at::Tensor gin_cl = at::zeros({p.N, p.H, p.W, p.C}, opts);
  at::Tensor goff = offset ? at::zeros({p.K, 2, p.PP}, opts) : at::Tensor();
  at::Tensor gmask = mask ? at::zeros({p.K, 1, p.PP}, opts) : at::Tensor();

  if (p.K > 0 && p.C > 0) {
    const bool need_pos = offset.has_value() || mask.has_value();
    const at::Tensor x_cl = input.to(ct).permute({0, 2, 3, 1}).contiguous();
    const at::Tensor go = grad_output.to(ct).contiguous();  // [K, C, PP]
    const at::Tensor rois_c = rois.to(ct).contiguous();
    const at::Tensor off_c = offset ? offset->to(ct).contiguous() : at::Tensor();
    const at::Tensor mask_c = mask ? mask->to(ct).contiguous() : at::Tensor();
    const int64_t CB = channel_block(p.C), NB = (p.C + CB - 1) / CB;
    // per block, RoI and bin: partial (d/dx, d/dy, d/dmask) over the block's channels
    at::Tensor partial = need_pos ? at::empty({NB, p.K, p.PP, 3}, opts) : at::Tensor();

    AT_DISPATCH_FLOATING_TYPES(ct, "dcnv2_deform_roi_pool_backward", [&] {
      using T = scalar_t;
      const Deform<T> def{offset ? off_c.data_ptr<T>() : nullptr, mask ? mask_c.data_ptr<T>() : nullptr,
                          static_cast<T>(gamma), p.PP};
      const T* img = x_cl.data_ptr<T>();
      const T* gop = go.data_ptr<T>();
      const T* rp = rois_c.data_ptr<T>();
      T* gimg = gin_cl.data_ptr<T>();
      T* part = need_pos ? partial.data_ptr<T>() : nullptr;
      const int64_t C = p.C, PP = p.PP, HW = p.H * p.W;

      at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
        std::vector<T> gt(PP * CB);  // grad_output of one RoI and block, [PP, len], divided by count
        Roi<T> r;
        Sample<T> s;
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t c0 = blk * CB, len = std::min(CB, C - c0);
          for (int64_t k = 0; k < p.K; ++k) {
            r.init(rp + 5 * k, p);
            const T inv = T(1) / r.count;
            const T* src = gop + (k * C + c0) * PP;  // [len, PP], contiguous
            for (int64_t c = 0; c < len; ++c)
              for (int64_t bin = 0; bin < PP; ++bin) gt[bin * len + c] = src[c * PP + bin] * inv;
            const int64_t off_b = r.b * HW * C + c0;
            for (int64_t i = 0; i < p.PH; ++i) {
              for (int64_t j = 0; j < p.PW; ++j) {
                const int64_t bin = i * p.PW + j;
                const T* g = gt.data() + bin * len;
                const T sy = def.dy(k, bin, r), sx = def.dx(k, bin, r), m = def.m(k, bin);
                T px = 0, py = 0, pm = 0;
                int64_t y0, y1, x0, x1;
                Roi<T>::range(r.start_h + sy + static_cast<T>(i) * r.bin_h, r.bin_h, r.gh, p.H, y0, y1);
                Roi<T>::range(r.start_w + sx + static_cast<T>(j) * r.bin_w, r.bin_w, r.gw, p.W, x0, x1);
                for (int64_t iy = y0; iy < y1; ++iy) {
                  const T y = r.sample_y(i, iy, sy);
                  for (int64_t ix = x0; ix < x1; ++ix) {
                    s.set(y, r.sample_x(j, ix, sx), p.H, p.W);
                    if (!s.valid) continue;
                    for (int t = 0; t < 4; ++t) {
                      const int64_t pix = off_b + s.pos[t] * C;
                      T* d = gimg + pix;
                      const T wm = s.w[t] * m;
                      for (int64_t c = 0; c < len; ++c) d[c] += wm * g[c];
                      if (need_pos) {
                        const T* v = img + pix;
                        const T dot = dot_product(g, v, len);
                        px += s.dwdx[t] * dot;
                        py += s.dwdy[t] * dot;
                        pm += s.w[t] * dot;
                      }
                    }
                  }
                }
                if (need_pos) {
                  T* q = part + ((blk * p.K + k) * PP + bin) * 3;
                  q[0] = px; q[1] = py; q[2] = pm;
                }
              }
            }
          }
        }
      });

      if (need_pos) {  // reduce the block partials in block order (deterministic)
        T* go_p = offset ? goff.data_ptr<T>() : nullptr;
        T* gm_p = mask ? gmask.data_ptr<T>() : nullptr;
        at::parallel_for(0, p.K, 16, [&](int64_t k0, int64_t k1) {
          Roi<T> r;
          for (int64_t k = k0; k < k1; ++k) {
            r.init(rp + 5 * k, p);
            for (int64_t bin = 0; bin < PP; ++bin) {
              T sx = 0, sy = 0, sm = 0;
              for (int64_t blk = 0; blk < NB; ++blk) {
                const T* q = part + ((blk * p.K + k) * PP + bin) * 3;
                sx += q[0]; sy += q[1]; sm += q[2];
              }
              const T m = def.m(k, bin);
              if (go_p) {
                go_p[(k * 2) * PP + bin] = sx * m * def.gamma * r.roi_w;
                go_p[(k * 2 + 1) * PP + bin] = sy * m * def.gamma * r.roi_h;
              }
              if (gm_p) gm_p[k * PP + bin] = sm;
            }
          }
        });
      }
    });
  }

  const auto in_t = input.scalar_type();
  at::Tensor grad_input = gin_cl.permute({0, 3, 1, 2}).contiguous().to(in_t);
  at::Tensor grad_offset = offset ? goff.view({p.K, 2, p.PH, p.PW}).to(in_t) : at::empty({0}, input.options());
  at::Tensor grad_mask = mask ? gmask.view({p.K, 1, p.PH, p.PW}).to(in_t) : at::empty({0}, input.options());
  return {grad_input, grad_offset, grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("deform_roi_pool", &deform_roi_pool_forward_cpu);
  m.impl("_deform_roi_pool_backward", &deform_roi_pool_backward_cpu);
}

}  // namespace dcnv2
