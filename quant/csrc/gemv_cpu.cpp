// Matrix-vector products over localmix's quantized weights, for a few activation rows (decode),
// and the converter's per-group scale fit (fit_groups, at the end).
//
// PyTorch's `_weight_int4pack_mm_for_cpu` reads the same 4-bit layout but runs at ~7 GB/s on an
// AVX2 machine: a decode step is then bound by unpacking, not by memory. Here 16-bit
// activations are rounded to int8 per group and multiplied with integer multiply-adds (32 codes
// an instruction), float32 activations with float32 FMAs several accumulators deep.
//
// 4-bit layout (quant/formats.py): rows in blocks of 32; block b holds K columns of 16 bytes,
// byte (k, i) = row 32b+i's code in its low nibble, row 32b+i+16's in its high nibble.
// scales_zeros is (K/group, N, 2) bfloat16: w = (code - 8) * scale + zero.
// 8-bit layout: int8 (N, K) row-major, one bfloat16 scale per row: w = code * scale.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int kTile = 32;       // rows per 4-bit block
constexpr int kPrefetch = 2048;  // bytes ahead of the 4-bit reads

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The scale that rounds values to int8: their largest magnitude (the maximum over the lanes of
// amax, each lane's largest |x|) over 127, or 1 when all are zero.
inline float int8_scale(__m256 amax) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float top = _mm_cvtss_f32(m);
  return top > 0.0f ? top / 127.0f : 1.0f;
}

// exp(x) for eight float32 values (Cephes' polynomial, within 2 ulp; -inf gives 0).
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// One column of a block as four float vectors (rows 0-7, 8-15, 16-23, 24-31). The bytes are
// widened straight from memory and split into nibbles in 32-bit lanes, which keeps shuffles,
// the scarce unit on AVX2, to two per column.
inline void unpack_column(const uint8_t* p, __m256 w[4]) {
  const __m256i mask = _mm256_set1_epi32(0x0F);
  __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, mask));
  w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, mask));
  w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
  w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
}

// Adds scale * centered + zero * xsum to out[0..32), for one group of a block, where centered
// is sum_k (code - 8) * x. scales_zeros holds each row's pair as one 32-bit word
// (scale | zero << 16).
inline void finish_group(const c10::BFloat16* szg, const __m256 centered[4], float xsum,
                         float* out) {
  const __m256 s = _mm256_set1_ps(xsum);
  for (int j = 0; j < 4; ++j) {
    __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(szg + 16 * j));
    __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
    __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pair, _mm256_set1_epi32(0xFFFF0000)));
    __m256 o = _mm256_fmadd_ps(scale, centered[j], _mm256_loadu_ps(out + 8 * j));
    _mm256_storeu_ps(out + 8 * j, _mm256_fmadd_ps(zero, s, o));
  }
}

// sum_k code * x minus 8 * sum_k x: the codes' sum re-centred on code 8.
inline void center(__m256 dot[4], float xsum) {
  const __m256 s8 = _mm256_set1_ps(8.0f * xsum);
  for (int j = 0; j < 4; ++j) dot[j] = _mm256_sub_ps(dot[j], s8);
}

inline void fma4(const __m256 w[4], __m256 x, __m256& a0, __m256& a1, __m256& a2, __m256& a3) {
  a0 = _mm256_fmadd_ps(w[0], x, a0);
  a1 = _mm256_fmadd_ps(w[1], x, a1);
  a2 = _mm256_fmadd_ps(w[2], x, a2);
  a3 = _mm256_fmadd_ps(w[3], x, a3);
}

// One 32-row block times one activation row, or two (which share each unpacked column). For
// one row, even and odd columns go to separate accumulators so that consecutive FMAs never wait
// on each other. The accumulators are named variables because compilers keep arrays of vectors
// on the stack inside the loop; 8 accumulators, 4 weights and 1 activation fit 16 registers.
template <bool kTwoRows>
void int4_block(const uint8_t* qb, const c10::BFloat16* sz, const float* x, const float* xsum,
                int64_t K, int64_t N, int64_t group, int64_t block, float* y) {
  alignas(32) float out0[kTile] = {}, out1[kTile] = {};
  const int64_t groups = K / group;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t k = g * group; k < (g + 1) * group; k += kTwoRows ? 1 : 2) {
      __m256 w[4];
      unpack_column(qb + k * 16, w);
      fma4(w, _mm256_broadcast_ss(x + k), a0, a1, a2, a3);
      if (!kTwoRows) unpack_column(qb + (k + 1) * 16, w);
      fma4(w, _mm256_broadcast_ss(kTwoRows ? x + K + k : x + k + 1), b0, b1, b2, b3);
    }
    const c10::BFloat16* szg = sz + (g * N + block * kTile) * 2;
    if (kTwoRows) {
      __m256 dot0[4] = {a0, a1, a2, a3}, dot1[4] = {b0, b1, b2, b3};
      center(dot0, xsum[g]);
      center(dot1, xsum[groups + g]);
      finish_group(szg, dot0, xsum[g], out0);
      finish_group(szg, dot1, xsum[groups + g], out1);
    } else {
      __m256 dot[4] = {_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2),
                       _mm256_add_ps(a3, b3)};
      center(dot, xsum[g]);
      finish_group(szg, dot, xsum[g], out0);
    }
  }
  std::copy(out0, out0 + kTile, y + block * kTile);
  if (kTwoRows) std::copy(out1, out1 + kTile, y + N + block * kTile);
}

// Working memory reused from call to call (grown, never shrunk), so that a decode step makes no
// allocation beyond its result tensor. One per calling thread; the parallel regions only read
// the caller's.
struct Scratch {
  std::vector<float> x, y, h, xsum, hsum, xdx, hdx, scores, partial;
  std::vector<int8_t> xpattern, hpattern, q8;
  std::vector<int32_t> xqsum, hqsum;
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

template <class T>
T* grown(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Activations quantized to int8 per group (the weights' groups), as llama.cpp multiplies its
// 4-bit formats. For row m: `dx` scales, `qsum` sums of the codes, `xsum` sums of the float
// values, each (groups,), and for every 4 columns k..k+3 a 32-byte pattern
// (x_k, x_k+2) x 8 | (x_k+1, x_k+3) x 8 that lines up with the interleaved weight bytes below.
struct Q8Rows {
  int8_t* pattern;  // (M, K/4, 32)
  float* dx;        // (M, groups)
  int32_t* qsum;    // (M, groups)
  float* xsum;      // (M, groups)
  int64_t K, groups;

  Q8Rows row(int64_t m) const {  // the rows from m on
    return {pattern + m * K * 8, dx + m * groups, qsum + m * groups, xsum + m * groups, K, groups};
  }
};

Q8Rows q8_rows(std::vector<int8_t>& pattern, std::vector<float>& dx, std::vector<int32_t>& qsum,
               std::vector<float>& xsum, int64_t M, int64_t K, int64_t group) {
  const int64_t groups = K / group;
  return {grown(pattern, M * K * 8), grown(dx, M * groups), grown(qsum, M * groups),
          grown(xsum, M * groups), K, groups};
}

// Quantizes groups g0..g1 of row m of `r` from x, that row's K float values.
void quantize_groups(const float* x, int64_t m, int64_t g0, int64_t g1, int64_t group,
                     const Q8Rows& r) {
  alignas(32) int32_t q[128];  // one group (group sizes are 32, 64 or 128)
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t g = g0; g < g1; ++g) {
    const float* xg = x + g * group;
    __m256 amax = _mm256_setzero_ps(), sum = amax;
    for (int64_t i = 0; i < group; i += 8) {
      const __m256 v = _mm256_loadu_ps(xg + i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
      sum = _mm256_add_ps(sum, v);
    }
    const float dx = int8_scale(amax);
    const __m256 dxv = _mm256_set1_ps(dx);
    __m256i qsum = _mm256_setzero_si256();
    for (int64_t i = 0; i < group; i += 8) {  // round to nearest even, as nearbyint does
      const __m256i v = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(xg + i), dxv));
      _mm256_store_si256(reinterpret_cast<__m256i*>(q + i), v);
      qsum = _mm256_add_epi32(qsum, v);
    }
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), qsum);
    const int64_t at = m * r.groups + g;
    r.dx[at] = dx, r.xsum[at] = hsum(sum);
    r.qsum[at] = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
    int8_t* p = r.pattern + (m * r.K + g * group) * 8;
    for (int64_t s = 0; s < group / 4; ++s, p += 32) {
      const int8_t a = q[4 * s], b = q[4 * s + 2], c = q[4 * s + 1], d = q[4 * s + 3];
      for (int i = 0; i < 8; ++i) {
        p[2 * i] = a, p[2 * i + 1] = b;
        p[16 + 2 * i] = c, p[16 + 2 * i + 1] = d;
      }
    }
  }
}

// Adds the int16 partial sums of 16 rows (two 128-bit lanes, each 8 rows) into 8 int32 rows.
inline __m256i widen_lanes(__m256i acc16, __m256i acc32) {
  __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc16));
  __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc16, 1));
  return _mm256_add_epi32(acc32, _mm256_add_epi32(lo, hi));
}

// Adds a group's integer sums r (rows 0-7 .. 24-31 of a block) for activation row m to out,
// centred on code 8 in integers with the quantized activations' own sum: the codes average
// about 8, so centring with the exact sum of x would multiply x's rounding errors by 8.
inline void finish_q8(const __m256i r[4], const Q8Rows& xr, int64_t m, int64_t g,
                      const c10::BFloat16* szg, float* out) {
  const int64_t at = m * xr.groups + g;
  const __m256i c = _mm256_set1_epi32(8 * xr.qsum[at]);
  const __m256 dx = _mm256_set1_ps(xr.dx[at]);
  __m256 dot[4];
  for (int j = 0; j < 4; ++j)
    dot[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(r[j], c)), dx);
  finish_group(szg, dot, xr.xsum[at], out);
}

