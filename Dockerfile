# syntax=docker/dockerfile:1
#
# tokenbroker container image.
#
#   docker build -t tokenbroker:0.1.0 .
#   docker run --rm tokenbroker:0.1.0 --version
#
# Build stage: the same release build CI runs (`cargo build --release --locked`,
# see .ci/run). No system protoc is needed: build.rs compiles the proto with protox.
# The toolchain version is the one CI uses; the crate's minimum is `rust-version`
# in Cargo.toml.
FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /src
# Everything the crate needs to build (.dockerignore keeps out target/, .git,
# the dev PKI, docs, deploy and examples).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/tokenbroker /out/tokenbroker

# Runtime stage: glibc, libgcc and CA certificates only; no shell, no package
# manager. Debian 12 matches the build stage's glibc. The `nonroot` tag runs as
# uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tokenbroker /usr/local/bin/tokenbroker
USER 65532:65532
# 50051: gRPC over mTLS (API, reflection, health)
# 8081:  plaintext gRPC health for kubelet probes (TOKENBROKER_HEALTH_LISTEN)
# 9464:  Prometheus /metrics (TOKENBROKER_METRICS_LISTEN)
# The last two are off unless their variables are set.
EXPOSE 50051 8081 9464
ENTRYPOINT ["/usr/local/bin/tokenbroker"]
# Configured through environment variables (README: "Running in production").
# Any arguments replace this, e.g. `--version` or `serve --help`.
CMD ["serve"]
