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
}