// One 32-row block (of a weight with N rows) times rows m (and m + 1 when kTwoRows) of
// int8-quantized activations, with integer multiply-adds, into out[0..32) (and out2).
// Four columns at a time: two 32-byte loads hold columns (k, k+1) and (k+2, k+3); interleaving
// their bytes pairs two columns of the same row, so one maddubs multiplies and adds 32 codes.
// Two rows share each unpacked column, which makes a many-row product (prefill) cheaper per
// row. Partial sums stay int16 for 8 steps (|sum| <= 8 * 2 * 15 * 127 < 32768), then widen.
template <bool kTwoRows>
void int4_block_q8(const uint8_t* qb, const c10::BFloat16* sz, const Q8Rows& xr, int64_t m,
                   int64_t N, int64_t group, int64_t block, float* out, float* out2 = nullptr) {
  std::fill(out, out + kTile, 0.0f);
  if (kTwoRows) std::fill(out2, out2 + kTile, 0.0f);
  // The next block's scales and zeros, which a thread reads next: a block's groups lie N rows
  // apart in scales_zeros, a stream per group that the hardware prefetchers do not follow, so
  // each group's first read missed the caches (experts read 8% faster with this).
  for (int64_t g = 0; g < xr.groups; ++g) {
    const char* next = reinterpret_cast<const char*>(sz + (g * N + (block + 1) * kTile) * 2);
    _mm_prefetch(next, _MM_HINT_T0);
    _mm_prefetch(next + 64, _MM_HINT_T0);
  }
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const int8_t* pattern = xr.pattern + m * xr.K * 8;
  const int8_t* pattern2 = pattern + xr.K * 8;
  for (int64_t g = 0; g < xr.groups; ++g) {
    __m256i r[4], r2[4];  // rows 0-7 .. 24-31, int32
    for (int j = 0; j < 4; ++j) r[j] = r2[j] = _mm256_setzero_si256();
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
      __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
      __m256i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int64_t k = k0; k < k0 + 32; k += 4) {
        // A decode step finds its weights in memory, not cache: ask for them 2 KB ahead
        // (past the block's end is the next block; past the tensor's end is harmless).
        _mm_prefetch(reinterpret_cast<const char*>(qb + k * 16 + kPrefetch), _MM_HINT_T0);
        __m256i c01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + k * 16));
        __m256i c23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + (k + 2) * 16));
        __m256i u0 = _mm256_unpacklo_epi8(c01, c23);  // rows 0-7 (low nibbles), 16-23 (high)
        __m256i u1 = _mm256_unpackhi_epi8(c01, c23);  // rows 8-15, 24-31
        const __m256i w0 = _mm256_and_si256(u0, mask), w1 = _mm256_and_si256(u1, mask);
        const __m256i w2 = _mm256_and_si256(_mm256_srli_epi16(u0, 4), mask);
        const __m256i w3 = _mm256_and_si256(_mm256_srli_epi16(u1, 4), mask);
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pattern + k * 8));
        a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(w0, xv));
        a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(w1, xv));
        a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(w2, xv));
        a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(w3, xv));
        if (kTwoRows) {
          const __m256i xv2 =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pattern2 + k * 8));
          b0 = _mm256_add_epi16(b0, _mm256_maddubs_epi16(w0, xv2));
          b1 = _mm256_add_epi16(b1, _mm256_maddubs_epi16(w1, xv2));
          b2 = _mm256_add_epi16(b2, _mm256_maddubs_epi16(w2, xv2));
          b3 = _mm256_add_epi16(b3, _mm256_maddubs_epi16(w3, xv2));
        }
      }
      r[0] = widen_lanes(a0, r[0]), r[1] = widen_lanes(a1, r[1]);
      r[2] = widen_lanes(a2, r[2]), r[3] = widen_lanes(a3, r[3]);
      if (kTwoRows) {
        r2[0] = widen_lanes(b0, r2[0]), r2[1] = widen_lanes(b1, r2[1]);
        r2[2] = widen_lanes(b2, r2[2]), r2[3] = widen_lanes(b3, r2[3]);
      }
    }
    const c10::BFloat16* szg = sz + (g * N + block * kTile) * 2;
    finish_q8(r, xr, m, g, szg, out);
    if (kTwoRows) finish_q8(r2, xr, m + 1, g, szg, out2);
  }
}

// One block times every row of xr, two rows at a time; row m's results go to y + m * stride.
void int4_block_rows(const uint8_t* qb, const c10::BFloat16* sz, const Q8Rows& xr, int64_t M,
                     int64_t N, int64_t group, int64_t block, float* y, int64_t stride) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2)
    int4_block_q8<true>(qb, sz, xr, m, N, group, block, y + m * stride, y + (m + 1) * stride);
  if (m < M) int4_block_q8<false>(qb, sz, xr, m, N, group, block, y + m * stride);
}

// Rows of quantized activations taken together while a thread goes over its blocks: as many as
// keep their patterns (8 bytes a column) in a core's L2 cache beside the block being read.
// More rows at once would stream the patterns from L3 for every block (prefill went from
// 0.12 ms a row at 32 rows to 0.35 at 128 on a 3584x1024 weight).
constexpr int64_t kPatternBytes = 128 * 1024;

int64_t row_chunk(int64_t K) { return std::max<int64_t>(2, kPatternBytes / (K * 8) / 2 * 2); }

// Blocks b0..b1 of a 4-bit weight (N rows, xr.K columns) times every row of xr, a chunk of
// rows at a time; row m's results go to y + m * N.
void int4_blocks(const uint8_t* q, const c10::BFloat16* sz, const Q8Rows& xr, int64_t M,
                 int64_t N, int64_t group, int64_t b0, int64_t b1, float* y) {
  const int64_t chunk = row_chunk(xr.K);
  for (int64_t m0 = 0; m0 < M; m0 += chunk)
    for (int64_t b = b0; b < b1; ++b)
      int4_block_rows(q + b * xr.K * 16, sz, xr.row(m0), std::min(chunk, M - m0), N, group, b,
                      y + m0 * N + b * kTile, N);
}

// Blocks b0..b1 of an expert's hidden activations (rows b * 32 ..): silu(w1 x) * (w3 x) for
// every row of xr into h (M, H), w1's and w3's products block by block, two rows at a time.
void swiglu_hidden(const uint8_t* p1, const c10::BFloat16* z1, const uint8_t* p3,
                   const c10::BFloat16* z3, const Q8Rows& xr, int64_t M, int64_t K, int64_t H,
                   int64_t group, int64_t b0, int64_t b1, float* h) {
  alignas(32) float gate[2 * kTile], up[2 * kTile];
  const int64_t chunk = row_chunk(K);
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t m = m0; m < std::min(M, m0 + chunk); m += 2) {
        const int64_t rows = std::min<int64_t>(2, M - m);
        int4_block_rows(p1 + b * K * 16, z1, xr.row(m), rows, H, group, b, gate, kTile);
        int4_block_rows(p3 + b * K * 16, z3, xr.row(m), rows, H, group, b, up, kTile);
        for (int64_t r = 0; r < rows; ++r) {
          float* hb = h + (m + r) * H + b * kTile;
          const float *gr = gate + r * kTile, *ur = up + r * kTile;
          for (int i = 0; i < kTile; i += 8) {  // silu(gate) * up
            const __m256 g = _mm256_loadu_ps(gr + i);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(hb + i, _mm256_mul_ps(silu, _mm256_loadu_ps(ur + i)));
          }
        }
      }
    }
  }
}

// Eight int32 partial sums of 32 int8 x int8 products. maddubs takes one unsigned operand, so
// the weight's sign moves onto the activation; |w| and |x| <= 127 keep its pair sums exact.
inline __m256i dot32(const int8_t* w, __m256i xv) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// x rounded to int8 per 32 values (llama.cpp's Q8_0): codes xq (n) and scales xd (n / 32).
// Each code is x / scale rounded to the nearest even (cvtps in the default rounding mode, as
// std::nearbyint), 32 at a time.
void round_q8_0(const float* xp, int64_t n, int8_t* xq, float* xd) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lanes
  for (int64_t b = 0; b < n / 32; ++b) {
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xp + 32 * b + 8 * i);
      amax = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), amax);  // a NaN is passed over
    }
    const float d = int8_scale(amax);
    xd[b] = d;
    const __m256 dv = _mm256_set1_ps(d);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_div_ps(v[i], dv));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                             _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + 32 * b),
                        _mm256_permutevar8x32_epi32(bytes, order));
  }
}

// One row of an int8 weight (K columns) times one int8-rounded activation row (codes xr,
// scales dr), 64 columns a step on two accumulators, prefetching 1 KB ahead in the row.
inline float int8_dot(const int8_t* w, const int8_t* xr, const float* dr, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + 1024), _MM_HINT_T0);
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k + 32));
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(w + k, x0)), _mm256_set1_ps(dr[k / 32]), a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(w + k + 32, x1)),
                         _mm256_set1_ps(dr[k / 32 + 1]), a1);
  }
  for (; k < K; k += 32) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k));
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(w + k, x0)), _mm256_set1_ps(dr[k / 32]), a0);
  }
  return hsum(_mm256_add_ps(a0, a1));
}

