// CPU kernel of the modulated deformable convolution (DCNv2, eq. 1 of the paper; DCNv1 without mask).
//
// Layout: the input is read channels-last ([N, H, W, C], one copy of the batch), so each bilinear
// corner is a contiguous channel vector. The output pixels of the whole batch form one range
// [0, N * Ho * Wo) that is cut into tiles whose column buffer ([P, G, K, C/G]) stays within a few MB;
// a tile may span several images, so small maps (a batch of 64 crops at 3x3) still make GEMMs of
// hundreds of rows instead of one tiny GEMM per image. One GEMM per tile and group, producing
// pixel-major rows (oneDNN for float32, see RowGemm) that one transposing copy puts into NCHW. The
// backward's tile boundaries depend on the shapes only (not on the thread count); a forward with several
// threads cuts its tiles to a multiple of the thread count and gives each thread its own share (see
// forward_tiles). The float32 forward of a weight that fits in 1 MB skips the tiles: blocks of 64 output pixels,
// each filled and multiplied at once by oneDNN's brgemm micro-kernel while its columns are in cache (see
// forward_blocks).
//
// Backward recomputes the column tiles for grad_weight (tiles of their own, up to 16 MB, so that its GEMM
// writes its large result few times), and per 4 MB tile forms grad_col with one GEMM and then makes
// one fused pass per (pixel, tap) that scatters grad_input and takes the four corner dot products
// from which grad_offset and grad_mask follow (a tap whose four corners lie inside reads its run of
// grad_col once for the four, see four_corners). The pass is parallel over fixed channel blocks (each
// block owns its slice of grad_input), and per-block partials of the offset/mask gradients are
// reduced in block order: no atomics, and the partition does not depend on the thread count, so two
// runs are bit-identical. Only the gradients asked for are computed: the weight's alone skips grad_col and the
// scatter pass, the input's alone the pass's corner dot products, the offsets' alone its input writes.
//
// bfloat16 forward (the fast path): offsets, masks and the bilinear interpolation run in float32, the
// column tile is stored in bfloat16 (rounded to nearest even) and the tile GEMM is oneDNN's bf16
// matmul with float32 accumulation, so a bf16 layer gains what a dense bf16 convolution gains. The
// bf16 backward does the same for its column tiles, grad_col and both GEMMs (grad_weight accumulates the
// tiles' bf16 GEMM results in float32); its scatter pass and all gradient sums run in float32. Half
// precision computes in float32 throughout and rounds the results.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/native/CPUBlas.h>

#include "weight_cache.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace dcnv2 {
namespace {

// Column tiles: at most 4 MB in the backward; 2 MB, but never fewer than 256 rows, in the forward. In-process
// A/B on the 2-core AVX-512 machine, forward against the dense conv: the demo's small maps 5-8 % faster with
// 2 MB (a batch of 8 at 16x16 1.30 -> 1.24x, 64 at 12x12 stride 2 1.43 -> 1.34x, 64 at 6x6 1.37 -> 1.27x),
// c3/c4/c5 level; the 256-row floor keeps c5's wide rows (18 KB each) in GEMMs of over 200 rows, below which
// they ran 5-10 % slower. The backward was level or slower with 2 MB tiles, so it keeps 4 MB.
constexpr int64_t kColumnBudgetBytes = 4 << 20;
// The backward's weight gradient has tiles of its own, up to 16 MB of columns: its GEMM (grad_out^T @ columns)
// writes the whole [Cout, K * Cg] result once per tile, which on wide rows outweighs the GEMM's own work with
// 4 MB tiles (c5, float32: 5 tiles of 227 rows take 26.6 ms against 23.2 for one, in oneDNN alone).
constexpr int64_t kWeightGradColumnBudgetBytes = 16 << 20;
constexpr int64_t kForwardColumnBudgetBytes = 2 << 20;
constexpr int64_t kForwardMinTileRows = 256;
constexpr int64_t kMinTilePixels = 64;
// The backward's partition of grad_input: blocks of 64 channels, of 32 where C < 128 (so there are still two
// blocks for two threads). On the 2-core AVX-512 machine, 64 rather than 32 made c3's forward+backward about
// 10 % faster (one pass over the tile's corners per 64 channels, longer runs of each corner's row), and a
// batch of 64 at 12x12 about 15 %; one 128-channel block was no faster on C >= 256.
constexpr int64_t kChannelBlock = 64;
constexpr int64_t kChannelBlockNarrow = 32;

// Element access of the kernels' buffers: float32/float64 as they are, bfloat16 as its raw bits
// (uint16_t), widened to float32 on load and rounded to nearest even on store (NaN stays NaN). Plain
// integer code, so the compiler vectorises the loops that use it.
template <typename T>
inline T load_val(T v) { return v; }
inline float load_val(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
template <typename D, typename T>
inline D store_val(T v) { return v; }
template <>
inline uint16_t store_val<uint16_t, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}
inline uint16_t* bf16_bits(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// dst[q] = w0 s0[q] + w1 s1[q] + w2 s2[q] + w3 s3[q] in T, stored as D: the four-corner bilinear
// sample of a channel run. bf16 columns get an AVX2 loop of their own (GCC's vectorisation of the
// rounding and the 32 -> 16 bit narrowing runs at half the float32 speed); the same rounding as
// store_val, so the tail and the vector lanes agree.
template <typename T, typename S, typename D>
inline void bilinear4(D* __restrict__ dst, const S* s0, const S* s1, const S* s2, const S* s3, T w0, T w1,
                      T w2, T w3, int64_t len) {
  for (int64_t q = 0; q < len; ++q) {
    dst[q] = store_val<D, T>(w0 * load_val(s0[q]) + w1 * load_val(s1[q]) + w2 * load_val(s2[q]) +
                             w3 * load_val(s3[q]));
  }
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
// 8 floats -> 8 bf16, round to nearest even, NaN -> 0x7FC0 (as store_val)
inline __m128i round8_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // values < 2^16
}
template <typename S>
inline void bilinear4_bf16(uint16_t* __restrict__ dst, const S* s0, const S* s1, const S* s2, const S* s3,
                           float w0, float w1, float w2, float w3, int64_t len) {
  const __m256 v0 = _mm256_set1_ps(w0), v1 = _mm256_set1_ps(w1), v2 = _mm256_set1_ps(w2), v3 = _mm256_set1_ps(w3);
  int64_t q = 0;
  for (; q + 8 <= len; q += 8) {
    __m256 a = _mm256_mul_ps(v0, load8(s0 + q));
    a = _mm256_fmadd_ps(v1, load8(s1 + q), a);
    a = _mm256_fmadd_ps(v2, load8(s2 + q), a);
    a = _mm256_fmadd_ps(v3, load8(s3 + q), a);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + q), round8_bf16(a));
  }
  for (; q < len; ++q) {
    float a = w0 * load_val(s0[q]);
    a = std::fma(w1, load_val(s1[q]), a);
    a = std::fma(w2, load_val(s2[q]), a);
    a = std::fma(w3, load_val(s3[q]), a);
    dst[q] = store_val<uint16_t, float>(a);
  }
}
template <>
inline void bilinear4<float, uint16_t, uint16_t>(uint16_t* __restrict__ dst, const uint16_t* s0, const uint16_t* s1,
                                                 const uint16_t* s2, const uint16_t* s3, float w0, float w1,
                                                 float w2, float w3, int64_t len) {
  bilinear4_bf16(dst, s0, s1, s2, s3, w0, w1, w2, w3, len);
}
template <>
inline void bilinear4<float, float, uint16_t>(uint16_t* __restrict__ dst, const float* s0, const float* s1,
                                              const float* s2, const float* s3, float w0, float w1, float w2,
                                              float w3, int64_t len) {
  bilinear4_bf16(dst, s0, s1, s2, s3, w0, w1, w2, w3, len);
}
#endif

// AVX-512 versions of the four-corner sample into bfloat16 columns (16 lanes, masked tails), compiled for
// that target alone and chosen at run time (wide_fill), so the rest of the file keeps its AVX2 code. The
// same operations in the same order as bilinear4_bf16 (w0 s0, then fused w1 s1, w2 s2, w3 s3; rounding as
// store_val), so the columns are bit-identical either way; the bf16 c3 forward runs 3-5 % faster. float32
// columns keep the compiler's AVX2 loop: a 16-lane version measured no faster there (the float32 fill is a
// smaller share of the call) and fuses the sum in another order.
#if defined(__AVX2__) && defined(__FMA__) && defined(__x86_64__) && defined(__GNUC__)
#define DCNV2_HAVE_AVX512_FILL 1
#define DCNV2_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// whether this CPU runs the AVX-512 loops (DCNV2_FILL=avx2 keeps the AVX2 ones: benchmarks, debugging)
bool wide_fill() {
  static const bool on = [] {
    const char* env = std::getenv("DCNV2_FILL");
    if (env && std::string(env) == "avx2") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return on;
}

DCNV2_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
DCNV2_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
template <typename S>
DCNV2_AVX512 inline __m512 bilinear16(const S* s0, const S* s1, const S* s2, const S* s3, __m512 v0, __m512 v1,
                                      __m512 v2, __m512 v3, __mmask16 m) {
  __m512 a = _mm512_mul_ps(v0, load16(s0, m));
  a = _mm512_fmadd_ps(v1, load16(s1, m), a);
  a = _mm512_fmadd_ps(v2, load16(s2, m), a);
  return _mm512_fmadd_ps(v3, load16(s3, m), a);
}
// 16 floats rounded to bf16 as store_val rounds (to nearest even, NaN -> 0x7FC0), each left in the high half of its
// 32-bit lane
DCNV2_AVX512 inline __m512i round16_bf16_high(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}
// 16 floats -> 16 bf16, round to nearest even, NaN -> 0x7FC0 (as store_val)
DCNV2_AVX512 inline __m256i round16_bf16(__m512 v) {
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(round16_bf16_high(v), 16));
}
// 32 bf16 at p as two float32 vectors, the even elements (0, 2, ...) and the odd ones: a bf16 is the high half of
// its float32, so one load and one shift or mask widen both (against a load, a zero-extension and a shift per
// 16 elements)
DCNV2_AVX512 inline void load32_split(const uint16_t* p, __m512& even, __m512& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
template <typename S>
DCNV2_AVX512 void bilinear4_wide(uint16_t* __restrict__ dst, const S* s0, const S* s1, const S* s2, const S* s3,
                                 float w0, float w1, float w2, float w3, int64_t len) {
  const __m512 v0 = _mm512_set1_ps(w0), v1 = _mm512_set1_ps(w1), v2 = _mm512_set1_ps(w2), v3 = _mm512_set1_ps(w3);
  int64_t q = 0;
  if constexpr (std::is_same<S, uint16_t>::value) {
    // a bf16 image, 32 channels at a time as even and odd halves: the same products, sums and rounding per
    // element as the 16-lane loop below, so the same bits, with a quarter fewer instructions (the bf16 fill
    // is bound by them, not by memory)
    for (; q + 32 <= len; q += 32) {
      __m512 e0, o0, e1, o1, e2, o2, e3, o3;
      load32_split(s0 + q, e0, o0);
      load32_split(s1 + q, e1, o1);
      load32_split(s2 + q, e2, o2);
      load32_split(s3 + q, e3, o3);
      __m512 e = _mm512_mul_ps(v0, e0), o = _mm512_mul_ps(v0, o0);
      e = _mm512_fmadd_ps(v1, e1, e);
      o = _mm512_fmadd_ps(v1, o1, o);
      e = _mm512_fmadd_ps(v2, e2, e);
      o = _mm512_fmadd_ps(v2, o2, o);
      e = _mm512_fmadd_ps(v3, e3, e);
      o = _mm512_fmadd_ps(v3, o3, o);
      // even elements from the low 16-bit words, odd ones from the high words
      const __m512i even = _mm512_srli_epi32(round16_bf16_high(e), 16);
      _mm512_storeu_si512(dst + q, _mm512_mask_blend_epi16(0xAAAAAAAAu, even, round16_bf16_high(o)));
    }
  }
  for (; q < len; q += 16) {
    const __mmask16 m = len - q >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - q)) - 1);
    _mm256_mask_storeu_epi16(dst + q, m, round16_bf16(bilinear16(s0 + q, s1 + q, s2 + q, s3 + q, v0, v1, v2, v3, m)));
  }
}
#endif

