# ghcr.io/clustermesh/clustermesh-apiserver:<version>. Built from the
# repository root:
#
#   docker build -f deploy/images/clustermesh-apiserver.Dockerfile \
#     -t ghcr.io/clustermesh/clustermesh-apiserver:0.1.0 .

FROM debian:bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential \
      pkg-config protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/root/.cargo/bin:$PATH
COPY rust-toolchain.toml /tmp/
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --no-modify-path --profile minimal \
      --default-toolchain "$(sed -n 's/^channel = "\(.*\)"/\1/p' /tmp/rust-toolchain.toml)"
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p clustermesh-apiserver --bin clustermesh-apiserver

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/clustermesh-apiserver /usr/local/bin/clustermesh-apiserver
# The Deployment runs it as 65532 (no privileges needed).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/clustermesh-apiserver"]
