// Error messages handed from the C++ side to Rust: a malloc'd copy of an exception's text, which
// the Rust side releases with `textvae_free_message` (src/fused_adam.cpp).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>

inline char *textvae_copy_message(const char *msg) {
  std::size_t len = std::strlen(msg) + 1;
  char *out = static_cast<char *>(std::malloc(len));
  if (out != nullptr) {
    std::memcpy(out, msg, len);
  }
  return out;
}
