// The native CPU kernels' entry points: declared once here, defined in the *_cpu.cpp files (which
// include this, so the compiler checks each definition against its declaration), bound to Python
// in bindings.cpp and chained in decode_layer_cpu.cpp.
#pragma once

#include <torch/extension.h>

#include <vector>

// paged_decode_cpu.cpp
void paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache,
                  const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                  const torch::Tensor& seq_lens, const torch::Tensor& rows, torch::Tensor& out,
                  int64_t block_size, double scale);

// small_linear_cpu.cpp
bool small_linear_supported();
void small_linear(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                  const std::vector<c10::optional<torch::Tensor>>& biases, torch::Tensor& out);
void small_linear_int8(const torch::Tensor& x, const std::vector<torch::Tensor>& qs,
                       const std::vector<torch::Tensor>& scales, torch::Tensor& out);

// norm_rope_cpu.cpp
void add_rms_norm(torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                  const torch::Tensor& weight, double eps, torch::Tensor& h);
void rope_write_cache(const torch::Tensor& q, torch::Tensor& q_out, torch::Tensor& k,
                      const torch::Tensor& v, const torch::Tensor& cos, const torch::Tensor& sin,
                      torch::Tensor& k_cache, torch::Tensor& v_cache,
                      const torch::Tensor& slot_mapping);

// decode_layer_cpu.cpp
torch::Tensor decode_layer_one_token(
    torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
    const std::vector<torch::Tensor>& norms, double eps, const std::vector<torch::Tensor>& qkv,
    const std::vector<torch::Tensor>& qkv_scales,
    const std::vector<c10::optional<torch::Tensor>>& qkv_biases, const std::vector<torch::Tensor>& o,
    const std::vector<torch::Tensor>& o_scales,
    const std::vector<c10::optional<torch::Tensor>>& o_bias,
    const std::vector<torch::Tensor>& gate_up, const std::vector<torch::Tensor>& gate_up_scales,
    const std::vector<torch::Tensor>& down, const std::vector<torch::Tensor>& down_scales,
    int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, const torch::Tensor& cos,
    const torch::Tensor& sin, torch::Tensor& k_cache, torch::Tensor& v_cache,
    const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
    const torch::Tensor& seq_lens, const torch::Tensor& rows, int64_t block_size, double scale);
