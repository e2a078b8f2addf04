// A one-layer LSTM's forward pass for scoring on the CPU (no gradient), where rows share their
// input sequence: the importance-weighted bound decodes each sentence under K codes z, and the
// decoder's input at every step is [word embedding; z]. libtorch's LSTM (oneDNN) multiplies the
// whole [E + Z] input by its weights for every row, K times per sentence; here the caller gives
// the embeddings' share of the gates once per sentence ([B, T, 4H], biases included), z's share
// rides in the recurrent product ([h; z] [N, H + Z] times [W_hh, W_iz]ᵀ, constant columns that
// cost Z / H more than h alone), and the gates' elementwise half is one pass per step
// (src/lstm_kernel.cpp) instead of libtorch's dozen.

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>

#include <cstdint>
#include <exception>
#include <utility>

#include "ffi_message.h"
#include "kernel_dispatch.h"

namespace {

using CellFn = void (*)(const void *, int, const float *, int64_t, int64_t, float *, float *,
                        int64_t, void *, int64_t, int64_t, int64_t, int64_t);

}  // namespace

#ifdef TEXTVAE_X86_KERNELS
extern "C" void textvae_lstm_cell_rows_AVX2(const void *, int, const float *, int64_t, int64_t,
                                            float *, float *, int64_t, void *, int64_t, int64_t,
                                            int64_t, int64_t);
extern "C" void textvae_lstm_cell_rows_AVX512(const void *, int, const float *, int64_t,
                                              int64_t, float *, float *, int64_t, void *,
                                              int64_t, int64_t, int64_t, int64_t);
#endif

namespace {

CellFn cell_fn() {
#ifdef TEXTVAE_X86_KERNELS
  static const CellFn fn = textvae_dispatch::pick<CellFn>(textvae_lstm_cell_rows_AVX2,
                                                          textvae_lstm_cell_rows_AVX512);
  return fn;
#else
  return nullptr;
#endif
}

void check_cpu(const at::Tensor &t, const char *name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

// Hidden states [N, T, H] float32; see textvae_lstm_shared_inputs.
at::Tensor run(const at::Tensor &inputs, const at::Tensor &w, const at::Tensor &h0,
               const at::Tensor &z, const at::Tensor &c0) {
  const CellFn fn = cell_fn();
  TORCH_CHECK(fn != nullptr, "no LSTM cell kernel for this CPU");
  for (auto [t, name] : {std::pair{&inputs, "inputs"}, {&w, "w"}, {&h0, "h0"}, {&z, "z"},
                         {&c0, "c0"}}) {
    check_cpu(*t, name);
  }
  TORCH_CHECK(inputs.dim() == 3 && inputs.scalar_type() == at::kFloat,
              "inputs must be float32 [B, T, 4H], got ", inputs.sizes());
  TORCH_CHECK(h0.dim() == 2 && z.dim() == 2 && c0.sizes() == h0.sizes() &&
                  z.size(0) == h0.size(0),
              "h0 and c0 must be [N, H] and z [N, Z], got ", h0.sizes(), ", ", c0.sizes(),
              " and ", z.sizes());
  const int64_t b = inputs.size(0), steps = inputs.size(1), n = h0.size(0);
  const int64_t hidden = h0.size(1), zdim = z.size(1);
  TORCH_CHECK(inputs.size(2) == 4 * hidden, "inputs must have 4H = ", 4 * hidden,
              " columns, got ", inputs.size(2));
  TORCH_CHECK(b > 0 && n % b == 0, "the ", n, " rows must be a multiple of the ", b,
              " input sequences");
  const at::ScalarType kind = w.scalar_type();
  TORCH_CHECK(kind == at::kFloat || kind == at::kBFloat16, "w must be float32 or bfloat16");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == 4 * hidden && w.size(1) == hidden + zdim,
              "w must be [4H, H + Z] = [", 4 * hidden, ", ", hidden + zdim, "], got ",
              w.sizes());
  const int64_t share = n / b;
  const at::Tensor x = inputs.contiguous();
  // The product's right operand row-major: oneDNN's bfloat16 product repacks a transposed
  // one on every call (src/model.rs, `column_major`).
  const at::Tensor wt = w.t().contiguous();  // [H + Z, 4H]
  at::Tensor hz = at::empty({n, hidden + zdim}, w.options());  // [h; z], h rewritten each step
  hz.narrow(1, 0, hidden).copy_(h0);
  hz.narrow(1, hidden, zdim).copy_(z);
  at::Tensor c = at::empty({n, hidden}, x.options());  // [N, H], updated in place
  c.copy_(c0);
  at::Tensor out = at::empty({n, steps, hidden}, x.options());
  at::Tensor gates = at::empty({n, 4 * hidden}, w.options());
  const int bf16 = kind == at::kBFloat16 ? 1 : 0;
  float *c_data = c.mutable_data_ptr<float>();
  void *hz_data = hz.data_ptr();
  for (int64_t t = 0; t < steps; ++t) {
    at::mm_out(gates, hz, wt);  // [N, 4H]: the recurrent and z's shares
    const void *g = gates.const_data_ptr();
    const float *in = x.const_data_ptr<float>() + t * 4 * hidden;
    float *out_t = out.mutable_data_ptr<float>() + t * hidden;
    // The rows are independent within a step; hz's h columns are rewritten only after the
    // product that read them.
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      fn(g, bf16, in, share, steps * 4 * hidden, c_data, out_t, steps * hidden, hz_data,
         hidden + zdim, begin, end, hidden);
    });
  }
  return out;
}

}  // namespace

// *out = the hidden states [N, T, H] float32 of a one-layer LSTM (PyTorch's gate order i, f, g,
// o) whose gate pre-activations at step t for row r are inputs[r / S, t] + [h_{t-1}; z_r] wᵀ,
// with S = N / B: `inputs` [B, T, 4H] float32 (the input sequence's share with both biases),
// `w` [4H, H + Z] (the recurrent weights beside z's columns of the input weights; float32 or
// bfloat16, the product's format), `h0` and `c0` [N, H], `z` [N, Z]; all on the CPU, no gradient.
// Returns null, or an error message to be released with textvae_free_message.
extern "C" char *textvae_lstm_shared_inputs(const at::Tensor *inputs, const at::Tensor *w,
                                            const at::Tensor *h0, const at::Tensor *z,
                                            const at::Tensor *c0, at::Tensor **out) {
  try {
    at::NoGradGuard no_grad;
    *out = new at::Tensor(run(*inputs, *w, *h0, *z, *c0));
    return nullptr;
  } catch (const std::exception &e) {
    return textvae_copy_message(e.what());
  }
}
