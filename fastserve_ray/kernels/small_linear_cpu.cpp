// y = x W^T (+ b) for a few rows of bf16 x, on CPU with AVX-512 BF16: the decode step's linears.
//
// With 1-4 rows a linear is a matrix-vector product: every weight is read once and used for a
// handful of multiply-adds, so its speed is the speed at which the weights stream in. oneDNN's
// packed GEMM reaches about half of the machine's read bandwidth at this size; this loop reads
// each weight row once, in order, straight from PyTorch's row-major layout (no packed copy),
// and multiplies it with every input row while it is in registers, using the dpbf16 pair
// multiply-add into fp32 sums. Several weights that share the input (q|k|v, gate|up) are done in
// one call, their outputs side by side, so the threads are forked once per fused product.
//
// One input row (batch-1 decode) has a path of its own: each thread walks its weight rows one
// after another, a single sequential stream, asking for a whole row a few KB ahead at the
// start of each row. Measured on 2 cores (bench preset's 8 layers + head, 60 MB of bf16): 1.6-2.1
// ms a step against 2.5-3.3 ms for the 4-row tiles below, whose four interleaved streams the
// hardware prefetcher follows less well. int8 weights on that path are widened straight to fp32
// and multiplied with fp32 FMAs (x widened once): fewer instructions per weight than widening to
// bf16 pairs, and at int8 the instructions, not the bytes, were the limit (1.08 vs 1.32 ms).
#include "native_kernels.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

#if defined(__AVX512BF16__)
constexpr int kRowsPerTile = 4;  // weight rows whose sums are built together
constexpr int kMaxInputRows = 4;  // input rows per pass: 4 x 4 accumulators of 32 registers
constexpr int64_t kPrefetchBytes = 4096;

using bf16 = c10::BFloat16;

inline __m512bh load32(const bf16* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}
inline __m512bh load_tail(const bf16* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, reinterpret_cast<const void*>(p));
}
// 32 int8 weights widened to bf16 in registers: exact, since |q| <= 128 needs 8 bits.
inline __m512bh widen32(__m256i raw) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);  // lanes 0-15 from lo, 16-31 from hi: memory order
}
inline __m512bh load32(const int8_t* p) {
  return widen32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512bh load_tail(const int8_t* p, __mmask32 mask) {
  return widen32(_mm256_maskz_loadu_epi8(mask, p));
}

// sums[m][j] = dot(x[m, :], w[j, :]) for MT input rows and `nrows` (<= 4) weight rows;
// W is bf16 or int8 (widened in registers).
template <int MT, typename W>
inline void dot_tile(const bf16* x, int64_t ldx, const W* w, int64_t K, int64_t nrows,
                     float sums[MT][kRowsPerTile]) {
  __m512 acc[MT][kRowsPerTile];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kRowsPerTile; ++j) acc[m][j] = _mm512_setzero_ps();
  // Missing weight rows of a short last tile re-read row 0 (in bounds); their sums are dropped.
  const W* rows[kRowsPerTile];
  for (int j = 0; j < kRowsPerTile; ++j) rows[j] = w + (j < nrows ? j : 0) * K;
  int64_t k = 0;
  // The next tiles' rows follow this tile's in memory: ask for them now, so that a thread keeps
  // more misses in flight than the hardware prefetcher alone does (weights larger than the cache).
  const char* ahead = reinterpret_cast<const char*>(w) + kPrefetchBytes;
  const int64_t line_step = 64 / static_cast<int64_t>(sizeof(W));
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[kRowsPerTile];
    for (int j = 0; j < kRowsPerTile; ++j) {
      if ((k & (line_step - 1)) == 0)
        _mm_prefetch(ahead + (j * K + k) * static_cast<int64_t>(sizeof(W)), _MM_HINT_T0);
      wv[j] = load32(rows[j] + k);
    }
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = load32(x + m * ldx + k);
      for (int j = 0; j < kRowsPerTile; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
    }
  }
  if (k < K) {  // the last K % 32 columns, zero-filled past the end
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512bh wv[kRowsPerTile];
    for (int j = 0; j < kRowsPerTile; ++j) wv[j] = load_tail(rows[j] + k, mask);
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = load_tail(x + m * ldx + k, mask);
      for (int j = 0; j < kRowsPerTile; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kRowsPerTile; ++j) sums[m][j] = _mm512_reduce_add_ps(acc[m][j]);
}

