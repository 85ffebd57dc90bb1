// VLLM_CHECK(cond, parts...): TORCH_CHECK without iostreams.
//
// TORCH_CHECK builds its message with std::ostringstream, whose insertion code
// is instantiated in this library. When the extension's compiler is newer than
// the C++ runtime the process loads (torch 2.11's CUDA image here: g++ from
// /opt/gcc), that code crashes inside libstdc++'s locale facets instead of
// raising. VLLM_CHECK assembles the message with std::string and
// std::to_string only and hands TORCH_CHECK one finished string, which it
// passes through untouched. The message is built only when the check fails.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace vllm::detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, double v) { s += std::to_string(v); }
inline void append(std::string& s, c10::ScalarType v) {
  s += c10::toString(v);
}
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}

template <typename... Args>
std::string concat(const Args&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace vllm::detail

#define VLLM_CHECK(cond, ...)                                   \
  do {                                                          \
    if (C10_UNLIKELY(!(cond))) {                                \
      TORCH_CHECK(false, ::vllm::detail::concat(__VA_ARGS__));  \
    }                                                           \
  } while (0)
