// The output layer's token NLL in one pass over the logits (src/native.rs): for each row r of
// logits [R, V] (float32 or bfloat16) with the bias [V] and the target ids [R],
// nll[r] = logsumexp(logits[r] + bias) - (logits[r, y_r] + bias[y_r]), computed in float32.
// libtorch takes a bias pass, a bfloat16-to-float32 copy, a log-softmax that writes [R, V] and a
// gather for the same figure, and in training as many passes again backwards (the gather's
// scatter, the log-softmax's and the copy's gradients); with the matrix product in bfloat16 on a
// CPU with AMX those passes over [R, V] took twice as long as the product itself.
//
// Two entry points: `textvae_token_nll` scores (no gradient), and `textvae_token_nll_grad` is an
// autograd function of the hidden states, the weights and the bias whose forward pass leaves
// softmax - onehot in the logits' own buffer, so its backward pass is the scaling by the
// incoming gradient and the two matrix products.
//
// The row loop (src/token_nll_kernel.cpp) is built for AVX2 and AVX512 and picked by the
// instruction set libtorch itself dispatches to on this CPU (src/kernel_dispatch.h); elsewhere
// `textvae_kernels_available` says no and the caller takes libtorch's ops.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <exception>

#include "ffi_message.h"
#include "kernel_dispatch.h"

namespace {

using RowsFn = void (*)(const void *, int, int64_t, const float *, const int64_t *, float *,
                        void *, int64_t, int64_t, int64_t);

}  // namespace

#ifdef TEXTVAE_X86_KERNELS
extern "C" void textvae_token_nll_rows_AVX2(const void *, int, int64_t, const float *,
                                            const int64_t *, float *, void *, int64_t, int64_t,
                                            int64_t);
extern "C" void textvae_token_nll_rows_AVX512(const void *, int, int64_t, const float *,
                                              const int64_t *, float *, void *, int64_t, int64_t,
                                              int64_t);
#endif

namespace {

RowsFn rows_fn() {
#ifdef TEXTVAE_X86_KERNELS
  static const RowsFn fn =
      textvae_dispatch::pick<RowsFn>(textvae_token_nll_rows_AVX2, textvae_token_nll_rows_AVX512);
  return fn;
#else
  return nullptr;
#endif
}

// The NLL of each row of `logits` [R, V] with `bias` [V] and `targets` [R]: [R] float32. With
// `grad_in_place`, `logits` (then contiguous, and not needed afterwards) is overwritten with
// softmax - onehot.
at::Tensor run_rows(const at::Tensor &logits, const at::Tensor &bias, const at::Tensor &targets,
                    bool grad_in_place) {
  const RowsFn fn = rows_fn();
  TORCH_CHECK(fn != nullptr, "no token NLL kernel for this CPU");
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(),
              "logits must be [R, V] on the CPU, got ", logits.sizes());
  const at::ScalarType kind = logits.scalar_type();
  TORCH_CHECK(kind == at::kFloat || kind == at::kBFloat16,
              "logits must be float32 or bfloat16, got ", kind);
  TORCH_CHECK(!grad_in_place || logits.is_contiguous(), "logits to overwrite must be contiguous");
  const at::Tensor x = logits.stride(1) == 1 ? logits : logits.contiguous();
  const int64_t rows = x.size(0), vocab = x.size(1);
  const at::Tensor b = bias.contiguous();
  const at::Tensor y = targets.contiguous();
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == vocab &&
                  b.device().is_cpu(),
              "bias must be float32 [", vocab, "] on the CPU");
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == rows &&
                  y.device().is_cpu(),
              "targets must be int64 [", rows, "] on the CPU");
  const int64_t *ids = y.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(ids[r] >= 0 && ids[r] < vocab, "target id ", ids[r], " at row ", r,
                " is outside the vocabulary of ", vocab);
  }
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kFloat));
  const void *data = x.const_data_ptr();
  void *grad = grad_in_place ? x.data_ptr() : nullptr;
  const float *bias_data = b.const_data_ptr<float>();
  float *out_data = out.mutable_data_ptr<float>();
  const int bf16 = kind == at::kBFloat16 ? 1 : 0;
  // A few rows per task: each row is already V elements of work.
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    fn(data, bf16, x.stride(0), bias_data, ids, out_data, grad, begin, end, vocab);
  });
  return out;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// nll [R] of hidden states h [R, H] through weights w [V, H] (h and w in one number format, the