// Four rows of an int8 weight (from r0, K columns, scales s) times the M int8-rounded rows of
// x, with integer products; row m's four results go to y + m * stride.
// One activation row (decode) goes through the weight row by row: a thread's rows are then
// one stream that the hardware prefetchers follow, where four rows side by side are four
// streams of a row's length (1 KB for mini), which they keep losing (the output head read 17
// GB/s that way, 27 row by row). Several rows (prefill) take the four weight rows side by
// side, which shares each activation load among them (a third faster at 128 rows).
void int8_rows4(const int8_t* r0, const c10::BFloat16* s, int64_t K, const int8_t* xq,
                const float* xd, int64_t M, float* y, int64_t stride) {
  if (M == 1) {
    for (int r = 0; r < 4; ++r) y[r] = int8_dot(r0 + r * K, xq, xd, K) * static_cast<float>(s[r]);
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xr = xq + m * K;
    const float* dr = xd + m * K / 32;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
      if (k % 64 == 0)  // the next four rows, at the same offset, one line each
        for (int r = 4; r < 8; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(r0 + r * K + k), _MM_HINT_T0);
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k));
      const __m256 d = _mm256_set1_ps(dr[k / 32]);
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(r0 + k, xv)), d, a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(r0 + K + k, xv)), d, a1);
      a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(r0 + 2 * K + k, xv)), d, a2);
      a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(r0 + 3 * K + k, xv)), d, a3);
    }
    float* yr = y + m * stride;
    yr[0] = hsum(a0) * static_cast<float>(s[0]);
    yr[1] = hsum(a1) * static_cast<float>(s[1]);
    yr[2] = hsum(a2) * static_cast<float>(s[2]);
    yr[3] = hsum(a3) * static_cast<float>(s[3]);
  }
}

// Activation rows as float32 in `buffer`. Done by hand: each ATen op costs microseconds, as
// much as a small matrix-vector product.
const float* rows_as_float(const torch::Tensor& x, int64_t K, std::vector<float>& buffer) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "activations must be (rows, ", K, ")");
  if (x.scalar_type() == torch::kFloat32 && x.is_contiguous()) return x.data_ptr<float>();
  const torch::Tensor xc = x.contiguous();  // a no-op for the contiguous rows callers pass
  const int64_t n = xc.numel();
  float* out = grown(buffer, n);
  if (xc.scalar_type() == torch::kBFloat16) {
    const auto* p = xc.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  } else {
    const torch::Tensor xf = xc.to(torch::kFloat32);
    std::copy(xf.data_ptr<float>(), xf.data_ptr<float>() + n, out);
  }
  return out;
}

// An (M, N) result in `like`'s dtype, and where to write its float32 values: the tensor itself
// when float32, else `buffer`, to be stored by `store_result`.
std::pair<torch::Tensor, float*> new_result(int64_t M, int64_t N, const torch::Tensor& like,
                                            std::vector<float>& buffer) {
  torch::Tensor out = torch::empty({M, N}, like.options());
  float* y = out.scalar_type() == torch::kFloat32 ? out.data_ptr<float>() : grown(buffer, M * N);
  return {out, y};
}

void store_result(torch::Tensor& out, const float* y) {
  const int64_t n = out.numel();
  if (out.scalar_type() == torch::kFloat32) return;
  if (out.scalar_type() == torch::kBFloat16) {
    auto* p = out.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(y[i]);
  } else {
    out.copy_(torch::from_blob(const_cast<float*>(y), out.sizes(), torch::kFloat32));
  }
}

void check_int4(const torch::Tensor& qweight, const torch::Tensor& scales_zeros, int64_t group) {
  TORCH_CHECK(qweight.dtype() == torch::kUInt8 && qweight.is_contiguous() && qweight.dim() == 2,
              "qweight must be contiguous uint8 (N, K/2)");
  TORCH_CHECK(scales_zeros.dtype() == torch::kBFloat16 && scales_zeros.is_contiguous(),
              "scales_zeros must be contiguous bfloat16");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  TORCH_CHECK(N % kTile == 0 && group % 32 == 0 && group <= 128 && K % group == 0,
              "bad 4-bit shape");
  TORCH_CHECK(scales_zeros.numel() == K / group * N * 2, "scales_zeros does not match qweight");
}

// y (M, N) = x (M, K) times a 4-bit weight, float32 throughout (float32 activations).
void int4_product_exact(const float* xp, int64_t M, const torch::Tensor& qweight,
                        const torch::Tensor& scales_zeros, int64_t group, float* yp) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, groups = K / group;
  std::vector<float> xsum(M * groups, 0.0f);  // (M, groups)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * groups + k / group] += xp[m * K + k];
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const auto* sz = scales_zeros.data_ptr<c10::BFloat16>();
  const float* sp = xsum.data();
  at::parallel_for(0, N / kTile, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* qb = q + b * K * 16;
      int64_t m = 0;
      for (; m + 2 <= M; m += 2)
        int4_block<true>(qb, sz, xp + m * K, sp + m * groups, K, N, group, b, yp + m * N);
      if (m < M)
        int4_block<false>(qb, sz, xp + m * K, sp + m * groups, K, N, group, b, yp + m * N);
    }
  });
}

// Work items (of `bytes` of weight each, times `rows` activation rows) a thread takes at the
// least: a decode step's small products (a 256x1024 key projection) then run on the calling
// thread alone, since waking a thread that went to sleep (localmix's threads spin only briefly,
// localmix/threads.py) costs more than reading 256 KB.
constexpr int64_t kMinBytesPerThread = 256 * 1024;

int64_t grain(int64_t bytes, int64_t rows) {
  return std::max<int64_t>(1, kMinBytesPerThread / (bytes * std::max<int64_t>(rows, 1)));
}

// The threads a kernel's own parallel region runs on: PyTorch's count, one inside another
// parallel region.
int region_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

}  // namespace

// x (M, K) any float dtype; qweight uint8 (N, K/2); scales_zeros bf16 (K/group, N, 2).
// Returns (M, N) in x's dtype. Float32 activations multiply exactly (float32 sums); 16-bit ones
// are quantized to int8 per group and multiplied in integers, about twice as fast, with errors
// well under those of 16-bit rounding and of the 4-bit weights themselves.
torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& qweight,
                      const torch::Tensor& scales_zeros, int64_t group) {
  check_int4(qweight, scales_zeros, group);
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, M = x.size(0);
  Scratch& s = scratch();
  const float* xf = rows_as_float(x, K, s.x);
  auto [out, y] = new_result(M, N, x, s.y);
  if (x.scalar_type() == torch::kFloat32) {
    int4_product_exact(xf, M, qweight, scales_zeros, group, y);
    return out;
  }
  const Q8Rows xr = q8_rows(s.xpattern, s.xdx, s.xqsum, s.xsum, M, K, group);
  for (int64_t m = 0; m < M; ++m) quantize_groups(xf + m * K, m, 0, K / group, group, xr);
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const auto* sz = scales_zeros.data_ptr<c10::BFloat16>();
  at::parallel_for(0, N / kTile, grain(kTile * K / 2, M), [&](int64_t begin, int64_t end) {
    int4_blocks(q, sz, xr, M, N, group, begin, end, y);
  });
  store_result(out, y);
  return out;
}

namespace {

// Thread t of T's share of one expert, called inside a parallel region: its whole weight
// groups of the hidden activations (w1's and w3's blocks, then silu), their int8 rounding, a
// barrier for the other threads' groups, then its share of w2's blocks. w holds the expert's
// (q1, s1, q3, s3, q2, s2); xr the rounded activations, hr, h and y its own working memory.
void swiglu_share(const std::vector<torch::Tensor>& w, const Q8Rows& xr, const Q8Rows& hr,
                  float* h, float* y, int64_t M, int64_t K, int64_t group) {
  const int64_t H = w[0].size(0), D = w[4].size(0);
  const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
  const int64_t hidden_groups = H / group, blocks_per_group = group / kTile, out_blocks = D / kTile;
  const int64_t g0 = hidden_groups * t / T, g1 = hidden_groups * (t + 1) / T;
  swiglu_hidden(w[0].data_ptr<uint8_t>(), w[1].data_ptr<c10::BFloat16>(),
                w[2].data_ptr<uint8_t>(), w[3].data_ptr<c10::BFloat16>(), xr, M, K, H, group,
                g0 * blocks_per_group, g1 * blocks_per_group, h);
  for (int64_t m = 0; m < M; ++m) quantize_groups(h + m * H, m, g0, g1, group, hr);
#pragma omp barrier
  int4_blocks(w[4].data_ptr<uint8_t>(), w[5].data_ptr<c10::BFloat16>(), hr, M, D, group,
              out_blocks * t / T, out_blocks * (t + 1) / T, y);
}

}  // namespace

// A whole SwiGLU expert, w2(silu(w1 x) * w3 x), in one call. For 16-bit activations: x is
// quantized once for w1 and w3, which run block by block in the same pass, and the whole
// expert is one parallel region. Each thread computes whole weight groups of the hidden
// activations h and quantizes them itself; after one barrier, w2's blocks are shared out.
// Float32 activations take the exact path, product by product.
torch::Tensor int4_swiglu(const torch::Tensor& x, const torch::Tensor& q1,
                          const torch::Tensor& s1, const torch::Tensor& q3,
                          const torch::Tensor& s3, const torch::Tensor& q2,
                          const torch::Tensor& s2, int64_t group) {
  check_int4(q1, s1, group);
  check_int4(q3, s3, group);
  check_int4(q2, s2, group);
  const int64_t K = q1.size(1) * 2, H = q1.size(0), D = q2.size(0), M = x.size(0);
  TORCH_CHECK(q3.size(0) == H && q3.size(1) * 2 == K && q2.size(1) * 2 == H,
              "w1, w3 and w2 do not chain");
  Scratch& s = scratch();
  const float* xf = rows_as_float(x, K, s.x);
  auto [out, y] = new_result(M, D, x, s.y);
  float* h = grown(s.h, 2 * M * H);  // (M, H) gated activations, then (M, H) of w3's products
  if (x.scalar_type() == torch::kFloat32) {
    int4_product_exact(xf, M, q1, s1, group, h);
    int4_product_exact(xf, M, q3, s3, group, h + M * H);
    for (int64_t i = 0; i < M * H; ++i) h[i] = h[i] / (1.0f + std::exp(-h[i])) * h[M * H + i];
    int4_product_exact(h, M, q2, s2, group, y);
    return out;
  }
  const Q8Rows xr = q8_rows(s.xpattern, s.xdx, s.xqsum, s.xsum, M, K, group);
  for (int64_t m = 0; m < M; ++m) quantize_groups(xf + m * K, m, 0, K / group, group, xr);
  const Q8Rows hr = q8_rows(s.hpattern, s.hdx, s.hqsum, s.hsum, M, H, group);
  const std::vector<torch::Tensor> w{q1, s1, q3, s3, q2, s2};
#pragma omp parallel num_threads(region_threads())
  swiglu_share(w, xr, hr, h, y, M, K, group);
  store_result(out, y);
  return out;
}

