// JsonErrorWithoutInput: nlohmann::json's exception text with every excerpt of the parsed
// input removed. A parse error's what() ends "...; last read: '<bytes of the input>'" (and
// may continue "; expected ..."); quoting a file's bytes back to a client would disclose a
// file it may not read (issue 18), so errors about untrusted files use this instead.
// Thread-safety: pure function.
#ifndef QFORGE_COMMON_JSON_ERROR_H_
#define QFORGE_COMMON_JSON_ERROR_H_

#include <exception>
#include <string>
#include <string_view>

namespace qforge {

// `e.what()` cut before "; last read:" (the rest, an excerpt of the input and what the
// parser expected, is dropped), e.g. "[json.exception.parse_error.101] parse error at line 1,
// column 2: syntax error while parsing value - invalid literal".
inline std::string JsonErrorWithoutInput(const std::exception& e) {
  std::string_view what = e.what();
  const size_t cut = what.find("; last read:");
  if (cut != std::string_view::npos) what = what.substr(0, cut);
  return std::string(what);
}

}  // namespace qforge

#endif  // QFORGE_COMMON_JSON_ERROR_H_
