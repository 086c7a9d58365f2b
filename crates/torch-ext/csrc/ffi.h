// The C ABI convention shared by every file of this crate: a function returns NULL on success or
// a malloc'ed error message (freed by lm_string_free), so no C++ exception crosses into Rust.
// Tensors travel as `at::Tensor*`, which is what tch's `Tensor::as_ptr` gives (torch-sys keeps
// a heap `torch::Tensor`); a tensor handed back is a `new at::Tensor`, owned by tch from then on.
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include <c10/util/Exception.h>

namespace lm {

inline char* dup(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

template <typename F>
char* guard(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return dup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return dup(e.what());
  } catch (...) {
    return dup("unknown C++ exception");
  }
}

}  // namespace lm
