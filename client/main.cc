// qforge: the command-line client of a qforge coordinator.
//
//   qforge submit MODEL_URI --bits 4 --group-size 128 (--hessians URI | --calibration none)
//                 --output URI [--wait | --watch]
//   qforge eval MODEL_URI --reference ORIGINAL_URI --eval DATA [--max-ppl-increase PCT]
//   qforge report ID [--output FILE]   (the quality report page of an evaluated job)
//   qforge get ID · qforge list · qforge watch ID · qforge cancel ID · qforge workers
//   qforge layers ID · qforge events ID [-f] · qforge delete ID
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "CLI/CLI.hpp"
#include "client/cli.h"
#include "client/connection.h"
#include "client/output.h"

#ifndef QFORGE_VERSION
#define QFORGE_VERSION "dev"
#endif

int main(int argc, char** argv) {
  using namespace qforge::cli;
  CLI::App app{"qforge: quantization jobs (GPTQ, VPTQ) on a qforge coordinator"};
  app.set_version_flag("--version", QFORGE_VERSION);
  app.footer(
      "Connection: --endpoint > $QFORGE_ENDPOINT > config file > 127.0.0.1:50051;\n"
      "            --token > $QFORGE_TOKEN > config file ($XDG_CONFIG_HOME/qforge/config.json or\n"
      "            ~/.config/qforge/config.json: {\"endpoint\": \"host:port\", \"token\": \"...\"}).\n"
      "Exit codes: 0 success, 1 job failed (or other error), 2 usage error, 3 server unavailable,\n"
      "            4 not found, 5 job cancelled (waiting on a job someone else cancelled),\n"
      "            6 unauthenticated/permission denied, 7 invalid argument (the server's message\n"
      "            is printed), 130 interrupted. `cancel` exits 0 once the job is stopped or had\n"
      "            already ended. Details: docs/cli.md.");
  Cli cli;
  app.add_option("--endpoint", cli.endpoint, "coordinator address host:port");
  app.add_option("--token", cli.token, "bearer token");
  app.add_option("--timeout", cli.timeout_seconds, "deadline of each call, seconds (default 30)")
      ->check(CLI::PositiveNumber);
  app.add_option("--tls-ca", cli.tls.ca,
                 "PEM CA certificates that signed the coordinator's certificate: connect over "
                 "TLS (also $QFORGE_TLS_CA, config file \"tls_ca\")");
  app.add_option("--tls-cert", cli.tls.cert,
                 "PEM client certificate, with --tls-key (also $QFORGE_TLS_CERT)");
  app.add_option("--tls-key", cli.tls.key, "PEM private key of --tls-cert (also $QFORGE_TLS_KEY)");
  app.require_subcommand(1);
  app.fallthrough();
  AddSubmitCommand(app, cli);
  AddGetCommand(app, cli);
  AddListCommand(app, cli);
  AddWatchCommand(app, cli);
  AddCancelCommand(app, cli);
  AddWorkersCommand(app, cli);
  AddEvalCommand(app, cli);
  AddReportCommand(app, cli);
  AddLayersCommand(app, cli);
  AddEventsCommand(app, cli);
  AddDeleteCommand(app, cli);
  // No arguments: the help, as `qforge --help` prints it.
  if (argc <= 1) {
    std::fputs(app.help().c_str(), stdout);
    return kExitOk;
  }
  // An unknown subcommand: say so, with the nearest one ("qforge sumbit" -> submit).
  const std::string typed = FirstPositional(argc, argv);
  if (!typed.empty()) {
    std::vector<std::string> commands;
    for (const CLI::App* sub : std::as_const(app).get_subcommands([](const CLI::App*) { return true; })) {
      commands.push_back(sub->get_name());
    }
    if (std::find(commands.begin(), commands.end(), typed) == commands.end()) {
      const std::string suggestion = SuggestCommand(typed, commands);
      std::fprintf(stderr, "qforge: '%s' is not a qforge command", typed.c_str());
      if (!suggestion.empty()) {
        std::fprintf(stderr, "; did you mean '%s'?\n", suggestion.c_str());
      } else {
        std::string list;
        for (const std::string& c : commands) list += (list.empty() ? "" : ", ") + c;
        std::fprintf(stderr, " (commands: %s)\n", list.c_str());
      }
      std::fprintf(stderr, "Run 'qforge --help' for usage.\n");
      return kExitUsage;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? kExitOk : kExitUsage;
  }
  auto config = ResolveClientConfig(cli.endpoint, cli.token, std::getenv,
                                    DefaultConfigPath(std::getenv));
  if (!config.ok()) {
    std::fprintf(stderr, "qforge: %s\n", std::string(config.status().message()).c_str());
    return kExitUsage;
  }
  config->timeout_ms = static_cast<int64_t>(cli.timeout_seconds * 1000);
  if (!cli.tls.ca.empty()) config->tls.ca = cli.tls.ca;
  if (!cli.tls.cert.empty()) config->tls.cert = cli.tls.cert;
  if (!cli.tls.key.empty()) config->tls.key = cli.tls.key;
  auto credentials = qforge::ChannelCredentialsFor(config->tls);
  if (!credentials.ok()) {
    std::fprintf(stderr, "qforge: %s\n", std::string(credentials.status().message()).c_str());
    return kExitUsage;
  }
  if (!cli.run) {
    std::fprintf(stderr, "%s", app.help().c_str());
    return kExitUsage;
  }
  Connection conn(*config, *credentials);
  const int code = cli.run(conn);
  std::fflush(stdout);
  return code;
}