namespace {

// One expert's working memory in int4_moe: its hidden activations, their int8 rounding and its
// output, kept apart from the other experts' so that no barrier separates one expert's last
// phase from the next one's first.
struct ExpertScratch {
  std::vector<float> h, hdx, hsum, y;
  std::vector<int8_t> hpattern;
  std::vector<int32_t> hqsum;
};

// Experts as int4_moe and DecodeBlock take them: each (q1, s1, q3, s3, q2, s2), 4-bit with
// `group`, all of one shape, w2 taking what w1 and w3 give.
void check_experts(const std::vector<std::vector<torch::Tensor>>& experts, int64_t group) {
  for (const auto& e : experts) {
    TORCH_CHECK(e.size() == 6, "an expert is (q1, s1, q3, s3, q2, s2)");
    check_int4(e[0], e[1], group), check_int4(e[2], e[3], group), check_int4(e[4], e[5], group);
    TORCH_CHECK(e[0].sizes() == experts[0][0].sizes() && e[2].sizes() == e[0].sizes() &&
                    e[4].sizes() == experts[0][4].sizes(),
                "the experts do not share one shape");
    TORCH_CHECK(e[4].size(1) * 2 == e[0].size(0), "w1, w3 and w2 do not chain");
  }
}

// 16-bit y rounded to T, times w rounded to T, added to acc rounded to T: what
// `sum_in_order(expert(x) * w ...)` computes in T, one expert at a time in the caller's order.
template <class T>
__attribute__((optimize("fp-contract=off"))) void add_weighted(const float* y, float w,
                                                               bool first, T* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T term = static_cast<T>(static_cast<float>(static_cast<T>(y[i])) * w);
    acc[i] = first ? term : static_cast<T>(static_cast<float>(acc[i]) + static_cast<float>(term));
  }
}

}  // namespace

// A decode step's MoE experts, computed and combined in one call: sum over i of
// weights[i] * expert_i(x), added in the order given (callers pass ascending expert ids), each
// product and sum rounded to x's dtype as the model's own combine rounds them. experts[i] is
// (q1, s1, q3, s3, q2, s2), all experts of one shape. For 16-bit x, x is rounded to int8 once
// and all experts run in one parallel region with one barrier each; float32 x takes the exact
// path expert by expert.
torch::Tensor int4_moe(const torch::Tensor& x,
                       const std::vector<std::vector<torch::Tensor>>& experts,
                       const std::vector<double>& weights, int64_t group) {
  TORCH_CHECK(!experts.empty() && experts.size() == weights.size(), "one weight per expert");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == torch::kBFloat16 || dtype == torch::kFloat32,
              "int4_moe takes bfloat16 or float32 activations");
  check_experts(experts, group);
  const torch::Tensor& q1 = experts[0][0];
  const torch::Tensor& q2 = experts[0][4];
  const int64_t K = q1.size(1) * 2, H = q1.size(0), D = q2.size(0), M = x.size(0);
  const int64_t E = static_cast<int64_t>(experts.size());
  torch::Tensor out = torch::empty({M, D}, x.options());
  static thread_local std::vector<ExpertScratch> pool;
  if (static_cast<int64_t>(pool.size()) < E) pool.resize(E);
  if (dtype == torch::kFloat32) {
    for (int64_t e = 0; e < E; ++e) {
      torch::Tensor y = int4_swiglu(x, experts[e][0], experts[e][1], experts[e][2],
                                    experts[e][3], experts[e][4], experts[e][5], group);
      add_weighted(y.data_ptr<float>(), static_cast<float>(weights[e]), e == 0,
                   out.data_ptr<float>(), M * D);
    }
    return out;
  }
  Scratch& s = scratch();
  const float* xf = rows_as_float(x, K, s.x);
  const Q8Rows xr = q8_rows(s.xpattern, s.xdx, s.xqsum, s.xsum, M, K, group);
  for (int64_t m = 0; m < M; ++m) quantize_groups(xf + m * K, m, 0, K / group, group, xr);
  std::vector<Q8Rows> hr;
  std::vector<float*> hs, ys;
  for (int64_t e = 0; e < E; ++e) {
    ExpertScratch& b = pool[e];
    hr.push_back(q8_rows(b.hpattern, b.hdx, b.hqsum, b.hsum, M, H, group));
    hs.push_back(grown(b.h, M * H));
    ys.push_back(grown(b.y, M * D));
  }
#pragma omp parallel num_threads(region_threads())
  for (int64_t e = 0; e < E; ++e) swiglu_share(experts[e], xr, hr[e], hs[e], ys[e], M, K, group);
  auto* acc = out.data_ptr<c10::BFloat16>();
  for (int64_t e = 0; e < E; ++e)
    add_weighted(ys[e], static_cast<float>(weights[e]), e == 0, acc, M * D);
  return out;
}

// x (M, K); qweight int8 (N, K); scales bf16 (N,). Returns (M, N) in x's dtype. As in int4_mm,
// float32 activations multiply exactly and 16-bit ones are rounded to int8 (per 32 columns).
torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& qweight,
                      const torch::Tensor& scales) {
  TORCH_CHECK(qweight.dtype() == torch::kInt8 && qweight.is_contiguous() && qweight.dim() == 2,
              "qweight must be contiguous int8 (N, K)");
  TORCH_CHECK(scales.dtype() == torch::kBFloat16 && scales.is_contiguous() &&
                  scales.numel() == qweight.size(0),
              "scales must be bfloat16 (N,)");
  const int64_t N = qweight.size(0), K = qweight.size(1), M = x.size(0);
  TORCH_CHECK(K % 16 == 0 && N % 4 == 0, "int8 weights need in % 16 == 0 and out % 4 == 0");
  Scratch& scr = scratch();
  const float* xp = rows_as_float(x, K, scr.x);
  auto [out, yp] = new_result(M, N, x, scr.y);
  const int8_t* q = qweight.data_ptr<int8_t>();
  const auto* s = scales.data_ptr<c10::BFloat16>();
  if (x.scalar_type() != torch::kFloat32 && K % 32 == 0) {
    // 16-bit activations: rounded to int8 per 32 columns (llama.cpp's Q8_0), integer products,
    // four weight rows at once.
    int8_t* xq = grown(scr.q8, M * K);
    float* xd = grown(scr.xdx, M * K / 32);
    round_q8_0(xp, M * K, xq, xd);
    at::parallel_for(0, N / 4, grain(4 * K, M), [&](int64_t begin, int64_t end) {
      for (int64_t n = 4 * begin; n < 4 * end; n += 4)
        int8_rows4(q + n * K, s + n, K, xq, xd, M, yp + n, N);
    });
    store_result(out, yp);
    return out;
  }
  // Four weight rows at a time, two accumulators each: eight independent FMA chains.
  at::parallel_for(0, N / 4, 4, [&](int64_t begin, int64_t end) {
    for (int64_t n = 4 * begin; n < 4 * end; n += 4) {
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        const int8_t* r0 = q + n * K;
        for (int64_t k = 0; k < K; k += 16) {
          const __m256 x0 = _mm256_loadu_ps(xr + k), x1 = _mm256_loadu_ps(xr + k + 8);
#define LOCALMIX_ROW(r, a, b)                                                              \
  a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(                             \
                          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r0 + r * K + k)))), \
                      x0, a);                                                              \
  b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(                             \
                          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r0 + r * K + k + 8)))), \
                      x1, b);
          LOCALMIX_ROW(0, a0, b0)
          LOCALMIX_ROW(1, a1, b1)
          LOCALMIX_ROW(2, a2, b2)
          LOCALMIX_ROW(3, a3, b3)
#undef LOCALMIX_ROW
        }
        yp[m * N + n] = hsum(_mm256_add_ps(a0, b0)) * static_cast<float>(s[n]);
        yp[m * N + n + 1] = hsum(_mm256_add_ps(a1, b1)) * static_cast<float>(s[n + 1]);
        yp[m * N + n + 2] = hsum(_mm256_add_ps(a2, b2)) * static_cast<float>(s[n + 2]);
        yp[m * N + n + 3] = hsum(_mm256_add_ps(a3, b3)) * static_cast<float>(s[n + 3]);
      }
    }
  });
  store_result(out, yp);
  return out;
}

