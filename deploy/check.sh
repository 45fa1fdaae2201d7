#!/usr/bin/env bash
# Offline checks of the deploy/ files (registered as the ctest `deploy_promtool`):
#   promtool check config / check rules / test rules on deploy/prometheus/,
#   the Grafana dashboard is valid JSON and every PromQL expression in it parses,
#   the Kubernetes manifests are valid YAML and every HTTP probe targets /healthz or /readyz
#   on a port the container declares, which its --metrics-listen flag serves (when python3 has
#   the yaml module).
# Exits 77 (ctest: skipped) when promtool is not installed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! command -v promtool >/dev/null 2>&1; then
  echo "deploy/check.sh: promtool not found; skipping"
  exit 77
fi
promtool check config "$here/prometheus/prometheus.yml"
promtool check config "$here/prometheus/prometheus-local.yml"
promtool check rules "$here/prometheus/alerts.yml"
promtool test rules "$here/prometheus/alerts_test.yml"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# Dashboard expressions, with Grafana's variables replaced, as recording rules for promtool.
python3 - "$here/grafana/qforge-dashboard.json" "$tmp/dashboard_rules.yml" <<'PY'
import json, sys
dash = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for p in panels:
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
        walk(p.get("panels", []))
walk(dash["panels"])
assert exprs, "no expressions in the dashboard"
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, e) in enumerate(exprs):
        e = e.replace("$__rate_interval", "5m").replace("$instance", ".*")
        out.write("      - record: dashboard_expr_%d\n        expr: %s\n" % (i, json.dumps(e)))
print("dashboard: %d expressions in %d panels" % (len(exprs), len(dash["panels"])))
PY
promtool check rules "$tmp/dashboard_rules.yml"

if python3 -c 'import yaml' 2>/dev/null; then
  python3 - "$here"/kubernetes/*.yaml <<'PY'
import sys, yaml
for path in sys.argv[1:]:
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    for d in docs:
        if "apiVersion" in d and d.get("kind") != "Kustomization":
            assert "kind" in d and "metadata" in d, "%s: a resource without kind/metadata" % path
        if d.get("kind") in ("Deployment", "StatefulSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
                listen = [a.split("=", 1)[1] for a in c.get("args", [])
                          if a.startswith("--metrics-listen=")]
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    get = c.get(probe, {}).get("httpGet")
                    if get is None:
                        continue
                    where = "%s: %s %s" % (path, c["name"], probe)
                    want = "/readyz" if probe == "readinessProbe" else "/healthz"
                    assert get["path"] == want, "%s: path %s, expected %s" % (where, get["path"], want)
                    port = ports.get(get["port"], get["port"])
                    assert listen and listen[0].endswith(":%s" % port), \
                        "%s: port %s is not the --metrics-listen port (%s)" % (where, port, listen)
    print("%s: %d document(s)" % (path, len(docs)))
PY
fi
echo "deploy/check.sh: all checks passed"
