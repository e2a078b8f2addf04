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

// 2^f for f in [-1/2, 1/2], to about 2e-7 relative: Cephes' exp2f polynomial.
inline fVec exp2_fraction(const fVec &f) {
  const fVec p0(1.535336188319500e-4f), p1(1.339887440266574e-3f), p2(9.618437357674640e-3f),
      p3(5.550332471162809e-2f), p4(2.402264791363012e-1f), p5(6.931472028550421e-1f);
  using at::vec::fmadd;
  const fVec p = fmadd(fmadd(fmadd(fmadd(fmadd(p0, f, p1), f, p2), f, p3), f, p4), f, p5);
  return fmadd(p, f, fVec(1.0f));
}

// e^x in about half the instructions of ATen's exp_u20 (10 against 19; exp_u20 took most of
// the token NLL's time): x log2(e) split into the nearest integer n and a fraction f, 2^f times
// 2^n. The relative error grows with |x| (the rounding of x log2(e)): measured, at most 5.2e-7
// for |x| < 10 and 3.8e-6 over float's range. NaN stays NaN; -inf and anything under float's
// range give 0 (AVX2: 1e-38 at most), +inf and anything over +inf (AVX2: 2.2e38).
inline fVec exp_fast(const fVec &x) {
  const fVec log2e(1.44269504088896341f);
#if defined(CPU_CAPABILITY_AVX512)
  // max(lo, x) returns x when x is NaN (the second operand wins on NaN).
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-160.0f), x), log2e);
  const fVec n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const fVec f = fVec(t) - n;
  // scalef computes p 2^n with IEEE underflow to 0 and overflow to inf.
  return _mm512_scalef_ps(exp2_fraction(f), n);
#else
  // Clamped so that 2^n stays a normal float (e^88.3 = 2.2e38 stands for anything larger);
  // NaN passes through both (the second operand wins on NaN).
  const __m256 c =
      _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
  const __m256 t = _mm256_mul_ps(c, log2e);
  const fVec n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const fVec f = fVec(t) - n;
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);  // 2^n
  return exp2_fraction(f) * fVec(_mm256_castsi256_ps(bits));
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace textvae_vec