struct Geometry {
  int64_t N, C, H, W, Cout, G, OG, kh, kw, K, sh, sw, ph, pw, dh, dw, Ho, Wo, L;
  int64_t Cg() const { return C / G; }
  int64_t Cog() const { return C / OG; }
  int64_t Coutg() const { return Cout / G; }
};

// Up to four valid bilinear corners of one sample. Samples outside (-1, H) x (-1, W), including
// NaN/inf positions (the checks are written so that NaN fails them), have none and read as zero.
template <typename T>
struct Corners {
  int n = 0;
  int64_t idx[4];  // pixel index y * W + x
  T w[4];          // bilinear weight
  T dwdy[4];       // d w / d y
  T dwdx[4];       // d w / d x

  inline void set(T y, T x, int64_t H, int64_t W) {
    n = 0;
    if (!(y > T(-1) && y < T(H) && x > T(-1) && x < T(W))) return;
    const T yf = std::floor(y), xf = std::floor(x);
    const int64_t y0 = static_cast<int64_t>(yf), x0 = static_cast<int64_t>(xf);
    const T ly = y - yf, lx = x - xf, hy = T(1) - ly, hx = T(1) - lx;
    const bool top = y0 >= 0, bottom = y0 + 1 <= H - 1, left = x0 >= 0, right = x0 + 1 <= W - 1;
    if (top && left) add(y0 * W + x0, hy * hx, -hx, -hy);
    if (top && right) add(y0 * W + x0 + 1, hy * lx, -lx, hy);
    if (bottom && left) add((y0 + 1) * W + x0, ly * hx, hx, -ly);
    if (bottom && right) add((y0 + 1) * W + x0 + 1, ly * lx, lx, ly);
  }
  inline void add(int64_t i, T weight, T gy, T gx) {
    idx[n] = i;
    w[n] = weight;
    dwdy[n] = gy;
    dwdx[n] = gx;
    ++n;
  }
};

// One (pixel, offset group, tap) sample in the backward's table of a tile, compact: its top-left corner's
// pixel index, which corners lie inside, its fractional position and its mask. expand() gives the Corners that
// Corners::set gives (the same operations on the same values, so the same bits) from a quarter of the bytes
// (24 instead of 96 a float32 sample: c3's 910-pixel tile holds 197 KB of them, not 786), which the corner pass
// writes and every channel block reads again.
template <typename T>
struct TapSample {
  int64_t idx0;    // y0 * W + x0 of the top-left corner
  T ly, lx, m;     // fractional position, mask
  uint8_t inside;  // bits 0-3: top-left, top-right, bottom-left, bottom-right corner inside; 0 reads as zero

  inline void set(T y, T x, T mask, int64_t H, int64_t W) {
    m = mask;
    inside = 0;
    if (!(y > T(-1) && y < T(H) && x > T(-1) && x < T(W))) return;  // as Corners::set (NaN fails it)
    const T yf = std::floor(y), xf = std::floor(x);
    const int64_t y0 = static_cast<int64_t>(yf), x0 = static_cast<int64_t>(xf);
    ly = y - yf;
    lx = x - xf;
    idx0 = y0 * W + x0;
    const bool top = y0 >= 0, bottom = y0 + 1 <= H - 1, left = x0 >= 0, right = x0 + 1 <= W - 1;
    inside = static_cast<uint8_t>((top && left) | (top && right) << 1 | (bottom && left) << 2 | (bottom && right) << 3);
  }
  inline void expand(Corners<T>& cr, int64_t W) const {
    cr.n = 0;
    if (!inside) return;
    const T hy = T(1) - ly, hx = T(1) - lx;
    if (inside & 1) cr.add(idx0, hy * hx, -hx, -hy);
    if (inside & 2) cr.add(idx0 + 1, hy * lx, -lx, hy);
    if (inside & 4) cr.add(idx0 + W, ly * hx, hx, -ly);
    if (inside & 8) cr.add(idx0 + W + 1, ly * lx, lx, ly);
  }
};

// Reads (dy, dx, mask) of tap k, offset group og at a pixel from channels-last offset/mask rows.
template <typename T>
struct TapReader {
  const Geometry& g;
  const T* off;   // [N, L, OG * 2K]
  const T* mask;  // [N, L, OG * K] or nullptr
  // what every tap of output pixel p of image n shares: its unshifted top-left sampling position and its
  // rows of offsets and masks (the divisions happen here, once per pixel)
  struct Pixel {
    int64_t y0, x0;
    const T* o;
    const T* m;
  };
  inline Pixel pixel(int64_t n, int64_t p) const {
    const int64_t ho = p / g.Wo, wo = p - ho * g.Wo;
    return {ho * g.sh - g.ph, wo * g.sw - g.pw, off + (n * g.L + p) * g.OG * 2 * g.K,
            mask ? mask + (n * g.L + p) * g.OG * g.K : nullptr};
  }
  // tap k = i * kw + j of offset group og
  inline void tap(const Pixel& px, int64_t og, int64_t i, int64_t j, int64_t k, T& y, T& x, T& m) const {
    const T* o = px.o + og * 2 * g.K + 2 * k;
    y = T(px.y0 + i * g.dh) + o[0];
    x = T(px.x0 + j * g.dw) + o[1];
    m = px.m ? px.m[og * g.K + k] : T(1);
  }
};

// dst[n, M] = x[n, Kd] @ w[M, Kd]^T for row-major tiles: the GEMM of every tile.
//
// float32 and bfloat16 go through oneDNN's matmul (the mkldnn ops that torch registers for its own
// linear layers; bf16 products with float32 accumulation for bfloat16). On the CPUs measured it runs
// 2-2.5x faster than the MKL SGEMM behind at::mm for these shapes and reaches the speed of the dense
// convolution's direct kernel. w may be a strided view (a transpose): oneDNN reads it in place. When
// the same weight serves several tiles of many rows it is packed once into oneDNN's blocked layout; for
// one or two tiles (small maps, a batch of crops), or tiles of a few hundred rows (c5's wide columns),
// the reorder costs more than it saves (measured on c5: 5 ms to pack, 0.1 ms saved per 227-row tile).
// float64, or a torch built without oneDNN, uses at::mm. The float32/float64 GEMMs are exact float32/float64 GEMMs; neither
// changes precision.
class RowGemm {
 public:
  static constexpr int64_t kPackFromUses = 4;
  static constexpr int64_t kPackFromRows = 384;

  RowGemm(const at::Tensor& w, int64_t max_rows, int64_t uses) : w_(w) {
    const auto st = w.scalar_type();
    if ((st != at::kFloat && st != at::kBFloat16) || !onednn_enabled()) return;
    const auto& ops = onednn_ops();
    if (!ops) return;
    onednn_ = true;
    if (uses < kPackFromUses || max_rows < kPackFromRows) return;
    packed_ = pack(w, max_rows);
  }

  // Whether weights of type st go through oneDNN and can be packed (see pack).
  static bool packs(at::ScalarType st) {
    return (st == at::kFloat || st == at::kBFloat16) && onednn_enabled() && onednn_ops().has_value();
  }

  // w packed into oneDNN's blocked layout for GEMMs of about max_rows rows (only where packs(w's type)).
  static at::Tensor pack(const at::Tensor& w, int64_t max_rows) {
    torch::jit::Stack stack{w.contiguous(), c10::IValue(max_rows)};
    onednn_ops()->reorder.callBoxed(&stack);
    return stack[0].toTensor();
  }

  // A GEMM with a weight packed earlier (by pack).
  static RowGemm prepacked(const at::Tensor& packed) {
    RowGemm gemm;
    gemm.onednn_ = true;
    gemm.packed_ = packed;
    return gemm;
  }

  // Whether the bfloat16 tiles can take the fast path: oneDNN's bf16 matmul needs AVX-512 (BF16) or
  // AMX and refuses on an AVX2-only CPU, where bfloat16 then computes in float32 (see bf16_fast_path).
  static bool bf16_gemm_available() {
    static const bool ok = [] {
      if (!onednn_enabled()) return true;  // at::mm, which runs bfloat16 anywhere
      if (!onednn_ops()) return false;
      try {
        const auto opts = at::TensorOptions().dtype(at::kBFloat16);
        torch::jit::Stack stack{at::ones({2, 16}, opts), at::ones({16, 16}, opts), c10::IValue(),
                                c10::IValue(std::string("none")),
                                c10::IValue(c10::List<std::optional<at::Scalar>>()),
                                c10::IValue(std::string(""))};
        onednn_ops()->linear.callBoxed(&stack);
      } catch (const std::exception&) {  // c10::Error, or oneDNN's own error type
        return false;
      }
      return true;
    }();
    return ok;
  }

  // [n, M] row-major
  at::Tensor operator()(const at::Tensor& x) const {
    if (!onednn_ || x.size(0) == 0) return at::mm(x, w_.t());
    torch::jit::Stack stack{x.contiguous(), packed_.defined() ? packed_ : w_, c10::IValue(),
                            c10::IValue(std::string("none")),
                            c10::IValue(c10::List<std::optional<at::Scalar>>()),
                            c10::IValue(std::string(""))};
    onednn_ops()->linear.callBoxed(&stack);
    return stack[0].toTensor();
  }

 private:
  struct Ops {
    c10::OperatorHandle reorder, linear;
  };
  static const std::optional<Ops>& onednn_ops() {
    static const std::optional<Ops> ops = []() -> std::optional<Ops> {
      auto& d = c10::Dispatcher::singleton();
      auto reorder = d.findSchema({"mkldnn::_reorder_linear_weight", ""});
      auto linear = d.findSchema({"mkldnn::_linear_pointwise", ""});
      if (!reorder || !linear || !reorder->hasKernelForDispatchKey(c10::DispatchKey::CPU) ||
          !linear->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
        return std::nullopt;
      }
      return Ops{*reorder, *linear};
    }();
    return ops;
  }
  static bool onednn_enabled() {
    static const bool on = [] {
      const char* env = std::getenv("DCNV2_GEMM");  // "blas" forces at::mm (benchmarks, debugging)
      return !(env && std::string(env) == "blas");
    }();
    return on && at::globalContext().userEnabledMkldnn();
  }

  RowGemm() = default;

  at::Tensor w_;
  at::Tensor packed_;
  bool onednn_ = false;
};

// dst[j * ld_d + i] = src[i * ld_s + j] + (add ? add[j] : 0) for i < R, j < Cc: the layout changes of
// the kernel (NCHW <-> pixel-major rows, the weight's tap/channel order), in 64 x 64 blocks run in
// parallel, float32 8 x 8 blocks in AVX2 registers. torch's strided copy of these shapes runs several
// times slower (a permute-contiguous of c3's input, or of c5's weight, cost more than the bilinear fill).
constexpr int64_t kTransposeBlock = 64;

#if defined(__AVX2__) && defined(__FMA__)
inline void transpose8x8(const float* s, int64_t ls, float* d, int64_t ld, const float* add) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ls);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  r[0] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(1, 0, 1, 0));
  r[1] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(3, 2, 3, 2));
  r[2] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(1, 0, 1, 0));
  r[3] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(3, 2, 3, 2));
  r[4] = _mm256_shuffle_ps(t[4], t[6], _MM_SHUFFLE(1, 0, 1, 0));
  r[5] = _mm256_shuffle_ps(t[4], t[6], _MM_SHUFFLE(3, 2, 3, 2));
  r[6] = _mm256_shuffle_ps(t[5], t[7], _MM_SHUFFLE(1, 0, 1, 0));
  r[7] = _mm256_shuffle_ps(t[5], t[7], _MM_SHUFFLE(3, 2, 3, 2));
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) {
    _mm256_storeu_ps(d + i * ld, add ? _mm256_add_ps(t[i], _mm256_set1_ps(add[i])) : t[i]);
  }
}

