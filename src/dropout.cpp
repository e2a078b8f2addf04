// Dropout's noise on the CPU (src/native.rs): a tensor of 0 (with probability p) and 1 / (1 - p),
// what dropout multiplies its input by. libtorch draws it with bernoulli_ from one Mersenne
// twister on one thread, so with two cores one waits while the other fills the masks of the
// decoder's embedding and output dropouts: ~4% of a PTB training step.
//
// Here the noise is cut into blocks of kBlock entries, each drawn from its own subsequence of a
// Philox generator (Salmon et al. 2011, the counter-based generator libtorch uses on GPUs) whose
// seed is one draw from libtorch's default CPU generator: the blocks fill in parallel, and the
// noise follows the seed (`tch::manual_seed`), not the number of threads.

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>

#include "ffi_message.h"

namespace {

// Entries per Philox subsequence: enough to amortise starting one, few enough for two threads
// to share a [32, 25, 256] activation.
constexpr int64_t kBlock = 1 << 14;

uint64_t next_seed() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
}

template <typename T>
void fill_noise(T *out, int64_t n, double p, uint64_t seed) {
  const double keep = 1.0 - p;
  // A 32-bit draw u keeps its entry when u < keep * 2^32.
  const uint64_t threshold = static_cast<uint64_t>(keep * 4294967296.0);
  const T kept = static_cast<T>(1.0 / keep);
  const T dropped = static_cast<T>(0.0);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      at::Philox4_32 draw(seed, static_cast<uint64_t>(b), 0);
      const int64_t end = std::min(n, (b + 1) * kBlock);
      for (int64_t i = b * kBlock; i < end; ++i) {
        out[i] = static_cast<uint64_t>(draw()) < threshold ? kept : dropped;
      }
    }
  });
}

}  // namespace

// *out = dropout noise with probability `p` (in [0, 1)) of the shape, number format and (CPU)
// device of `like`, whose values are not read, from the Philox seed `*seed`, or with `seed` null
// from a seed drawn from libtorch's default CPU generator. Returns null, or an error message to
// be released with textvae_free_message.
extern "C" char *textvae_dropout_noise(const at::Tensor *like, double p, const uint64_t *seed,
                                       at::Tensor **out) {
  try {
    TORCH_CHECK(like->device().is_cpu(), "dropout noise is drawn on the CPU, not ",
                like->device());
    TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
    at::Tensor noise = at::empty(like->sizes(), like->options());
    const uint64_t philox_seed = seed != nullptr ? *seed : next_seed();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, noise.scalar_type(),
                                    "textvae_dropout_noise", [&] {
                                      fill_noise(noise.mutable_data_ptr<scalar_t>(),
                                                 noise.numel(), p, philox_seed);
                                    });
    *out = new at::Tensor(std::move(noise));
    return nullptr;
  } catch (const std::exception &e) {
    return textvae_copy_message(e.what());
  }
}
