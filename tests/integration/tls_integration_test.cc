// TLS on loopback with real processes (common/tls.h): certificates made with the openssl
// command in the fixture (a CA, the coordinator's certificate for 127.0.0.1, a worker's
// client certificate, and a second, unrelated CA). The coordinator serves both services over
// TLS and, with --tls-ca, requires workers to present a certificate signed by that CA; the
// CLI and the worker verify the coordinator. Plaintext to the TLS port, a client trusting the
// wrong CA, a worker without a certificate and unreadable files all fail with a message that
// says what to pass.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/integration/service_cluster.h"
#include "tests/integration/subprocess.h"

namespace qforge::testing {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

const std::string kBin = QFORGE_BIN_DIR;

class TlsTest : public ::testing::Test, protected ServiceCluster {
 protected:
  TlsTest() : ServiceCluster(kBin) {}

  void SetUp() override {
    ASSERT_TRUE(Init("qforge-tls").ok());
    pki_ = dir_ + "/pki";
    fs::create_directories(pki_);
    MakeCa("ca");
    MakeCa("rogue-ca");
    MakeCert("ca", "server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost");
    MakeCert("ca", "worker", "worker-1", "extendedKeyUsage=clientAuth");
    MakeCert("rogue-ca", "rogue-worker", "worker-2", "extendedKeyUsage=clientAuth");
  }
  void TearDown() override {
    StopAll();
    if (!HasFailure()) RemoveDir();
  }

