// The Python module of the native CPU kernels: one build, one import, every kernel.
#include <torch/extension.h>

#include <vector>

void paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache,
                  const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                  const torch::Tensor& seq_lens, const torch::Tensor& rows, torch::Tensor& out,
                  int64_t block_size, double scale);

bool small_linear_supported();
void small_linear(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                  const std::vector<c10::optional<torch::Tensor>>& biases, torch::Tensor& out);
void small_linear_int8(const torch::Tensor& x, const std::vector<torch::Tensor>& qs,
                       const std::vector<torch::Tensor>& scales, torch::Tensor& out);

void add_rms_norm(torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                  const torch::Tensor& weight, double eps, torch::Tensor& h);
void rope_write_cache(const torch::Tensor& q, torch::Tensor& q_out, torch::Tensor& k, const torch::Tensor& v,
                      const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
                      torch::Tensor& v_cache, const torch::Tensor& slot_mapping);

torch::Tensor decode_layer_one_token(
    torch::Tensor& x, const c10::optional<torch::Tensor>& delta, const std::vector<torch::Tensor>& norms,
    double eps, const std::vector<torch::Tensor>& qkv, const std::vector<torch::Tensor>& qkv_scales,
    const std::vector<c10::optional<torch::Tensor>>& qkv_biases, const std::vector<torch::Tensor>& o,
    const std::vector<torch::Tensor>& o_scales, const std::vector<c10::optional<torch::Tensor>>& o_bias,
    const std::vector<torch::Tensor>& gate_up, const std::vector<torch::Tensor>& gate_up_scales,
    const std::vector<torch::Tensor>& down, const std::vector<torch::Tensor>& down_scales, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
    const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
    torch::Tensor& v_cache, const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
    const torch::Tensor& seq_lens, const torch::Tensor& rows, int64_t block_size, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged K/V cache (CPU)");
  m.def("small_linear_supported", &small_linear_supported,
        "whether small_linear was built (the CPU has AVX-512 BF16)");
  m.def("small_linear", &small_linear, "x @ [W_1; W_2; ...]^T + biases for a few bf16 rows (CPU)");
  m.def("small_linear_int8", &small_linear_int8,
        "[x @ q_1^T * scale_1, ...] for a few bf16 rows and int8 per-channel weights (CPU)");
  m.def("add_rms_norm", &add_rms_norm, "x += delta; h = RMSNorm(x) * weight, in one pass (CPU)");
  m.def("rope_write_cache", &rope_write_cache,
        "rotary embedding of q (into q_out) and k (in place), then k and v into the paged cache (CPU)");
  m.def("decode_layer_one_token", &decode_layer_one_token,
        "one decoder layer of a batch-1 decode step: the kernels above in one call (CPU, bf16 or int8 weights)");
}
