// One decoder layer of a batch-1 decode step in one call (CPU, bf16 activations; bf16 or int8
// per-channel weights): the same kernels the Python forward calls one by one (add_rms_norm,
// small_linear or small_linear_int8, rope_write_cache, paged_decode, and ATen's silu and mul),
// in the same order on the same inputs, so the numbers are those of the native per-call path.
// What it removes is what lies between them: at batch 1 a layer's ~15 module calls, views and
// wrappers cost more in Python dispatch than the layer's norms and RoPE cost to compute.
#include "native_kernels.h"

#include <vector>

namespace {
int64_t rows_of(const std::vector<torch::Tensor>& weights) {
  int64_t n = 0;
  for (const auto& w : weights) n += w.size(0);
  return n;
}

// bf16 weights (no scales), or int8 per-channel weights with their fp32 row scales. An int8
// weight's bias is added to the kernel's bf16 output, as the layer-by-layer path does
// (QuantizedLinear.forward), so both give the same numbers.
void linear(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
            const std::vector<torch::Tensor>& scales,
            const std::vector<c10::optional<torch::Tensor>>& biases, torch::Tensor& out) {
  if (scales.empty()) {
    small_linear(x, weights, biases, out);
    return;
  }
  small_linear_int8(x, weights, scales, out);
  int64_t offset = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t n = weights[i].size(0);
    if (biases[i].has_value() && biases[i]->defined()) {
      TORCH_CHECK(biases[i]->scalar_type() == at::kBFloat16 && biases[i]->numel() == n,
                  "decode_layer_one_token: an int8 weight's bias must be bf16 (N,)");
      out.narrow(1, offset, n).add_(*biases[i]);
    }
    offset += n;
  }
}
}  // namespace

// x (1, C): the residual stream, updated in place (x += delta, then += attention output).
// Returns the layer's MLP output (1, C): the next layer's delta.
//   norms = {input_layernorm, post_attention_layernorm} weights; qkv = {Wq, Wk, Wv} (+ biases);
//   o = {Wo} (+ bias); gate_up = {Wgate, Wup}; down = {Wdown}; caches (slots, Hkv, D). Each
//   projection group is bf16 (its *_scales empty) or int8 per-channel with fp32 row scales.
torch::Tensor decode_layer_one_token(
    torch::Tensor& x, const c10::optional<torch::Tensor>& delta, const std::vector<torch::Tensor>& norms,
    double eps, const std::vector<torch::Tensor>& qkv, const std::vector<torch::Tensor>& qkv_scales,
    const std::vector<c10::optional<torch::Tensor>>& qkv_biases, const std::vector<torch::Tensor>& o,
    const std::vector<torch::Tensor>& o_scales, const std::vector<c10::optional<torch::Tensor>>& o_bias,
    const std::vector<torch::Tensor>& gate_up, const std::vector<torch::Tensor>& gate_up_scales,
    const std::vector<torch::Tensor>& down, const std::vector<torch::Tensor>& down_scales, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
    const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
    torch::Tensor& v_cache, const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
    const torch::Tensor& seq_lens, const torch::Tensor& rows, int64_t block_size, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "decode_layer_one_token: x must be (1, C)");
  TORCH_CHECK(norms.size() == 2 && qkv.size() == 3 && o.size() == 1 && gate_up.size() == 2 &&
                  down.size() == 1,
              "decode_layer_one_token: expected 2 norms, 3 q|k|v, 1 o, 2 gate|up and 1 down weights");
  const int64_t HD = n_heads * head_dim, KD = n_kv_heads * head_dim;
  TORCH_CHECK(qkv[0].size(0) == HD && qkv[1].size(0) == KD && qkv[2].size(0) == KD,
              "decode_layer_one_token: q|k|v weights do not match the head counts");
  const auto none = c10::optional<torch::Tensor>();
  // Attention half: h = norm(x += delta); q|k|v; RoPE + cache write; attention; o.
  torch::Tensor h = torch::empty_like(x);
  add_rms_norm(x, delta, norms[0], eps, h);
  torch::Tensor qkv_out = x.new_empty({1, rows_of(qkv)});
  linear(h, qkv, qkv_scales, qkv_biases, qkv_out);
  torch::Tensor q = qkv_out.narrow(1, 0, HD).view({1, n_heads, head_dim});
  torch::Tensor k = qkv_out.narrow(1, HD, KD).view({1, n_kv_heads, head_dim});
  torch::Tensor v = qkv_out.narrow(1, HD + KD, KD).view({1, n_kv_heads, head_dim});
  torch::Tensor q_rot = x.new_empty({1, n_heads, head_dim});
  rope_write_cache(q, q_rot, k, v, cos, sin, k_cache, v_cache, slot_mapping);
  torch::Tensor y = torch::empty_like(q_rot);
  paged_decode(q_rot, k_cache, v_cache, block_tables, seq_lens, rows, y, block_size, scale);
  torch::Tensor attn = x.new_empty({1, o[0].size(0)});
  linear(y.view({1, HD}), o, o_scales, o_bias, attn);
  // MLP half: h = norm(x += attn); down(silu(gate) * up).
  add_rms_norm(x, attn, norms[1], eps, h);
  const int64_t F = gate_up[0].size(0);
  torch::Tensor gu = x.new_empty({1, rows_of(gate_up)});
  linear(h, gate_up, gate_up_scales, {none, none}, gu);
  torch::Tensor act = at::silu(gu.narrow(1, 0, F)) * gu.narrow(1, F, F);
  torch::Tensor out = x.new_empty({1, down[0].size(0)});
  linear(act, down, down_scales, {none}, out);
  return out;
}
