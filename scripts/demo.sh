#!/usr/bin/env bash
# The local demo: two clusters c1 (id 1) and c2 (id 2), one node and one
# pod each, made one mesh by the product's own parts:
#   - per cluster a real etcd and a clustermesh-apiserver exporting into it
#     (a global service declared in a standalone YAML file);
#   - per cluster a node namespace (VXLAN device, underlay link to the other
#     node) and a pod namespace attached by the CNI plugin (clustermesh-cni,
#     called as a container runtime would: veth, address from the node's pod
#     CIDR, gateway, endpoint file for the agent);
#   - per node a node-agent that loads the eBPF datapath (maps and TCX links
#     pinned in bpffs), picks the pod up from the CNI's endpoint directory,
#     registers its node and pod with its apiserver (which allocates the
#     pod's identity), watches its own and the other cluster's etcd, merges
#     both and programs the ip-cache map: the pods then reach each other
#     across clusters over eBPF, the tunnel carrying the sender's identity.
#     TUNNEL=vxlan (default), geneve or direct picks the mode. No encryption
#     yet (WireGuard is a later issue).
# Everything it creates is recorded under target/mesh and removed by `down`.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=target/mesh
BIN=target/debug
NS_PREFIX=cmdemo
TUNNEL=${TUNNEL:-vxlan}
# ENCRYPTION=strict (default): WireGuard between the nodes, fail closed;
# wireguard: WireGuard, not strict; none: no encryption.
ENCRYPTION=${ENCRYPTION:-strict}
case "$ENCRYPTION" in strict|wireguard|none) ;; *) echo "demo: ENCRYPTION must be strict, wireguard or none" >&2; exit 2 ;; esac
# Pod MTU: the underlay's 1500 minus what the path adds (WireGuard 80,
# VXLAN/Geneve 50).
if [ "$ENCRYPTION" = none ]; then POD_MTU=1450; else POD_MTU=1420; fi
case "$TUNNEL" in vxlan|geneve|direct) ;; *) echo "demo: TUNNEL must be vxlan, geneve or direct" >&2; exit 2 ;; esac

