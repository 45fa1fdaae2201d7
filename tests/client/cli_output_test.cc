// The qforge CLI's output and configuration: the exit-code table from gRPC codes and job
// states, a Job as a table and as JSON (the API resource, round-tripping through protobuf's
// JSON parser), the progress line (pinned text, width bounds, colour), event lines, list and
// worker tables, state parsing, endpoint/token precedence and the config file, request ids.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <string>

#include "client/cli.h"
#include "client/connection.h"
#include "client/output.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace qforge::cli {
namespace {

constexpr int64_t kNow = 1'700'000'600'000;  // 2023-11-14T22:23:20Z

v1::Job SampleJob() {
  v1::Job j;
  j.set_id("job-42");
  j.set_state(v1::JOB_STATE_QUANTIZING);
  v1::JobSpec* s = j.mutable_spec();
  s->set_model_uri("/data/llama");
  s->set_output_uri("/data/llama-gptq");
  s->set_method(v1::METHOD_GPTQ);
  s->mutable_gptq()->set_bits(4);
  s->mutable_gptq()->set_group_size(128);
  s->mutable_gptq()->set_desc_act(true);
  s->mutable_calibration()->set_hessians_uri("/data/h.safetensors");
  (*s->mutable_labels())["team"] = "nlp";
  v1::TaskCounts* c = j.mutable_tasks();
  c->set_total(29);  // 28 layers + the ASSEMBLE task
  c->set_layers(28);
  c->set_layers_succeeded(12);
  c->set_succeeded(12);
  c->set_running(2);
  c->set_queued(14);
  c->set_retries(1);
  j.set_create_time_unix_ms(1'700'000'000'000);  // 2023-11-14T22:13:20Z, 10 min before kNow
  j.set_start_time_unix_ms(1'700'000'005'000);
  j.set_eta_seconds(65);
  j.set_progress(0.4286);
  j.set_request_id("req-1");
  return j;
}

// A job calibrating from token data, 45% through its shards.
v1::Job CalibratingJob() {
  v1::Job j = SampleJob();
  j.set_state(v1::JOB_STATE_CALIBRATING);
  j.set_progress(0.453);
  j.set_eta_seconds(-1);
  v1::CalibrationSpec* c = j.mutable_spec()->mutable_calibration();
  c->set_dataset_uri("/data/c4-tokens.safetensors");
  c->set_samples(128);
  v1::CalibrationInfo* ci = j.mutable_calibration();
  ci->set_dataset_uri("/data/c4-tokens.safetensors");
  ci->set_dataset_sha256("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
  ci->set_samples(128);
  ci->set_seq_len(2048);
  ci->set_tokens(262000);
  ci->set_packed(true);
  ci->set_shards(4);
  ci->set_hessians_uri("file:///var/qforge/hessian-cache/ab12/hessians.safetensors");
  return j;
}

TEST(ExitCodes, FromGrpcCodes) {
  using G = grpc::StatusCode;
  const std::map<G, int> expected = {
      {G::OK, 0},
      {G::CANCELLED, 1},
      {G::UNKNOWN, 1},
      {G::INVALID_ARGUMENT, 7},
      {G::DEADLINE_EXCEEDED, 3},
      {G::NOT_FOUND, 4},
      {G::ALREADY_EXISTS, 7},
      {G::PERMISSION_DENIED, 6},
      {G::RESOURCE_EXHAUSTED, 1},
      {G::FAILED_PRECONDITION, 7},
      {G::ABORTED, 1},
      {G::OUT_OF_RANGE, 7},
      {G::UNIMPLEMENTED, 1},
      {G::INTERNAL, 1},
      {G::UNAVAILABLE, 3},
      {G::DATA_LOSS, 1},
      {G::UNAUTHENTICATED, 6},
  };
  for (const auto& [code, exit] : expected) {
    EXPECT_EQ(ExitCodeForStatus(code), exit) << "grpc code " << static_cast<int>(code);
  }
  EXPECT_EQ(ExitCodeForJob(v1::JOB_STATE_SUCCEEDED), 0);
  EXPECT_EQ(ExitCodeForJob(v1::JOB_STATE_FAILED), 1);
  EXPECT_EQ(ExitCodeForJob(v1::JOB_STATE_CANCELLED), 5);
  EXPECT_EQ(ExitCodeForJob(v1::JOB_STATE_QUANTIZING), 0);
}

TEST(JobOutput, TableShowsTheFieldsAUserNeeds) {
  const std::string t = FormatJobTable(SampleJob(), kNow);
  EXPECT_NE(t.find("Job:          job-42\n"), std::string::npos) << t;
  EXPECT_NE(t.find("State:        QUANTIZING (42%)\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Method:       GPTQ 4-bit g128 sym desc_act\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Calibration:  hessians /data/h.safetensors\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Tasks:        12/28 layers + assemble, 2 running, 1 retry (14 queued, 0 pending, 0 cancelled)\n"),
            std::string::npos)
      << t;
  EXPECT_NE(t.find("ETA:          1m05s\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Created:      2023-11-14T22:13:20Z (10m00s ago)\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Labels:       team=nlp\n"), std::string::npos) << t;
  EXPECT_EQ(t.find("Error:"), std::string::npos) << t;

  v1::Job failed = SampleJob();
  failed.set_state(v1::JOB_STATE_FAILED);
  failed.set_end_time_unix_ms(1'700'000'125'000);
  failed.mutable_error()->set_code(5);
  failed.mutable_error()->set_reason("HESSIAN_MISSING");
  failed.mutable_error()->set_subject("model.layers.3.mlp.up_proj");
  failed.mutable_error()->set_message("no Hessian for module 'model.layers.3.mlp.up_proj'");
  const std::string f = FormatJobTable(failed, kNow);
  EXPECT_NE(f.find("Error:        NOT_FOUND HESSIAN_MISSING (model.layers.3.mlp.up_proj): no Hessian "
                   "for module 'model.layers.3.mlp.up_proj'\n"),
            std::string::npos)
      << f;
  EXPECT_NE(f.find("Ended:        2023-11-14T22:15:25Z (took 2m00s)\n"), std::string::npos) << f;
  EXPECT_EQ(f.find("ETA:"), std::string::npos) << "a finished job has no ETA: " << f;
}

TEST(JobOutput, CalibratingJobShowsItsProgressAndData) {
  const std::string t = FormatJobTable(CalibratingJob(), kNow);
  EXPECT_NE(t.find("State:        CALIBRATING (45%)\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Calibration:  dataset /data/c4-tokens.safetensors\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Calib data:   128 samples × 2048 tokens (262000 real, packed), sha256 "
                   "0123456789abcdef\n"),
            std::string::npos)
      << t;
  EXPECT_NE(t.find("Hessians:     4 shards -> file:///var/qforge/hessian-cache/ab12/"
                   "hessians.safetensors\n"),
            std::string::npos)
      << t;
  EXPECT_NE(t.find("ETA:          unknown\n"), std::string::npos) << t;

  // Done: the time it took; a cache hit says so; a finished job shows no percentage.
  v1::Job done = CalibratingJob();
  done.set_state(v1::JOB_STATE_SUCCEEDED);
  done.mutable_calibration()->set_seconds(75);
  std::string d = FormatJobTable(done, kNow);
  EXPECT_NE(d.find("State:        SUCCEEDED\n"), std::string::npos) << d;
  EXPECT_NE(d.find("Hessians:     4 shards in 1m15s -> file:///var/"), std::string::npos) << d;
  done.mutable_calibration()->set_cache_hit(true);
  done.mutable_calibration()->set_shards(0);
  d = FormatJobTable(done, kNow);
  EXPECT_NE(d.find("Hessians:     cached: file:///var/qforge/hessian-cache/ab12/"
                   "hessians.safetensors\n"),
            std::string::npos)
      << d;

  // JSON carries the progress and the calibration info as the API resource.
  nlohmann::json j = nlohmann::json::parse(ToJson(CalibratingJob()), nullptr, false);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["state"], "JOB_STATE_CALIBRATING");
  EXPECT_DOUBLE_EQ(j["progress"].get<double>(), 0.453);
  EXPECT_EQ(j["calibration"]["shards"], 4);
  EXPECT_EQ(j["calibration"]["seqLen"], "2048");
  EXPECT_EQ(j["calibration"]["packed"], true);
  EXPECT_EQ(j["calibration"]["cacheHit"], false);
}

TEST(JobOutput, EvaluationShowsProgressQualityGateAndWorstModules) {
  v1::Job job = SampleJob();
  job.set_state(v1::JOB_STATE_EVALUATING);
  job.set_progress(0.5);
  job.mutable_spec()->mutable_evaluation()->set_dataset_uri("/data/heldout.safetensors");
  job.mutable_spec()->mutable_evaluation()->set_max_ppl_increase_pct(5);
  job.mutable_spec()->mutable_evaluation()->set_max_kl(0.05);
  std::string t = FormatJobTable(job, kNow);
  EXPECT_NE(t.find("State:        EVALUATING (50%)\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Evaluation:   dataset /data/heldout.safetensors; gate: perplexity +5.00 % at "
                   "most, mean KL 0.05 at most\n"),
            std::string::npos)
      << t;
  EXPECT_EQ(t.find("Perplexity:"), std::string::npos) << "no quality before the reduce: " << t;

  job.set_state(v1::JOB_STATE_FAILED);
  v1::QualityReport* q = job.mutable_quality();
  q->set_samples(64);
  q->set_tokens(64 * 511);
  q->set_ppl_reference(7.113);
  q->set_ppl_quantized(7.995);
  q->set_ppl_increase_pct(12.4);
  q->set_mean_kl(0.0812);
  q->set_top1_agreement(0.9123);
  q->set_gate_enabled(true);
  q->set_gate_passed(false);
  q->set_max_ppl_increase_pct(5);
  q->set_max_kl(0.05);
  q->set_bits_per_weight(4.156);
  q->set_dataset_uri("/data/heldout.safetensors");
  for (int i = 0; i < 7; ++i) {
    v1::ModuleQuality* m = q->add_modules();
    m->set_module("model.layers." + std::to_string(i) + ".mlp.down_proj");
    m->set_layer(i);
    m->set_relative_error(1e-3 * (i == 3 ? 50 : i + 1));
  }
  t = FormatJobTable(job, kNow);
  EXPECT_NE(t.find("Perplexity:    7.1130 original -> 7.9950 quantized (+12.40 %)\n"),
            std::string::npos)
      << t;
  EXPECT_NE(t.find("Mean KL:       0.08120 nats\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Top-1 agree:   91.23 %\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Bits/weight:   4.156\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Quality gate:  FAILED: perplexity +12.40 % (allowed +5.00 %); mean KL "
                   "0.08120 (allowed 0.05000)\n"),
            std::string::npos)
      << t;
  // The five worst modules, worst first.
  const size_t worst = t.find("WORST MODULES");
  ASSERT_NE(worst, std::string::npos) << t;
  const size_t first = t.find("model.layers.3.mlp.down_proj", worst);
  const size_t second = t.find("model.layers.6.mlp.down_proj", worst);
  ASSERT_NE(first, std::string::npos) << t;
  ASSERT_NE(second, std::string::npos) << t;
  EXPECT_LT(first, second);
  EXPECT_NE(t.find("5.000e-02"), std::string::npos) << t;
  EXPECT_EQ(t.find("model.layers.0.mlp.down_proj", worst), std::string::npos)
      << "only five: " << t;

  q->set_gate_enabled(false);
  q->clear_max_kl();
  q->clear_max_ppl_increase_pct();
  EXPECT_NE(FormatQuality(*q).find("Quality gate:  none (no threshold set)"), std::string::npos);

  // JSON carries Job.quality.
  nlohmann::json j = nlohmann::json::parse(ToJson(job), nullptr, false);
  ASSERT_TRUE(j.is_object());
  EXPECT_DOUBLE_EQ(j["quality"]["pplQuantized"].get<double>(), 7.995);
  EXPECT_EQ(j["quality"]["modules"].size(), 7u);

  // An evaluation-only job names its reference instead of a method.
  v1::Job only = SampleJob();
  only.mutable_spec()->set_reference_model_uri("/models/llama");
  only.mutable_spec()->clear_output_uri();
  t = FormatJobTable(only, kNow);
  // (no Calibration row: the labels' column is narrower)
  EXPECT_NE(t.find("Reference:   /models/llama\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Method:      evaluation only\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Output:      -\n"), std::string::npos) << t;
  EXPECT_EQ(t.find("Calibration:"), std::string::npos) << t;

  ProgressState p;
  p.state = v1::JOB_STATE_EVALUATING;
  p.tasks.set_total(3);
  p.progress = 0.25;
  EXPECT_EQ(RenderProgressLine(p, 80, false),
            "EVALUATING [##########..............................] 25% of the samples  ETA --");
}

TEST(JobOutput, JsonIsTheApiResource) {
  const v1::Job job = SampleJob();
  const std::string text = ToJson(job);
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  ASSERT_TRUE(j.is_object()) << text;
  EXPECT_EQ(j["id"], "job-42");
  EXPECT_EQ(j["state"], "JOB_STATE_QUANTIZING");
  EXPECT_EQ(j["tasks"]["total"], 29);
  EXPECT_EQ(j["tasks"]["layers"], 28);
  EXPECT_EQ(j["tasks"]["failed"], 0) << "zero values are printed";
  EXPECT_EQ(j["createTimeUnixMs"], "1700000000000") << "int64 as a string (proto3 JSON)";
  EXPECT_EQ(j["spec"]["gptq"]["descAct"], true);
  EXPECT_EQ(j["spec"]["labels"]["team"], "nlp");
  // Round trip: the JSON parses back into the same message.
  v1::Job back;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(text, &back).ok());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(job, back));
  EXPECT_EQ(text.back(), '\n');
}

