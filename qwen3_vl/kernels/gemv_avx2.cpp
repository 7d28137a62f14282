// Matrix-vector products for CPU decode on AVX2 + FMA + F16C machines (no AVX-512 needed).
//
// y[b, n] = scale[n] * sum_k x[b, k] * w[n, k], fp32 activations and accumulation, weights stored as
// fp32, fp16, bf16 or int8 (scale: one per output row for int8, none otherwise). A decode step is
// bound by reading the weights once, so the only cost per weight should be its bytes plus one
// convert and one FMA. Two weight layouts:
//   gemv:         w [N, K] row-major; four rows stream past an input row that stays in L1. Fastest
//                 measured for fp32 (the weight PyTorch already holds, no copy).
//   gemv_packed8: w [N/8, K, 8], eight rows interleaved, so each thread reads one sequential stream
//                 and one FMA covers eight outputs with no horizontal sums; prefetched 1 KiB ahead.
//                 Measured on the 2-core AVX2 CI machine over mini's text weights: int8 19-22 GB/s
//                 against 9.5 in the row-major kernel, fp16 23 GB/s against 15.
// Software prefetch in the row-major kernel was tried (64 B to 4 KiB ahead, T0 and NTA hints) and
// read 5-20% slower; weights in 2 MiB pages read 15% faster (qwen3_vl/hardware/huge_pages.py).
// Beside the products, the small per-layer pieces of a decode step (where PyTorch's dispatch costs
// more than the arithmetic): rms_norm, qk_norm_rope, silu_mul and causal_attention.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

struct F32 {
  using T = float;
  static inline __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static inline float load1(const T* p) { return *p; }
};

struct F16 {
  using T = at::Half;
  static inline __m256 load8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline float load1(const T* p) { return static_cast<float>(*p); }
};

struct BF16 {
  using T = at::BFloat16;
  static inline __m256 load8(const T* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static inline float load1(const T* p) { return static_cast<float>(*p); }
};

struct I8 {
  using T = int8_t;
  static inline __m256 load8(const T* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static inline float load1(const T* p) { return static_cast<float>(*p); }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Dot products of weight rows w[0..R) (stride K) with input rows x[0..X) (stride K): out[i * N + r].
// R is 4 in the main loop, 1 for leftover rows; X input rows share each weight load (up to three:
// 12 accumulators, 3 inputs and one weight fill the 16 vector registers). Every output accumulates
// lane-wise over k in order, then the same horizontal sum and scalar tail, whatever X is: a row's
// result does not depend on how many rows a call holds (batch_invariant relies on it).
template <typename W, int R, int X>
inline void dot_rows(const typename W::T* w, int64_t K, const float* x, float* out, int64_t N) {
  __m256 acc[X][R];
  for (int i = 0; i < X; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[X];
    for (int i = 0; i < X; ++i) xv[i] = _mm256_loadu_ps(x + i * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = W::load8(w + r * K + k);
      for (int i = 0; i < X; ++i) acc[i][r] = _mm256_fmadd_ps(wv, xv[i], acc[i][r]);
    }
  }
  for (int i = 0; i < X; ++i)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[i][r]);
      for (int64_t j = k; j < K; ++j) s += W::load1(w + r * K + j) * x[i * K + j];
      out[i * N + r] = s;
    }
}

template <typename W, int R>
inline void dot_rows_all(const typename W::T* w, int64_t K, const float* x, int64_t B, float* out, int64_t N) {
  int64_t b = 0;
  for (; b + 3 <= B; b += 3) dot_rows<W, R, 3>(w, K, x + b * K, out + b * N, N);
  if (B - b == 2) dot_rows<W, R, 2>(w, K, x + b * K, out + b * N, N);
  if (B - b == 1) dot_rows<W, R, 1>(w, K, x + b * K, out + b * N, N);
}

template <typename W>
void gemv(const float* x, const typename W::T* w, const float* scale, float* y, int64_t B, int64_t N, int64_t K) {
  const int64_t blocks = (N + 3) / 4;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * 4;
      const int64_t rows = std::min<int64_t>(4, N - n0);
      if (rows == 4) {
        dot_rows_all<W, 4>(w + n0 * K, K, x, B, y + n0, N);
      } else {
        for (int64_t r = 0; r < rows; ++r) dot_rows_all<W, 1>(w + (n0 + r) * K, K, x, B, y + n0 + r, N);
      }
      if (scale)
        for (int64_t b = 0; b < B; ++b)
          for (int64_t r = 0; r < rows; ++r) y[b * N + n0 + r] *= scale[n0 + r];
    }
  });
}