// Several int8 weights of one width times the same activation rows, as one product: x (M, K)
// rounded once, every weight's four-row groups shared out in one parallel region; returns
// (M, sum of the weights' rows), the weights' results side by side in x's dtype. A decode step's
// query, key and value projections in one call: the key's and value's alone are too small to
// be worth a second thread.
torch::Tensor int8_mm_many(const torch::Tensor& x, const std::vector<torch::Tensor>& qweights,
                           const std::vector<torch::Tensor>& scales) {
  TORCH_CHECK(!qweights.empty() && qweights.size() == scales.size(), "one scale per weight");
  const int64_t K = qweights[0].size(1), M = x.size(0);
  std::vector<int64_t> first_group{0};  // each weight's first four-row group
  for (size_t w = 0; w < qweights.size(); ++w) {
    const torch::Tensor &q = qweights[w], &sc = scales[w];
    TORCH_CHECK(q.dtype() == torch::kInt8 && q.is_contiguous() && q.dim() == 2 && q.size(1) == K,
                "qweights must be contiguous int8 (N, K) of one K");
    TORCH_CHECK(sc.dtype() == torch::kBFloat16 && sc.is_contiguous() && sc.numel() == q.size(0),
                "scales must be bfloat16 (N,)");
    TORCH_CHECK(q.size(0) % 4 == 0, "int8 weights need out % 4 == 0");
    first_group.push_back(first_group.back() + q.size(0) / 4);
  }
  TORCH_CHECK(x.scalar_type() != torch::kFloat32 && K % 32 == 0,
              "int8_mm_many takes 16-bit activations and in % 32 == 0");
  const int64_t groups = first_group.back(), N = 4 * groups;
  Scratch& scr = scratch();
  const float* xp = rows_as_float(x, K, scr.x);
  auto [out, yp] = new_result(M, N, x, scr.y);
  int8_t* xq = grown(scr.q8, M * K);
  float* xd = grown(scr.xdx, M * K / 32);
  round_q8_0(xp, M * K, xq, xd);
  at::parallel_for(0, groups, grain(4 * K, M), [&](int64_t begin, int64_t end) {
    size_t w = 0;
    for (int64_t g = begin; g < end; ++g) {
      while (g >= first_group[w + 1]) ++w;
      const int64_t row = 4 * (g - first_group[w]);
      int8_rows4(qweights[w].data_ptr<int8_t>() + row * K,
                 scales[w].data_ptr<c10::BFloat16>() + row, K, xq, xd, M, yp + 4 * g, N);
    }
  });
  store_result(out, yp);
  return out;
}

// y (M, N) = x (M, K) times a bfloat16 weight (N, K), transposed, with float32 sums, for a few
// activation rows (decode). PyTorch's own bfloat16 matrix-vector product reads about 8 GB/s on an
// AVX2 machine, and for a weight as small as the router's wakes a second thread for 100 us.
torch::Tensor bf16_mm(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.is_contiguous() && w.dim() == 2,
              "the weight must be contiguous bfloat16 (N, K)");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  Scratch& scr = scratch();
  const float* xp = rows_as_float(x, K, scr.x);
  auto [out, yp] = new_result(M, N, x, scr.y);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  const int64_t K8 = K / 8 * 8;
  auto load8 = [](const uint16_t* p) {  // 8 bfloat16 values as float32
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  };
  auto tail = [&](const uint16_t* row, const float* xr, float acc) {  // columns K8..K
    for (int64_t k = K8; k < K; ++k) acc += c10::BFloat16(row[k], c10::BFloat16::from_bits()) * xr[k];
    return acc;
  };
  at::parallel_for(0, (N + 3) / 4, grain(8 * K, M), [&](int64_t begin, int64_t end) {
    for (int64_t n = 4 * begin; n < std::min(N, 4 * end); n += 4) {
      const int64_t rows = std::min<int64_t>(4, N - n);
      if (M == 1) {  // row by row, one stream (as int8_rows4 does for one row): 25 GB/s, not 17
        for (int64_t r = n; r < n + rows; ++r) {
          const uint16_t* row = wp + r * K;
          __m256 a = _mm256_setzero_ps(), b = a;
          int64_t k = 0;
          for (; k + 16 <= K8; k += 16) {
            _mm_prefetch(reinterpret_cast<const char*>(row + k) + 1024, _MM_HINT_T0);
            a = _mm256_fmadd_ps(load8(row + k), _mm256_loadu_ps(xp + k), a);
            b = _mm256_fmadd_ps(load8(row + k + 8), _mm256_loadu_ps(xp + k + 8), b);
          }
          for (; k < K8; k += 8) a = _mm256_fmadd_ps(load8(row + k), _mm256_loadu_ps(xp + k), a);
          yp[r] = tail(row, xp, hsum(_mm256_add_ps(a, b)));
        }
        continue;
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        if (rows == 4) {  // four weight rows, two accumulators each
          const uint16_t* r0 = wp + n * K;
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
          int64_t k = 0;
          for (; k + 16 <= K8; k += 16) {
            const __m256 x0 = _mm256_loadu_ps(xr + k), x1 = _mm256_loadu_ps(xr + k + 8);
            a0 = _mm256_fmadd_ps(load8(r0 + k), x0, a0);
            b0 = _mm256_fmadd_ps(load8(r0 + k + 8), x1, b0);
            a1 = _mm256_fmadd_ps(load8(r0 + K + k), x0, a1);
            b1 = _mm256_fmadd_ps(load8(r0 + K + k + 8), x1, b1);
            a2 = _mm256_fmadd_ps(load8(r0 + 2 * K + k), x0, a2);
            b2 = _mm256_fmadd_ps(load8(r0 + 2 * K + k + 8), x1, b2);
            a3 = _mm256_fmadd_ps(load8(r0 + 3 * K + k), x0, a3);
            b3 = _mm256_fmadd_ps(load8(r0 + 3 * K + k + 8), x1, b3);
          }
          for (; k < K8; k += 8) {
            const __m256 x0 = _mm256_loadu_ps(xr + k);
            a0 = _mm256_fmadd_ps(load8(r0 + k), x0, a0);
            a1 = _mm256_fmadd_ps(load8(r0 + K + k), x0, a1);
            a2 = _mm256_fmadd_ps(load8(r0 + 2 * K + k), x0, a2);
            a3 = _mm256_fmadd_ps(load8(r0 + 3 * K + k), x0, a3);
          }
          float* yr = yp + m * N + n;
          yr[0] = tail(r0, xr, hsum(_mm256_add_ps(a0, b0)));
          yr[1] = tail(r0 + K, xr, hsum(_mm256_add_ps(a1, b1)));
          yr[2] = tail(r0 + 2 * K, xr, hsum(_mm256_add_ps(a2, b2)));
          yr[3] = tail(r0 + 3 * K, xr, hsum(_mm256_add_ps(a3, b3)));
        } else {  // the last rows of a weight whose row count is not a multiple of 4
          for (int64_t r = n; r < n + rows; ++r) {
            const uint16_t* row = wp + r * K;
            __m256 a = _mm256_setzero_ps();
            for (int64_t k = 0; k < K8; k += 8)
              a = _mm256_fmadd_ps(load8(row + k), _mm256_loadu_ps(xr + k), a);
            yp[m * N + r] = tail(row, xr, hsum(a));
          }
        }
      }
    }
  });
  store_result(out, yp);
  return out;
}

// RMSNorm of each row of x, as localmix.model.RMSNorm computes it: in float32, the normalised
// row rounded to x's dtype, then times the weight (rounded again). One call instead of eight
// ATen dispatches; only the order of the float32 sum of squares differs.
template <class T>
void rms_rows(const T* x, const T* w, T* out, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* xr = x + m * D;
      T* yr = out + m * D;
      float ss = 0.0f;
      for (int64_t i = 0; i < D; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
      const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
      for (int64_t i = 0; i < D; ++i) {
        const T h = static_cast<T>(static_cast<float>(xr[i]) * r);
        yr[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(h));
      }
    }
  });
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous() &&
                  weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "rms_norm takes contiguous (rows, dim) x and a (dim,) weight of its dtype");
  torch::Tensor out = torch::empty_like(x);
  const int64_t rows = x.size(0), D = x.size(1);
  if (x.scalar_type() == torch::kBFloat16) {
    rms_rows(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(),
             out.data_ptr<c10::BFloat16>(), rows, D, static_cast<float>(eps));
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "rms_norm takes bfloat16 or float32");
    rms_rows(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), rows, D,
             static_cast<float>(eps));
  }
  return out;
}

// float32 -> bfloat16 -> float32, rounding to nearest even (as torch's .to(bfloat16)).
inline __m256 round_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(0xFFFF0000)));
}

inline __m256 codes8(__m256 w, __m256 s, __m256 z) {  // code - 8, codes clamped to 0..15
  const __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(w, z), s),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(-8.0f)), _mm256_set1_ps(7.0f));
}