TEST(Progress, LineIsPinnedAndFitsTheWidth) {
  ProgressState p;
  p.state = v1::JOB_STATE_QUANTIZING;
  p.tasks.set_total(29);
  p.tasks.set_layers(28);
  p.tasks.set_layers_succeeded(14);
  p.tasks.set_succeeded(14);
  p.tasks.set_running(2);
  p.tasks.set_retries(1);
  p.eta_seconds = 65;
  EXPECT_EQ(RenderProgressLine(p, 80, false),
            "QUANTIZING [######......] 14/28 layers + assemble  2 running  1 retry  ETA 1m05s");
  EXPECT_EQ(RenderProgressLine(p, 120, false),
            "QUANTIZING [####################....................] 14/28 layers + assemble  2 running"
            "  1 retry  ETA 1m05s");
  // Narrow terminals drop the bar, then cut the tail; never wider than asked.
  EXPECT_EQ(RenderProgressLine(p, 70, false),
            "QUANTIZING 14/28 layers + assemble  2 running  1 retry  ETA 1m05s");
  EXPECT_EQ(RenderProgressLine(p, 60, false),
            "QUANTIZING 14/28 layers + assemble  2 running  1 retry  ETA ");
  for (int w = 0; w <= 200; ++w) {
    EXPECT_LE(static_cast<int>(RenderProgressLine(p, w, false).size()), w) << w;
  }
  // Colour adds escapes around the state only.
  const std::string colored = RenderProgressLine(p, 80, true);
  EXPECT_EQ(colored.find("\x1b[36mQUANTIZING\x1b[0m"), 0u) << colored;
  EXPECT_EQ(std::regex_replace(colored, std::regex("\x1b\\[[0-9;]*m"), ""),
            RenderProgressLine(p, 80, false));
  // Unknown ETA, and a finished job (no ETA, full bar).
  p.eta_seconds = -1;
  EXPECT_NE(RenderProgressLine(p, 100, false).find("ETA --"), std::string::npos);
  p.state = v1::JOB_STATE_SUCCEEDED;
  p.tasks.set_succeeded(28);
  p.tasks.set_layers_succeeded(28);
  p.tasks.set_running(0);
  EXPECT_EQ(RenderProgressLine(p, 80, false),
            "SUCCEEDED [###################################] 28/28 layers + assemble  1 retry");
  // An empty plan does not divide by zero.
  ProgressState empty;
  EXPECT_EQ(RenderProgressLine(empty, 40, false), "UNKNOWN [............] 0/0 tasks  ETA --");
}

