# syntax=docker/dockerfile:1
# The release image: the router built from the lockfile with the workspace's release profile, on
# distroless (glibc and libgcc, which the binary links; CA certificates; no shell), as a non-root user.
#   docker build -t registry.example.com/harbor-router:0.1.0 .
# Expected size: ~30 MB, mostly distroless's libraries; the binary is ~5.4 MB with its debug sections
# stripped (its symbols are kept, so backtraces and profilers name functions).
# No HEALTHCHECK: Kubernetes probes /healthz and /readyz (deploy/base/deployment.yaml).
# io_uring: Docker's default seccomp profile (25.0 and later) blocks it and the router falls back to
# epoll, logging why; docs/deployment.md#io_uring-and-seccomp says how to allow it.

# Rust 1.95 (Cargo.toml's rust-version, 1.85, is the minimum) on Debian 12, like the runtime image,
# so every glibc symbol the binary uses exists there.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The workspace: the router and the test bed, a member whose manifest and sources cargo needs to load
# the workspace (only the router is built). .dockerignore lets nothing else in.
COPY Cargo.toml Cargo.lock ./
COPY testbed/Cargo.toml testbed/Cargo.toml
COPY testbed/src testbed/src
COPY src src
# The crate index, downloaded crates and compiled dependencies stay in BuildKit caches between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p harbor-router \
    && strip --strip-debug -o /harbor-router target/release/harbor-router

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /harbor-router /usr/local/bin/harbor-router
# distroless's nonroot user, by number so Kubernetes can check runAsNonRoot.
USER 65532:65532
# LISTEN_ADDR (:8080, registry) and METRICS_ADDR (:9090, /metrics) keep their defaults.
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/harbor-router"]
