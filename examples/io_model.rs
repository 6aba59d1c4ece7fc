//! One hyper HTTP/1.1 server on one monoio io_uring runtime, answering `GET /v2/` as the router does,
//! with its sockets driven one of two ways (`MODE`):
//!
//! - `poll`: monoio's readiness layer (the router's way): a read is a `recv` system call when the
//!   socket is ready, and hyper's read after each request finds `EAGAIN`;
//! - `completion`: io_uring read and write operations on owned buffers (monoio-compat's wrapper),
//!   submitted in batches with no readiness and no empty read.
//!
//! `bench/io_model.sh` measures both side by side: it is the evidence behind the choice of
//! readiness (docs/benchmarks.md). Prints the port it listens on, then serves until killed.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use monoio::io::IntoPollIo;
use monoio_compat::hyper::{MonoioIo, MonoioTimer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mode = std::env::var("MODE").unwrap_or_else(|_| "poll".into());
    if mode != "poll" && mode != "completion" {
        eprintln!("MODE must be poll or completion");
        std::process::exit(64);
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("an io_uring runtime");
    rt.block_on(async move {
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        println!("{}", listener.local_addr().expect("address").port());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = service_fn(|_| async {
                Ok::<_, Infallible>(
                    hyper::Response::builder()
                        .header("Content-Type", "application/json; charset=utf-8")
                        .header("Docker-Distribution-Api-Version", "registry/2.0")
                        .body(Full::new(Bytes::from_static(b"{}")))
                        .expect("a response"),
                )
            });
            let mut http = http1::Builder::new();
            http.timer(MonoioTimer);
            if mode == "poll" {
                let Ok(io) = stream.into_poll_io() else {
                    continue;
                };
                harbor_router::task::spawn(async move {
                    let _ = http.serve_connection(MonoioIo::new(io), service).await;
                });
            } else {
                let io = MonoioIo::new(monoio_compat::TcpStreamCompat::new(stream));
                harbor_router::task::spawn(async move {
                    let _ = http.serve_connection(io, service).await;
                });
            }
        }
    });
}
