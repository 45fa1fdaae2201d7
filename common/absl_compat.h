// std::string_view with Debian's abseil. Debian builds abseil (20220623) with
// ABSL_OPTION_USE_STD_STRING_VIEW 0, so absl::string_view is abseil's own class and does not
// convert from std::string_view: a std::string_view cannot go to absl::StrCat, absl::Cord,
// absl::CHexEscape or absl::SimpleAtoi as it is. The code above base/ passes std::string_view
// around (ObjectStore keys, URIs, messages) and crosses into abseil through these helpers,
// which also compile unchanged against an abseil that aliases std::string_view.
//
// Thread-safety: pure functions.
#ifndef QFORGE_COMMON_ABSL_COMPAT_H_
#define QFORGE_COMMON_ABSL_COMPAT_H_

#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace qforge {

// An absl::string_view of the same bytes (no copy: valid while `s`'s bytes are).
inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// Every other absl::StrCat argument (numbers, std::string, C strings, absl::string_view) as it
// is, so Sv can wrap any argument of a StrCat.
template <typename T>
const T& Sv(const T& v) {
  return v;
}

// absl::StrCat of arguments that may include std::string_view.
template <typename... Args>
std::string Cat(const Args&... args) {
  return absl::StrCat(Sv(args)...);
}

// Whether `s` begins with `prefix` (absl::StartsWith for std::string_view).
inline bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

}  // namespace qforge

#endif  // QFORGE_COMMON_ABSL_COMPAT_H_