// The same for 16-bit elements (bfloat16 bits) in SSE registers; with add (float32), each value is widened,
// gets add[j] and is rounded back as store_val rounds.
inline void transpose8x8_bf16(const uint16_t* s, int64_t ls, uint16_t* d, int64_t ld, const float* add) {
  __m128i r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i * ls));
  for (int i = 0; i < 4; ++i) {  // rows 2i, 2i+1 interleaved: columns 0-3, then 4-7
    t[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3 (h = 0) and 4-7 (h = 1), two columns per register
    r[4 * h + 0] = _mm_unpacklo_epi32(t[4 * h + 0], t[4 * h + 2]);
    r[4 * h + 1] = _mm_unpackhi_epi32(t[4 * h + 0], t[4 * h + 2]);
    r[4 * h + 2] = _mm_unpacklo_epi32(t[4 * h + 1], t[4 * h + 3]);
    r[4 * h + 3] = _mm_unpackhi_epi32(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // columns 2j and 2j+1, all eight rows
    t[2 * j] = _mm_unpacklo_epi64(r[j], r[j + 4]);
    t[2 * j + 1] = _mm_unpackhi_epi64(r[j], r[j + 4]);
  }
  for (int j = 0; j < 8; ++j) {
    __m128i v = t[j];
    if (add) {
      const __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
      v = round8_bf16(_mm256_add_ps(f, _mm256_set1_ps(add[j])));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + j * ld), v);
  }
}

// 16 x 16 bfloat16 bits, no add: the 8 x 8 steps above on 256-bit registers transpose two 8 x 8 blocks at once
// (lane 0 columns 0-7, lane 1 columns 8-15) for rows 0-7 and again for rows 8-15, and one lane exchange puts the
// halves together. Two thirds of the 8 x 8 version's shuffles and half its loads and stores per element; the bits
// move as they are. In-process A/B, bf16 forward: c3 and c4 1-2.5 % faster, a batch of 8 at 16x16 3 %; the
// forward+backward level (the transposes wait on memory more than on shuffles).
inline void transpose16x16_bf16(const uint16_t* s, int64_t ls, uint16_t* d, int64_t ld) {
  __m256i half[2][8];
  for (int h = 0; h < 2; ++h) {
    __m256i r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + (8 * h + i) * ls));
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 2; ++q) {
      r[4 * q + 0] = _mm256_unpacklo_epi32(t[4 * q + 0], t[4 * q + 2]);
      r[4 * q + 1] = _mm256_unpackhi_epi32(t[4 * q + 0], t[4 * q + 2]);
      r[4 * q + 2] = _mm256_unpacklo_epi32(t[4 * q + 1], t[4 * q + 3]);
      r[4 * q + 3] = _mm256_unpackhi_epi32(t[4 * q + 1], t[4 * q + 3]);
    }
    for (int j = 0; j < 4; ++j) {  // half[h][c]: column c of the half's 8 rows in lane 0, column c + 8 in lane 1
      half[h][2 * j] = _mm256_unpacklo_epi64(r[j], r[j + 4]);
      half[h][2 * j + 1] = _mm256_unpackhi_epi64(r[j], r[j + 4]);
    }
  }
  for (int j = 0; j < 8; ++j) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + j * ld), _mm256_permute2x128_si256(half[0][j], half[1][j], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + (j + 8) * ld),
                        _mm256_permute2x128_si256(half[0][j], half[1][j], 0x31));
  }
}
#endif

template <typename T>
inline void transpose_scalar(const T* src, int64_t ld_s, T* dst, int64_t ld_d, int64_t i0, int64_t i1,
                             int64_t j0, int64_t j1, const T* add) {
  for (int64_t j = j0; j < j1; ++j) {
    const T a = add ? add[j] : T(0);
    for (int64_t i = i0; i < i1; ++i) dst[j * ld_d + i] = src[i * ld_s + j] + a;
  }
}

// rows [i0, i1) x columns [j0, j1) of transpose_add
template <typename T>
void transpose_block(const T* src, int64_t ld_s, T* dst, int64_t ld_d, int64_t i0, int64_t i1, int64_t j0,
                     int64_t j1, const T* add) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same<T, float>::value) {
    const int64_t i8 = i0 + (i1 - i0) / 8 * 8, j8 = j0 + (j1 - j0) / 8 * 8;
    for (int64_t j = j0; j < j8; j += 8) {
      for (int64_t i = i0; i < i8; i += 8) {
        transpose8x8(src + i * ld_s + j, ld_s, dst + j * ld_d + i, ld_d, add ? add + j : nullptr);
      }
    }
    transpose_scalar(src, ld_s, dst, ld_d, i8, i1, j0, j8, add);  // the rows below the 8 x 8 blocks
    transpose_scalar(src, ld_s, dst, ld_d, i0, i1, j8, j1, add);  // the columns right of them
    return;
  }
#endif
  transpose_scalar(src, ld_s, dst, ld_d, i0, i1, j0, j1, add);
}

// transpose_add of bfloat16 bits with a float32 add (the bias): dst[j * ld_d + i] = src[i * ld_s + j] + add[j],
// summed in float32 and rounded as store_val rounds; without add the bits move as they are.
void transpose_block_bf16(const uint16_t* src, int64_t ld_s, uint16_t* dst, int64_t ld_d, int64_t i0, int64_t i1,
                          int64_t j0, int64_t j1, const float* add) {
  auto scalar = [&](int64_t ia, int64_t ib, int64_t ja, int64_t jb) {
    for (int64_t j = ja; j < jb; ++j) {
      for (int64_t i = ia; i < ib; ++i) {
        const uint16_t v = src[i * ld_s + j];
        dst[j * ld_d + i] = add ? store_val<uint16_t, float>(load_val(v) + add[j]) : v;
      }
    }
  };
#if defined(__AVX2__) && defined(__FMA__)
  auto blocks8 = [&](int64_t ia, int64_t ib, int64_t ja, int64_t jb) {
    const int64_t i8 = ia + (ib - ia) / 8 * 8, j8 = ja + (jb - ja) / 8 * 8;
    for (int64_t j = ja; j < j8; j += 8) {
      for (int64_t i = ia; i < i8; i += 8) {
        transpose8x8_bf16(src + i * ld_s + j, ld_s, dst + j * ld_d + i, ld_d, add ? add + j : nullptr);
      }
    }
    scalar(i8, ib, ja, j8);
    scalar(ia, ib, j8, jb);
  };
  if (add) {
    blocks8(i0, i1, j0, j1);
    return;
  }
  const int64_t i16 = i0 + (i1 - i0) / 16 * 16, j16 = j0 + (j1 - j0) / 16 * 16;
  for (int64_t j = j0; j < j16; j += 16) {
    for (int64_t i = i0; i < i16; i += 16) transpose16x16_bf16(src + i * ld_s + j, ld_s, dst + j * ld_d + i, ld_d);
  }
  blocks8(i16, i1, j0, j16);  // the rows below the 16 x 16 blocks
  blocks8(i0, i1, j16, j1);   // the columns right of them
#else
  scalar(i0, i1, j0, j1);
#endif
}

// block(n, i0, i1, j0, j1) over the kTransposeBlock-sized blocks of n_img R x Cc matrices, all in one parallel
// region (a batch of 64 small maps used to open one region per image, three times a backward)
template <typename Block>
void for_each_transpose_block(int64_t n_img, int64_t R, int64_t Cc, const Block& block) {
  constexpr int64_t B = kTransposeBlock;
  const int64_t nbi = (R + B - 1) / B, nbj = (Cc + B - 1) / B, per_img = nbi * nbj;
  at::parallel_for(0, n_img * per_img, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / per_img, r = b - n * per_img;
      const int64_t i0 = (r / nbj) * B, j0 = (r % nbj) * B;
      block(n, i0, std::min(R, i0 + B), j0, std::min(Cc, j0 + B));
    }
  });
}

void transpose_add_bf16(const uint16_t* src, int64_t ld_s, uint16_t* dst, int64_t ld_d, int64_t R, int64_t Cc,
                        const float* add) {
  for_each_transpose_block(1, R, Cc, [&](int64_t, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    transpose_block_bf16(src, ld_s, dst, ld_d, i0, i1, j0, j1, add);
  });
}

template <typename T>
void transpose_add(const T* src, int64_t ld_s, T* dst, int64_t ld_d, int64_t R, int64_t Cc, const T* add) {
  for_each_transpose_block(1, R, Cc, [&](int64_t, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    transpose_block(src, ld_s, dst, ld_d, i0, i1, j0, j1, add);
  });
}

// the layout change of a batch: image n's row-major [R, Cc] matrix at src + n * R * Cc into its row-major [Cc, R]
// transpose at dst + n * R * Cc, in one parallel region; T is float/double, or uint16_t for bfloat16 bits
template <typename T>
void transpose_images(const T* src, T* dst, int64_t n_img, int64_t R, int64_t Cc) {
  const int64_t img = R * Cc;
  for_each_transpose_block(n_img, R, Cc, [&](int64_t n, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    if constexpr (std::is_same<T, uint16_t>::value) {
      transpose_block_bf16(src + n * img, Cc, dst + n * img, R, i0, i1, j0, j1, nullptr);
    } else {
      transpose_block<T>(src + n * img, Cc, dst + n * img, R, i0, i1, j0, j1, nullptr);
    }
  });
}

// Scratch buffers that live on between calls, one set per calling thread: the column tiles, the
// channels-last copy of the input and the weight matrix never leave a call, and allocating them
// afresh each time cost a page fault per 4 KB touched (about 4500 per call, 18 MB, on c5, where the
// dense convolution takes 18). A buffer above kScratchMaxBytes is allocated per call instead, so a
// huge input leaves nothing behind. A returned view is valid until the same slot is asked for again.
enum ScratchSlot {
  kScratchColumns, kScratchGradColumns, kScratchInput, kScratchWeight, kScratchPartial, kScratchGradOutput,
  kScratchGradOutputTile, kScratchGradInput, kScratchBlockRows, kScratchWeightRows,
  kScratchSlots
};
constexpr int64_t kScratchMaxBytes = 32 << 20;

at::Tensor scratch(ScratchSlot slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  thread_local std::array<at::Tensor, kScratchSlots> buffers;
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const auto st = opts.dtype().toScalarType();
  if (numel * static_cast<int64_t>(at::elementSize(st)) > kScratchMaxBytes) return at::empty(sizes, opts);
  at::Tensor& buf = buffers[slot];
  if (!buf.defined() || buf.scalar_type() != st || buf.numel() < numel) buf = at::empty({numel}, opts);
  return buf.narrow(0, 0, numel).view(sizes);
}

