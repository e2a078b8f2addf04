// The elementwise half of an LSTM step for src/lstm.cpp, built once per x86 instruction set
// libtorch dispatches its own CPU kernels to (build.rs, as src/token_nll_kernel.cpp): from the
// step's gate pre-activations it updates the cell state and writes the hidden state, in one pass
// where libtorch's ops would take a dozen over [rows, 4H].

#include "kernel_vec.h"

#include <cmath>
#include <cstdint>

#define TEXTVAE_CELL TEXTVAE_CAT(textvae_lstm_cell_rows_, CPU_CAPABILITY)

namespace {

using namespace textvae_vec;

inline fVec sigmoid(const fVec &x) { return fVec(1.0f) / (fVec(1.0f) + x.neg().exp_u20()); }

// tanh through the same exponential: Sleef's tanh (ATen's) took 7% of an importance-weighted
// evaluation's cycles, more than the rest of the cell. Near 0 the subtraction leaves an absolute
// error of ~1e-7, far below what a bfloat16 hidden state keeps.
inline fVec tanh(const fVec &x) { return fVec(2.0f) * sigmoid(x * fVec(2.0f)) - fVec(1.0f); }

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

inline Pair add(const Pair &a, const float *b) {
  return {a.lo + fVec::loadu(b), a.hi + fVec::loadu(b + fVec::size())};
}

// One half-chunk (one float vector) of the cell: i, f, g, o pre-activations and the old cell
// state -> the new cell state (into `c`), the hidden state returned.
inline fVec cell(const fVec &i, const fVec &f, const fVec &g, const fVec &o, fVec &c) {
  c = sigmoid(f) * c + sigmoid(i) * tanh(g);
  return sigmoid(o) * tanh(c);
}

// One row: `gates` [4H] (PyTorch's order i, f, g, o) plus `inputs` [4H] (the input's and the
// biases' share, float32); `c` [H] updated in place; the hidden state [H] to `out` (float32)
// and `h_next` (the gates' format, the next step's product reads it).
template <typename T>
void row(const T *gates, const float *inputs, float *c, float *out, T *h_next, int64_t hidden) {
  const int64_t body = hidden - hidden % kChunk;
  const int64_t n = fVec::size();
  for (int64_t j = 0; j < body; j += kChunk) {
    const Pair i = add(load(gates + j), inputs + j);
    const Pair f = add(load(gates + hidden + j), inputs + hidden + j);
    const Pair g = add(load(gates + 2 * hidden + j), inputs + 2 * hidden + j);
    const Pair o = add(load(gates + 3 * hidden + j), inputs + 3 * hidden + j);
    fVec c_lo = fVec::loadu(c + j), c_hi = fVec::loadu(c + j + n);
    const Pair h{cell(i.lo, f.lo, g.lo, o.lo, c_lo), cell(i.hi, f.hi, g.hi, o.hi, c_hi)};
    c_lo.store(c + j);
    c_hi.store(c + j + n);
    store(out + j, h);
    store(h_next + j, h);
  }
  for (int64_t j = body; j < hidden; ++j) {
    auto pre = [&](int64_t k) {
      return static_cast<float>(gates[k * hidden + j]) + inputs[k * hidden + j];
    };
    c[j] = sigmoid(pre(1)) * c[j] + sigmoid(pre(0)) * std::tanh(pre(2));
    const float h = sigmoid(pre(3)) * std::tanh(c[j]);
    out[j] = h;
    h_next[j] = static_cast<T>(h);
  }
}

template <typename T>
void rows(const T *gates, const float *inputs, int64_t share, int64_t inputs_stride, float *c,
          float *out, int64_t out_stride, T *h_next, int64_t h_next_stride, int64_t begin,
          int64_t end, int64_t hidden) {
  for (int64_t r = begin; r < end; ++r) {
    row(gates + r * 4 * hidden, inputs + (r / share) * inputs_stride, c + r * hidden,
        out + r * out_stride, h_next + r * h_next_stride, hidden);
  }
}

}  // namespace

// Rows [begin, end) of one LSTM step: row r's gate pre-activations are gates[r] [4H] (float32,
// or bfloat16 where `bf16` is set; contiguous rows) plus inputs[r / share] [4H] (float32, rows
// `inputs_stride` apart: `share` consecutive rows read one row of inputs); c [rows, H] float32,
// contiguous, is updated; the hidden state goes to out (float32, rows `out_stride` apart) and
// h_next (the gates' format, rows `h_next_stride` apart).
extern "C" void TEXTVAE_CELL(const void *gates, int bf16, const float *inputs, int64_t share,
                             int64_t inputs_stride, float *c, float *out, int64_t out_stride,
                             void *h_next, int64_t h_next_stride, int64_t begin, int64_t end,
                             int64_t hidden) {
  if (bf16 != 0) {
    rows(static_cast<const c10::BFloat16 *>(gates), inputs, share, inputs_stride, c, out,
         out_stride, static_cast<c10::BFloat16 *>(h_next), h_next_stride, begin, end, hidden);
  } else {
    rows(static_cast<const float *>(gates), inputs, share, inputs_stride, c, out, out_stride,
         static_cast<float *>(h_next), h_next_stride, begin, end, hidden);
  }
}
