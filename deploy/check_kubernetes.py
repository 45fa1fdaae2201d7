#!/usr/bin/env python3
"""Checks the Kubernetes manifests of deploy/kubernetes/ (ctest `deploy_kubernetes`).

  check_kubernetes.py --coordinator BIN --worker BIN [--kubectl]

What it checks, on the base's resources plus each overlay (its files, generators and patch
targets), and again on `kubectl kustomize` output where kubectl is installed:
  - every YAML document parses and has apiVersion, kind and metadata.name; the base names no
    namespace (the overlay sets it);
  - every kustomization's resources, patches and generator files exist; patches name a
    resource of the base;
  - workloads: the selector matches the pod template's labels; each container has an image,
    resource requests and a memory limit; every flag in `args` is a flag of the binary
    (its --help); probes use a named container port whose number is the port of the flag that
    serves it (--metrics-listen for /healthz, /readyz, /metrics; --listen for grpc), and the
    fixed paths /healthz (startup, liveness) and /readyz (readiness);
  - the worker asks for exactly one nvidia.com/gpu and its terminationGracePeriodSeconds
    exceeds --drain-seconds; the coordinator is one replica with a ReadWriteOnce volume;
  - Services select a workload and target its named ports; PodDisruptionBudgets select a
    workload; the HPA scales the worker Deployment on qforge_tasks_queued, a metric the
    coordinator exports (server/metrics.cc);
  - every Secret / ConfigMap a workload reads is defined (by the overlay's generators) with the
    keys it reads, unless the reference is optional;
  - prometheus.yml scrapes the ports the Services expose.
Exit status 0 when all hold; 1 with one line per finding otherwise. `--self-test` breaks a
copy of the manifests in known ways and fails unless each break is reported.
"""
import argparse
import copy
import os
import re
import shutil
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
KUBE = os.path.join(HERE, "kubernetes")
ROOT = os.path.dirname(HERE)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def flags_of(binary):
    """The long flags a binary's --help lists."""
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout + out.stderr))


def arg_value(args, flag):
    for a in args:
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def port_of(address):
    return int(address.rsplit(":", 1)[1]) if address and ":" in address else None


