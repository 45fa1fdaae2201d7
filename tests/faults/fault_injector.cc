// The fault-test definitions of the hooks in common/fault_point.h, linked (as an object file,
// so that they replace the release no-ops) into qforge-coordinator-faults and
// qforge-worker-faults only. The plan comes from the environment:
//
//   QFORGE_FAULTS='RULE;RULE;...'   RULE = comma-separated key=value fields:
//     at=POINT       a fault point name (common/fault_point.h), or a prefix ending in '*';
//                    the store wrapper's points are store.read (Stat, ReadRange),
//                    store.write (Put, NewWriter, Append, Close, Rename), store.list (List)
//                    and store.delete (Delete, DeletePrefix)
//     match=TEXT     only where the subject contains TEXT (store points: "<store uri>/<key>";
//                    named points have the empty subject)
//     do=ACTION      kill (SIGKILL of this process), error:CODE (unavailable, internal,
//                    permission_denied, data_loss, not_found, invalid_argument,
//                    resource_exhausted, deadline_exceeded, aborted), delay:MS
//     skip=N         let the first N matching hits pass (default 0)
//     times=N        act on at most N hits (default 1; 0 = every hit)
//
// Every action is logged on stderr as "qforge-fault: fired AT [SUBJECT] -> ACTION (hit N)"
// before it happens, so a test can tell that its fault was reached. A malformed plan is
// reported on stderr and the process exits with status 2 at the first hook call.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/fault_point.h"
#include "common/forwarding_store.h"

namespace qforge {
namespace {

struct Rule {
  std::string at;
  std::string match;
  enum class Action { kKill, kError, kDelay } action = Action::kKill;
  absl::StatusCode code = absl::StatusCode::kUnavailable;
  int64_t delay_ms = 0;
  int skip = 0;
  int times = 1;
  std::string text;  // as written, for messages
  int hits = 0;      // matching hits so far
  int fired = 0;     // of which acted upon
};

absl::StatusCode ParseCode(const std::string& name, bool* ok) {
  static const std::map<std::string, absl::StatusCode> kCodes = {
      {"unavailable", absl::StatusCode::kUnavailable},
      {"internal", absl::StatusCode::kInternal},
      {"permission_denied", absl::StatusCode::kPermissionDenied},
      {"data_loss", absl::StatusCode::kDataLoss},
      {"not_found", absl::StatusCode::kNotFound},
      {"invalid_argument", absl::StatusCode::kInvalidArgument},
      {"resource_exhausted", absl::StatusCode::kResourceExhausted},
      {"deadline_exceeded", absl::StatusCode::kDeadlineExceeded},
      {"aborted", absl::StatusCode::kAborted},
  };
  auto it = kCodes.find(name);
  *ok = it != kCodes.end();
  return *ok ? it->second : absl::StatusCode::kUnknown;
}

[[noreturn]] void BadPlan(const std::string& rule, const std::string& why) {
  std::fprintf(stderr, "qforge-fault: bad QFORGE_FAULTS rule '%s': %s\n", rule.c_str(),
               why.c_str());
  std::fflush(stderr);
  std::_Exit(2);
}

std::vector<Rule> ParsePlan(const char* env) {
  std::vector<Rule> rules;
  if (env == nullptr) return rules;
  for (absl::string_view text : absl::StrSplit(env, ';', absl::SkipWhitespace())) {
    Rule r;
    r.text = std::string(text);
    bool has_do = false;
    for (absl::string_view field : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
      const size_t eq = field.find('=');
      if (eq == absl::string_view::npos) BadPlan(r.text, "a field is not key=value");
      const std::string key(field.substr(0, eq));
      const std::string value(field.substr(eq + 1));
      if (key == "at") {
        r.at = value;
      } else if (key == "match") {
        r.match = value;
      } else if (key == "do") {
        has_do = true;
        if (value == "kill") {
          r.action = Rule::Action::kKill;
        } else if (value.rfind("error:", 0) == 0) {
          bool ok = false;
          r.action = Rule::Action::kError;
          r.code = ParseCode(value.substr(6), &ok);
          if (!ok) BadPlan(r.text, "unknown error code '" + value.substr(6) + "'");
        } else if (value.rfind("delay:", 0) == 0) {
          r.action = Rule::Action::kDelay;
          if (!absl::SimpleAtoi(value.substr(6), &r.delay_ms) || r.delay_ms < 0) {
            BadPlan(r.text, "delay:MS needs a number of milliseconds");
          }
        } else {
          BadPlan(r.text, "do= is kill, error:CODE or delay:MS");
        }
      } else if (key == "skip" || key == "times") {
        int n = 0;
        if (!absl::SimpleAtoi(value, &n) || n < 0) BadPlan(r.text, key + "= needs a count");
        (key == "skip" ? r.skip : r.times) = n;
      } else {
        BadPlan(r.text, "unknown field '" + key + "'");
      }
    }
    if (r.at.empty()) BadPlan(r.text, "at= is required");
    if (!has_do) BadPlan(r.text, "do= is required");
    rules.push_back(std::move(r));
  }
  return rules;
}

bool PointMatches(const std::string& pattern, std::string_view point) {
  if (!pattern.empty() && pattern.back() == '*') {
    return point.substr(0, pattern.size() - 1) == std::string_view(pattern).substr(0, pattern.size() - 1);
  }
  return point == pattern;
}

class Injector {
 public:
  static Injector& Get() {
    static Injector* injector = new Injector(std::getenv("QFORGE_FAULTS"));
    return *injector;
  }

