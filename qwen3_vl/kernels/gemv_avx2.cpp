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

// Dot products of rows w[0..R) (stride K) with x; R is 4 in the main loop, 1 for leftover rows.
template <typename W, int R>
inline void dot_rows(const typename W::T* w, int64_t K, const float* x, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(W::load8(w + r * K + k), xv, acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(acc[r]);
    for (int64_t j = k; j < K; ++j) s += W::load1(w + r * K + j) * x[j];
    out[r] = s;
  }
}

template <typename W>
void gemv(const float* x, const typename W::T* w, const float* scale, float* y, int64_t B, int64_t N, int64_t K) {
  const int64_t blocks = (N + 3) / 4;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    float tmp[4];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * 4;
      const int64_t rows = std::min<int64_t>(4, N - n0);
      for (int64_t b = 0; b < B; ++b) {
        if (rows == 4) {
          dot_rows<W, 4>(w + n0 * K, K, x + b * K, tmp);
        } else {
          for (int64_t r = 0; r < rows; ++r) dot_rows<W, 1>(w + (n0 + r) * K, K, x + b * K, tmp + r);
        }
        for (int64_t r = 0; r < rows; ++r) y[b * N + n0 + r] = scale ? tmp[r] * scale[n0 + r] : tmp[r];
      }
    }
  });
}

// Eight interleaved rows per block; x rows beyond the first re-read the block from cache.
template <typename W>
void gemv_packed8(const float* x, const typename W::T* w, const float* scale, float* y, int64_t B, int64_t N,
                  int64_t K) {
  constexpr int64_t ahead = 1024 / (8 * sizeof(typename W::T));  // k-steps in 1 KiB of weights
  at::parallel_for(0, N / 8, 4, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const typename W::T* p = w + blk * 8 * K;
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = x + b * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 4 <= K; k += 4) {
          _mm_prefetch(reinterpret_cast<const char*>(p + (k + ahead) * 8), _MM_HINT_T0);
          a0 = _mm256_fmadd_ps(W::load8(p + (k + 0) * 8), _mm256_broadcast_ss(xb + k + 0), a0);
          a1 = _mm256_fmadd_ps(W::load8(p + (k + 1) * 8), _mm256_broadcast_ss(xb + k + 1), a1);
          a2 = _mm256_fmadd_ps(W::load8(p + (k + 2) * 8), _mm256_broadcast_ss(xb + k + 2), a2);
          a3 = _mm256_fmadd_ps(W::load8(p + (k + 3) * 8), _mm256_broadcast_ss(xb + k + 3), a3);
        }
        for (; k < K; ++k) a0 = _mm256_fmadd_ps(W::load8(p + k * 8), _mm256_broadcast_ss(xb + k), a0);
        __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        if (scale) acc = _mm256_mul_ps(acc, _mm256_loadu_ps(scale + blk * 8));
        _mm256_storeu_ps(y + b * N + blk * 8, acc);
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
          _mm256_storeu_ps(o + j * K + k, _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
          _mm256_storeu_ps(o + (j + 4) * K + k, _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
        }
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
}
TORCH_LIBRARY_IMPL(qwen3_vl_cpu, CPU, m) {
  m.impl("gemv", &gemv_op);
  m.impl("gemv_packed8", &gemv_packed8_op);
  m.impl("unpack8_float", &unpack8_float_op);
  m.impl("rms_norm", &rms_norm_op);
  m.impl("qk_norm_rope", &qk_norm_rope_op);
}
