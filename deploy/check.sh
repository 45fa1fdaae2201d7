#!/usr/bin/env bash
# Offline checks of the deploy/ files (registered as the ctest `deploy_promtool`):
#   promtool check config / check rules / test rules on deploy/prometheus/,
#   the Grafana dashboard is valid JSON and every PromQL expression in it parses,
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
        e = e.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$worker", ".*")
        out.write("      - record: dashboard_expr_%d\n        expr: %s\n" % (i, json.dumps(e)))
print("dashboard: %d expressions in %d panels" % (len(exprs), len(dash["panels"])))
PY
promtool check rules "$tmp/dashboard_rules.yml"

# The Kubernetes manifests are checked by check_kubernetes.py (ctest deploy_kubernetes).
echo "deploy/check.sh: all checks passed"