// Whether a 4-D tensor is laid out channels-last (torch.channels_last) and not also plain contiguous (C == 1
// or a 1x1 map are both): the kernel reads such an input, weight and output gradient in place, and returns
// its output and gradients in the layout of the tensor they belong to, as torch's convolutions do. The fake
// kernels in deform_conv.py apply the same rule (dcnv2.ops._layout).
bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// The batch in channels-last [N, H, W, C] in type t (float32, float64, or bfloat16 whose bits move as they
// are): a view of a channels-last input, else a blocked-transpose copy into the scratch slot.
at::Tensor channels_last_as(at::ScalarType t, const at::Tensor& input, ScratchSlot slot = kScratchInput) {
  const at::Tensor typed = input.to(t);
  if (is_channels_last(typed)) return typed.permute({0, 2, 3, 1});
  const at::Tensor x = typed.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  at::Tensor out = scratch(slot, {N, H, W, C}, x.options());
  if (t == at::kBFloat16) {
    transpose_images(bf16_bits(x), bf16_bits(out), N, C, HW);
  } else {
    AT_DISPATCH_FLOATING_TYPES(t, "dcnv2_channels_last", [&] {
      transpose_images(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, C, HW);
    });
  }
  return out;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the forwards ran since the last reset (tests check which split a call took):
// [0] calls with tile-parallel threads (each thread its own tiles), [1] calls with the tiles one after
// another (parallel inside each tile), [2] tiles run by all calls, [3] calls in fused blocks (forward_blocks).
std::atomic<int64_t> g_forward_counts[4];

// DCNV2_FWD_SPLIT=inner keeps the forward's parallelism inside each tile (benchmarks, debugging)
bool fwd_tile_parallel() {
  static const bool on = [] {
    const char* env = std::getenv("DCNV2_FWD_SPLIT");
    return !(env && std::string(env) == "inner");
  }();
  return on;
}

// DCNV2_TILE_BYTES=n sets both passes' tiles to n bytes, with no row floor above kMinTilePixels (benchmarks)
int64_t tile_bytes_override() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("DCNV2_TILE_BYTES");
    const long long v = env ? std::atoll(env) : 0;
    return v > 0 ? static_cast<int64_t>(v) : int64_t(0);
  }();
  return bytes;
}

// output pixels per column tile of `elem`-byte columns: budget bytes, at least min_rows (and kMinTilePixels)
int64_t tile_pixels(const Geometry& g, size_t elem, int64_t budget, int64_t min_rows) {
  if (tile_bytes_override() > 0) {
    budget = tile_bytes_override();
    min_rows = kMinTilePixels;
  }
  const int64_t per_pixel = std::max<int64_t>(1, g.K * g.C * static_cast<int64_t>(elem));
  const int64_t rows = std::max({kMinTilePixels, min_rows, budget / per_pixel});
  return std::max<int64_t>(1, std::min(g.N * g.L, rows));
}

// rows per tile of the backward's weight gradient: up to kWeightGradColumnBudgetBytes of columns, at least
// the scatter pass's tile (min_rows), cut into tiles of equal size (a short last tile costs a whole pass over the
// GEMM's result)
int64_t weight_grad_tile_pixels(const Geometry& g, size_t elem, int64_t min_rows) {
  const int64_t NL = g.N * g.L;
  const int64_t most = tile_bytes_override() > 0 ? min_rows
                                                 : tile_pixels(g, elem, kWeightGradColumnBudgetBytes, min_rows);
  return std::max<int64_t>(1, ceil_div(NL, ceil_div(NL, most)));
}

// col[q - q0] = [G, K, Cg] modulated bilinear samples for the batch's output pixels [q0, q1)
// (q = n * L + p), read from the channels-last batch img [N, H, W, C]. The samples are computed in T;
// the image is read as S and the columns stored as D (bfloat16 bits for the bf16 forward, see
// load_val/store_val).
template <typename T, typename S = T, typename D = T>
void fill_columns(const Geometry& g, const TapReader<T>& taps, const S* batch_img, int64_t q0,
                  int64_t q1, D* col) {
  const int64_t C = g.C, Cg = g.Cg(), Cog = g.Cog(), K = g.K;
#ifdef DCNV2_HAVE_AVX512_FILL
  const bool wide = wide_fill();
#endif
  at::parallel_for(q0, q1, 16, [&](int64_t begin, int64_t end) {
    Corners<T> cr;
    const T ymax = T(g.H - 1), xmax = T(g.W - 1);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / g.L, p = q - n * g.L;
      const S* img = batch_img + n * g.H * g.W * C;
      D* row = col + (q - q0) * K * C;
      const auto px = taps.pixel(n, p);
      for (int64_t og = 0; og < g.OG; ++og) {
        for (int64_t k = 0, i = 0, j = 0; k < K; ++k, j = (j + 1 == g.kw ? 0 : j + 1), i += (j == 0)) {
          T y, x, m;
          taps.tap(px, og, i, j, k, y, x, m);
          // the corners' rows and modulated weights; all four inside (the common case) is computed in
          // registers, as Corners::set would (the same operations, so the same bits): the weights'
          // round trip through cr.w cost a store-forwarding stall per tap
          int ncorner;
          const S* sp[4];
          T cw[4];
          if (y >= T(0) && y < ymax && x >= T(0) && x < xmax) {
            const T yf = std::floor(y), xf = std::floor(x);
            const T ly = y - yf, lx = x - xf, hy = T(1) - ly, hx = T(1) - lx;
            sp[0] = img + (static_cast<int64_t>(yf) * g.W + static_cast<int64_t>(xf)) * C;
            sp[1] = sp[0] + C;
            sp[2] = sp[0] + g.W * C;
            sp[3] = sp[2] + C;
            cw[0] = hy * hx * m;
            cw[1] = hy * lx * m;
            cw[2] = ly * hx * m;
            cw[3] = ly * lx * m;
            ncorner = 4;
          } else {
            cr.set(y, x, g.H, g.W);
            ncorner = cr.n;
            for (int c = 0; c < ncorner; ++c) {
              cw[c] = cr.w[c] * m;
              sp[c] = img + cr.idx[c] * C;
            }
          }
          // the offset group's channels, split where they cross a group boundary
          for (int64_t c = og * Cog, cend = (og + 1) * Cog; c < cend;) {
            const int64_t grp = g.G == 1 ? 0 : c / Cg, seg_end = std::min(cend, (grp + 1) * Cg);
            const int64_t len = seg_end - c;
            D* dst = row + grp * K * Cg + k * Cg + (c - grp * Cg);
            if (ncorner == 0) {
              std::fill(dst, dst + len, store_val<D, T>(T(0)));
            } else if (ncorner == 4) {  // the common case: one pass over the destination
              const S *s0 = sp[0] + c, *s1 = sp[1] + c, *s2 = sp[2] + c, *s3 = sp[3] + c;
#ifdef DCNV2_HAVE_AVX512_FILL
              if constexpr (std::is_same<T, float>::value && std::is_same<D, uint16_t>::value) {  // bf16 columns
                if (wide) {
                  bilinear4_wide<S>(dst, s0, s1, s2, s3, cw[0], cw[1], cw[2], cw[3], len);
                  c = seg_end;
                  continue;
                }
              }
#endif
              if constexpr (std::is_same<D, T>::value) {
                const T w0 = cw[0], w1 = cw[1], w2 = cw[2], w3 = cw[3];
                for (int64_t q = 0; q < len; ++q) dst[q] = w0 * s0[q] + w1 * s1[q] + w2 * s2[q] + w3 * s3[q];
              } else {
                bilinear4<T, S, D>(dst, s0, s1, s2, s3, cw[0], cw[1], cw[2], cw[3], len);
              }
            } else if constexpr (std::is_same<D, T>::value) {  // accumulate in place (float32/float64 columns)
              const S* s0 = sp[0] + c;
              const T w0 = cw[0];
              for (int64_t q = 0; q < len; ++q) dst[q] = store_val<D, T>(w0 * load_val(s0[q]));
              for (int t = 1; t < ncorner; ++t) {
                const S* s = sp[t] + c;
                const T wt = cw[t];
                for (int64_t q = 0; q < len; ++q) dst[q] = store_val<D, T>(load_val(dst[q]) + wt * load_val(s[q]));
              }
            } else {  // narrow columns: sum in T, round once
              for (int64_t q = 0; q < len; ++q) {
                T v = cw[0] * load_val(sp[0][c + q]);
                for (int t = 1; t < ncorner; ++t) v += cw[t] * load_val(sp[t][c + q]);
                dst[q] = store_val<D, T>(v);
              }
            }
            c = seg_end;
          }
        }
      }
    }
  });
}

// The GEMM's pixel-major rows of one tile into NCHW: for the tile's rows r < np (batch pixel
// q = q0 + r = n * L + p) and channels c < M, dst[(n * ld_img + c) * L + p] = src[r * M + c] + bias[c].
// dst points at the group's first output channel of image 0; ld_img is the output's channel count.
// Transposed in cache-sized blocks, in parallel over channel blocks, the bias added on the way (in T;
// S and D are the element types of src and dst, see load_val/store_val).
template <typename T, typename S = T, typename D = T>
void rows_to_channels(const S* src, int64_t q0, int64_t np, int64_t M, D* dst, int64_t ld_img, int64_t L,
                      const T* bias) {
  if constexpr (std::is_same<S, T>::value && std::is_same<D, T>::value) {
    for (int64_t r0 = 0; r0 < np;) {  // one image's run of rows at a time
      const int64_t n = (q0 + r0) / L, p0 = q0 + r0 - n * L;
      const int64_t run = std::min(np - r0, L - p0);
      transpose_add<T>(src + r0 * M, M, dst + n * ld_img * L + p0, L, run, M, bias);
      r0 += run;
    }
    return;
  }
  if constexpr (std::is_same<S, uint16_t>::value && std::is_same<D, uint16_t>::value &&
                std::is_same<T, float>::value) {
    for (int64_t r0 = 0; r0 < np;) {  // one image's run of rows at a time
      const int64_t n = (q0 + r0) / L, p0 = q0 + r0 - n * L;
      const int64_t run = std::min(np - r0, L - p0);
      transpose_add_bf16(src + r0 * M, M, dst + n * ld_img * L + p0, L, run, M, bias);
      r0 += run;
    }
    return;
  }
  constexpr int64_t B = 32;
  at::parallel_for(0, (M + B - 1) / B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t cb = b0 * B; cb < std::min(M, b1 * B); cb += B) {
      const int64_t ce = std::min(M, cb + B);
      for (int64_t r0 = 0; r0 < np;) {  // one image's run of rows at a time
        const int64_t n = (q0 + r0) / L, p0 = q0 + r0 - n * L;
        const int64_t run = std::min(np - r0, L - p0);
        for (int64_t qb = 0; qb < run; qb += B) {
          const int64_t qe = std::min(run, qb + B);
          for (int64_t c = cb; c < ce; ++c) {
            const T add = bias ? bias[c] : T(0);
            D* d = dst + (n * ld_img + c) * L + p0;
            const S* s = src + r0 * M + c;
            for (int64_t q = qb; q < qe; ++q) d[q] = store_val<D, T>(load_val(s[q * M]) + add);
          }
        }
        r0 += run;
      }
    }
  });
}

// The GEMM's pixel-major rows of one tile into a channels-last output's rows: dst[r * ld + c] = src[r * M + c]
// + bias[c] for r < np, c < M (dst points at the tile's first row and the group's first channel; the bias is
// added in T as rows_to_channels adds it, so both layouts hold the same bits).
template <typename T, typename D>
void rows_to_rows(const D* src, int64_t np, int64_t M, D* dst, int64_t ld, const T* bias) {
  at::parallel_for(0, np, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const D* s = src + r * M;
      D* d = dst + r * ld;
      if (!bias) {
        std::memcpy(d, s, static_cast<size_t>(M) * sizeof(D));
        continue;
      }
      for (int64_t c = 0; c < M; ++c) d[c] = store_val<D, T>(load_val(s[c]) + bias[c]);
    }
  });
}

