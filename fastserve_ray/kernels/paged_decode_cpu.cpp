// Decode attention that reads the paged K/V cache in place, on CPU.
//
// One query token per sequence attends over the sequence's own cached keys, read straight
// from the cache's blocks through the block table: no gather into a scratch tensor, no
// transpose copy, no padding to the longest sequence, one kernel call per layer for the
// whole batch. Work items are sequences spread over the intra-op threads, or, when there are
// fewer sequences than threads, contiguous runs of a sequence's blocks whose partial softmaxes
// are merged afterwards. Each item reads its keys once (scores for every query head), takes an
// fp32 softmax, then reads its values once. Arithmetic is fp32 whatever the cache dtype.
#include "native_kernels.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }

inline float to_float(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift the compiler vectorizes.
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float to_float(c10::Half x) { return static_cast<float>(x); }

// dot(q, x) and acc += p * x over D elements, x in the cache's dtype, q/acc fp32.
template <typename T>
inline float dot_row(const float* q, const T* x, int64_t D) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < D; ++d) dot += q[d] * to_float(x[d]);
  return dot;
}

template <typename T>
inline void axpy_row(float* acc, float p, const T* x, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += p * to_float(x[d]);
}

#if defined(__AVX512F__)
// 16 lanes at a time: compilers do not vectorize the bf16 widening on their own.
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const c10::BFloat16* x) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <>
inline float dot_row<c10::BFloat16>(const float* q, const c10::BFloat16* x, int64_t D) {
  if (D % 16 != 0) {
    float dot = 0.0f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * to_float(x[d]);
    return dot;
  }
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(x + d), acc);
  return _mm512_reduce_add_ps(acc);
}

template <>
inline void axpy_row<c10::BFloat16>(float* acc, float p, const c10::BFloat16* x, int64_t D) {
  if (D % 16 != 0) {
    for (int64_t d = 0; d < D; ++d) acc[d] += p * to_float(x[d]);
    return;
  }
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t d = 0; d < D; d += 16)
    _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(pv, load16(x + d), _mm512_loadu_ps(acc + d)));
}
#endif

// Calls fn(t, row) for the sequence's tokens t = t0..t1-1 in order, ``row`` pointing at token
// t's row (all kv heads) in ``cache``: the block table turns positions into slots.
template <typename T, typename Fn>
inline void for_each_cached_row(const T* cache, const int64_t* table, int64_t t0, int64_t t1,
                                int64_t block_size, int64_t slot_stride, Fn&& fn) {
  for (int64_t start = t0; start < t1;) {
    const int64_t offset = start % block_size;
    const int64_t n = std::min(block_size - offset, t1 - start);
    const T* block = cache + (table[start / block_size] * block_size + offset) * slot_stride;
    for (int64_t i = 0; i < n; ++i) fn(start + i, block + i * slot_stride);
    start += n;
  }
}

// One piece of one sequence's attention: query heads of kv heads [h0, h1) over cached tokens
// [t0, t1). All of its heads read each token's row together, so the cache streams in order.
// Leaves, per query head r, the running max ``mx[r]``, the sum of exp(score - mx) ``sum[r]``
// and the unnormalised weighted values ``acc[r * D ...]``: pieces over other token ranges of
// the same heads merge exactly (flash-decoding's split-K), one piece alone is normalised.
template <typename T>
void attend_piece(const T* q_row, const T* k, const T* v, const int64_t* table, int64_t t0,
                  int64_t t1, int64_t h0, int64_t h1, int64_t groups, int64_t head_dim,
                  int64_t slot_stride, int64_t block_size, float scale, std::vector<float>& qf,
                  std::vector<float>& scores, float* mx, float* sum, float* acc) {
  const int64_t D = head_dim, G = groups, L = t1 - t0, R = (h1 - h0) * G;  // R query heads
  qf.resize(R * D);
  scores.resize(R * L);
  std::fill(acc, acc + R * D, 0.0f);
  for (int64_t r = 0; r < R; ++r) {
    const T* qh = q_row + (h0 * G + r) * D;
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_float(qh[d]) * scale;
  }
  // Pass 1: scores, token by token through each block.
  for_each_cached_row(k, table, t0, t1, block_size, slot_stride, [&](int64_t t, const T* row) {
    for (int64_t r = 0; r < R; ++r)
      scores[r * L + t - t0] = dot_row(qf.data() + r * D, row + (h0 + r / G) * D, D);
  });
  // Softmax numerators per query head, in fp32.
  for (int64_t r = 0; r < R; ++r) {
    float* s = scores.data() + r * L;
    float m = s[0];
    for (int64_t t = 1; t < L; ++t) m = std::max(m, s[t]);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < L; ++t) {
      s[t] = std::exp(s[t] - m);
      total += s[t];
    }
    mx[r] = m;
    sum[r] = total;
  }
  // Pass 2: the probability-weighted sum of the values.
  for_each_cached_row(v, table, t0, t1, block_size, slot_stride, [&](int64_t t, const T* row) {
    for (int64_t r = 0; r < R; ++r)
      axpy_row(acc + r * D, scores[r * L + t - t0], row + (h0 + r / G) * D, D);
  });
}

