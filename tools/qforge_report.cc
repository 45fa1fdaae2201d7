// qforge-report: renders the quality report page (job/quality_report.h) from a
// qforge_manifest.json or an evaluation document on this machine, with no service.
//
//   qforge-report MANIFEST.json [-o REPORT.html]
//
// Without -o the page is written as report.html beside the manifest; `-o -` prints it.
// Exit codes: 0 written, 1 the file could not be read, parsed or rendered (the message names
// the field), 2 usage error.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "CLI/CLI.hpp"
#include "job/quality_report.h"
#include "nlohmann/json.hpp"

int main(int argc, char** argv) {
  CLI::App app{"Renders qforge's self-contained HTML quality report from a manifest"};
  app.set_version_flag("--version", QFORGE_VERSION);
  std::string manifest_path, output;
  app.add_option("manifest", manifest_path,
                 "qforge_manifest.json, or an evaluation document (job/quality_report.h)")
      ->required();
  app.add_option("-o,--output", output, "where to write the page (default: report.html beside "
                                        "the manifest; '-' for stdout)");
  CLI11_PARSE(app, argc, argv);

  std::ifstream in(manifest_path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "qforge-report: cannot read %s: %s\n", manifest_path.c_str(),
                 std::strerror(errno));
    return 1;
  }
  std::stringstream buf;
  buf << in.rdbuf();
  nlohmann::json doc = nlohmann::json::parse(buf.str(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) {
    std::fprintf(stderr, "qforge-report: %s is not valid JSON; pass a qforge_manifest.json\n",
                 manifest_path.c_str());
    return 1;
  }
  absl::StatusOr<std::string> html = qforge::RenderQualityReportHtml(doc);
  if (!html.ok()) {
    std::fprintf(stderr, "qforge-report: %s: %s\n", manifest_path.c_str(),
                 std::string(html.status().message()).c_str());
    return 1;
  }
  if (output == "-") {
    std::cout << *html;
    return std::cout.good() ? 0 : 1;
  }
  if (output.empty()) {
    output = (std::filesystem::path(manifest_path).parent_path() / qforge::kQualityReportName)
                 .string();
  }
  std::ofstream out(output, std::ios::binary | std::ios::trunc);
  out << *html;
  out.close();
  if (!out) {
    std::fprintf(stderr, "qforge-report: cannot write %s\n", output.c_str());
    return 1;
  }
  std::printf("%s\n", output.c_str());
  return 0;
}
