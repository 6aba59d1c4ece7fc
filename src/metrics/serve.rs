//! `GET /metrics`, `/healthz` and `/readyz` on `METRICS_ADDR`, served by a thread of its own (a small
//! tokio runtime), never by a data-plane core: the kubelet's probes and Prometheus's scrapes never
//! wait for, or count against, the registry port's `MAX_CONNECTIONS`, and liveness reads every
//! core's heartbeat from outside the cores (see [`super::health`]).
//!
//! One request per connection; a client gets [`READ_LIMIT`] to send its head (a scraper or a probe
//! sends it at once) and at most [`MAX_CLIENTS`] are served at once; past that, new connections are
//! closed at once. The slots are shared by scrapers and probes: a few scrapers and three probes per
//! pod use a handful, a slot is held for one answer (milliseconds), and the size leaves room for a
//! burst of both. A client that keeps every slot open with idle connections can delay scrapes and
//! probes, and nothing else: keep the admin port to the scrapers and the kubelet (the shipped
//! NetworkPolicy does).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

use super::health::Probe;
use super::Metrics;

/// Longest wait for a request head.
const READ_LIMIT: Duration = Duration::from_secs(2);
/// Pause after a failed accept (out of descriptors): the loop must not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Connections served at once.
const MAX_CLIENTS: usize = 128;

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const JSON: &str = "application/json";
const OPEN_METRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `listener` until `shutdown` flips. The runtime is built here, before the thread starts,
/// so a start that returned has every descriptor of it open (and fails if it cannot be built).
pub fn spawn(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = {
        let _entered = rt.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    std::thread::Builder::new()
        .name("hr-metrics".into())
        .spawn(move || {
            rt.block_on(async move {
                let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else {
                                tokio::time::sleep(ACCEPT_BACKOFF).await;
                                continue;
                            };
                            let Ok(slot) = slots.clone().try_acquire_owned() else {
                                continue; // dropped: closed at once
                            };
                            let metrics = metrics.clone();
                            tokio::spawn(async move {
                                let _slot = slot;
                                let _ = tokio::time::timeout(READ_LIMIT * 2, answer(stream, &metrics)).await;
                            });
                        }
                        _ = shutdown.changed() => return,
                    }
                }
            });
        })
}

async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(READ_LIMIT, read).await.is_err() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let mut request = lines.next().unwrap_or("").split(' ');
    let (method, target) = (request.next().unwrap_or(""), request.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let open_metrics = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("accept:") && l.contains("application/openmetrics-text")
    });
    let (status, kind, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            if open_metrics { OPEN_METRICS } else { TEXT },
            metrics.render(open_metrics),
        ),
        ("GET" | "HEAD", path) if Probe::of_path(path).is_some() => {
            let probe = Probe::of_path(path).unwrap_or(Probe::Liveness);
            let (ok, body) = metrics.health(probe);
            let status = if ok {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, JSON, format!("{body}\n"))
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            TEXT,
            "only GET (or HEAD) /metrics, /healthz, /readyz\n".into(),
        ),
    };
    let mut res = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        res.push_str(&body);
    }
    stream.write_all(res.as_bytes()).await?;
    stream.shutdown().await
}
