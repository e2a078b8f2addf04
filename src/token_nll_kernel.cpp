// The row loop of src/token_nll.cpp, built once per x86 instruction set libtorch dispatches its
// own CPU kernels to (build.rs: -DCPU_CAPABILITY=AVX2 or AVX512 with that set's compiler flags,
// as ATen builds its kernels), on ATen's vector types and kernel_vec.h's exponential. Only this
// file is compiled for the wider set, and only its one C function is called from outside, after
// src/token_nll.cpp has asked libtorch which set this CPU runs.

#include "kernel_vec.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#define TEXTVAE_ROWS TEXTVAE_CAT(textvae_token_nll_rows_, CPU_CAPABILITY)

namespace {

using namespace textvae_vec;

// logits + bias at one entry v, for the tail a chunk does not cover.
template <typename T> inline float biased(const T *x, const float *bias, int64_t v) {
  return static_cast<float>(x[v]) + bias[v];
}

// logits + bias over one chunk starting at v.
template <typename T> inline Pair load_biased(const T *x, const float *bias, int64_t v) {
  Pair p = load(x + v);
  return {p.lo + fVec::loadu(bias + v), p.hi + fVec::loadu(bias + v + fVec::size())};
}

// ATen's lane reductions (shuffles on AVX2 and AVX512).
inline float horizontal_max(const fVec &v) {
  return at::vec::vec_reduce_all(
      [](const fVec &a, const fVec &b) { return at::vec::maximum(a, b); }, v);
}

inline float horizontal_sum(const fVec &v) {
  return at::vec::vec_reduce_all([](const fVec &a, const fVec &b) { return a + b; }, v);
}

// A row's largest entry of logits + bias and its sum of exp(logits + bias - shift), in one pass.
template <typename T>
std::pair<float, float> max_and_sum(const T *x, const float *bias, int64_t vocab, float shift) {
  const int64_t body = vocab - vocab % kChunk;
  const fVec vshift(shift);
  fVec vmax(-std::numeric_limits<float>::infinity());
  fVec vsum(0.0f);
  for (int64_t v = 0; v < body; v += kChunk) {
    Pair p = load_biased(x, bias, v);
    // maximum() propagates NaN, so a NaN logit makes the row's maximum NaN.
    vmax = at::vec::maximum(vmax, at::vec::maximum(p.lo, p.hi));
    vsum = vsum + exp_fast(p.lo - vshift) + exp_fast(p.hi - vshift);
  }
  float m = horizontal_max(vmax);
  float sum = horizontal_sum(vsum);
  for (int64_t v = body; v < vocab; ++v) {
    const float e = biased(x, bias, v);
    m = std::isnan(e) ? e : std::max(m, e);
    sum += std::exp(e - shift);
  }
  return {m, sum};
}

// How far above the shift a row's maximum may lie for its sum of exponentials to be kept:
// e^64 times a vocabulary of a million is still far inside float's range.
constexpr float kMaxGap = 64.0f;

// -log softmax(x + bias)[y] of one row of `vocab` entries. Its exponentials are taken against the
// target's own logit rather than the row's maximum, so one pass computes both (the maximum is
// only needed to check the shift): NLL = log sum_v exp(x_v - x_y), where the sum is near 1 for a
// likely target. A target more than 64 nats under the maximum (an overflow risk) takes a second
// pass against the maximum, as does a NaN. With `grad`, a last pass writes the NLL's gradient
// with respect to the logits there, softmax(x + bias) - onehot(y) (`grad` may be `x` itself: each
// chunk is read before it is written).
template <typename T>
float row_nll(const T *x, const float *bias, int64_t y, int64_t vocab, T *grad) {
  if (y < 0 || y >= vocab) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float target = biased(x, bias, y);
  float shift = target;
  auto [m, sum] = max_and_sum(x, bias, vocab, shift);
  if (!(m - shift <= kMaxGap)) {
    shift = m;
    sum = max_and_sum(x, bias, vocab, shift).second;
  }
  // The gap to the shift first: adding the shift's magnitude before subtracting would cost its
  // rounding.
  const float nll = (shift - target) + std::log(sum);
  if (grad != nullptr) {
    // The exponentials again rather than kept from the pass above: kept in a bfloat16 row they
    // would be rounded twice (before and after the division).
    const int64_t body = vocab - vocab % kChunk;
    const float inv = 1.0f / sum;
    const fVec vinv(inv), vshift(shift);
    for (int64_t v = 0; v < body; v += kChunk) {
      Pair p = load_biased(x, bias, v);
      store(grad + v, Pair{exp_fast(p.lo - vshift) * vinv, exp_fast(p.hi - vshift) * vinv});
    }
    for (int64_t v = body; v < vocab; ++v) {
      grad[v] = static_cast<T>(std::exp(biased(x, bias, v) - shift) * inv);
    }
    grad[y] = static_cast<T>(static_cast<float>(grad[y]) - 1.0f);
  }
  return nll;
}

template <typename T>
void rows(const T *logits, int64_t stride, const float *bias, const int64_t *targets, float *out,
          T *grad, int64_t begin, int64_t end, int64_t vocab) {
  for (int64_t r = begin; r < end; ++r) {
    T *grad_row = grad != nullptr ? grad + r * stride : nullptr;
    out[r] = row_nll(logits + r * stride, bias, targets[r], vocab, grad_row);
  }
}

}  // namespace

// Rows [begin, end) of `logits` (float32, or bfloat16 where `bf16` is set; row r starts at
// r * stride elements): out[r] = -log softmax(logits[r] + bias)[targets[r]], NaN for a target
// outside [0, vocab). Where `grad` is not null (the same format and strides as `logits`, and
// possibly `logits` itself), each row's gradient softmax - onehot is written there.
extern "C" void TEXTVAE_ROWS(const void *logits, int bf16, int64_t stride, const float *bias,
                             const int64_t *targets, float *out, void *grad, int64_t begin,
                             int64_t end, int64_t vocab) {
  if (bf16 != 0) {
    rows(static_cast<const c10::BFloat16 *>(logits), stride, bias, targets, out,
         static_cast<c10::BFloat16 *>(grad), begin, end, vocab);
  } else {
    rows(static_cast<const float *>(logits), stride, bias, targets, out,
         static_cast<float *>(grad), begin, end, vocab);
  }
}
