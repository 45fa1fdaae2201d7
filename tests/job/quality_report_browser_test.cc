// The quality report in a real browser: qforge-report renders report.html from a manifest
// file, and Debian's headless Chromium loads it (file://, every host name unresolvable) to a
// PNG screenshot. The page must load with no console message (no script error, no CSP
// refusal), request nothing over the network (the browser's net log holds no request made
// for the page other than file://), and show its chart (the DOM after load holds one point
// per module). A negative control shows the checks catch a page that errs and fetches.
//
// Needs `chromium` (scripts/install-deps.sh installs it); without it the tests FAIL, saying so.
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/integration/subprocess.h"
#include "tests/job/quality_report_fixture.h"

namespace qforge {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;

constexpr int kWidth = 1200, kHeight = 1600;

std::string FindChromium() {
  if (const char* env = std::getenv("QFORGE_CHROMIUM"); env != nullptr && *env != '\0') return env;
  std::string path = std::getenv("PATH") != nullptr ? std::getenv("PATH") : "/usr/bin:/bin";
  std::stringstream dirs(path);
  for (std::string dir; std::getline(dirs, dir, ':');) {
    for (const char* name : {"chromium", "chromium-browser"}) {
      fs::path p = fs::path(dir) / name;
      if (::access(p.c_str(), X_OK) == 0) return p.string();
    }
  }
  return "";
}

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void WriteFile(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << text;
}

// The console messages Chromium logs with --enable-logging=stderr: script errors, CSP
// refusals, console.* calls ("...:INFO:CONSOLE:12] \"Uncaught ReferenceError...\"").
std::vector<std::string> ConsoleMessages(const std::string& stderr_text) {
  std::vector<std::string> lines;
  std::stringstream s(stderr_text);
  for (std::string line; std::getline(s, line);) {
    if (line.find(":CONSOLE") != std::string::npos) lines.push_back(line);
  }
  return lines;
}

// URLs the page asked the network for: net-log requests made on behalf of a file:// page
// (network isolation key "file://...") for anything but file:, data: or about:. The
// browser's own background requests carry other keys and are not the page's.
std::vector<std::string> PageRequests(const fs::path& netlog) {
  std::vector<std::string> urls;
  nlohmann::json log = nlohmann::json::parse(ReadFile(netlog), nullptr, false);
  if (log.is_discarded() || !log.contains("events")) {
    urls.push_back("(unreadable net log " + netlog.string() + ")");
    return urls;
  }
  for (const nlohmann::json& e : log["events"]) {
    if (!e.contains("params") || !e["params"].is_object()) continue;
    const nlohmann::json& p = e["params"];
    if (!p.contains("url") || !p["url"].is_string()) continue;
    const std::string url = p["url"];
    const std::string key = p.value("network_isolation_key", std::string());
    if (key.rfind("file://", 0) != 0) continue;
    if (url.rfind("file:", 0) == 0 || url.rfind("data:", 0) == 0 ||
        url.rfind("about:", 0) == 0) {
      continue;
    }
    if (std::find(urls.begin(), urls.end(), url) == urls.end()) urls.push_back(url);
  }
  return urls;
}

struct BrowserRun {
  int exit_code = -1;
  std::string out, err;
  std::vector<std::string> console, requests;
};

class QualityReportBrowserTest : public ::testing::Test {
 protected:
  void SetUp() override {
    chromium_ = FindChromium();
    ASSERT_FALSE(chromium_.empty())
        << "Debian's headless browser `chromium` is not installed (nor QFORGE_CHROMIUM set); "
           "run scripts/install-deps.sh, which installs it";
    std::string tmpl = (fs::path(::testing::TempDir()) / "qforge-report-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    if (!dir_.empty()) fs::remove_all(dir_, ec);
  }

  // Loads `html` headless with no name resolvable; `mode` is "--screenshot=<png>" or
  // "--dump-dom".
  BrowserRun Load(const fs::path& html, const std::string& mode, const std::string& tag) {
    const fs::path netlog = dir_ / (tag + ".netlog.json");
    std::vector<std::string> argv = {
        chromium_,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--disable-background-networking",
        "--user-data-dir=" + (dir_ / (tag + ".profile")).string(),
        "--window-size=" + std::to_string(kWidth) + "," + std::to_string(kHeight),
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--enable-logging=stderr",
        "--v=0",
        "--log-net-log=" + netlog.string(),
        mode,
        "file://" + fs::absolute(html).string()};
    testing::CommandResult r = testing::RunCommand(argv, seconds(120));
    BrowserRun run;
    run.exit_code = r.exit_code;
    run.out = r.out;
    run.err = r.err;
    run.console = ConsoleMessages(r.err);
    run.requests = PageRequests(netlog);
    return run;
  }

  std::string chromium_;
  fs::path dir_;
};

std::string Join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += x + "\n";
  return s;
}

int Count(const std::string& haystack, const std::string& needle) {
  int n = 0;
  for (size_t p = haystack.find(needle); p != std::string::npos;
       p = haystack.find(needle, p + needle.size())) {
    ++n;
  }
  return n;
}

uint32_t BigEndian32(const std::string& s, size_t at) {
  return (static_cast<uint32_t>(static_cast<uint8_t>(s[at])) << 24) |
         (static_cast<uint32_t>(static_cast<uint8_t>(s[at + 1])) << 16) |
         (static_cast<uint32_t>(static_cast<uint8_t>(s[at + 2])) << 8) |
         static_cast<uint32_t>(static_cast<uint8_t>(s[at + 3]));
}

// The checks below would pass vacuously if Chromium logged nothing: a page with a script
// error and an image from the network must trip both.
TEST_F(QualityReportBrowserTest, ChecksCatchAPageThatErrsAndFetches) {
  const fs::path bad = dir_ / "bad.html";
  WriteFile(bad,
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>bad</title></head><body>"
            "<img src=\"http://fetch.example.invalid/x.png\"><script>undefined_function();"
            "</script></body></html>\n");
  BrowserRun run = Load(bad, "--screenshot=" + (dir_ / "bad.png").string(), "bad");
  ASSERT_EQ(run.exit_code, 0) << run.err;
  ASSERT_FALSE(run.console.empty()) << run.err;
  EXPECT_NE(Join(run.console).find("undefined_function"), std::string::npos) << Join(run.console);
  EXPECT_EQ(run.requests, std::vector<std::string>{"http://fetch.example.invalid/x.png"});
}

TEST_F(QualityReportBrowserTest, ReportLoadsWithoutErrorsOrFetches) {
  // 24 layers, a failed gate, and a module name that would log to the console if the page
  // let it run as a script.
  nlohmann::json manifest = testing::ReportManifest(24);
  const std::string hostile = "model.layers.3.<script>console.error('unescaped')</script>.q_proj";
  manifest["layers"][hostile] = manifest["layers"][testing::ReportModuleName(3, 0)];
  manifest["quality"]["modules"].push_back(
      {{"module", hostile}, {"layer", 3}, {"relative_error", 0.25}});
  manifest["quality"]["gate"] = {{"max_ppl_increase_pct", 5.0}, {"passed", false}};
  manifest["quality_gate"] = "failed";
  const fs::path manifest_path = dir_ / "qforge_manifest.json";
  WriteFile(manifest_path, manifest.dump(2));

  // The tool writes report.html beside the manifest.
  testing::CommandResult tool = testing::RunCommand(
      {std::string(QFORGE_BIN_DIR) + "/tools/qforge-report", manifest_path.string()},
      seconds(60));
  ASSERT_EQ(tool.exit_code, 0) << tool.err;
  const fs::path html = dir_ / "report.html";
  EXPECT_EQ(tool.out, html.string() + "\n");
  ASSERT_TRUE(fs::exists(html));

  // A blank page's screenshot, for scale.
  const fs::path blank = dir_ / "blank.html";
  WriteFile(blank, "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>b</title></head>"
                   "<body></body></html>\n");
  BrowserRun blank_run = Load(blank, "--screenshot=" + (dir_ / "blank.png").string(), "blank");
  ASSERT_EQ(blank_run.exit_code, 0) << blank_run.err;
  const uintmax_t blank_bytes = fs::file_size(dir_ / "blank.png");

  const fs::path png = dir_ / "report.png";
  BrowserRun run = Load(html, "--screenshot=" + png.string(), "report");
  ASSERT_EQ(run.exit_code, 0) << run.err;
  EXPECT_TRUE(run.console.empty()) << "console messages:\n" << Join(run.console);
  EXPECT_TRUE(run.requests.empty()) << "network requests:\n" << Join(run.requests);
  ASSERT_TRUE(fs::exists(png)) << run.err;
  const std::string image = ReadFile(png);
  ASSERT_GT(image.size(), 24u);
  EXPECT_EQ(image.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_EQ(image.substr(12, 4), "IHDR");
  EXPECT_EQ(BigEndian32(image, 16), static_cast<uint32_t>(kWidth));
  EXPECT_EQ(BigEndian32(image, 20), static_cast<uint32_t>(kHeight));
  // Tables, text and 169 coloured points compress far worse than an empty page.
  EXPECT_GT(image.size(), 4 * blank_bytes) << "blank page: " << blank_bytes << " bytes";

  // The DOM after load: the chart with one point per module, the gate, the escaped name.
  BrowserRun dom = Load(html, "--dump-dom", "dom");
  ASSERT_EQ(dom.exit_code, 0) << dom.err;
  EXPECT_TRUE(dom.console.empty()) << Join(dom.console);
  EXPECT_NE(dom.out.find("id=\"error-chart\""), std::string::npos);
  EXPECT_EQ(Count(dom.out, "<circle class=\"pt\""), 24 * 7 + 1);
  EXPECT_NE(dom.out.find(">FAILED<"), std::string::npos);
  EXPECT_NE(dom.out.find("&lt;script&gt;console.error"), std::string::npos);
  EXPECT_EQ(dom.out.find("<script"), std::string::npos);
}

TEST_F(QualityReportBrowserTest, ToolRefusesAMalformedManifestNamingTheField) {
  nlohmann::json manifest = testing::ReportManifest(1);
  manifest["quality"]["mean_kl"] = "low";
  const fs::path manifest_path = dir_ / "qforge_manifest.json";
  WriteFile(manifest_path, manifest.dump());
  testing::CommandResult tool = testing::RunCommand(
      {std::string(QFORGE_BIN_DIR) + "/tools/qforge-report", manifest_path.string(), "-o",
       (dir_ / "out.html").string()},
      seconds(60));
  EXPECT_EQ(tool.exit_code, 1);
  EXPECT_NE(tool.err.find("quality.mean_kl"), std::string::npos) << tool.err;
  EXPECT_FALSE(fs::exists(dir_ / "out.html"));
  WriteFile(manifest_path, "{not json");
  tool = testing::RunCommand(
      {std::string(QFORGE_BIN_DIR) + "/tools/qforge-report", manifest_path.string()}, seconds(60));
  EXPECT_EQ(tool.exit_code, 1);
  EXPECT_NE(tool.err.find("not valid JSON"), std::string::npos) << tool.err;
}

}  // namespace
}  // namespace qforge