  void OpenSsl(std::vector<std::string> args) {
    args.insert(args.begin(), "/usr/bin/openssl");  // RunCommand does not search PATH
    CommandResult r = RunCommand(args, 60s);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  void MakeCa(const std::string& name) {
    OpenSsl({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", Pem(name + ".key"), "-out", Pem(name), "-days", "2", "-subj",
             "/CN=qforge test " + name});
  }
  void MakeCert(const std::string& ca, const std::string& name, const std::string& cn,
                const std::string& extension) {
    const std::string ext = pki_ + "/" + name + ".ext";
    std::ofstream(ext) << extension << "\n";
    OpenSsl({"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", Pem(name + ".key"), "-out", pki_ + "/" + name + ".csr", "-subj",
             "/CN=" + cn});
    OpenSsl({"x509", "-req", "-in", pki_ + "/" + name + ".csr", "-CA", Pem(ca), "-CAkey",
             Pem(ca + ".key"), "-CAcreateserial", "-out", Pem(name), "-days", "2", "-extfile",
             ext});
  }
  std::string Pem(const std::string& name) const { return pki_ + "/" + name + ".pem"; }

  std::vector<std::string> ServerTls(bool mutual) const {
    std::vector<std::string> a = {"--tls-cert", Pem("server"), "--tls-key", Pem("server.key")};
    if (mutual) a.insert(a.end(), {"--tls-ca", Pem("ca")});
    return a;
  }
  std::vector<std::string> WorkerTls() const {
    return {"--tls-ca", Pem("ca"), "--tls-cert", Pem("worker"), "--tls-key", Pem("worker.key")};
  }
  // The CLI with `tls` flags before the command.
  CommandResult TlsCli(std::vector<std::string> tls, std::vector<std::string> args,
                       std::chrono::milliseconds timeout = 60s) {
    tls.insert(tls.end(), args.begin(), args.end());
    return Cli(std::move(tls), timeout);
  }

  // GPTQ of `model` into dir_/out through a CLI trusting the CA, waited for; SUCCEEDED.
  void SubmitAndExpectSuccess(const std::string& model) {
    CommandResult r = TlsCli({"--tls-ca", Pem("ca")},
                             {"submit", model, "--hessians", model + "/hessians.safetensors",
                              "--output", dir_ + "/out", "-o", "json", "--wait"},
                             180s);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_EQ(StateOf(nlohmann::json::parse(r.out, nullptr, false)), "JOB_STATE_SUCCEEDED")
        << r.out;
    EXPECT_TRUE(fs::exists(dir_ + "/out/qforge_manifest.json"));
  }

  std::string pki_;
};

TEST_F(TlsTest, MutualTlsJobRunsEndToEnd) {
  absl::StatusOr<std::string> model = MakeModel("model", 1, 128, 256);
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_TRUE(StartCoordinator("127.0.0.1:0", {"", ServerTls(/*mutual=*/true), {}}).ok());
  absl::Status w = StartWorker("", {"", WorkerTls(), {}});
  ASSERT_TRUE(w.ok()) << w;
  SubmitAndExpectSuccess(*model);
  // The CA from the environment works as the flag does.
  CommandResult r = RunCommand({kBin + "/client/qforge", "workers"}, 30s,
                 {"QFORGE_ENDPOINT=" + endpoint_, "QFORGE_TLS_CA=" + Pem("ca")});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("idle"), std::string::npos) << r.out;
}

TEST_F(TlsTest, PlaintextAndTheWrongCaFailWithAMessageAboutTls) {
  ASSERT_TRUE(StartCoordinator("127.0.0.1:0", {"", ServerTls(/*mutual=*/false), {}}).ok());
  CommandResult r = Cli({"--timeout", "5", "list"}, 30s);
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_NE(r.err.find("--tls-ca"), std::string::npos) << r.err;
  r = TlsCli({"--tls-ca", Pem("rogue-ca"), "--timeout", "5"}, {"list"}, 30s);
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_NE(r.err.find("TLS handshake"), std::string::npos) << r.err;
  r = TlsCli({"--tls-ca", Pem("ca")}, {"list"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  // A plaintext worker keeps retrying and says why it may fail.
  Subprocess plain({kBin + "/worker/qforge-worker", "--coordinator", endpoint_},
                   dir_ + "/plain-worker");
  EXPECT_TRUE(plain.WaitForStderr(std::regex("pass --tls-ca"), 20s).has_value())
      << plain.Stderr();
  // Server TLS without --tls-ca: a worker needs no certificate of its own.
  absl::Status w = StartWorker("", {"", {"--tls-ca", Pem("ca")}, {}});
  EXPECT_TRUE(w.ok()) << w;
}

TEST_F(TlsTest, WorkersWithoutACertificateOrWithAForeignOneAreRefused) {
  ASSERT_TRUE(StartCoordinator("127.0.0.1:0", {"", ServerTls(/*mutual=*/true), {}}).ok());
  // No client certificate: the handshake succeeds, the WorkerService refuses, the worker exits.
  Subprocess bare({kBin + "/worker/qforge-worker", "--coordinator", endpoint_, "--tls-ca",
                   Pem("ca")},
                  dir_ + "/bare-worker");
  std::optional<int> code = bare.Wait(30s);
  ASSERT_TRUE(code.has_value()) << "the worker kept running: " << bare.Stderr();
  EXPECT_EQ(*code, 1) << bare.Stderr();
  EXPECT_NE(bare.Stderr().find("requires mutual TLS"), std::string::npos) << bare.Stderr();
  // A certificate of another CA fails the handshake: it never registers.
  Subprocess rogue({kBin + "/worker/qforge-worker", "--coordinator", endpoint_, "--tls-ca",
                    Pem("ca"), "--tls-cert", Pem("rogue-worker"), "--tls-key",
                    Pem("rogue-worker.key")},
                   dir_ + "/rogue-worker");
  EXPECT_FALSE(rogue.WaitForStderr(std::regex("registered"), 3s).has_value()) << rogue.Stderr();
  // The job API needs no client certificate.
  CommandResult r = TlsCli({"--tls-ca", Pem("ca")}, {"workers"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find("worker-"), std::string::npos) << r.out;
}

TEST_F(TlsTest, BadTlsFlagsAreUsageErrorsNamingTheFlagAndFile) {
  CommandResult r = RunCommand({kBin + "/server/qforge-coordinator", "--listen", "127.0.0.1:0",
                                "--data-dir", dir_ + "/data", "--metrics-listen", "off",
                                "--tls-cert", pki_ + "/missing.pem", "--tls-key",
                                Pem("server.key")},
                               30s);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("--tls-cert " + pki_ + "/missing.pem: the file does not exist"),
            std::string::npos)
      << r.err;
  r = RunCommand({kBin + "/server/qforge-coordinator", "--listen", "127.0.0.1:0", "--data-dir",
                  dir_ + "/data", "--metrics-listen", "off", "--tls-cert", Pem("server")},
                 30s);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("--tls-cert is given without --tls-key"), std::string::npos) << r.err;
  // A key where the certificate goes: not a certificate; the key file's bytes are not shown.
  r = RunCommand({kBin + "/server/qforge-coordinator", "--listen", "127.0.0.1:0", "--data-dir",
                  dir_ + "/data", "--metrics-listen", "off", "--tls-cert", Pem("server.key"),
                  "--tls-key", Pem("server.key")},
                 30s);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("not a PEM file holding a certificate"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("PRIVATE KEY-----\n"), std::string::npos) << r.err;
  r = RunCommand({kBin + "/client/qforge", "--tls-ca", pki_ + "/nope.pem", "list"}, 30s);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--tls-ca " + pki_ + "/nope.pem"), std::string::npos) << r.err;
  r = RunCommand({kBin + "/worker/qforge-worker", "--coordinator", "127.0.0.1:1", "--tls-key",
                  Pem("worker.key")},
                 30s);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--tls-key is given without --tls-cert"), std::string::npos) << r.err;
}

TEST_F(TlsTest, LocalWorkersOfATlsCoordinatorConnectOverTls) {
  absl::StatusOr<std::string> model = MakeModel("model", 1, 128, 256);
  ASSERT_TRUE(model.ok()) << model.status();
  std::vector<std::string> args = ServerTls(/*mutual=*/true);
  args.insert(args.end(), {"--local-workers", "1", "--worker-binary",
                           kBin + "/worker/qforge-worker"});
  ASSERT_TRUE(StartCoordinator("127.0.0.1:0", {"", args, {}}).ok());
  SubmitAndExpectSuccess(*model);
}

}  // namespace
}  // namespace qforge::testing
