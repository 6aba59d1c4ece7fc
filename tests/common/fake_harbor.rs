//! An in-process fake of Harbor's `/v2/` answers, for tests of the registry logic that must run in
//! milliseconds: each project (the first path segment after `/v2/`) answers a scripted status,
//! headers and body; a project can be *held* (its requests wait until the test releases them), and
//! the fake counts the requests each project received and those the router cancelled while held
//! (the connection closed before the answer). Plain HTTP/1.1 with keep-alive, one thread per
//! connection, bound on 127.0.0.1 port 0.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Sent with `Transfer-Encoding: chunked` (no length announced).
    pub chunked: bool,
    /// Only this many body bytes are sent (of a length announced whole), then the connection is
    /// closed: a Harbor that dies mid-body.
    pub cut_after: Option<usize>,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"errors":[]}"#.to_vec(),
            chunked: false,
            cut_after: None,
        }
    }

    pub fn with(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        Answer {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
            chunked: false,
            cut_after: None,
        }
    }

    /// The same answer, its body cut after `bytes` and the connection closed.
    pub fn cut_after(mut self, bytes: usize) -> Answer {
        self.cut_after = Some(bytes);
        self
    }

    /// The same answer without a length: chunked.
    pub fn chunked(mut self) -> Answer {
        self.chunked = true;
        self
    }
}

#[derive(Default)]
struct Inner {
    answers: HashMap<String, Answer>,
    /// Answers for paths starting with a prefix; they win over the project's answer.
    by_path: Vec<(String, Answer)>,
    held: HashMap<String, bool>,
    requests: HashMap<String, u64>,
    cancelled: HashMap<String, u64>,
    /// Request lines seen, in order (`GET /v2/a/x/manifests/1`), with the Range header if any.
    log: Vec<String>,
}

pub struct FakeHarbor {
    pub addr: SocketAddr,
    inner: Arc<(Mutex<Inner>, Condvar)>,
}

impl FakeHarbor {
    /// Every project answers 404 until scripted.
    pub fn start() -> FakeHarbor {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inner: Arc<(Mutex<Inner>, Condvar)> = Arc::default();
        let shared = inner.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let shared = shared.clone();
                std::thread::spawn(move || serve(stream, shared));
            }
        });
        FakeHarbor { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn answer(&self, project: &str, answer: Answer) {
        self.lock().answers.insert(project.into(), answer);
    }

    /// The answer to every request whose path starts with `prefix` (`/v2/b/org/app/`).
    pub fn answer_path(&self, prefix: &str, answer: Answer) {
        self.lock().by_path.push((prefix.into(), answer));
    }

    /// `project`'s requests wait (after being counted) until [`FakeHarbor::release`]. `project` may
    /// be `"<project> <METHOD>"` to hold only that method's requests.
    pub fn hold(&self, project: &str) {
        self.lock().held.insert(project.into(), true);
    }

    pub fn release(&self, project: &str) {
        self.lock().held.insert(project.into(), false);
        self.inner.1.notify_all();
    }

    pub fn requests(&self, project: &str) -> u64 {
        *self.lock().requests.get(project).unwrap_or(&0)
    }

    pub fn cancelled(&self, project: &str) -> u64 {
        *self.lock().cancelled.get(project).unwrap_or(&0)
    }

    /// Requests seen whose line (`METHOD /path`, then ` range=…` if any) starts with `prefix`.
    /// Every request line seen, in order, with its range (`GET /v2/b/… range=bytes=0-`).
    pub fn log(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().log.clone()
    }

    pub fn seen(&self, prefix: &str) -> usize {
        self.lock()
            .log
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.0.lock().unwrap()
    }
}

fn serve(mut stream: TcpStream, shared: Arc<(Mutex<Inner>, Condvar)>) {
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_head(&mut stream, &mut buf) else {
            return;
        };
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or("").to_string();
        let mut parts = request_line.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let range = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("range"))
            .map(|(_, v)| v.trim().to_string());
        let project = path
            .strip_prefix("/v2/")
            .and_then(|p| p.split('/').next())
            .unwrap_or("")
            .to_string();
        let answer = {
            let (lock, cv) = &*shared;
            let mut inner = lock.lock().unwrap();
            *inner.requests.entry(project.clone()).or_default() += 1;
            let mut line = format!("{method} {path}");
            if let Some(r) = &range {
                line.push_str(&format!(" range={r}"));
            }
            inner.log.push(line);
            cv.notify_all();
            let by_method = format!("{project} {method}");
            let held = |i: &Inner| {
                i.held.get(&project).copied().unwrap_or(false)
                    || i.held.get(&by_method).copied().unwrap_or(false)
            };
            while held(&inner) {
                inner = cv.wait_timeout(inner, Duration::from_millis(10)).unwrap().0;
                if closed(&stream) {
                    *inner.cancelled.entry(project.clone()).or_default() += 1;
                    return;
                }
            }
            let by_path = inner
                .by_path
                .iter()
                .find(|(p, _)| path.starts_with(p.as_str()));
            by_path
                .map(|(_, a)| a)
                .or(inner.answers.get(&project))
                .cloned()
                .unwrap_or_else(|| Answer::status(404))
        };
        let mut out = format!("HTTP/1.1 {} Fake\r\n", answer.status);
        for (k, v) in &answer.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        let bytes = if answer.chunked {
            out.push_str("transfer-encoding: chunked\r\n\r\n");
            let mut b = out.into_bytes();
            if method != "HEAD" {
                for piece in answer.body.chunks(64 * 1024) {
                    b.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                    b.extend_from_slice(piece);
                    b.extend_from_slice(b"\r\n");
                }
                b.extend_from_slice(b"0\r\n\r\n");
            }
            b
        } else {
            out.push_str(&format!("content-length: {}\r\n\r\n", answer.body.len()));
            let mut b = out.into_bytes();
            if method != "HEAD" {
                let sent = answer.cut_after.unwrap_or(answer.body.len());
                b.extend_from_slice(&answer.body[..sent.min(answer.body.len())]);
            }
            b
        };
        if stream.write_all(&bytes).is_err() || answer.cut_after.is_some() {
            return;
        }
    }
}

/// Reads one request head (requests carry no body).
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Whether the peer closed the connection (a cancelled request).
fn closed(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let gone = match stream.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).unwrap();
    gone
}
