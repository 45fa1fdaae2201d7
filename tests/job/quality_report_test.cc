// The quality report page (job/quality_report.h): the figures as documented, one chart point
// per module placed by its error, hostile strings escaped, no fetchable reference, the
// "not evaluated" and failed-gate pages, bits per weight against hand-computed values, and
// malformed input refused naming the field.
#include "job/quality_report.h"

#include <cmath>
#include <functional>
#include <regex>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/job/quality_report_fixture.h"

namespace qforge {
namespace {

using testing::ReportCalibrationError;
using testing::ReportManifest;
using testing::ReportModuleName;

std::string Render(const nlohmann::json& doc) {
  absl::StatusOr<std::string> html = RenderQualityReportHtml(doc);
  EXPECT_TRUE(html.ok()) << html.status();
  return html.ok() ? *html : std::string();
}

int Count(const std::string& haystack, const std::string& needle) {
  int n = 0;
  for (size_t p = haystack.find(needle); p != std::string::npos;
       p = haystack.find(needle, p + needle.size())) {
    ++n;
  }
  return n;
}

// The text of the <td> after the cell whose text is `label`.
std::string Cell(const std::string& html, const std::string& label) {
  std::regex re("<td>" + label + "</td><td[^>]*>([^<]*)</td>");
  std::smatch m;
  return std::regex_search(html, m, re) ? m[1].str() : "(no row '" + label + "')";
}

// cy of the chart point whose title names `module`.
double PointY(const std::string& html, const std::string& module) {
  std::regex re("<circle class=\"pt\" cx=\"[0-9.]+\" cy=\"([0-9.]+)\"[^>]*><title>" + module +
                ":");
  std::smatch m;
  return std::regex_search(html, m, re) ? std::stod(m[1].str()) : -1;
}

TEST(QualityReportTest, ShowsTheFiguresAsDocumented) {
  const std::string html = Render(ReportManifest(2));
  // Header.
  EXPECT_NE(html.find("file:///models/tiny-llama"), std::string::npos);
  EXPECT_NE(html.find("GPTQ 4-bit, group size 128"), std::string::npos);
  EXPECT_NE(html.find("job-7f3a"), std::string::npos);
  EXPECT_NE(html.find("2026-12-05T05:00:00Z"), std::string::npos);
  // Quality table: %.3f, %+.2f %%, %.4g nats, %.2f %%.
  EXPECT_EQ(Cell(html, "samples"), "8");
  EXPECT_EQ(Cell(html, "tokens predicted"), "504");
  EXPECT_EQ(Cell(html, "perplexity, original"), "7.113");
  EXPECT_EQ(Cell(html, "perplexity, quantized"), "7.995");
  EXPECT_EQ(Cell(html, "perplexity increase"), "+12.40 %");
  EXPECT_EQ(Cell(html, "top-1 agreement"), "93.75 %");
  EXPECT_NE(html.find("0.08123 nats"), std::string::npos);
  EXPECT_EQ(Cell(html, "evaluation data"), "file:///data/eval.jsonl");
  EXPECT_NE(html.find("no gate"), std::string::npos);
  // Bits per weight: nominal 4 + (16 + 4) / 128 = 4.15625; stored: the fixture's bytes · 8 /
  // weights = 4.25625 (hand-computed); 14 modules, 2 layers · 655360 weights.
  EXPECT_EQ(Cell(html, "bits per weight, nominal"), "4.156");
  EXPECT_EQ(Cell(html, "bits per weight, stored"), "4.256");
  EXPECT_EQ(Cell(html, "quantized modules"), "14");
  EXPECT_EQ(Cell(html, "quantized weights"), "1310720");
  // Timings: 14 modules × (0.25 + 1.25) s; calibration and evaluation wall times.
  EXPECT_EQ(Cell(html, "quantization, summed over 14 modules"), "21.0 s");
  EXPECT_EQ(Cell(html, "calibration"), "12.3 s");
  EXPECT_EQ(Cell(html, "evaluation"), "4.6 s");
  // The evaluation errors (twice the calibration ones) are charted and ranked: the worst is
  // layer 1's down_proj, 2 · 10^-3.9 · 7 = 1.7625e-3.
  EXPECT_NE(html.find("on the evaluation activations"), std::string::npos);
  const std::regex first_worst("<td class=\"n\">1</td><td>" + ReportModuleName(1, 6) +
                               "</td><td class=\"n\">1</td><td class=\"n\">([0-9.e+-]+)</td>");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(html, m, first_worst));
  EXPECT_EQ(m[1].str(), "1.762e-03");
  EXPECT_NEAR(std::stod(m[1].str()), 2 * ReportCalibrationError(1, 6), 1e-6);
}

TEST(QualityReportTest, OneChartPointPerModulePlacedByItsError) {
  for (int layers : {1, 3, 40}) {
    const std::string html = Render(ReportManifest(layers));
    EXPECT_EQ(Count(html, "<circle class=\"pt\""), 7 * layers) << layers << " layers";
    EXPECT_EQ(Count(html, "<polyline"), 7);  // one series per module kind
    for (const char* kind : {">q<", ">k<", ">v<", ">o<", ">gate<", ">up<", ">down<"}) {
      EXPECT_NE(html.find(kind), std::string::npos) << kind;
    }
  }
  // Log scale: errors grow with layer and module index, so y (downwards) shrinks; a decade
  // apart is a constant distance.
  const std::string html = Render(ReportManifest(11));
  const double y_0_0 = PointY(html, ReportModuleName(0, 0));
  const double y_10_0 = PointY(html, ReportModuleName(10, 0));  // 10× the error of (0, 0)
  const double y_0_6 = PointY(html, ReportModuleName(0, 6));
  ASSERT_GT(y_0_0, 0);
  ASSERT_GT(y_10_0, 0);
  EXPECT_LT(y_10_0, y_0_6);
  EXPECT_LT(y_0_6, y_0_0);
  // Axis decades 1e-4 (floor of the lowest, 2·10^-4) .. 1e-1 (ceil of the highest,
  // 2·7·10^-3): 10× is a third of the 3-decade height of 370 px (440 − 20 top − 50 bottom);
  // coordinates are printed to 0.1 px.
  EXPECT_NEAR(y_0_0 - y_10_0, 370.0 / 3, 0.11);
}

TEST(QualityReportTest, EscapesHostileStringsAndReferencesNothingOutside) {
  nlohmann::json doc = ReportManifest(1);
  const std::string hostile = "model.layers.0.<script>alert(1)</script>\"'&.q_proj";
  doc["layers"][hostile] = doc["layers"][ReportModuleName(0, 0)];
  doc["quality"]["modules"].push_back(
      {{"module", hostile}, {"layer", 0}, {"relative_error", 0.5}});
  doc["spec"]["model_uri"] = "s3://b/<img src=x onerror=alert(2)>";
  doc["spec"]["job_id"] = "</title><script>alert(3)</script>";
  doc["quality"]["dataset_uri"] = "<b>&amp;</b>";
  const std::string html = Render(doc);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("<img"), std::string::npos);
  EXPECT_EQ(html.find("<b>"), std::string::npos);
  EXPECT_NE(html.find("model.layers.0.&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;.q_proj"),
            std::string::npos);
  EXPECT_NE(html.find("&lt;/title&gt;&lt;script&gt;"), std::string::npos);
  EXPECT_NE(html.find("&lt;b&gt;&amp;amp;&lt;/b&gt;"), std::string::npos);
  // The hostile module is a chart point too (8 modules in layer 0), and the worst one.
  EXPECT_EQ(Count(html, "<circle class=\"pt\""), 8);
}

