# Build: docker build -f docker/istio-cni.Dockerfile -t istio-cni .   (from the repo root)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p istio-cni

# The agent runs iptables-restore, ip and ipset inside pod netns (through
# nsenter), so it needs those tools: a slim Debian, not distroless.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends iptables iproute2 ipset util-linux \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/istio-cni /usr/local/bin/istio-cni
COPY --from=build /src/target/release/istio-cni-agent /usr/local/bin/istio-cni-agent
ENTRYPOINT ["/usr/local/bin/istio-cni-agent"]
