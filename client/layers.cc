// qforge layers ID [--sort error|time|name] [-o table|json]: the job's per-layer results
// (ListLayers, every page): relative error, proxy loss, bits per weight, time, worker and
// attempt; running layers with their progress. Works while the job runs and after it ended.
// Exit 0, or the RPC error's code (4 for an unknown job).
#include <memory>
#include <string>
#include <vector>

#include "client/cli.h"

namespace qforge::cli {

grpc::Status ListAllLayers(Connection& conn, const std::string& id,
                           std::vector<v1::LayerResult>* out) {
  v1::ListLayersRequest req;
  req.set_id(id);
  req.set_page_size(1000);
  for (;;) {
    grpc::ClientContext ctx;
    conn.Prepare(&ctx);
    v1::ListLayersResponse resp;
    grpc::Status s = conn.jobs().ListLayers(&ctx, req, &resp);
    if (!s.ok()) return s;
    for (v1::LayerResult& l : *resp.mutable_layers()) out->push_back(std::move(l));
    if (resp.next_page_token().empty()) return grpc::Status::OK;
    req.set_page_token(resp.next_page_token());
  }
}

namespace {

struct LayersFlags {
  std::string id;
  std::string sort = "error";
  std::string format = "table";
};

int RunLayers(Connection& conn, const LayersFlags& f) {
  std::vector<v1::LayerResult> layers;
  grpc::Status s = ListAllLayers(conn, f.id, &layers);
  if (!s.ok()) return ReportRpcError(s, "layers " + f.id, conn.config());
  if (ParseFormat(f.format) == OutputFormat::kJson) {
    v1::ListLayersResponse all;
    all.set_total_layers(static_cast<int32_t>(layers.size()));
    for (v1::LayerResult& l : layers) *all.add_layers() = std::move(l);
    std::fputs(ToJson(all).c_str(), stdout);
    return kExitOk;
  }
  std::fputs(FormatLayers(layers, f.sort).c_str(), stdout);
  const std::string summary = FormatLayerSummary(layers, /*worst=*/0);
  if (!summary.empty()) std::fputs(summary.c_str(), stderr);
  return kExitOk;
}

}  // namespace

void AddLayersCommand(CLI::App& app, Cli& cli) {
  auto f = std::make_shared<LayersFlags>();
  CLI::App* cmd = app.add_subcommand(
      "layers", "Per-layer results of a job: error, bits per weight, time, worker, attempt");
  cmd->add_option("id", f->id, "job id")->required();
  cmd->add_option("--sort", f->sort,
                  "row order: error (largest relative error first), time (slowest first), "
                  "name (plan order)")
      ->check(CLI::IsMember({"error", "time", "name"}))
      ->capture_default_str();
  AddFormatOption(cmd, &f->format);
  cmd->callback([&cli, f] { cli.run = [f](Connection& conn) { return RunLayers(conn, *f); }; });
}

}  // namespace qforge::cli