// Eight interleaved rows per block against X input rows (two or three) at once: each converted weight
// vector serves every input row. Each output keeps four accumulators over k mod 4, summed in a fixed
// order, whatever X is (batch invariance, as in gemv).
template <typename W, int X>
inline void packed8_rows(const typename W::T* p, const float* x, int64_t K, const float* scale, float* y,
                         int64_t N) {
  constexpr int64_t ahead = 1024 / (8 * sizeof(typename W::T));  // k-steps in 1 KiB of weights
  __m256 a[X][4];
  for (int i = 0; i < X; ++i)
    for (int j = 0; j < 4; ++j) a[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + ahead) * 8), _MM_HINT_T0);
    for (int j = 0; j < 4; ++j) {
      const __m256 wv = W::load8(p + (k + j) * 8);
      for (int i = 0; i < X; ++i) a[i][j] = _mm256_fmadd_ps(wv, _mm256_broadcast_ss(x + i * K + k + j), a[i][j]);
    }
  }
  for (; k < K; ++k) {
    const __m256 wv = W::load8(p + k * 8);
    for (int i = 0; i < X; ++i) a[i][0] = _mm256_fmadd_ps(wv, _mm256_broadcast_ss(x + i * K + k), a[i][0]);
  }
  for (int i = 0; i < X; ++i) {
    __m256 acc = _mm256_add_ps(_mm256_add_ps(a[i][0], a[i][1]), _mm256_add_ps(a[i][2], a[i][3]));
    if (scale) acc = _mm256_mul_ps(acc, _mm256_loadu_ps(scale));
    _mm256_storeu_ps(y + i * N, acc);
  }
}

// packed8_rows for one input row (decode), written out with named accumulators: GCC kept the array
// version's accumulators on the stack for X = 1 (four stores per k-step, 20% slower on int8). The
// same operations in the same order as packed8_rows, so both give the same bits.
template <typename W>
inline void packed8_row(const typename W::T* p, const float* x, int64_t K, const float* scale, float* y) {
  constexpr int64_t ahead = 1024 / (8 * sizeof(typename W::T));
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + ahead) * 8), _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(W::load8(p + (k + 0) * 8), _mm256_broadcast_ss(x + k + 0), a0);
    a1 = _mm256_fmadd_ps(W::load8(p + (k + 1) * 8), _mm256_broadcast_ss(x + k + 1), a1);
    a2 = _mm256_fmadd_ps(W::load8(p + (k + 2) * 8), _mm256_broadcast_ss(x + k + 2), a2);
    a3 = _mm256_fmadd_ps(W::load8(p + (k + 3) * 8), _mm256_broadcast_ss(x + k + 3), a3);
  }
  for (; k < K; ++k) a0 = _mm256_fmadd_ps(W::load8(p + k * 8), _mm256_broadcast_ss(x + k), a0);
  __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  if (scale) acc = _mm256_mul_ps(acc, _mm256_loadu_ps(scale));
  _mm256_storeu_ps(y, acc);
}

template <typename W>
void gemv_packed8(const float* x, const typename W::T* w, const float* scale, float* y, int64_t B, int64_t N,
                  int64_t K) {
  at::parallel_for(0, N / 8, 4, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const typename W::T* p = w + blk * 8 * K;
      const float* s = scale ? scale + blk * 8 : nullptr;
      int64_t b = 0;
      for (; b + 3 <= B; b += 3) packed8_rows<W, 3>(p, x + b * K, K, s, y + b * N + blk * 8, N);
      if (B - b == 2) packed8_rows<W, 2>(p, x + b * K, K, s, y + b * N + blk * 8, N);
      if (B - b == 1) packed8_row<W>(p, x + b * K, K, s, y + b * N + blk * 8);
    }
  });
}

// r[i][j] is row j's value at column i (eight k-steps of eight interleaved rows): store row j's eight
// values at o + j * K, transposing 8x8 in registers.
inline void store_transposed8(const __m256* r, float* o, int64_t K) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(o + j * K, _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
    _mm256_storeu_ps(o + (j + 4) * K, _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
  }
}