class Checker:
    def __init__(self, binaries, metric_names):
        self.binaries = binaries  # command name -> set of flags (None: binary not given)
        self.metric_names = metric_names
        self.findings = []

    def fail(self, where, msg):
        self.findings.append("%s: %s" % (where, msg))

    # ---- kustomize structure -------------------------------------------------------------
    def check_kustomization(self, directory, base_resources=None):
        """Returns (resources, generated) where generated maps Secret/ConfigMap name -> keys."""
        kpath = os.path.join(directory, "kustomization.yaml")
        where = os.path.relpath(kpath, ROOT)
        k = load_docs(kpath)[0]
        resources, generated = [], {}
        for r in k.get("resources", []):
            p = os.path.join(directory, r)
            if os.path.isdir(p):
                sub, gen = self.check_kustomization(p)
                resources += sub
                generated.update(gen)
            elif os.path.isfile(p):
                for d in load_docs(p):
                    resources.append((os.path.relpath(p, ROOT), d))
            else:
                self.fail(where, "resource %s does not exist" % r)
        for kind, key in (("Secret", "secretGenerator"), ("ConfigMap", "configMapGenerator")):
            for g in k.get(key, []):
                keys = set()
                for f in g.get("files", []):
                    name, _, src = f.partition("=")
                    src = src or name
                    if not os.path.isfile(os.path.join(directory, src)):
                        self.fail(where, "%s %s: file %s does not exist" % (key, g["name"], src))
                    keys.add(name if "=" in f else os.path.basename(src))
                for e in g.get("envs", []):
                    p = os.path.join(directory, e)
                    if not os.path.isfile(p):
                        self.fail(where, "%s %s: env file %s does not exist" % (key, g["name"], e))
                        continue
                    for line in open(p):
                        line = line.strip()
                        if line and not line.startswith("#") and "=" in line:
                            keys.add(line.split("=", 1)[0])
                for lit in g.get("literals", []):
                    keys.add(lit.split("=", 1)[0])
                generated[(kind, g["name"])] = keys
        names = {(d.get("kind"), d.get("metadata", {}).get("name")) for _, d in resources}
        for p in k.get("patches", []):
            if "path" in p:
                pp = os.path.join(directory, p["path"])
                if not os.path.isfile(pp):
                    self.fail(where, "patch %s does not exist" % p["path"])
                    continue
                for d in load_docs(pp):
                    t = (d.get("kind"), d.get("metadata", {}).get("name"))
                    if t not in names:
                        self.fail(where, "patch %s targets %s/%s, which no resource defines"
                                  % (p["path"], t[0], t[1]))
            if "target" in p:
                t = (p["target"].get("kind"), p["target"].get("name"))
                if t not in names:
                    self.fail(where, "patch targets %s/%s, which no resource defines" % t)
        return resources, generated

    # ---- resources -----------------------------------------------------------------------
    def check_resources(self, resources, generated, base=True, complete=True):
        by_kind = {}
        for where, d in resources:
            for field in ("apiVersion", "kind"):
                if field not in d:
                    self.fail(where, "a resource without %s" % field)
            meta = d.get("metadata") or {}
            if "name" not in meta:
                self.fail(where, "%s without metadata.name" % d.get("kind"))
                continue
            if base and "namespace" in meta and d.get("kind") != "Namespace":
                self.fail(where, "%s/%s names namespace %s; the overlay sets the namespace"
                          % (d["kind"], meta["name"], meta["namespace"]))
            by_kind.setdefault(d.get("kind"), []).append((where, d))
            if d.get("kind") in ("Secret", "ConfigMap"):
                keys = set((d.get("data") or {}).keys()) | set((d.get("stringData") or {}).keys())
                generated[(d["kind"], meta["name"])] = keys
        workloads = by_kind.get("Deployment", []) + by_kind.get("StatefulSet", [])
        if complete and not any(d["metadata"]["name"] == "qforge-coordinator"
                                for _, d in by_kind.get("StatefulSet", [])):
            self.fail("kubernetes", "no StatefulSet qforge-coordinator")
        if complete and not any(d["metadata"]["name"] == "qforge-worker"
                                for _, d in by_kind.get("Deployment", [])):
            self.fail("kubernetes", "no Deployment qforge-worker")
        for where, d in workloads:
            self.check_workload(where, d, generated)
        for where, d in by_kind.get("Service", []):
            self.check_service(where, d, workloads)
        for where, d in by_kind.get("PodDisruptionBudget", []):
            sel = d["spec"].get("selector", {}).get("matchLabels", {})
            if not any(self.selects(sel, w) for _, w in workloads):
                self.fail(where, "PodDisruptionBudget %s selects no workload" % d["metadata"]["name"])
            if ("maxUnavailable" in d["spec"]) == ("minAvailable" in d["spec"]):
                self.fail(where, "PodDisruptionBudget needs exactly one of maxUnavailable, minAvailable")
        hpas = by_kind.get("HorizontalPodAutoscaler", [])
        if complete and not hpas:
            self.fail("kubernetes", "no HorizontalPodAutoscaler for the workers")
        for where, d in hpas:
            ref = d["spec"]["scaleTargetRef"]
            if (ref.get("kind"), ref.get("name")) != ("Deployment", "qforge-worker"):
                self.fail(where, "the HPA scales %s/%s, not Deployment/qforge-worker"
                          % (ref.get("kind"), ref.get("name")))
            for m in d["spec"].get("metrics", []):
                name = m.get("external", {}).get("metric", {}).get("name")
                if name and name not in self.metric_names:
                    self.fail(where, "the HPA reads %s, which the coordinator does not export" % name)
        return by_kind

    @staticmethod
    def selects(match_labels, workload):
        labels = workload["spec"]["template"]["metadata"].get("labels", {})
        return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())

    def check_workload(self, where, d, generated):
        name = d["metadata"]["name"]
        spec = d["spec"]
        tmpl = spec["template"]
        sel = spec.get("selector", {}).get("matchLabels", {})
        if not self.selects(sel, d):
            self.fail(where, "%s: selector %s does not match the pod template's labels" % (name, sel))
        pod = tmpl["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("containers", []):
            cw = "%s container %s" % (name, c.get("name"))
            if not c.get("image"):
                self.fail(where, cw + ": no image")
            res = c.get("resources", {})
            if not res.get("requests"):
                self.fail(where, cw + ": no resource requests")
            if "memory" not in res.get("limits", {}):
                self.fail(where, cw + ": no memory limit")
            args = [str(a) for a in c.get("args", [])]
            cmd = (c.get("command") or [""])[0]
            flags = self.binaries.get(cmd)
            if cmd not in self.binaries:
                self.fail(where, cw + ": command %r is none of %s" % (cmd, sorted(self.binaries)))
            elif flags is not None:
                for a in args:
                    if a.startswith("--") and a.split("=", 1)[0] not in flags:
                        self.fail(where, cw + ": %s is not a flag of %s (--help)" % (a.split("=", 1)[0], cmd))
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            metrics_port = port_of(arg_value(args, "--metrics-listen"))
            grpc_port = port_of(arg_value(args, "--listen"))
            expected_paths = {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                              "readinessProbe": "/readyz"}
            for probe_name, path in expected_paths.items():
                probe = c.get(probe_name)
                if not probe:
                    self.fail(where, cw + ": no %s" % probe_name)
                    continue
                if "httpGet" in probe:
                    hg = probe["httpGet"]
                    port = ports.get(hg["port"]) if isinstance(hg["port"], str) else hg["port"]
                    if port is None:
                        self.fail(where, cw + ": %s uses port %r, which the container does not name"
                                  % (probe_name, hg["port"]))
                    elif port != metrics_port:
                        self.fail(where, cw + ": %s probes port %s but --metrics-listen serves %s"
                                  % (probe_name, port, metrics_port))
                    if hg.get("path") != path:
                        self.fail(where, cw + ": %s probes %s; the fixed endpoint is %s"
                                  % (probe_name, hg.get("path"), path))
                elif "grpc" in probe:
                    if probe["grpc"].get("port") != grpc_port:
                        self.fail(where, cw + ": %s probes gRPC port %s but --listen serves %s"
                                  % (probe_name, probe["grpc"].get("port"), grpc_port))
                else:
                    self.fail(where, cw + ": %s is neither httpGet nor grpc" % probe_name)
            for pname, num in ports.items():
                if num not in (metrics_port, grpc_port):
                    self.fail(where, cw + ": port %s (%s) is served by no flag" % (pname, num))
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    self.check_ref(where, cw, "Secret", ref["name"], ref.get("key"),
                                   ref.get("optional", False), generated)
            for e in c.get("envFrom", []):
                for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                    if key in e:
                        self.check_ref(where, cw, kind, e[key]["name"], None,
                                       e[key].get("optional", False), generated)
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in {
                        t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}:
                    self.fail(where, cw + ": mounts volume %s, which the pod does not define" % m["name"])
            if name == "qforge-worker":
                gpus = res.get("limits", {}).get("nvidia.com/gpu")
                if str(gpus) != "1":
                    self.fail(where, cw + ": nvidia.com/gpu limit is %s, not 1" % gpus)
                drain = arg_value(args, "--drain-seconds")
                grace = pod.get("terminationGracePeriodSeconds", 30)
                if drain is None or not grace > int(drain):
                    self.fail(where, cw + ": terminationGracePeriodSeconds %s must exceed --drain-seconds %s"
                              % (grace, drain))
        for v in volumes.values():
            if "secret" in v:
                items = [i["key"] for i in v["secret"].get("items", [])]
                for key in items or [None]:
                    self.check_ref(where, name, "Secret", v["secret"]["secretName"], key,
                                   v["secret"].get("optional", False), generated)
        if d["kind"] == "StatefulSet" and name == "qforge-coordinator":
            if spec.get("replicas") != 1:
                self.fail(where, "the coordinator must have exactly 1 replica (SQLite has one writer)")
            for t in spec.get("volumeClaimTemplates", []):
                if t["spec"].get("accessModes") != ["ReadWriteOnce"]:
                    self.fail(where, "the coordinator's state volume must be ReadWriteOnce (SQLite WAL)")

    def check_ref(self, where, who, kind, name, key, optional, generated):
        # kubectl kustomize appends a content hash to generated names.
        keys = generated.get((kind, name))
        if keys is None:
            for (k, n), ks in generated.items():
                if k == kind and re.fullmatch(re.escape(n) + r"-[a-z0-9]{10}", name):
                    keys = ks
        if keys is None:
            if not optional:
                self.fail(where, "%s reads %s %s, which is not defined" % (who, kind, name))
        elif key is not None and key not in keys:
            self.fail(where, "%s reads key %s of %s %s, which has only %s"
                      % (who, key, kind, name, sorted(keys)))

    def check_service(self, where, d, workloads):
        sel = d["spec"].get("selector", {})
        targets = [w for _, w in workloads if self.selects(sel, w)]
        if not targets:
            self.fail(where, "Service %s selects no workload" % d["metadata"]["name"])
            return
        names = {p.get("name") for w in targets for c in w["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for p in d["spec"].get("ports", []):
            tp = p.get("targetPort", p.get("port"))
            if isinstance(tp, str) and tp not in names:
                self.fail(where, "Service %s targets port %s, which its pods do not name"
                          % (d["metadata"]["name"], tp))

    def check_prometheus(self, by_kind):
        cfg = load_docs(os.path.join(HERE, "prometheus", "prometheus.yml"))[0]
        service_ports = {(d["metadata"]["name"], p["port"])
                         for _, d in by_kind.get("Service", []) for p in d["spec"]["ports"]}
        for sc in cfg.get("scrape_configs", []):
            for st in sc.get("static_configs", []):
                for t in st.get("targets", []):
                    host, port = t.rsplit(":", 1)
                    if (host.split(".")[0], int(port)) not in service_ports:
                        self.fail("prometheus.yml", "job %s scrapes %s, no Service port" % (sc["job_name"], t))
            for dns in sc.get("dns_sd_configs", []):
                for n in dns.get("names", []):
                    if (n.split(".")[0], dns.get("port")) not in service_ports:
                        self.fail("prometheus.yml", "job %s resolves %s:%s, no Service port"
                                  % (sc["job_name"], n, dns.get("port")))


def exported_metrics():
    names = set()
    for f in ("server/metrics.cc", "server/metrics.h"):
        p = os.path.join(ROOT, f)
        if os.path.isfile(p):
            names |= set(re.findall(r'"(qforge_[a-z0-9_]+)"', open(p).read()))
    return names


def run_checks(kube_dir, binaries, use_kubectl):
    c = Checker(binaries, exported_metrics())
    base_res, _ = c.check_kustomization(os.path.join(kube_dir, "base"))
    overlays = os.path.join(kube_dir, "overlays")
    for o in sorted(os.listdir(overlays)):
        od = os.path.join(overlays, o)
        res, generated = c.check_kustomization(od)
        own = [(w, d) for w, d in res if not w.startswith(os.path.relpath(os.path.join(kube_dir, "base"), ROOT))]
        c.check_resources(own, generated, base=False, complete=False)
        by_kind = c.check_resources(base_res, dict(generated), base=True)
        c.check_prometheus(by_kind)
        if use_kubectl:
            out = subprocess.run(["kubectl", "kustomize", od], capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                c.fail(os.path.relpath(od, ROOT), "kubectl kustomize failed: " + out.stderr.strip())
            else:
                docs = [("kubectl kustomize " + o, d) for d in yaml.safe_load_all(out.stdout) if d]
                c.check_resources(docs, {}, base=False)
                print("%s: kubectl kustomize renders %d resources" % (o, len(docs)))
    return c.findings


def self_test(binaries, use_kubectl):
    """Each break must be reported."""
    breaks = [
        ("worker probe port", "base/worker.yaml", "--metrics-listen=0.0.0.0:9465", "--metrics-listen=0.0.0.0:9466"),
        ("coordinator probe path", "base/coordinator.yaml", "path: /readyz", "path: /ready"),
        ("unknown flag", "base/worker.yaml", "--drain-seconds=30", "--drain-secs=30"),
        ("gpu count", "base/worker.yaml", "nvidia.com/gpu: 1", "nvidia.com/gpu: 2"),
        ("secret key", "base/coordinator.yaml", "key: worker-token", "key: worker-tokn"),
        ("PDB selector", "base/pdb.yaml", "app.kubernetes.io/name: qforge-worker", "app.kubernetes.io/name: qforge-wrker"),
        ("missing overlay file", "overlays/example/kustomization.yaml", "tokens=tokens.example", "tokens=tokens.missing"),
    ]
    ok = True
    for label, rel, old, new in breaks:
        tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), "qf-kube-selftest-%d" % os.getpid())
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(KUBE, tmp)
        p = os.path.join(tmp, rel)
        s = open(p).read()
        assert old in s, "self-test: %r not in %s" % (old, rel)
        open(p, "w").write(s.replace(old, new, 1))
        findings = run_checks(tmp, binaries, use_kubectl=False)
        shutil.rmtree(tmp, ignore_errors=True)
        print("self-test %-24s %s" % (label + ":", findings[0] if findings else "NOT REPORTED"))
        ok = ok and bool(findings)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coordinator", help="qforge-coordinator binary (checks flags against --help)")
    ap.add_argument("--worker", help="qforge-worker binary")
    ap.add_argument("--kubectl", action="store_true", help="also check `kubectl kustomize` output when kubectl exists")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    binaries = {"qforge-coordinator": flags_of(a.coordinator) if a.coordinator else None,
                "qforge-worker": flags_of(a.worker) if a.worker else None}
    use_kubectl = a.kubectl and shutil.which("kubectl") is not None
    findings = run_checks(KUBE, binaries, use_kubectl)
    for f in findings:
        print("FINDING " + f)
    if findings:
        return 1
    print("deploy/kubernetes: no findings%s" % ("" if use_kubectl else " (kubectl not used)"))
    if a.self_test and not self_test(binaries, use_kubectl):
        print("self-test: a break went unreported")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