TEST(Progress, CalibratingLineShowsTheSamplesFraction) {
  ProgressState p;
  p.state = v1::JOB_STATE_CALIBRATING;
  p.tasks.set_total(16);
  p.tasks.set_succeeded(1);
  p.tasks.set_running(2);
  p.progress = 0.45;
  EXPECT_EQ(RenderProgressLine(p, 80, false),
            "CALIBRATING [############................] 45% of the samples  2 running  ETA --");
  for (int w = 0; w <= 120; ++w) {
    EXPECT_LE(static_cast<int>(RenderProgressLine(p, w, false).size()), w) << w;
  }
  v1::JobEvent e;
  e.set_time_unix_ms(1'700'000'001'000);
  e.set_job_state(v1::JOB_STATE_CALIBRATING);
  e.set_progress(0.5);
  e.mutable_tasks()->set_total(20);
  e.mutable_tasks()->set_layers(14);
  e.mutable_tasks()->set_succeeded(2);
  e.set_message("calibration shard 2/4 (samples [32, 64)) done: 65536 tokens (3.0 s)");
  EXPECT_EQ(FormatEventLine(e),
            "22:13:21 CALIBRATING 50% of the samples, 0/14 layers + 6 stage tasks | calibration shard 2/4 "
            "(samples [32, 64)) done: 65536 tokens (3.0 s)");
  EXPECT_EQ(FormatPercent(0.999), "99%");
  EXPECT_EQ(FormatPercent(1.5), "100%");
  EXPECT_EQ(FormatPercent(-1), "0%");
}