TEST(QualityReportTest, ReferencesNothingOutsideThePage) {
  // Nothing a browser would fetch: no URL, no src/href/url(), no script, and a CSP that
  // forbids every fetch.
  nlohmann::json doc = ReportManifest(3);
  doc["quality"]["gate"] = {{"max_kl", 0.1}, {"passed", true}};
  doc["quality_gate"] = "passed";
  const std::string html = Render(doc);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("http://"), std::string::npos);
  EXPECT_EQ(html.find("https://"), std::string::npos);
  EXPECT_EQ(html.find("src="), std::string::npos);
  EXPECT_EQ(html.find("href="), std::string::npos);
  EXPECT_EQ(html.find("url("), std::string::npos);
  EXPECT_EQ(html.find("@import"), std::string::npos);
  EXPECT_NE(html.find("content=\"default-src 'none'; style-src 'unsafe-inline'\""),
            std::string::npos);
}

TEST(QualityReportTest, WithoutEvaluationSaysNotEvaluatedAndChartsCalibrationErrors) {
  nlohmann::json doc = ReportManifest(2);
  doc.erase("quality");
  doc.erase("quality_gate");
  const std::string html = Render(doc);
  EXPECT_NE(html.find("not evaluated"), std::string::npos);
  EXPECT_EQ(html.find("quality-table"), std::string::npos);
  EXPECT_NE(html.find("no gate"), std::string::npos);
  EXPECT_NE(html.find("under the calibration Hessians"), std::string::npos);
  EXPECT_EQ(Count(html, "<circle class=\"pt\""), 14);
  EXPECT_EQ(Cell(html, "evaluation"), "&mdash;");
  // The worst is now the calibration figure of layer 1's down_proj: 7 · 10^-3.9.
  EXPECT_NE(html.find(absl::StrFormat("%.3e", ReportCalibrationError(1, 6))), std::string::npos);
}