// d[q] += wm * gv[q] for q < len; returns sum_q gv[q] * s[q]. The sum runs in kLanes independent
// partial sums (a fixed order, so results stay bit-identical run to run) so the compiler can keep it
// in vector registers: a single running sum is a serial dependency it may not reorder.
// gv and s are read as B (T, or bfloat16 bits in the bf16 backward: grad_col and the input image, widened exactly).
// Scatter = false computes the dot product alone (the input gradient was not asked for); the sum runs
// in the same order either way, so the offset/mask gradients are bit-identical.
template <bool Scatter, typename T, typename B = T>
inline T scatter_and_dot(T* __restrict__ d, const B* __restrict__ gv, const B* __restrict__ s, T wm,
                         int64_t len) {
  constexpr int kLanes = 8;
  T acc[kLanes] = {};
  int64_t q = 0;
#if defined(__AVX2__) && defined(__FMA__)
  // bf16 grad_col: GCC vectorises the widening loop below with 4-lane vectors only, which ran the bf16 scatter
  // pass at half the float32 speed. The same lanes and the same fused operations in 8-lane registers.
  if constexpr (std::is_same<T, float>::value && std::is_same<B, uint16_t>::value) {
    const __m256 vw = _mm256_set1_ps(wm);
    __m256 va = _mm256_setzero_ps();
    for (; q + kLanes <= len; q += kLanes) {
      const __m256 g8 = load8(gv + q);
      if constexpr (Scatter) _mm256_storeu_ps(d + q, _mm256_fmadd_ps(vw, g8, _mm256_loadu_ps(d + q)));
      va = _mm256_fmadd_ps(g8, load8(s + q), va);
    }
    _mm256_storeu_ps(acc, va);
  }
#endif
  for (; q + kLanes <= len; q += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      const T gq = load_val(gv[q + u]);
      if constexpr (Scatter) d[q + u] += wm * gq;
      acc[u] += gq * load_val(s[q + u]);
    }
  }
  T dot = 0;
  for (int u = 0; u < kLanes; ++u) dot += acc[u];
  for (; q < len; ++q) {
    const T gq = load_val(gv[q]);
    if constexpr (Scatter) d[q] += wm * gq;
    dot += gq * load_val(s[q]);
  }
  return dot;
}

// d[q] += wm * gv[q] for q < len: the scatter alone, where the offset/mask gradients were not asked for (a
// frozen offset branch, the analysis passes' input gradient), so the image is not read at all. Each element
// gets the same product and sum as in scatter_and_dot, so grad_input is bit-identical either way.
template <typename T, typename B = T>
inline void scatter_only(T* __restrict__ d, const B* __restrict__ gv, T wm, int64_t len) {
  int64_t q = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same<T, float>::value && std::is_same<B, uint16_t>::value) {
    const __m256 vw = _mm256_set1_ps(wm);
    for (; q + 8 <= len; q += 8) _mm256_storeu_ps(d + q, _mm256_fmadd_ps(vw, load8(gv + q), _mm256_loadu_ps(d + q)));
  }
#endif
  for (; q < len; ++q) d[q] += wm * load_val(gv[q]);
}

#if defined(__AVX2__) && defined(__FMA__)
// The four corners of one tap over a channel block of NV * 8 channels, float32 arithmetic (grad_col and the
// image read as B: float32, or bfloat16 bits widened exactly): the block's run of grad_col is read, and widened,
// once into registers instead of once per corner. Corner t gets what scatter_and_dot<Scatter> (Dot) or
// scatter_only (!Dot) gives it: d = wm * g + d and acc = g * s + acc, fused, in the same eight lanes in the same
// order, the lanes summed in order, corner after corner; so every gradient keeps its bits (checked against the
// per-corner loops, float32 and bf16, in tests/test_deform_conv.py). The per-corner loops read grad_col's run
// four times a tap: a third of the pass's loads, and in bf16 half its widening work. In-process A/B on the 2-core
// AVX-512 machine (with the corners' weights in registers, see the scatter pass), whole backward with all
// gradients: c4 about 14 % faster in float32 and bfloat16, c5 and the small maps 3-6 %, c3 level to 5 %.
template <bool Scatter, bool Dot, int NV, typename B>
inline void four_corners(float* const* d, const B* const* s, const B* gv, const float* wm, float* dot) {
  __m256 g[NV];
  for (int v = 0; v < NV; ++v) g[v] = load8(gv + 8 * v);
  for (int t = 0; t < 4; ++t) {
    const __m256 vw = _mm256_set1_ps(wm[t]);
    __m256 va = _mm256_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      if constexpr (Scatter) _mm256_storeu_ps(d[t] + 8 * v, _mm256_fmadd_ps(vw, g[v], _mm256_loadu_ps(d[t] + 8 * v)));
      if constexpr (Dot) va = _mm256_fmadd_ps(g[v], load8(s[t] + 8 * v), va);
    }
    if constexpr (Dot) {
      alignas(32) float acc[8];
      _mm256_store_ps(acc, va);
      float sum = 0;
      for (int u = 0; u < 8; ++u) sum += acc[u];
      dot[t] = sum;
    }
  }
}

// four_corners for a block of len channels where len is 64, 32 or 16; false (nothing done) otherwise
template <bool Scatter, bool Dot, typename B>
inline bool four_corners_block(float* const* d, const B* const* s, const B* gv, const float* wm, float* dot,
                               int64_t len) {
  switch (len) {
    case 64: four_corners<Scatter, Dot, 8, B>(d, s, gv, wm, dot); return true;
    case 32: four_corners<Scatter, Dot, 4, B>(d, s, gv, wm, dot); return true;
    case 16: four_corners<Scatter, Dot, 2, B>(d, s, gv, wm, dot); return true;
    default: return false;
  }
}
#endif

// a * b + c, fused (one rounding) where the target has a fused multiply-add instruction, which is what the
// compiler's contraction makes of the expression there; elsewhere (a portable x86 build) a product and a sum, as
// before, rather than std::fma's slow software fallback
template <typename T>
inline T fused_madd(T a, T b, T c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// DCNV2_SCATTER=per-corner keeps the loops of one corner at a time (benchmarks; the test that both give the same
// bits), read once per process
bool four_corner_scatter() {
  static const bool on = [] {
    const char* env = std::getenv("DCNV2_SCATTER");
    return !(env && std::string(env) == "per-corner");
  }();
  return on;
}

// What the backward passes did since the last reset (tests check that a pruned backward skips its
// passes): column tiles filled, grad_w tile GEMMs, grad_col tile GEMMs, scatter passes with the input-gradient
// writes, scatter passes without them (offset/mask gradients alone), scatter passes without the corner dot
// products (input gradient alone).
std::atomic<int64_t> g_backward_counts[6];

template <typename B>
B* elem_ptr(const at::Tensor& t) { return t.data_ptr<B>(); }
template <>
uint16_t* elem_ptr<uint16_t>(const at::Tensor& t) { return bf16_bits(t); }

Geometry make_geometry(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                       const std::optional<at::Tensor>& mask, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       int64_t offset_groups) {
  TORCH_CHECK_VALUE(input.dim() == 4, "deform_conv2d: input must be 4-D [N, C, H, W], got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(weight.dim() == 4, "deform_conv2d: weight must be 4-D, got ", weight.dim(), "-D");
  TORCH_CHECK_VALUE(offset.dim() == 4, "deform_conv2d: offset must be 4-D, got ", offset.dim(), "-D");
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "deform_conv2d: stride, padding and dilation must have 2 values");
  Geometry g;
  g.N = input.size(0); g.C = input.size(1); g.H = input.size(2); g.W = input.size(3);
  g.Cout = weight.size(0); g.kh = weight.size(2); g.kw = weight.size(3); g.K = g.kh * g.kw;
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1]; g.G = groups; g.OG = offset_groups;
  TORCH_CHECK_VALUE(g.sh > 0 && g.sw > 0, "deform_conv2d: stride must be positive, got ", stride);
  TORCH_CHECK_VALUE(g.dh > 0 && g.dw > 0, "deform_conv2d: dilation must be positive, got ", dilation);
  TORCH_CHECK_VALUE(g.ph >= 0 && g.pw >= 0, "deform_conv2d: padding must be non-negative, got ", padding);
  TORCH_CHECK_VALUE(g.G > 0 && g.C > 0 && g.C % g.G == 0 && g.Cout % g.G == 0,
                    "deform_conv2d: groups=", g.G, " must divide in_channels=", g.C, " and out_channels=", g.Cout);
  TORCH_CHECK_VALUE(g.OG > 0 && g.C % g.OG == 0, "deform_conv2d: offset_groups=", g.OG,
                    " must divide in_channels=", g.C);
  TORCH_CHECK_VALUE(weight.size(1) * g.G == g.C, "deform_conv2d: weight.shape[1]=", weight.size(1),
                    " times groups=", g.G, " must equal in_channels=", g.C);
  TORCH_CHECK_VALUE(g.K > 0 && g.Cout > 0, "deform_conv2d: weight must not be empty, got shape ", weight.sizes());
  g.Ho = (g.H + 2 * g.ph - (g.dh * (g.kh - 1) + 1)) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - (g.dw * (g.kw - 1) + 1)) / g.sw + 1;
  TORCH_CHECK_VALUE(g.Ho > 0 && g.Wo > 0, "deform_conv2d: output size must be positive, got ", g.Ho, "x", g.Wo);
  g.L = g.Ho * g.Wo;
  TORCH_CHECK_VALUE(offset.sizes() == at::IntArrayRef({g.N, 2 * g.OG * g.K, g.Ho, g.Wo}),
                    "deform_conv2d: offset must have shape [", g.N, ", ", 2 * g.OG * g.K, ", ", g.Ho, ", ",
                    g.Wo, "], got ", offset.sizes());
  if (mask) {
    TORCH_CHECK_VALUE(mask->sizes() == at::IntArrayRef({g.N, g.OG * g.K, g.Ho, g.Wo}),
                      "deform_conv2d: mask must have shape [", g.N, ", ", g.OG * g.K, ", ", g.Ho, ", ",
                      g.Wo, "], got ", mask->sizes());
  }
  for (const at::Tensor* t : {&weight, &offset}) {
    TORCH_CHECK_TYPE(t->scalar_type() == input.scalar_type(), "deform_conv2d: dtype mismatch, input is ",
                     input.scalar_type(), " but got ", t->scalar_type());
  }
  if (mask) {
    TORCH_CHECK_TYPE(mask->scalar_type() == input.scalar_type(), "deform_conv2d: mask dtype ",
                     mask->scalar_type(), " differs from input dtype ", input.scalar_type());
  }
  return g;
}

at::ScalarType compute_type(at::ScalarType t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t), "deform_conv2d: expected a floating-point input, got ", t);
  return (t == at::kDouble) ? at::kDouble : at::kFloat;  // half/bfloat16 accumulate in float32
}

// channels-last rows of offset [N, L, 2*OG*K] / mask [N, L, OG*K] in the compute type
at::Tensor rows(const at::Tensor& t, at::ScalarType ct) {
  return t.to(ct).permute({0, 2, 3, 1}).contiguous();
}

// weight as [G, Cout/G, K * Cg] with the tap index outside the channel index, matching the columns: a view
// of a channels-last weight ([Cout, kh, kw, Cg] is that matrix), else a transposed copy
at::Tensor weight_matrix(const at::Tensor& weight, const Geometry& g, at::ScalarType ct) {
  const at::Tensor typed = weight.to(ct);
  if (is_channels_last(typed)) return typed.permute({0, 2, 3, 1}).reshape({g.G, g.Coutg(), g.K * g.Cg()});  // a view
  if (ct == at::kFloat || ct == at::kDouble) {
    const at::Tensor w = typed.contiguous();
    at::Tensor out = scratch(kScratchWeight, {g.G, g.Coutg(), g.K * g.Cg()}, w.options());
    AT_DISPATCH_FLOATING_TYPES(ct, "dcnv2_weight_matrix", [&] {
      const scalar_t* src = w.data_ptr<scalar_t>();
      scalar_t* dst = out.data_ptr<scalar_t>();
      const int64_t Cg = g.Cg(), K = g.K;
      at::parallel_for(0, g.Cout, 8, [&](int64_t o0, int64_t o1) {
        for (int64_t o = o0; o < o1; ++o) {
          transpose_block<scalar_t>(src + o * Cg * K, K, dst + o * K * Cg, Cg, 0, Cg, 0, K, nullptr);
        }
      });
    });
    return out;
  }
  return typed.reshape({g.G, g.Coutg(), g.Cg(), g.K}).permute({0, 1, 3, 2}).contiguous()
      .reshape({g.G, g.Coutg(), g.K * g.Cg()});
}