// int4 weights, eight rows interleaved: w [N/8, K/2, 8] bytes, byte (p, j) holding row j's codes for
// columns 2p (low nibble) and 2p+1 (high nibble), q in [0, 15]; per row and group of G columns a
// scale s and an offset c, [N/8, K/G, 8] fp32, so that weight = q * s + c (c = zero - 8 s of
// quantize_int4's (q - 8) * s + zero). Per group y += s * dot(x, q) + c * sum(x over the group).
//
// The dot products run in integers: converting every code to float (as the int8 kernel does) made
// this kernel compute-bound at 13.6 G weights/s on the CI machine, slower than int8's 19.7 at the
// read bandwidth. x is rounded to int16 per group (x = dx * x16, dx = max|x| / 32767: a relative
// error of at most 1.5e-5 of the group's largest input, far inside int4's own), and
// _mm256_madd_epi16 multiplies 16 codes by 16 inputs per instruction, summing pairs into int32
// (at most 2 * 15 * 32767 per pair, so a group of up to 4096 columns cannot overflow).
// Sixteen bytes = two column pairs of eight rows, expanded to int16 and interleaved so each 32-bit
// lane holds one row's codes for two adjacent columns: lo = rows 0-3, hi = rows 4-7, the lower 128
// bits for pair p and the upper for pair p + 1 (matching the input pattern built in gemv_int4).
inline void int4_pairs(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i even = _mm256_and_si256(v, _mm256_set1_epi16(15)), odd = _mm256_srli_epi16(v, 4);
  lo = _mm256_unpacklo_epi16(even, odd);
  hi = _mm256_unpackhi_epi16(even, odd);
}

void gemv_int4_packed8(const float* x, const uint8_t* w, const float* scale, const float* offset, float* y, int64_t B,
                       int64_t N, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  // per input row: each group's dx and sum(x), and the int16 inputs as madd operands, one 256-bit
  // pattern per two column pairs: [x(2p), x(2p+1)] four times, then [x(2p+2), x(2p+3)] four times
  std::vector<float> dx(B * groups), xsum(B * groups);
  std::vector<__m256i> pattern(B * (K / 4));
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * K;
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.0f, amax = 0.0f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) {
        sum += xb[k];
        amax = std::max(amax, std::abs(xb[k]));
      }
      xsum[b * groups + g] = sum;
      dx[b * groups + g] = amax / 32767.0f;
      const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
      for (int64_t k = g * G; k < (g + 1) * G; k += 4) {
        int16_t v[4];
        for (int i = 0; i < 4; ++i) v[i] = static_cast<int16_t>(std::lrint(xb[k + i] * inv));
        const int32_t pair0 = static_cast<uint16_t>(v[0]) | (static_cast<int32_t>(static_cast<uint16_t>(v[1])) << 16);
        const int32_t pair1 = static_cast<uint16_t>(v[2]) | (static_cast<int32_t>(static_cast<uint16_t>(v[3])) << 16);
        pattern[b * (K / 4) + k / 4] = _mm256_set_m128i(_mm_set1_epi32(pair1), _mm_set1_epi32(pair0));
      }
    }
  }
  at::parallel_for(0, N / 8, 4, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const uint8_t* p = w + blk * 8 * (K / 2);
      const float* sb = scale + blk * 8 * groups;
      const float* cb = offset + blk * 8 * groups;
      for (int64_t b = 0; b < B; ++b) {
        const __m256i* xp = pattern.data() + b * (K / 4);
        __m256 total = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
          __m256i acc_lo = _mm256_setzero_si256(), acc_hi = acc_lo;
          // pointer steps, not index arithmetic: the loop is a dozen vector instructions, and signed
          // k / 2, k / 4 plus reloads of captured sizes had doubled it
          const uint8_t* pk = p + g * G * 4;  // G / 2 column pairs of 8 bytes per group
          const __m256i* xk = xp + g * (G / 4);
          const uint8_t* const stop = pk + G * 4;
          for (; pk < stop; pk += 16, ++xk) {
            _mm_prefetch(reinterpret_cast<const char*>(pk + 1024), _MM_HINT_T0);
            __m256i lo, hi;
            int4_pairs(pk, lo, hi);
            const __m256i xv = _mm256_loadu_si256(xk);
            acc_lo = _mm256_add_epi32(acc_lo, _mm256_madd_epi16(lo, xv));
            acc_hi = _mm256_add_epi32(acc_hi, _mm256_madd_epi16(hi, xv));
          }
          // rows 0-3 and 4-7 of pair p (lower half) and p + 1 (upper half): add the halves
          const __m128i r03 = _mm_add_epi32(_mm256_castsi256_si128(acc_lo), _mm256_extracti128_si256(acc_lo, 1));
          const __m128i r47 = _mm_add_epi32(_mm256_castsi256_si128(acc_hi), _mm256_extracti128_si256(acc_hi, 1));
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_set_m128i(r47, r03));
          const __m256 sdx = _mm256_mul_ps(_mm256_loadu_ps(sb + g * 8), _mm256_set1_ps(dx[b * groups + g]));
          total = _mm256_fmadd_ps(sdx, dot, total);
          total = _mm256_fmadd_ps(_mm256_loadu_ps(cb + g * 8), _mm256_set1_ps(xsum[b * groups + g]), total);
        }
        _mm256_storeu_ps(y + b * N + blk * 8, total);
      }
    }
  });
}