down() {
  if [ -d "$STATE/pids" ]; then
    for f in "$STATE"/pids/*; do
      [ -e "$f" ] || continue
      kill "$(cat "$f")" 2>/dev/null || true
    done
  fi
  # The WireGuard devices are processes of their own (they outlive agents).
  pkill -f "clustermesh-wg cmwg-c[12] " 2>/dev/null || true
  rm -f /var/run/wireguard/cmwg-c1.sock /var/run/wireguard/cmwg-c2.sock
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX-" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf /sys/fs/bpf/"$NS_PREFIX"-* 2>/dev/null || true
  rm -rf "$STATE"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_for() { # file pattern what
  for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "demo: timed out waiting for $3; log $1:" >&2; tail -20 "$1" >&2; exit 1
}

up() {
  [ "$(id -u)" = 0 ] || { echo "demo: run as root (network namespaces, eBPF)" >&2; exit 1; }
  down
  mkdir -p "$STATE/pids" "$STATE/logs"
  local id=0
  for c in c1 c2; do
    id=$((id + 1))
    local cport pport gport mport ep
    cport=$(free_port); pport=$(free_port); gport=$(free_port); mport=$(free_port)
    ep="http://127.0.0.1:$cport"
    echo "$ep" >"$STATE/etcd-$c"
    echo "127.0.0.1:$gport" >"$STATE/apiserver-$c"
    echo "127.0.0.1:$mport" >"$STATE/metrics-$c"
    # 1. the cluster's etcd
    etcd --name "$c" --data-dir "$STATE/etcd-$c.data" \
      --listen-client-urls "$ep" --advertise-client-urls "$ep" \
      --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
      --initial-cluster "$c=http://127.0.0.1:$pport" --log-level warn >"$STATE/logs/etcd-$c.log" 2>&1 &
    echo $! >"$STATE/pids/etcd-$c"
    for _ in $(seq 100); do ETCDCTL_API=3 etcdctl --endpoints "$ep" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done

    # 2. a node namespace with a VXLAN device (external mode), and a pod
    #    attached by the CNI plugin exactly as a container runtime calls it
    #    (config on stdin, CNI_* variables, run in the node's namespace).
    local node="$NS_PREFIX-$c-node" pod="$NS_PREFIX-$c-pod"
    ip netns add "$node"; ip netns add "$pod"
    ip -n "$node" link set lo up
    ip -n "$node" link add cm_vxlan type vxlan external dstport 8472
    ip -n "$node" link set cm_vxlan up
    mkdir -p "$STATE/endpoints-$c"
    cat >"$STATE/cni-$c.json" <<JSON
{"cniVersion": "1.1.0", "name": "clustermesh", "type": "clustermesh-cni",
 "podCIDR": "10.$id.0.0/24", "mtu": $POD_MTU, "endpointDir": "$PWD/$STATE/endpoints-$c",
 "args": {"cni": {"labels": [{"key": "k8s:app", "value": "web"}]}}}
JSON
    ip netns exec "$node" env CNI_COMMAND=ADD CNI_CONTAINERID="$c-web-1" CNI_NETNS="/var/run/netns/$pod" \
      CNI_IFNAME=eth0 CNI_ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1" CNI_PATH=/usr/lib/cni \
      "$BIN/clustermesh-cni" <"$STATE/cni-$c.json" >"$STATE/cni-result-$c.json"
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ips"][0]["address"].split("/")[0])' \
      "$STATE/cni-result-$c.json" >"$STATE/podip-$c"
    echo "CNI ADD $c-web-1: pod $(cat "$STATE/podip-$c") in $pod"

    # 3. a global service declared in standalone YAML
    cat >"$STATE/services-$c.yaml" <<YAML
services:
  - namespace: default
    name: web
    frontends: [10.96.0.10]
    ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
    backends: [{ip: $(cat "$STATE/podip-$c"), node: node-1}]
    global: true
    affinity: local
YAML
    # 4. the cluster's apiserver
    "$BIN/clustermesh-apiserver" --cluster-name "$c" --cluster-id "$id" --etcd-endpoints "$ep" \
      --listen "127.0.0.1:$gport" --metrics-listen "127.0.0.1:$mport" \
      --services-file "$STATE/services-$c.yaml" \
      $(case "$ENCRYPTION" in strict) echo "--encryption wireguard --encryption-strict" ;; wireguard) echo "--encryption wireguard" ;; esac) \
      >"$STATE/logs/apiserver-$c.log" 2>&1 &
    echo $! >"$STATE/pids/apiserver-$c"
    wait_for "$STATE/logs/apiserver-$c.log" "serving" "apiserver of $c"

  done
  # The underlay: the two nodes on one link (like routable node IPs across
  # VPCs), 192.0.2.1 and 192.0.2.2.
  ip -n "$NS_PREFIX-c1-node" link add ul0 type veth peer name ul0 netns "$NS_PREFIX-c2-node"
  ip -n "$NS_PREFIX-c1-node" addr add 192.0.2.1/24 dev ul0
  ip -n "$NS_PREFIX-c2-node" addr add 192.0.2.2/24 dev ul0
  ip -n "$NS_PREFIX-c1-node" link set ul0 up
  ip -n "$NS_PREFIX-c2-node" link set ul0 up
  # 5. connect the clusters: each agent's clusters directory holds the
  #    other cluster's etcd (what `clustermesh connect` will write)
  for c in c1 c2; do
    mkdir -p "$STATE/clusters-$c"
    for o in c1 c2; do
      [ "$o" = "$c" ] && continue
      printf 'endpoints:\n  - %s\n' "$(cat "$STATE/etcd-$o")" >"$STATE/clusters-$c/$o"
    done
  done
  # 6. the node agents: eBPF on the pod's veth, node + endpoint registered,
  #    and the control plane watching the local and the remote cluster
  local id=0
  for c in c1 c2; do
    id=$((id + 1))
    local sport; sport=$(free_port)
    echo "127.0.0.1:$sport" >"$STATE/agent-status-$c"
    "$BIN/node-agent" --netns "$NS_PREFIX-$c-node" --endpoint-dir "$STATE/endpoints-$c" --report-every 1 \
      --overlay-iface cm_vxlan --underlay-iface ul0 --tunnel "$TUNNEL" \
      --bpf-pin-dir "/sys/fs/bpf/$NS_PREFIX-$c" \
      --apiserver "http://$(cat "$STATE/apiserver-$c")" --node-name node-1 \
      --underlay-ip "192.0.2.$id" --pod-cidr "10.$id.0.0/24" \
      --cluster-name "$c" --local-etcd-endpoints "$(cat "$STATE/etcd-$c")" \
      --clusters-dir "$STATE/clusters-$c" --status-listen "127.0.0.1:$sport" \
      --audit-log "$STATE/audit-$c.jsonl" \
      $( [ "$ENCRYPTION" = none ] || echo "--wireguard-iface cmwg-$c --wireguard-key-file $STATE/wg-$c.key --wireguard-log $STATE/logs/wg-$c.log" ) \
      >"$STATE/logs/agent-$c.log" 2>"$STATE/logs/agent-$c.err" &
    echo $! >"$STATE/pids/agent-$c"
  done
  for c in c1 c2; do
    wait_for "$STATE/logs/agent-$c.log" "^attached" "agent of $c to attach"
    wait_for "$STATE/logs/agent-$c.log" "has identity" "agent of $c to register its endpoint"
  done

  echo
  echo "== a record the schema refuses: a node whose pod CIDR has host bits set"
  echo '{"name":"node-x","cluster":"c1","underlayIps":["192.0.2.9"],"podCidrs":["10.1.0.1/24"],"bootId":"x"}' \
    | "$BIN/clustermesh" validate-record clustermesh/state/nodes/v1/c1/node-x || true

  # Wait until each agent's control plane has synced both clusters (the
  # remote pod is in its ip-cache map), then ping across clusters.
  http_get() { python3 - "$1" "$2" <<'PY'
import socket, sys
host, port = sys.argv[1].split(":")
s = socket.create_connection((host, int(port))); s.sendall(("GET %s HTTP/1.0\r\n\r\n" % sys.argv[2]).encode())
body = b""
while True:
    b = s.recv(65536)
    if not b: break
    body += b
print(body.decode().split("\r\n\r\n", 1)[1])
PY
  }
  for c in c1 c2; do
    for _ in $(seq 200); do
      http_get "$(cat "$STATE/agent-status-$c")" /status 2>/dev/null | grep -q '"all_synced": true' && break
      sleep 0.1
    done
  done
  echo
  for c in c1 c2; do
    local id=${c#c} other
    other=$(( 3 - id ))
    echo "== $c: pod $(cat "$STATE/podip-$c") pings the pod of c$other, $(cat "$STATE/podip-c$other") (eBPF, $TUNNEL, encryption $ENCRYPTION)"
    ip netns exec "$NS_PREFIX-$c-pod" ping -c 5 -i 0.2 "$(cat "$STATE/podip-c$other")" | tail -2
  done
  if [ "$ENCRYPTION" != none ]; then
    echo
    echo "== c1's WireGuard device (userspace, its own process; wg show reads it)"
    ip netns exec "$NS_PREFIX-c1-node" wg show cmwg-c1 | sed 's/^/  /'
    echo "== c1's encryption audit trail"
    sed 's/^/  /' "$STATE/audit-c1.jsonl"
  fi
  sleep 1.2 # one report interval, so the agents' next report includes the pings
  echo
  echo "== node agents: identities allocated by the apiservers, eBPF counters (tunnel/routed = sent to the other node, local = delivered)"
  for c in c1 c2; do
    echo "-- $c"; grep "has identity" "$STATE/logs/agent-$c.log" | tail -1
    awk '/packets/ {last[$1" "$2]=$0} END {for (k in last) print last[k]}' "$STATE/logs/agent-$c.log" | sort
  done
  for c in c1 c2; do
    echo
    echo "== $c: etcdctl get --prefix clustermesh/ (exported records; internal ones hidden)"
    ETCDCTL_API=3 etcdctl --endpoints "$(cat "$STATE/etcd-$c")" get --prefix clustermesh/ \
      | awk 'BEGIN{skip=0} /^clustermesh\/internal\//{skip=2} {if (skip>0) {skip--; next} print}'
  done
  echo
  echo "== c1's node agent: its view of the mesh (GET /status)"
  http_get "$(cat "$STATE/agent-status-c1")" /status
  echo
  echo "== c1 apiserver metrics (excerpt)"
  python3 - "$(cat "$STATE/metrics-c1")" <<'PY'
import socket, sys
host, port = sys.argv[1].split(":")
s = socket.create_connection((host, int(port))); s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
body = b""
while True:
    b = s.recv(65536)
    if not b: break
    body += b
for line in body.decode().split("\r\n\r\n", 1)[1].splitlines():
    if line.startswith("clustermesh_apiserver_exported_records") or "result=" in line:
        print(line)
PY
  echo
  echo "The demo is left running. Explore:"
  echo "  ip netns list | grep $NS_PREFIX"
  echo "  ip netns exec $NS_PREFIX-c1-pod ping $(cat "$STATE/podip-c2")      # c1's pod to c2's pod over eBPF ($TUNNEL)"
  echo "  ip netns exec $NS_PREFIX-c2-node tcpdump -ni ul0                # the underlay (VXLAN: udp 8472, Geneve: udp 6081)"
  echo "  ls $STATE/endpoints-c1                            # the CNI plugin's endpoint files"
  echo "  ETCDCTL_API=3 etcdctl --endpoints $(cat "$STATE/etcd-c1") get --prefix clustermesh/state/"
  echo "  tail -f $STATE/logs/agent-c1.log $STATE/logs/apiserver-c1.log"
  echo "  agent status: python3 -c 'import urllib.request;print(urllib.request.urlopen(\"http://$(cat "$STATE/agent-status-c1")/status\").read().decode())'"
  echo "Tear down: make demo-down"
}

case "${1:-}" in
  up) up ;;
  down) down; echo "demo removed" ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