// Eight groups at once, one per lane, each lane running the scalar algorithm of
// formats._fit_groups; W holds the groups transposed, W[i] = element i of the 8 groups.
void fit8(const __m256* W, int64_t gs, bool weighted, const std::vector<double>& clips,
          int64_t steps, float* scale_out, float* zero_out) {
  std::vector<__m256> Wt(gs), X(gs);
  __m256 lo = W[0], hi = W[0], total = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < gs; ++i) {
    lo = _mm256_min_ps(lo, W[i]), hi = _mm256_max_ps(hi, W[i]);
    Wt[i] = weighted ? _mm256_andnot_ps(sign, W[i]) : _mm256_set1_ps(1.0f);
    total = _mm256_add_ps(total, Wt[i]);
  }
  total = _mm256_max_ps(total, _mm256_set1_ps(1e-30f));
  const __m256 two = _mm256_set1_ps(2.0f), eight = _mm256_set1_ps(8.0f);
  __m256 best_err = _mm256_setzero_ps(), best_s = best_err, best_z = best_err;
  for (size_t c = 0; c < clips.size(); ++c) {
    const __m256 mid = _mm256_div_ps(_mm256_add_ps(hi, lo), two);
    const __m256 half = _mm256_mul_ps(_mm256_div_ps(_mm256_sub_ps(hi, lo), two),
                                      _mm256_set1_ps(static_cast<float>(clips[c])));
    __m256 s = _mm256_max_ps(_mm256_div_ps(_mm256_mul_ps(two, half), _mm256_set1_ps(15.0f)),
                             _mm256_set1_ps(1e-10f));
    __m256 z = _mm256_add_ps(_mm256_sub_ps(mid, half), _mm256_mul_ps(eight, s));
    for (int64_t step = 0; step < steps; ++step) {
      __m256 xm = _mm256_setzero_ps(), wm = xm;
      for (int64_t i = 0; i < gs; ++i) {
        X[i] = codes8(W[i], s, z);
        xm = _mm256_fmadd_ps(Wt[i], X[i], xm), wm = _mm256_fmadd_ps(Wt[i], W[i], wm);
      }
      xm = _mm256_div_ps(xm, total), wm = _mm256_div_ps(wm, total);
      __m256 var = _mm256_setzero_ps(), cov = var;
      for (int64_t i = 0; i < gs; ++i) {
        const __m256 dx = _mm256_sub_ps(X[i], xm);
        var = _mm256_fmadd_ps(_mm256_mul_ps(Wt[i], dx), dx, var);
        cov = _mm256_fmadd_ps(_mm256_mul_ps(Wt[i], dx), _mm256_sub_ps(W[i], wm), cov);
      }
      var = _mm256_div_ps(var, total), cov = _mm256_div_ps(cov, total);
      const __m256 fitted = _mm256_div_ps(cov, _mm256_max_ps(var, _mm256_set1_ps(1e-12f)));
      const __m256 positive = _mm256_cmp_ps(var, _mm256_setzero_ps(), _CMP_GT_OQ);
      s = _mm256_blendv_ps(_mm256_set1_ps(1.0f), fitted, positive);
      s = _mm256_max_ps(s, _mm256_set1_ps(1e-10f));
      z = _mm256_sub_ps(wm, _mm256_mul_ps(s, xm));
    }
    s = round_bf16(s), z = round_bf16(z);
    __m256 err = _mm256_setzero_ps();
    for (int64_t i = 0; i < gs; ++i) {
      const __m256 d = _mm256_sub_ps(_mm256_fmadd_ps(codes8(W[i], s, z), s, z), W[i]);
      err = _mm256_fmadd_ps(_mm256_mul_ps(Wt[i], d), d, err);
    }
    const __m256 better =
        c == 0 ? _mm256_castsi256_ps(_mm256_set1_epi32(-1)) : _mm256_cmp_ps(err, best_err, _CMP_LT_OQ);
    best_err = _mm256_blendv_ps(best_err, err, better);
    best_s = _mm256_blendv_ps(best_s, s, better);
    best_z = _mm256_blendv_ps(best_z, z, better);
  }
  _mm256_storeu_ps(scale_out, best_s);
  _mm256_storeu_ps(zero_out, best_z);
}

// The "mse" / "wmse" fit of quant/formats.py (_fit_groups): the same clip search and
// least-squares steps in float32, scale and zero rounded to bfloat16, eight groups per AVX2
// register. The PyTorch version streams every one of its ~60 passes through memory; here a
// group stays in registers and L1 throughout. Returns (scale, zero), each (groups, 1) float32.
std::vector<torch::Tensor> fit_groups(const torch::Tensor& groups, bool weighted,
                                      const std::vector<double>& clips, int64_t steps) {
  TORCH_CHECK(groups.dtype() == torch::kFloat32 && groups.dim() == 2 && groups.is_contiguous(),
              "groups must be contiguous float32 (groups, group_size)");
  TORCH_CHECK(!clips.empty(), "no clip ratios");
  const int64_t G = groups.size(0), gs = groups.size(1);
  torch::Tensor scale = torch::empty({G, 1}, groups.options());
  torch::Tensor zero = torch::empty({G, 1}, groups.options());
  const float* wp = groups.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  float* zp = zero.data_ptr<float>();
  at::parallel_for(0, (G + 7) / 8, 32, [&](int64_t begin, int64_t end) {
    std::vector<__m256> W(gs);
    alignas(32) float lane[8], s8[8], z8[8];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t g0 = 8 * b, n = std::min<int64_t>(8, G - g0);
      for (int64_t i = 0; i < gs; ++i) {  // a short last block repeats its first group
        for (int l = 0; l < 8; ++l) lane[l] = wp[(g0 + (l < n ? l : 0)) * gs + i];
        W[i] = _mm256_load_ps(lane);
      }
      fit8(W.data(), gs, weighted, clips, steps, s8, z8);
      std::copy(s8, s8 + n, sp + g0);
      std::copy(z8, z8 + n, zp + g0);
    }
  });
  return {scale, zero};
}


// ---------------------------------------------------------------------------------------------
// One decode step's attention for a layer: RoPE on the new token's query and key, the key and
// value written into the cache, and softmax(q k^T / sqrt(head_dim)) v over the cached keys.

namespace {

inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(float v) { return v; }

// Eight values of a row as float32.
inline __m256 load8f(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }

// RoPE of one head, as localmix.model.apply_rotary computes it in x's dtype: x * cos, then
// x rolled by half times the signed sin, each product rounded to T, then their sum rounded.
// No contraction into FMAs, which would round once where the reference rounds three times.
template <class T>
__attribute__((optimize("fp-contract=off"))) void rope_head(const T* x, const T* cos,
                                                            const T* sin, int64_t hd, T* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; ++i) {
    const T a = static_cast<T>(to_float(x[i]) * to_float(cos[i]));
    const T b = static_cast<T>(to_float(x[(i + half) % hd]) * to_float(sin[i]));
    out[i] = static_cast<T>(to_float(a) + to_float(b));
  }
}

// Attention of `rep` query rows (float32, hd each) to keys j0..j1 of one KV head: the rows'
// running maximum and sum of exponentials and their unnormalised outputs, into part
// (rep x (hd + 2): out[0..hd), max, sum).
// Scores of up to four query rows against one key, scaled: each row its own FMA chain, the key
// read once.
template <class T>
inline void dot_rows4(const float* q, int64_t rows, const T* key, int64_t hd, float scale,
                      float* out, int64_t stride) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t d = 0; d < hd; d += 8) {
    const __m256 kd = load8f(key + d);
    a0 = _mm256_fmadd_ps(kd, _mm256_loadu_ps(q + d), a0);
    if (rows > 1) a1 = _mm256_fmadd_ps(kd, _mm256_loadu_ps(q + hd + d), a1);
    if (rows > 2) a2 = _mm256_fmadd_ps(kd, _mm256_loadu_ps(q + 2 * hd + d), a2);
    if (rows > 3) a3 = _mm256_fmadd_ps(kd, _mm256_loadu_ps(q + 3 * hd + d), a3);
  }
  out[0] = hsum(a0) * scale;
  if (rows > 1) out[stride] = hsum(a1) * scale;
  if (rows > 2) out[2 * stride] = hsum(a2) * scale;
  if (rows > 3) out[3 * stride] = hsum(a3) * scale;
}

// Scores of R (<= 4) query rows against keys 0..n of one KV head, scaled, into scores (R, n),
// two keys at a time: 2R FMA chains, each key and query row read once per 8 of head_dim (the
// chains of one key alone wait on the FMA's latency), the 2R sums reduced together by
// horizontal adds. An odd last key goes through dot_rows4.
template <class T, int R>
void score_keys(const float* q, const T* keys, int64_t n, int64_t hd, float scale,
                float* scores) {
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const T *k0 = keys + j * hd, *k1 = k0 + hd;
    __m256 a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 x0 = load8f(k0 + d), x1 = load8f(k1 + d);
      for (int r = 0; r < R; ++r) {
        const __m256 qr = _mm256_loadu_ps(q + r * hd + d);
        a[r][0] = _mm256_fmadd_ps(x0, qr, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(x1, qr, a[r][1]);
      }
    }
    for (int r = 0; r < R; r += 2) {  // lanes: (row r, key j), (r, j+1), (r+1, j), (r+1, j+1)
      const __m256 h0 = _mm256_hadd_ps(a[r][0], a[r][1]);
      const __m256 h1 = r + 1 < R ? _mm256_hadd_ps(a[r + 1][0], a[r + 1][1]) : h0;
      const __m256 h = _mm256_hadd_ps(h0, h1);
      alignas(16) float v[4];
      _mm_store_ps(v, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)),
                                 _mm_set1_ps(scale)));
      scores[r * n + j] = v[0], scores[r * n + j + 1] = v[1];
      if (r + 1 < R) scores[(r + 1) * n + j] = v[2], scores[(r + 1) * n + j + 1] = v[3];
    }
  }
  if (j < n) dot_rows4(q, R, keys + j * hd, hd, scale, scores + j, n);
}

// Keys taken together while their values are added up: a block's values stay in L1 while every
// query row and every 16 of head_dim go over them. Each pass over a block reads every value row
// at a stride of a whole row, which the hardware prefetchers do not follow, so the first pass
// asks for the rows kValuesAhead keys further on (with score_keys, 22% off the attention's
// time at 3000 positions).
constexpr int64_t kKeyBlock = 16;
constexpr int64_t kValuesAhead = 64;

