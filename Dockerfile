# Release image: a static-ish Rust binary on distroless (glibc, no shell), running as non-root.
#   docker build -t harbor-router .
# io_uring note: Docker's default seccomp profile blocks io_uring; the router then logs a warning and
# runs on epoll. Allow io_uring in the profile (or use IO_DRIVER=epoll to silence the warning).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The test bed is a workspace member: cargo needs its manifest even to build the router alone.
COPY testbed ./testbed
RUN cargo build --release --locked -p harbor-router && strip target/release/harbor-router

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/harbor-router /usr/local/bin/harbor-router
USER nonroot:nonroot
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/harbor-router"]