TEST(Progress, EventLines) {
  v1::JobEvent e;
  e.set_sequence(7);
  e.set_time_unix_ms(1'700'000'001'000);
  e.set_job_state(v1::JOB_STATE_QUANTIZING);
  e.mutable_tasks()->set_total(15);
  e.mutable_tasks()->set_layers(14);
  e.mutable_tasks()->set_layers_succeeded(3);
  e.mutable_tasks()->set_succeeded(3);
  e.mutable_tasks()->set_running(2);
  v1::TaskEvent* t = e.mutable_task();
  t->set_layer("model.layers.0.mlp.down_proj");
  t->set_state(v1::TASK_STATE_SUCCEEDED);
  t->set_attempt(0);
  t->set_worker_id("w-1");
  t->set_seconds(1.234);
  t->set_relative_error(0.00123);
  EXPECT_EQ(FormatEventLine(e),
            "22:13:21 QUANTIZING 3/14 layers + assemble, 2 running | model.layers.0.mlp.down_proj SUCCEEDED "
            "attempt 1 on w-1 in 1.2s (rel err 1.23e-03)");
  t->set_state(v1::TASK_STATE_QUEUED);
  t->set_attempt(1);
  t->set_seconds(0);
  t->set_relative_error(0);
  t->mutable_error()->set_code(14);
  t->mutable_error()->set_message("store timed out");
  EXPECT_EQ(FormatEventLine(e),
            "22:13:21 QUANTIZING 3/14 layers + assemble, 2 running | model.layers.0.mlp.down_proj QUEUED "
            "attempt 2 on w-1: UNAVAILABLE store timed out");
  v1::JobEvent job_level;
  job_level.set_job_state(v1::JOB_STATE_ASSEMBLING);
  job_level.set_message("all layers done; assembling");
  EXPECT_EQ(FormatEventLine(job_level), "--:--:-- ASSEMBLING 0/0 tasks | all layers done; assembling");
}

