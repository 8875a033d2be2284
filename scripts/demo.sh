#!/usr/bin/env bash
# The local demo. Until the apiserver and mesh harness land, it runs the
# smallest real slice of the product on this machine:
#   - a real etcd holding two clusters' records, written in the stable key
#     schema after validation by `clustermesh validate-record`;
#   - per cluster a node namespace and a pod namespace joined by a veth, with
#     node-agent attaching the eBPF `from_endpoint` program (TCX) on the
#     node side and reporting the packets it sees from the pod.
# Everything it creates is recorded under target/mesh and removed by `down`.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=target/mesh
BIN=target/debug
NS_PREFIX=cmdemo

down() {
  if [ -d "$STATE/pids" ]; then
    for f in "$STATE"/pids/*; do
      [ -e "$f" ] || continue
      kill "$(cat "$f")" 2>/dev/null || true
    done
  fi
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX-" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$STATE"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

up() {
  [ "$(id -u)" = 0 ] || { echo "demo: run as root (network namespaces, eBPF)" >&2; exit 1; }
  down
  mkdir -p "$STATE/pids" "$STATE/logs"
  local cport pport
  cport=$(free_port); pport=$(free_port)
  local ep="http://127.0.0.1:$cport"
  etcd --name demo --data-dir "$STATE/etcd" \
    --listen-client-urls "$ep" --advertise-client-urls "$ep" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "demo=http://127.0.0.1:$pport" --log-level warn >"$STATE/logs/etcd.log" 2>&1 &
  echo $! >"$STATE/pids/etcd"
  echo "$ep" >"$STATE/etcd-endpoint"
  for _ in $(seq 100); do ETCDCTL_API=3 etcdctl --endpoints "$ep" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
  ETCDCTL_API=3 etcdctl --endpoints "$ep" endpoint health

  local id=0
  for c in c1 c2; do
    id=$((id + 1))
    local node="$NS_PREFIX-$c-node" pod="$NS_PREFIX-$c-pod"
    ip netns add "$node"; ip netns add "$pod"
    ip -n "$node" link set lo up; ip -n "$pod" link set lo up
    ip -n "$node" link add lxc0 type veth peer name eth0 netns "$pod"
    ip -n "$node" addr add "10.$id.0.1/24" dev lxc0
    ip -n "$pod" addr add "10.$id.0.2/24" dev eth0
    ip -n "$node" link set lxc0 up; ip -n "$pod" link set eth0 up
    ip netns exec "$node" "$BIN/node-agent" --endpoint-iface lxc0 --report-every 1 \
      >"$STATE/logs/agent-$c.log" 2>&1 &
    echo $! >"$STATE/pids/agent-$c"

    put() { # key json: validated exactly as an agent would decode it
      echo "$2" | "$BIN/clustermesh" validate-record "$1" >/dev/null
      ETCDCTL_API=3 etcdctl --endpoints "$ep" put "$1" "$2" >/dev/null
    }
    put "clustermesh/cluster-config/$c" "{\"id\":$id,\"name\":\"$c\",\"encryption\":{\"mode\":\"wireguard\",\"strict\":true}}"
    put "clustermesh/state/nodes/v1/$c/node-1" "{\"name\":\"node-1\",\"cluster\":\"$c\",\"underlayIps\":[\"10.$id.0.1\"],\"podCidrs\":[\"10.$id.0.0/24\"],\"bootId\":\"demo-$c\"}"
    put "clustermesh/state/ip/v1/$c/10.$id.0.2" "{\"ip\":\"10.$id.0.2\",\"cluster\":\"$c\",\"identity\":$(( (id << 16) | 256 )),\"hostIp\":\"10.$id.0.1\",\"namespace\":\"default\",\"name\":\"pod-1\"}"
  done

  echo
  echo "== a record the schema refuses: a node whose pod CIDR has host bits set"
  echo '{"name":"node-x","cluster":"c1","underlayIps":["10.1.0.9"],"podCidrs":["10.1.0.1/24"],"bootId":"x"}' \
    | "$BIN/clustermesh" validate-record clustermesh/state/nodes/v1/c1/node-x || true

  for c in c1 c2; do # wait until both agents have attached
    for _ in $(seq 100); do grep -q '^attached' "$STATE/logs/agent-$c.log" && break; sleep 0.1; done
    grep -q '^attached' "$STATE/logs/agent-$c.log" || { echo "agent of $c did not attach:"; cat "$STATE/logs/agent-$c.log"; exit 1; }
  done
  for c in c1 c2; do
    local id=${c#c}
    echo "== $c: pod pings its node through the eBPF datapath"
    ip netns exec "$NS_PREFIX-$c-pod" ping -c 3 -i 0.2 "10.$id.0.1" | tail -2
  done
  sleep 1.2 # one report interval, so the agents' next report includes the pings
  echo
  echo "== eBPF counters reported by the node agents"
  for c in c1 c2; do echo "-- $c"; tail -n 1 "$STATE/logs/agent-$c.log"; done
  echo
  echo "== etcdctl get --prefix clustermesh/"
  ETCDCTL_API=3 etcdctl --endpoints "$ep" get --prefix clustermesh/
  echo
  echo "The demo is left running. Explore:"
  echo "  ip netns list | grep $NS_PREFIX"
  echo "  ip netns exec $NS_PREFIX-c1-pod ping 10.1.0.1"
  echo "  ETCDCTL_API=3 etcdctl --endpoints $ep get --prefix clustermesh/"
  echo "  tail -f $STATE/logs/agent-c1.log"
  echo "Tear down: make demo-down"
}

case "${1:-}" in
  up) up ;;
  down) down; echo "demo removed" ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