TEST(QualityReportTest, FailedGateShowsMeasuredAndAllowed) {
  nlohmann::json doc = ReportManifest(1);
  doc["quality"]["gate"] = {{"max_ppl_increase_pct", 5.0}, {"max_kl", 0.1}, {"passed", false}};
  doc["quality_gate"] = "failed";
  const std::string html = Render(doc);
  EXPECT_NE(html.find(">FAILED<"), std::string::npos);
  EXPECT_EQ(html.find(">PASSED<"), std::string::npos);
  EXPECT_NE(html.find("<tr><td>perplexity increase</td><td class=\"n\">+12.40 %</td>"
                      "<td class=\"n\">5.00 %</td><td><span class=\"badge fail\">missed</span>"),
            std::string::npos);
  EXPECT_NE(html.find("<tr><td>mean KL divergence</td><td class=\"n\">0.08123 nats</td>"
                      "<td class=\"n\">0.1 nats</td><td><span class=\"badge pass\">met</span>"),
            std::string::npos);

  doc["quality"]["gate"] = {{"max_kl", 0.1}, {"passed", true}};
  doc["quality_gate"] = "passed";
  const std::string passed = Render(doc);
  EXPECT_NE(passed.find(">PASSED<"), std::string::npos);
  EXPECT_EQ(passed.find(">FAILED<"), std::string::npos);
  EXPECT_EQ(Count(passed, ">met<"), 1);
  EXPECT_EQ(passed.find("perplexity increase</td><td class=\"n\">+12.40 %</td><td class=\"n\">"),
            std::string::npos);  // no ppl threshold set
}

TEST(QualityReportTest, EvaluationOnlyDocument) {
  nlohmann::json quality = ReportManifest(2)["quality"];
  quality["gate"] = {{"max_ppl_increase_pct", 20.0}, {"passed", true}};
  quality["bits_per_weight"] = 4.156;
  const nlohmann::json doc = EvaluationReportDocument(
      "file:///models/tiny-llama-gptq", "file:///models/tiny-llama", quality, "passed",
      "job-eval-1", "2026-12-05T06:00:00Z");
  EXPECT_EQ(doc["model"], "file:///models/tiny-llama-gptq");
  const std::string html = Render(doc);
  EXPECT_EQ(Cell(html, "reference \\(original\\)"), "file:///models/tiny-llama");
  EXPECT_EQ(Cell(html, "method"), "evaluation only");
  EXPECT_EQ(Cell(html, "perplexity, quantized"), "7.995");
  EXPECT_EQ(Cell(html, "bits per weight \\(evaluation\\)"), "4.156");
  EXPECT_NE(html.find(">PASSED<"), std::string::npos);
  EXPECT_EQ(Count(html, "<circle class=\"pt\""), 14);

  nlohmann::json no_model = doc;
  no_model.erase("model");
  absl::StatusOr<std::string> r = RenderQualityReportHtml(no_model);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("\"model\""), std::string::npos) << r.status();
  nlohmann::json no_quality = doc;
  no_quality.erase("quality");
  r = RenderQualityReportHtml(no_quality);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("quality"), std::string::npos) << r.status();
}