TEST(Formatting, DurationsTimesAndMethods) {
  EXPECT_EQ(FormatDuration(0), "0.0s");
  EXPECT_EQ(FormatDuration(9.54), "9.5s");
  EXPECT_EQ(FormatDuration(42), "42s");
  EXPECT_EQ(FormatDuration(65), "1m05s");
  EXPECT_EQ(FormatDuration(3700), "1h01m");
  EXPECT_EQ(FormatDuration(90000), "1d01h");
  EXPECT_EQ(FormatDuration(-1), "-");
  EXPECT_EQ(FormatTime(0), "-");
  EXPECT_EQ(FormatTime(1'700'000'000'999), "2023-11-14T22:13:20Z");
  v1::JobSpec s;
  s.mutable_gptq()->set_bits(3);
  s.mutable_gptq()->set_group_size(-1);
  s.mutable_gptq()->set_asym(true);
  s.mutable_gptq()->set_damp_percent(0.05);
  s.mutable_gptq()->set_checkpoint_format("gptq_v2");
  EXPECT_EQ(FormatMethod(s), "GPTQ 3-bit per-channel asym damp 0.05 gptq_v2");
  EXPECT_EQ(StateName(v1::JOB_STATE_CANCELLING), "CANCELLING");
  EXPECT_EQ(StateName(v1::JOB_STATE_UNSPECIFIED), "UNKNOWN");
}