// Two column pairs of eight rows (sixteen bytes) -> four k-steps of eight rows as floats
// (the prefill path's dequantization).
inline void int4_codes4(const uint8_t* p, __m256* q) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i lo = _mm256_cvtepu8_epi32(v), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8));
  const __m256i m = _mm256_set1_epi32(15);
  q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, m));
  q[1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));
  q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, m));
  q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));
}

// Blocks [0, blocks) of the int4 layout above, dequantized to row-major fp32 (prefill's GEMM input).
void unpack_int4_float(const uint8_t* w, const float* scale, const float* offset, float* out, int64_t blocks,
                       int64_t K, int64_t G) {
  const int64_t groups = K / G;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const uint8_t* p = w + blk * 8 * (K / 2);
      float* o = out + blk * 8 * K;
      for (int64_t k = 0; k < K; k += 8) {  // G % 8 == 0: the eight columns share a group
        const __m256 s = _mm256_loadu_ps(scale + (blk * groups + k / G) * 8);
        const __m256 c = _mm256_loadu_ps(offset + (blk * groups + k / G) * 8);
        __m256 r[8];
        int4_codes4(p + (k / 2) * 8, r);
        int4_codes4(p + (k / 2 + 2) * 8, r + 4);
        for (int i = 0; i < 8; ++i) r[i] = _mm256_fmadd_ps(r[i], s, c);
        store_transposed8(r, o + k, K);
      }
    }
  });
}

// Rows [row0, row0 + rows) of a pack8 matrix back to row-major fp32 (the prefill path's GEMM input):
// eight k-steps of a block are converted as eight vectors, transposed in registers and stored as
// eight-float pieces of eight rows, so the copy runs at vector speed instead of a strided gather.
template <typename W>
void unpack8_float(const typename W::T* w, float* out, int64_t blocks, int64_t K) {
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const typename W::T* p = w + blk * 8 * K;
      float* o = out + blk * 8 * K;
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = W::load8(p + (k + i) * 8);  // r[i][j] = w[row j, k + i]
        store_transposed8(r, o + k, K);
      }
      for (; k < K; ++k)
        for (int j = 0; j < 8; ++j) o[j * K + k] = W::load1(p + k * 8 + j);
    }
  });
}

// RMSNorm over the last dimension of a few rows: x * rsqrt(mean(x^2) + eps) * weight, in that order.
// Single-threaded on purpose: a decode step's norms are 1-16 rows of 64-4096 floats, where waking
// the OpenMP pool costs more than the work (PyTorch's composite rms_norm: ~26-80 us a call here).
void rms_norm_rows(const float* x, const float* w, float* out, int64_t rows, int64_t H, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * H;
    float* o = out + r * H;
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= H; k += 8) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; k < H; ++k) ss += xr[k] * xr[k];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    const __m256 iv = _mm256_set1_ps(inv);
    k = 0;
    for (; k + 8 <= H; k += 8)
      _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), iv), _mm256_loadu_ps(w + k)));
    for (; k < H; ++k) o[k] = (xr[k] * inv) * w[k];
  }
}

