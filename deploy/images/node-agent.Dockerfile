# ghcr.io/clustermesh/node-agent:<version>: node-agent, the WireGuard device
# it starts (clustermesh-wg) and the CNI plugin its init container installs
# on the host (clustermesh-cni). Built from the repository root:
#
#   docker build -f deploy/images/node-agent.Dockerfile \
#     -t ghcr.io/clustermesh/node-agent:0.1.0 .
#
# node-agent's build.rs builds the eBPF programs (tunnel-ebpf) with
# aya-build, which needs the pinned toolchain with rust-src and bpf-linker
# linked against LLVM 22 (what scripts/setup.sh installs on a build host;
# llvm-22-dev must come from an apt source that has it, e.g. apt.llvm.org
# for Debian 12).

FROM debian:bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential \
      pkg-config protobuf-compiler libprotobuf-dev llvm-22-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/root/.cargo/bin:$PATH
COPY rust-toolchain.toml /tmp/
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --no-modify-path --profile minimal \
      --default-toolchain "$(sed -n 's/^channel = "\(.*\)"/\1/p' /tmp/rust-toolchain.toml)" \
      --component rust-src
RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker@0.13.0 --locked \
      --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p node-agent -p clustermesh-crypto -p clustermesh-cni --bins

FROM debian:bookworm-slim
# curl: the install-cni init container reads its Node's spec.podCIDR.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/node-agent /usr/local/bin/node-agent
COPY --from=build /src/target/release/clustermesh-wg /usr/local/bin/clustermesh-wg
COPY --from=build /src/target/release/clustermesh-cni /usr/local/bin/clustermesh-cni
ENTRYPOINT ["/usr/local/bin/node-agent"]