// DCNV2_BF16=float32 sends bfloat16 through the float32 computation instead (benchmarks, debugging), as
// does a CPU whose oneDNN has no bfloat16 matmul.
bool bf16_fast_path() {
  static const bool on = [] {
    const char* env = std::getenv("DCNV2_BF16");
    return !(env && std::string(env) == "float32");
  }();
  return on && RowGemm::bf16_gemm_available();
}

// How the forward cuts the batch's output pixels into column tiles of col_elem-byte columns (see forward_tiles).
struct TilePlan {
  int64_t rows;        // output pixels per tile
  bool tile_parallel;  // each thread its own tiles
};

TilePlan forward_plan(const Geometry& g, size_t col_elem) {
  const int64_t NL = g.N * g.L;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t P0 = tile_pixels(g, col_elem, kForwardColumnBudgetBytes, kForwardMinTileRows);
  const bool tile_parallel = threads > 1 && fwd_tile_parallel() && NL >= threads * 4 * kMinTilePixels;
  return {tile_parallel ? ceil_div(NL, ceil_div(ceil_div(NL, P0), threads) * threads) : P0, tile_parallel};
}

// The tile GEMM of each group (the weight as a matrix of type ot, see weight_matrix). With the weight cache
// enabled (weight_cache.h), the weight packed by an earlier call, or packed now and kept for the next ones;
// otherwise RowGemm packs it within this call only where enough large tiles share it.
std::vector<RowGemm> forward_gemms(const at::Tensor& weight, const Geometry& g, at::ScalarType ot,
                                   const TilePlan& plan) {
  std::vector<RowGemm> gemm;
  if (!weight_cache_applies(weight) || !RowGemm::packs(ot)) {
    const at::Tensor wmat = weight_matrix(weight, g, ot);
    for (int64_t grp = 0; grp < g.G; ++grp) gemm.emplace_back(wmat[grp], plan.rows, ceil_div(g.N * g.L, plan.rows));
    return gemm;
  }
  const PackedWeightKey key{ot, plan.rows, g.G};
  std::optional<std::vector<at::Tensor>> packed = weight_cache_find(weight, key);
  if (!packed) {
    const at::Tensor wmat = weight_matrix(weight, g, ot);
    packed.emplace();
    for (int64_t grp = 0; grp < g.G; ++grp) packed->push_back(RowGemm::pack(wmat[grp], plan.rows));
    weight_cache_insert(weight, key, *packed);
  }
  for (const at::Tensor& t : *packed) gemm.push_back(RowGemm::prepacked(t));
  return gemm;
}

// The forward's tiles of the batch's N * L output pixels: each tile is filled (samples computed in T from
// the channels-last image of element type S, columns stored as D), multiplied (one RowGemm per group,
// pixel-major rows of D) and transposed into the NCHW output (element type D), the bias (T) added on the
// way. float32/float64 run T = S = D; the bfloat16 fast path runs T = float and S = D = bfloat16 bits:
// float32 sampling, bf16 column tiles, oneDNN's bf16 GEMM with float32 accumulation, whose bf16 result
// gets the bias added in float32 and is rounded again.
//
// Tile-parallel when every thread gets at least 4 * kMinTilePixels output pixels: each thread fills,
// multiplies and transposes its own tiles (its column tile stays in its own cache, and one thread's
// memory-bound fill overlaps another's GEMM), instead of three parallel regions with a barrier each per
// tile. The tiles are cut to a multiple of the thread count, all of one size, so the threads get equal
// shares.
//
// A channels-last output (out_rows) takes the GEMM's rows as they are, the bias added on the way, instead of
// the transpose.
template <typename T, typename S, typename D>
void forward_tiles(const Geometry& g, const TapReader<T>& taps, const S* img, const std::vector<RowGemm>& gemm,
                   const TilePlan& plan, D* out, bool out_rows, const T* bias, const at::TensorOptions& col_opts) {
  const int64_t NL = g.N * g.L;
  const int64_t P = plan.rows;
  const bool tile_parallel = plan.tile_parallel;
  // The GEMM writes pixel-major rows [np, Cout]: on the CPUs measured this layout runs markedly faster
  // than writing the strided [Cout, np] slice of the output directly; one transposing copy follows.
  const auto col_type = col_opts.dtype().toScalarType();
  // fill, GEMM and transpose of the tile of pixels [q0, q1) into col (the nested parallel loops of a
  // tile-parallel call run inline, on the calling thread)
  auto run_tile = [&](int64_t q0, int64_t q1, at::Tensor& col) {
    const int64_t np = q1 - q0;
    ++g_forward_counts[2];
    fill_columns<T, S, D>(g, taps, img, q0, q1, elem_ptr<D>(col));
    for (int64_t grp = 0; grp < g.G; ++grp) {
      const at::Tensor cols = col.narrow(0, 0, np).select(1, grp);  // [np, K*Cg]
      const at::Tensor res = gemm[grp](cols).contiguous();         // [np, Coutg]
      TORCH_CHECK(res.scalar_type() == col_type, "deform_conv2d: the tile GEMM returned ", res.scalar_type(),
                  " for ", col_type, " columns");
      const T* group_bias = bias ? bias + grp * g.Coutg() : nullptr;
      if (out_rows) {
        rows_to_rows<T, D>(elem_ptr<D>(res), np, g.Coutg(), out + q0 * g.Cout + grp * g.Coutg(), g.Cout, group_bias);
      } else {
        rows_to_channels<T, D, D>(elem_ptr<D>(res), q0, np, g.Coutg(), out + grp * g.Coutg() * g.L, g.Cout, g.L,
                                  group_bias);
      }
    }
  };
  ++g_forward_counts[tile_parallel ? 0 : 1];
  if (tile_parallel) {
    at::parallel_for(0, ceil_div(NL, P), 1, [&](int64_t t0, int64_t t1) {
      at::Tensor col = scratch(kScratchColumns, {P, g.G, g.K * g.Cg()}, col_opts);  // this thread's
      for (int64_t t = t0; t < t1; ++t) run_tile(t * P, std::min(NL, (t + 1) * P), col);
    });
    return;
  }
  at::Tensor col = scratch(kScratchColumns, {P, g.G, g.K * g.Cg()}, col_opts);
  for (int64_t q0 = 0; q0 < NL; q0 += P) run_tile(q0, std::min(NL, q0 + P), col);
}

// The float32 forward of a layer whose weight fits in a core's L2 cache (kFusedWeightMaxBytes: ResNet's
// 128-channel 3x3 layers, 590 KB) runs in fused blocks of kFusedBlockRows output pixels: each thread fills a
// block's columns (147 KB for 128 channels) and multiplies them at once with oneDNN's brgemm micro-kernel
// (at::native::cpublas::brgemm) while they are still in its cache, writing the block's result rows straight
// into a channels-last output. The tile path fills 2 MB of columns, which leave L2 before the tile GEMM reads
// them back, and its GEMM runs through torch's oneDNN linear op, which allocates each result. Measured on
// the 2-core AVX-512 machine (docs/benchmarks.md): c3's forward 5 % faster, the demo's 128-channel small maps
// 11-16 %. A larger weight (256 and 512 channels) would stream from L3 for every block; it keeps the tiles,
// as do float64 and the bf16 fast path. The blocks' size does not depend on the thread count, and each output
// row is one row of a brgemm call, so the bits do not depend on the thread count or on the rest of the batch.
// The GEMM's summation order differs from the tile path's: outputs agree to float32 rounding, not bit for bit.
// DCNV2_FWD_GEMM=tiles keeps the tile path (benchmarks, the tests that compare the two).
constexpr int64_t kFusedBlockRows = 64;
constexpr int64_t kFusedWeightMaxBytes = 1 << 20;
constexpr int64_t kFusedWeightRows = -1;  // the weight cache's row tag for the fused path's weight layout

bool fused_forward_applies(const Geometry& g, at::ScalarType ct, bool bf16) {
  static const bool on = [] {
    const char* env = std::getenv("DCNV2_FWD_GEMM");
    if (env && std::string(env) == "tiles") return false;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    // where oneDNN generates brgemm's float32 micro-kernel (a torch built without oneDNN's ukernel API runs the
    // same call as a BLAS GEMM per block: correct, not faster)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return on && !bf16 && ct == at::kFloat && RowGemm::packs(at::kFloat) &&
         g.K * g.Cg() * g.Coutg() * static_cast<int64_t>(sizeof(float)) <= kFusedWeightMaxBytes;
}

// The float32 weight as brgemm's B, [G, K * Cg, Coutg] row-major (rows in the columns' tap-major order), into
// out: from an NCHW weight [Cout, Cg, K] in one pass (per 8 output channels and input channel c, the [8, K] block
// at column c * K into rows k * Cg + c); a channels-last weight is weight_matrix's [G, Coutg, K * Cg] as it is (a
// view), transposed per group.
void weight_rows_into(const at::Tensor& weight, const Geometry& g, at::Tensor& out) {
  const at::Tensor typed = weight.to(at::kFloat);
  const bool cl = is_channels_last(typed);
  const at::Tensor w = cl ? weight_matrix(typed, g, at::kFloat).contiguous() : typed.contiguous();
  const int64_t K = g.K, Cg = g.Cg(), KC = K * Cg, M = g.Coutg();
  for (int64_t grp = 0; grp < g.G; ++grp) {
    const float* src = w.data_ptr<float>() + grp * M * KC;
    float* dst = out.data_ptr<float>() + grp * KC * M;
    if (cl) {
      transpose_add<float>(src, KC, dst, M, M, KC, nullptr);
      continue;
    }
    at::parallel_for(0, ceil_div(M, 8), 4, [&](int64_t b0, int64_t b1) {
      for (int64_t c = 0; c < Cg; ++c) {
        transpose_block<float>(src + c * K, KC, dst + c * M, Cg * M, b0 * 8, std::min(M, b1 * 8), 0, K, nullptr);
      }
    });
  }
}

// weight_rows_into for this call: while the weight cache is enabled (packed_weights()), laid out by the first
// call and kept for the later ones, as the tile path keeps its packed weight
at::Tensor fused_weight(const at::Tensor& weight, const Geometry& g) {
  const int64_t KC = g.K * g.Cg(), M = g.Coutg();
  const auto opts = weight.options().dtype(at::kFloat);
  if (!weight_cache_applies(weight)) {
    at::Tensor out = scratch(kScratchWeightRows, {g.G, KC, M}, opts);
    weight_rows_into(weight, g, out);
    return out;
  }
  const PackedWeightKey key{at::kFloat, kFusedWeightRows, g.G};
  if (std::optional<std::vector<at::Tensor>> kept = weight_cache_find(weight, key)) return (*kept)[0];
  at::Tensor out = at::empty({g.G, KC, M}, opts);
  weight_rows_into(weight, g, out);
  weight_cache_insert(weight, key, {out});
  return out;
}

// The fused blocks (see kFusedBlockRows): the batch's N * L output pixels in blocks of kFusedBlockRows, each
// thread its own run of blocks; per block the columns [np, G, K * Cg] (fill_columns), then per group
// rows = columns @ wrows[grp] by brgemm, the bias added; into the channels-last output's rows (out_rows) or a
// block of rows that rows_to_channels lays into the NCHW output.
void forward_blocks(const Geometry& g, const TapReader<float>& taps, const float* img, const at::Tensor& wrows,
                    float* out, bool out_rows, const float* bias) {
  const int64_t NL = g.N * g.L, KC = g.K * g.Cg(), M = g.Coutg(), P = kFusedBlockRows;
  const float* B = wrows.data_ptr<float>();
  const auto opts = wrows.options();
  ++g_forward_counts[3];
  at::parallel_for(0, ceil_div(NL, P), 1, [&](int64_t b0, int64_t b1) {
    float* col = scratch(kScratchColumns, {P, g.G * KC}, opts).data_ptr<float>();  // this thread's
    float* res = out_rows ? nullptr : scratch(kScratchBlockRows, {P, M}, opts).data_ptr<float>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t q0 = b * P, np = std::min(NL, q0 + P) - q0;
      fill_columns<float, float, float>(g, taps, img, q0, q0 + np, col);
      for (int64_t grp = 0; grp < g.G; ++grp) {
        const float* a = col + grp * KC;
        const float* w = B + grp * KC * M;
        const float* gb = bias ? bias + grp * M : nullptr;
        if (out_rows) {
          float* dst = out + q0 * g.Cout + grp * M;
          at::native::cpublas::brgemm(np, M, KC, g.G * KC, M, g.Cout, false, a, w, dst, false);
          for (int64_t r = 0; gb && r < np; ++r) {
            float* row = dst + r * g.Cout;
            for (int64_t c = 0; c < M; ++c) row[c] += gb[c];
          }
        } else {
          at::native::cpublas::brgemm(np, M, KC, g.G * KC, M, M, false, a, w, res, false);
          rows_to_channels<float, float, float>(res, q0, np, M, out + grp * M * g.L, g.Cout, g.L, gb);
        }
      }
    }
  });
}

