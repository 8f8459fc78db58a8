# syntax=docker/dockerfile:1
#
# veer images, from one build of a static (musl) binary:
#
#   docker build -t veer .                     # the sidecar: distroless static, runs as 5995:5995
#   docker build --target init -t veer-init .  # `veer redirect-traffic` with iptables, for the
#                                              # init container (runs as root with NET_ADMIN)
#   docker build --target dataplane -t veer-consul-dataplane .
#                                              # consul-k8s 1.x: consul-dataplane with veer as
#                                              # its `envoy` (deploy/kubernetes/README.md)
#
# On an arm64 builder: --build-arg TARGET=aarch64-unknown-linux-musl.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
# The consul-dataplane release the `dataplane` target starts from: the one
# your consul-k8s chart sets as global.imageConsulDataplane (1.9.11 is
# consul-k8s 1.9.11's default).
ARG CONSUL_DATAPLANE_VERSION=1.9.11

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
ARG TARGET=x86_64-unknown-linux-musl
# musl-gcc builds ring's C and assembly for the musl target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add ${TARGET}
WORKDIR /src
COPY . .
# A static, stripped release binary; Cargo.lock is honoured as committed.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
RUN cargo build --release --locked --target ${TARGET} --bin veer \
 && /src/target/${TARGET}/release/veer --version

# The init container: Consul's redirection rules need iptables-restore
# (nf_tables or legacy back end), so this one is a small Debian image.
FROM debian:${DEBIAN_RELEASE}-slim AS init
ARG TARGET=x86_64-unknown-linux-musl
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/${TARGET}/release/veer /usr/local/bin/veer
USER 0:0
ENTRYPOINT ["/usr/local/bin/veer"]
CMD ["redirect-traffic", "-h"]

# consul-k8s 1.x injects consul-dataplane, which runs the `envoy` it finds on
# PATH (exec.LookPath("envoy"); -envoy-executable-path overrides it). This
# image is HashiCorp's consul-dataplane image with veer written over
# /usr/local/bin/envoy: consul-dataplane, its entrypoint (dumb-init),
# `-check-proxy-health`, `discover` and the graceful/DNS listeners stay
# HashiCorp's; veer takes Envoy's argv and bootstrap (`veer envoy`, chosen by
# the file name). /usr/local/bin/privileged-envoy (the setcap copy the
# gateway Deployments use for ports < 1024) is left as Envoy: veer is a
# sidecar, not a gateway. consul-k8s runs the container as 5995:5995 with
# every capability dropped and a read-only root; veer needs nothing more.
# Not built in veer's CI (no Docker daemon there); its Dockerfile checks are
# in crates/veer-admin/tests/deploy.rs.
FROM hashicorp/consul-dataplane:${CONSUL_DATAPLANE_VERSION} AS dataplane
ARG TARGET=x86_64-unknown-linux-musl
COPY --from=build /src/target/${TARGET}/release/veer /usr/local/bin/envoy
USER 5995:5995
ENTRYPOINT ["/usr/local/bin/dumb-init", "/usr/local/bin/consul-dataplane"]

# The sidecar (the default target): nothing but the binary, CA certificates
# and an unprivileged user. UID 5995 is the proxy UID that Consul's
# redirection rules exempt (consul-k8s uses the same).
FROM gcr.io/distroless/static-debian12:nonroot AS sidecar
ARG TARGET=x86_64-unknown-linux-musl
LABEL org.opencontainers.image.title="veer" \
      org.opencontainers.image.description="A pure-Rust sidecar data plane for Consul's service mesh (transparent proxy)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/${TARGET}/release/veer /usr/local/bin/veer
USER 5995:5995
# 20000 inbound mTLS, 15001 outbound (loopback), 19000 admin (loopback),
# 20200 Prometheus and /ready, 20300+ expose paths for probes.
EXPOSE 20000 20200
ENTRYPOINT ["/usr/local/bin/veer"]
CMD ["run", "--config", "/etc/veer/veer.toml"]
