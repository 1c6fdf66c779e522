// The small per-token operations around a decoder layer's linears, one call each instead of a
// chain of PyTorch ops (CPU, fp32 or bf16):
//   * add_rms_norm: the residual add and the RMSNorm that follows it (x += delta; h = norm(x));
//   * rope_write_cache: rotary embedding of q (into a contiguous tensor, as attention wants it)
//     and of k (in place), then k and v into the paged cache.
// At batch 1 each PyTorch op costs 1-3 us of dispatch for a few hundred elements of work, and a
// layer issues ~40 of them; these two calls replace ~30.
//
// Both reproduce the PyTorch reference (models/llama.py) rounding step for rounding step: every
// intermediate that PyTorch rounds to the activation dtype is rounded here too, and nothing is
// fused into an FMA that PyTorch computes as a multiply and an add. Only the order of the fp32
// sum of squares differs.
#include "native_kernels.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace {

using bf16 = c10::BFloat16;

// Rounds to the activation dtype: a no-op for fp32, nearest-even for bf16 (as PyTorch does).
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// Rows [r0, r1) of x (N, C): x[r] += delta[r] (rounded to T), then
// h[r] = weight * round_T(x[r] * rsqrt(mean(x[r]^2) + eps)) — RMSNorm as models/llama.py has it.
template <typename T>
__attribute__((optimize("fp-contract=off"))) void add_rms_norm_rows(
    T* x, const T* delta, const T* weight, T* h, int64_t C, double eps, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* xr = x + r * C;
    if (delta != nullptr) {
      const T* dr = delta + r * C;
      for (int64_t c = 0; c < C; ++c)
        xr[c] = static_cast<T>(static_cast<float>(xr[c]) + static_cast<float>(dr[c]));
    }
    float ss = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      const float v = static_cast<float>(xr[c]);
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(C) + static_cast<float>(eps));
    T* hr = h + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const float normed = round_to<T>(static_cast<float>(xr[c]) * inv);
      hr[c] = static_cast<T>(static_cast<float>(weight[c]) * normed);
    }
  }
}

// One head of one token, rotated from x into y (which may be x) by HF's half-split convention:
// out[i] = x[i] * cos[i] + (i < D/2 ? -x[i + D/2] : x[i - D/2]) * sin[i], each product and the
// sum rounded to T, as PyTorch's `x * cos + rotate_half(x) * sin` rounds them.
template <typename T>
__attribute__((optimize("fp-contract=off"))) inline void rotate_head(const T* x, T* y, const T* cos,
                                                                      const T* sin, int64_t D) {
  const int64_t half = D / 2;
  float out[512];
  for (int64_t i = 0; i < D; ++i) {
    const float xi = static_cast<float>(x[i]);
    const float other = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
    const float a = round_to<T>(xi * static_cast<float>(cos[i]));
    const float b = round_to<T>(other * static_cast<float>(sin[i]));
    out[i] = a + b;
  }
  for (int64_t i = 0; i < D; ++i) y[i] = static_cast<T>(out[i]);
}

template <typename T>
void rope_write_cache_rows(const T* q, int64_t ldq, T* q_out, int64_t H, T* k, int64_t ldk, const T* v,
                           int64_t ldv, int64_t Hkv, int64_t D, const T* cos, const T* sin,
                           T* k_cache, T* v_cache, const int64_t* slots, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* c = cos + r * D;
    const T* s = sin + r * D;
    for (int64_t h = 0; h < H; ++h) rotate_head(q + r * ldq + h * D, q_out + (r * H + h) * D, c, s, D);
    for (int64_t h = 0; h < Hkv; ++h) rotate_head(k + r * ldk + h * D, k + r * ldk + h * D, c, s, D);
    const int64_t slot = slots[r];
    T* kd = k_cache + slot * Hkv * D;
    T* vd = v_cache + slot * Hkv * D;
    const T* kr = k + r * ldk;
    const T* vr = v + r * ldv;
    for (int64_t i = 0; i < Hkv * D; ++i) {
      kd[i] = kr[i];
      vd[i] = vr[i];
    }
  }
}

// Enough elements per task that forking a thread pays (prefill); decode's few rows stay on one.
int64_t row_grain(int64_t elements_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elements_per_row));
}

void check_rows(const torch::Tensor& t, const char* name, int64_t N, int64_t C) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == C && t.is_contiguous(), "add_rms_norm: ",
              name, " must be a contiguous (", N, ", ", C, ") tensor");
}