TEST(Formatting, ListAndWorkerTables) {
  v1::ListJobsResponse r;
  *r.add_jobs() = SampleJob();
  const std::string list = FormatJobList(r, kNow);
  EXPECT_EQ(list.find("ID"), 0u);
  EXPECT_NE(list.find("job-42  QUANTIZING  12/28   GPTQ 4-bit g128 sym desc_act  10m00s  /data/llama\n"),
            std::string::npos)
      << list;
  EXPECT_EQ(FormatJobList(v1::ListJobsResponse(), kNow), "No jobs.\n");

  v1::ListWorkersResponse w;
  v1::WorkerInfo* info = w.add_workers();
  info->set_id("w-1");
  info->set_hostname("gpu-node-3");
  info->set_state("busy");
  info->add_backends("cpu");
  v1::DeviceInfo* d = info->add_devices();
  d->set_kind("cpu");
  d->set_name("cpu");
  d->set_memory_bytes(64ull << 30);
  info->set_current_task("t-7");
  info->set_tasks_completed(12);
  info->set_tasks_failed(1);
  info->set_last_heartbeat_unix_ms(kNow - 2'000);
  const std::string workers = FormatWorkers(w, kNow);
  EXPECT_EQ(workers,
            "ID   HOST        STATE  BACKENDS  DEVICE     TASK  DONE  FAILED  LAST SEEN\n"
            "w-1  gpu-node-3  busy   cpu       cpu 64GiB  t-7   12    1       2.0s ago\n");
  EXPECT_EQ(FormatWorkers(v1::ListWorkersResponse(), kNow), "No workers.\n");
}

TEST(Parsing, JobStates) {
  std::vector<v1::JobState> s;
  EXPECT_TRUE(ParseJobStates("queued", &s));
  EXPECT_TRUE(ParseJobStates("JOB_STATE_FAILED", &s));
  EXPECT_TRUE(ParseJobStates("Cancelled", &s));
  EXPECT_EQ(s, (std::vector<v1::JobState>{v1::JOB_STATE_QUEUED, v1::JOB_STATE_FAILED,
                                          v1::JOB_STATE_CANCELLED}));
  s.clear();
  EXPECT_TRUE(ParseJobStates("active", &s));
  EXPECT_EQ(s.size(), 5u);
  for (v1::JobState x : s) EXPECT_FALSE(IsTerminal(x));
  EXPECT_FALSE(ParseJobStates("running", &s));
  EXPECT_FALSE(ParseJobStates("unspecified", &s));
  EXPECT_FALSE(ParseJobStates("", &s));
}

TEST(Config, FlagsBeatEnvironmentBeatConfigFileBeatDefaults) {
  const std::string dir = std::filesystem::temp_directory_path().string() + "/qforge-cli-config-test";
  std::filesystem::create_directories(dir + "/qforge");
  const std::string path = dir + "/qforge/config.json";
  std::ofstream(path) << R"({"endpoint": "file-host:1", "token": "file-token", "other": 3})";
  std::map<std::string, std::string> env;
  auto getenv = [&env](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  };
  env["XDG_CONFIG_HOME"] = dir;
  EXPECT_EQ(DefaultConfigPath(getenv), path);

  auto c = ResolveClientConfig("", "", getenv, path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->endpoint, "file-host:1");
  EXPECT_EQ(c->token, "file-token");
  EXPECT_EQ(c->endpoint_source, "config");

  env["QFORGE_ENDPOINT"] = "http://env-host:2/";
  env["QFORGE_TOKEN"] = "env-token";
  c = ResolveClientConfig("", "", getenv, path);
  EXPECT_EQ(c->endpoint, "env-host:2");
  EXPECT_EQ(c->token, "env-token");

  c = ResolveClientConfig("flag-host:3", "flag-token", getenv, path);
  EXPECT_EQ(c->endpoint, "flag-host:3");
  EXPECT_EQ(c->token, "flag-token");
  EXPECT_EQ(c->endpoint_source, "flag");

  env.clear();
  c = ResolveClientConfig("", "", getenv, dir + "/missing.json");
  ASSERT_TRUE(c.ok()) << "a missing config file is fine";
  EXPECT_EQ(c->endpoint, "127.0.0.1:50051");
  EXPECT_EQ(c->token, "");
  EXPECT_EQ(c->endpoint_source, "default");
  env["HOME"] = "/home/someone";
  EXPECT_EQ(DefaultConfigPath(getenv), "/home/someone/.config/qforge/config.json");

  std::ofstream(path) << "{not json";
  c = ResolveClientConfig("", "", getenv, path);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find(path), std::string::npos) << c.status();
  std::ofstream(path) << R"({"endpoint": 5})";
  c = ResolveClientConfig("", "", getenv, path);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  std::filesystem::remove_all(dir);
}

TEST(Config, RequestIdsAreFreshUuids) {
  const std::regex uuid("[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}");
  std::set<std::string> seen;
  for (int i = 0; i < 100; ++i) {
    const std::string id = NewUuid();
    EXPECT_TRUE(std::regex_match(id, uuid)) << id;
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 100u);
}

TEST(Config, LocalPathsBecomeAbsolute) {
  EXPECT_EQ(AbsolutizeLocalUri("/abs/model"), "/abs/model");
  EXPECT_EQ(AbsolutizeLocalUri("s3://bucket/m"), "s3://bucket/m");
  EXPECT_EQ(AbsolutizeLocalUri("file:///x"), "file:///x");
  EXPECT_EQ(AbsolutizeLocalUri("rel/./model"),
            (std::filesystem::current_path() / "rel/model").string());
}

