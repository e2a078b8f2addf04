// Which build of the row loops (src/token_nll_kernel.cpp, src/lstm_kernel.cpp; build.rs compiles
// them once per x86 instruction set) runs on this CPU: the instruction set libtorch itself
// dispatches its CPU kernels to (`at::get_cpu_capability`, which honours ATEN_CPU_CAPABILITY).
#pragma once

#include <ATen/Version.h>

#include <string>

namespace textvae_dispatch {

// 2 for AVX512, 1 for AVX2, 0 where this build has no row loops for the CPU.
inline int capability() {
#ifdef TEXTVAE_X86_KERNELS
  static const int level = [] {
    const std::string name = at::get_cpu_capability();
    return name == "AVX512" ? 2 : name == "AVX2" ? 1 : 0;
  }();
  return level;
#else
  return 0;
#endif
}

// The build of one row loop for this CPU, or null.
template <typename Fn> Fn pick(Fn avx2, Fn avx512) {
  switch (capability()) {
  case 2:
    return avx512;
  case 1:
    return avx2;
  default:
    return nullptr;
  }
}

}  // namespace textvae_dispatch
