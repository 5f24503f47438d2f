# Build: docker build -f docker/waypoint.Dockerfile -t waypoint .   (from the repo root)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p waypoint

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/waypoint /usr/local/bin/waypoint
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/waypoint"]