TEST(Counts, NameWhatTheyCount) {
  // The demo model: 28 linear layers and the ASSEMBLE task, not "0/29 layers".
  v1::TaskCounts c;
  c.set_total(29);
  c.set_layers(28);
  EXPECT_EQ(FormatDone(c), "0/28 layers + assemble");
  EXPECT_EQ(FormatPlanSummary(c), "28 layers would be quantized; 29 tasks: 28 quantize + assemble");
  // --include q_proj on a 4-layer model: 4 layers (not 5).
  c.set_total(5);
  c.set_layers(4);
  c.set_layers_succeeded(1);
  c.set_succeeded(1);
  EXPECT_EQ(FormatDone(c), "1/4 layers + assemble");
  EXPECT_DOUBLE_EQ(DoneFraction(c), 0.25);
  EXPECT_EQ(FormatPlanSummary(c), "4 layers would be quantized; 5 tasks: 4 quantize + assemble");
  // With calibration: 2 shards, the reduce and the assemble besides the layers.
  c.set_total(8);
  EXPECT_EQ(FormatDone(c), "1/4 layers + 4 stage tasks");
  c.set_layers(1);
  c.set_total(2);
  c.set_layers_succeeded(0);
  EXPECT_EQ(FormatDone(c), "0/1 layer + assemble");
  // An evaluation-only job has no layers: tasks.
  v1::TaskCounts eval;
  eval.set_total(3);
  eval.set_succeeded(1);
  EXPECT_EQ(FormatDone(eval), "1/3 tasks");
}

TEST(JobOutput, ValidateOnlyPrintsThePlanNotAnEmptyJob) {
  v1::Job plan = SampleJob();
  plan.clear_id();
  plan.clear_state();
  plan.clear_create_time_unix_ms();
  plan.clear_start_time_unix_ms();
  plan.mutable_spec()->add_include("q_proj");
  v1::TaskCounts* c = plan.mutable_tasks();
  c->Clear();
  c->set_total(5);
  c->set_layers(4);
  c->set_queued(4);
  c->set_pending(1);
  const std::string t = FormatJobTable(plan, kNow);
  EXPECT_EQ(t.find("Job:"), std::string::npos) << t;
  EXPECT_EQ(t.find("UNKNOWN"), std::string::npos) << t;
  EXPECT_EQ(t.find("Created:"), std::string::npos) << t;
  EXPECT_NE(t.find("Plan:         valid (--validate-only: no job was created)\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Method:       GPTQ 4-bit g128 sym desc_act\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Include:      q_proj\n"), std::string::npos) << t;
  EXPECT_NE(t.find("Tasks:        4 layers would be quantized; 5 tasks: 4 quantize + assemble\n"),
            std::string::npos)
      << t;
}

TEST(Commands, DidYouMeanTheNearestSubcommand) {
  const std::vector<std::string> commands = {"submit", "get",     "list",   "watch",
                                             "cancel", "workers", "eval",   "report"};
  EXPECT_EQ(SuggestCommand("sumbit", commands), "submit");  // transposition
  EXPECT_EQ(SuggestCommand("submt", commands), "submit");
  EXPECT_EQ(SuggestCommand("SUBMIT", commands), "submit");
  EXPECT_EQ(SuggestCommand("worker", commands), "workers");
  EXPECT_EQ(SuggestCommand("cancle", commands), "cancel");
  EXPECT_EQ(SuggestCommand("lsit", commands), "list");
  EXPECT_EQ(SuggestCommand("rep", commands), "report");     // a prefix of one
  EXPECT_EQ(SuggestCommand("delete", commands), "");
  EXPECT_EQ(SuggestCommand("xyz", commands), "");
  EXPECT_EQ(SuggestCommand("", commands), "");

  auto first = [](std::vector<const char*> args) {
    args.insert(args.begin(), "qforge");
    return FirstPositional(static_cast<int>(args.size()), args.data());
  };
  EXPECT_EQ(first({"sumbit", "model"}), "sumbit");
  EXPECT_EQ(first({"--endpoint", "h:1", "get", "x"}), "get");
  EXPECT_EQ(first({"--endpoint=h:1", "--timeout", "5", "lst"}), "lst");
  EXPECT_EQ(first({"--token", "t"}), "");
  EXPECT_EQ(first({"--help"}), "");
  EXPECT_EQ(first({"--version"}), "");
}

v1::LayerResult Layer(const std::string& module, v1::TaskState state, double rel_err,
                      double seconds) {
  v1::LayerResult l;
  l.set_module(module);
  l.set_out_features(64);
  l.set_in_features(128);
  l.set_state(state);
  l.set_relative_error(rel_err);
  l.set_proxy_loss(rel_err * 10);
  l.set_seconds(seconds);
  l.set_worker_id(state == v1::TASK_STATE_QUEUED ? "" : "w-1");
  if (state == v1::TASK_STATE_SUCCEEDED) l.set_bits_per_weight(4.25);
  return l;
}