TEST(QualityReportTest, BitsPerWeightByTheStatedFormulas) {
  // GPTQ 3-bit, group 64: 3 + 19/64; per-channel (-1) over in_features 1000: 3 + 19/1000.
  nlohmann::json g = {{"method", "gptq"}, {"bits", 3}, {"group_size", 64},
                      {"out_features", 10}, {"in_features", 1000}, {"bytes_written", 4000}};
  absl::StatusOr<ModuleBits> b = ModuleBitsPerWeight(g, "m");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_DOUBLE_EQ(*b->nominal, 3 + 19.0 / 64);
  EXPECT_DOUBLE_EQ(*b->stored, 4000 * 8.0 / 10000);
  EXPECT_EQ(b->weights, 10000);
  g["group_size"] = -1;
  b = ModuleBitsPerWeight(g, "m");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_DOUBLE_EQ(*b->nominal, 3 + 19.0 / 1000);
  // VPTQ: the quantizer's figure.
  nlohmann::json v = {{"method", "vptq"}, {"bits_per_weight", 2.375}, {"out_features", 30},
                      {"in_features", 1000}, {"bytes_written", 9000}};
  b = ModuleBitsPerWeight(v, "m");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_DOUBLE_EQ(*b->nominal, 2.375);
  // The mean is weighted by weights: (10000 · 3.019 + 30000 · 2.375) / 40000.
  absl::StatusOr<BitsPerWeightSummary> s =
      ManifestBitsPerWeight(nlohmann::json{{"a", g}, {"b", v}});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->modules, 2);
  EXPECT_EQ(s->weights, 40000);
  EXPECT_DOUBLE_EQ(*s->nominal, (10000 * (3 + 19.0 / 1000) + 30000 * 2.375) / 40000);
  EXPECT_DOUBLE_EQ(*s->stored, (4000 + 9000) * 8.0 / 40000);
  // A VPTQ entry without its figure: no nominal mean rather than a partial one.
  v.erase("bits_per_weight");
  s = ManifestBitsPerWeight(nlohmann::json{{"a", g}, {"b", v}});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_FALSE(s->nominal.has_value());
  EXPECT_TRUE(s->stored.has_value());
  // Impossible values name the field.
  g["bits"] = 0;
  b = ModuleBitsPerWeight(g, "layers[\"x\"]");
  ASSERT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(b.status().message().find("layers[\"x\"].bits"), std::string::npos) << b.status();
  g["bits"] = 4;
  g["group_size"] = 0;
  b = ModuleBitsPerWeight(g, "layers[\"x\"]");
  ASSERT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(b.status().message().find("layers[\"x\"].group_size"), std::string::npos);
}

TEST(QualityReportTest, MalformedInputNamesTheField) {
  struct Case {
    std::string name;
    std::function<void(nlohmann::json&)> spoil;
    std::string field;
  };
  const std::string m0 = ReportModuleName(0, 0);
  const std::vector<Case> cases = {
      {"kl string", [](nlohmann::json& d) { d["quality"]["mean_kl"] = "x"; }, "quality.mean_kl"},
      {"ppl missing", [](nlohmann::json& d) { d["quality"].erase("ppl_candidate"); },
       "quality.ppl_candidate"},
      {"negative error",
       [&](nlohmann::json& d) { d["layers"][m0]["relative_error"] = -1.0; },
       "layers[\"" + m0 + "\"].relative_error"},
      {"top1 above 1", [](nlohmann::json& d) { d["quality"]["top1_agreement"] = 1.5; },
       "quality.top1_agreement"},
      {"module not object", [](nlohmann::json& d) { d["quality"]["modules"][0] = 3; },
       "quality.modules[0]"},
      {"layers not object", [](nlohmann::json& d) { d["layers"] = nlohmann::json::array(); },
       "layers"},
      {"gate word", [](nlohmann::json& d) { d["quality_gate"] = "maybe"; }, "quality_gate"},
      {"gate contradicts",
       [](nlohmann::json& d) {
         d["quality"]["gate"] = {{"max_kl", 0.01}, {"passed", false}};
         d["quality_gate"] = "passed";
       },
       "quality_gate is \"passed\" but quality.gate.passed is false"},
      {"gate without thresholds", [](nlohmann::json& d) { d["quality_gate"] = "failed"; },
       "quality.gate"},
      {"seconds string", [&](nlohmann::json& d) { d["layers"][m0]["solve_seconds"] = "1"; },
       "solve_seconds"},
  };
  for (const Case& c : cases) {
    nlohmann::json doc = ReportManifest(1);
    c.spoil(doc);
    absl::StatusOr<std::string> r = RenderQualityReportHtml(doc);
    ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_NE(r.status().message().find(c.field), std::string::npos)
        << c.name << ": " << r.status();
  }
  EXPECT_EQ(RenderQualityReportHtml(nlohmann::json::array()).status().code(),
            absl::StatusCode::kInvalidArgument);
  nlohmann::json no_layers = ReportManifest(1);
  no_layers.erase("layers");
  absl::StatusOr<std::string> r = RenderQualityReportHtml(no_layers);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("layers is missing"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace qforge