// Weight rows [n0, n1) of one weight, for MT input rows; y points at this weight's columns.
// Each sum is multiplied by its row's scale (int8 weights; none for bf16), then the bias is
// added, then it is rounded to bf16 once (nearest even, as oneDNN does).
template <int MT, typename W>
void weight_rows(const bf16* x, int64_t ldx, const W* w, const float* scale, const bf16* b,
                 int64_t K, int64_t n0, int64_t n1, bf16* y, int64_t ldy) {
  float sums[MT][kRowsPerTile];
  for (int64_t n = n0; n < n1; n += kRowsPerTile) {
    const int64_t nrows = std::min<int64_t>(kRowsPerTile, n1 - n);
    dot_tile<MT>(x, ldx, w + n * K, K, nrows, sums);
    for (int m = 0; m < MT; ++m)
      for (int64_t j = 0; j < nrows; ++j) {
        const float s = scale != nullptr ? scale[n + j] : 1.0f;
        const float bias = b != nullptr ? static_cast<float>(b[n + j]) : 0.0f;
        y[m * ldy + n + j] = bf16(sums[m][j] * s + bias);
      }
  }
}

template <typename W>
void weight_rows_any(int64_t mt, const bf16* x, int64_t ldx, const W* w, const float* scale,
                     const bf16* b, int64_t K, int64_t n0, int64_t n1, bf16* y, int64_t ldy) {
  switch (mt) {
    case 1: weight_rows<1>(x, ldx, w, scale, b, K, n0, n1, y, ldy); break;
    case 2: weight_rows<2>(x, ldx, w, scale, b, K, n0, n1, y, ldy); break;
    case 3: weight_rows<3>(x, ldx, w, scale, b, K, n0, n1, y, ldy); break;
    default: weight_rows<4>(x, ldx, w, scale, b, K, n0, n1, y, ldy); break;
  }
}

// How far ahead of the row being multiplied the one-row path asks for the next rows' lines.
constexpr int64_t kRowPrefetchBytes = 4096;

inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row) + kRowPrefetchBytes;
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

// One input row, bf16 weight rows [n0, n1): y[n] = dot(x, w[n, :]) * scale + bias, two sums per
// row (the dpbf16 latency chain), rows one after another.
void one_row(const bf16* x, const bf16* w, const float* scale, const bf16* b, int64_t K,
             int64_t n0, int64_t n1, bf16* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const bf16* r = w + n * K;
    prefetch_row(r, K * static_cast<int64_t>(sizeof(bf16)));
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      a0 = _mm512_dpbf16_ps(a0, load32(x + k), load32(r + k));
      a1 = _mm512_dpbf16_ps(a1, load32(x + k + 32), load32(r + k + 32));
    }
    if (k + 32 <= K) {
      a0 = _mm512_dpbf16_ps(a0, load32(x + k), load32(r + k));
      k += 32;
    }
    if (k < K) {
      const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
      a1 = _mm512_dpbf16_ps(a1, load_tail(x + k, mask), load_tail(r + k, mask));
    }
    const float s = scale != nullptr ? scale[n] : 1.0f;
    const float bias = b != nullptr ? static_cast<float>(b[n]) : 0.0f;
    y[n] = bf16(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * s + bias);
  }
}

inline __m512 widen16_ps(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// One input row, int8 weight rows [n0, n1) (no bias): fp32 FMAs, four sums per row. The
// products are exact in fp32 (8-bit bf16 mantissa times an 8-bit integer), as with dpbf16.
void one_row(const bf16* x, const int8_t* w, const float* scale, const bf16* /*b*/, int64_t K,
             int64_t n0, int64_t n1, bf16* y) {
  std::vector<float> xf(K);
  for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(x[k]);
  const float* xp = xf.data();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* r = w + n * K;
    prefetch_row(r, K);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
           a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xp + k), widen16_ps(r + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xp + k + 16), widen16_ps(r + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(xp + k + 32), widen16_ps(r + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(xp + k + 48), widen16_ps(r + k + 48), a3);
    }
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xp + k), widen16_ps(r + k), a0);
    if (k < K) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m512 t = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, r + k)));
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, xp + k), t, a1);
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    y[n] = bf16(_mm512_reduce_add_ps(sum) * scale[n]);
  }
}

template <typename W>
struct Segment {  // one weight of the fused product
  const W* w;
  const float* scale;  // per output row (int8 weights), or nullptr
  const bf16* b;
  int64_t n;           // its output columns
  int64_t out_offset;  // where they start in y
  int64_t first_tile;  // its first tile in the product's tile numbering
};

