#include "bench/file_mode.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "base/status_macros.h"
#include "common/uri.h"
#include "nlohmann/json.hpp"
#include "quant/gptq.h"
#include "quant/vptq.h"
#include "common/status_bridge.h"

namespace qforge::bench {
namespace {

absl::Status RunFile(const Flags& f, const Device& device) {
  QF_ASSIGN_OR_RETURN(ObjectUri in, SplitObjectUri(f.input));
  QF_ASSIGN_OR_RETURN(auto in_store, OpenObjectStore(in.store_uri));
  QF_ASSIGN_OR_RETURN(SafetensorsHeader header, ReadSafetensorsHeader(*in_store, in.key));
  const TensorInfo* w_info = header.Find("weight");
  const TensorInfo* h_info = header.Find("hessian");
  if (w_info == nullptr || h_info == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(f.input, " must hold tensors 'weight' [out, in] and 'hessian' [in, in]"));
  }
  if (w_info->shape.size() != 2 || h_info->shape.size() != 2 ||
      h_info->shape[0] != w_info->shape[1] || h_info->shape[1] != w_info->shape[1]) {
    return absl::InvalidArgumentError(absl::StrCat(
        f.input, ": 'weight' must be [out, in] and 'hessian' [in, in] with the same in"));
  }
  qforge::Matrix w, h;
  w.rows = w_info->shape[0];
  w.cols = w_info->shape[1];
  h.rows = h.cols = w.cols;
  QF_ASSIGN_OR_RETURN(w.data, ReadTensorAsF32(*in_store, in.key, header, *w_info));
  QF_ASSIGN_OR_RETURN(h.data, ReadTensorAsF32(*in_store, in.key, header, *h_info));

  std::vector<double> times;
  qforge::Matrix deq;
  nlohmann::json j;
  if (f.method == "vptq") {
    const quant::VptqOptions o = VptqFromFlags(f);
    QF_ASSIGN_OR_RETURN(std::unique_ptr<quant::VptqSolver> solver,
                        ToAbslStatusOr(MakeVptqSolver(device)));
    quant::VptqResult result;
    for (int r = -device.warmup_runs(); r < std::max(1, f.repeats); ++r) {
      QF_ASSIGN_OR_RETURN(result, ToAbslStatusOr(solver->Quantize(w, h, o)));
      if (r >= 0) times.push_back(result.timings.total_seconds);
    }
    deq = result.dequantized;
    j = {{"method", "vptq"},
         {"vector_len", o.vector_len},
         {"num_centroids", o.num_centroids},
         {"num_res_centroids", o.num_res_centroids},
         {"bits_per_weight", quant::VptqBitsPerWeight(result)},
         {"proxy_loss", result.proxy_loss},
         {"output_error", result.output_error},
         {"relative_error", result.output_error / result.weight_energy}};
  } else {
    const quant::GptqOptions o = GptqFromFlags(f);
    QF_ASSIGN_OR_RETURN(std::unique_ptr<quant::GptqSolver> solver,
                        ToAbslStatusOr(MakeGptqSolver(device)));
    quant::GptqResult result;
    for (int r = -device.warmup_runs(); r < std::max(1, f.repeats); ++r) {
      auto t = std::chrono::steady_clock::now();
      QF_ASSIGN_OR_RETURN(result, ToAbslStatusOr(solver->Quantize(w, h, o)));
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
      if (r >= 0) times.push_back(secs);
    }
    deq = quant::DequantizeGptq(result);
    j = {{"method", "gptq"},
         {"bits", o.bits},
         {"group_size", o.group_size},
         {"sym", o.sym},
         {"act_order", o.act_order},
         {"static_groups", o.static_groups},
         {"proxy_loss", result.proxy_loss},
         {"output_error", result.output_error},
         {"relative_error", result.output_error / result.weight_energy}};
  }
  if (!f.output.empty()) {
    QF_ASSIGN_OR_RETURN(ObjectUri out, SplitObjectUri(f.output));
    QF_ASSIGN_OR_RETURN(auto out_store, OpenObjectStore(out.store_uri));
    QF_ASSIGN_OR_RETURN(auto writer, SafetensorsWriter::Create(
                                         *out_store, out.key,
                                         {{"dequantized", DType::kF32, {deq.rows, deq.cols}}}));
    QF_RETURN_IF_ERROR(writer->WriteTensorData(
        "dequantized", std::string_view(reinterpret_cast<const char*>(deq.data.data()),
                                        deq.data.size() * sizeof(float))));
    QF_RETURN_IF_ERROR(writer->Finish());
  }
  AddDevice(device, j);
  j["rows"] = w.rows;
  j["cols"] = w.cols;
  j["solver_seconds"] = Median(times);
  j["output"] = f.output;
  std::printf("%s\n", j.dump().c_str());
  return absl::OkStatus();
}

}  // namespace

qforge::Status RunFileMode(const Flags& f, const Device& device) {
  const absl::Status s = RunFile(f, device);
  if (s.ok()) return qforge::OkStatus();
  // The codes share absl's numbering (base/status.h).
  return qforge::Status(static_cast<qforge::StatusCode>(static_cast<int>(s.code())),
                       std::string(s.message()));
}

}  // namespace qforge::bench