// product's) and bias [V] (float32) at targets [R].
struct TokenNll : public torch::autograd::Function<TokenNll> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &h, const at::Tensor &w,
                            const at::Tensor &bias, const at::Tensor &targets) {
    at::Tensor g = at::matmul(h, w.t());  // [R, V] logits, then softmax - onehot
    at::Tensor nll = run_rows(g, bias, targets, /*grad_in_place=*/true);
    ctx->save_for_backward({h, w, g});
    return nll;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &w = saved[1];
    // d loss / d logits is diag(s) g, g = softmax - onehot and s [R] the gradient each row's
    // NLL receives. The scaling goes onto the [R, H] factors and the bias's product with s, not
    // onto g: a pass over [R, V] fewer (f32, [2048, 10000]: scaling 6.3 ms and column sum 6.4
    // ms, against 5.7 ms for the matrix-vector product).
    const at::Tensor &g = saved[2];                       // [R, V]
    const at::Tensor s = grads[0].unsqueeze(1);           // [R, 1] float32
    at::Tensor grad_h = at::matmul(g, w).mul(s).to(h.scalar_type());      // [R, H]
    at::Tensor grad_w = at::matmul(g.t(), h.mul(s).to(g.scalar_type()));  // [V, H]
    // g's format in the product, then widened: a float32 result of a bfloat16 reduction takes
    // libtorch's slow path (45 ms against 7 for [2048, 10000]).
    at::Tensor grad_b = at::mv(g.t(), grads[0].to(g.scalar_type())).to(at::kFloat);  // [V]
    return {grad_h, grad_w, grad_b, at::Tensor()};
  }
};

}  // namespace

// Whether this build has row loops for this CPU (the token NLL's and the LSTM cell's): 1 or 0.
extern "C" int textvae_kernels_available() { return textvae_dispatch::capability() != 0 ? 1 : 0; }

// Whether autograd records operations on this thread now (not under no-grad): 1 or 0.
extern "C" int textvae_grad_mode_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// *out = the token NLL [R] float32 of `logits` [R, V] (float32 or bfloat16), `bias` [V] float32
// and `targets` [R] int64, all on the CPU; not differentiable. Returns null, or an error message
// to be released with textvae_free_message.
extern "C" char *textvae_token_nll(const at::Tensor *logits, const at::Tensor *bias,
                                   const at::Tensor *targets, at::Tensor **out) {
  try {
    at::NoGradGuard no_grad;
    *out = new at::Tensor(run_rows(*logits, *bias, *targets, /*grad_in_place=*/false));
    return nullptr;
  } catch (const std::exception &e) {
    return textvae_copy_message(e.what());
  }
}

// *out = the token NLL [R] of hidden states `h` [R, H] through the output layer `w` [V, H] (h
// and w both float32 or both bfloat16) and `bias` [V] float32 at `targets` [R], differentiable
// with respect to h, w and bias. Returns null, or an error message as above.
extern "C" char *textvae_token_nll_grad(const at::Tensor *h, const at::Tensor *w,
                                        const at::Tensor *bias, const at::Tensor *targets,
                                        at::Tensor **out) {
  try {
    TORCH_CHECK(h->dim() == 2 && w->dim() == 2 && h->size(1) == w->size(1),
                "h [R, H] and w [V, H] must share H, got ", h->sizes(), " and ", w->sizes());
    TORCH_CHECK(h->scalar_type() == w->scalar_type(), "h and w must share a number format");
    *out = new at::Tensor(TokenNll::apply(*h, *w, *bias, *targets));
    return nullptr;
  } catch (const std::exception &e) {
    return textvae_copy_message(e.what());
  }
}