// out = x @ [W_1; W_2; ...]^T (scaled, biased) for the segments' weights, split over threads by
// tiles of weight rows; 16 tiles (64 weight rows) per grain: small products stay on one thread.
template <typename W>
void run_segments(const torch::Tensor& x, const std::vector<Segment<W>>& segments, int64_t tiles,
                  torch::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1);
  const bf16* xp = x.data_ptr<bf16>();
  bf16* yp = out.data_ptr<bf16>();
  const int64_t ldx = x.stride(0), ldy = out.stride(0);
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    for (const Segment<W>& seg : segments) {
      const int64_t seg_tiles = (seg.n + kRowsPerTile - 1) / kRowsPerTile;
      const int64_t a = std::max(t0, seg.first_tile), z = std::min(t1, seg.first_tile + seg_tiles);
      if (a >= z) continue;
      const int64_t n0 = (a - seg.first_tile) * kRowsPerTile;
      const int64_t n1 = std::min(seg.n, (z - seg.first_tile) * kRowsPerTile);
      if (M == 1) {
        one_row(xp, seg.w, seg.scale, seg.b, K, n0, n1, yp + seg.out_offset);
        continue;
      }
      for (int64_t m = 0; m < M; m += kMaxInputRows) {
        weight_rows_any(std::min<int64_t>(kMaxInputRows, M - m), xp + m * ldx, ldx, seg.w,
                        seg.scale, seg.b, K, n0, n1, yp + m * ldy + seg.out_offset, ldy);
      }
    }
  });
}

void check_x_out(const torch::Tensor& x, const torch::Tensor& out, const char* who) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 &&
                  x.scalar_type() == at::kBFloat16,
              who, ": x must be a CPU bf16 (M, K) tensor with contiguous rows");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.dim() == 2 && out.stride(1) == 1 &&
                  out.size(0) == x.size(0),
              who, ": out must be bf16 (M, N) with contiguous rows");
}
#endif

}  // namespace

bool small_linear_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// out (M, sum N_i) = x (M, K) @ [W_1; W_2; ...]^T + [b_1, b_2, ...]; bf16, W_i (N_i, K) contiguous.
void small_linear(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                  const std::vector<c10::optional<torch::Tensor>>& biases, torch::Tensor& out) {
#if defined(__AVX512BF16__)
  check_x_out(x, out, "small_linear");
  TORCH_CHECK(!weights.empty() && biases.size() == weights.size(),
              "small_linear: one bias (or None) per weight");
  const int64_t K = x.size(1);
  std::vector<Segment<bf16>> segments;
  int64_t columns = 0, tiles = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous() &&
                    w.size(1) == K,
                "small_linear: weights must be contiguous bf16 (N, K) matching x");
    const bf16* b = nullptr;
    if (biases[i].has_value() && biases[i]->defined()) {
      TORCH_CHECK(biases[i]->scalar_type() == at::kBFloat16 && biases[i]->is_contiguous() &&
                      biases[i]->numel() == w.size(0),
                  "small_linear: a bias must be contiguous bf16 (N,)");
      b = biases[i]->data_ptr<bf16>();
    }
    segments.push_back({w.data_ptr<bf16>(), nullptr, b, w.size(0), columns, tiles});
    columns += w.size(0);
    tiles += (w.size(0) + kRowsPerTile - 1) / kRowsPerTile;
  }
  TORCH_CHECK(out.size(1) == columns, "small_linear: out has ", out.size(1), " columns, the weights ",
              columns);
  run_segments(x, segments, tiles, out);
#else
  TORCH_CHECK(false, "small_linear: this build has no AVX-512 BF16");
#endif
}

// out (M, sum N_i) = [x @ q_1^T * scale_1, x @ q_2^T * scale_2, ...]: int8 weights with one
// fp32 scale per output row (symmetric per-channel quantization), bf16 x and out. The same loop
// as small_linear with the weights widened to bf16 in registers: half the bytes to stream.
void small_linear_int8(const torch::Tensor& x, const std::vector<torch::Tensor>& qs,
                       const std::vector<torch::Tensor>& scales, torch::Tensor& out) {
#if defined(__AVX512BF16__)
  check_x_out(x, out, "small_linear_int8");
  TORCH_CHECK(!qs.empty() && scales.size() == qs.size(), "small_linear_int8: one scale per weight");
  const int64_t K = x.size(1);
  std::vector<Segment<int8_t>> segments;
  int64_t columns = 0, tiles = 0;
  for (size_t i = 0; i < qs.size(); ++i) {
    const auto& q = qs[i];
    TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous() && q.size(1) == K,
                "small_linear_int8: q must be a contiguous int8 (N, K) matching x");
    TORCH_CHECK(scales[i].scalar_type() == at::kFloat && scales[i].is_contiguous() &&
                    scales[i].numel() == q.size(0),
                "small_linear_int8: scale must be a contiguous fp32 (N,)");
    segments.push_back({q.data_ptr<int8_t>(), scales[i].data_ptr<float>(), nullptr, q.size(0),
                        columns, tiles});
    columns += q.size(0);
    tiles += (q.size(0) + kRowsPerTile - 1) / kRowsPerTile;
  }
  TORCH_CHECK(out.size(1) == columns, "small_linear_int8: out has ", out.size(1),
              " columns, the weights ", columns);
  run_segments(x, segments, tiles, out);
#else
  TORCH_CHECK(false, "small_linear_int8: this build has no AVX-512 BF16");
#endif
}