// One decode row of a fused q/k/v projection -> q and k RMS-normed per head (Qwen3's q_norm/k_norm)
// and rotated (x*cos + rotate_half(x)*sin, halves split at d/2), v copied out: the ~12 small
// PyTorch ops a layer spends here, in one call. Same formulas as the reference, element by element.
void norm_rope_heads(const float* src, float* dst, int64_t heads, int64_t d, const float* w, float eps,
                     const float* cos, const float* sin, float* normed) {
  rms_norm_rows(src, w, normed, heads, d, eps);  // every head of this row, into normed [heads, d]
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* n = normed + h * d;
    float* o = dst + h * d;
    for (int64_t i = 0; i < half; ++i) o[i] = n[i] * cos[i] + (-n[i + half]) * sin[i];
    for (int64_t i = half; i < d; ++i) o[i] = n[i] * cos[i] + n[i - half] * sin[i];
  }
}

// exp(x) for eight floats: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial,
// within 2 ulp of the true value over the clamped range); inputs below -87.3 give about 1e-38, not 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float exp1(float x) {
  float out[8];
  _mm256_storeu_ps(out, exp8(_mm256_set1_ps(x)));
  return out[0];
}

// silu(gate) * up for rows of a fused gate/up projection [R, 2I] -> [R, I] (the MLP's activation),
// single-threaded: a decode step's rows are a few thousand floats.
void silu_mul_rows(const float* gu, float* out, int64_t R, int64_t I) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t r = 0; r < R; ++r) {
    const float* g = gu + r * 2 * I;
    const float* u = g + I;
    float* o = out + r * I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
    }
    for (; i < I; ++i) o[i] = (g[i] / (1.0f + exp1(-g[i]))) * u[i];
  }
}

inline float dot(const float* a, const float* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

constexpr int64_t kParallelWork = int64_t{1} << 16;  // key-dims per head chunk before heads go parallel

// Eight horizontal sums at once: lane j of the result is the sum of a[j]'s lanes.
inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// One query head over the first T of the cached keys (rows ks apart, values vs apart):
// out = sum_t softmax_t(scale * q.k_t) v_t over the keys with valid[t * valid_stride] (all when
// valid is null). A head that sees no key gets the mean of all T_all cached values: what eager's
// masked softmax gives (a constant row over every key), which every attention option reproduces.
// Scores go eight keys at a time (one accumulator per key, summed across lanes together); values 32
// dimensions at a time with the output kept in registers. The order of every sum depends on T and
// d only, never on how many queries or sequences a call holds: a row's result is the same whether
// it is computed in a prefill or a decode step (what execution=cpu_packed[batch_invariant] needs).
void attend_one(const float* q, const float* k, const float* v, int64_t ks, int64_t vs, const bool* valid,
                int64_t valid_stride, int64_t T, int64_t T_all, int64_t d, float scale, float* scores, float* out) {
  int64_t t = 0;
  if (d % 8 == 0) {
    for (; t + 8 <= T; t += 8) {
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(k + (t + j) * ks + i), qv, acc[j]);
      }
      _mm256_storeu_ps(scores + t, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
    }
  }
  for (; t < T; ++t) scores[t] = dot(q, k + t * ks, d) * scale;
  float m = -INFINITY;
  for (t = 0; t < T; ++t) {
    if (valid && !valid[t * valid_stride]) scores[t] = -INFINITY;
    m = std::max(m, scores[t]);
  }
  float sum = 0.0f;
  t = 0;
  if (m == -INFINITY) {  // no valid key: every cached value, equally weighted
    T = T_all;
    for (; t < T; ++t) scores[t] = 1.0f;
    sum = static_cast<float>(T);
  } else {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; t + 8 <= T; t += 8) {  // masked keys: exp8 clamps to ~1e-38, so zero them explicitly
      __m256 s = _mm256_loadu_ps(scores + t);
      const __m256 keep = _mm256_cmp_ps(s, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      s = _mm256_and_ps(exp8(_mm256_sub_ps(s, mv)), keep);
      _mm256_storeu_ps(scores + t, s);
      acc = _mm256_add_ps(acc, s);
    }
    sum = hsum(acc);
    for (; t < T; ++t) {
      scores[t] = scores[t] == -INFINITY ? 0.0f : exp1(scores[t] - m);
      sum += scores[t];
    }
  }
  const float inv = 1.0f / sum;
  int64_t i0 = 0;
  for (; d % 8 == 0 && i0 < d; i0 += 32) {
    const int nb = static_cast<int>(std::min<int64_t>(4, (d - i0) / 8));
    __m256 o[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (t = 0; t < T; ++t) {
      if (scores[t] == 0.0f) continue;
      const __m256 p = _mm256_set1_ps(scores[t]);
      const float* vr = v + t * vs + i0;
      for (int b = 0; b < nb; ++b) o[b] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * b), o[b]);
    }
    for (int b = 0; b < nb; ++b) _mm256_storeu_ps(out + i0 + 8 * b, _mm256_mul_ps(o[b], _mm256_set1_ps(inv)));
  }
  if (d % 8 != 0) {
    std::fill(out, out + d, 0.0f);
    for (t = 0; t < T; ++t)
      for (int64_t i = 0; i < d; ++i) out[i] += scores[t] * v[t * vs + i];
    for (int64_t i = 0; i < d; ++i) out[i] *= inv;
  }
}

