#include "client/connection.h"

#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace qforge::cli {
namespace {

std::string Env(const GetEnvFn& getenv, const char* name) {
  const char* v = getenv(name);
  return v != nullptr ? std::string(v) : std::string();
}

std::string NormalizeEndpoint(std::string e) {
  for (const std::string scheme : {"http://", "grpc://"}) {
    if (e.rfind(scheme, 0) == 0) e = e.substr(scheme.size());
  }
  while (!e.empty() && e.back() == '/') e.pop_back();
  return e;
}

}  // namespace

std::string DefaultConfigPath(const GetEnvFn& getenv) {
  const std::string xdg = Env(getenv, "XDG_CONFIG_HOME");
  if (!xdg.empty()) return xdg + "/qforge/config.json";
  const std::string home = Env(getenv, "HOME");
  if (!home.empty()) return home + "/.config/qforge/config.json";
  return "";
}

absl::StatusOr<ClientConfig> ResolveClientConfig(const std::string& flag_endpoint,
                                                 const std::string& flag_token,
                                                 const GetEnvFn& getenv,
                                                 const std::string& config_path) {
  std::string file_endpoint, file_token;
  TlsOptions file_tls;
  const std::map<std::string, std::string*> file_fields = {
      {"endpoint", &file_endpoint}, {"token", &file_token}, {"tls_ca", &file_tls.ca},
      {"tls_cert", &file_tls.cert}, {"tls_key", &file_tls.key}};
  if (!config_path.empty()) {
    std::ifstream in(config_path);
    if (in) {
      std::stringstream buf;
      buf << in.rdbuf();
      nlohmann::json j = nlohmann::json::parse(buf.str(), nullptr, /*allow_exceptions=*/false);
      if (!j.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat("config file ", config_path,
                         " is not a JSON object like {\"endpoint\": \"host:port\", \"token\": \"...\"}"));
      }
      for (const auto& [key, value] : j.items()) {
        auto field = file_fields.find(key);
        if (field == file_fields.end()) continue;
        if (!value.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat("config file ", config_path, ": \"", key, "\" must be a string"));
        }
        *field->second = value.get<std::string>();
      }
    }
  }
  ClientConfig c;
  const std::string env_endpoint = Env(getenv, "QFORGE_ENDPOINT");
  if (!flag_endpoint.empty()) {
    c.endpoint = flag_endpoint;
    c.endpoint_source = "flag";
  } else if (!env_endpoint.empty()) {
    c.endpoint = env_endpoint;
    c.endpoint_source = "env";
  } else if (!file_endpoint.empty()) {
    c.endpoint = file_endpoint;
    c.endpoint_source = "config";
  } else {
    c.endpoint_source = "default";
  }
  c.endpoint = NormalizeEndpoint(c.endpoint);
  const std::string env_token = Env(getenv, "QFORGE_TOKEN");
  c.token = !flag_token.empty() ? flag_token : !env_token.empty() ? env_token : file_token;
  auto pick = [&](const char* env, const std::string& file) {
    const std::string v = Env(getenv, env);
    return !v.empty() ? v : file;
  };
  c.tls.ca = pick("QFORGE_TLS_CA", file_tls.ca);
  c.tls.cert = pick("QFORGE_TLS_CERT", file_tls.cert);
  c.tls.key = pick("QFORGE_TLS_KEY", file_tls.key);
  return c;
}

Connection::Connection(ClientConfig config, std::shared_ptr<grpc::ChannelCredentials> credentials)
    : config_(std::move(config)) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetMaxReceiveMessageSize(64 << 20);
  channel_ = grpc::CreateCustomChannel(
      config_.endpoint,
      credentials != nullptr ? credentials : grpc::InsecureChannelCredentials(), args);
  stub_ = v1::JobService::NewStub(channel_);
}

void Connection::Prepare(grpc::ClientContext* ctx, bool stream) const {
  if (!stream) {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(config_.timeout_ms));
  }
  if (!config_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + config_.token);
}

std::string NewUuid() {
  std::random_device rd;
  unsigned char b[16];
  for (int i = 0; i < 16; i += 4) {
    const uint32_t r = rd();
    for (int k = 0; k < 4; ++k) b[i + k] = static_cast<unsigned char>(r >> (8 * k));
  }
  b[6] = static_cast<unsigned char>((b[6] & 0x0f) | 0x40);  // version 4
  b[8] = static_cast<unsigned char>((b[8] & 0x3f) | 0x80);  // RFC 4122 variant
  char out[37];
  std::snprintf(out, sizeof(out),
                "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
                b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
                b[15]);
  return out;
}

}  // namespace qforge::cli