// R (<= 4) query rows' outputs (`out`, rows `stride` apart) plus p (R, n) times the values of
// keys b..e: each value vector read once for all the rows, 16 of head_dim at a time (2R
// accumulators), then 8 at a time for a head_dim that is not a multiple of 16.
template <class T, int R>
void add_values(const float* p, int64_t n, const T* values, int64_t b, int64_t e, int64_t hd,
                float* out, int64_t stride) {
  int64_t d = 0;
  for (; d + 16 <= hd; d += 16) {
    __m256 a[R][2];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h) a[r][h] = _mm256_loadu_ps(out + r * stride + d + 8 * h);
    for (int64_t j = b; j < e; ++j) {
      if (d == 0)  // a later block's row (past the cache's end, a prefetch is harmless)
        for (int64_t line = 0; line < hd * static_cast<int64_t>(sizeof(T)); line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(values + (j + kValuesAhead) * hd) + line,
                       _MM_HINT_T0);
      const __m256 v0 = load8f(values + j * hd + d), v1 = load8f(values + j * hd + d + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 pr = _mm256_set1_ps(p[r * n + j]);
        a[r][0] = _mm256_fmadd_ps(pr, v0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(pr, v1, a[r][1]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + r * stride + d + 8 * h, a[r][h]);
  }
  for (; d < hd; d += 8) {
    for (int r = 0; r < R; ++r) {
      __m256 o = _mm256_loadu_ps(out + r * stride + d);
      for (int64_t j = b; j < e; ++j)
        o = _mm256_fmadd_ps(_mm256_set1_ps(p[r * n + j]), load8f(values + j * hd + d), o);
      _mm256_storeu_ps(out + r * stride + d, o);
    }
  }
}

// f(R) for R = min(rows, 4) as a compile-time constant (std::integral_constant), so that
// the kernels above keep their 2R accumulators in registers.
template <class F>
void with_rows(int64_t rows, F&& f) {
  switch (std::min<int64_t>(rows, 4)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{});
  }
}

// Attention of `rep` query rows (float32, hd each) to keys j0..j1 of one KV head: the rows'
// maximum score and sum of exponentials, and their unnormalised outputs, into part
// (rep x (hd + 2): out[0..hd), max, sum).
template <class T>
void attend_keys(const float* q, int64_t rep, const T* keys, const T* values, int64_t j0,
                 int64_t j1, int64_t hd, float scale, float* scores, float* part) {
  const int64_t n = j1 - j0;
  for (int64_t r = 0; r < rep; r += 4)  // scores: (rep, n)
    with_rows(rep - r, [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      score_keys<T, R>(q + r * hd, keys + j0 * hd, n, hd, scale, scores + r * n);
    });
  for (int64_t r = 0; r < rep; ++r) {
    float* s = scores + r * n;
    float* out = part + r * (hd + 2);
    float m = -INFINITY;
    for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
    __m256 total = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(m)));
      _mm256_storeu_ps(s + j, e);
      total = _mm256_add_ps(total, e);
    }
    float sum = hsum(total);
    for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
    std::fill(out, out + hd, 0.0f);
    out[hd] = m, out[hd + 1] = sum;
  }
  for (int64_t b = 0; b < n; b += kKeyBlock) {  // outputs: (rep, hd) += p (rep, keys) v (keys, hd)
    const int64_t e = std::min(n, b + kKeyBlock);
    for (int64_t r = 0; r < rep; r += 4)
      with_rows(rep - r, [&](auto rows) {
        constexpr int R = decltype(rows)::value;
        add_values<T, R>(scores + r * n, n, values + j0 * hd, b, e, hd, part + r * (hd + 2),
                         hd + 2);
      });
  }
}

// Keys a work item of the attention takes at the least: shorter contexts run a KV head per
// thread, or on the calling thread alone when the whole cache is small.
constexpr int64_t kMinKeysPerItem = 256;

template <class T>
torch::Tensor attend_one_typed(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& cos,
                               const torch::Tensor& sin, torch::Tensor& keys,
                               torch::Tensor& values, int64_t slot, int64_t used) {
  const int64_t KV = keys.size(0), cap = keys.size(1), hd = keys.size(2);
  const int64_t H = q.numel() / hd, rep = H / KV;
  const T* qp = q.data_ptr<T>();
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T *cp = cos.data_ptr<T>(), *sp = sin.data_ptr<T>();
  T* keys_p = keys.data_ptr<T>();
  T* values_p = values.data_ptr<T>();
  Scratch& scr = scratch();
  float* qf = grown(scr.x, H * hd);  // the rotated queries, as float32
  std::vector<T> rotated(hd);
  for (int64_t h = 0; h < H; ++h) {
    rope_head(qp + h * hd, cp, sp, hd, rotated.data());
    for (int64_t d = 0; d < hd; ++d) qf[h * hd + d] = to_float(rotated[d]);
  }
  for (int64_t g = 0; g < KV; ++g) {
    rope_head(kp + g * hd, cp, sp, hd, keys_p + (g * cap + slot) * hd);
    std::copy(vp + g * hd, vp + (g + 1) * hd, values_p + (g * cap + slot) * hd);
  }
  // Work items: (KV head, chunk of keys), merged below by their maxima.
  const int64_t threads = region_threads();
  const int64_t want = std::max<int64_t>(1, (2 * threads + KV - 1) / KV);
  const int64_t chunks = std::max<int64_t>(1, std::min(want, used / kMinKeysPerItem));
  const int64_t per = (used + chunks - 1) / chunks;
  float* partial = grown(scr.partial, KV * chunks * rep * (hd + 2));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t item_bytes = per * hd * 2 * static_cast<int64_t>(sizeof(T));
  at::parallel_for(0, KV * chunks, grain(item_bytes, 1), [&](int64_t begin, int64_t end) {
    std::vector<float>& scores = scratch().scores;
    float* s = grown(scores, rep * per);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / chunks, c = i % chunks;
      const int64_t j0 = c * per, j1 = std::min(used, j0 + per);
      attend_keys(qf + g * rep * hd, rep, keys_p + g * cap * hd, values_p + g * cap * hd, j0, j1,
                  hd, scale, s, partial + i * rep * (hd + 2));
    }
  });
  torch::Tensor out = torch::empty({1, H * hd}, q.options());
  T* op = out.data_ptr<T>();
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = h / rep, r = h % rep;
    float m = -INFINITY;
    for (int64_t c = 0; c < chunks; ++c)
      m = std::max(m, partial[((g * chunks + c) * rep + r) * (hd + 2) + hd]);
    float total = 0.0f;
    float* acc = grown(scr.y, hd);
    std::fill(acc, acc + hd, 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* part = partial + ((g * chunks + c) * rep + r) * (hd + 2);
      const float w = std::exp(part[hd] - m);
      total += w * part[hd + 1];
      for (int64_t d = 0; d < hd; ++d) acc[d] += w * part[d];
    }
    for (int64_t d = 0; d < hd; ++d) op[h * hd + d] = static_cast<T>(acc[d] / total);
  }
  return out;
}

}  // namespace

// The attention of one new token, all of whose `used` cached keys it may see (slots 0..used-1,
// its own included). q (H * hd values), k and v (KV * hd) are the token's projections before
// RoPE; cos and sin (hd,) the RoPE row of its position, sin's first half negated
// (localmix.model.Rotary); keys and values (KV, capacity, hd) the layer's cache, into whose
// `slot` the rotated key and the value are written. Returns (1, H * hd) in q's dtype. Query
// head h attends with KV head h / (H / KV), as Mixtral's grouped-query attention does.
torch::Tensor attend_one(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor keys,
                         torch::Tensor values, int64_t slot, int64_t used) {
  TORCH_CHECK(keys.dim() == 3 && keys.is_contiguous() && values.is_contiguous() &&
                  values.sizes() == keys.sizes(),
              "keys and values must be contiguous (kv_heads, capacity, head_dim)");
  const int64_t KV = keys.size(0), cap = keys.size(1), hd = keys.size(2);
  const auto dtype = keys.scalar_type();
  for (const torch::Tensor* t :
       std::initializer_list<const torch::Tensor*>{&q, &k, &v, &cos, &sin, &values})
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous(),
                "attend_one takes contiguous tensors of one dtype");
  TORCH_CHECK(hd % 8 == 0 && k.numel() == KV * hd && v.numel() == KV * hd &&
                  q.numel() % (KV * hd) == 0 && cos.numel() == hd && sin.numel() == hd,
              "attend_one: shapes do not match");
  TORCH_CHECK(0 <= slot && slot < used && used <= cap, "attend_one: slot ", slot, " used ", used);
  if (dtype == torch::kBFloat16)
    return attend_one_typed<c10::BFloat16>(q, k, v, cos, sin, keys, values, slot, used);
  TORCH_CHECK(dtype == torch::kFloat32, "attend_one takes bfloat16 or float32");
  return attend_one_typed<float>(q, k, v, cos, sin, keys, values, slot, used);
}

// Mixtral's router for one token, as localmix.model.route computes it: a softmax over the
// expert logits (float32), the top_k experts, their probabilities renormalised to sum to one and
// rounded to the logits' dtype. Returns [ids..., weights...] as Python floats, highest weight
// first, so that a decode step reads its routing without a tensor op.
std::vector<double> route_one(const torch::Tensor& logits, int64_t top_k) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == 1 && logits.is_contiguous(),
              "route_one takes one row of expert logits");
  const int64_t E = logits.size(1);
  TORCH_CHECK(0 < top_k && top_k <= E, "route_one: top_k ", top_k, " of ", E, " experts");
  std::vector<float> p(E);
  const auto dtype = logits.scalar_type();
  if (dtype == torch::kBFloat16) {
    const auto* l = logits.data_ptr<c10::BFloat16>();
    for (int64_t e = 0; e < E; ++e) p[e] = static_cast<float>(l[e]);
  } else {
    TORCH_CHECK(dtype == torch::kFloat32, "route_one takes bfloat16 or float32 logits");
    std::copy(logits.data_ptr<float>(), logits.data_ptr<float>() + E, p.begin());
  }
  const float m = *std::max_element(p.begin(), p.end());
  float total = 0.0f;
  for (float& v : p) total += (v = std::exp(v - m));
  for (float& v : p) v /= total;
  std::vector<int64_t> order(E);
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                    [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
  float kept = 0.0f;
  for (int64_t i = 0; i < top_k; ++i) kept += p[order[i]];
  std::vector<double> out(2 * top_k);
  for (int64_t i = 0; i < top_k; ++i) {
    const float w = p[order[i]] / kept;
    out[i] = static_cast<double>(order[i]);
    out[top_k + i] = dtype == torch::kBFloat16 ? static_cast<float>(c10::BFloat16(w)) : w;
  }
  return out;
}

