// The Python module of the native CPU kernels: one build, one import, every kernel.
#include "native_kernels.h"

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
