#!/usr/bin/env python3
"""A real Prometheus scrapes a real coordinator and worker while they run a job.

Registered as the ctest `prometheus_scrape` (label integration). It
  1. generates a tiny model (qforge-make-demo-model), starts qforge-coordinator and one
     qforge-worker on loopback, each with --metrics-listen 127.0.0.1:0;
  2. runs `promtool check metrics` on a live scrape of each (Prometheus naming rules);
  3. writes a test copy of deploy/prometheus/prometheus.yml in which only the targets are
     replaced by the loopback ports (job names, labels, relabelling and the alert rules file
     are the real ones) and the intervals are 1 s, and starts Debian's /usr/bin/prometheus
     on a free loopback port;
  4. runs one GPTQ job with `qforge submit --wait` and asserts series and values through
     Prometheus's HTTP API (/api/v1/query): the job counted once as succeeded, its duration
     observed, gRPC SubmitJob counted, both workers' heartbeat present and fresh, store bytes
     per scheme, process metrics of both processes, no alert firing;
  5. checks that every metric the Grafana dashboard and the alert rules name exists in the
     live scrapes (or is a GPU-only worker metric the worker source defines).
Exits 77 (ctest: skipped) when prometheus or promtool is not installed.

Usage: prometheus_scrape_test.py BUILD_DIR SOURCE_DIR
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

SKIP = 77
# Worker metrics that only a CUDA worker serves (worker/worker_main.cc).
GPU_ONLY = {"qforge_worker_device_memory_used_bytes", "qforge_worker_device_memory_total_bytes"}


class Proc:
    """A child process whose stderr goes to a file we can wait on."""

    def __init__(self, argv, log_path, env=None):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)

    def text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_for(self, pattern, timeout):
        deadline = time.time() + timeout
        rx = re.compile(pattern)
        while time.time() < deadline:
            m = rx.search(self.text())
            if m:
                return m
            if self.p.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError("no /%s/ from %s within %ss:\n%s" %
                             (pattern, self.p.args[0], timeout, self.text()[-4000:]))

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8")


def test_config(real_path, coordinator, worker, rules_path):
    """The real scrape config with loopback targets and 1 s intervals."""
    cfg = yaml.safe_load(open(real_path))
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    cfg["rule_files"] = [rules_path]
    jobs = {sc["job_name"]: sc for sc in cfg["scrape_configs"]}
    assert set(jobs) >= {"qforge-coordinator", "qforge-worker"}, sorted(jobs)
    for name, target in (("qforge-coordinator", coordinator), ("qforge-worker", worker)):
        sc = jobs[name]
        sc["scrape_interval"] = "1s"
        labels = {}
        for static in sc.get("static_configs", []):
            labels.update(static.get("labels", {}))
        for key in [k for k in sc if k.endswith("_sd_configs") or k == "static_configs"]:
            del sc[key]
        sc["static_configs"] = [{"targets": [target]}]
        if labels:
            sc["static_configs"][0]["labels"] = labels
    return cfg


class PromApi:
    def __init__(self, base):
        self.base = base

    def query(self, expr):
        url = self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(http_get(url))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def values(self, expr):
        return [float(r["value"][1]) for r in self.query(expr)]

    def wait_value(self, expr, pred, timeout=30):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            last = self.values(expr)
            if pred(last):
                return last
            time.sleep(0.5)
        raise AssertionError("%s: %s after %ss" % (expr, last, timeout))


def metric_names_in_scrape(text):
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
    return names


def referenced_metrics(expr):
    """qforge_* and process_* names an expression uses (histogram suffixes removed)."""
    out = set()
    for name in re.findall(r"\b((?:qforge|process)_[a-zA-Z0-9_]+)", expr):
        out.add(re.sub(r"_(bucket|count|sum)$", "", name))
    return out


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    build, source = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    prometheus = shutil.which("prometheus") or "/usr/bin/prometheus"
    promtool = shutil.which("promtool")
    if not os.path.exists(prometheus) or promtool is None:
        print("prometheus_scrape_test: prometheus or promtool not installed "
              "(apt-get install prometheus); skipping")
        return SKIP

    tmp = tempfile.mkdtemp(prefix="qforge-prom-")
    procs = []
    ok = False
    try:
        model = os.path.join(tmp, "model")
        subprocess.run([build + "/tools/qforge-make-demo-model", "--output", model, "--layers", "1",
                        "--hidden", "128", "--intermediate", "256", "--heads", "4",
                        "--kv-heads", "2", "--vocab", "256", "--samples", "256"],
                       check=True, capture_output=True, timeout=120)

        coordinator = Proc([build + "/server/qforge-coordinator", "--listen", "127.0.0.1:0",
                            "--data-dir", tmp + "/data", "--allow-root", tmp,
                            "--metrics-listen", "127.0.0.1:0", "--lease-ms", "2000",
                            "--heartbeat-ms", "300"], tmp + "/coordinator.log")
        procs.append(coordinator)
        m = coordinator.wait_for(r"listening on (\S+) metrics on (\S+)", 30)
        endpoint, coordinator_metrics = m.group(1), m.group(2)

        worker = Proc([build + "/worker/qforge-worker", "--coordinator", endpoint, "--threads", "1",
                       "--device", "cpu", "--metrics-listen", "127.0.0.1:0"], tmp + "/worker.log")
        procs.append(worker)
        m = worker.wait_for(r"registered with \S+ metrics on (\S+)", 30)
        worker_metrics = m.group(1)

        # Prometheus naming rules on live scrapes of both processes (again after the job, when
        # every lazily created series exists).
        scrapes = {}

        def lint_live(when):
            for name, addr in (("coordinator", coordinator_metrics), ("worker", worker_metrics)):
                text = http_get("http://%s/metrics" % addr)
                scrapes[name + " " + when] = text
                lint = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                                      capture_output=True, timeout=60)
                out = (lint.stdout + lint.stderr).decode()
                assert lint.returncode == 0 and not out.strip(), \
                    "promtool check metrics on the %s's /metrics (%s):\n%s" % (name, when, out)
                print("promtool check metrics: %s %s clean (%d families)" %
                      (name, when, len(metric_names_in_scrape(text))))
        lint_live("at start")

        # Prometheus with the real scrape config, loopback targets.
        cfg = test_config(os.path.join(source, "deploy/prometheus/prometheus.yml"),
                          coordinator_metrics, worker_metrics,
                          os.path.join(source, "deploy/prometheus/alerts.yml"))
        cfg_path = os.path.join(tmp, "prometheus.yml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(cfg, f)
        check = subprocess.run([promtool, "check", "config", cfg_path], capture_output=True,
                               timeout=60)
        assert check.returncode == 0, (check.stdout + check.stderr).decode()
        port = free_port()
        prom = Proc([prometheus, "--config.file=" + cfg_path,
                     "--storage.tsdb.path=" + tmp + "/tsdb",
                     "--web.listen-address=127.0.0.1:%d" % port], tmp + "/prometheus.log")
        procs.append(prom)
        base = "http://127.0.0.1:%d" % port
        deadline = time.time() + 60
        while True:
            try:
                if "Ready" in http_get(base + "/-/ready", timeout=2):
                    break
            except OSError:
                pass
            assert time.time() < deadline, "prometheus not ready:\n" + prom.text()[-3000:]
            time.sleep(0.3)
        api = PromApi(base)
        for job in ("qforge-coordinator", "qforge-worker"):
            api.wait_value('up{job="%s",namespace="qforge"}' % job, lambda v: v == [1.0])

        # One job, start to end.
        env = dict(os.environ, QFORGE_ENDPOINT=endpoint, NO_COLOR="1")
        r = subprocess.run([build + "/client/qforge", "submit", model, "--method", "gptq", "--bits",
                            "4", "--group-size", "128", "--hessians",
                            model + "/hessians.safetensors", "--output", tmp + "/out", "-o", "json",
                            "--wait"], env=env, capture_output=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr).decode()
        assert json.loads(r.stdout)["state"] == "JOB_STATE_SUCCEEDED", r.stdout

        c = 'job="qforge-coordinator"'
        w = 'job="qforge-worker"'
        # Each check polls (scrapes of the two targets are not simultaneous) up to 30 s.
        nonempty = lambda v: len(v) > 0
        equals = lambda *want: (lambda v: v == list(want))
        api.wait_value('qforge_jobs_finished_total{%s,method="gptq",outcome="succeeded"}' % c,
                       equals(1.0))
        api.wait_value('sum(qforge_jobs_finished_total{%s,outcome=~"failed|cancelled"})' % c,
                       equals(0.0))
        api.wait_value('qforge_jobs_submitted_total{%s,method="gptq"}' % c, equals(1.0))
        api.wait_value('qforge_job_duration_seconds_count{%s,method="gptq",outcome="succeeded"}'
                       % c, equals(1.0))
        api.wait_value('qforge_job_duration_seconds_sum{%s,method="gptq"} > 0' % c, nonempty)
        # Every layer of the 1-layer model is one QUANTIZE task (7 linear modules).
        api.wait_value('sum(qforge_task_duration_seconds_count{%s,kind="quantize"})' % c,
                       lambda v: len(v) == 1 and v[0] >= 7)
        api.wait_value('sum(qforge_worker_tasks_total{%s,kind="quantize",outcome="succeeded"})'
                       % w, lambda v: len(v) == 1 and v[0] >= 7)
        api.wait_value('qforge_tasks_queued{%s}' % c, equals(0.0))
        api.wait_value('sum(qforge_workers{%s,state=~"idle|busy"})' % c, equals(1.0))
        # Heartbeats: the worker's own view and the coordinator's, both present and fresh.
        fresh = lambda v: len(v) == 1 and 0 <= v[0] < 60
        api.wait_value('time() - qforge_worker_last_heartbeat_timestamp_seconds{%s}' % w, fresh)
        api.wait_value('time() - qforge_oldest_worker_heartbeat_timestamp_seconds{%s}' % c, fresh)
        # gRPC server metrics by method and code.
        api.wait_value('qforge_grpc_server_handled_total{%s,grpc_service="qforge.v1.JobService",'
                       'grpc_method="SubmitJob",grpc_code="OK"} >= 1' % c, nonempty)
        api.wait_value('sum(qforge_grpc_server_handled_total{%s,grpc_method="CompleteTask",'
                       'grpc_code="OK"}) >= 7' % c, nonempty)
        api.wait_value('qforge_grpc_server_handling_seconds_count{%s,grpc_method="RegisterWorker"}'
                       % c, nonempty)
        # Store traffic per scheme: the worker read the model and wrote its layers; the
        # coordinator read headers and assembled the artifact.
        for job in (c, w):
            api.wait_value('qforge_store_read_bytes_total{%s,scheme="file"} > 0' % job, nonempty)
            api.wait_value('qforge_store_written_bytes_total{%s,scheme="file"} > 0' % job, nonempty)
            api.wait_value('qforge_store_read_bytes_total{%s,scheme="s3"}' % job, equals(0.0))
            api.wait_value('sum(qforge_store_errors_total{%s})' % job, equals(0.0))
        # Process metrics of both processes.
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                     "process_open_fds", "process_start_time_seconds"):
            api.wait_value('%s > 0' % name, lambda v: len(v) == 2)
        # A CPU worker has no device memory series.
        assert api.values('qforge_worker_device_memory_used_bytes') == []
        lint_live("after the job")
        # The real alert rules are loaded and none fires on a healthy run.
        rules = json.loads(http_get(base + "/api/v1/rules"))["data"]["groups"]
        loaded = {r["name"] for g in rules for r in g["rules"]}
        for alert in ("QforgeWorkerLost", "QforgeWorkerHeartbeatStale", "QforgeJobStuck",
                      "QforgeStoreErrors"):
            assert alert in loaded, (alert, sorted(loaded))
        firing = [a for a in json.loads(http_get(base + "/api/v1/alerts"))["data"]["alerts"]
                  if a["state"] == "firing"]
        assert not firing, firing

        # The dashboard and the alert rules name only metrics that exist.
        live = set()
        for text in scrapes.values():
            live |= metric_names_in_scrape(text)
        worker_src = open(os.path.join(source, "worker/worker_main.cc")).read()
        for gpu in GPU_ONLY:
            assert '"%s"' % gpu in worker_src, gpu
        known = live | GPU_ONLY
        dash = json.load(open(os.path.join(source, "deploy/grafana/qforge-dashboard.json")))
        exprs = []

        def walk(panels):
            for p in panels:
                for t in p.get("targets", []):
                    exprs.append(("dashboard panel '%s'" % p.get("title"), t["expr"]))
                walk(p.get("panels", []))
        walk(dash["panels"])
        for v in dash.get("templating", {}).get("list", []):
            if isinstance(v.get("query"), str):
                exprs.append(("dashboard variable '%s'" % v.get("name"), v["query"]))
            elif isinstance(v.get("query"), dict) and "query" in v["query"]:
                exprs.append(("dashboard variable '%s'" % v.get("name"), v["query"]["query"]))
        alerts = yaml.safe_load(open(os.path.join(source, "deploy/prometheus/alerts.yml")))
        for g in alerts["groups"]:
            for rule in g["rules"]:
                exprs.append(("alert %s" % rule.get("alert"), rule["expr"]))
        unknown = [(where, n) for where, e in exprs for n in referenced_metrics(e) if n not in known]
        assert not unknown, "metrics that no process serves: %s" % unknown
        print("prometheus_scrape_test: %d dashboard/alert expressions reference only served "
              "metrics" % len(exprs))
        ok = True
    finally:
        for p in reversed(procs):
            p.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            for p in procs:
                print("---- %s (last lines) ----\n%s" % (p.log_path, p.text()[-2000:]))
            print("prometheus_scrape_test: logs kept in " + tmp)
    print("prometheus_scrape_test: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
