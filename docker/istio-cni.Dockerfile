# Build: docker build -f docker/istio-cni.Dockerfile -t istio-cni .   (from the repo root)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The plugin runs on the node, not in this image: static (musl), so any
# node's libc will do. It is built without the agent's crates, which are all
# pure Rust but ring, whose C code would need a musl C compiler.
RUN rustup target add x86_64-unknown-linux-musl \
    && cargo build --release -p istio-cni --no-default-features --bin istio-cni --target x86_64-unknown-linux-musl \
    && cargo build --release -p istio-cni --bin istio-cni-agent

# The agent runs iptables-restore, ip and ipset inside pod netns (through
# nsenter), so it needs those tools: a slim Debian, not distroless.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends iptables iproute2 ipset util-linux \
    && rm -rf /var/lib/apt/lists/*
# Next to the agent, where it looks for the plugin to install.
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/istio-cni /usr/local/bin/istio-cni
COPY --from=build /src/target/release/istio-cni-agent /usr/local/bin/istio-cni-agent
# Istio's cni chart runs `command: [install-cni]` (replacing the entrypoint):
# the agent takes that name as the chart's contract (settings from the env).
RUN ln -s istio-cni-agent /usr/local/bin/install-cni
ENTRYPOINT ["/usr/local/bin/istio-cni-agent"]
