// Incremental SHA-256 (OpenSSL EVP) for manifests and task checksums.
// Thread-safety: a Sha256 object is not thread-safe; distinct objects are independent.
#ifndef QFORGE_COMMON_SHA256_H_
#define QFORGE_COMMON_SHA256_H_

#include <memory>
#include <string>
#include <string_view>

namespace qforge {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(std::string_view data);
  // Lowercase hex digest (64 characters). The object must not be used afterwards.
  std::string HexDigest();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

std::string Sha256Hex(std::string_view data);

}  // namespace qforge

#endif  // QFORGE_COMMON_SHA256_H_