  absl::Status Hit(std::string_view point, std::string_view subject) {
    if (rules_.empty()) return absl::OkStatus();
    Rule::Action action;
    absl::StatusCode code = absl::StatusCode::kOk;
    int64_t delay_ms = 0;
    std::string text;
    {
      std::lock_guard<std::mutex> lock(mu_);
      Rule* chosen = nullptr;
      for (Rule& r : rules_) {
        if (!PointMatches(r.at, point)) continue;
        if (!r.match.empty() && subject.find(r.match) == std::string_view::npos) continue;
        ++r.hits;
        if (r.hits <= r.skip || (r.times > 0 && r.fired >= r.times)) continue;
        ++r.fired;
        chosen = &r;
        break;
      }
      if (chosen == nullptr) return absl::OkStatus();
      action = chosen->action;
      code = chosen->code;
      delay_ms = chosen->delay_ms;
      text = chosen->text;
      std::fprintf(stderr, "qforge-fault: fired %.*s [%.*s] -> %s (hit %d)\n",
                   static_cast<int>(point.size()), point.data(), static_cast<int>(subject.size()),
                   subject.data(), text.c_str(), chosen->hits);
      std::fflush(stderr);
    }
    switch (action) {
      case Rule::Action::kKill:
        kill(getpid(), SIGKILL);
        for (;;) pause();
      case Rule::Action::kDelay:
        std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
        return absl::OkStatus();
      case Rule::Action::kError:
        break;
    }
    return absl::Status(code, absl::StrCat("injected fault at ", std::string(point),
                                           subject.empty() ? "" : " on ", std::string(subject),
                                           " (QFORGE_FAULTS rule '", text, "')"));
  }

 private:
  explicit Injector(const char* plan) : rules_(ParsePlan(plan)) {}

  std::mutex mu_;
  std::vector<Rule> rules_;  // counters guarded by mu_
};

// A writer whose Append and Close are store.write points.
class FaultWriter final : public ObjectWriter {
 public:
  FaultWriter(std::unique_ptr<ObjectWriter> target, std::string subject)
      : target_(std::move(target)), subject_(std::move(subject)) {}
  absl::Status Append(std::string_view data) override {
    if (absl::Status s = Injector::Get().Hit("store.write", subject_); !s.ok()) return s;
    return target_->Append(data);
  }
  absl::Status Close() override {
    if (absl::Status s = Injector::Get().Hit("store.write", subject_); !s.ok()) return s;
    return target_->Close();
  }
  uint64_t bytes_written() const override { return target_->bytes_written(); }

 private:
  std::unique_ptr<ObjectWriter> target_;
  const std::string subject_;
};

// Every store the process opens: each call is a point of the plan first. Owns its target.
class FaultStore final : public ForwardingStore {
 public:
  explicit FaultStore(std::unique_ptr<ObjectStore> target)
      : ForwardingStore(target.get()), owned_(std::move(target)) {}

  absl::StatusOr<ObjectInfo> Stat(std::string_view key) override {
    if (absl::Status s = Hit("store.read", key); !s.ok()) return s;
    return ForwardingStore::Stat(key);
  }
  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override {
    if (absl::Status s = Hit("store.read", key); !s.ok()) return s;
    return ForwardingStore::ReadRange(key, offset, length, out);
  }
  absl::Status Put(std::string_view key, std::string_view data) override {
    if (absl::Status s = Hit("store.write", key); !s.ok()) return s;
    return ForwardingStore::Put(key, data);
  }
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override {
    if (absl::Status s = Hit("store.write", key); !s.ok()) return s;
    auto w = ForwardingStore::NewWriter(key);
    if (!w.ok()) return w.status();
    return std::unique_ptr<ObjectWriter>(
        std::make_unique<FaultWriter>(std::move(*w), Subject(key)));
  }
  absl::StatusOr<std::vector<ObjectInfo>> List(std::string_view prefix) override {
    if (absl::Status s = Hit("store.list", prefix); !s.ok()) return s;
    return ForwardingStore::List(prefix);
  }
  absl::Status Delete(std::string_view key) override {
    if (absl::Status s = Hit("store.delete", key); !s.ok()) return s;
    return ForwardingStore::Delete(key);
  }
  absl::Status DeletePrefix(std::string_view prefix) override {
    if (absl::Status s = Hit("store.delete", prefix); !s.ok()) return s;
    return ForwardingStore::DeletePrefix(prefix);
  }
  absl::Status Rename(std::string_view from, std::string_view to) override {
    if (absl::Status s = Hit("store.write", to); !s.ok()) return s;
    return ForwardingStore::Rename(from, to);
  }

 private:
  std::string Subject(std::string_view key) const { return absl::StrCat(uri(), "/", std::string(key)); }
  absl::Status Hit(std::string_view point, std::string_view key) const {
    return Injector::Get().Hit(point, Subject(key));
  }

  std::unique_ptr<ObjectStore> owned_;
};

}  // namespace

absl::Status FaultPoint(std::string_view name) { return Injector::Get().Hit(name, ""); }

bool FaultHooksEnabled() { return true; }

std::unique_ptr<ObjectStore> WrapStoreForFaults(std::unique_ptr<ObjectStore> store) {
  return std::make_unique<FaultStore>(std::move(store));
}

}  // namespace qforge