TEST(Layers, TableSortsByErrorTimeOrNameAndShowsProgressAndErrors) {
  std::vector<v1::LayerResult> layers = {
      Layer("m.0.q_proj", v1::TASK_STATE_SUCCEEDED, 0.001, 2),
      Layer("m.0.k_proj", v1::TASK_STATE_RUNNING, 0, 0),
      Layer("m.0.v_proj", v1::TASK_STATE_SUCCEEDED, 0.004, 1),
      Layer("m.0.o_proj", v1::TASK_STATE_FAILED, 0, 0),
  };
  layers[1].set_progress(0.45);
  layers[1].set_phase("solve");
  layers[3].mutable_error()->set_code(3);
  layers[3].mutable_error()->set_message("NaN in the weight");
  const std::string by_error = FormatLayers(layers, "error");
  EXPECT_EQ(by_error,
            "MODULE      SHAPE   STATE      REL ERR   PROXY LOSS  BITS/W  TIME  WORKER  ATTEMPT  NOTE\n"
            "m.0.v_proj  64x128  SUCCEEDED  4.00e-03  4.00e-02    4.250   1.0s  w-1     1        -\n"
            "m.0.q_proj  64x128  SUCCEEDED  1.00e-03  1.00e-02    4.250   2.0s  w-1     1        -\n"
            "m.0.k_proj  64x128  RUNNING    -         -           -       -     w-1     1        45% solve\n"
            "m.0.o_proj  64x128  FAILED     -         -           -       -     w-1     1        NaN in the weight\n");
  const std::string by_time = FormatLayers(layers, "time");
  EXPECT_LT(by_time.find("m.0.q_proj"), by_time.find("m.0.v_proj"));
  const std::string by_name = FormatLayers(layers, "name");
  EXPECT_LT(by_name.find("m.0.q_proj"), by_name.find("m.0.k_proj"));
  EXPECT_LT(by_name.find("m.0.k_proj"), by_name.find("m.0.v_proj"));
  EXPECT_EQ(FormatLayers({}, "error"), "No layers.\n");
}

TEST(Layers, SummaryNamesTheWorstLayersAndTheMeans) {
  std::vector<v1::LayerResult> layers = {
      Layer("m.0.q_proj", v1::TASK_STATE_SUCCEEDED, 0.001, 2),
      Layer("m.0.v_proj", v1::TASK_STATE_SUCCEEDED, 0.003, 4),
      Layer("m.0.o_proj", v1::TASK_STATE_CANCELLED, 0, 0),
  };
  EXPECT_EQ(FormatLayerSummary(layers, 1),
            "Layers: 2/3 quantized, mean rel err 2.00e-03, mean 4.250 bits/weight, 6.0s of layer "
            "time (slowest m.0.v_proj, 4.0s)\n"
            "  worst 1: m.0.v_proj rel err 3.00e-03\n");
  EXPECT_EQ(FormatLayerSummary({Layer("x", v1::TASK_STATE_QUEUED, 0, 0)}), "");
}

TEST(Progress, RunningTasksAndProgressEvents) {
  google::protobuf::RepeatedPtrField<v1::RunningTask> running;
  for (int i = 0; i < 3; ++i) {
    v1::RunningTask* r = running.Add();
    r->set_module("model.layers." + std::to_string(i) + ".mlp.up_proj");
    r->set_worker_id("w-" + std::to_string(i));
    r->set_progress(0.25 * i);
    r->set_phase(i == 0 ? "" : "solve");
    r->set_elapsed_seconds(1.5 * i);
  }
  EXPECT_EQ(FormatRunning(running, 2),
            "  model.layers.0.mlp.up_proj  0%   -      0.0s  w-0\n"
            "  model.layers.1.mlp.up_proj  25%  solve  1.5s  w-1\n"
            "  ... and 1 more\n");
  v1::JobEvent e;
  e.set_time_unix_ms(1'700'000'001'000);
  e.set_job_state(v1::JOB_STATE_QUANTIZING);
  e.set_type(v1::EVENT_TYPE_PROGRESS);
  e.mutable_tasks()->set_total(15);
  e.mutable_tasks()->set_layers(14);
  e.mutable_tasks()->set_running(2);
  *e.mutable_running() = running;
  e.mutable_running()->DeleteSubrange(0, 1);
  EXPECT_EQ(FormatEventLine(e),
            "22:13:21 QUANTIZING 0/14 layers + assemble, 2 running | progress: "
            "model.layers.1.mlp.up_proj 25% solve 1.5s, model.layers.2.mlp.up_proj 50% solve 3.0s");
  v1::Job job;
  job.set_id("j-1");
  job.set_state(v1::JOB_STATE_QUANTIZING);
  *job.mutable_running() = running;
  const std::string table = FormatJobTable(job, 1'700'000'001'000);
  EXPECT_NE(table.find("Running:\n  model.layers.0.mlp.up_proj"), std::string::npos) << table;
}

}  // namespace
}  // namespace qforge::cli
