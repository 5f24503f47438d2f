# Build: docker build -f docker/ztunnel.Dockerfile -t ztunnel .   (from the repo root)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p ztunnel

# glibc-linked binary: distroless "cc" has libc and nothing else. ztunnel runs
# as root with only NET_ADMIN/SYS_ADMIN/NET_RAW (see manifests/base/ztunnel.yaml).
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/ztunnel /usr/local/bin/ztunnel
ENTRYPOINT ["/usr/local/bin/ztunnel"]