template <typename T>
inline void write_out(T* out_heads, const float* acc, float inv_sum, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out_heads[d] = static_cast<T>(acc[d] * inv_sum);
}

}  // namespace

// q, out: (N, H, D) contiguous; k_cache, v_cache: (slots, Hkv, D) with contiguous rows;
// block_tables: (S, W) int64; seq_lens, rows: (S,) int64 — sequence s is query row rows[s]
// and attends over its first seq_lens[s] cached tokens (its new key already written).
void paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache,
                  const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                  const torch::Tensor& seq_lens, const torch::Tensor& rows, torch::Tensor& out,
                  int64_t block_size, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode: CPU tensors only");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "paged_decode: q and out must be contiguous");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "paged_decode: bad ranks");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_decode: q and the cache must share a dtype");
  TORCH_CHECK(k_cache.stride(2) == 1 && k_cache.stride(1) == k_cache.size(2) &&
                  v_cache.strides() == k_cache.strides(),
              "paged_decode: cache rows must be contiguous (slots, kv heads, head dim)");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous() &&
                  seq_lens.scalar_type() == torch::kInt64 && rows.scalar_type() == torch::kInt64,
              "paged_decode: int64 contiguous block tables, lengths and rows");
  const int64_t H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(2) == D, "paged_decode: head shapes differ");
  const int64_t S = seq_lens.size(0), W = block_tables.size(1), G = H / Hkv;
  const int64_t slot_stride = k_cache.stride(0);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t threads = at::get_num_threads();
    if (S >= threads) {
      // A sequence per work item: enough of them to keep every thread busy.
      at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> qf, scores, acc(H * D), mx(H), sum(H);
        for (int64_t s = begin; s < end; ++s) {
          const int64_t row = row_ids[s];
          attend_piece<scalar_t>(qp + row * H * D, kp, vp, tables + s * W, 0, lens[s], 0, Hkv, G,
                                 D, slot_stride, block_size, static_cast<float>(scale), qf,
                                 scores, mx.data(), sum.data(), acc.data());
          for (int64_t r = 0; r < H; ++r)
            write_out(op + row * H * D + r * D, acc.data() + r * D, 1.0f / sum[r], D);
        }
      });
      return;
    }
    // Fewer sequences than threads: each sequence's tokens are split into contiguous runs of
    // whole blocks, one per work item (flash-decoding's split-K), and the pieces are merged.
    // Every item then streams a contiguous stretch of the cache, all heads of each row; a
    // split by heads instead had each thread read every other 512 bytes of every row, which
    // the prefetchers follow poorly once the cache is cold (in an engine step it always is).
    const int64_t parts = (threads + S - 1) / S;
    std::vector<float> part_mx(S * parts * H), part_sum(S * parts * H), part_acc(S * parts * H * D);
    std::vector<int64_t> part_len(S * parts, 0);
    at::parallel_for(0, S * parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf, scores;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t s = item / parts, p = item % parts, L = lens[s];
        const int64_t blocks = (L + block_size - 1) / block_size;
        const int64_t t0 = std::min(L, (p * blocks / parts) * block_size);
        const int64_t t1 = std::min(L, ((p + 1) * blocks / parts) * block_size);
        part_len[item] = t1 - t0;
        if (t1 <= t0) continue;
        attend_piece<scalar_t>(qp + row_ids[s] * H * D, kp, vp, tables + s * W, t0, t1, 0, Hkv,
                               G, D, slot_stride, block_size, static_cast<float>(scale), qf,
                               scores, part_mx.data() + item * H, part_sum.data() + item * H,
                               part_acc.data() + item * H * D);
      }
    });
    std::vector<float> merged(D);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t row = row_ids[s];
      for (int64_t r = 0; r < H; ++r) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < parts; ++p)
          if (part_len[s * parts + p] > 0) m = std::max(m, part_mx[(s * parts + p) * H + r]);
        float total = 0.0f;
        std::fill(merged.begin(), merged.end(), 0.0f);
        for (int64_t p = 0; p < parts; ++p) {
          const int64_t item = s * parts + p;
          if (part_len[item] == 0) continue;
          const float w = std::exp(part_mx[item * H + r] - m);
          total += w * part_sum[item * H + r];
          const float* a = part_acc.data() + (item * H + r) * D;
          for (int64_t d = 0; d < D; ++d) merged[d] += w * a[d];
        }
        write_out(op + row * H * D + r * D, merged.data(), 1.0f / total, D);
      }
    }
  });
}