// The checks both entry points share; returns the scale pointer (null without one).
const float* check_args(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale, int64_t N,
                        int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "gemv: x must be [B, ", K, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && w.is_contiguous(),
              "gemv: contiguous fp32 x and contiguous weights expected");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors expected");
  if (!scale.has_value()) return nullptr;
  TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == N,
              "gemv: scale must be fp32 with one value per output row");
  return scale->data_ptr<float>();
}

template <template <typename> class Kernel>
at::Tensor dispatch(const at::Tensor& x, const at::Tensor& w, const float* s, int64_t N, int64_t K) {
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t B = x.size(0);
  switch (w.scalar_type()) {
    case at::kFloat: Kernel<F32>::run(xp, w.data_ptr<float>(), s, yp, B, N, K); break;
    case at::kHalf: Kernel<F16>::run(xp, w.data_ptr<at::Half>(), s, yp, B, N, K); break;
    case at::kBFloat16: Kernel<BF16>::run(xp, w.data_ptr<at::BFloat16>(), s, yp, B, N, K); break;
    case at::kChar: Kernel<I8>::run(xp, w.data_ptr<int8_t>(), s, yp, B, N, K); break;
    default: TORCH_CHECK(false, "gemv: weights must be fp32, fp16, bf16 or int8, got ", w.scalar_type());
  }
  return y;
}

template <typename W>
struct RowMajor {
  static void run(const float* x, const typename W::T* w, const float* s, float* y, int64_t B, int64_t N, int64_t K) {
    gemv<W>(x, w, s, y, B, N, K);
  }
};

template <typename W>
struct Packed8 {
  static void run(const float* x, const typename W::T* w, const float* s, float* y, int64_t B, int64_t N, int64_t K) {
    gemv_packed8<W>(x, w, s, y, B, N, K);
  }
};

at::Tensor gemv_op(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(w.dim() == 2, "gemv: w must be [N, K], got ", w.sizes());
  const float* s = check_args(x, w, scale, w.size(0), w.size(1));
  return dispatch<RowMajor>(x, w, s, w.size(0), w.size(1));
}

at::Tensor unpack8_float_op(const at::Tensor& w, int64_t start, int64_t end) {
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 8 && w.is_contiguous() && w.device().is_cpu(),
              "unpack8_float: w must be a contiguous CPU [N/8, K, 8], got ", w.sizes());
  TORCH_CHECK(start % 8 == 0 && end % 8 == 0 && 0 <= start && start <= end && end <= w.size(0) * 8,
              "unpack8_float: rows ", start, ":", end, " must be multiples of 8 within ", w.size(0) * 8);
  const int64_t K = w.size(1), blocks = (end - start) / 8;
  at::Tensor out = at::empty({end - start, K}, w.options().dtype(at::kFloat));
  const int64_t offset = start * K;
  switch (w.scalar_type()) {
    case at::kFloat: unpack8_float<F32>(w.data_ptr<float>() + offset, out.data_ptr<float>(), blocks, K); break;
    case at::kHalf: unpack8_float<F16>(w.data_ptr<at::Half>() + offset, out.data_ptr<float>(), blocks, K); break;
    case at::kBFloat16:
      unpack8_float<BF16>(w.data_ptr<at::BFloat16>() + offset, out.data_ptr<float>(), blocks, K);
      break;
    case at::kChar: unpack8_float<I8>(w.data_ptr<int8_t>() + offset, out.data_ptr<float>(), blocks, K); break;
    default: TORCH_CHECK(false, "unpack8_float: weights must be fp32, fp16, bf16 or int8, got ", w.scalar_type());
  }
  return out;
}

