// What the row loops built once per x86 instruction set (src/token_nll_kernel.cpp,
// src/lstm_kernel.cpp) share: float32 and bfloat16 rows read and written in chunks of two
// float vectors (one bfloat16 vector's worth) on ATen's vector types, and the name each
// build gives its one C function.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

#define TEXTVAE_CAT2(a, b) a##b
#define TEXTVAE_CAT(a, b) TEXTVAE_CAT2(a, b)

#ifndef CPU_CAPABILITY
#error "kernel_vec.h is for the files build.rs compiles once per CPU_CAPABILITY"
#endif

// One namespace per build, as ATen's own vector code has: the same inline function built for
// AVX2 and for AVX512 must not be one symbol the linker keeps a single copy of.
namespace textvae_vec {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;
using fVec = Vectorized<float>;
constexpr int64_t kChunk = 2 * fVec::size();

struct Pair {
  fVec lo, hi;
};

inline Pair load(const float *x) { return {fVec::loadu(x), fVec::loadu(x + fVec::size())}; }

inline Pair load(const c10::BFloat16 *x) {
  auto [lo, hi] = at::vec::convert_to_float<c10::BFloat16>(Vectorized<c10::BFloat16>::loadu(x));
  return {lo, hi};
}

inline void store(float *out, const Pair &p) {
  p.lo.store(out);
  p.hi.store(out + fVec::size());
}

inline void store(c10::BFloat16 *out, const Pair &p) {
  at::vec::convert_from_float<c10::BFloat16>(p.lo, p.hi).store(out);
}

}  // namespace CPU_CAPABILITY
}  // namespace textvae_vec
