// The S3 flags shared by qforge-coordinator and qforge-worker (--s3-endpoint, --s3-region,
// --s3-credentials-file, --s3-profile), resolved by ResolveS3Options (s3_settings.h), which
// says how they combine with store URIs, the credentials file and the environment. Secrets
// have no flag: they come from the environment or the credentials file.
#ifndef QFORGE_COMMON_S3_FLAGS_H_
#define QFORGE_COMMON_S3_FLAGS_H_

#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "common/s3_settings.h"

namespace qforge {

inline void AddS3Flags(CLI::App* app, S3Settings* s) {
  app->add_option("--s3-endpoint", s->endpoint,
                  "S3-compatible endpoint for s3:// URIs, http(s)://host[:port] (path-style "
                  "requests; default $AWS_ENDPOINT_URL, else AWS); a URI's ?endpoint= wins");
  app->add_option("--s3-region", s->region,
                  "S3 region (default $AWS_REGION, else us-east-1); a URI's ?region= wins");
  app->add_option("--s3-credentials-file", s->credentials_file,
                  "AWS-style credentials file (INI: aws_access_key_id, aws_secret_access_key, "
                  "aws_session_token, region, endpoint_url) for s3:// URIs (default "
                  "$AWS_SHARED_CREDENTIALS_FILE; else $AWS_ACCESS_KEY_ID, ...)");
  app->add_option("--s3-profile", s->profile,
                  "section of --s3-credentials-file (default $AWS_PROFILE, else 'default')");
}

// The same flags as arguments, for a child process (local workers): nothing secret.
inline std::vector<std::string> S3FlagArgs(const S3Settings& s) {
  std::vector<std::string> args;
  if (!s.endpoint.empty()) args.push_back("--s3-endpoint=" + s.endpoint);
  if (!s.region.empty()) args.push_back("--s3-region=" + s.region);
  if (!s.credentials_file.empty()) args.push_back("--s3-credentials-file=" + s.credentials_file);
  if (!s.profile.empty()) args.push_back("--s3-profile=" + s.profile);
  return args;
}

}  // namespace qforge

#endif  // QFORGE_COMMON_S3_FLAGS_H_