namespace {

// x + y for two (1, D) activations of one dtype, rounded as PyTorch's add rounds (the sum of
// the two values as float32, to the nearest even of the dtype).
template <class T>
torch::Tensor add_rows(const torch::Tensor& x, const torch::Tensor& y) {
  torch::Tensor out = torch::empty_like(x);
  const T *a = x.data_ptr<T>(), *b = y.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t i = 0; i < x.numel(); ++i)
    o[i] = static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
  return out;
}

// A linear layer of a decode block, run as the model's own module runs it on the CPU: an
// unpadded 8-bit or 4-bit QuantLinear on int8_mm or int4_mm, a bfloat16 weight on bf16_mm.
struct BlockLinear {
  torch::Tensor weight, scales;  // scales undefined for a bfloat16 weight
  int64_t bits, group;

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (bits == 8) return int8_mm(x, weight, scales);
    if (bits == 4) return int4_mm(x, weight, scales, group);
    return bf16_mm(x, weight);
  }

  int64_t out_features() const { return weight.size(0); }
  int64_t in_features() const { return bits == 4 ? weight.size(1) * 2 : weight.size(1); }
};

using LinearSpec = std::tuple<torch::Tensor, torch::Tensor, int64_t, int64_t>;

BlockLinear block_linear(const LinearSpec& spec) {
  const auto& [weight, scales, bits, group] = spec;
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous(),
              "a decode block's weights are contiguous 2-d CPU tensors");
  if (bits == 8) {
    TORCH_CHECK(weight.scalar_type() == torch::kInt8 && scales.scalar_type() == torch::kBFloat16 &&
                    scales.is_contiguous() && scales.device().is_cpu() &&
                    scales.numel() == weight.size(0) && weight.size(1) % 32 == 0 &&
                    weight.size(0) % 4 == 0,
                "an 8-bit weight of a decode block: int8 (N, K), K % 32 == 0, N % 4 == 0");
  } else if (bits == 4) {
    check_int4(weight, scales, group);
  } else {
    TORCH_CHECK(bits == 16 && weight.scalar_type() == torch::kBFloat16,
                "a decode block's weights are 8-bit, 4-bit or bfloat16");
  }
  return {weight, bits == 16 ? torch::Tensor() : scales, bits, group};
}

}  // namespace

// One transformer layer of a bfloat16 Mixtral model for one token that sees every cached key
// (a decode step), in one call: the model's Block.forward on the kernels its modules run one by
// one (rms_norm, the q, k and v products, attend_one, the o product, rms_norm, the gate,
// route_one, int4_moe, the two residual adds), with the same bits, minus some hundred
// microseconds of Python and dispatch a step.
class DecodeBlock {
 public:
  // norms: the input and post-attention norm weights; linears: q, k, v, o and the gate, each
  // (weight, scales, bits, group) with bits 8, 4 or 16 (scales unused); experts: every expert
  // of the layer as (q1, s1, q3, s3, q2, s2), 4-bit with `group`.
  DecodeBlock(const std::vector<torch::Tensor>& norms, double eps,
              const std::vector<LinearSpec>& linears,
              std::vector<std::vector<torch::Tensor>> experts, int64_t group, int64_t top_k)
      : eps_(eps), experts_(std::move(experts)), group_(group), top_k_(top_k) {
    TORCH_CHECK(norms.size() == 2 && linears.size() == 5, "two norms and five linear layers");
    for (const torch::Tensor& w : norms)
      TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.device().is_cpu(),
                  "a decode block's norms are bfloat16 CPU vectors");
    in_norm_ = norms[0], post_norm_ = norms[1];
    for (const LinearSpec& spec : linears) linears_.push_back(block_linear(spec));
    const int64_t D = in_norm_.numel();
    for (int i = 0; i < 3; ++i)
      TORCH_CHECK(linears_[i].in_features() == D, "q, k and v take the hidden size");
    TORCH_CHECK(linears_[3].out_features() == D && linears_[4].in_features() == D,
                "o gives and the gate takes the hidden size");
    TORCH_CHECK(static_cast<int64_t>(experts_.size()) == linears_[4].out_features() &&
                    0 < top_k_ && top_k_ <= static_cast<int64_t>(experts_.size()),
                "one expert per gate row, top_k of them");
    check_experts(experts_, group_);
    TORCH_CHECK(experts_[0][0].size(1) * 2 == D && experts_[0][4].size(0) == D,
                "the experts take and give the hidden size");
    for (const auto& e : experts_)
      for (const torch::Tensor& t : e) TORCH_CHECK(t.device().is_cpu(), "CPU experts");
    fused_qkv_ = linears_[0].bits == 8 && linears_[1].bits == 8 && linears_[2].bits == 8;
  }

  // x (1, D) bfloat16; cos and sin the RoPE row of the token's position; keys and values the
  // layer's cache, the token's key and value going to `slot`, `used` slots attended (as
  // attend_one). Returns the layer's output (1, D) and the experts chosen, (1, top_k) int64,
  // highest weight first.
  std::tuple<torch::Tensor, torch::Tensor> step(const torch::Tensor& x, const torch::Tensor& cos,
                                                const torch::Tensor& sin, torch::Tensor keys,
                                                torch::Tensor values, int64_t slot,
                                                int64_t used) const {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.size(1) == in_norm_.numel() &&
                    x.scalar_type() == torch::kBFloat16 && x.is_contiguous(),
                "a decode block takes one contiguous bfloat16 row of the hidden size");
    const torch::Tensor h = rms_norm(x, in_norm_, eps_);
    torch::Tensor q, k, v;
    if (fused_qkv_) {
      const torch::Tensor qkv =
          int8_mm_many(h, {linears_[0].weight, linears_[1].weight, linears_[2].weight},
                       {linears_[0].scales, linears_[1].scales, linears_[2].scales});
      const int64_t nq = linears_[0].out_features(), nk = linears_[1].out_features();
      q = qkv.narrow(1, 0, nq), k = qkv.narrow(1, nq, nk);
      v = qkv.narrow(1, nq + nk, linears_[2].out_features());
    } else {
      q = linears_[0](h), k = linears_[1](h), v = linears_[2](h);
    }
    const torch::Tensor attended = attend_one(q, k, v, cos, sin, keys, values, slot, used);
    const torch::Tensor mid = add_rows<c10::BFloat16>(x, linears_[3](attended));
    const torch::Tensor h2 = rms_norm(mid, post_norm_, eps_);
    const std::vector<double> routing = route_one(linears_[4](h2), top_k_);
    torch::Tensor ids = torch::empty({1, top_k_}, torch::kLong);
    std::vector<int64_t> order(top_k_);  // the chosen experts in ascending id, as MoeLayer sums
    for (int64_t i = 0; i < top_k_; ++i) {
      order[i] = i;
      ids.data_ptr<int64_t>()[i] = static_cast<int64_t>(routing[i]);
    }
    std::sort(order.begin(), order.end(),
              [&](int64_t a, int64_t b) { return routing[a] < routing[b]; });
    std::vector<std::vector<torch::Tensor>> chosen;
    std::vector<double> weights;
    for (int64_t i : order) {
      chosen.push_back(experts_[static_cast<size_t>(routing[i])]);
      weights.push_back(routing[top_k_ + i]);
    }
    const torch::Tensor moe = int4_moe(h2, chosen, weights, group_);
    return {add_rows<c10::BFloat16>(mid, moe), ids};
  }

 private:
  torch::Tensor in_norm_, post_norm_;
  double eps_;
  std::vector<BlockLinear> linears_;  // q, k, v, o, gate
  std::vector<std::vector<torch::Tensor>> experts_;
  int64_t group_, top_k_;
  bool fused_qkv_ = false;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm", &int4_mm, "4-bit grouped weight times a few activation rows");
  m.def("int4_swiglu", &int4_swiglu, "a 4-bit SwiGLU expert, w2(silu(w1 x) * w3 x)");
  m.def("fit_groups", &fit_groups, "scale and zero per group by the (weighted) mse fit");
  m.def("int4_moe", &int4_moe, "a decode step's 4-bit experts, computed and combined");
  pybind11::class_<DecodeBlock>(m, "DecodeBlock")
      .def(pybind11::init<const std::vector<torch::Tensor>&, double,
                          const std::vector<LinearSpec>&, std::vector<std::vector<torch::Tensor>>,
                          int64_t, int64_t>())
      .def("step", &DecodeBlock::step, "one layer of a decode step");
  m.def("int8_mm_many", &int8_mm_many, "several 8-bit weights times the same rows, as one");
  m.def("int8_mm", &int8_mm, "8-bit per-channel weight times a few activation rows");
  m.def("bf16_mm", &bf16_mm, "bfloat16 weight times a few activation rows, float32 sums");
  m.def("attend_one", &attend_one, "one new token's RoPE, cache write and attention");
  m.def("route_one", &route_one, "one token's top-k experts and their weights");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, as localmix.model.RMSNorm computes it");
}