// (N, heads, D) with contiguous heads and any row stride: the views split() makes of a fused
// q|k|v output qualify.
void check_heads(const torch::Tensor& t, const char* name, int64_t N, int64_t D) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == N && t.size(2) == D && t.stride(2) == 1 &&
                  t.stride(1) == D,
              "rope_write_cache: ", name, " must be (N, heads, ", D, ") with contiguous heads");
}

}  // namespace

// x (N, C) += delta (if given), in place; h (N, C) = RMSNorm(x) * weight. fp32 or bf16, one dtype.
void add_rms_norm(torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                  const torch::Tensor& weight, double eps, torch::Tensor& h) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && h.device().is_cpu() &&
                  (!delta.has_value() || !delta->defined() || delta->device().is_cpu()),
              "add_rms_norm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "add_rms_norm: fp32 or bf16 only");
  const int64_t N = x.size(0), C = x.dim() == 2 ? x.size(1) : -1;
  check_rows(x, "x", N, C);
  check_rows(h, "h", N, C);
  TORCH_CHECK(weight.dim() == 1 && weight.numel() == C && weight.is_contiguous(),
              "add_rms_norm: weight must be a contiguous (", C, ",) tensor");
  const bool has_delta = delta.has_value() && delta->defined();
  if (has_delta) check_rows(*delta, "delta", N, C);
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&weight, &h})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "add_rms_norm: all tensors must share x's dtype");
  if (has_delta)
    TORCH_CHECK(delta->scalar_type() == x.scalar_type(), "add_rms_norm: delta must share x's dtype");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = has_delta ? delta->data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(C), [&](int64_t r0, int64_t r1) {
      add_rms_norm_rows<scalar_t>(xp, dp, wp, hp, C, eps, r0, r1);
    });
  });
}

// q (N, H, D) rotated by cos/sin (N, D) into q_out (contiguous (N, H, D)), k (N, Hkv, D) rotated
// in place; then k and v (N, Hkv, D) copied to k_cache/v_cache (slots, Hkv, D) at slot_mapping (N,).
void rope_write_cache(const torch::Tensor& q, torch::Tensor& q_out, torch::Tensor& k, const torch::Tensor& v,
                      const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
                      torch::Tensor& v_cache, const torch::Tensor& slot_mapping) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{
           &q, &q_out, &k, &v, &cos, &sin, &k_cache, &v_cache, &slot_mapping})
    TORCH_CHECK(t->device().is_cpu(), "rope_write_cache: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "rope_write_cache: fp32 or bf16 only");
  const int64_t N = q.size(0), D = q.dim() == 3 ? q.size(2) : -1;
  TORCH_CHECK(D > 0 && D % 2 == 0 && D <= 512, "rope_write_cache: head size must be even and <= 512");
  check_heads(q, "q", N, D);
  check_heads(k, "k", N, D);
  check_heads(v, "v", N, D);
  const int64_t H = q.size(1), Hkv = k.size(1);
  TORCH_CHECK(q_out.sizes() == q.sizes() && q_out.is_contiguous() &&
                  q_out.scalar_type() == q.scalar_type(),
              "rope_write_cache: q_out must be a contiguous tensor shaped and typed as q");
  TORCH_CHECK(v.size(1) == Hkv, "rope_write_cache: k and v must have the same heads");
  for (const torch::Tensor* t :
       std::initializer_list<const torch::Tensor*>{&k, &v, &cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "rope_write_cache: all tensors must share q's dtype");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == N && cos.size(1) == D && cos.is_contiguous() &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous(),
              "rope_write_cache: cos and sin must be contiguous (N, ", D, ")");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.size(1) == Hkv && k_cache.size(2) == D &&
                  k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(),
              "rope_write_cache: the caches must be contiguous (slots, ", Hkv, ", ", D, ")");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.numel() == N && slot_mapping.is_contiguous(),
              "rope_write_cache: slot_mapping must be a contiguous int64 (N,)");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0);
  for (int64_t r = 0; r < N; ++r)
    TORCH_CHECK(slots[r] >= 0 && slots[r] < num_slots, "rope_write_cache: slot ", slots[r],
                " is outside the cache's ", num_slots, " slots");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "rope_write_cache", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* qo = q_out.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain((H + 2 * Hkv) * D), [&](int64_t r0, int64_t r1) {
      rope_write_cache_rows<scalar_t>(qp, q.stride(0), qo, H, kp, k.stride(0), vp, v.stride(0), Hkv, D,
                                      cp, sp, kc, vc, slots, r0, r1);
    });
  });
}
