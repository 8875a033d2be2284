#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (run as root).
# Installs only what is missing, so on a prepared machine it finishes in seconds.
#   - Debian packages: etcd, llvm-22-dev (for bpf-linker), protoc, wireguard-go/tools,
#     iproute2, iperf3, tcpdump, tshark, bpftool, containernetworking-plugins
#     (host-local, which the CNI plugin's delegation test runs)
#     and prometheus (promtool checks the agents' and apiservers' metrics; the
#     mesh harness runs its server, scraping every agent and apiserver), podman,
#     runc and busybox-static (the e2e suite runs containers on a mesh node)
#   - the pinned Rust toolchain (rust-toolchain.toml) with rust-src, clippy, rustfmt
#   - bpf-linker 0.13.0 built against Debian's LLVM 22
#   - bpffs mounted at /sys/fs/bpf
set -euo pipefail

TOOLCHAIN=1.98.0
BPF_LINKER_VERSION=0.13.0
log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "setup: must run as root (it installs packages and mounts bpffs)" >&2
  exit 1
fi

# --- Debian packages -----------------------------------------------------------
PKGS=(etcd-server etcd-client llvm-22-dev protobuf-compiler libprotobuf-dev wireguard-go wireguard-tools
      iproute2 iputils-ping procps python3 iperf3 tcpdump tshark bpftool ethtool jq make
      containernetworking-plugins prometheus iptables podman runc busybox-static)
missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # tshark asks whether non-root users may capture; answer no without a prompt.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  if ! apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/clustermesh-apt.log 2>&1; then
    apt-get update -qq
    apt-get install -y --no-install-recommends "${missing[@]}"
  fi
else
  log "Debian packages present"
fi

# --- Rust toolchain --------------------------------------------------------------
# RUSTUP_AUTO_INSTALL=0 on these machines: rust-toolchain.toml is not honoured
# unless the toolchain is installed explicitly.
if ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1 \
   || ! rustup component list --toolchain "$TOOLCHAIN" --installed 2>/dev/null | grep -q '^rust-src' \
   || ! rustup component list --toolchain "$TOOLCHAIN" --installed 2>/dev/null | grep -q '^clippy' \
   || ! rustup component list --toolchain "$TOOLCHAIN" --installed 2>/dev/null | grep -q '^rustfmt'; then
  log "installing Rust $TOOLCHAIN with rust-src, clippy, rustfmt"
  rustup toolchain install "$TOOLCHAIN" --profile minimal --component rust-src,clippy,rustfmt
else
  log "Rust $TOOLCHAIN present"
fi

# --- bpf-linker ----------------------------------------------------------------
if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about 2 minutes)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo +"$TOOLCHAIN" install "bpf-linker@$BPF_LINKER_VERSION" \
    --locked --no-default-features --features llvm-22
else
  log "bpf-linker present"
fi

# --- bpffs ---------------------------------------------------------------------
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  log "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

log "ready"
