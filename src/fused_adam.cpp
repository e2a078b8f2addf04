// libtorch's fused AdamW kernel (`at::_fused_adamw_`, what `torch.optim.AdamW(fused=True)` runs;
// with no weight decay it is `torch.optim.Adam`'s update),
// which tch does not wrap, behind one C function over tch's tensor handles (each a pointer to an
// at::Tensor, libtch's `tensor`). Used by src/optim.rs; built by build.rs against the same
// libtorch headers as torch-sys.
//
// One pass over each parameter instead of seven, and the two scalars that decide the step — the
// gradient's scale (clipping) and whether the step is skipped (a non-finite loss or gradient) —
// are tensors read by the kernel on the device, so the host never waits for them.

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstddef>
#include <cstdlib>
#include <exception>
#include <vector>

#include "ffi_message.h"

namespace {

std::vector<at::Tensor> gather(at::Tensor *const *ts, std::size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    out.push_back(*ts[i]);
  }
  return out;
}

}  // namespace

// Adam with decoupled weight decay `weight_decay` (torch.optim.AdamW's update, no amsgrad; 0 is
// torch.optim.Adam's) over n parameters in place.
// `step` is one float tensor of shape [1] shared by all parameters, already incremented for this
// step; gradients are divided by `grad_scale` ([1]) first; nothing changes where `found_inf`
// ([1]) is 1. Returns null, or an error message to be released with textvae_free_message.
extern "C" char *textvae_fused_adam(at::Tensor *const *params, at::Tensor *const *grads,
                                    at::Tensor *const *exp_avgs,
                                    at::Tensor *const *exp_avg_sqs, std::size_t n,
                                    const at::Tensor *step, double lr, double beta1,
                                    double beta2, double eps, double weight_decay,
                                    const at::Tensor *grad_scale,
                                    const at::Tensor *found_inf) {
  try {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> g = gather(grads, n);
    // The CPU kernel walks a gradient's memory in order, whatever its strides.
    for (at::Tensor &t : g) {
      t = t.contiguous();
    }
    std::vector<at::Tensor> steps(n, *step);
    at::_fused_adamw_(gather(params, n), g, gather(exp_avgs, n), gather(exp_avg_sqs, n), {},
                      steps, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                      /*maximize=*/false, *grad_scale, *found_inf);
    return nullptr;
  } catch (const std::exception &e) {
    return textvae_copy_message(e.what());
  }
}

extern "C" void textvae_free_message(char *msg) { std::free(msg); }