at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.is_contiguous() &&
                  w.is_contiguous() && x.device().is_cpu() && w.device().is_cpu(),
              "rms_norm: contiguous fp32 CPU tensors expected");
  const int64_t H = w.numel();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == H, "rms_norm: last dimension ", x.size(-1), " != weight size ", H);
  at::Tensor out = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), x.numel() / H, H,
                static_cast<float>(eps));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_op(const at::Tensor& qkv, const at::Tensor& qw,
                                                                const at::Tensor& kw, double q_eps, double k_eps,
                                                                const at::Tensor& cos, const at::Tensor& sin,
                                                                int64_t hq, int64_t hk) {
  for (const at::Tensor* t : {&qkv, &qw, &kw, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "qk_norm_rope: contiguous fp32 CPU tensors expected");
  const int64_t d = qw.numel(), R = qkv.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (hq + 2 * hk) * d && kw.numel() == d && d % 2 == 0,
              "qk_norm_rope: qkv must be [rows, (hq + 2 hk) * d] with even d = ", d, ", got ", qkv.sizes());
  TORCH_CHECK(cos.numel() == R * d && sin.numel() == R * d, "qk_norm_rope: cos/sin must be [rows, d]");
  at::Tensor q = at::empty({R, hq, d}, qkv.options()), k = at::empty({R, hk, d}, qkv.options()),
             v = at::empty({R, hk, d}, qkv.options());
  std::vector<float> normed(std::max(hq, hk) * d);
  const int64_t width = (hq + 2 * hk) * d;
  for (int64_t r = 0; r < R; ++r) {
    const float* row = qkv.data_ptr<float>() + r * width;
    const float* c = cos.data_ptr<float>() + r * d;
    const float* s = sin.data_ptr<float>() + r * d;
    norm_rope_heads(row, q.data_ptr<float>() + r * hq * d, hq, d, qw.data_ptr<float>(), static_cast<float>(q_eps), c,
                    s, normed.data());
    norm_rope_heads(row + hq * d, k.data_ptr<float>() + r * hk * d, hk, d, kw.data_ptr<float>(),
                    static_cast<float>(k_eps), c, s, normed.data());
    std::copy(row + (hq + hk) * d, row + width, v.data_ptr<float>() + r * hk * d);
  }
  return {q, k, v};
}

at::Tensor silu_mul_op(const at::Tensor& gu) {
  TORCH_CHECK(gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.device().is_cpu() && gu.dim() >= 1 &&
                  gu.size(-1) % 2 == 0,
              "silu_mul: a contiguous fp32 CPU [..., 2 I] tensor expected, got ", gu.sizes());
  auto sizes = gu.sizes().vec();
  const int64_t I = sizes.back() / 2;
  sizes.back() = I;
  at::Tensor out = at::empty(sizes, gu.options());
  silu_mul_rows(gu.data_ptr<float>(), out.data_ptr<float>(), I ? gu.numel() / (2 * I) : 0, I);
  return out;
}

// q [B, Hq, L, d]: the last L of the T cached positions (causal: query l sees keys 0 .. T - L + l);
// k, v [B, Hkv, T, d] (any strides but a contiguous last dimension: the static cache's views); valid
// [B, T] bool or None -> [B, Hq, L, d]. Rows in parallel once a call is big enough to pay for waking
// the thread pool (prefill, long conversations).
at::Tensor causal_attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& valid, double scale) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->dim() == 4 && t->stride(3) == 1,
                "causal_attention: fp32 CPU [B, H, L, d] tensors with a contiguous last dimension expected");
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), d = q.size(3), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == d && Hkv > 0 && Hq % Hkv == 0 && T > 0,
              "causal_attention: k and v must be [", B, ", Hkv, T, ", d, "] with Hkv dividing ", Hq, "; got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(L >= 1 && L <= T, "causal_attention: ", L, " queries must be the last of the ", T, " keys");
  const bool* vp = nullptr;
  int64_t vb = 0, vt = 0;
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->dim() == 2 && valid->size(0) == B &&
                    valid->size(1) == T && valid->device().is_cpu(),
                "causal_attention: valid must be a CPU bool [", B, ", ", T, "], got ", valid->sizes());
    vp = valid->data_ptr<bool>();
    vb = valid->stride(0);
    vt = valid->stride(1);
  }
  at::Tensor out = at::empty({B, Hq, L, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vvp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t groups = Hq / Hkv;
  const int64_t grain = std::max<int64_t>(1, kParallelWork / (T * d));
  at::parallel_for(0, B * Hq * L, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(T);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (Hq * L), h = (i / L) % Hq, l = i % L, g = h / groups;
      attend_one(qp + b * q.stride(0) + h * q.stride(1) + l * q.stride(2), kp + b * k.stride(0) + g * k.stride(1),
                 vvp + b * v.stride(0) + g * v.stride(1), k.stride(2), v.stride(2), vp ? vp + b * vb : nullptr, vt,
                 T - L + l + 1, T, d, static_cast<float>(scale), scores.data(), op + i * d);
    }
  });
  return out;
}

