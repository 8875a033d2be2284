#!/usr/bin/env bash
# The local demo (make demo): the mesh harness (e2e/src/mesh.rs, binary
# target/debug/mesh) builds 2 clusters x 2 nodes x 2 pods in network
# namespaces from the product's real parts (TLS etcds, apiservers, node
# agents with the eBPF datapath and WireGuard, pods attached by the CNI
# plugin), connects them with `clustermesh connect`, declares a global
# service, then runs the check (connectivity matrix, global service,
# encryption on the wire) and `clustermesh status`. The mesh is left
# running; `make demo-down` removes it (from target/mesh/topology.json).
#
# TUNNEL=vxlan|geneve|direct (default vxlan), ENCRYPTION=strict|wireguard|none
# (default strict), IP_FAMILY=ipv4|ipv6|dual (default ipv4),
# CLUSTERS/NODES/PODS (default 2/2/2).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
STATE=target/mesh
TUNNEL=${TUNNEL:-vxlan}
ENCRYPTION=${ENCRYPTION:-strict}
IP_FAMILY=${IP_FAMILY:-ipv4}

down() {
  if [ -e "$STATE/topology.json" ]; then
    if [ -x "$BIN/mesh" ]; then
      "$BIN/mesh" --state-dir "$STATE" down
    else
      echo "demo: $STATE/topology.json exists but $BIN/mesh is not built: run make build first" >&2
      exit 1
    fi
  else
    echo "no demo running"
  fi
}

up() {
  [ "$(id -u)" = 0 ] || { echo "demo: run as root (network namespaces, eBPF)" >&2; exit 1; }
  "$BIN/mesh" --state-dir "$STATE" up --clusters "${CLUSTERS:-2}" --nodes "${NODES:-2}" \
    --pods "${PODS:-2}" --tunnel "$TUNNEL" --encryption "$ENCRYPTION" \
    --ip-family "$IP_FAMILY"
  local rc=0
  echo
  echo "== pods (from $STATE/topology.json)"
  python3 - "$STATE/topology.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
print("  %-8s %-8s %-8s %-12s %-22s %s" % ("cluster", "node", "pod", "ip", "ipv6", "namespace"))
for p in t["pods"]:
    print("  %-8s %-8s %-8s %-12s %-22s %s" % (p["cluster"], p["node"], p["name"], p.get("ip") or "-", p.get("ipv6") or "-", p["netns"]))
PY
  echo
  echo "== check: every pod to pods of every cluster (ping, TCP), the global service, the wire"
  "$BIN/mesh" --state-dir "$STATE" check || rc=1
  echo
  echo "== clustermesh status"
  "$BIN/clustermesh" --config-dir "$STATE/cli" status || rc=1
  echo
  echo "== clustermesh service list"
  "$BIN/clustermesh" --config-dir "$STATE/cli" service list || rc=1
  echo
  echo "== clustermesh observe --last 6 (flows of every node of both clusters)"
  "$BIN/clustermesh" --config-dir "$STATE/cli" observe --last 6 || rc=1
  local c1pod c2ip node
  c1pod=$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); print(t["pods"][0]["netns"])' "$STATE/topology.json")
  c2ip=$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); p=[p for p in t["pods"] if p["cluster"]!="c1"][0]; print(p.get("ip") or p["ipv6"])' "$STATE/topology.json" 2>/dev/null || true)
  node=$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); print(t["nodes"][0]["netns"])' "$STATE/topology.json")
  echo
  echo "The mesh is left running ($TUNNEL, encryption $ENCRYPTION, $IP_FAMILY). Explore:"
  echo "  ip netns list                                     # every node and pod namespace"
  [ -n "$c2ip" ] && echo "  ip netns exec $c1pod ping $c2ip         # a c1 pod to a c2 pod"
  [ "$IP_FAMILY" != ipv6 ] && echo "  ip netns exec $c1pod bash -c 'cat </dev/tcp/10.96.0.10/80'   # the global service"
  echo "  ip netns exec $node tcpdump -ni ul0              # the underlay"
  echo "  $BIN/clustermesh --config-dir $STATE/cli status -o json"
  echo "  $BIN/clustermesh --config-dir $STATE/cli encryption status"
  echo "  $BIN/clustermesh --config-dir $STATE/cli observe --follow --verdict dropped   # live drops, every node"
  echo "  ls $STATE/nodes/*/flows.jsonl                   # each node's SIEM export (OCSF JSON lines)"
  local prom
  prom=$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); p=t.get("prometheus") or {}; print(p.get("address",""))' "$STATE/topology.json")
  if [ -n "$prom" ]; then
    echo "  curl -s 'http://$prom/api/v1/query?query=up'   # Prometheus scraping every agent and apiserver"
    echo "  $STATE/prometheus/prometheus.yml    # its generated scrape config; UI at http://$prom"
    echo "  deploy/grafana/clustermesh.json                   # the Grafana dashboard (import it, datasource: that Prometheus)"
  fi
  echo "  $BIN/mesh check                                 # the check again"
  echo "  cat $STATE/topology.json                          # every namespace, address, pid, log, etcd credential"
  echo "Tear down: make demo-down"
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
