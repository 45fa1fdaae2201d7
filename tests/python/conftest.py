"""Fixtures of the Python client's tests: real qforge-coordinator and qforge-worker processes
on loopback over a generated Llama-shaped model (tools/qforge-make-demo-model), as
tests/integration/service_test.cc starts them. QFORGE_BIN_DIR is the CMake build directory."""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time

import pytest

BIN = os.environ.get("QFORGE_BIN_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))


class Process:
    """A child process whose stderr goes to a file; killed (and waited for) on stop()."""

    def __init__(self, args, log_path, env=None):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._log,
                                     env=env, start_new_session=True)

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for_log(self, pattern, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen in {self.log_path}:\n{self.log()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Service:
    """A coordinator (optionally with workers) under `root`."""

    def __init__(self, root, name, workers=0, tokens=None, allow_roots=(), coordinator_args=(),
                 worker_args=()):
        self.root = root
        self.procs = []
        args = [os.path.join(BIN, "server", "qforge-coordinator"), "--listen", "127.0.0.1:0",
                "--data-dir", os.path.join(root, name + "-data"), "--metrics-listen",
                "127.0.0.1:0", "--lease-ms", "2000", "--heartbeat-ms", "300",
                "--allow-root", root]
        for extra in allow_roots:  # e.g. pytest's tmp_path base: tests write outputs there
            args += ["--allow-root", str(extra)]
        if tokens:
            path = os.path.join(root, name + "-tokens")
            with open(path, "w") as f:
                f.writelines(f"{t} {tenant}\n" for t, tenant in tokens.items())
            args += ["--tokens-file", path, "--worker-token", "worker-secret"]
        args += list(coordinator_args)
        self.coordinator = Process(args, os.path.join(root, name + "-coordinator.log"))
        self.procs.append(self.coordinator)
        m = self.coordinator.wait_for_log(r"qforge-coordinator listening on (\S+) metrics on (\S+)")
        self.endpoint = m.group(1)
        for i in range(workers):
            w = Process([os.path.join(BIN, "worker", "qforge-worker"), "--coordinator",
                         self.endpoint, "--threads", "1"] +
                        (["--token", "worker-secret"] if tokens else []) + list(worker_args),
                        os.path.join(root, f"{name}-worker-{i}.log"))
            self.procs.append(w)
            w.wait_for_log(r"qforge-worker \S+ registered")

    def stop(self):
        for p in reversed(self.procs):
            p.stop()


def make_model(root, name, layers=2, hidden=128, intermediate=256, data=False):
    path = os.path.join(root, name)
    args = [os.path.join(BIN, "tools", "qforge-make-demo-model"), "--output", path,
            "--layers", str(layers), "--hidden", str(hidden), "--intermediate",
            str(intermediate), "--heads", "4", "--kv-heads", "2", "--vocab", "256",
            "--samples", "64"]
    if data:
        args += ["--calibration-out", path + "-calib.safetensors", "--calib-samples", "4",
                 "--calib-seq-len", "16", "--eval-out", path + "-eval.safetensors",
                 "--eval-samples", "4", "--eval-seq-len", "16"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return path


def corrupt_tensor(model_dir, tensor):
    """Overwrites the start of `tensor`'s data with 0xff bytes (NaN in bf16/f16); the header
    stays valid, so the job fails only when a worker reads the weights."""
    for name in os.listdir(model_dir):
        if not name.endswith(".safetensors") or name.startswith("hessians"):
            continue
        path = os.path.join(model_dir, name)
        with open(path, "r+b") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            if tensor not in header:
                continue
            begin = header[tensor]["data_offsets"][0]
            f.seek(8 + n + begin)
            f.write(b"\xff" * 4096)
            return
    raise AssertionError(f"{tensor} not found in {model_dir}")


@pytest.fixture(scope="session")
def root():
    d = tempfile.mkdtemp(prefix="qforge-py-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def model(root):
    return make_model(root, "model", data=True)


@pytest.fixture(scope="session")
def service(root, tmp_path_factory):
    """A coordinator with two workers, authentication off."""
    s = Service(root, "svc", workers=2, allow_roots=[tmp_path_factory.getbasetemp()])
    yield s
    s.stop()


@pytest.fixture(scope="session")
def idle_service(root, tmp_path_factory):
    """A coordinator with no worker (jobs stay QUEUED) and tokens: tenant-a, tenant-b."""
    s = Service(root, "idle", workers=0, tokens={"token-a": "tenant-a", "token-b": "tenant-b"},
                allow_roots=[tmp_path_factory.getbasetemp()])
    yield s
    s.stop()