void check_int4(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset, int64_t G) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.size(2) == 8 && w.is_contiguous() &&
                  w.device().is_cpu(),
              "int4: w must be a contiguous CPU uint8 [N/8, K/2, 8], got ", w.sizes(), " ", w.scalar_type());
  const int64_t K = w.size(1) * 2;
  TORCH_CHECK(G > 0 && G % 8 == 0 && K % G == 0, "int4: the group (", G, ") must be a multiple of 8 dividing K = ", K);
  for (const at::Tensor* t : {&scale, &offset})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu() && t->dim() == 3 &&
                    t->size(0) == w.size(0) && t->size(1) == K / G && t->size(2) == 8,
                "int4: scale and offset must be contiguous fp32 [", w.size(0), ", ", K / G, ", 8], got ", t->sizes());
}

at::Tensor gemv_int4_op(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset,
                        int64_t G) {
  check_int4(w, scale, offset, G);
  const int64_t N = w.size(0) * 8, K = w.size(1) * 2;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.device().is_cpu(),
              "gemv_int4: x must be a contiguous fp32 CPU [B, ", K, "], got ", x.sizes());
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  gemv_int4_packed8(x.data_ptr<float>(), w.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(),
                    y.data_ptr<float>(), x.size(0), N, K, G);
  return y;
}

at::Tensor unpack_int4_float_op(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset, int64_t G,
                                int64_t start, int64_t end) {
  check_int4(w, scale, offset, G);
  const int64_t K = w.size(1) * 2, groups = K / G;
  TORCH_CHECK(start % 8 == 0 && end % 8 == 0 && 0 <= start && start <= end && end <= w.size(0) * 8,
              "unpack_int4_float: rows ", start, ":", end, " must be multiples of 8 within ", w.size(0) * 8);
  at::Tensor out = at::empty({end - start, K}, scale.options());
  const int64_t b0 = start / 8;
  unpack_int4_float(w.data_ptr<uint8_t>() + b0 * 8 * (K / 2), scale.data_ptr<float>() + b0 * 8 * groups,
                    offset.data_ptr<float>() + b0 * 8 * groups, out.data_ptr<float>(), (end - start) / 8, K, G);
  return out;
}

at::Tensor gemv_packed8_op(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 8, "gemv_packed8: w must be [N/8, K, 8], got ", w.sizes());
  const float* s = check_args(x, w, scale, w.size(0) * 8, w.size(1));
  return dispatch<Packed8>(x, w, s, w.size(0) * 8, w.size(1));
}

}  // namespace

TORCH_LIBRARY(qwen3_vl_cpu, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? scale) -> Tensor");
  m.def("gemv_packed8(Tensor x, Tensor w, Tensor? scale) -> Tensor");
  m.def("unpack8_float(Tensor w, int start, int end) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("qk_norm_rope(Tensor qkv, Tensor qw, Tensor kw, float q_eps, float k_eps, Tensor cos, Tensor sin, int hq, "
        "int hk) -> (Tensor, Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor w, Tensor scale, Tensor offset, int group) -> Tensor");
  m.def("unpack_int4_float(Tensor w, Tensor scale, Tensor offset, int group, int start, int end) -> Tensor");
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, Tensor? valid, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwen3_vl_cpu, CPU, m) {
  m.impl("gemv", &gemv_op);
  m.impl("gemv_packed8", &gemv_packed8_op);
  m.impl("unpack8_float", &unpack8_float_op);
  m.impl("rms_norm", &rms_norm_op);
  m.impl("qk_norm_rope", &qk_norm_rope_op);
  m.impl("silu_mul", &silu_mul_op);
  m.impl("gemv_int4", &gemv_int4_op);
  m.impl("unpack_int4_float", &unpack_int4_float_op);
  m.impl("causal_attention", &causal_attention_op);
}
