#include "common/s3_settings.h"

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/absl_compat.h"

namespace qforge {
namespace {

// One source of settings; empty fields say nothing.
struct Layer {
  std::string endpoint, region, key_id, secret, token;
};

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : std::string();
}

std::string FirstEnv(std::initializer_list<const char*> names) {
  for (const char* n : names) {
    std::string v = Env(n);
    if (!v.empty()) return v;
  }
  return "";
}

Layer EnvLayer() {
  Layer l;
  l.endpoint = FirstEnv({"AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"});
  l.region = FirstEnv({"AWS_REGION", "AWS_DEFAULT_REGION"});
  l.key_id = Env("AWS_ACCESS_KEY_ID");
  l.secret = Env("AWS_SECRET_ACCESS_KEY");
  l.token = Env("AWS_SESSION_TOKEN");
  return l;
}

// The `profile` section of the INI file at `path`. `required`: a missing section is an error
// (the profile was named explicitly); otherwise it yields an empty layer.
absl::StatusOr<Layer> FileLayer(const std::string& path, const std::string& profile,
                                bool required) {
  std::ifstream in(path);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat(
        "S3 credentials file '", path, "' cannot be read; check the path and its permissions"));
  }
  Layer l;
  bool in_section = false, found = false;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    const std::string t(absl::StripAsciiWhitespace(line));
    if (t.empty() || t[0] == '#' || t[0] == ';') continue;
    if (t.front() == '[') {
      if (t.back() != ']') {
        return absl::InvalidArgumentError(absl::StrCat("S3 credentials file '", path, "' line ",
                                                       number, ": a section header must end "
                                                       "with ']'"));
      }
      std::string name(absl::StripAsciiWhitespace(t.substr(1, t.size() - 2)));
      if (StartsWith(name, "profile ")) name = std::string(absl::StripAsciiWhitespace(name.substr(8)));
      in_section = name == profile;
      found = found || in_section;
      continue;
    }
    const size_t eq = t.find('=');
    if (eq == std::string::npos) {
      // The line may hold a secret: never quote it.
      return absl::InvalidArgumentError(absl::StrCat("S3 credentials file '", path, "' line ",
                                                     number, ": expected 'name = value'"));
    }
    if (!in_section) continue;
    const std::string key = absl::AsciiStrToLower(absl::StripAsciiWhitespace(t.substr(0, eq)));
    const std::string value(absl::StripAsciiWhitespace(t.substr(eq + 1)));
    if (key == "aws_access_key_id") l.key_id = value;
    else if (key == "aws_secret_access_key") l.secret = value;
    else if (key == "aws_session_token") l.token = value;
    else if (key == "region") l.region = value;
    else if (key == "endpoint_url") l.endpoint = value;
  }
  if (!found && required) {
    return absl::InvalidArgumentError(absl::StrCat("S3 credentials file '", path,
                                                   "' has no [", profile, "] section"));
  }
  if (l.key_id.empty() != l.secret.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "S3 credentials file '", path, "' profile [", profile, "] has ",
        l.key_id.empty() ? "aws_secret_access_key without aws_access_key_id"
                         : "aws_access_key_id without aws_secret_access_key"));
  }
  return l;
}

}  // namespace

absl::StatusOr<S3Options> ResolveS3Options(const S3Settings& settings, S3Options base) {
  Layer flags;
  flags.endpoint = settings.endpoint;
  flags.region = settings.region;
  std::string profile = settings.profile.empty() ? Env("AWS_PROFILE") : settings.profile;
  const bool named_profile = !profile.empty();
  if (profile.empty()) profile = "default";

  std::vector<Layer> layers = {flags};
  if (!settings.credentials_file.empty()) {
    auto file = FileLayer(settings.credentials_file, profile, /*required=*/true);
    if (!file.ok()) return file.status();
    layers.push_back(*file);
    layers.push_back(EnvLayer());
  } else {
    layers.push_back(EnvLayer());
    if (const std::string shared = Env("AWS_SHARED_CREDENTIALS_FILE"); !shared.empty()) {
      auto file = FileLayer(shared, profile, /*required=*/named_profile);
      if (!file.ok()) return file.status();
      layers.push_back(*file);
    } else if (!settings.profile.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--s3-profile ", settings.profile,
          " needs a credentials file: --s3-credentials-file or AWS_SHARED_CREDENTIALS_FILE"));
    }
  }
  for (const Layer& l : layers) {
    if (!l.endpoint.empty()) {
      base.endpoint = l.endpoint;
      break;
    }
  }
  for (const Layer& l : layers) {
    if (!l.region.empty()) {
      base.region = l.region;
      break;
    }
  }
  for (const Layer& l : layers) {
    if (!l.key_id.empty()) {
      base.access_key_id = l.key_id;
      base.secret_access_key = l.secret;
      base.session_token = l.token;
      break;
    }
  }
  return base;
}

}  // namespace qforge