at::Tensor deform_conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                                     const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                     int64_t offset_groups) {
  const Geometry g = make_geometry(input, weight, offset, mask, stride, padding, dilation, groups, offset_groups);
  // bfloat16 on the fast path keeps bf16 columns, GEMM and output; otherwise half/bfloat16 compute in float32
  const bool bf16 = input.scalar_type() == at::kBFloat16 && bf16_fast_path();
  const auto ct = compute_type(input.scalar_type());
  const auto ot = bf16 ? at::kBFloat16 : ct;  // the columns' and the output's type
  // every output element is written by exactly one tile GEMM, so no zero-fill is needed; a channels-last input
  // gets a channels-last output, written row by row
  const bool out_rows = is_channels_last(input);
  at::Tensor out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, input.options().dtype(ot).memory_format(
                                                           out_rows ? at::MemoryFormat::ChannelsLast
                                                                    : at::MemoryFormat::Contiguous));
  if (g.N == 0) return out.to(input.scalar_type());
  const at::Tensor off_r = rows(offset, ct);  // exact for bf16: every bf16 is a float32
  const at::Tensor mask_r = mask ? rows(*mask, ct) : at::Tensor();
  const at::Tensor bias_c = bias && bias->defined() ? bias->to(ct).contiguous() : at::Tensor();
  if (fused_forward_applies(g, ct, bf16)) {
    const at::Tensor x_cl = channels_last_as(ct, input);
    TapReader<float> taps{g, off_r.data_ptr<float>(), mask ? mask_r.data_ptr<float>() : nullptr};
    forward_blocks(g, taps, x_cl.data_ptr<float>(), fused_weight(weight, g), out.data_ptr<float>(), out_rows,
                   bias_c.defined() ? bias_c.data_ptr<float>() : nullptr);
    return out.to(input.scalar_type());
  }
  const TilePlan plan = forward_plan(g, at::elementSize(ot));
  const std::vector<RowGemm> gemm = forward_gemms(weight, g, ot, plan);
  const auto col_opts = out.options();
  if (bf16) {
    const at::Tensor x_cl = channels_last_as(at::kBFloat16, input);
    TapReader<float> taps{g, off_r.data_ptr<float>(), mask ? mask_r.data_ptr<float>() : nullptr};
    forward_tiles<float, uint16_t, uint16_t>(g, taps, bf16_bits(x_cl), gemm, plan, bf16_bits(out), out_rows,
                                             bias_c.defined() ? bias_c.data_ptr<float>() : nullptr, col_opts);
    return out;
  }
  const at::Tensor x_cl = channels_last_as(ct, input);
  AT_DISPATCH_FLOATING_TYPES(ct, "dcnv2_deform_conv2d_forward", [&] {
    TapReader<scalar_t> taps{g, off_r.data_ptr<scalar_t>(), mask ? mask_r.data_ptr<scalar_t>() : nullptr};
    forward_tiles<scalar_t, scalar_t, scalar_t>(g, taps, x_cl.data_ptr<scalar_t>(), gemm, plan, out.data_ptr<scalar_t>(),
                                                out_rows, bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, col_opts);
  });
  return out.to(input.scalar_type());
}

// Channel blocks of the backward pass: never crossing an offset-group or group boundary.
struct Block {
  int64_t c0, c1, og, grp;
};

