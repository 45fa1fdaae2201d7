// S3 settings: the one place that decides which endpoint, region and credentials an `s3://`
// store uses, for every process (coordinator, worker, qforge-quantize, tools).
//
// Precedence, highest first:
//   1. the store URI's own parameters (`s3://bucket/prefix?endpoint=...&region=...`, applied
//      by S3Store::Open over what this resolves; URIs never carry credentials);
//   2. the process's flags (S3Settings: --s3-endpoint, --s3-region);
//   3. the credentials file named by --s3-credentials-file, in INI form as the AWS CLI writes
//      it: a `[profile]` section (--s3-profile, else AWS_PROFILE, else `default`; `[profile
//      name]` is accepted too) with aws_access_key_id, aws_secret_access_key,
//      aws_session_token, region and endpoint_url;
//   4. the environment: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION /
//      AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN;
//   5. the file named by AWS_SHARED_CREDENTIALS_FILE (when there is no flag), as in 3 (the
//      AWS SDKs' order: environment variables before the shared file);
//   6. S3Options' defaults (AWS, us-east-1).
// Credentials are taken as a whole from the first source with a key id: a key id from one
// place is never paired with a secret from another. Secrets are never accepted on the command
// line and never appear in messages.
//
// Thread-safety: functions are reentrant (they read the environment and the file).
#ifndef QFORGE_COMMON_S3_SETTINGS_H_
#define QFORGE_COMMON_S3_SETTINGS_H_

#include <string>

#include "absl/status/statusor.h"
#include "common/s3_client.h"

namespace qforge {

// What a process was told by its flags; an empty field says nothing.
struct S3Settings {
  std::string endpoint;          // --s3-endpoint: http(s)://host[:port] of an S3-compatible service
  std::string region;            // --s3-region
  std::string credentials_file;  // --s3-credentials-file: INI file (see above)
  std::string profile;           // --s3-profile: its section (default AWS_PROFILE, then "default")
};

// Resolves the options of `s3://` stores (precedence above). INVALID_ARGUMENT naming the file
// and profile for an unreadable credentials file, a missing profile (when the file or profile
// was asked for explicitly), a key id without a secret (or the reverse) or a malformed line;
// S3Client::Create later refuses a malformed endpoint or region.
absl::StatusOr<S3Options> ResolveS3Options(const S3Settings& settings, S3Options base = {});

}  // namespace qforge

#endif  // QFORGE_COMMON_S3_SETTINGS_H_
