//! Graceful shutdown of the running binary: SIGTERM and SIGINT stop accepting, let in-flight requests
//! finish (bounded by SHUTDOWN_TIMEOUT) and exit 0.
//!
//! The in-flight request is a client that pipelines far more requests than the socket buffers can
//! hold answers for and does not read: the server is then stuck writing a response, exactly like a
//! slow client downloading a blob.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{get, parse_response_to, Router, DEADLINE};

/// Requests pipelined by the slow client: their answers (~150 bytes each) are far larger than the
/// socket buffers on loopback, so the server cannot finish them before the client reads.
const PIPELINED: usize = 100_000;

/// A client that pipelines [`PIPELINED`] requests from a writer thread and reads nothing until told
/// to; its write side stays open until `finish` is called.
struct SlowClient {
    stream: TcpStream,
    first: Vec<u8>,
    finish: std::sync::mpsc::Sender<()>,
}

impl SlowClient {
    /// Connects and waits for the first answer, so a request is known to be in flight.
    fn start(r: &Router) -> SlowClient {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(16 * 1024).unwrap();
        sock.connect(&r.addr.into()).unwrap();
        let stream: TcpStream = sock.into();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let (finish, finished) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let one = b"GET /v2/ HTTP/1.1\r\nHost: t\r\n\r\n";
            let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1000).collect();
            for _ in 0..PIPELINED / 1000 {
                if writer.write_all(&batch).is_err() {
                    break;
                }
            }
            let _ = finished.recv();
            let _ = writer.shutdown(std::net::Shutdown::Write);
        });
        let mut reader = stream.try_clone().unwrap();
        let mut first = Vec::new();
        while parse_response_to(&first, false).is_none() {
            let mut chunk = [0u8; 1024];
            let n = reader.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before the first answer");
            first.extend_from_slice(&chunk[..n]);
        }
        SlowClient {
            stream,
            first,
            finish,
        }
    }

    /// Closes the write side and reads everything until the server closes.
    fn finish(self) -> (usize, Vec<u8>) {
        let _ = self.finish.send(());
        read_all_answers(self.stream, self.first)
    }
}

/// Reads everything until the server closes; returns (complete answers, leftover bytes).
fn read_all_answers(mut s: TcpStream, mut buf: Vec<u8>) -> (usize, Vec<u8>) {
    let _ = s.read_to_end(&mut buf);
    let mut answers = 0;
    let mut at = 0;
    while let Some((res, used)) = parse_response_to(&buf[at..], false) {
        assert_eq!(res.status, 200);
        assert_eq!(res.body, b"{}");
        answers += 1;
        at += used;
    }
    (answers, buf[at..].to_vec())
}

#[test]
fn sigterm_lets_the_in_flight_request_finish_then_exits_0() {
    let mut r = Router::start(&[("WORKERS", "1"), ("SHUTDOWN_TIMEOUT", "30s")]);
    let client = SlowClient::start(&r);
    r.signal(libc::SIGTERM);
    // The drain sees the connection and waits for it ...
    r.wait_log(|l| l.contains(r#""message":"draining""#) && l.contains(r#""connections":1"#));
    // ... and no longer accepts (under io_uring the close of the listener completes asynchronously).
    let deadline = std::time::Instant::now() + DEADLINE;
    while TcpStream::connect(r.addr).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the listener stays open during the drain"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        r.exited().is_none(),
        "the process waits for the in-flight request"
    );

    let (answers, leftover) = client.finish();
    assert!(
        leftover.is_empty(),
        "a response was cut short: {} stray bytes",
        leftover.len()
    );
    assert!(
        answers >= 1,
        "the answers in flight at SIGTERM were delivered"
    );
    assert!(
        answers < PIPELINED,
        "the connection closed instead of serving every pipelined request"
    );
    let status = r.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0));
    r.wait_log(|l| l.contains(r#""message":"drained""#));
    assert!(!r
        .logs()
        .iter()
        .any(|l| l.contains("SHUTDOWN_TIMEOUT reached")));
}

#[test]
fn shutdown_timeout_bounds_the_drain() {
    let mut r = Router::start(&[("WORKERS", "1"), ("SHUTDOWN_TIMEOUT", "1s")]);
    let _client = SlowClient::start(&r); // never reads again, never closes
    r.signal(libc::SIGTERM);
    let status = r.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    r.wait_log(|l| l.contains("SHUTDOWN_TIMEOUT reached") && l.contains(r#""connections":1"#));
}

#[test]
fn sigint_drains_too_and_idle_connections_close_at_once() {
    let mut r = Router::start(&[("WORKERS", "2"), ("SHUTDOWN_TIMEOUT", "30s")]);
    // An idle keep-alive connection must not hold the drain for SHUTDOWN_TIMEOUT.
    let mut idle = TcpStream::connect(r.addr).unwrap();
    idle.write_all(b"GET /v2/ HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut chunk = [0u8; 1024];
    assert!(idle.read(&mut chunk).unwrap() > 0);
    assert_eq!(get(r.addr, "/v2/").status, 200);
    r.signal(libc::SIGINT);
    // Well under LINGER_LIMIT (5s): an idle connection is closed, not lingered on.
    let status = r.wait_exit(Duration::from_secs(4));
    assert_eq!(status.code(), Some(0));
    assert!(!r
        .logs()
        .iter()
        .any(|l| l.contains("SHUTDOWN_TIMEOUT reached")));
}

#[test]
fn shutdown_does_not_wait_for_a_hanging_harbor() {
    // A "Harbor" that accepts connections and never answers: discovery is stuck in a request.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let harbor = format!("http://{}", hang.local_addr().unwrap());
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for c in hang.incoming().flatten() {
            keep.lock().unwrap().push(c);
        }
    });
    let mut r = Router::start(&[
        ("WORKERS", "1"),
        ("HARBOR_URL", &harbor),
        ("UPSTREAM_RESPONSE_TIMEOUT", "5m"),
        ("SHUTDOWN_TIMEOUT", "30s"),
    ]);
    let end = std::time::Instant::now() + DEADLINE;
    while held.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < end, "discovery never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    r.signal(libc::SIGTERM);
    let status = r.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_client_that_stops_reading_is_cut_after_client_stall_timeout() {
    let mut r = Router::start(&[("WORKERS", "1"), ("CLIENT_STALL_TIMEOUT", "1s")]);
    let client = SlowClient::start(&r); // pipelines far more answers than it reads, then stops
    let started = std::time::Instant::now();
    // The router cuts the connection on its own: the drain then finds nothing to wait for.
    let mut stream = client.stream.try_clone().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut sink = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => {
                assert!(
                    matches!(e.kind(), std::io::ErrorKind::ConnectionReset),
                    "expected the router to close, got {e}"
                );
                break;
            }
        }
    }
    assert!(total > 0);
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(get(r.addr, "/v2/").status, 200, "the router keeps serving");
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(Duration::from_secs(10)).code(), Some(0));
}