std::vector<Block> channel_blocks(const Geometry& g) {
  std::vector<Block> blocks;
  const int64_t Cg = g.Cg(), Cog = g.Cog();
  // the shapes alone decide the partition (never the thread count): bits stay the same with any threads
  const int64_t block = g.C >= 2 * kChannelBlock ? kChannelBlock : kChannelBlockNarrow;
  for (int64_t c = 0; c < g.C;) {
    const int64_t og = c / Cog, grp = c / Cg;
    const int64_t end = std::min({c + block, (og + 1) * Cog, (grp + 1) * Cg});
    blocks.push_back({c, end, og, grp});
    c = end;
  }
  return blocks;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& offset, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t offset_groups, std::array<bool, 3> output_mask) {
  const Geometry g = make_geometry(input, weight, offset, mask, stride, padding, dilation, groups, offset_groups);
  // only the gradients autograd asks for: weight alone needs the columns, not the scatter pass; input
  // and offsets alone need grad_col and the scatter pass, not the columns
  const bool need_in = output_mask[0], need_w = output_mask[1], need_off = output_mask[2];
  const bool need_scatter = need_in || need_off;
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({g.N, g.Cout, g.Ho, g.Wo}),
                    "deform_conv2d backward: grad_output has shape ", grad_output.sizes());
  const auto ct = compute_type(input.scalar_type());
  const auto opts = input.options().dtype(ct);
  // The gradients asked for are summed into these; the others come back as zeros in their tensor's layout,
  // with nothing summed, transposed or copied for them.
  // grad_input channels-last: returned as it is for a channels-last input, else only read by the transpose
  // into NCHW, so a scratch buffer then (c3: 8.5 MB that a fresh allocation took in 2100 page faults)
  at::Tensor grad_in_cl = !need_in ? at::Tensor()
                          : is_channels_last(input) ? at::zeros({g.N, g.H, g.W, g.C}, opts)
                                                    : scratch(kScratchGradInput, {g.N, g.H, g.W, g.C}, opts).zero_();
  at::Tensor grad_off_r = need_off ? at::zeros({g.N, g.L, g.OG * 2 * g.K}, opts) : at::Tensor();
  at::Tensor grad_mask_r = need_off && mask ? at::zeros({g.N, g.L, g.OG * g.K}, opts) : at::Tensor();
  at::Tensor grad_w;  // [G, Coutg, K * Cg]: the tiles' GEMMs summed; undefined (zeros) for an empty batch or not asked for
  const bool need_b = bias && bias->defined();
  at::Tensor grad_b = need_b ? at::zeros({g.Cout}, opts) : at::empty({0}, input.options());

  if (g.N > 0) {
    // the column tiles, grad_col and the GEMMs run in bt: bfloat16 on the bf16 fast path
    const bool fast = input.scalar_type() == at::kBFloat16 && bf16_fast_path();
    const auto bt = fast ? at::kBFloat16 : ct;
    // the batch in channels-last (a view of a channels-last input, else one copy); tiles run over its N * L
    // output pixels. The bf16 fast path reads the bf16 input itself, widened exactly on load, where a float32
    // copy of it used to be made.
    const at::Tensor x_cl = channels_last_as(fast ? at::kBFloat16 : ct, input);
    const at::Tensor off_r = rows(offset, ct);
    const at::Tensor mask_r = mask ? rows(*mask, ct) : at::Tensor();
    const auto bopts = input.options().dtype(bt);
    const at::Tensor wmat = need_scatter ? weight_matrix(weight, g, bt) : at::Tensor();  // for grad_col only
    // the output gradient as pixel-major rows [N * L, Cout]: a tile's rows are one contiguous slice
    const at::Tensor go = channels_last_as(bt, grad_output, kScratchGradOutput).view({g.N * g.L, g.Cout});
    // summed over the rows, so the bias gradient has the same bits whichever layout grad_output has
    if (need_b) grad_b = go.to(ct).sum(0);
    const int64_t NL = g.N * g.L;
    // the scatter pass's tiles (grad_col) and the weight gradient's (columns), see kWeightGradColumnBudgetBytes
    const int64_t P = tile_pixels(g, at::elementSize(bt), kColumnBudgetBytes, kMinTilePixels);
    const int64_t Pw = need_w ? weight_grad_tile_pixels(g, at::elementSize(bt), P) : 0;
    at::Tensor col = need_w ? scratch(kScratchColumns, {Pw, g.G, g.K * g.Cg()}, bopts) : at::Tensor();
    at::Tensor gcol = g.G > 1 ? scratch(kScratchGradColumns, {P, g.G, g.K * g.Cg()}, bopts) : at::Tensor();
    std::vector<RowGemm> gemm_t;  // grad_col = grad_out_rows @ wmat, i.e. weight wmat^T [K*Cg, Coutg]
    const int64_t tiles = ceil_div(g.N * g.L, P);
    // (only where the scatter pass runs: a weight-only backward would lay out and pack the weight for nothing)
    for (int64_t grp = 0; need_scatter && grp < g.G; ++grp) gemm_t.emplace_back(wmat[grp].t(), P, tiles);
    std::vector<at::Tensor> gw(g.G);  // grad_w per group: the first tile's GEMM result, the others added
    const std::vector<Block> blocks = channel_blocks(g);
    const int64_t NB = static_cast<int64_t>(blocks.size());
    // per block, pixel and tap: partial (d/dy, d/dx, d/dmask) over the block's channels
    at::Tensor partial = scratch(kScratchPartial, {NB, P, g.K, 3}, opts);

    auto body = [&](auto t_tag, auto b_tag) {
      using T = decltype(t_tag);  // sampling, scatter and gradient accumulation
      using B = decltype(b_tag);  // columns, grad_col, GEMM operands and the input image
      TapReader<T> taps{g, off_r.data_ptr<T>(), mask ? mask_r.data_ptr<T>() : nullptr};
      const B* imgs = elem_ptr<B>(x_cl);
      T* gimgs = need_in ? grad_in_cl.data_ptr<T>() : nullptr;
      T* goff = need_off ? grad_off_r.data_ptr<T>() : nullptr;
      T* gmask = need_off && mask ? grad_mask_r.data_ptr<T>() : nullptr;
      T* part = partial.data_ptr<T>();
      const B* gc = nullptr;  // this tile's grad_col rows [np, G, K, Cg]
      const int64_t C = g.C, K = g.K, Cg = g.Cg(), HWC = g.H * g.W * g.C;
      // the weight gradient: columns, then grad_w += grad_out^T @ columns, tile by tile
      for (int64_t q0 = 0; need_w && q0 < NL; q0 += Pw) {
        const int64_t q1 = std::min(NL, q0 + Pw), np = q1 - q0;
        fill_columns<T, B, B>(g, taps, imgs, q0, q1, elem_ptr<B>(col));
        ++g_backward_counts[0];
        for (int64_t grp = 0; grp < g.G; ++grp) {
          at::Tensor cols = col.narrow(0, 0, np).select(1, grp);  // [np, K*Cg]
          // grad_w += go_g^T @ cols; bf16: the tile's GEMM (float32 accumulation, rounded once) summed in float32
          // go_g^T [Coutg, np], the GEMM's row-major left operand, by the blocked transpose (torch's
          // strided copy of a bf16 tile took several times as long)
          at::Tensor go_t = scratch(kScratchGradOutputTile, {g.Coutg(), np}, bopts);
          if constexpr (std::is_same<B, T>::value) {
            transpose_add<T>(go.data_ptr<T>() + q0 * g.Cout + grp * g.Coutg(), g.Cout, go_t.data_ptr<T>(), np,
                             np, g.Coutg(), nullptr);
          } else {
            transpose_add_bf16(elem_ptr<B>(go) + q0 * g.Cout + grp * g.Coutg(), g.Cout, elem_ptr<B>(go_t), np, np,
                               g.Coutg(), nullptr);
          }
          const at::Tensor tile_w = RowGemm(cols.t(), g.Coutg(), 1)(go_t);  // [Coutg, K*Cg]
          if (!gw[grp].defined()) {
            gw[grp] = tile_w.to(ct);
          } else {
            gw[grp].add_(tile_w);
          }
          ++g_backward_counts[1];
        }
      }
      // grad_col = grad_out @ W, then the scatter pass, tile by tile
      std::vector<TapSample<T>> corners(need_scatter ? static_cast<size_t>(P * g.OG * K) : 0);
      for (int64_t q0 = 0; need_scatter && q0 < NL; q0 += P) {
        const int64_t q1 = std::min(NL, q0 + P), np = q1 - q0;
        const at::Tensor go_rows = go.narrow(0, q0, np);  // [np, Cout]
        at::Tensor gcol_single;  // with one group the GEMM result is the grad_col tile itself
        for (int64_t grp = 0; grp < g.G; ++grp) {
          at::Tensor go_g = go_rows.narrow(1, grp * g.Coutg(), g.Coutg());  // [np, Coutg]
          if (g.G == 1) {
            gcol_single = gemm_t[0](go_g);
          } else {
            gcol.narrow(0, 0, np).select(1, grp).copy_(gemm_t[grp](go_g));
          }
          ++g_backward_counts[2];
        }
        ++g_backward_counts[need_in ? 3 : 4];
        if (!need_off) ++g_backward_counts[5];
        gc = g.G == 1 ? elem_ptr<B>(gcol_single) : elem_ptr<B>(gcol);
        // the corners and mask of every (pixel, offset group, tap) of the tile, once: every channel block
        // reads them (c5 has 16 blocks, each of which used to recompute them)
        at::parallel_for(q0, q1, 16, [&](int64_t r0, int64_t r1) {
          for (int64_t q = r0; q < r1; ++q) {
            const int64_t n = q / g.L, p = q - n * g.L;
            const auto px = taps.pixel(n, p);
            TapSample<T>* tc = corners.data() + (q - q0) * g.OG * K;
            for (int64_t og = 0; og < g.OG; ++og) {
              for (int64_t k = 0, i = 0, j = 0; k < K; ++k, ++tc, j = (j + 1 == g.kw ? 0 : j + 1), i += (j == 0)) {
                T y, xx, mm;
                taps.tap(px, og, i, j, k, y, xx, mm);
                tc->set(y, xx, mm, g.H, g.W);
              }
            }
          }
        });
        [[maybe_unused]] const bool four = four_corner_scatter();  // read by the AVX2 path below
        at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const Block& blk = blocks[b];
            const int64_t len = blk.c1 - blk.c0;
            for (int64_t q = q0; q < q1; ++q) {
              const int64_t n = q / g.L;
              const B* img = imgs + n * HWC;
              T* gimg = need_in ? gimgs + n * HWC : nullptr;
              T* pp = part + ((b * P + (q - q0)) * K) * 3;
              const TapSample<T>* tc = corners.data() + ((q - q0) * g.OG + blk.og) * K;
              Corners<T> cr;
              for (int64_t k = 0; k < K; ++k, pp += 3, ++tc) {
                const T m = tc->m;
                T gy = 0, gx = 0, gm = 0;
                const B* gv = gc + (q - q0) * K * C + blk.grp * K * Cg + k * Cg + (blk.c0 - blk.grp * Cg);
                bool done = false;  // by the four-corner loops
#if defined(__AVX2__) && defined(__FMA__)
                if constexpr (std::is_same<T, float>::value) {
                  // the common case, all four corners inside: grad_col's run read once for the four of them, and
                  // the corners' weights and derivatives computed in registers as expand() computes them (the
                  // same operations, so the same bits). expand()'s stores into cr and the loads back stalled on
                  // store forwarding every tap (a third of the pass's perf samples on c3 bf16 sat there; the
                  // measured gains are in four_corners' comment)
                  if (tc->inside == 15 && four) {
                    const T ly = tc->ly, lx = tc->lx, hy = T(1) - ly, hx = T(1) - lx;
                    const T w4[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
                    const T dwdy4[4] = {-hx, -lx, hx, lx};
                    const T dwdx4[4] = {-hy, hy, -ly, ly};
                    const int64_t base0 = tc->idx0 * C + blk.c0;
                    const int64_t base4[4] = {base0, base0 + C, base0 + g.W * C, base0 + (g.W + 1) * C};
                    float* d4[4];
                    const B* s4[4];
                    float wm4[4], dot4[4];
                    for (int t = 0; t < 4; ++t) {
                      d4[t] = need_in ? gimg + base4[t] : nullptr;
                      s4[t] = img + base4[t];
                      wm4[t] = w4[t] * m;
                    }
                    done = !need_off ? four_corners_block<true, false, B>(d4, s4, gv, wm4, dot4, len)
                           : need_in ? four_corners_block<true, true, B>(d4, s4, gv, wm4, dot4, len)
                                     : four_corners_block<false, true, B>(d4, s4, gv, wm4, dot4, len);
                    for (int t = 0; done && need_off && t < 4; ++t) {  // fused as the per-corner loop below
                      gy = fused_madd(dot4[t], dwdy4[t], gy);
                      gx = fused_madd(dot4[t], dwdx4[t], gx);
                      gm = fused_madd(dot4[t], w4[t], gm);
                    }
                  }
                }
#endif
                if (!done) {  // one corner at a time
                  tc->expand(cr, g.W);
                  for (int t = 0; t < cr.n; ++t) {
                    const int64_t base = cr.idx[t] * C + blk.c0;
                    const T wm = cr.w[t] * m;
                    if (!need_off) {  // the input gradient alone: no dot products
                      scatter_only(gimg + base, gv, wm, len);
                      continue;
                    }
                    const B* s = img + base;
                    T* d = gimg + base;
                    const T dot = need_in ? scatter_and_dot<true>(d, gv, s, wm, len)
                                          : scatter_and_dot<false>(d, gv, s, wm, len);
                    // fused explicitly (what -ffp-contract made of gy += dot * dwdy), so the four-corner path
                    // above, whose products the compiler may vectorise unfused, sums the same bits
                    gy = fused_madd(dot, cr.dwdy[t], gy);
                    gx = fused_madd(dot, cr.dwdx[t], gx);
                    gm = fused_madd(dot, cr.w[t], gm);
                  }
                }
                if (!need_off) continue;  // no partials
                pp[0] = gy * m;
                pp[1] = gx * m;
                pp[2] = gm;
              }
            }
          }
        });
        // reduce the block partials in block order (deterministic)
        if (need_off) at::parallel_for(q0, q1, 64, [&](int64_t r0, int64_t r1) {
          for (int64_t q = r0; q < r1; ++q) {
            T* go_row = goff + q * g.OG * 2 * K;
            T* gm_row = gmask ? gmask + q * g.OG * K : nullptr;
            for (int64_t b = 0; b < NB; ++b) {
              const int64_t og = blocks[b].og;
              const T* pp = part + ((b * P + (q - q0)) * K) * 3;
              for (int64_t k = 0; k < K; ++k) {
                go_row[og * 2 * K + 2 * k] += pp[3 * k];
                go_row[og * 2 * K + 2 * k + 1] += pp[3 * k + 1];
                if (gm_row) gm_row[og * K + k] += pp[3 * k + 2];
              }
            }
          }
        });
      }
    };
    if (fast) {
      body(float{}, uint16_t{});
    } else {
      AT_DISPATCH_FLOATING_TYPES(ct, "dcnv2_deform_conv2d_backward", [&] { body(scalar_t{}, scalar_t{}); });
    }
    // one group's sum is the gradient as it is (at::stack would copy it once more: 9.4 MB on c5)
    if (need_w) grad_w = g.G == 1 ? gw[0].unsqueeze(0) : at::stack(gw);
  }
  // Each gradient in the layout of its tensor (see is_channels_last): the channels-last results as they are,
  // the others copied to NCHW. grad_input goes back with the blocked transpose (torch's permute-contiguous
  // of c3's gradient took several times as long).
  const auto in_t = input.scalar_type();
  // a gradient that was not asked for: zeros shaped and laid out like its tensor
  auto zeros_like_layout = [](const at::Tensor& like) {
    return at::empty(like.sizes(), like.options().memory_format(is_channels_last(like) ? at::MemoryFormat::ChannelsLast
                                                                                        : at::MemoryFormat::Contiguous))
        .zero_();
  };
  at::Tensor grad_in = need_in ? grad_in_cl.permute({0, 3, 1, 2}) : zeros_like_layout(input);
  if (!need_in) {
    // nothing to lay out
  } else if (!is_channels_last(input) && in_t == at::kBFloat16) {
    // rounded to bf16 first, then transposed: half the bytes through the transpose, and no float32 NCHW copy
    // (each element rounds the same either way)
    const at::Tensor rounded = grad_in_cl.to(at::kBFloat16);
    grad_in = at::empty({g.N, g.C, g.H, g.W}, input.options());
    transpose_images(bf16_bits(rounded), bf16_bits(grad_in), g.N, g.H * g.W, g.C);
  } else if (!is_channels_last(input)) {
    grad_in = at::empty({g.N, g.C, g.H, g.W}, opts);
    AT_DISPATCH_FLOATING_TYPES(ct, "dcnv2_deform_conv2d_grad_input", [&] {
      transpose_images(grad_in_cl.data_ptr<scalar_t>(), grad_in.data_ptr<scalar_t>(), g.N, g.H * g.W, g.C);
    });
  }
  // [N, Ho, Wo, ch] rows as [N, ch, Ho, Wo] in the layout of `like`
  auto like_layout = [&](const at::Tensor& rows_t, int64_t ch, const at::Tensor& like) {
    const at::Tensor v = rows_t.view({g.N, g.Ho, g.Wo, ch}).permute({0, 3, 1, 2});
    return (is_channels_last(like) ? v : v.contiguous()).to(in_t);
  };
  at::Tensor grad_input = grad_in.to(in_t);
  at::Tensor grad_offset = need_off ? like_layout(grad_off_r, g.OG * 2 * g.K, offset) : zeros_like_layout(offset);
  at::Tensor grad_mask = !mask ? at::empty({0}, input.options())
                         : need_off ? like_layout(grad_mask_r, g.OG * g.K, *mask) : zeros_like_layout(*mask);
  at::Tensor grad_weight =
      !grad_w.defined()          ? zeros_like_layout(weight)
      : is_channels_last(weight) ? grad_w.view({g.Cout, g.kh, g.kw, g.Cg()}).permute({0, 3, 1, 2}).to(in_t)
                                 : grad_w.view({g.G, g.Coutg(), g.K, g.Cg()}).permute({0, 1, 3, 2}).contiguous()
                                       .view({g.Cout, g.Cg(), g.kh, g.kw}).to(in_t);
  at::Tensor grad_bias = grad_b.to(in_t);
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

// returns the counters (and zeroes them with reset); the argument only routes the call to the CPU
template <size_t N>
at::Tensor read_counts(std::atomic<int64_t> (&counts)[N], const at::Tensor& device_of, bool reset) {
  at::Tensor out = at::empty({static_cast<int64_t>(N)}, device_of.options().dtype(at::kLong));
  for (size_t i = 0; i < N; ++i) out[i] = reset ? counts[i].exchange(0) : counts[i].load();
  return out;
}

at::Tensor backward_counts(const at::Tensor& device_of, bool reset) {
  return read_counts(g_backward_counts, device_of, reset);
}

at::Tensor forward_counts(const at::Tensor& device_of, bool reset) {
  return read_counts(g_forward_counts, device_of, reset);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_forward_cpu);
  m.impl("_deform_conv2d_backward", &deform_conv2d_backward_cpu);
  m.impl("_deform_conv2d_backward_counts", &backward_counts);
  m.impl("_deform_conv2d_forward_counts", &forward_counts);
}

}  // namespace dcnv2
